"""fold_bn: each rewrite happens, and the folded model matches onnxruntime (optimizations off)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import bnfold
from bnfold import ir as bir
from bnfold.testing import count_ops, outputs_close, parse

RNG = np.random.default_rng(0)
DTYPES = {"float": np.float32, "float16": np.float16}
TOL = {"float": dict(rtol=1e-5, atol=1e-6), "float16": dict(rtol=4e-3, atol=1e-3)}


def bn_params(c: int, dtype: type = np.float32, prefix: str = "bn") -> dict[str, np.ndarray]:
    """Non-trivial BN statistics (scale spans ~0.3..3, shift non-zero)."""
    return {
        f"{prefix}_s": RNG.uniform(0.5, 1.5, c).astype(dtype),
        f"{prefix}_b": RNG.normal(0, 0.5, c).astype(dtype),
        f"{prefix}_m": RNG.normal(0, 0.5, c).astype(dtype),
        f"{prefix}_v": RNG.uniform(0.2, 2.0, c).astype(dtype),
    }


def bn_call(x: str, y: str, prefix: str = "bn", attrs: str = "") -> str:
    return f"{y} = BatchNormalization{attrs} ({x}, {prefix}_s, {prefix}_b, {prefix}_m, {prefix}_v)"


def fold(model: onnx.ModelProto, **kw: object) -> tuple[onnx.ModelProto, bnfold.report.FoldReport]:
    folded, report = bnfold.fold(model, **kw)
    return bir.to_proto(folded), report


def feeds_for(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {}
    for vi in model.graph.input:
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        out[vi.name] = RNG.standard_normal(shape).astype(dtype)
    return out


def header(opset: int) -> str:
    return f'<ir_version: 8, opset_import: ["" : {opset}]>'


@pytest.mark.parametrize("dtype", ["float", "float16"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("dims", "group"), [(1, 1), (2, 1), (2, 2), (2, 8), (3, 1), (3, 4)])
@pytest.mark.parametrize("opset", [7, 9, 13, 15])
def test_conv_bn_backward(dtype: str, bias: bool, dims: int, group: int, opset: int) -> None:
    npdt = DTYPES[dtype]
    cin, cout, k = 8, 8, 3
    spatial = [6] * dims
    sp = ",".join(map(str, spatial))
    out_sp = ",".join(str(s - k + 3) for s in spatial)  # pads 1 on each side -> same size
    pads = ",".join(["1"] * (2 * dims))
    b_in = ", B" if bias else ""
    text = f"""{header(opset)}
    g ({dtype}[1,{cin},{sp}] x) => ({dtype}[1,{cout},{out_sp}] y) {{
        c = Conv <group={group}, pads=[{pads}]> (x, W{b_in})
        {bn_call("c", "y")}
    }}"""
    tensors = {"W": RNG.standard_normal((cout, cin // group, *[k] * dims)).astype(npdt)}
    if bias:
        tensors["B"] = RNG.standard_normal(cout).astype(npdt)
    model = parse(text, **tensors, **bn_params(cout, npdt))
    folded, report = fold(model)
    assert count_ops(folded, "BatchNormalization") == 0
    assert count_ops(folded, "Conv") == 1 and len(folded.graph.node) == 1
    assert [(r.action, r.direction) for r in report.batchnorms] == [("folded", "backward")]
    outputs_close(model, folded, feeds_for(model), **TOL[dtype])


@pytest.mark.parametrize("dtype", ["float", "float16"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_conv_transpose_bn_backward(dtype: str, bias: bool, group: int) -> None:
    npdt = DTYPES[dtype]
    cin, cout = 4, 8
    b_in = ", B" if bias else ""
    text = f"""{header(15)}
    g ({dtype}[1,{cin},5,5] x) => ({dtype}[1,{cout},10,10] y) {{
        c = ConvTranspose <group={group}, strides=[2,2]> (x, W{b_in})
        {bn_call("c", "y")}
    }}"""
    tensors = {"W": RNG.standard_normal((cin, cout // group, 2, 2)).astype(npdt)}
    if bias:
        tensors["B"] = RNG.standard_normal(cout).astype(npdt)
    model = parse(text, **tensors, **bn_params(cout, npdt))
    folded, _ = fold(model)
    assert count_ops(folded, "BatchNormalization") == 0 and len(folded.graph.node) == 1
    outputs_close(model, folded, feeds_for(model), **TOL[dtype])


@pytest.mark.parametrize("dtype", ["float", "float16"])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (0.5, 2.0), (1.5, 0.0)])
@pytest.mark.parametrize("c_shape", [None, (6,), (1, 6), (3, 6), ()])
def test_gemm_bn_backward(
    dtype: str, trans_b: int, alpha: float, beta: float, c_shape: tuple[int, ...] | None
) -> None:
    npdt = DTYPES[dtype]
    k, n = 5, 6
    c_in = ", C" if c_shape is not None else ""
    text = f"""{header(15)}
    g ({dtype}[3,{k}] x) => ({dtype}[3,{n}] y) {{
        c = Gemm <transB={trans_b}, alpha={alpha}, beta={beta}> (x, W{c_in})
        {bn_call("c", "y")}
    }}"""
    tensors = {"W": RNG.standard_normal((n, k) if trans_b else (k, n)).astype(npdt)}
    if c_shape is not None:
        tensors["C"] = np.asarray(RNG.standard_normal(c_shape)).astype(npdt)
    model = parse(text, **tensors, **bn_params(n, npdt))
    folded, _ = fold(model)
    assert count_ops(folded, "BatchNormalization") == 0 and len(folded.graph.node) == 1
    outputs_close(model, folded, feeds_for(model), **TOL[dtype])


@pytest.mark.parametrize("bias", [True, False])
def test_matmul_bn_backward(bias: bool) -> None:
    k, n = 5, 6
    body = "c = Add (m, Bias)" if bias else "c = Identity (m)"
    text = f"""{header(15)}
    g (float[4,{k}] x) => (float[4,{n}] y) {{
        m = MatMul (x, W)
        {body}
        {bn_call("c", "y")}
    }}"""
    tensors = {"W": RNG.standard_normal((k, n)).astype(np.float32)}
    if bias:
        tensors["Bias"] = RNG.standard_normal(n).astype(np.float32)
    model = parse(text, **tensors, **bn_params(n))
    folded, report = fold(model)
    assert count_ops(folded, "BatchNormalization") == 0
    assert count_ops(folded, "MatMul") == 1 and count_ops(folded, "Add") == 1
    assert report.batchnorms[0].direction == "backward"
    outputs_close(model, folded, feeds_for(model))


def test_matmul_rank3_bn_declines_channel_axis() -> None:
    """BN normalizes axis 1; a rank-3 MatMul output's features are on axis 2: not foldable."""
    text = f"""{header(15)}
    g (float[2,6,5] x) => (float[2,6,6] y) {{
        m = MatMul (x, W)
        {bn_call("m", "y")}
    }}"""
    model = parse(text, W=RNG.standard_normal((5, 6)).astype(np.float32), **bn_params(6))
    folded, report = fold(model)
    rec = report.batchnorms[0]
    assert rec.action == "affine" and "channel axis" in rec.reason
    assert count_ops(folded, "BatchNormalization") == 0 and count_ops(folded, "Mul") == 1
    outputs_close(model, folded, feeds_for(model))


@pytest.mark.parametrize("op", ["Add", "Sub"])
def test_conv_add_bn_pp_ocr_pattern(op: str) -> None:
    """Conv -> Add(per-channel constant) -> BN, as paddle2onnx exports PP-OCR."""
    text = f"""{header(12)}
    g (float[1,3,8,8] x) => (float[1,4,6,6] y) {{
        c = Conv (x, W)
        a = {op} (c, Bias)
        {bn_call("a", "y")}
    }}"""
    model = parse(
        text,
        W=RNG.standard_normal((4, 3, 3, 3)).astype(np.float32),
        Bias=RNG.standard_normal((1, 4, 1, 1)).astype(np.float32),
        **bn_params(4),
    )
    folded, report = fold(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert len(report.affine_ops) == 1 and report.affine_ops[0].op == op
    outputs_close(model, folded, feeds_for(model))


def test_conv_transpose_add_bn() -> None:
    text = f"""{header(12)}
    g (float[1,4,5,5] x) => (float[1,2,10,10] y) {{
        c = ConvTranspose <strides=[2,2]> (x, W)
        a = Add (c, Bias)
        {bn_call("a", "y")}
    }}"""
    model = parse(
        text,
        W=RNG.standard_normal((4, 2, 2, 2)).astype(np.float32),
        Bias=RNG.standard_normal((2, 1, 1)).astype(np.float32),
        **bn_params(2),
    )
    folded, _ = fold(model)
    assert [n.op_type for n in folded.graph.node] == ["ConvTranspose"]
    outputs_close(model, folded, feeds_for(model))


def test_mul_add_chain_after_conv() -> None:
    """What exporters leave in place of BN: constant per-channel Mul then Add."""
    text = f"""{header(13)}
    g (float[1,3,8,8] x) => (float[1,4,8,8] y) {{
        c = Conv <pads=[1,1,1,1]> (x, W, B)
        m = Mul (c, S)
        y = Add (T, m)
    }}"""
    model = parse(
        text,
        W=RNG.standard_normal((4, 3, 3, 3)).astype(np.float32),
        B=RNG.standard_normal(4).astype(np.float32),
        S=RNG.uniform(0.5, 2, (4, 1, 1)).astype(np.float32),
        T=RNG.standard_normal((1, 4, 1, 1)).astype(np.float32),
    )
    folded, report = fold(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert [r.op for r in report.affine_ops] == ["Mul", "Add"]
    assert folded.graph.output[0].name == "y"
    outputs_close(model, folded, feeds_for(model))


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_bn_conv_forward_no_padding(group: int, bias: bool) -> None:
    """BN directly before an unpadded Conv (after a graph input, so backward is impossible)."""
    b_in = ", B" if bias else ""
    text = f"""{header(15)}
    g (float[1,4,7,7] x) => (float[1,6,5,5] y) {{
        {bn_call("x", "n")}
        y = Conv <group={group}> (n, W{b_in})
    }}"""
    tensors = {"W": RNG.standard_normal((6, 4 // group, 3, 3)).astype(np.float32)}
    if bias:
        tensors["B"] = RNG.standard_normal(6).astype(np.float32)
    model = parse(text, **tensors, **bn_params(4))
    folded, report = fold(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert report.batchnorms[0].direction == "forward"
    outputs_close(model, folded, feeds_for(model))


def test_bn_padded_conv_declines_with_reason_padding() -> None:
    text = f"""{header(15)}
    g (float[1,4,7,7] x) => (float[1,6,7,7] y) {{
        {bn_call("x", "n")}
        y = Conv <pads=[1,1,1,1]> (n, W)
    }}"""
    model = parse(text, W=RNG.standard_normal((6, 4, 3, 3)).astype(np.float32), **bn_params(4))
    folded, report = fold(model)
    rec = report.batchnorms[0]
    assert rec.action == "affine" and "padding" in rec.reason and "backward" in rec.reason
    assert [n.op_type for n in folded.graph.node] == ["Mul", "Add", "Conv"]
    outputs_close(model, folded, feeds_for(model))


def test_bn_padded_conv_zero_shift_folds_forward() -> None:
    """With t == 0 the padding rule does not apply: padded zeros stay zeros."""
    params = bn_params(4)
    params["bn_b"] = np.zeros(4, np.float32)
    params["bn_m"] = np.zeros(4, np.float32)
    text = f"""{header(15)}
    g (float[1,4,7,7] x) => (float[1,6,7,7] y) {{
        {bn_call("x", "n")}
        y = Conv <pads=[1,1,1,1]> (n, W)
    }}"""
    model = parse(text, W=RNG.standard_normal((6, 4, 3, 3)).astype(np.float32), **params)
    folded, report = fold(model)
    assert report.batchnorms[0].direction == "forward"
    outputs_close(model, folded, feeds_for(model))


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_c", [True, False])
def test_bn_gemm_forward(trans_b: int, with_c: bool) -> None:
    c_in = ", C" if with_c else ""
    text = f"""{header(15)}
    g (float[3,5] x) => (float[3,6] y) {{
        {bn_call("x", "n")}
        y = Gemm <transB={trans_b}, alpha=0.5, beta=2.0> (n, W{c_in})
    }}"""
    tensors = {"W": RNG.standard_normal((6, 5) if trans_b else (5, 6)).astype(np.float32)}
    if with_c:
        tensors["C"] = RNG.standard_normal(6).astype(np.float32)
    model = parse(text, **tensors, **bn_params(5))
    folded, report = fold(model)
    assert [n.op_type for n in folded.graph.node] == ["Gemm"]
    assert report.batchnorms[0].direction == "forward"
    outputs_close(model, folded, feeds_for(model))


def test_forward_needs_every_consumer_foldable() -> None:
    text = f"""{header(15)}
    g (float[1,4,7,7] x) => (float[1,6,5,5] y, float[1,4,7,7] r) {{
        {bn_call("x", "n")}
        y = Conv (n, W)
        r = Relu (n)
    }}"""
    model = parse(text, W=RNG.standard_normal((6, 4, 3, 3)).astype(np.float32), **bn_params(4))
    folded, report = fold(model)
    rec = report.batchnorms[0]
    assert rec.action == "affine" and "Relu" in rec.reason
    outputs_close(model, folded, feeds_for(model))


def test_shared_weight_is_copied_not_changed() -> None:
    text = f"""{header(15)}
    g (float[1,3,6,6] x) => (float[1,4,4,4] y1, float[1,4,4,4] y2) {{
        c1 = Conv (x, W)
        c2 = Conv (x, W)
        {bn_call("c1", "y1", "p")}
        {bn_call("c2", "y2", "q")}
    }}"""
    model = parse(
        text,
        W=RNG.standard_normal((4, 3, 3, 3)).astype(np.float32),
        **bn_params(4, prefix="p"),
        **bn_params(4, prefix="q"),
    )
    folded, report = fold(model)
    assert report.counts()["folded_backward"] == 2
    weights = [n.input[1] for n in folded.graph.node]
    assert len(set(weights)) == 2
    outputs_close(model, folded, feeds_for(model))


def test_producer_with_other_consumers_declines_backward() -> None:
    text = f"""{header(15)}
    g (float[1,3,6,6] x) => (float[1,4,4,4] y, float[1,4,4,4] r) {{
        c = Conv (x, W)
        {bn_call("c", "y")}
        r = Relu (c)
    }}"""
    model = parse(text, W=RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), **bn_params(4))
    folded, report = fold(model)
    rec = report.batchnorms[0]
    assert rec.action == "affine" and "other consumers" in rec.reason
    assert [o.name for o in folded.graph.output] == ["y", "r"]
    outputs_close(model, folded, feeds_for(model))


def test_graph_output_names_shapes_and_types_are_kept() -> None:
    text = f"""{header(15)}
    g (float[N,3,6,6] x) => (float[N,4,4,4] y) {{
        c = Conv (x, W)
        {bn_call("c", "y")}
    }}"""
    model = parse(text, W=RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), **bn_params(4))
    folded, _ = fold(model)
    assert folded.graph.input[0] == model.graph.input[0]
    assert folded.graph.output[0] == model.graph.output[0]
    feeds = {"x": RNG.standard_normal((2, 3, 6, 6)).astype(np.float32)}
    outputs_close(model, folded, feeds)


def test_float16_overflow_declines() -> None:
    params = bn_params(4, np.float16)
    params["bn_v"] = np.full(4, 1e-4, np.float16)  # scale ~ 100
    text = f"""{header(15)}
    g (float16[1,3,6,6] x) => (float16[1,4,4,4] y) {{
        c = Conv (x, W)
        {bn_call("c", "y")}
    }}"""
    model = parse(text, W=np.full((4, 3, 3, 3), 60000, np.float16), **params)
    _, report = fold(model)
    rec = report.batchnorms[0]
    assert rec.action in ("affine", "kept") and "float16" in rec.reason


@pytest.mark.parametrize("var", [0.0, -1.0])
def test_nonpositive_variance_declines(var: float) -> None:
    params = bn_params(4)
    params["bn_v"] = np.full(4, var, np.float32)
    text = f"""{header(15)}
    g (float[1,3,6,6] x) => (float[1,4,4,4] y) {{
        c = Conv (x, W)
        {bn_call("c", "y", attrs="<epsilon=0.0>")}
    }}"""
    model = parse(text, W=RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), **params)
    folded, report = fold(model)
    rec = report.batchnorms[0]
    assert rec.action == "kept" and "var + epsilon <= 0" in rec.reason
    assert count_ops(folded, "BatchNormalization") == 1


def test_epsilon_is_honoured() -> None:
    params = bn_params(4)
    params["bn_v"] = np.full(4, 1e-3, np.float32)
    text = f"""{header(15)}
    g (float[1,3,6,6] x) => (float[1,4,4,4] y) {{
        c = Conv (x, W)
        {bn_call("c", "y", attrs="<epsilon=0.01>")}
    }}"""
    model = parse(text, W=RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), **params)
    folded, _ = fold(model)
    assert count_ops(folded, "BatchNormalization") == 0
    outputs_close(model, folded, feeds_for(model))


def test_bn_in_subgraph_is_reported() -> None:
    text = f"""{header(15)}
    g (float[1,4,3,3] x, bool cond) => (float[1,4,3,3] y) {{
        y = If (cond) <
            then_branch = t () => (float[1,4,3,3] a) {{ {bn_call("x", "a")} }},
            else_branch = e () => (float[1,4,3,3] b) {{ b = Identity (x) }}
        >
    }}"""
    model = parse(text, **bn_params(4))
    _, report = fold(model)
    assert len(report.batchnorms) == 1 and "subgraph" in report.batchnorms[0].reason


def test_fold_is_idempotent_and_deterministic() -> None:
    text = f"""{header(15)}
    g (float[1,4,7,7] x) => (float[1,6,7,7] y) {{
        {bn_call("x", "n")}
        c = Conv <pads=[1,1,1,1]> (n, W)
        {bn_call("c", "y", "p")}
    }}"""
    model = parse(
        text,
        W=RNG.standard_normal((6, 4, 3, 3)).astype(np.float32),
        **bn_params(4),
        **bn_params(6, prefix="p"),
    )
    once, _ = fold(model)
    again, report = fold(once)
    assert bir.to_bytes(once) == bir.to_bytes(again)
    assert report.affine_ops == [] and report.bn_before == 0
    assert bir.to_bytes(fold(model)[0]) == bir.to_bytes(once)
