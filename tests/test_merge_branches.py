"""merge_branches: parallel convs (and identity branches) of one tensor summed by Add become one
Conv, and the result matches onnxruntime (optimizations off) at 1e-5 x max|ref|; a sum that cannot
merge is kept, with the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import bnfold
from bnfold import ir as bir
from bnfold.testing import bn_stats, count_ops, outputs_close, parse, random_feeds
from bnfold.testing import reparam as testing_reparam

RNG = np.random.default_rng(2)
HEADER = '<ir_version: 8, opset_import: ["" : 13]>'


def stats(c: int, prefix: str) -> dict[str, np.ndarray]:
    return bn_stats(RNG, c, prefix)


def bn(x: str, y: str, prefix: str) -> str:
    return f"{y} = BatchNormalization ({x}, {prefix}_s, {prefix}_b, {prefix}_m, {prefix}_v)"


def branch(name: str, x: str, c: int, cin_g: int, kernel: tuple[int, int], attrs: str,
           bias: bool, tensors: dict[str, np.ndarray], with_bn: bool = True) -> str:  # fmt: skip
    """``Conv(x) -> BN`` lines producing ``name`` (just the Conv if not ``with_bn``); adds its
    weights to ``tensors``."""
    tensors[f"W_{name}"] = RNG.standard_normal((c, cin_g, *kernel)).astype(np.float32)
    b_in = ""
    if bias:
        tensors[f"B_{name}"] = RNG.standard_normal(c).astype(np.float32)
        b_in = f", B_{name}"
    tensors.update(stats(c, f"bn_{name}"))
    a = f" <{attrs}>" if attrs else ""
    if not with_bn:
        return f"{name} = Conv{a} ({x}, W_{name}{b_in})"
    conv = f"c_{name} = Conv{a} ({x}, W_{name}{b_in})"
    return f"{conv}\n        {bn(f'c_{name}', name, f'bn_{name}')}"


def fold(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bnfold.report.FoldReport]:
    folded, report = bnfold.fold(model)
    folded = bir.to_proto(folded)
    outputs_close(model, folded, random_feeds(model, RNG))
    return folded, report


def block(branches: list[str], identity: str | None, tail: str = "y = Relu (s)") -> str:
    """The Add chain of ``branches`` (+ identity ``x`` or ``BN(x)``), then ``tail``."""
    lines, terms = [], list(branches)
    if identity == "bn":
        lines.append(bn("x", "idn", "bn_id"))
        terms.append("idn")
    elif identity == "plain":
        terms.append("x")
    acc = terms[0]
    for i, t in enumerate(terms[1:], 1):
        out = "s" if i == len(terms) - 1 else f"a{i}"
        lines.append(f"{out} = Add ({acc}, {t})")
        acc = out
    lines.append(tail)
    return "\n        ".join(lines)


# An identity branch only exists at stride 1.
@pytest.mark.parametrize(("identity", "stride"), [("bn", 1), ("plain", 1), (None, 1), (None, 2)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2, 8])
def test_repvgg_block(identity: str | None, stride: int, bias: bool, group: int) -> None:
    """Conv3x3+BN + Conv1x1+BN (+ BN(x) or x when stride 1) -> one 3x3 conv."""
    c, hw = 8, 8
    out = hw // stride
    t: dict[str, np.ndarray] = {}
    s = f"strides=[{stride},{stride}], group={group}"
    convs = [branch("k3", "x", c, c // group, (3, 3), f"pads=[1,1,1,1], {s}", bias, t),
             branch("k1", "x", c, c // group, (1, 1), s, bias, t)]  # fmt: skip
    if identity == "bn":
        t.update(stats(c, "bn_id"))
    text = f"""{HEADER}
    g (float[1,{c},{hw},{hw}] x) => (float[1,{c},{out},{out}] y) {{
        {chr(10).join(convs)}
        {block(["k3", "k1"], identity)}
    }}"""
    folded, report = fold(parse(text, **t))
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu"]
    conv = folded.graph.node[0]
    attrs = {a.name: list(a.ints) for a in conv.attribute if a.ints}
    assert attrs["kernel_shape"] == [3, 3] and attrs["pads"] == [1, 1, 1, 1]
    (rec,) = report.merges
    assert rec.action == "merged" and rec.into == ["Conv:c_k3"]
    assert rec.detail.startswith("conv 3x3 + conv 1x1") and rec.detail.endswith("-> 3x3")


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_acnet_asymmetric_kernels(group: int, bias: bool) -> None:
    """ACNet: 3x3 + 1x3 + 3x1, each with its BN, pads that centre them -> one 3x3."""
    c = 8
    t: dict[str, np.ndarray] = {}
    g = f"group={group}"
    convs = [
        branch(name, "x", c, c // group, k, f"pads={pads}, {g}", bias, t)
        for name, k, pads in [("sq", (3, 3), [1, 1, 1, 1]), ("hor", (1, 3), [0, 1, 0, 1]),
                              ("ver", (3, 1), [1, 0, 1, 0])]
    ]  # fmt: skip
    text = f"""{HEADER}
    g (float[1,{c},7,9] x) => (float[1,{c},7,9] y) {{
        {chr(10).join(convs)}
        {block(["hor", "sq", "ver"], None, "y = Sigmoid (s)")}
    }}"""
    folded, report = fold(parse(text, **t))
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Sigmoid"]
    assert report.merges[0].detail == "conv 1x3 + conv 3x3 + conv 3x1 -> 3x3"


@pytest.mark.parametrize("k", [1, 3])
def test_mobileone_depthwise_block(k: int) -> None:
    """MobileOne: k depthwise 3x3 branches + a depthwise 1x1 'scale' branch + BN(x)."""
    c = 6
    t: dict[str, np.ndarray] = {}
    dw = f"group={c}"
    convs = [branch(f"k{i}", "x", c, 1, (3, 3), f"pads=[1,1,1,1], {dw}", False, t)
             for i in range(k)]  # fmt: skip
    convs.append(branch("scale", "x", c, 1, (1, 1), dw, False, t))
    t.update(stats(c, "bn_id"))
    names = [f"k{i}" for i in range(k)] + ["scale"]
    text = f"""{HEADER}
    g (float[1,{c},5,5] x) => (float[1,{c},5,5] y) {{
        {chr(10).join(convs)}
        {block(names, "bn")}
    }}"""
    folded, report = fold(parse(text, **t))
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu"]
    assert count_ops(folded, "BatchNormalization") == 0
    assert report.merges[0].detail.endswith("identity (Mul+Add) -> 3x3")


def test_dilated_and_off_centre_kernels() -> None:
    """3x3 dilation 2 pad 2 + 1x1 (lands on the centre tap); 2x2 pad (0,0,1,1) + 3x3 pad 1
    (lands on the lower-right 2x2 of the 3x3)."""
    t: dict[str, np.ndarray] = {}
    convs = [branch("d3", "x", 4, 4, (3, 3), "pads=[2,2,2,2], dilations=[2,2]", True, t),
             branch("d1", "x", 4, 4, (1, 1), "dilations=[2,2]", True, t),
             branch("e2", "z", 4, 4, (2, 2), "pads=[0,0,1,1]", True, t),
             branch("e3", "z", 4, 4, (3, 3), "pads=[1,1,1,1]", True, t)]  # fmt: skip
    text = f"""{HEADER}
    g (float[1,4,6,6] x, float[1,4,6,6] z) => (float[1,4,6,6] y, float[1,4,6,6] w) {{
        {chr(10).join(convs)}
        y = Add (d3, d1)
        w = Add (e2, e3)
    }}"""
    folded, report = fold(parse(text, **t))
    assert count_ops(folded, "Conv") == 2 and count_ops(folded, "Add") == 0
    assert [r.detail for r in report.merges] == ["conv 3x3 + conv 1x1 -> 3x3",
                                                 "conv 2x2 + conv 3x3 -> 3x3"]  # fmt: skip
    assert [o.name for o in folded.graph.output] == ["y", "w"]


def test_other_terms_stay_in_the_sum() -> None:
    """(Conv3x3(x) + Conv1x1(x)) + z + x: the branches of x merge, z is added to the result."""
    t: dict[str, np.ndarray] = {}
    convs = [branch("k3", "x", 4, 4, (3, 3), "pads=[1,1,1,1]", True, t),
             branch("k1", "x", 4, 4, (1, 1), "", False, t)]  # fmt: skip
    text = f"""{HEADER}
    g (float[1,4,6,6] x, float[1,4,6,6] z) => (float[1,4,6,6] y) {{
        {chr(10).join(convs)}
        a = Add (k3, k1)
        b = Add (a, z)
        y = Add (b, x)
    }}"""
    folded, report = fold(parse(text, **t))
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Add"]
    assert report.merges[0].detail == "conv 3x3 + conv 1x1 + identity -> 3x3"


def test_identity_term_that_is_a_conv_output() -> None:
    """x = Conv(z); x + Conv3x3(x): x is the identity branch (of x), not a branch of z."""
    t: dict[str, np.ndarray] = {}
    convs = [branch("x", "z", 4, 4, (1, 1), "", True, t),
             branch("k3", "x", 4, 4, (3, 3), "pads=[1,1,1,1]", False, t)]  # fmt: skip
    text = f"""{HEADER}
    g (float[1,4,6,6] z) => (float[1,4,6,6] y) {{
        {chr(10).join(convs)}
        y = Add (x, k3)
    }}"""
    folded, report = fold(parse(text, **t))
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Conv"]
    assert report.merges[0].detail == "identity + conv 3x3 -> 3x3"


@pytest.mark.parametrize("seed", range(12))
def test_random_aligned_geometries_merge_exactly(seed: int) -> None:
    """2-4 branches of random kernel sizes (even ones too), pads, one stride / dilation / group
    count, placed anywhere their windows align (pad_end - window end equal: Add-compatible
    shapes); the merge is exact wherever it happens."""
    rng = np.random.default_rng(seed)
    stride, dil, group = (int(rng.choice(v)) for v in ([1, 2], [1, 2], [1, 2, 4]))
    t: dict[str, np.ndarray] = {}
    lines, names = [], []
    for i in range(int(rng.integers(2, 5))):
        k = [int(v) for v in rng.integers(1, 4, 2)]
        begin = [dil * int(rng.integers(0, kk)) for kk in k]  # on the dilation grid
        end = [dil * (kk - 1) - b for kk, b in zip(k, begin, strict=True)]
        pads = ",".join(map(str, begin + end))
        attrs = (
            f"pads=[{pads}], strides=[{stride},{stride}], dilations=[{dil},{dil}], group={group}"
        )
        lines.append(branch(f"b{i}", "x", 8, 8 // group, tuple(k), attrs, bool(rng.integers(2)), t))
        names.append(f"b{i}")
    out = (9 - 1) // stride + 1
    text = f"""{HEADER}
    g (float[1,8,9,9] x) => (float[1,8,{out},{out}] y) {{
        {chr(10).join(lines)}
        {block(names, None, "y = Relu (s)")}
    }}"""
    folded, report = fold(parse(text, **t))
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu"], report.table()


# body (branches of x summed into s), tensors' (name, shape), words the reason must contain
DECLINES = {
    "groups differ": (
        """c1 = Conv <group=2> (x, Wa)
        c2 = Conv (x, Wb)
        y = Add (c1, c2)""",
        {"Wa": (4, 2, 1, 1), "Wb": (4, 4, 1, 1)},
        "groups differ",
    ),
    "even kernel with a stride, not aligned": (
        """c1 = Conv <strides=[2,2]> (x, Wa)
        c2 = Conv <strides=[2,2], pads=[1,1,1,1]> (x, Wb)
        y = Add (c1, c2)""",
        {"Wa": (4, 4, 2, 2), "Wb": (4, 4, 3, 3)},
        "do not align",
    ),
    "taps between the dilation grid": (
        """c1 = Conv <dilations=[2,2], pads=[1,1,1,1]> (x, Wa)
        c2 = Conv <dilations=[2,2], pads=[2,2,2,2]> (x, Wb)
        y = Add (c1, c2)""",
        {"Wa": (4, 4, 2, 2), "Wb": (4, 4, 3, 3)},
        "not multiples of the dilation",
    ),
    "branch read elsewhere": (
        """c1 = Conv (x, Wa)
        c2 = Conv (x, Wb)
        y = Add (c1, c2)
        r = Relu (c1)""",
        {"Wa": (4, 4, 1, 1), "Wb": (4, 4, 1, 1)},
        "output has other consumers",
    ),
}


@pytest.mark.parametrize("case", DECLINES)
def test_declines_with_reason(case: str) -> None:
    body, shapes, reason = DECLINES[case]
    hw = 4 if "stride" in case else 8
    extra = ", float[1,4,8,8] r" if "elsewhere" in case else ""
    text = f"""{HEADER}
    g (float[1,4,8,8] x) => (float[1,4,{hw},{hw}] y{extra}) {{
        {body}
    }}"""
    model = parse(text, **{k: RNG.standard_normal(s).astype(np.float32) for k, s in shapes.items()})
    folded, report = fold(model)
    (rec,) = report.merges
    assert rec.action == "kept" and reason in rec.reason, rec.reason
    assert count_ops(folded, "Add") == 1 and count_ops(folded, "Conv") == 2
    assert "kept branches" in report.table()


# 1x1 attrs, 1x1 bias, KxK attrs, (C, M, O), expected: merged, or words of the decline reason
SEQUENCES = {
    "bias, unpadded 3x3": ("", True, "strides=[2,2]", (4, 6, 5), None),
    "no bias, padded 3x3": ("", False, "pads=[1,1,1,1]", (4, 6, 5), None),
    "bias, padded 3x3": ("", True, "pads=[1,1,1,1]", (4, 6, 5), "padding"),
    "narrowing 1x1": ("", False, "", (16, 2, 16), "would cost"),
    "strided 1x1": ("strides=[2,2]", False, "", (4, 6, 5), "strides or pads"),
    "grouped 3x3": ("", False, "group=2", (4, 6, 4), "grouped"),
}


@pytest.mark.parametrize("case", SEQUENCES)
def test_conv1x1_then_kxk(case: str) -> None:
    a1, bias, a2, (c, m, o), reason = SEQUENCES[case]
    t: dict[str, np.ndarray] = {}
    group = 2 if "group" in a2 else 1
    text = f"""{HEADER}
    g (float[1,{c},8,8] x) => (float[1,{o},?,?] y) {{
        {branch("p", "x", m, c, (1, 1), a1, bias, t, with_bn=False)}
        {branch("y", "p", o, m // group, (3, 3), a2, True, t)}
    }}"""
    folded, report = fold(parse(text, **t))
    (rec,) = report.merges
    if reason is None:
        assert rec.action == "merged" and rec.detail == "conv 1x1 -> conv 3x3 -> 3x3"
        assert [n.op_type for n in folded.graph.node] == ["Conv"]
    else:
        assert rec.action == "kept" and reason in rec.reason, rec.reason
        assert count_ops(folded, "Conv") == 2


def test_conv1x1_read_elsewhere_is_not_a_sequence() -> None:
    """A 1x1 whose output also feeds a residual Add is a branch point, not a sequence (no
    record); the residual sum itself merges (identity + 1x1)."""
    t: dict[str, np.ndarray] = {}
    text = f"""{HEADER}
    g (float[1,4,6,6] x) => (float[1,4,6,6] y) {{
        {branch("p", "x", 4, 4, (1, 1), "", False, t, with_bn=False)}
        {branch("q", "p", 4, 4, (1, 1), "", False, t, with_bn=False)}
        y = Add (p, q)
    }}"""
    folded, report = fold(parse(text, **t))
    assert count_ops(folded, "Conv") == 2 and count_ops(folded, "Add") == 0
    assert [r.detail for r in report.merges] == ["identity + conv 1x1 -> 1x1"]


def test_diverse_branch_block_1x1_3x3_branch_joins_the_sum() -> None:
    """DBB-like: 3x3 + 1x1 + (1x1 without bias -> 3x3) + x: the sequence merges first, then
    the sum; one conv is left."""
    t: dict[str, np.ndarray] = {}
    lines = [branch("k3", "x", 4, 4, (3, 3), "pads=[1,1,1,1]", True, t),
             branch("k1", "x", 4, 4, (1, 1), "", True, t),
             branch("p", "x", 4, 4, (1, 1), "", False, t, with_bn=False),
             branch("pk", "p", 4, 4, (3, 3), "pads=[1,1,1,1]", True, t)]  # fmt: skip
    text = f"""{HEADER}
    g (float[1,4,7,7] x) => (float[1,4,7,7] y) {{
        {chr(10).join(lines)}
        {block(["k3", "k1", "pk"], "plain")}
    }}"""
    folded, report = fold(parse(text, **t))
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu"]
    assert [r.detail for r in report.merges] == [
        "conv 1x1 -> conv 3x3 -> 3x3",
        "conv 3x3 + conv 1x1 + conv 3x3 + identity -> 3x3",
    ]


def w16(shape: tuple[int, ...]) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float16)


def test_float16_block_and_overflow_declined() -> None:
    """float16 branches merge within the float16 range; two float32 kernels whose sum would come
    within 2**16 of the float32 maximum are declined (fold_bn's overflow bar), the sum kept."""
    text = f"""{HEADER}
    g (float16[1,4,6,6] x, float[1,4,6,6] z) => (float16[1,4,6,6] y, float[1,4,6,6] w) {{
        a = Conv <pads=[1,1,1,1]> (x, Wa, Ba)
        b = Conv (x, Wb)
        y = Add (a, b)
        c = Conv (z, Wc)
        d = Conv (z, Wd)
        w = Add (c, d)
    }}"""
    big = np.full((4, 4, 1, 1), 3e38 * 2.0**-16, np.float32)
    model = parse(text, Wa=w16((4, 4, 3, 3)), Ba=w16((4,)), Wb=w16((4, 4, 1, 1)), Wc=big, Wd=big)
    folded, report = bnfold.fold(model)
    folded = bir.to_proto(folded)
    assert [(r.action, r.into) for r in report.merges] == [("merged", ["Conv:a"]), ("kept", [])]
    assert "within 2**16 of the float32 maximum" in report.merges[1].reason
    assert count_ops(folded, "Conv") == 3 and count_ops(folded, "Add") == 1
    small = {"x": RNG.standard_normal((1, 4, 6, 6)).astype(np.float16),
             "z": RNG.standard_normal((1, 4, 6, 6)).astype(np.float32) * 1e-38}  # fmt: skip
    outputs_close(model, folded, small, rtol=4e-3, atol=1e-3)


# arch -> (BN, Conv) in the export; blocks, each of which must become one Conv.
TORCH_MODELS = {"repvgg": ((15, 12), 6), "mobileone": ((26, 21), 9)}


@pytest.mark.parametrize("arch", TORCH_MODELS)
def test_torch_exported_reparam_models(arch: str, tmp_path: Path) -> None:
    """Small RepVGG-A0-like (blocks 1/2/3) and MobileOne-like (k=2; a stem conv and 8 blocks)
    torch models exported with their BNs: every BN goes and each block becomes one conv."""
    pytest.importorskip("torch")
    if arch == "repvgg":
        model = testing_reparam.repvgg((8, 16, 32), (1, 2, 3), classes=10)
    else:
        model = testing_reparam.mobileone((8, 16), k=2, classes=10)
    path = tmp_path / f"{arch}.onnx"
    testing_reparam.export(model, path, (1, 3, 32, 32))
    original = onnx.load(path)
    folded, report = bnfold.fold(path)
    folded = bir.to_proto(folded)
    (bns, convs), blocks = TORCH_MODELS[arch]
    assert (count_ops(original, "BatchNormalization"), count_ops(original, "Conv")) == (bns, convs)
    after = {op: count_ops(folded, op) for op in ("BatchNormalization", "Conv", "Add")}
    assert after == {"BatchNormalization": 0, "Conv": blocks, "Add": 0}
    assert all(r.action == "merged" for r in report.merges)
    outputs_close(original, folded, random_feeds(original, RNG))
