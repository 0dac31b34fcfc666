"""What fold leaves behind on the zoo: per model, BNs in, BNs folded, BNs left as Mul+Add (or
kept), branch sums merged, and the folded model's exactness against the unfolded one in
onnxruntime (optimizations off, one seeded random input).

    python -m benchmarks.fold_zoo --zoo .cache/zoo [--only resnet18,...] [--json out.json]
    python -m benchmarks.fold_zoo --combine before.json after.json --json fold_zoo.json

Runs with whichever bnfold is installed, so the same file measures two versions side by side
(``OTHER/.venv/bin/python benchmarks/fold_zoo.py --label before --json before.json``);
``--combine`` sets two such runs side by side, per model (the results file), measuring nothing.
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


def combine(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Two runs' ``--json`` documents as one table: per model, BNs left before and after, and
    both fold errors; totals over the models of ``after``."""
    old = {r["model"]: r for r in before["rows"]}
    rows = []
    for r in after["rows"]:
        b = old.get(r["model"], {})
        rows.append({
            "model": r["model"], "bn": r["bn"], "left_before": b.get("left"),
            "left_after": r["left"], "merged_after": r["merged"],
            "worst_abs_over_max_ref_before": b.get("worst_abs_over_max_ref"),
            "worst_abs_over_max_ref_after": r.get("worst_abs_over_max_ref"),
            "exact_after": r.get("exact", False),
        })  # fmt: skip
    errors = [r["worst_abs_over_max_ref_after"] for r in rows]
    return {
        "what": f"python -m benchmarks.fold_zoo on the {len(rows)} zoo exports; before = "
        f"{before.get('label') or '?'}, after = {after.get('label') or '?'}; exact = max abs <= "
        "1e-5 x max|ref| against the unfolded model in onnxruntime (optimizations off), one "
        "seeded random input",
        "totals": {
            "models": len(rows),
            "bn": sum(r["bn"] for r in rows),
            "left_before": sum(r["left_before"] or 0 for r in rows),
            "left_after": sum(r["left_after"] for r in rows),
            "merged_after": sum(r["merged_after"] for r in rows),
            "worst_abs_over_max_ref_after": max((e for e in errors if e is not None), default=0),
            "exact_after": sum(bool(r["exact_after"]) for r in rows),
        },
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=Path(".cache/zoo"))
    ap.add_argument("--only", default="", help="comma-separated architecture names")
    ap.add_argument("--label", default="", help="a name for this bnfold version in the JSON")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--combine", type=Path, nargs=2, metavar=("BEFORE", "AFTER"),
                    help="write two runs' --json files side by side to --json; measure nothing")
    args = ap.parse_args(argv)
    if args.combine:
        if not args.json:
            ap.error("--combine needs --json")
        before, after = (json.loads(p.read_text()) for p in args.combine)
        args.json.write_text(json.dumps(combine(before, after), indent=1))
        return 0
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
        doc = {"label": args.label, "bnfold": bnfold.__file__, "rows": rows}
        args.json.write_text(json.dumps(doc, indent=1))
    return 0 if all(r.get("exact") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
