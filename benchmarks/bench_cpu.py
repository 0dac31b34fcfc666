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
import logging
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

from bnfold.device.bench import cpu_name, measure

logger = logging.getLogger("bench_cpu")

DEFAULT_MODELS = ("mobilenet_v2", "resnet18")
BLOCK = 5  # timed runs per engine per round


def _measure(outdir: Path, model_path: Path, threads: int, rounds: int) -> dict[str, Any]:
    """TVM artifact vs onnxruntime ORT_ENABLE_ALL, timed by bnfold.device.bench's alternating
    servers."""
    times = measure(
        {"compiled": (outdir, model_path), "ort": (outdir, model_path)}, threads, rounds, BLOCK
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "threads": threads,
        "tvm_ms": med["compiled"],
        "ort_ms": med["ort"],
        "ratio": med["compiled"] / med["ort"],
        "tvm_ms_min": min(times["compiled"]),
        "ort_ms_min": min(times["ort"]),
        "samples": len(times["compiled"]),
    }


def _compile(name: str, cache: Path, workdir: Path) -> tuple[Path, dict[str, Any]]:
    from bnfold.lower import compiler as lower

    outdir = workdir / f"{name}-x86"
    # The real inputs give the shapes of dynamic inputs (PP-OCR); batch 1 either way.
    inputs = cache / "inputs" / f"{name}.npz"
    manifest = lower.compile_model(cache / f"{name}.onnx", "x86", outdir, verify=False,
                                   inputs=inputs if inputs.is_file() else None)  # fmt: skip
    return outdir, manifest.compile


def main(argv: list[str] | None = None) -> int:
    """Compile, time, print a table and write JSON; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--cache", type=Path, default=Path(".cache/models"))
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/bench_cpu.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

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
    from bnfold import atomic
    from bnfold.lower import compiler as lower

    atomic.write_json(args.json, {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
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
