"""x86 latency of bnfold-compiled models against onnxruntime, side by side.

For each model (default: MobileNetV2 and ResNet-18, fp32, batch 1) the model is compiled once
for ``x86`` (this machine's CPU). Then, for each thread count, two timing servers start, one
per engine, each in its own process: the TVM artifact (``TVM_NUM_THREADS``) and onnxruntime
(ORT_ENABLE_ALL, ``intra_op_num_threads``). They are timed alternately in blocks of runs,
round by round, so both see the same machine state, and never at the same time (two thread
pools in one process steal each other's cores while they spin). Reported: medians and the ratio
TVM / onnxruntime (below 1 means the compiled model is faster).

    python -m benchmarks.bench_cpu [--models mobilenet_v2,resnet18] [--threads 1,2]
        [--rounds 10] [--cache .cache/models] [--json benchmarks/results/bench_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("bench_cpu")

DEFAULT_MODELS = ("mobilenet_v2", "resnet18")
BLOCK = 5  # timed runs per engine per round
PAUSE_S = 0.2  # between blocks: lets the other engine's pool stop spinning
WARMUP = 3
ENGINES = ("tvm", "onnxruntime")


def _serve(engine: str, outdir: Path, model_path: Path, threads: int) -> None:
    """A timing server for one engine: load, warm up, then answer each ``run N`` line on stdin
    with a JSON list of N latencies (ms) on stdout, until ``quit``."""
    import numpy as np

    from bnfold import runtime

    compiled = runtime.load(outdir, threads=threads)
    rng = np.random.default_rng(0)
    feeds = {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in compiled.inputs}
    if engine == "tvm":

        def fn() -> None:
            compiled.run(feeds)

    else:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])

        def fn() -> None:
            sess.run(None, feeds)

    for _ in range(WARMUP):
        fn()
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *arg = line.split()
        if cmd != "run":
            break
        fn()  # untimed: caches and the pool warm up again after the other engine's block
        times = []
        for _ in range(int(arg[0])):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        print(json.dumps(times), flush=True)


def _measure(outdir: Path, model_path: Path, threads: int, rounds: int) -> dict[str, Any]:
    """Median latency of both engines at ``threads`` threads, timed alternately."""
    env = {**os.environ, "TVM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    servers: dict[str, subprocess.Popen[str]] = {}
    try:
        for engine in ENGINES:
            cmd = [sys.executable, "-m", "benchmarks.bench_cpu", "--serve", engine,
                   str(outdir), str(model_path), str(threads)]  # fmt: skip
            servers[engine] = proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the {engine} timing server failed to start")
        times: dict[str, list[float]] = {k: [] for k in ENGINES}
        for _ in range(rounds):
            for engine, proc in servers.items():
                assert proc.stdin is not None and proc.stdout is not None
                time.sleep(PAUSE_S)
                proc.stdin.write(f"run {BLOCK}\n")
                proc.stdin.flush()
                times[engine] += json.loads(proc.stdout.readline())
    finally:
        for proc in servers.values():
            if proc.stdin is not None:
                proc.stdin.close()  # EOF ends the server's loop
            proc.wait(timeout=60)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "threads": threads,
        "tvm_ms": med["tvm"],
        "ort_ms": med["onnxruntime"],
        "ratio": med["tvm"] / med["onnxruntime"],
        "tvm_ms_min": min(times["tvm"]),
        "ort_ms_min": min(times["onnxruntime"]),
        "samples": len(times["tvm"]),
    }


def _compile(name: str, cache: Path, workdir: Path) -> tuple[Path, dict[str, Any]]:
    from bnfold import lower

    outdir = workdir / f"{name}-x86"
    # The real inputs give the shapes of dynamic inputs (PP-OCR); batch 1 either way.
    inputs = cache / "inputs" / f"{name}.npz"
    manifest = lower.compile_model(cache / f"{name}.onnx", "x86", outdir, verify=False,
                                   inputs=inputs if inputs.is_file() else None)  # fmt: skip
    return outdir, manifest.compile


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main(argv: list[str] | None = None) -> int:
    """Compile, time, print a table and write JSON; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--cache", type=Path, default=Path(".cache/models"))
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/bench_cpu.json"))
    parser.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    if args.serve:
        engine, outdir, model, threads = args.serve
        _serve(engine, Path(outdir), Path(model), int(threads))
        return 0

    rows = []
    for name in args.models.split(","):
        model_path = args.cache / f"{name}.onnx"
        if not model_path.is_file():
            logger.error("%s missing: run `make models` first", model_path)
            return 2
        outdir, compile_info = _compile(name, args.cache, args.workdir)
        for t in (int(t) for t in args.threads.split(",")):
            row = {"model": name, **_measure(outdir, model_path, t, args.rounds)}
            row["compile_s"] = compile_info["seconds"]
            row["compile_peak_rss_mb"] = compile_info["peak_rss_mb"]
            rows.append(row)
            logger.info("%-13s %dT  tvm %8.2f ms  ort %7.2f ms  ratio %5.2f", name, t,
                        row["tvm_ms"], row["ort_ms"], row["ratio"])  # fmt: skip

    print(f"{'model':<13} {'threads':>7} {'tvm ms':>9} {'ort ms':>9} {'tvm/ort':>8}")
    for r in rows:
        print(f"{r['model']:<13} {r['threads']:>7} {r['tvm_ms']:>9.2f} {r['ort_ms']:>9.2f} "
              f"{r['ratio']:>8.2f}")  # fmt: skip
    from bnfold import atomic, lower

    atomic.write_json(args.json, {
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "versions": lower.versions(),
        "batch": 1,
        "ort": "ORT_ENABLE_ALL, intra_op_num_threads = threads, CPUExecutionProvider",
        "method": f"separate processes, alternating blocks of {BLOCK} runs, medians",
        "rows": rows,
    })  # fmt: skip
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
