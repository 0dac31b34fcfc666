"""Property tests: folding BatchNormalization is exact, for random shapes and BN statistics.

Each example builds a small model as ``onnx.parser`` text, folds it with :func:`bnfold.fold`, and
checks two things:

* the BatchNormalization is gone (folded the expected way, not merely rewritten as Mul+Add);
* the folded float32 model is as close to a float64 ground truth as the original float32 model
  is: ``err(folded) <= 2 * err(original) + floor``, where both errors are measured against the
  same computation done in float64 with numpy from the original's (exact, float32) parameters,
  and ``floor`` is a few float32 ulps of the magnitudes the computation goes through.

The second form is stronger than "folded matches original within a tolerance": with var up to
1e8 and a large mean the float32 original is itself off by far more than 1e-5 relative, and what
matters is that folding adds no error of its own. (onnxruntime's CPU Conv has no float64 kernel,
so the ground truth is computed with numpy, not by running a float64 copy of the model.)

BN statistics are drawn log-uniform: ``scale = gamma / sqrt(var + eps)`` spans 1e-4..1e2 (either
sign) and ``var`` spans 1e-4..1e8, with ``mean`` of the order of ``sqrt(var)``.
"""

from __future__ import annotations

import string

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnfold
from bnfold import ir as bir
from bnfold.check import run_onnxruntime
from bnfold.testing import count_ops, parse

EPS32 = float(np.finfo(np.float32).eps)
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# --------------------------------------------------------------------------------------------
# float64 ground truth (numpy)
# --------------------------------------------------------------------------------------------


def conv64(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int, pad: int, group: int
) -> np.ndarray:
    """N-D convolution (NCHW..., weight (M, C/g, k...)) in float64, with symmetric pads."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    nd = x.ndim - 2
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pad, pad)] * nd)
    kernel = w.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(xp, kernel, axis=tuple(range(2, 2 + nd)))
    win = win[(slice(None), slice(None), *([slice(None, None, stride)] * nd))]
    n, c = x.shape[:2]
    m = w.shape[0]
    out_sp = win.shape[2 : 2 + nd]
    win = win.reshape((n, group, c // group, *out_sp, *kernel))
    wg = w.reshape((group, m // group, c // group, *kernel))
    sp = string.ascii_lowercase[:nd]  # output spatial
    kk = string.ascii_uppercase[:nd]  # kernel
    y = np.einsum(f"ngc{sp}{kk},gmc{kk}->ngm{sp}", win, wg)
    y = y.reshape((n, m, *out_sp))
    if b is not None:
        y = y + np.asarray(b, np.float64).reshape((1, m) + (1,) * nd)
    return y


def bn64(x: np.ndarray, gamma, beta, mean, var, eps: float) -> np.ndarray:
    """Inference BatchNormalization on axis 1 in float64, exactly as the spec writes it."""
    shape = (1, -1) + (1,) * (x.ndim - 2)

    def r(a: np.ndarray) -> np.ndarray:
        return np.asarray(a, np.float64).reshape(shape)

    return (np.asarray(x, np.float64) - r(mean)) / np.sqrt(r(var) + eps) * r(gamma) + r(beta)


def bn_magnitude(x_abs: np.ndarray, gamma, beta, mean, var, eps: float) -> np.ndarray:
    """Element-wise size of the terms a BN adds up: |s|(|x| + |mean|) + |beta|."""
    shape = (1, -1) + (1,) * (x_abs.ndim - 2)
    s = np.abs(np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps))
    return s.reshape(shape) * (
        x_abs + np.abs(np.asarray(mean, np.float64)).reshape(shape)
    ) + np.abs(np.asarray(beta, np.float64)).reshape(shape)


# --------------------------------------------------------------------------------------------
# random BN statistics
# --------------------------------------------------------------------------------------------


def bn_stats(rng: np.random.Generator, c: int, eps: float) -> dict[str, np.ndarray]:
    """gamma, beta, mean, var (float32) with log-uniform scale 1e-4..1e2 and var 1e-4..1e8."""
    var = 10.0 ** rng.uniform(-4, 8, c)
    scale = 10.0 ** rng.uniform(-4, 2, c) * rng.choice([-1.0, 1.0], c)
    gamma = scale * np.sqrt(var + eps)
    mean = rng.standard_normal(c) * np.sqrt(var) * 10.0 ** rng.uniform(-2, 0, c)
    beta = rng.standard_normal(c) * 10.0 ** rng.uniform(-2, 1, c)
    return {
        k: v.astype(np.float32)
        for k, v in {"gamma": gamma, "beta": beta, "mean": mean, "var": var}.items()
    }


def assert_exact_fold(
    original, folded, feeds: dict[str, np.ndarray], ref64: np.ndarray, magnitude: np.ndarray
) -> None:
    """Folded fp32 is no further from the float64 truth than 2x the original fp32, + a floor."""
    (orig,) = run_onnxruntime(original, feeds).values()
    (got,) = run_onnxruntime(bir.to_proto(folded), feeds).values()
    assert got.shape == ref64.shape == orig.shape
    assert np.all(np.isfinite(got)), "folded model gives non-finite values"
    err_orig = float(np.max(np.abs(orig.astype(np.float64) - ref64)))
    err_fold = float(np.max(np.abs(got.astype(np.float64) - ref64)))
    # A few float32 ulps of the largest term the computation goes through: the error that
    # rounding the folded weights and bias once may add however lucky the original was.
    floor = 4 * EPS32 * float(np.max(magnitude)) + 1e-30
    assert err_fold <= 2 * err_orig + floor, (
        f"folded err {err_fold:.3g} vs original err {err_orig:.3g} (floor {floor:.3g}), "
        f"max|ref| {np.max(np.abs(ref64)):.3g}"
    )


# --------------------------------------------------------------------------------------------
# Conv -> BN (backward)
# --------------------------------------------------------------------------------------------


@st.composite
def conv_case(draw):
    c_in = draw(st.integers(1, 16))
    divisors = [d for d in range(1, c_in + 1) if c_in % d == 0]
    group = draw(st.sampled_from(sorted({1, c_in, *divisors})))
    m_per_g = draw(st.integers(1, max(1, 16 // group)))
    k = draw(st.integers(1, 3))
    pad = draw(st.integers(0, 1))
    h = draw(st.integers(max(1, k - 2 * pad), 9))
    w = draw(st.integers(max(1, k - 2 * pad), 9))
    return {
        "c_in": c_in,
        "group": group,
        "m": group * m_per_g,
        "k": k,
        "pad": pad,
        "h": h,
        "w": w,
        "stride": draw(st.integers(1, 2)),
        "bias": draw(st.booleans()),
        "batch": draw(st.integers(1, 2)),
        "eps": draw(st.sampled_from([1e-5, 1e-3, 0.0])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@SETTINGS
@given(conv_case())
def test_conv_bn_fold_is_exact(case):
    rng = np.random.default_rng(case["seed"])
    n, c, m, g, k = case["batch"], case["c_in"], case["m"], case["group"], case["k"]
    stride, pad, eps = case["stride"], case["pad"], case["eps"]
    x = rng.standard_normal((n, c, case["h"], case["w"])).astype(np.float32)
    weights = {"W": rng.standard_normal((m, c // g, k, k)).astype(np.float32)}
    if case["bias"]:
        weights["B"] = rng.standard_normal(m).astype(np.float32)
    stats = bn_stats(rng, m, eps)
    conv_in = "x, W, B" if case["bias"] else "x, W"
    oh, ow = ((d + 2 * pad - k) // stride + 1 for d in (case["h"], case["w"]))
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[{n},{c},{case["h"]},{case["w"]}] x) => (float[{n},{m},{oh},{ow}] y) {{
        c = Conv <group={g}, kernel_shape=[{k},{k}], strides=[{stride},{stride}],
                  pads=[{pad},{pad},{pad},{pad}]> ({conv_in})
        b = BatchNormalization <epsilon={eps!r}> (c, gamma, beta, mean, var)
        y = Relu (b)
    }}
    """
    model = parse(text, **weights, **stats)
    folded, report = bnfold.fold(model)
    assert count_ops(folded, "BatchNormalization") == 0
    assert report.counts()["folded_backward"] == 1, report.table()
    assert count_ops(folded, "Mul") == count_ops(folded, "Add") == 0

    conv = conv64(x, weights["W"], weights.get("B"), stride, pad, g)
    ref64 = np.maximum(bn64(conv, eps=eps, **stats), 0.0)
    mag = bn_magnitude(
        conv64(
            np.abs(x),
            np.abs(weights["W"]),
            np.abs(weights["B"]) if "B" in weights else None,
            stride,
            pad,
            g,
        ),
        eps=eps,
        **stats,
    )
    assert_exact_fold(model, folded, {"x": x}, ref64, mag)


# --------------------------------------------------------------------------------------------
# Gemm / MatMul -> BN (backward)
# --------------------------------------------------------------------------------------------


@st.composite
def matrix_case(draw):
    return {
        "op": draw(st.sampled_from(["Gemm", "MatMul"])),
        "n": draw(st.integers(1, 9)),
        "k": draw(st.integers(1, 16)),
        "c": draw(st.integers(1, 16)),
        "trans_a": draw(st.booleans()),
        "trans_b": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "alpha": draw(st.sampled_from([1.0, 0.5, 2.0])),
        "beta": draw(st.sampled_from([1.0, 0.25, 3.0, 0.0])),
        "eps": draw(st.sampled_from([1e-5, 1e-3])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@SETTINGS
@given(matrix_case())
def test_gemm_matmul_bn_fold_is_exact(case):
    rng = np.random.default_rng(case["seed"])
    n, k, c, eps = case["n"], case["k"], case["c"], case["eps"]
    stats = bn_stats(rng, c, eps)
    a = rng.standard_normal((n, k)).astype(np.float32)
    bmat = rng.standard_normal((k, c)).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    if case["op"] == "Gemm":
        ta, tb = int(case["trans_a"]), int(case["trans_b"])
        x = np.ascontiguousarray(a.T) if ta else a
        weights = {"W": np.ascontiguousarray(bmat.T) if tb else bmat}
        if case["bias"]:
            weights["C"] = bias
        args = "x, W, C" if case["bias"] else "x, W"
        x_shape = f"{x.shape[0]},{x.shape[1]}"
        op = (
            f"c = Gemm <alpha={case['alpha']!r}, beta={case['beta']!r}, transA={ta}, "
            f"transB={tb}> ({args})"
        )
        lin = case["alpha"] * (a.astype(np.float64) @ bmat.astype(np.float64))
        lin_abs = abs(case["alpha"]) * (np.abs(a).astype(np.float64) @ np.abs(bmat))
        if case["bias"]:
            lin = lin + case["beta"] * bias.astype(np.float64)
            lin_abs = lin_abs + abs(case["beta"]) * np.abs(bias)
    else:
        x = a
        weights = {"W": bmat}
        x_shape = f"{n},{k}"
        op = "c = MatMul (x, W)"
        lin = a.astype(np.float64) @ bmat.astype(np.float64)
        lin_abs = np.abs(a).astype(np.float64) @ np.abs(bmat)
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[{x_shape}] x) => (float[{n},{c}] y) {{
        {op}
        b = BatchNormalization <epsilon={eps!r}> (c, gamma, beta, mean, var)
        y = Relu (b)
    }}
    """
    model = parse(text, **weights, **stats)
    folded, report = bnfold.fold(model)
    assert count_ops(folded, "BatchNormalization") == 0
    assert report.counts()["folded_backward"] == 1, report.table()
    assert count_ops(folded, "Mul") == 0
    ref64 = np.maximum(bn64(lin, eps=eps, **stats), 0.0)
    assert_exact_fold(model, folded, {"x": x}, ref64, bn_magnitude(lin_abs, eps=eps, **stats))


# --------------------------------------------------------------------------------------------
# BN -> Conv (forward), no producer to fold into
# --------------------------------------------------------------------------------------------


@st.composite
def forward_case(draw):
    c_in = draw(st.integers(1, 16))
    divisors = [d for d in range(1, c_in + 1) if c_in % d == 0]
    group = draw(st.sampled_from(divisors))
    k = draw(st.integers(1, 3))
    return {
        "c_in": c_in,
        "group": group,
        "m": group * draw(st.integers(1, max(1, 16 // group))),
        "k": k,
        "h": draw(st.integers(k, 9)),
        "w": draw(st.integers(k, 9)),
        "stride": draw(st.integers(1, 2)),
        "bias": draw(st.booleans()),
        "eps": draw(st.sampled_from([1e-5, 1e-3])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@SETTINGS
@given(forward_case())
def test_bn_conv_forward_fold_is_exact(case):
    rng = np.random.default_rng(case["seed"])
    c, m, g, k, stride, eps = (case[key] for key in ("c_in", "m", "group", "k", "stride", "eps"))
    stats = bn_stats(rng, c, eps)
    # Input distributed like the data the BN was trained on: mean + sqrt(var) * noise.
    x = (
        stats["mean"][None, :, None, None]
        + np.sqrt(stats["var"])[None, :, None, None]
        * rng.standard_normal((1, c, case["h"], case["w"]))
    ).astype(np.float32)
    weights = {"W": rng.standard_normal((m, c // g, k, k)).astype(np.float32)}
    if case["bias"]:
        weights["B"] = rng.standard_normal(m).astype(np.float32)
    conv_in = "b, W, B" if case["bias"] else "b, W"
    oh, ow = ((d - k) // stride + 1 for d in (case["h"], case["w"]))
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,{c},{case["h"]},{case["w"]}] x) => (float[1,{m},{oh},{ow}] y) {{
        b = BatchNormalization <epsilon={eps!r}> (x, gamma, beta, mean, var)
        y = Conv <group={g}, kernel_shape=[{k},{k}], strides=[{stride},{stride}]> ({conv_in})
    }}
    """
    model = parse(text, **weights, **stats)
    folded, report = bnfold.fold(model)
    assert count_ops(folded, "BatchNormalization") == 0
    assert report.counts()["folded_forward"] == 1, report.table()
    assert count_ops(folded, "Mul") == count_ops(folded, "Add") == 0

    bn = bn64(x, eps=eps, **stats)
    ref64 = conv64(bn, weights["W"], weights.get("B"), stride, 0, g)
    bias_abs = np.abs(weights["B"]) if "B" in weights else None
    mag = conv64(
        bn_magnitude(np.abs(x).astype(np.float64), eps=eps, **stats),
        np.abs(weights["W"]),
        bias_abs,
        stride,
        0,
        g,
    )
    assert_exact_fold(model, folded, {"x": x}, ref64, mag)


# --------------------------------------------------------------------------------------------
# the float64 reference itself
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [1, 2, 4])
def test_conv64_matches_onnxruntime(group):
    """The numpy ground truth computes what onnxruntime's Conv computes."""
    rng = np.random.default_rng(group)
    x = rng.standard_normal((2, 4, 7, 6)).astype(np.float32)
    w = rng.standard_normal((8, 4 // group, 3, 2)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    model = parse(
        f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,4,7,6] x) => (float[2,8,4,4] y) {{
        y = Conv <group={group}, strides=[2,2], pads=[1,1,1,1]> (x, W, B)
    }}""",
        W=w,
        B=b,
    )
    (got,) = run_onnxruntime(model, {"x": x}).values()
    np.testing.assert_allclose(got, conv64(x, w, b, 2, 1, group), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# MatMul -> Add(bias) -> BN, for every way the bias may broadcast
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bias_shape", [(4,), (1, 4), (4, 1), (1, 1, 4)], ids=["N", "1xN", "Mx1", "1x1xN"]
)
def test_matmul_bias_add_bn_is_exact(bias_shape: tuple[int, ...]):
    """Whatever bnfold decides, the function is unchanged.

    With a bias of shape (1, 1, N) the Add's output has rank 3, so the BN's channel axis 1 is
    the MatMul's *rows*, not its columns; folding it into the MatMul's columns (what
    ``find_site`` does: it takes the MatMul's rank, not the Add's) is wrong whenever M == N.
    """
    rng = np.random.default_rng(sum(bias_shape))
    m, k, n, eps = 4, 3, 4, 1e-5
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    bias = rng.standard_normal(bias_shape).astype(np.float32)
    lin = x.astype(np.float64) @ w + bias
    stats = bn_stats(rng, lin.shape[1], eps)
    out_shape = ",".join(map(str, lin.shape))
    model = parse(
        f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[{m},{k}] x) => (float[{out_shape}] y) {{
        mm = MatMul (x, W)
        a = Add (mm, B)
        n = BatchNormalization <epsilon={eps!r}> (a, gamma, beta, mean, var)
        y = Relu (n)
    }}
    """,
        W=w,
        B=bias,
        **stats,
    )
    folded, _ = bnfold.fold(model)
    assert count_ops(folded, "BatchNormalization") == 0
    ref64 = np.maximum(bn64(lin, eps=eps, **stats), 0.0)
    mag = bn_magnitude(np.abs(x).astype(np.float64) @ np.abs(w) + np.abs(bias), eps=eps, **stats)
    assert_exact_fold(model, folded, {"x": x}, ref64, mag)
