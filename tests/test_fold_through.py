"""fold_bn through Concat / MaxPool / nearest Resize: each slice of the map folds into its own
producer, and the folded model matches onnxruntime (optimizations off); every precondition that
fails is a decline with its reason, and the model stays exact."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import bnfold
from bnfold import ir as bir
from bnfold.testing import count_ops, outputs_close, parse, random_feeds

RNG = np.random.default_rng(16)
HEADER = '<ir_version: 8, opset_import: ["" : 13]>'


def stats(c: int, prefix: str = "bn", positive: bool = True) -> dict[str, np.ndarray]:
    """BN statistics; ``positive=False`` gives some channels a negative gamma (scale < 0)."""
    gamma = RNG.uniform(0.5, 1.5, c)
    if not positive:
        gamma[::2] *= -1
    arrays = (gamma, RNG.normal(0, 0.5, c), RNG.normal(0, 0.5, c), RNG.uniform(0.2, 2.0, c))
    return {f"{prefix}_{k}": a.astype(np.float32) for k, a in zip("sbmv", arrays, strict=True)}


def bn(x: str, y: str, prefix: str = "bn") -> str:
    return f"{y} = BatchNormalization ({x}, {prefix}_s, {prefix}_b, {prefix}_m, {prefix}_v)"


def w(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def run(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bnfold.report.FoldReport]:
    folded, report = bnfold.fold(model)
    folded = bir.to_proto(folded)
    outputs_close(model, folded, random_feeds(model, RNG))
    return folded, report


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("groups", "cin"), [((1, 1), 4), ((2, 1), 4), ((4, 2), 4), ((1, 4), 4)])
def test_concat_of_convs_folds_per_slice(bias: bool, groups: tuple[int, int], cin: int) -> None:
    """Conv(8 ch) ++ ConvTranspose(4 ch) ++ Conv(depthwise/grouped) -> BN: three slices."""
    g1, g2 = groups
    b1, b2, b3 = (", B1", ", B2", ", B3") if bias else ("", "", "")
    text = f"""{HEADER}
    g (float[1,{cin},6,6] x) => (float[1,16,6,6] y) {{
        a = Conv <group={g1}, pads=[1,1,1,1]> (x, W1{b1})
        b = ConvTranspose <group={g2}, pads=[1,1,1,1]> (x, W2{b2})
        c = Conv <group={cin}> (x, W3{b3})
        cat = Concat <axis=1> (a, b, c)
        {bn("cat", "y")}
    }}"""
    tensors = {"W1": w(8, cin // g1, 3, 3), "W2": w(cin, 4 // g2, 3, 3), "W3": w(4, 1, 1, 1)}
    if bias:
        tensors.update(B1=w(8), B2=w(4), B3=w(4))
    folded, report = run(parse(text, **tensors, **stats(16)))
    assert count_ops(folded, "BatchNormalization") == 0 and count_ops(folded, "Mul") == 0
    assert [n.op_type for n in folded.graph.node] == ["Conv", "ConvTranspose", "Conv", "Concat"]
    rec = report.batchnorms[0]
    assert (rec.action, rec.direction, len(rec.into)) == ("folded", "backward", 3)


def test_mixnet_split_mixed_kernels_concat_bn() -> None:
    """MixNet's mixed depthwise conv: Split -> 3x3 / 5x5 depthwise -> Concat -> BN."""
    text = f"""{HEADER}
    g (float[1,8,9,9] x) => (float[1,8,9,9] y) {{
        p, q = Split <axis=1> (x, sizes)
        a = Conv <group=4, pads=[1,1,1,1]> (p, W1)
        b = Conv <group=4, pads=[2,2,2,2]> (q, W2)
        cat = Concat <axis=-3> (a, b)
        {bn("cat", "y")}
    }}"""
    model = parse(text, sizes=np.array([4, 4]), W1=w(4, 1, 3, 3), W2=w(4, 1, 5, 5), **stats(8))
    folded, report = run(model)
    assert count_ops(folded, "BatchNormalization") == 0 and count_ops(folded, "Add") == 0
    assert report.batchnorms[0].into == ["Conv:a", "Conv:b"]


def test_concat_of_gemms_and_a_per_channel_mul() -> None:
    """Rank 2 (Gemm outputs) and a constant Mul instead of a BN: the same rule."""
    text = f"""{HEADER}
    g (float[3,5] x) => (float[3,7] y) {{
        a = Gemm <transB=1> (x, W1, C1)
        b = Gemm (x, W2)
        cat = Concat <axis=1> (a, b)
        y = Mul (cat, S)
    }}"""
    model = parse(text, W1=w(3, 5), C1=w(3), W2=w(5, 4), S=w(7))
    folded, report = run(model)
    assert [n.op_type for n in folded.graph.node] == ["Gemm", "Gemm", "Concat"]
    assert report.affine_ops[0].into == ["Gemm:a", "Gemm:b"]


@pytest.mark.parametrize(
    ("pool", "out"),
    [("pads=[1,1,1,1], kernel_shape=[3,3]", 6), ("kernel_shape=[2,2], strides=[2,2]", 3),
     ("kernel_shape=[3,3], strides=[2,2], ceil_mode=1", 3)],
)  # fmt: skip
def test_maxpool_positive_scale_folds_through(pool: str, out: int) -> None:
    text = f"""{HEADER}
    g (float[1,3,6,6] x) => (float[1,4,{out},{out}] y) {{
        c = Conv <pads=[1,1,1,1]> (x, W, B)
        p = MaxPool <{pool}> (c)
        {bn("p", "y")}
    }}"""
    folded, report = run(parse(text, W=w(4, 3, 3, 3), B=w(4), **stats(4)))
    assert [n.op_type for n in folded.graph.node] == ["Conv", "MaxPool"]
    assert report.batchnorms[0].into == ["Conv:c"]


@pytest.mark.parametrize(
    ("pool", "out", "folds"),
    [("AveragePool <kernel_shape=[3,3], pads=[1,1,1,1]>", 6, True),
     ("AveragePool <kernel_shape=[2,2], strides=[2,2], count_include_pad=1>", 3, True),
     ("AveragePool <kernel_shape=[3,3], strides=[2,2], ceil_mode=1>", 3, True),
     ("GlobalAveragePool", 1, True),
     ("AveragePool <kernel_shape=[3,3], pads=[1,1,1,1], count_include_pad=1>", 6, False)],
)  # fmt: skip
def test_average_pool_folds_through_unless_padding_counts(pool: str, out: int, folds: bool) -> None:
    text = f"""{HEADER}
    g (float[1,3,6,6] x) => (float[1,4,{out},{out}] y) {{
        c = Conv <pads=[1,1,1,1]> (x, W, B)
        p = {pool} (c)
        {bn("p", "y")}
    }}"""
    folded, report = run(parse(text, W=w(4, 3, 3, 3), B=w(4), **stats(4)))
    rec = report.batchnorms[0]
    if folds:
        assert rec.into == ["Conv:c"] and len(folded.graph.node) == 2
    else:
        assert rec.action == "affine" and "counts padding" in rec.reason, rec.reason


@pytest.mark.parametrize("op", ["Resize", "Upsample"])
def test_nearest_resize_folds_through(op: str) -> None:
    """Nested: Concat(Resize(Conv), Conv) -> BN; both convs absorb their slice."""
    header = HEADER if op == "Resize" else HEADER.replace(": 13", ": 9")
    call = 'Resize <mode="nearest"> (c, , scales)' if op == "Resize" else "Upsample (c, scales)"
    text = f"""{header}
    g (float[1,3,4,4] x, float[1,3,8,8] z) => (float[1,6,8,8] y) {{
        c = Conv <pads=[1,1,1,1]> (x, W1)
        r = {call}
        d = Conv <pads=[1,1,1,1]> (z, W2, B2)
        cat = Concat <axis=1> (r, d)
        {bn("cat", "y")}
    }}"""
    scales = np.array([1, 1, 2, 2], np.float32)
    folded, report = run(parse(text, W1=w(2, 3, 3, 3), W2=w(4, 3, 3, 3), B2=w(4), scales=scales,
                               **stats(6)))  # fmt: skip
    assert count_ops(folded, "BatchNormalization") == 0 and count_ops(folded, "Mul") == 0
    assert report.batchnorms[0].into == ["Conv:c", "Conv:d"]


# (graph body producing `cat`, extra tensors, words the reason must contain)
DECLINES = {
    "producer with another consumer": (
        """a = Conv (x, W1)
        b = Conv (x, W2)
        cat = Concat <axis=1> (a, b)
        o = Relu (a)""",
        "input 0: Conv output has other consumers",
    ),
    "non-linear producer": (
        """a = Conv (x, W1)
        r = Relu (x)
        b = Conv (r, W2)
        b2 = Relu (b)
        cat = Concat <axis=1> (a, b2)""",
        "input 1: producer Relu is not Conv",
    ),
    "concat on a spatial axis": (
        """a = Conv (x, W1)
        b = Conv (x, W1b)
        cat = Concat <axis=2> (a, b)""",
        "Concat on axis 2, not the channel axis",
    ),
    "negative scale under MaxPool": (
        """a = Conv (x, W1)
        b = Conv (x, W2)
        ab = Concat <axis=1> (a, b)
        cat = MaxPool <kernel_shape=[1,1]> (ab)""",
        "MaxPool: a scale is not positive",
    ),
    "linear resize": (
        """a = Conv (x, W1)
        b = Conv (x, W2)
        ab = Concat <axis=1> (a, b)
        cat = Resize <mode="linear"> (ab, , scales)""",
        "mode 'linear' is not nearest",
    ),
}


@pytest.mark.parametrize("case", DECLINES)
def test_through_declines_with_reason(case: str) -> None:
    body, reason = DECLINES[case]
    spatial = case == "concat on a spatial axis"
    c_out = 2 if spatial else 5
    hw = "8,4" if spatial else ("8,8" if case == "linear resize" else "4,4")
    extra = ", float[1,2,4,4] o" if "another" in case else ""
    text = f"""{HEADER}
    g (float[1,2,4,4] x) => (float[1,{c_out},{hw}] y{extra}) {{
        {body}
        {bn("cat", "y")}
    }}"""
    tensors = {"W1": w(2, 2, 1, 1), "W1b": w(2, 2, 1, 1), "W2": w(3, 2, 1, 1),
               "scales": np.array([1, 1, 2, 2], np.float32)}  # fmt: skip
    model = parse(text, **tensors, **stats(c_out, positive="MaxPool" not in body))
    folded, report = run(model)
    rec = report.batchnorms[0]
    assert rec.action == "affine" and reason in rec.reason, rec.reason
    assert count_ops(folded, "Mul") == 1 and count_ops(folded, "Concat") == 1


# Forward through Flatten / Reshape (and the pools before them) into a Gemm / MatMul: the BN
# reads a graph input (or a Relu), so only the forward fold can remove it.
FLATTENS = {  # name -> (node text producing `f` from `n`, batch size)
    "Flatten": ("f = Flatten (n)", 2),
    "Flatten axis=-3": ("f = Flatten <axis=-3> (n)", 2),
    "Reshape [0,-1]": ("f = Reshape (n, shape)", 2),
    "Reshape [-1,36]": ("f = Reshape (n, shape)", 2),
    "Reshape [1,-1]": ("f = Reshape (n, shape)", 1),
    "Reshape [2,36]": ("f = Reshape (n, shape)", 2),
}
CONSUMERS = {  # name -> (node text producing `y` from `f`, weight shape for K=36, N=5)
    "Gemm": ("y = Gemm <alpha=0.5, beta=2.0> (f, W)", (36, 5)),
    "Gemm transB": ("y = Gemm <transB=1> (f, W)", (5, 36)),
    "Gemm C": ("y = Gemm <alpha=0.5, beta=2.0> (f, W, C)", (36, 5)),
    "Gemm transB C": ("y = Gemm <transB=1> (f, W, C)", (5, 36)),
    "MatMul": ("y = MatMul (f, W)", (36, 5)),
    "MatMul+Add": ("m = MatMul (f, W)\n        y = Add (m, C)", (36, 5)),
}


def reshape_target(name: str) -> np.ndarray:
    return np.array([int(d) for d in name.split("[")[1].rstrip("]").split(",")], np.int64)


@pytest.mark.parametrize("flatten", FLATTENS)
@pytest.mark.parametrize("consumer", CONSUMERS)
def test_bn_flatten_folds_forward_into_gemm(flatten: str, consumer: str) -> None:
    """x (N,4,3,3) -> BN -> Flatten/Reshape (N,36) -> Gemm/MatMul: feature c*9+k gets s[c]."""
    flat, batch = FLATTENS[flatten]
    call, w_shape = CONSUMERS[consumer]
    text = f"""{HEADER}
    g (float[{batch},4,3,3] x) => (float[{batch},5] y) {{
        {bn("x", "n")}
        {flat}
        {call}
    }}"""
    tensors = {"W": w(*w_shape), "C": w(5)}
    if "Reshape" in flatten:
        tensors["shape"] = reshape_target(flatten)
    folded, report = run(parse(text, **tensors, **stats(4)))
    rec = report.batchnorms[0]
    assert (rec.action, rec.direction) == ("folded", "forward"), rec.reason
    ops = [n.op_type for n in folded.graph.node]
    # No Mul/Add is left for the BN; MatMul's shift joins its bias Add (or becomes one).
    assert ops == [flatten.split()[0], *(["MatMul", "Add"] if "MatMul" in consumer else ["Gemm"])]


@pytest.mark.parametrize(
    ("pool", "out"),
    [("GlobalAveragePool", 1), ("AveragePool <kernel_shape=[2,2], strides=[2,2]>", 2),
     ("AveragePool <kernel_shape=[3,3], pads=[1,1,1,1]>", 4),
     ("MaxPool <kernel_shape=[2,2], strides=[2,2]>", 2)],
)  # fmt: skip
def test_bn_pool_flatten_gemm_folds_forward(pool: str, out: int) -> None:
    """The classifier head: Relu -> BN -> pool -> Flatten -> Gemm (the Relu stops a backward
    fold); the map crosses the pool (passes/_through.py) and the Flatten."""
    k = 6 * out * out
    text = f"""{HEADER}
    g (float[2,6,4,4] x) => (float[2,3] y) {{
        r = Relu (x)
        {bn("r", "n")}
        p = {pool} (n)
        f = Flatten (p)
        y = Gemm <transB=1> (f, W, C)
    }}"""
    folded, report = run(parse(text, W=w(3, k), C=w(3), **stats(6)))
    rec = report.batchnorms[0]
    assert (rec.action, rec.direction, rec.into) == ("folded", "forward", ["Gemm:y"])
    assert [n.op_type for n in folded.graph.node] == ["Relu", pool.split()[0], "Flatten", "Gemm"]


def test_mul_add_flatten_two_gemms() -> None:
    """Exporters' per-channel Mul -> Add instead of a BN, read by two Gemms: both absorb both."""
    text = f"""{HEADER}
    g (float[2,4,2,2] x) => (float[2,5] y, float[2,3] z) {{
        m = Mul (x, S)
        a = Add (m, T)
        f = Reshape (a, shape)
        y = Gemm (f, W1, C1)
        z = MatMul (f, W2)
    }}"""
    model = parse(text, S=w(4, 1, 1), T=w(1, 4, 1, 1), shape=np.array([0, -1], np.int64),
                  W1=w(16, 5), C1=w(5), W2=w(16, 3))  # fmt: skip
    folded, report = run(model)
    assert [(r.op, r.direction) for r in report.affine_ops] == [("Add", "forward"),
                                                                ("Mul", "forward")]  # fmt: skip
    assert [n.op_type for n in folded.graph.node] == ["Reshape", "Gemm", "MatMul", "Add"]
    assert report.affine_ops[0].into == ["Gemm:y", "MatMul:z"]


def test_forward_fold_keeps_per_layer_pairing() -> None:
    """The Flatten's output no longer holds what it held (the map is gone from it): the tensor
    map says so, and verify --per-layer passes at every layer it pairs."""
    text = f"""{HEADER}
    g (float[1,4,3,3] x) => (float[1,5] y) {{
        r = Relu (x)
        {bn("r", "n")}
        f = Flatten (n)
        y = Gemm (f, W, C)
    }}"""
    model = parse(text, W=w(36, 5), C=w(5), **stats(4))
    folded, _ = run(model)
    result = bnfold.check.verify(model, folded, per_layer=True)
    assert result.passed and {la.candidate for la in result.layers.layers} == {"r", "y"}


# (graph body from `n` (the BN's output, float[2,4,3,3]) to `y`, extra int64 tensors, the shape
# of y, the words the reason must contain)
FORWARD_DECLINES = {
    "Reshape target not a constant": (
        "f = Reshape (n, shape_in)\n        y = Gemm (f, W)", {}, "2,5",
        "Reshape target shape is not a constant",
    ),
    "Reshape to rank 3": (
        "f = Reshape (n, shape)\n        y = MatMul (f, W9)", {"shape": [0, 4, 9]}, "2,4,5",
        "Reshape target [0, 4, 9] is not (batch, C*H*W)",
    ),
    "Reshape [1,-1] on batch 2": (
        "f = Reshape (n, shape)\n        y = MatMul (f, W72)", {"shape": [1, -1]}, "1,5",
        "Reshape target [1, -1] does not keep the batch axis",
    ),
    "Reshape [-1,9] (channels to rows)": (
        "f = Reshape (n, shape)\n        y = Gemm (f, W9)", {"shape": [-1, 9]}, "8,5",
        "Reshape target [-1, 9] does not keep the batch axis",
    ),
    "Flatten axis 2": (
        "f = Flatten <axis=2> (n)\n        y = Gemm (f, W9)", {}, "8,5", "Flatten axis 2 is not 1"
    ),
    "Gemm transA": (
        "f = Flatten (n)\n        y = Gemm <transA=1> (f, W2)", {}, "36,5", "has transA=1"
    ),
    "another consumer": (
        "f = Flatten (n)\n        y = Gemm (f, W)\n        o = Relu (f)", {}, "2,5",
        "through Flatten (Flatten:f): consumer Relu (Relu:o) is not Conv/Gemm/MatMul",
    ),
    "flattened value is a graph output": (
        "o = Flatten (n)\n        y = Gemm (o, W)", {}, "2,5",
        "through Flatten (Flatten:o): output is a graph output",
    ),
    "average pool counts padding": (
        "p = AveragePool <kernel_shape=[3,3], pads=[1,1,1,1], count_include_pad=1> (n)\n"
        "        f = Flatten (p)\n        y = Gemm (f, W)", {}, "2,5", "counts padding",
    ),
    "MaxPool under a negative scale": (
        "p = MaxPool <kernel_shape=[1,1]> (n)\n        f = Flatten (p)\n        y = Gemm (f, W)",
        {}, "2,5", "MaxPool: a scale is not positive",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", FORWARD_DECLINES)
def test_forward_through_flatten_declines_with_reason(case: str) -> None:
    body, extra, y_shape, reason = FORWARD_DECLINES[case]
    extra_out = ", float[2,36] o" if "o = " in body else ""
    shape_in = ", int64[2] shape_in" if "shape_in" in body else ""
    text = f"""{HEADER}
    g (float[2,4,3,3] x{shape_in}) => (float[{y_shape}] y{extra_out}) {{
        r = Relu (x)
        {bn("r", "n")}
        {body}
    }}"""
    tensors = {"W": w(36, 5), "W9": w(9, 5), "W72": w(72, 5), "W2": w(2, 5)}
    tensors.update({k: np.array(v, np.int64) for k, v in extra.items()})
    model = parse(text, **tensors, **stats(4, positive="MaxPool" not in body))
    feeds = random_feeds(model, RNG)
    if shape_in:
        feeds["shape_in"] = np.array([2, 36], np.int64)
    folded, report = bnfold.fold(model)
    folded = bir.to_proto(folded)
    outputs_close(model, folded, feeds)
    rec = report.batchnorms[0]
    assert rec.action == "affine" and reason in rec.reason, rec.reason
    assert "forward: " in rec.reason and count_ops(folded, "Mul") == 1


def test_forward_without_inferred_shapes_declines() -> None:
    """No value_info (only the graph's own shapes): the channel count comes from the BN, the
    Flatten's H*W is unknown, so the fold declines (it once failed with a TypeError)."""
    text = f"""{HEADER}
    g (float[2,4,3,3] x) => (float[2,5] y) {{
        {bn("x", "n")}
        p = MaxPool <kernel_shape=[1,1]> (n)
        f = Flatten (p)
        y = Gemm (f, W)
    }}"""
    model = parse(text, W=w(36, 5), **stats(4))
    model.graph.ClearField("value_info")
    _, report = bnfold.fold(model)
    rec = report.batchnorms[0]
    assert rec.action != "folded" and "Flatten input shape is not (N, C, ...)" in rec.reason
