"""compile of a QDQ model never fails on a group the integer kernels cannot hold (issue 14).

A quantized group whose requantize multiplier ``s_x s_w / s_y`` does not fit the 31-bit fixed
point (``>= 2^30``: an output scale that collapsed) stays float (dequantize -> float op ->
quantize), and the manifest names the group and why; the build is verified layer by layer as
usual.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from bnfold.lower import compiler as lower
from bnfold.quant.quantize import quantize
from bnfold.testing import parse

pytest.importorskip("tvm")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.tvm


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    text = """<ir_version: 8, opset_import: ["" : 13]>
    g (float[1,4,10,10] x) => (float[1,8,10,10] y) {
        c1 = Conv <pads=[1,1,1,1]> (x, W1, B1)
        r1 = Relu (c1)
        c2 = Conv (r1, W2, B2)
        r2 = Relu (c2)
        y = Conv (r2, W3, B3)
    }"""
    return parse(
        text,
        W1=rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32),
        B1=rng.normal(0, 0.3, 8).astype(np.float32),
        W2=rng.normal(0, 0.3, (8, 8, 1, 1)).astype(np.float32),
        B2=rng.normal(0, 0.3, 8).astype(np.float32),
        W3=rng.normal(0, 0.3, (8, 8, 1, 1)).astype(np.float32),
        B3=rng.normal(0, 0.3, 8).astype(np.float32),
    )


def _collapse_scale(int8: onnx.ModelProto, tensor: str, scale: float) -> None:
    """Give the QuantizeLinear of ``tensor`` (and its DequantizeLinear: they share the
    initializer) the output scale ``scale``."""
    q = next(n for n in int8.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    init = next(i for i in int8.graph.initializer if i.name == q.input[1])
    init.CopyFrom(onnx.numpy_helper.from_array(np.array(scale, np.float32), init.name))


def test_unrepresentable_requantize_stays_float(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.normal(0, 1, (1, 4, 10, 10)).astype(np.float32)} for _ in range(8)]
    int8, _ = quantize(_model(), feeds)
    _collapse_scale(int8, "r1", 1e-13)  # s_x s_w / s_y ~ 1e10 for the first conv
    path = tmp_path / "m.int8.onnx"
    onnx.save(int8, str(path))
    m = lower.compile_model(path, "x86", tmp_path / "out", fold=False)
    info = m.compile["int8"]
    convs = [g for g in info["groups"] if g["op"] == "conv2d"]
    assert len(convs) == 2, info["groups"]
    assert convs[0].get("how") is None and "requantize scale" in convs[0]["reason"]
    assert "too large" in convs[0]["reason"]
    # The conv reading the collapsed tensor: its bias no longer fits int32 at s_x = 1e-13.
    assert convs[1].get("how") is None and "int32" in convs[1]["reason"]
    assert m.verification["status"] == "passed", m.verification
