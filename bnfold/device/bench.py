"""Fair latency of a compiled model against onnxruntime on this machine (``bnfold bench``).

The method of ``benchmarks/bench_cpu.py``: each engine is a timing server in its own process
(``python -m bnfold.device.bench --serve ...``) that loads and warms up, then answers ``run N`` with
N latencies. Engines are timed in alternating blocks, round by round, never at the same time (two
thread pools spinning in one machine steal each other's cores), with a short pause between blocks
and one untimed run at the start of each block. Engines:

- ``ort``: onnxruntime, ORT_ENABLE_ALL, on the original (unfolded) model (the baseline);
- ``ort_noopt``: onnxruntime, graph optimizations off, on the original;
- ``ort_folded``: onnxruntime, ORT_ENABLE_ALL, on ``model.folded.onnx``;
- ``compiled``: the TVM artifact through :func:`bnfold.runtime.load`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bnfold import artifact, onnxrt, runtime
from bnfold.device.deploy import reference_model
from bnfold.errors import BnfoldError
from bnfold.lower import compiler as lower
from bnfold.targets import host_arch

logger = logging.getLogger(__name__)

ENGINES = ("ort", "ort_noopt", "ort_folded", "compiled")
LABELS = {
    "ort": "onnxruntime ORT_ENABLE_ALL (original)",
    "ort_noopt": "onnxruntime optimizations off (original)",
    "ort_folded": "onnxruntime ORT_ENABLE_ALL (folded)",
    "compiled": "bnfold compiled (TVM)",
}
PAUSE_S = 0.2
WARMUP = 3


CLOCK_ENV = "BNFOLD_BENCH_CLOCK"


def _serve(engine: str, outdir: Path, model_path: Path, threads: int) -> None:
    """A timing server: load, warm up, print ``ready``, then answer ``run N`` lines with a JSON
    list of N latencies in ms, until EOF or ``quit``. ``compiled*`` engines run the artifact in
    ``outdir``; the others run ``model_path`` in onnxruntime (``ort_noopt``: optimizations off,
    any other name: ORT_ENABLE_ALL)."""
    manifest = artifact.load(outdir)
    rng = np.random.default_rng(0)
    feeds = {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in manifest.input_specs}
    if engine.startswith("compiled"):
        compiled = runtime.load(outdir, threads=threads)

        def fn() -> None:
            compiled.run(feeds)

    else:
        sess = onnxrt.session(model_path, optimize=engine != "ort_noopt", threads=threads,
                              log_severity=onnxrt.ERROR)  # fmt: skip

        def fn() -> None:
            sess.run(None, feeds)

    # CPU time of this thread (measure(cpu_time=True), 1 thread): what a run costs, not how long
    # it waited for a core on a shared machine.
    clock = time.thread_time if os.environ.get(CLOCK_ENV) == "thread" else time.perf_counter
    for _ in range(WARMUP):
        fn()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        cmd, *arg = line.split()
        if cmd != "run":
            break
        fn()  # untimed: caches and the thread pool warm up again after the other engines
        times = []
        for _ in range(int(arg[0])):
            start = clock()
            fn()
            times.append((clock() - start) * 1e3)
        sys.stdout.write(json.dumps(times) + "\n")
        sys.stdout.flush()


def measure(
    models: dict[str, tuple[Path, Path]], threads: int, rounds: int, block: int,
    cpu_time: bool = False,
) -> dict[str, list[float]]:
    """Latencies (ms) per engine; ``models`` maps engine -> (outdir, onnx model path).

    ``cpu_time``: each run's CPU time in the engine's calling thread instead of wall-clock
    time, for a shared machine. 1 thread only (there TVM and onnxruntime compute in the
    calling thread); it does not remove cache and memory-bandwidth contention."""
    if cpu_time and threads != 1:
        raise BnfoldError("CPU-time measurement needs 1 thread")
    env = {**os.environ, "TVM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    if cpu_time:
        env[CLOCK_ENV] = "thread"
    servers: dict[str, subprocess.Popen[str]] = {}
    try:
        for engine, (outdir, model_path) in models.items():
            cmd = [sys.executable, "-m", "bnfold.device.bench", "--serve", engine, str(outdir),
                   str(model_path), str(threads)]  # fmt: skip
            servers[engine] = proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise BnfoldError(f"the {engine} timing server failed to start")
        times: dict[str, list[float]] = {k: [] for k in servers}
        for _ in range(rounds):
            for engine, proc in servers.items():
                assert proc.stdin is not None and proc.stdout is not None
                time.sleep(PAUSE_S)
                proc.stdin.write(f"run {block}\n")
                proc.stdin.flush()
                times[engine] += json.loads(proc.stdout.readline())
    finally:
        for proc in servers.values():
            if proc.stdin is not None:
                proc.stdin.close()  # EOF ends the server's loop
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return times


def cpu_name() -> str:
    """This machine's CPU model name (for benchmark reports)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux: fall back below
        pass
    return platform.processor() or "?"


def summarize(times: list[float]) -> dict[str, float]:
    """Median, p90, min, max of latencies in ms."""
    return {
        "p50_ms": statistics.median(times),
        "p90_ms": float(np.percentile(times, 90)),
        "min_ms": min(times),
        "max_ms": max(times),
        "samples": len(times),
    }


def bench(
    model_or_outdir: str | os.PathLike[str],
    *,
    target: str = "x86",
    threads: int = 1,
    rounds: int = 10,
    block: int = 5,
    workdir: str | os.PathLike[str] | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, Any]:
    """Time the four engines (see the module docstring); returns a JSON-ready dict.

    Args:
        model_or_outdir: A ``bnfold compile`` folder, or an ONNX model to compile first.
        target: Target for compiling a model; must run natively here.
        threads: Threads for every engine (TVM_NUM_THREADS, intra_op_num_threads).
        rounds: Rounds of alternating blocks.
        block: Timed runs per engine per round.
        workdir: Where to compile a model (a temporary folder when None).
        shapes: Concrete shapes for dynamic inputs when compiling a model.
    """
    path = Path(model_or_outdir)
    tmp = None
    compile_info: dict[str, Any] = {}
    if path.is_dir():
        outdir = path
    elif path.is_file():
        if workdir is None:
            tmp = tempfile.TemporaryDirectory(prefix="bnfold-bench-")
            workdir = tmp.name
        outdir = Path(workdir) / f"{path.stem}-{target.replace(':', '-')}"
        logger.info("compiling %s for %s into %s", path, target, outdir)
        compile_info = lower.compile_model(path, target, outdir, shapes, verify=False).compile
    else:
        raise BnfoldError(f"{path}: no such model or folder")
    try:
        manifest = artifact.load(outdir)
        if manifest.arch != host_arch() or manifest.device != "cpu":
            raise BnfoldError(f"{manifest.spec} does not run natively on this "
                              f"{host_arch()} CPU: bench times native CPU builds")  # fmt: skip
        original, note = reference_model(outdir, manifest)
        folded = outdir / manifest.folded["file"]
        engines = {"ort": (outdir, original), "ort_noopt": (outdir, original),
                   "ort_folded": (outdir, folded), "compiled": (outdir, folded)}  # fmt: skip
        if note:
            logger.warning("%s", note)
        times = measure(engines, threads, rounds, block)
    finally:
        if tmp is not None:
            tmp.cleanup()
    stats = {k: summarize(v) for k, v in times.items()}
    base = stats["ort"]["p50_ms"]
    for s in stats.values():
        s["ratio_to_ort"] = s["p50_ms"] / base
    return {
        "model": manifest.source["path"],
        # An int8 build: the "original" is the QDQ model, so "ort" is onnxruntime's int8.
        "int8": bool(manifest.int8),
        "original_used": not note,
        "note": note,
        "target": manifest.spec,
        "threads": threads,
        "inputs": {s.name: list(s.shape) for s in manifest.input_specs},
        "method": f"separate processes, alternating blocks of {block} runs x {rounds} rounds",
        "compile": compile_info or manifest.compile,
        "engines": stats,
        "samples_ms": times,
    }


def table(result: dict[str, Any]) -> str:
    """A text table of a :func:`bench` result."""
    lines = [f"{Path(result['model']).name} on {result['target']}, {result['threads']} thread(s), "
             f"{result['method']}"]  # fmt: skip
    if result["note"]:
        lines.append(f"note: {result['note']}")
    lines.append(f"{'engine':<42} {'p50 ms':>9} {'p90 ms':>9} {'min ms':>9} {'/ort':>6}")
    for k, s in result["engines"].items():
        label = LABELS[k].replace("(original)", "(QDQ int8)") if result.get("int8") else LABELS[k]
        lines.append(f"{label:<42} {s['p50_ms']:>9.3f} {s['p90_ms']:>9.3f} "
                     f"{s['min_ms']:>9.3f} {s['ratio_to_ort']:>6.2f}")  # fmt: skip
    return "\n".join(lines)


def gate(
    result: dict[str, Any], *, max_latency_ms: float | None, max_ratio: float | None
) -> list[str]:
    """The failed gates, each as a line (empty when all pass)."""
    c = result["engines"]["compiled"]
    failures = []
    if max_latency_ms is not None and c["p50_ms"] > max_latency_ms:
        failures.append(f"compiled median {c['p50_ms']:.3f} ms > --max-latency-ms "
                        f"{max_latency_ms:g}")  # fmt: skip
    if max_ratio is not None and c["ratio_to_ort"] > max_ratio:
        failures.append(f"compiled / onnxruntime = {c['ratio_to_ort']:.2f} > --max-ratio "
                        f"{max_ratio:g}")  # fmt: skip
    return failures


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--serve":
        _serve(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]))
        sys.exit(0)
    sys.exit("usage: python -m bnfold.device.bench --serve ENGINE OUTDIR MODEL THREADS (internal)")
