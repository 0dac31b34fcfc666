"""The fold pipeline: a short, straight list of named passes, each timed and logged."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir

from bnfold import ir as bir
from bnfold.errors import BnfoldError
from bnfold.passes import FP32, PASSES
from bnfold.passes._util import BnfoldPassResult, is_onnx_op, read_tensor_map, write_tensor_map
from bnfold.report import FoldReport, PassStat

logger = logging.getLogger(__name__)


class InternalError(RuntimeError):
    """A pass broke an invariant: a bug in bnfold, not bad input (exit 3)."""


def _count(model: ir.Model, op: str | None = None) -> int:
    """Nodes (of type ``op``) in the main graph, its subgraphs and the model-local functions:
    the report's BN records cover all three, so its totals must too."""
    graphs = (model.graph, *model.functions.values())
    return sum(
        1
        for g in graphs
        for n in ir.traversal.RecursiveGraphIterator(g)
        if op is None or is_onnx_op(n, op)
    )


def fold(
    model: ir.Model | onnx.ModelProto | str | os.PathLike[str],
    *,
    forward: bool = True,
    to_affine: bool = True,
    steps: Sequence[str] = FP32,
    check: bool = True,
) -> tuple[ir.Model, FoldReport]:
    """Fold every foldable BatchNormalization of ``model``.

    Args:
        model: A path (loaded with :func:`bnfold.ir.load`), an ``onnx.ModelProto`` or an IR
            model. An IR model is changed in place (and returned).
        forward: Also fold BNs into the following Conv/Gemm where that is exact.
        to_affine: Rewrite BNs that fold neither way as Mul+Add.
        steps: Pass names from :data:`bnfold.passes.PASSES`, in order.
        check: Run ``onnx.checker`` on the result.

    Returns:
        The folded model and the :class:`FoldReport`.
    """
    t0 = time.perf_counter()
    if isinstance(model, (str, os.PathLike)):
        source = str(model)
        model = bir.load(model)
    elif isinstance(model, onnx.ModelProto):
        source = model.graph.name or "<ModelProto>"
        model = bir.from_proto(model, source=source)
    else:
        source = model.graph.name or "<model>"
    report = FoldReport(
        source=source, bn_before=_count(model, "BatchNormalization"), nodes_before=_count(model)
    )
    read_tensor_map(model)  # a model folded before: its map, which this fold extends
    done: list[str] = []
    for name in steps:
        if name not in PASSES:
            raise BnfoldError(f"unknown pass '{name}' (known: {', '.join(PASSES)})")
        pass_ = (
            PASSES[name](forward=forward, to_affine=to_affine)
            if name == "fold_bn"
            else PASSES[name]()
        )
        before = _count(model)
        start = time.perf_counter()
        try:
            # Passes check every value they compute for NaN/Inf themselves; numpy's warnings
            # (a signalling NaN in a weight, an overflow that is then declined) would only add
            # lines to stderr.
            with np.errstate(all="ignore"):
                result = pass_(model)
        except BnfoldError:
            raise
        except Exception as e:
            raise InternalError(f"pass '{name}' failed after {done}: {e}") from e
        ms = (time.perf_counter() - start) * 1e3
        done.append(name)
        changed = result.changed if isinstance(result, BnfoldPassResult) else []
        declined = result.declined if isinstance(result, BnfoldPassResult) else []
        report.passes.append(
            PassStat(name, result.modified, ms, before, _count(model), len(changed), len(declined))
        )
        report.pass_ms += ms
        logger.info(
            "step %-15s %7.2f ms  nodes %d -> %d  changed %d declined %d",
            name,
            ms,
            before,
            _count(model),
            len(changed),
            len(declined),
        )
        if name == "fold_pad":
            report.pads.extend([*changed, *declined])
        if name == "fold_bn":
            for rec in [*changed, *declined]:
                (report.batchnorms if rec.op == "BatchNormalization" else report.affine_ops).append(
                    rec
                )
        if name == "merge_branches":
            report.merges += [*changed, *declined]
    # Saved with the model: `bnfold verify --per-layer` pairs the tensors by it.
    write_tensor_map(model)
    report.bn_after = _count(model, "BatchNormalization")
    report.nodes_after = _count(model)
    if check:
        try:
            bir.check_model(model)
        except Exception as e:
            raise InternalError(f"folded model fails onnx.checker: {e}") from e
    report.total_ms = (time.perf_counter() - t0) * 1e3
    return model, report
