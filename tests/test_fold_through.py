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
