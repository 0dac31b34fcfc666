"""fold_pad: a zero Pad folds into the next Conv/pool, exactly; every other Pad stays, with why."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import bnfold
from bnfold import ir as bir
from bnfold.passes import FP32, PASSES
from bnfold.passes.fold_pad import FoldPad
from bnfold.testing import count_ops, outputs_close, parse

RNG = np.random.default_rng(0)
C = 4


def pad_call(x: str, y: str, pads: list[int], opset: int, mode: str = "constant",
             value: float | None = None) -> tuple[str, dict[str, np.ndarray]]:  # fmt: skip
    """A Pad node in the form of ``opset`` (attributes before 11, inputs from 11) and the
    initializers it reads."""
    if opset < 11:
        val = "" if value is None else f", value = {value}"
        return f'{y} = Pad <pads = {pads}, mode = "{mode}"{val}> ({x})', {}
    tensors = {f"{y}_pads": np.asarray(pads, np.int64)}
    val = ""
    if value is not None:
        tensors[f"{y}_value"] = np.asarray(value, np.float32)
        val = f", {y}_value"
    return f'{y} = Pad <mode = "{mode}"> ({x}, {y}_pads{val})', tensors


def model(body: str, opset: int, out_shape: str, spatial: str = "7,9",
          **tensors: np.ndarray) -> onnx.ModelProto:  # fmt: skip
    text = f"""<ir_version: 8, opset_import: ["" : {opset}]>
    g (float[1,{C},{spatial}] x) => (float{out_shape} y) {{
        {body}
    }}"""
    return parse(text, **tensors)


def conv_weight(k: tuple[int, ...] = (3, 3)) -> dict[str, np.ndarray]:
    return {"W": RNG.standard_normal((C, C, *k)).astype(np.float32),
            "B": RNG.standard_normal(C).astype(np.float32)}  # fmt: skip


def run_pass(m: onnx.ModelProto):
    ir_model = bir.from_proto(m)
    result = FoldPad()(ir_model)
    return bir.to_proto(ir_model), result


def feeds(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    vi = m.graph.input[0]
    shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    return {vi.name: RNG.standard_normal(shape).astype(np.float32)}


def assert_folded(m: onnx.ModelProto) -> onnx.ModelProto:
    folded, result = run_pass(m)
    assert count_ops(folded, "Pad") == 0, [r.reason for r in result.declined]
    assert [(r.op, r.action) for r in result.changed] == [("Pad", "folded")]
    outputs_close(m, folded, feeds(m))
    return folded


def assert_declined(m: onnx.ModelProto, reason: str) -> None:
    folded, result = run_pass(m)
    assert count_ops(folded, "Pad") == count_ops(m, "Pad")
    assert not result.changed and not result.modified
    assert len(result.declined) == 1 and reason in result.declined[0].reason, result.declined
    outputs_close(m, folded, feeds(m))


OPSETS = [7, 11, 13, 18]
# (Pad amounts over N,C,H,W begin then end; Conv attributes) -> the Conv's pads after the fold.
CONV_CASES = {
    "symmetric": ([0, 0, 1, 1, 0, 0, 1, 1], "", [1, 1, 1, 1]),
    "asymmetric_stride2": ([0, 0, 0, 0, 0, 0, 1, 1], ", strides = [2, 2]", [0, 0, 1, 1]),
    "uneven": ([0, 0, 2, 0, 0, 0, 1, 3], "", [2, 0, 1, 3]),
    "auto_pad_valid": ([0, 0, 1, 0, 0, 0, 0, 2], ', auto_pad = "VALID"', [1, 0, 0, 2]),
    "added_to_conv_pads": ([0, 0, 0, 1, 0, 0, 2, 0], ", pads = [1, 1, 1, 1]", [1, 2, 3, 1]),
    "dilated": ([0, 0, 1, 1, 0, 0, 1, 1], ", dilations = [2, 2]", [1, 1, 1, 1]),
}


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("case", CONV_CASES)
def test_zero_pad_folds_into_conv(case: str, opset: int) -> None:
    pads, attrs, want = CONV_CASES[case]
    pad, tensors = pad_call("x", "p", pads, opset, value=0.0 if opset in (7, 13) else None)
    body = f"{pad}\n y = Conv <kernel_shape = [3, 3]{attrs}> (p, W, B)"
    m = model(body, opset, "[1,4,?,?]", **tensors, **conv_weight())
    folded = assert_folded(m)
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    got = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    assert got["pads"] == want
    assert got.get("auto_pad", b"NOTSET") == b"NOTSET"


def test_conv1d_folds() -> None:
    pad, tensors = pad_call("x", "p", [0, 0, 2, 0, 0, 1], 13)
    body = f"{pad}\n y = Conv (p, W, B)"
    assert_folded(model(body, 13, "[1,4,?]", spatial="9", **tensors, **conv_weight((3,))))


def test_opset18_axes_fold() -> None:
    tensors = {"pads": np.asarray([1, 0, 2, 1], np.int64), "axes": np.asarray([-2, 3], np.int64)}
    body = "p = Pad (x, pads, , axes)\n y = Conv (p, W, B)"
    assert_folded(model(body, 18, "[1,4,?,?]", **tensors, **conv_weight()))


@pytest.mark.parametrize("opset", OPSETS)
def test_average_pool_counting_pads_folds(opset: int) -> None:
    pad, tensors = pad_call("x", "p", [0, 0, 1, 0, 0, 0, 1, 1], opset)
    body = f"{pad}\n y = AveragePool <kernel_shape = [3, 3], count_include_pad = 1> (p)"
    assert_folded(model(body, opset, "[1,4,?,?]", **tensors))


@pytest.mark.parametrize("activation", ["Relu", "Sigmoid", "Clip"])
@pytest.mark.parametrize("opset", OPSETS)
def test_max_pool_after_non_negative_op_folds(opset: int, activation: str) -> None:
    pad, tensors = pad_call("r", "p", [0, 0, 0, 0, 0, 0, 1, 1], opset)
    if activation == "Clip" and opset >= 11:
        act = "r = Clip (x, lo)"
        tensors["lo"] = np.asarray(0.0, np.float32)
    else:
        act = "r = Clip <min = 0.0> (x)" if activation == "Clip" else f"r = {activation} (x)"
    body = f"{act}\n {pad}\n y = MaxPool <kernel_shape = [3, 3], strides = [2, 2]> (p)"
    assert_folded(model(body, opset, "[1,4,?,?]", **tensors))


DECLINES = {
    "non_zero_value": (lambda o: pad_call("x", "p", [0, 0, 1, 1, 0, 0, 1, 1], o, value=1.5),
                       "y = Conv (p, W, B)", "not 0"),
    "reflect": (lambda o: pad_call("x", "p", [0, 0, 1, 1, 0, 0, 1, 1], o, mode="reflect"),
                "y = Conv (p, W, B)", "mode reflect"),
    "edge": (lambda o: pad_call("x", "p", [0, 0, 1, 1, 0, 0, 1, 1], o, mode="edge"),
             "y = Conv (p, W, B)", "mode edge"),
    "channel_axis": (lambda o: pad_call("x", "p", [0, 1, 0, 0, 0, 1, 0, 0], o),
                     "y = Relu (p)", "batch or channel"),
    "negative": (lambda o: pad_call("x", "p", [0, 0, -1, 0, 0, 0, 0, 0], o),
                 "y = Conv (p, W, B)", "negative"),
    "same_upper": (lambda o: pad_call("x", "p", [0, 0, 1, 1, 0, 0, 1, 1], o),
                   'y = Conv <auto_pad = "SAME_UPPER"> (p, W, B)', "auto_pad=SAME_UPPER"),
    "not_conv": (lambda o: pad_call("x", "p", [0, 0, 1, 1, 0, 0, 1, 1], o),
                 "y = Relu (p)", "consumer Relu"),
    "max_pool_of_signed": (lambda o: pad_call("x", "p", [0, 0, 1, 1, 0, 0, 1, 1], o),
                           "y = MaxPool <kernel_shape = [3, 3]> (p)", "non-negative"),
    "average_pool_excluding_pads": (
        lambda o: pad_call("x", "p", [0, 0, 1, 1, 0, 0, 1, 1], o),
        "y = AveragePool <kernel_shape = [3, 3]> (p)", "count_include_pad=0"),
    "pool_ceil_mode": (lambda o: pad_call("x", "p", [0, 0, 1, 1, 0, 0, 1, 1], o),
                       "y = AveragePool <kernel_shape = [2, 2], strides = [2, 2], "
                       "count_include_pad = 1, ceil_mode = 1> (p)", "ceil_mode"),
    "pool_pads_reach_kernel": (lambda o: pad_call("x", "p", [0, 0, 2, 2, 0, 0, 2, 2], o),
                               "y = AveragePool <kernel_shape = [2, 2], count_include_pad = 1> "
                               "(p)", "kernel size"),
}  # fmt: skip


@pytest.mark.parametrize("opset", [7, 13])
@pytest.mark.parametrize("case", DECLINES)
def test_declines_with_reason(case: str, opset: int) -> None:
    make, consumer, reason = DECLINES[case]
    if case == "pool_ceil_mode" and opset < 10:
        pytest.skip("ceil_mode exists from opset 10")
    pad, tensors = make(opset)
    weights = conv_weight() if "W" in consumer else {}
    assert_declined(model(f"{pad}\n {consumer}", opset, "[1,?,?,?]", **tensors, **weights),
                    reason)  # fmt: skip


def test_multi_consumer_declines() -> None:
    pad, tensors = pad_call("x", "p", [0, 0, 1, 1, 0, 0, 1, 1], 13)
    body = f"{pad}\n a = Conv (p, W, B)\n b = Conv (p, W, B)\n y = Add (a, b)"
    assert_declined(model(body, 13, "[1,4,?,?]", **tensors, **conv_weight()), "other consumers")


def test_computed_pads_decline() -> None:
    tensors = {"half": np.asarray([0, 0, 1, 1], np.int64)}
    body = "pads = Concat <axis = 0> (half, half)\n p = Pad (x, pads)\n y = Conv (p, W, B)"
    assert_declined(model(body, 13, "[1,4,?,?]", **tensors, **conv_weight()), "not a constant")


def test_max_pool_indices_used_declines() -> None:
    pad, tensors = pad_call("r", "p", [0, 0, 1, 1, 0, 0, 1, 1], 13)
    text = f"""<ir_version: 8, opset_import: ["" : 13]>
    g (float[1,{C},7,9] x) => (float[1,4,?,?] y, int64[1,4,?,?] i) {{
        r = Relu (x)
        {pad}
        y, i = MaxPool <kernel_shape = [3, 3]> (p)
    }}"""
    assert_declined(parse(text, **tensors), "Indices")


def test_fold_pad_is_in_the_fp32_pipeline() -> None:
    assert PASSES["fold_pad"] is FoldPad
    assert FP32.index("fold_pad") > FP32.index("lift_constants")


def test_fold_report_lists_every_pad_with_its_outcome() -> None:
    folds, p_pads = pad_call("x", "p", [0, 0, 1, 1, 0, 0, 1, 1], 13)
    keeps, q_pads = pad_call("x", "q", [0, 0, 1, 1, 0, 0, 1, 1], 13, mode="reflect")
    body = f"{folds}\n {keeps}\n a = Conv (p, W, B)\n b = Conv (q, W, B)\n y = Add (a, b)"
    m = model(body, 13, "[1,4,?,?]", **p_pads, **q_pads, **conv_weight())
    folded, report = bnfold.fold(m)
    assert count_ops(folded, "Pad") == 1
    got = {r["node"]: (r["action"], r["reason"]) for r in report.to_dict()["pads"]}
    assert got == {"Pad:p": ("folded", None), "Pad:q": ("kept", "mode reflect is not constant")}
    outputs_close(m, folded, feeds(m))


def test_pad_inside_a_subgraph_is_reported_kept() -> None:
    text = """<ir_version: 8, opset_import: ["" : 13]>
    g (float[1,4,7,9] x, bool c) => (float[1,4,?,?] y) {
        y = If (c) <
            then_branch = t () => (float[1,4,?,?] a) {
                a = Pad (x, pads)
            },
            else_branch = e () => (float[1,4,7,9] b) { b = Identity (x) }
        >
    }"""
    m = parse(text, pads=np.asarray([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    folded, result = run_pass(m)
    assert [(r.op, r.action) for r in result.declined] == [("Pad", "kept")]
    assert "subgraph" in result.declined[0].reason
    for c in (True, False):
        outputs_close(m, folded, {**feeds(m), "c": np.asarray(c)})
