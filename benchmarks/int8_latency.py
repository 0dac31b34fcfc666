"""x86 latency of bnfold's int8 artifacts against its fp32 artifacts and onnxruntime int8.

For each model (default: MobileNetV2 and ResNet-18, batch 1) the model is quantized with
bnfold (per-channel, CLE, bias correction; calibrated on the model's real inputs in
``.cache/models/inputs``), then compiled twice for ``x86`` (this machine's CPU): fp32 (the
folded model) and int8 (the QDQ model, integer kernels). Four engines are timed in their own
processes, in alternating blocks, never two at once (:func:`bnfold.device.bench.measure`):

- ``ort``: onnxruntime ORT_ENABLE_ALL on the original fp32 model;
- ``ort_int8``: onnxruntime ORT_ENABLE_ALL on the same QDQ model (it fuses QDQ groups into
  its own int8 kernels: the int8 baseline);
- ``compiled``: the fp32 artifact;
- ``compiled_int8``: the int8 artifact.

Printed: medians and the ratios int8 artifact / fp32 artifact (target <= 0.6) and int8 artifact
/ onnxruntime int8 (target <= 1.0), plus the int8 artifact's layer-by-layer check (max LSB).

    python -m benchmarks.int8_latency [--models mobilenet_v2,resnet18] [--threads 1]
        [--rounds 10] [--cache .cache/models] [--json benchmarks/results/int8_latency.json]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.models import load_inputs, model_path
from bnfold.device.bench import cpu_name, measure

logger = logging.getLogger("int8_latency")

DEFAULT_MODELS = ("mobilenet_v2", "resnet18")
BLOCK = 5


def quantized_model(cache: Path, name: str, work: Path) -> Path:
    """bnfold's QDQ model of ``name`` (defaults: per-channel, CLE, bias correction), calibrated
    on the model's real inputs one sample at a time, saved as ``work/NAME.int8.onnx``."""
    import onnx

    from bnfold.quant.quantize import quantize

    data = load_inputs(cache, name)
    key = next(iter(data))
    samples = [{key: data[key][i : i + 1]} for i in range(data[key].shape[0])]
    int8, _ = quantize(model_path(cache, name), samples)
    work.mkdir(parents=True, exist_ok=True)
    int8_path = work / f"{name}.int8.onnx"
    onnx.save(int8, str(int8_path))
    return int8_path


def _build(name: str, cache: Path, work: Path, threads: int) -> dict[str, Any]:
    """Quantize and compile ``name``; returns paths and the int8 verification."""
    from bnfold.lower import compiler as lower

    model = model_path(cache, name)
    data = load_inputs(cache, name)
    key = next(iter(data))
    int8_path = quantized_model(cache, name, work)
    fp32_dir, int8_dir = work / f"{name}-fp32", work / f"{name}-int8"
    lower.compile_model(model, "x86", fp32_dir, verify=False, threads=threads)
    m = lower.compile_model(int8_path, "x86", int8_dir, fold=False, threads=threads,
                            inputs={key: data[key][:1]})  # fmt: skip
    v = m.verification
    return {
        "model": model, "int8_model": int8_path, "fp32_dir": fp32_dir, "int8_dir": int8_dir,
        "int8": {k: m.compile["int8"][k] for k in ("quantize_groups", "integer_groups",
                                                    "kernel_groups")},
        "verification": {k: v[k] for k in ("status", "max_lsb", "worst", "tensors",
                                            "tensors_off_by_one", "max_off_fraction")},
        "compile_s": m.compile["seconds"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--threads", default="1")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--cache", type=Path, default=Path(".cache/models"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    results: dict[str, Any] = {
        "cpu": cpu_name(), "machine": platform.machine(), "cores": os.cpu_count(),
        "method": f"separate processes, alternating blocks of {BLOCK} runs x {args.rounds} "
                  "rounds; medians", "models": {},
    }  # fmt: skip
    threads_list = [int(t) for t in args.threads.split(",")]
    with tempfile.TemporaryDirectory(prefix="bnfold-int8-") as tmp:
        for name in args.models.split(","):
            if not (args.cache / f"{name}.onnx").is_file():
                sys.exit(f"error: {args.cache / name}.onnx missing (run `make models`)")
            b = _build(name, args.cache, Path(tmp), threads_list[0])
            entry: dict[str, Any] = {k: b[k] for k in ("int8", "verification", "compile_s")}
            for threads in threads_list:
                times = measure({
                    "ort": (b["fp32_dir"], b["model"]),
                    "ort_int8": (b["int8_dir"], b["int8_model"]),
                    "compiled": (b["fp32_dir"], b["model"]),
                    "compiled_int8": (b["int8_dir"], b["int8_model"]),
                }, threads, args.rounds, BLOCK)  # fmt: skip
                med = {k: statistics.median(v) for k, v in times.items()}
                entry[f"{threads}T"] = {
                    "p50_ms": med,
                    "int8_over_fp32": med["compiled_int8"] / med["compiled"],
                    "int8_over_ort_int8": med["compiled_int8"] / med["ort_int8"],
                    "fp32_over_ort": med["compiled"] / med["ort"],
                    "ort_int8_over_ort": med["ort_int8"] / med["ort"],
                }
            results["models"][name] = entry
    print(f"{results['cpu']}, {results['method']}")
    print(f"{'model':<14}{'thr':>4}{'ORT fp32':>10}{'ORT int8':>10}{'bnfold fp32':>13}"
          f"{'bnfold int8':>13}{'int8/fp32':>11}{'int8/ORTi8':>12}  layerwise")  # fmt: skip
    for name, e in results["models"].items():
        v = e["verification"]
        for key, r in e.items():
            if not key.endswith("T"):
                continue
            p = r["p50_ms"]
            print(f"{name:<14}{key[:-1]:>4}{p['ort']:>10.2f}{p['ort_int8']:>10.2f}"
                  f"{p['compiled']:>13.2f}{p['compiled_int8']:>13.2f}"
                  f"{r['int8_over_fp32']:>11.2f}{r['int8_over_ort_int8']:>12.2f}  "
                  f"{v['status']}, max {v['max_lsb']} LSB over {v['tensors']} tensors")  # fmt: skip
    if args.json is not None:
        import json

        from bnfold.atomic import write_json

        write_json(args.json, json.loads(json.dumps(results, default=str)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
