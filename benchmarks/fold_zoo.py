"""What fold leaves behind on the zoo: per model, BNs in, BNs folded, BNs left as Mul+Add (or
kept), branch sums merged, and the folded model's exactness against the unfolded one in
onnxruntime (optimizations off, one seeded random input).

    python -m benchmarks.fold_zoo --zoo .cache/zoo [--only resnet18,...] [--json out.json]

Runs with whichever bnfold is installed, so the same file measures two versions side by side
(``OTHER/.venv/bin/python benchmarks/fold_zoo.py --label before``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import bnfold
from bnfold import check, ir, pipeline


def measure(path: Path) -> dict[str, Any]:
    """One model: fold counts and the exactness of the fold."""
    t0 = time.perf_counter()
    folded, rep = pipeline.fold(path)
    fold_s = time.perf_counter() - t0
    c = rep.counts()
    merges = getattr(rep, "merges", [])
    row: dict[str, Any] = {
        "model": path.name,
        "bn": rep.bn_before,
        "folded": c["folded_backward"] + c["folded_forward"],
        "left": c["affine"] + c["kept"],
        "merged": sum(1 for r in merges if r.action == "merged"),
        "fold_s": round(fold_s, 2),
    }
    try:
        result = check.verify(path, ir.to_proto(folded), random=1, atol=0.0, rtol=1e-5)
        row["worst_abs_over_max_ref"] = result.worst_ratio
        row["exact"] = result.passed
    except bnfold.BnfoldError as e:
        row["error"] = str(e)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=Path(".cache/zoo"))
    ap.add_argument("--only", default="", help="comma-separated architecture names")
    ap.add_argument("--label", default="", help="a name for this bnfold version in the JSON")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    only = {s for s in args.only.split(",") if s}
    paths = sorted(p for p in args.zoo.glob("*.onnx") if not only or p.name.split(".")[0] in only)
    rows = []
    for path in paths:
        row = measure(path)
        rows.append(row)
        print(f"{row['model']:<44} bn {row['bn']:>3}  folded {row['folded']:>3}  left "
              f"{row['left']:>3}  merged {row['merged']:>2}  "
              f"{row.get('worst_abs_over_max_ref', float('nan')):.2e} "
              f"{'exact' if row.get('exact') else row.get('error', 'NOT EXACT')}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"label": args.label, "bnfold": bnfold.__file__,
                                         "rows": rows}, indent=1))  # fmt: skip
    return 0 if all(r.get("exact") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
