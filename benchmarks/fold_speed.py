"""Fold speed on the real models: median pass time of bnfold's pipeline per model.

    python -m benchmarks.fold_speed [--cache .cache/models] [--repeat 5]

Prints, per model: BN count, how each folded, median pass time (the passes alone) and median
end-to-end time (load + fold + serialize).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import bnfold
from benchmarks.models import MODEL_NAMES, model_path
from bnfold import ir as bir


def measure(path: Path, repeat: int) -> dict[str, float | int | str]:
    """Median pass and end-to-end times of folding ``path``."""
    pass_ms, total_ms = [], []
    report = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        folded, report = bnfold.fold(bir.load(path), check=False)
        bir.to_bytes(folded)
        total_ms.append((time.perf_counter() - t0) * 1e3)
        pass_ms.append(report.pass_ms)
    assert report is not None
    c = report.counts()
    return {
        "bn": report.bn_before,
        "outcome": f"{c['folded_backward']}b/{c['folded_forward']}f/{c['affine']}a/{c['kept']}k",
        "pass_ms": statistics.median(pass_ms),
        "total_ms": statistics.median(total_ms),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path(".cache/models"))
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(f"{'model':<14} {'BN':>4} {'back/fwd/affine/kept':>21} {'pass ms':>9} {'total ms':>9}")
    for name in MODEL_NAMES:
        r = measure(model_path(args.cache, name), args.repeat)
        print(
            f"{name:<14} {r['bn']:>4} {r['outcome']:>21} {r['pass_ms']:>9.1f} {r['total_ms']:>9.1f}"
        )


if __name__ == "__main__":
    main()
