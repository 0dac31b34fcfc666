"""--target-agreement 0.95 on MobileNetV2's former int8_real split, before/after the ranking.

    python -m benchmarks.int8_ranking [--cache .cache/models] [--json FILE]

The split int8_real used up to 73278d2 (54 calibration views of 6 photos, 45 held-out views of
chelsea, rocket, camera, flower, coins: the 9 fixed views of :mod:`benchmarks.int8_accuracy`),
so that the float nodes :func:`bnfold.quant.target.reach` keeps now can be compared with the
SQNR-ranked search's recorded there (32 float nodes, 45.9% of the conv/matmul MACs, 4 rounds,
top-1 agreement 0.956). Writes the defaults' and the target's held-out figures, the tensors and
nodes kept, each round, and the CPU seconds of the search.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import onnx

from benchmarks.int8_accuracy import CALIBRATION, views
from benchmarks.models import model_path
from bnfold.quant import calib
from bnfold.quant.quantize import quantize
from bnfold.quant.report import evaluate
from bnfold.quant.target import reach

FORMER_EVALUATION = ("chelsea", "rocket", "camera", "flower", "coins")
BEFORE = {"float_nodes": 32, "float_mac_share": 0.4585, "rounds": 4, "top1_agreement": 0.9556,
          "cosine": 0.9896, "source": "benchmarks/results/int8_real.json at 73278d2"}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path(".cache/models"))
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/int8_ranking.json"))
    args = ap.parse_args()
    path = model_path(args.cache, "mobilenet_v2")
    cal, held = views(CALIBRATION), views(FORMER_EVALUATION)
    batches = calib.batches(held, calib.input_specs(onnx.load(str(path))), 8)
    start = time.process_time()
    int8, report = quantize(path, cal)
    acc = evaluate(path, int8, report, batches)
    _, report, got = reach(path, cal, batches, {"agreement": 0.95}, (int8, report, acc))
    t = report.target
    after = {
        "float_nodes": len(t["float_nodes"]), "float_mac_share": t["float_mac_share"],
        "rounds": len(t["rounds"]) - 1, "top1_agreement": got.top1, "cosine": got.cosine,
        "met": t["met"], "nodes": t["float_nodes"], "tensors": t["float_tensors"],
        "cpu_seconds": round(time.process_time() - start, 1),
    }  # fmt: skip
    result = {"data": f"{len(cal)} calibration / {len(held)} held-out views",
              "defaults_top1_agreement": acc.top1, "before": BEFORE, "after": after}  # fmt: skip
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: after[k] for k in ("float_nodes", "float_mac_share", "rounds",
                                            "top1_agreement", "met")}))  # fmt: skip


if __name__ == "__main__":
    main()
