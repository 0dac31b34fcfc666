"""equalize (cross-layer equalization): exact in fp32 against onnxruntime (optimizations off), and
the two weights' per-channel ranges match afterwards."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from bnfold import ir as bir
from bnfold.passes.equalize import Equalize, in_ranges, out_ranges
from bnfold.testing import count_ops, outputs_close, parse

RNG = np.random.default_rng(0)
HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def spread_weights(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random weights whose output channels span ~4 orders of magnitude (like folded BN)."""
    w = rng.standard_normal(shape)
    return (w * 10.0 ** rng.uniform(-2, 2, (shape[0],) + (1,) * (len(shape) - 1))).astype(
        np.float32
    )


def act_text(kind: str, x: str, y: str) -> str:
    if kind == "none":  # Conv -> Conv directly (the first conv writes y)
        return ""
    if kind == "Relu":
        return f"{y} = Relu ({x})"
    if kind == "LeakyRelu":
        return f"{y} = LeakyRelu <alpha=0.1> ({x})"
    return f"{y} = Clip ({x}, lo_{y}, hi_{y})"  # Clip6 / ClipSym: bounds from act_tensors


def act_tensors(kind: str, y: str) -> dict[str, np.ndarray]:
    if kind not in ("Clip6", "ClipSym"):
        return {}
    lo, hi = {"Clip6": (0.0, 6.0), "ClipSym": (-1.0, 6.0)}[kind]
    return {f"lo_{y}": np.array(lo, np.float32), f"hi_{y}": np.array(hi, np.float32)}


def pair_model(
    act: str, cin: int, mid: int, cout: int, g1: int, g2: int, k2: int, bias: bool
) -> onnx.ModelProto:
    """x -> Conv1 (groups g1, 3x3 pad 1) -> act -> Conv2 (groups g2, k2 x k2, pad k2//2) -> y."""
    b1 = ", B1" if bias else ""
    p = k2 // 2
    text = f"""{HEADER}
    g (float[2,{cin},7,7] x) => (float[2,{cout},7,7] y) {{
        {"a1" if act == "none" else "c1"} = Conv <group={g1}, pads=[1,1,1,1]> (x, W1{b1})
        {act_text(act, "c1", "a1")}
        y = Conv <group={g2}, pads=[{p},{p},{p},{p}]> (a1, W2, B2)
    }}"""
    tensors = {
        "W1": spread_weights((mid, cin // g1, 3, 3), RNG),
        "W2": spread_weights((cout, mid // g2, k2, k2), RNG).transpose(1, 0, 2, 3).copy(),
        "B2": RNG.standard_normal(cout).astype(np.float32),
        **act_tensors(act, "a1"),
    }
    # Spread W2 over its *input* channels: transpose, spread per row, transpose back.
    w2 = spread_weights((mid // g2, cout, k2, k2), RNG)
    tensors["W2"] = np.ascontiguousarray(w2.transpose(1, 0, 2, 3))
    if bias:
        tensors["B1"] = (3 * RNG.standard_normal(mid)).astype(np.float32)
    return parse(text, **tensors)


def feeds(model: onnx.ModelProto, scale: float = 1.0) -> dict[str, np.ndarray]:
    vi = model.graph.input[0]
    shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    return {vi.name: (scale * RNG.standard_normal(shape)).astype(np.float32)}


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    return {f"W{i + 1}": inits[n.input[1]] for i, n in enumerate(convs)}


def group_of(model: onnx.ModelProto, index: int) -> int:
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in convs[index].attribute}
    return int(attrs.get("group", 1))


def equalize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Equalize]:
    m = bir.from_proto(model)
    eq = Equalize()
    eq(m)
    return bir.to_proto(m), eq


CASES = {
    # name: (cin, mid, cout, g1, g2, k2)
    "dense": (4, 8, 6, 1, 1, 3),
    "dense_1x1": (4, 8, 6, 1, 1, 1),
    "into_depthwise": (4, 8, 8, 1, 8, 3),
    "depthwise_into_pointwise": (8, 8, 6, 8, 1, 1),
    "grouped": (4, 8, 6, 2, 2, 3),
    "depthwise_multiplier": (4, 8, 16, 1, 8, 3),
}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", ["Relu", "LeakyRelu", "none", "Clip6", "ClipSym"])
@pytest.mark.parametrize("case", list(CASES))
def test_pair_is_exact_and_ranges_match(case: str, act: str, bias: bool) -> None:
    cin, mid, cout, g1, g2, k2 = CASES[case]
    model = pair_model(act, cin, mid, cout, g1, g2, k2, bias)
    out, eq = equalize(model)
    assert len(eq.pairs) == 1, eq.pairs
    # Large inputs drive many pre-activations past the clip bound: exact there too.
    for scale in (1.0, 20.0):
        outputs_close(model, out, feeds(model, scale), rtol=2e-5, atol=1e-5)
    w = weights(out)
    r1, r2 = out_ranges(w["W1"]), in_ranges(w["W2"], group_of(out, 1))
    live = (r1 > 0) & (r2 > 0)
    np.testing.assert_allclose(r1[live] / r1.max(), r2[live] / r2.max(), rtol=1e-3)
    if act in ("Clip6", "ClipSym"):
        # Scales normalized to max 1: the clip's bounds contain every channel's new bounds.
        assert eq.pairs[0]["scale_max"] == pytest.approx(1.0)
        assert count_ops(out, "Clip") == 1 and count_ops(out, "Min") == 1
        assert count_ops(out, "Max") == (1 if act == "ClipSym" else 0)
    else:
        np.testing.assert_allclose(r1, r2, rtol=1e-3)  # equal, not only proportional
        assert count_ops(out, "Min") == 0


@pytest.mark.parametrize("act", ["Relu", "Clip6"])
def test_depthwise_chain_converges_and_is_exact(act: str) -> None:
    """Conv -> act -> depthwise -> act -> Conv, MobileNetV2's block: two pairs share the dw."""
    text = f"""{HEADER}
    g (float[1,4,9,9] x) => (float[1,5,9,9] y) {{
        e = Conv (x, We, Be)
        {act_text(act, "e", "a")}
        d = Conv <group=12, pads=[1,1,1,1]> (a, Wd, Bd)
        {act_text(act, "d", "b")}
        y = Conv (b, Wp, Bp)
    }}"""
    model = parse(
        text,
        We=spread_weights((12, 4, 1, 1), RNG),
        Be=RNG.standard_normal(12).astype(np.float32),
        Wd=spread_weights((12, 1, 3, 3), RNG),
        Bd=RNG.standard_normal(12).astype(np.float32),
        Wp=np.ascontiguousarray(spread_weights((12, 5, 1, 1), RNG).transpose(1, 0, 2, 3)),
        Bp=RNG.standard_normal(5).astype(np.float32),
        **act_tensors(act, "a"),
        **act_tensors(act, "b"),
    )
    out, eq = equalize(model)
    assert [(p["first"], p["second"]) for p in eq.pairs] == [
        ("Conv:e", "Conv:d"),
        ("Conv:d", "Conv:y"),
    ]
    for scale in (1.0, 30.0):
        outputs_close(model, out, feeds(model, scale), rtol=2e-5, atol=1e-5)
    w = weights(out)
    for a, b, g in ((w["W1"], w["W2"], 12), (w["W2"], w["W3"], 1)):
        r1, r2 = out_ranges(a), in_ranges(b, g)
        np.testing.assert_allclose(r1 / r1.max(), r2 / r2.max(), rtol=1e-3)


def _per_tensor_output_sqnr(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> float:
    from bnfold.check import run_onnxruntime
    from bnfold.passes.quantize_int8 import fake_quant_weight, sqnr_db

    fq = onnx.ModelProto()
    fq.CopyFrom(model)
    for init in fq.graph.initializer:
        if init.name.startswith("W") or "_W" in init.name:
            w = onnx.numpy_helper.to_array(init)
            init.CopyFrom(onnx.numpy_helper.from_array(fake_quant_weight(w, None).astype(w.dtype),
                                                       init.name))  # fmt: skip
    ref, got = run_onnxruntime(model, feed)["y"], run_onnxruntime(fq, feed)["y"]
    return sqnr_db(ref, got)


@pytest.mark.parametrize("act", ["Relu", "Clip6"])
def test_equalization_rescues_per_tensor_weights(act: str) -> None:
    """The MobileNet case: Conv (channel ranges spread 10^4 by folded BN) -> act -> depthwise.
    With one int8 scale per weight tensor the small channels round to zero before CLE."""
    model = pair_model(act, 4, 16, 16, 1, 16, 3, True)
    # Every channel matters as much as any other at the output: Conv2 amplifies what Conv1
    # shrank (what a BN folded into Conv1 leaves behind).
    inits = {i.name: i for i in model.graph.initializer}
    w1 = onnx.numpy_helper.to_array(inits["W1"])
    w2 = RNG.standard_normal((16, 1, 3, 3)) / out_ranges(w1).reshape(16, 1, 1, 1)
    inits["W2"].CopyFrom(onnx.numpy_helper.from_array(w2.astype(np.float32), "W2"))
    out, _ = equalize(model)
    feed = feeds(model)
    before, after = _per_tensor_output_sqnr(model, feed), _per_tensor_output_sqnr(out, feed)
    assert after > before + 6, (before, after)


def test_running_twice_stays_exact() -> None:
    model = pair_model("Clip6", 4, 8, 8, 1, 8, 3, True)
    once, _ = equalize(model)
    twice, eq = equalize(once)
    assert len(eq.pairs) == 1 and eq.pairs[0]["via"] == "Clip->Min"
    assert count_ops(twice, "Min") == 1  # the existing Min was rescaled, not stacked
    outputs_close(model, twice, feeds(model, 20.0), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("c1 = Conv (x, W1)\n a1 = Relu (c1)\n y0 = Conv (a1, W2)\n y = Add (y0, a1)", "2 readers"),
        ("c1 = Conv (x, W1)\n a1 = Sigmoid (c1)\n y = Conv (a1, W2)", "Sigmoid"),
        ("c1 = Conv (x, W1)\n a1 = Clip (c1, lo, hi)\n y = Conv (a1, W2)", "does not contain 0"),
        ("c1 = Conv (x, W1)\n a1 = Relu (c1)\n y = Conv (a1, Wx)", "not a constant"),
    ],
)
def test_declines_with_reason(body: str, reason: str) -> None:
    text = f"""{HEADER}
    g (float[1,4,5,5] x, float[4,4,1,1] Wx) => (float[1,4,5,5] y) {{
        {body}
    }}"""
    model = parse(
        text,
        W1=spread_weights((4, 4, 1, 1), RNG),
        W2=spread_weights((4, 4, 1, 1), RNG),
        lo=np.array(1.0, np.float32),
        hi=np.array(6.0, np.float32),
    )
    m = bir.from_proto(model)
    result = Equalize()(m)
    assert not result.modified
    reasons = " ".join(r.reason or "" for r in result.declined)
    assert reason in reasons, reasons


def test_shared_weight_is_copied_not_changed_under_another_node() -> None:
    text = f"""{HEADER}
    g (float[1,4,5,5] x) => (float[1,4,5,5] y, float[1,4,5,5] z) {{
        c1 = Conv (x, W1)
        a1 = Relu (c1)
        y = Conv (a1, W2)
        z = Conv (x, W1)
    }}"""
    model = parse(text, W1=spread_weights((4, 4, 1, 1), RNG), W2=spread_weights((4, 4, 1, 1), RNG))
    out, eq = equalize(model)
    assert len(eq.pairs) == 1
    outputs_close(model, out, feeds(model))


def test_bn_stats_follow_the_channel_scales() -> None:
    from bnfold.passes.equalize import BN_STATS_KEY

    model = bir.from_proto(pair_model("Relu", 4, 8, 6, 1, 1, 3, True))
    first = next(n for n in model.graph if n.op_type == "Conv")
    mean, std = np.arange(8.0), np.ones(8)
    first.meta[BN_STATS_KEY] = (mean, std)
    w_before = out_ranges(ir.tensor(first.inputs[1].const_value.numpy()).numpy())
    Equalize()(model)
    w_after = out_ranges(first.inputs[1].const_value.numpy())
    scale = w_after / w_before
    new_mean, new_std = first.meta[BN_STATS_KEY]
    np.testing.assert_allclose(new_mean, mean * scale, rtol=1e-5)
    np.testing.assert_allclose(new_std, std * scale, rtol=1e-5)


def test_a_loose_min_after_the_clip_still_gets_a_bound() -> None:
    """Clip(0, 6) -> Min(100): the Min never clips, so rescaling it alone would be wrong."""
    text = f"""{HEADER}
    g (float[1,4,5,5] x) => (float[1,4,5,5] y) {{
        c1 = Conv (x, W1)
        a1 = Clip (c1, lo, hi)
        m1 = Min (a1, big)
        y = Conv (m1, W2)
    }}"""
    model = parse(
        text,
        W1=spread_weights((4, 4, 1, 1), RNG),
        W2=spread_weights((4, 4, 1, 1), RNG),
        lo=np.array(0.0, np.float32),
        hi=np.array(6.0, np.float32),
        big=np.array(100.0, np.float32),
    )
    out, eq = equalize(model)
    assert len(eq.pairs) == 1 and count_ops(out, "Min") == 2
    outputs_close(model, out, feeds(model, 20.0), rtol=2e-5, atol=1e-5)
