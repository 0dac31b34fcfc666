"""drop_implied_activations: an activation whose range the following QuantizeLinear already
clips to is removed, exactly; every other one stays (see the pass's module docstring)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest

from bnfold import ir
from bnfold.check import run_onnxruntime
from bnfold.passes import PASSES, DropImpliedActivations

# uint8 at scale 0.01, zero point Z: the quantized range is [(0 - Z) * 0.01, (255 - Z) * 0.01].
HEADER = '<ir_version: 8, opset_import: ["" : {opset}]>'


def _model(body: str, inits: str, z: int = 0, opset: int = 13, q_in: str = "a") -> str:
    return f"""{HEADER.format(opset=opset)}
    g (float[1,8] x) => (uint8[1,8] q) <{inits}float s = {{0.01}}, uint8 z = {{{z}}}> {{
        {body}
        q = QuantizeLinear ({q_in}, s, z)
    }}"""


LO0 = "float lo = {0.0}, "
RELU6 = "float zero = {0.0}, float six = {6.0}, "
CASES = {
    # name: (model text, activations dropped)
    "relu, z = 0 (q_min)": (_model("a = Relu (x)", ""), 1),
    "relu, z = 10": (_model("a = Relu (x)", "", z=10), 0),
    "clip inside the range": (_model("a = Clip (x, lo, hi)", LO0 + "float hi = {1.0}, "), 0),
    "clip at the range": (_model("a = Clip (x, lo, hi)", LO0 + "float hi = {2.55}, "), 1),
    "clip with no max": (_model("a = Clip (x, lo)", "float lo = {-1.0}, "), 1),
    "clip, max computed at run time": (
        _model("h = ReduceMax <keepdims = 0> (x)\n        a = Clip (x, lo, h)", LO0), 0),
    "clip opset 10, attribute max inside": (
        _model("a = Clip <min = 0.0, max = 1.0> (x)", "", opset=10), 0),
    "clip opset 10, attribute bounds at the range": (
        _model("a = Clip <min = 0.0, max = 3.0> (x)", "", opset=10), 1),
    "min above q_max": (_model("a = Min (x, c)", "float c = {6.0}, "), 1),
    "min inside": (_model("a = Min (x, c)", "float c = {1.0}, "), 0),
    "max below q_min": (_model("a = Max (x, c)", "float c = {-0.5}, "), 1),
    "relu6 as min(max(x, 0), 6), chain": (
        _model("m = Max (x, zero)\n        a = Min (m, six)", RELU6), 2),
    "relu also read elsewhere": (
        """<ir_version: 8, opset_import: ["" : 13]>
        g (float[1,8] x) => (uint8[1,8] q, float[1,8] a) <float s = {0.01}, uint8 z = {0}> {
            a = Relu (x)
            q = QuantizeLinear (a, s, z)
        }""", 0),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_drops_exactly_what_the_quantize_implies(name: str) -> None:
    text, expected = CASES[name]
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto)
    model = ir.from_proto(proto)
    result = DropImpliedActivations()(model)
    out = ir.to_proto(model)
    assert len(result.changed) == expected, [r.to_dict() for r in result.changed]
    ops = [n.op_type for n in out.graph.node]
    assert "QuantizeLinear" in ops and len(ops) == len(proto.graph.node) - expected
    # Exact: the quantized output is the same, bit for bit, over and beyond the quantized range.
    x = np.linspace(-4, 4, 8 * 64, dtype=np.float32).reshape(64, 1, 8)
    for row in x:
        want = run_onnxruntime(proto, {"x": row})["q"]
        got = run_onnxruntime(out, {"x": row})["q"]
        np.testing.assert_array_equal(got, want)


def test_is_registered_under_its_file_name() -> None:
    assert PASSES["drop_implied_activations"] is DropImpliedActivations
