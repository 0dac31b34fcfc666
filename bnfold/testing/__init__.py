"""Helpers for testing passes: build models from text, count ops, compare with onnxruntime.

Comparisons run onnxruntime with graph optimizations off (onnxruntime's own fusions would fold
BN too and hide a wrong rewrite), at a tight tolerance.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir

from bnfold import ir as bir
from bnfold.check import run_onnxruntime


def parse(text: str, **tensors: np.ndarray) -> onnx.ModelProto:
    """``onnx.parser`` model text plus initializers given as keyword arrays; checked."""
    model = onnx.parser.parse_model(text)
    for name, array in tensors.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(array), name))
    onnx.checker.check_model(model)
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def count_ops(model: ir.Model | onnx.ModelProto, op_type: str) -> int:
    """How many nodes of ``op_type`` the main graph has."""
    if isinstance(model, onnx.ModelProto):
        return sum(1 for n in model.graph.node if n.op_type == op_type)
    return sum(1 for n in model.graph if n.op_type == op_type)


def outputs_close(
    reference: onnx.ModelProto,
    candidate: ir.Model | onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> float:
    """Assert every output of ``candidate`` matches ``reference`` in onnxruntime (opt. off).

    The tolerance is relative to the largest reference value, per output. Returns the worst
    ``max_abs / max|ref|``.
    """
    cand = candidate if isinstance(candidate, onnx.ModelProto) else bir.to_proto(candidate)
    onnx.checker.check_model(cand, full_check=True)
    ref = run_onnxruntime(reference, dict(feeds))
    got = run_onnxruntime(cand, dict(feeds))
    assert list(ref) == list(got), f"outputs differ: {list(ref)} vs {list(got)}"
    worst = 0.0
    for name in ref:
        a, b = np.asarray(ref[name], np.float64), np.asarray(got[name], np.float64)
        assert a.shape == b.shape, f"{name}: {a.shape} vs {b.shape}"
        assert np.all(np.isfinite(b)), f"{name}: non-finite output"
        scale = float(np.max(np.abs(a))) if a.size else 0.0
        err = float(np.max(np.abs(a - b))) if a.size else 0.0
        assert err <= atol + rtol * scale, f"{name}: max abs err {err:g} vs max|ref| {scale:g}"
        worst = max(worst, err / scale if scale else 0.0)
    return worst


def random_feeds(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Standard-normal data for every (static-shaped) graph input of ``model``."""
    return {
        vi.name: rng.standard_normal([d.dim_value for d in vi.type.tensor_type.shape.dim]).astype(
            onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        )
        for vi in model.graph.input
    }


def bn_stats(rng: np.random.Generator, c: int, prefix: str) -> dict[str, np.ndarray]:
    """Trained-looking BN parameters ``{prefix}_s/_b/_m/_v`` (float32; scale ~0.3..3, shift
    non-zero), for models written as ``BatchNormalization (x, P_s, P_b, P_m, P_v)``."""
    arrays = (rng.uniform(0.5, 1.5, c), rng.normal(0, 0.5, c), rng.normal(0, 0.5, c),
              rng.uniform(0.2, 2.0, c))  # fmt: skip
    return {f"{prefix}_{k}": a.astype(np.float32) for k, a in zip("sbmv", arrays, strict=True)}
