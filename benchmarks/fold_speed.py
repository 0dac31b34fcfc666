"""Fold speed on the real models: bnfold vs onnxoptimizer vs TVM Relax, on the same files.

    python -m benchmarks.fold_speed [--cache .cache/models] [--repeat 5] [--no-tvm] [--json F]

Per model:

- bnfold: BN count, how each folded (backward/forward/affine/kept), median pass time (the
  passes alone) and median end-to-end time (load + fold + serialize).
- onnxoptimizer (``pip install 'bnfold[bench]'``): median time of
  ``onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])`` on the loaded ModelProto (its own
  proto -> IR -> proto conversion included, file load not), how many BN it folded, and
  max abs / max|ref| of its output vs the original on the real inputs in onnxruntime (it folds
  Conv -> BN only).
- TVM Relax: ``FoldBatchnormToConv2D`` + ``FoldConstant`` on the model as bnfold imports it
  (frozen to the real inputs' shapes, weights bound as constants), timed once (it takes
  seconds), and how many ``batch_norm`` it left. ``--no-tvm`` skips it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import bnfold
from benchmarks.models import MODEL_NAMES, inputs_path, model_path
from bnfold import ir as bir


def measure(path: Path, repeat: int) -> dict[str, float | int | str]:
    """Median pass and end-to-end times of folding ``path`` with bnfold."""
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


def _bn_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def _feeds(cache: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(inputs_path(cache, name), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def measure_onnxoptimizer(
    path: Path, repeat: int, feeds: dict[str, np.ndarray] | None = None
) -> dict[str, Any]:
    """Median time of onnxoptimizer's ``fuse_bn_into_conv`` on ``path``, BN it left, and the
    worst max abs / max|ref| of the optimized model vs the original on ``feeds``."""
    import onnxoptimizer

    from bnfold.check import run_onnxruntime

    model = onnx.load(path)
    ms = []
    optimized = model
    for _ in range(repeat):
        t0 = time.perf_counter()
        optimized = onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])
        ms.append((time.perf_counter() - t0) * 1e3)
    row: dict[str, Any] = {"ms": statistics.median(ms), "bn_left": _bn_count(optimized),
                           "version": onnxoptimizer.__version__}  # fmt: skip
    if feeds is not None:
        ref, got = run_onnxruntime(model, feeds), run_onnxruntime(optimized, feeds)
        row["worst_ratio"] = max(
            float(np.abs(got[k] - r).max() / max(float(np.abs(r).max()), 1e-30))
            for k, r in ref.items()
        )
    return row


def measure_tvm(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """TVM Relax ``FoldBatchnormToConv2D`` + ``FoldConstant`` time (once) and BN left."""
    from tvm import relax

    from bnfold.lower import compiler as lower

    mod = lower.import_relax(lower.freeze(bir.load(path), shapes), shapes)
    t0 = time.perf_counter()
    mod = relax.transform.FoldBatchnormToConv2D()(mod)
    mod = relax.transform.FoldConstant()(mod)
    ms = (time.perf_counter() - t0) * 1e3
    return {"ms": ms, "bn_left": mod.script(show_meta=False).count("R.nn.batch_norm")}


def _folded(bn: int, left: int | None) -> str:
    return "-" if left is None else f"{bn - left} of {bn}"


def main(argv: list[str] | None = None) -> None:
    """Print the table (and write it as JSON with ``--json``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path(".cache/models"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--models", default=",".join(MODEL_NAMES))
    ap.add_argument("--no-tvm", dest="tvm", action="store_false", help="skip TVM's fold")
    ap.add_argument("--json", type=Path, help="write the rows as JSON")
    args = ap.parse_args(argv)
    try:
        import onnxoptimizer  # noqa: F401
    except ImportError:
        have_onnxoptimizer = False
        print("onnxoptimizer is not installed (pip install 'bnfold[bench]'): column skipped")
    else:
        have_onnxoptimizer = True
    print(f"{'':<14} {'':>4} {'bnfold':^39} | {'onnxoptimizer fuse_bn_into_conv':^31} | "
          f"{'TVM FoldBatchnormToConv2D+FoldConst':^25}")  # fmt: skip
    print(f"{'model':<14} {'BN':>4} {'back/fwd/affine/kept':>20} {'pass ms':>8} {'total ms':>9} "
          f"| {'ms':>8} {'BN folded':>10} {'err':>9} | {'ms':>9} {'BN folded':>10}")  # fmt: skip
    rows = []
    for name in args.models.split(","):
        path = model_path(args.cache, name)
        feeds = _feeds(args.cache, name) if inputs_path(args.cache, name).is_file() else None
        row: dict[str, Any] = {"model": name, "bnfold": measure(path, args.repeat)}
        if have_onnxoptimizer:
            row["onnxoptimizer"] = measure_onnxoptimizer(path, args.repeat, feeds)
        if args.tvm:
            shapes = {k: tuple(v.shape) for k, v in (feeds or {}).items()}
            row["tvm"] = measure_tvm(path, shapes)
        rows.append(row)
        b, o, t = row["bnfold"], row.get("onnxoptimizer", {}), row.get("tvm", {})
        bn = int(b["bn"])
        ocells = (f"{o['ms']:>8.1f} {_folded(bn, o['bn_left']):>10} "
                  f"{o.get('worst_ratio', float('nan')):>9.1e}" if o else f"{'-':>8} {'-':>10} "
                  f"{'-':>9}")  # fmt: skip
        tcells = f"{t['ms']:>9.0f} {_folded(bn, t['bn_left']):>10}" if t else f"{'-':>9} {'-':>10}"
        print(f"{name:<14} {bn:>4} {b['outcome']:>20} {b['pass_ms']:>8.1f} {b['total_ms']:>9.1f} "
              f"| {ocells} | {tcells}", flush=True)  # fmt: skip
    print(
        "err: max abs / max|ref| of onnxoptimizer's model vs the original, onnxruntime, real "
        "inputs. Times: median of --repeat (TVM: once)."
    )
    if args.json:
        from bnfold import atomic

        atomic.write_json(args.json, {"rows": rows})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
