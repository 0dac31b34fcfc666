"""CPU schedules for the CNN families beyond MobileNetV2 / ResNet: prime-width rows (Inception's
17x17 asymmetric kernels, Xception's 19x19), SiLU / sigmoid epilogues, squeeze-excite, padded
pools, global pools, Resize, channel shuffle. Each model is compiled for x86 (and aarch64 under
qemu), compared with onnxruntime (optimizations off), and the rule records checked: every fused
function is scheduled by some rule (none keeps TVM's default loops).
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

from bnfold import runtime
from bnfold.check import run_onnxruntime
from bnfold.lower import compiler as lower
from bnfold.targets import schedule

pytest.importorskip("tvm")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.tvm

RTOL = 1e-4

# Inception-v3's 1x7 / 7x1 pair on a 17-column map, Xception's 1x1 on 19 columns with 24
# channels (half vectors on AVX-512), a 3x3/2 stem onto 149 columns (299 -> 149).
PRIME_ROWS = """
<ir_version: 8, opset_import: ["" : 17]>
prime (float[1, 16, 17, 17] a, float[1, 8, 19, 19] b, float[1, 3, 299, 9] c)
    => (float[1, 32, 17, 17] ya, float[1, 24, 19, 19] yb, float[1, 16, 149, 4] yc) {
    a1 = Conv <kernel_shape = [1, 7], pads = [0, 3, 0, 3]> (a, wa1, ba1)
    a2 = Relu (a1)
    a3 = Conv <kernel_shape = [7, 1], pads = [3, 0, 3, 0]> (a2, wa2, ba2)
    ya = Relu (a3)
    b1 = Conv <kernel_shape = [1, 1]> (b, wb, bb)
    yb = Relu (b1)
    c1 = Conv <kernel_shape = [3, 3], strides = [2, 2]> (c, wc, bc)
    yc = Relu (c1)
}
"""
PRIME_WEIGHTS = {
    "wa1": (16, 16, 1, 7), "ba1": (16,), "wa2": (32, 16, 7, 1), "ba2": (32,),
    "wb": (24, 8, 1, 1), "bb": (24,), "wc": (16, 3, 3, 3), "bc": (16,),
}  # fmt: skip

# EfficientNet / MobileNetV3 blocks: a depthwise conv with a SiLU epilogue, squeeze-excite
# with sigmoid and with hard-sigmoid gates, a HardSwish epilogue.
SQUEEZE_EXCITE = """
<ir_version: 8, opset_import: ["" : 17]>
se (float[1, 16, 12, 12] x, float[1, 24, 8, 8] z)
    => (float[1, 16, 12, 12] y, float[1, 24, 8, 8] v) {
    d = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 16> (x, wd, bd)
    ds = Sigmoid (d)
    s = Mul (d, ds)
    p = GlobalAveragePool (s)
    f1 = Conv <kernel_shape = [1, 1]> (p, w1, b1)
    r1 = Relu (f1)
    f2 = Conv <kernel_shape = [1, 1]> (r1, w2, b2)
    g = Sigmoid (f2)
    y = Mul (s, g)
    e = Conv <kernel_shape = [1, 1]> (z, we, be)
    h = HardSwish (e)
    q = GlobalAveragePool (h)
    f3 = Conv <kernel_shape = [1, 1]> (q, w3, b3)
    hg = HardSigmoid (f3)
    v = Mul (h, hg)
}
"""
SE_WEIGHTS = {
    "wd": (16, 1, 3, 3), "bd": (16,), "w1": (4, 16, 1, 1), "b1": (4,), "w2": (16, 4, 1, 1),
    "b2": (16,), "we": (24, 24, 1, 1), "be": (24,), "w3": (24, 24, 1, 1), "b3": (24,),
}  # fmt: skip

# What no conv / dense rule takes: padded pools (Inception's count_include_pad=0 average),
# global pools, a reduction over the last axis, softmax, Resize, channel shuffle.
LEFTOVERS = """
<ir_version: 8, opset_import: ["" : 17]>
rest (float[1, 8, 17, 15] x, float[1, 12, 9, 10] z) => (float[1, 8, 9, 8] mp,
      float[1, 8, 17, 15] ap, float[1, 8, 1, 1] gp, float[1, 8, 17, 1] rm, float[1, 8, 17, 15] sm,
      float[1, 12, 18, 20] rn, float[1, 12, 18, 20] rb, float[1, 12, 9, 10] cs) {
    mp = MaxPool <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]> (x)
    ap = AveragePool <kernel_shape = [3, 3], pads = [1, 1, 1, 1], count_include_pad = 0> (x)
    gp = GlobalMaxPool (x)
    rm = ReduceMean <axes = [3]> (x)
    sm = Softmax <axis = 3> (x)
    rn = Resize <mode = "nearest"> (z, roi, scales)
    rb = Resize <mode = "linear"> (z, roi, scales)
    t1 = Reshape (z, shape5)
    t2 = Transpose <perm = [0, 2, 1, 3, 4]> (t1)
    cs = Reshape (t2, shape4)
}
"""


def _with_weights(text: str, weights: dict[str, tuple[int, ...]], seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    model = onnx.parser.parse_model(text)
    for name, shape in weights.items():
        arr = rng.standard_normal(shape).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(arr, name))
    return model


def _leftovers() -> onnx.ModelProto:
    model = _with_weights(LEFTOVERS, {}, 0)
    consts = {
        "roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 2], np.float32),
        "shape5": np.array([1, 2, 6, 9, 10], np.int64),
        "shape4": np.array([1, 12, 9, 10], np.int64),
    }  # fmt: skip
    for name, arr in consts.items():
        model.graph.initializer.append(numpy_helper.from_array(arr, name))
    return model


def _compile_and_compare(
    model: onnx.ModelProto, target: str, tmp_path: Path
) -> list[schedule.Match]:
    """Compile ``model`` for ``target``, run it on random inputs, compare with onnxruntime;
    returns what the rules did with each function."""
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    with schedule.recording() as matches:
        lower.compile_model(path, target, tmp_path / target, verify=False, fold=False)
    rng = np.random.default_rng(1)
    feeds = {
        i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(
            np.float32
        )
        for i in model.graph.input
    }
    got = runtime.load(tmp_path / target).run(feeds)
    for name, want in run_onnxruntime(model, feeds).items():
        np.testing.assert_allclose(got[name], want, rtol=RTOL,
                                   atol=RTOL * float(np.abs(want).max()), err_msg=name)  # fmt: skip
    return list(matches)


def _kinds(matches: list[schedule.Match]) -> collections.Counter[str]:
    return collections.Counter(f"{m.rule}:{m.kind}" if m.rule else "unscheduled" for m in matches)


def test_prime_rows_put_output_channels_on_the_lanes(tmp_path: Path) -> None:
    """Rows of 17, 19 and 149 columns have no divisor that fills a vector: their dense convs
    take the channel-lanes tiling (a partial last column tile), also with channels filling
    only half an AVX-512 vector (24); the results match onnxruntime."""
    kinds = _kinds(_compile_and_compare(_with_weights(PRIME_ROWS, PRIME_WEIGHTS, 2), "x86",
                                        tmp_path))  # fmt: skip
    for want in ("conv1x7", "conv7x1", "conv1x1", "conv3x3"):
        assert kinds[f"bnfold_conv:{want} (channel lanes)"] == 1, kinds
    assert "unscheduled" not in kinds


def test_sigmoid_epilogues_are_fused_and_fast(tmp_path: Path) -> None:
    """SiLU after a depthwise conv, squeeze-excite gates (sigmoid, hard-sigmoid) and HardSwish:
    sigmoid runs as ``1 / (1 + fast_exp(-x))`` inside the conv's function; the global pools
    take the generic rule; everything matches onnxruntime."""
    matches = _compile_and_compare(_with_weights(SQUEEZE_EXCITE, SE_WEIGHTS, 3), "x86", tmp_path)
    kinds = _kinds(matches)
    assert "unscheduled" not in kinds, kinds
    assert kinds["bnfold_conv:depthwise"] == 1, kinds
    silu = [m for m in matches if "conv2d" in m.function and "fast_sigmoid" in m.function]
    assert len(silu) >= 2, [m.function for m in matches]  # the SiLU conv and the SE gate
    assert not [m.function for m in matches if "tir_sigmoid" in m.function]
    assert kinds["bnfold_generic:generic"] >= 2, kinds  # both global average pools


@pytest.mark.parametrize("target", ["x86", pytest.param("arm64", marks=pytest.mark.qemu)])
def test_generic_rule_takes_what_no_other_rule_does(target: str, tmp_path: Path) -> None:
    """Pools with padding, global pools, a last-axis reduction, softmax, Resize (nearest and
    linear) and a channel shuffle: no function keeps TVM's default loops, and all match
    onnxruntime."""
    from bnfold.targets import get

    if not get(target).can_run():
        pytest.skip(get(target).can_run().why)
    matches = _compile_and_compare(_leftovers(), target, tmp_path)
    kinds = _kinds(matches)
    assert "unscheduled" not in kinds, [m for m in matches if m.rule is None]
    assert kinds["bnfold_generic:generic"] >= 5, kinds


def test_generic_rule_declines_with_its_reason() -> None:
    """A function with a symbolic extent is declined, and the reason is recorded."""
    import tvm
    from tvm import te

    from bnfold.targets import get

    n = te.var("n", dtype="int64")
    x = te.placeholder((n, 8), "float32", name="x")
    k = te.reduce_axis((0, 8), "k")
    y = te.compute((n,), lambda i: te.sum(x[i, k], axis=k), name="y")
    func = te.create_prim_func([x, y])
    target = tvm.target.Target(get("x86").tvm_target())
    sch, match = schedule.schedule_function(func, target, "sym")
    assert sch is None and match.rule is None
    assert match.kind == "bnfold_generic: symbolic loop extents"


# ConvNeXt's MLP: a Linear on NHWC rows with a bias and an exact (erf) GELU, then a second
# Linear back.
LINEAR_GELU = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[1, 4, 7, 32] x) => (float[1, 4, 7, 32] y) {
    m = MatMul (x, w1)
    a = Add (m, b1)
    d = Div (a, sqrt2)
    e = Erf (d)
    e1 = Add (e, one)
    g = Mul (a, e1)
    h = Mul (g, half)
    m2 = MatMul (h, w2)
    y = Add (m2, b2)
}
"""


def test_linear_on_rows_is_a_register_tiled_gemm_with_fast_gelu(tmp_path: Path) -> None:
    """Both Linears take the matmul rule as row x column-vector tiles (``gemm``) on weights
    packed at compile time; the GELU's erf is vector arithmetic fused into the first one's
    epilogue; the result matches onnxruntime."""
    model = _with_weights(LINEAR_GELU, {"w1": (32, 64), "b1": (64,), "w2": (64, 32),
                                        "b2": (32,)}, 7)  # fmt: skip
    for name, value in (("sqrt2", 2**0.5), ("one", 1.0), ("half", 0.5)):
        model.graph.initializer.append(numpy_helper.from_array(np.float32(value), name))
    matches = _compile_and_compare(model, "x86", tmp_path)
    gemms = [m.function for m in matches if (m.rule, m.kind) == ("bnfold_matmul", "gemm")]
    assert len(gemms) == 2, matches
    assert all("matmul_packed" in f for f in gemms), gemms
    assert any("fast_erf" in f for f in gemms), gemms
    assert "unscheduled" not in _kinds(matches)
