"""Latency of re-parameterizable models before and after merge_branches, against onnxruntime.

The model (bnfold/testing/reparam.py: RepVGG-A0 widths 48/96/192/384/1280 and depths
1/2/4/14/1 by default, random BN statistics, batch 1; ``--arch mobileone``: the MobileOne-like
model, widths 64/128/256/512, k=3) is exported by torch with its BNs, then compiled twice for
``x86`` (this machine's CPU):

- ``compiled_unmerged``: the fold pipeline without merge_branches (every branch conv folded with
  its BN, identity BNs as Mul+Add, three convs and two Adds per block), compiled as given;
- ``compiled_merged``: the default pipeline (one 3x3 conv per block).

Timed in their own processes, alternating blocks, never two at once
(:func:`bnfold.device.bench.measure`), with ``ort`` (onnxruntime ORT_ENABLE_ALL on the export) and
``ort_merged`` (onnxruntime ORT_ENABLE_ALL on the merged model). Printed: node counts and medians.

    python -m benchmarks.reparam [--arch repvgg|mobileone] [--size 224] [--threads 1]
        [--rounds 10] [--block 5] [--small] [--json benchmarks/results/reparam.json]
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import onnx

import bnfold
from bnfold import ir as bir
from bnfold.device.bench import cpu_name, measure
from bnfold.lower.compiler import compiler as lower
from bnfold.passes import FP32
from bnfold.testing import reparam as testing_reparam

UNMERGED = tuple(s for s in FP32 if s != "merge_branches")


def _ops(path: Path) -> dict[str, int]:
    counts = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    return {k: counts[k] for k in ("BatchNormalization", "Conv", "Add", "Mul")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=("repvgg", "mobileone"), default="repvgg")
    ap.add_argument("--size", type=int, default=224, help="input height and width")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="a 3-stage toy instead of A0")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.arch == "repvgg":
        arch: Any = ((16, 32, 64), (1, 2, 4)) if args.small else ((48, 96, 192, 384, 1280),
                                                                  (1, 2, 4, 14, 1))  # fmt: skip
        model = testing_reparam.repvgg(*arch)
    else:
        arch = ((16, 32), 2) if args.small else ((64, 128, 256, 512), 3)
        model = testing_reparam.mobileone(*arch)
    results: dict[str, Any] = {
        "cpu": cpu_name(), "machine": platform.machine(), "cores": os.cpu_count(),
        "model": {"arch": args.arch, "config": arch, "input": [1, 3, args.size, args.size]},
        "threads": args.threads,
        "method": f"separate processes, alternating blocks of {args.block} runs x {args.rounds} "
                  "rounds; medians",
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bnfold-reparam-") as tmp:
        work = Path(tmp)
        original = work / f"{args.arch}.onnx"
        testing_reparam.export(model, original, (1, 3, args.size, args.size))
        unmerged = work / f"{args.arch}.unmerged.onnx"
        folded, _ = bnfold.fold(original, steps=UNMERGED)
        bir.save(folded, unmerged)
        dirs = {"unmerged": work / "unmerged", "merged": work / "merged"}
        m_un = lower.compile_model(unmerged, "x86", dirs["unmerged"], fold=False,
                                   threads=args.threads)  # fmt: skip
        m_me = lower.compile_model(original, "x86", dirs["merged"], threads=args.threads)
        merged = dirs["merged"] / m_me.folded["file"]
        results["ops"] = {"export": _ops(original), "unmerged": _ops(unmerged),
                          "merged": _ops(merged)}  # fmt: skip
        results["compile_s"] = {"unmerged": m_un.compile["seconds"],
                                "merged": m_me.compile["seconds"]}  # fmt: skip
        results["verification"] = {"unmerged": m_un.verification.get("status"),
                                   "merged": m_me.verification.get("status")}  # fmt: skip
        times = measure({
            "ort": (dirs["merged"], original),
            "ort_merged": (dirs["merged"], merged),
            "compiled_unmerged": (dirs["unmerged"], unmerged),
            "compiled_merged": (dirs["merged"], merged),
        }, args.threads, args.rounds, args.block)  # fmt: skip
    med = {k: statistics.median(v) for k, v in times.items()}
    results["p50_ms"] = med
    results["samples"] = {k: len(v) for k, v in times.items()}
    results["ratio_to_ort"] = {k: v / med["ort"] for k, v in med.items()}
    print(f"{results['cpu']}, {args.threads} thread(s), {results['method']}")
    print(f"{args.arch}-like {arch}, input {results['model']['input']}")
    for k, v in results["ops"].items():
        print(f"  {k:<9} " + ", ".join(f"{op} {n}" for op, n in v.items()))
    for k, v in med.items():
        print(f"  {k:<18} p50 {v:9.2f} ms  x{results['ratio_to_ort'][k]:.2f} of ort  "
              f"({results['samples'][k]} samples)")  # fmt: skip
    print(f"  verification: {results['verification']}; compile s: {results['compile_s']}")
    if args.json is not None:
        import json

        from bnfold.atomic import write_json

        write_json(args.json, json.loads(json.dumps(results, default=str)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
