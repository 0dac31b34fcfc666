"""Where the time goes in a compiled model: per operator kind, x86, one thread by default.

    python -m benchmarks.profile_ops                      # MobileNetV2 and ResNet-18
    python -m benchmarks.profile_ops --models resnet18 --threads 2 --json out.json

Each model is compiled with bnfold's CPU schedules while recording which rule took each fused
PrimFunc and what it saw (``conv3x3``, ``depthwise``, ``conv1x1``, ``dense``, ``elementwise``;
functions no rule took are named by what they compute: ``pool``, ``reduction``...). The Relax
VM's instrumentation hook then times every PrimFunc call (TVM 0.27's VM has no profiler); the
per-run sums are taken over ``--runs`` runs (median). The last line per model compares the
end-to-end latency with onnxruntime (ORT_ENABLE_ALL, same threads).

``--int8``: the model is quantized by bnfold (as ``benchmarks.int8_latency`` does, calibrated on
``inputs/NAME.npz``) and the QDQ model compiled in integer arithmetic; its functions are named
by what they are (``int8_conv2d_q3``: bnfold's conv kernel of quantize group q3, ``int8_add``,
``int8_max_pool2d``, ``int8_dense``; fused Relax functions by their ops), and onnxruntime runs
the same QDQ model (its int8 kernels).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_MODELS = ("mobilenet_v2", "resnet18")


# Name fragment -> kind, for PrimFuncs no rule took (first match wins).
_UNSCHEDULED_KINDS = (
    ("pool", "pool"),
    ("mean", "pool"),
    ("matmul", "dense"),
    ("dense", "dense"),
    ("conv", "conv (default loops)"),
    ("softmax", "softmax"),
    ("sum", "reduction"),
    ("max", "reduction"),
)


def _kind_of_unscheduled(name: str) -> str:
    """A kind for a PrimFunc no rule took, from its (fused) name."""
    for key, kind in _UNSCHEDULED_KINDS:
        if key in name:
            return kind
    return "other"


def _shapes(model_path: Path) -> dict[str, tuple[int, ...]]:
    """Input shapes, batch 1: the model's, or (dynamic dimensions, the PP-OCR models) those of
    its real inputs in ``inputs/NAME.npz`` beside it."""
    import onnx

    from bnfold import check

    inputs = model_path.parent / "inputs" / f"{model_path.stem}.npz"
    given: dict[str, tuple[int, ...]] = {}
    if inputs.is_file():
        with np.load(inputs, allow_pickle=False) as data:
            given = {k: (1, *data[k].shape[1:]) for k in data.files}
    return check.input_shapes(onnx.load(str(model_path), load_external_data=False), given)


def _compile(model_path: Path, outdir: Path) -> dict[str, str]:
    """Compile ``model_path`` for x86 into ``outdir``; returns PrimFunc name -> kind."""
    from bnfold import ir, pipeline
    from bnfold.lower import compiler as lower
    from bnfold.targets import get, schedule

    tgt = get("x86").resolved()
    folded, _ = pipeline.fold(ir.load(model_path))
    shapes = _shapes(model_path)
    mod = lower.import_relax(lower.freeze(folded, shapes), shapes)
    with schedule.recording() as matches:
        executable = lower.build(mod, tgt)
    outdir.mkdir(parents=True, exist_ok=True)
    tgt.export(executable, outdir)
    return {m.function: m.kind if m.rule else _kind_of_unscheduled(m.function) for m in matches}


def _ort_ms(
    model_path: Path, feeds: dict[str, np.ndarray], threads: int, runs: int, clock: Any
) -> float:
    from bnfold import onnxrt

    sess = onnxrt.session(model_path, optimize=True, threads=threads, log_severity=onnxrt.ERROR)
    for _ in range(5):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        start = clock()
        sess.run(None, feeds)
        times.append((clock() - start) * 1e3)
    return statistics.median(times)


def _compile_int8(model_path: Path, outdir: Path) -> tuple[dict[str, str], Path]:
    """Quantize ``model_path`` with bnfold (calibrated on its ``inputs/NAME.npz``) and compile
    the QDQ model for x86 in integer arithmetic into ``outdir``; returns PrimFunc name -> kind
    (by name: ``int8 conv``, ``int8 add``, ...) and the QDQ model's path."""
    from benchmarks.int8_latency import quantized_model
    from bnfold.lower import compiler as lower

    qdq_path = quantized_model(model_path.parent, model_path.stem, outdir)
    m = lower.compile_model(qdq_path, "x86", outdir, fold=False, verify=False, layerwise=False)
    kinds = {}
    for g in m.compile["int8"]["groups"]:
        if g.get("how") == "kernel":
            op = {"conv2d": "conv2d", "matmul": "dense"}.get(g["op"], g["op"])
            kinds[f"int8_{op}_{g['output']}"] = f"int8 {g['op']}"
    return kinds, qdq_path


def profile(
    model_path: Path, threads: int = 1, runs: int = 20, int8: bool = False, cpu_time: bool = False
) -> dict[str, Any]:
    """Compile and profile one model (``int8``: its bnfold-quantized QDQ model, integer
    code); returns per-kind and per-function median ms per run. ``cpu_time``: time with the
    calling thread's CPU clock instead of the wall clock, which a shared machine does not
    inflate while the process waits for a core (1 thread only: both engines then run in the
    calling thread)."""
    import tvm

    from bnfold.runtime import set_threads

    if cpu_time and threads != 1:
        raise ValueError("--cpu-time times the calling thread: 1 thread only")
    clock = time.thread_time if cpu_time else time.perf_counter
    set_threads(threads)
    with tempfile.TemporaryDirectory(prefix="bnfold-profile-") as tmp:
        if int8:
            kinds, ort_model = _compile_int8(model_path, Path(tmp))
        else:
            kinds, ort_model = _compile(model_path, Path(tmp)), model_path
        lib = tvm.runtime.load_module(str(Path(tmp) / "model.so"))
        vm = tvm.relax.VirtualMachine(lib, tvm.cpu())
        main = vm["main"]
        in_shapes = _shapes(model_path)
        rng = np.random.default_rng(0)
        feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in in_shapes.items()}
        args = [tvm.runtime.tensor(a) for a in feeds.values()]

        e2e = []
        for _ in range(5):
            main(*args)
        for _ in range(runs):
            start = clock()
            main(*args)
            e2e.append((clock() - start) * 1e3)

        per_run: list[collections.Counter[str]] = []
        current: collections.Counter[str] = collections.Counter()
        started: dict[str, float] = {}

        def instrument(_func: Any, symbol: str, before: bool, _ret: Any, *_args: Any) -> int:
            if before:
                started[symbol] = clock()
            else:
                current[str(symbol)] += (clock() - started.pop(symbol)) * 1e3
            return 0

        vm.set_instrument(instrument)
        for _ in range(runs):
            current = collections.Counter()
            main(*args)
            per_run.append(current)
        ort_ms = _ort_ms(ort_model, feeds, threads, runs, clock)  # the QDQ model lives in tmp
    funcs = {f: statistics.median(r.get(f, 0.0) for r in per_run) for f in per_run[0]}
    by_kind: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for f, ms in funcs.items():
        kind = kinds.get(f, "vm builtin" if "." in f else _kind_of_unscheduled(f))
        by_kind[kind] += ms
        count[kind] += 1
    return {
        "model": model_path.stem + (" int8" if int8 else ""),
        "threads": threads,
        "tvm_ms": statistics.median(e2e),
        "ops_ms": sum(funcs.values()),
        "int8": int8,
        "ort_ms": ort_ms,
        "by_kind": {k: {"ms": v, "functions": count[k]} for k, v in by_kind.most_common()},
        "functions": dict(sorted(funcs.items(), key=lambda kv: -kv[1])),
        "kinds": kinds,
    }


def report(r: dict[str, Any], top: int = 8) -> str:
    """The profile as text: per kind ms and %, the slowest functions, the onnxruntime ratio."""
    total = r["ops_ms"]
    lines = [f"{r['model']} (x86, {r['threads']} thread(s)): kernels {total:.2f} ms of "
             f"{r['tvm_ms']:.2f} ms end to end",
             f"  {'kind':<24} {'ms':>8} {'%':>6} {'funcs':>6}"]  # fmt: skip
    for kind, v in r["by_kind"].items():
        lines.append(f"  {kind:<24} {v['ms']:8.2f} {100 * v['ms'] / total:6.1f} "
                     f"{v['functions']:6d}")  # fmt: skip
    lines.append(f"  slowest {top} functions:")
    for f, ms in list(r["functions"].items())[:top]:
        lines.append(f"    {ms:7.2f} ms  {r['kinds'].get(f, '?'):<12} {f}")
    lines.append(f"  vs onnxruntime (ORT_ENABLE_ALL, {r['threads']}T): {r['tvm_ms']:.2f} / "
                 f"{r['ort_ms']:.2f} ms = {r['tvm_ms'] / r['ort_ms']:.2f}x")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Profile the models named by ``--models`` (from ``.cache/models``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--cache", type=Path, default=Path(".cache/models"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the profiles here")
    parser.add_argument("--int8", action="store_true",
                        help="profile the bnfold-quantized QDQ model's integer build")  # fmt: skip
    parser.add_argument("--cpu-time", action="store_true",
                        help="CPU time of the calling thread (1 thread)")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = []
    for name in args.models.split(","):
        path = args.cache / f"{name}.onnx"
        if not path.is_file():
            print(f"{path}: missing (run `python -m benchmarks.models`)", file=sys.stderr)
            return 2
        results.append(profile(path, args.threads, args.runs, args.int8, args.cpu_time))
        print(report(results[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
