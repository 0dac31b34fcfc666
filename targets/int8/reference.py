"""numpy references of the int8 kernels: what the tests compare every kernel with, bit for bit
(the conv, the max pool, the float-output dense layer) or to 1 LSB (the add, see
:func:`reference_add_int8`)."""

from __future__ import annotations

import numpy as np

from bnfold.targets.int8.spec import INT32_MAX, INT32_MIN, QAdd, QConv


def reference_conv2d_int8(x: np.ndarray, q: QConv) -> np.ndarray:
    """The exact int8 conv + requantize of ``q`` on ``x``, in numpy (int64 throughout)."""
    x_zero_point, weight, bias, strides = q.x_zero_point, q.weight, q.bias, q.strides
    padding, dilation, groups, multiplier, shift = (
        q.padding, q.dilation, q.groups, q.multiplier, q.shift
    )
    n, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    sh, sw = strides
    dh, dw = dilation
    pt, pl, pb, pr = padding
    xp = np.full((n, c, h + pt + pb, w + pl + pr), x_zero_point, dtype=np.int64)
    xp[:, :, pt : pt + h, pl : pl + w] = x
    oh = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow = (w + pl + pr - (kw - 1) * dw - 1) // sw + 1
    og = o // groups
    acc = np.zeros((n, o, oh, ow), dtype=np.int64)
    w64 = weight.astype(np.int64)
    for g in range(groups):
        xs = xp[:, g * cg : (g + 1) * cg]
        wg = w64[g * og : (g + 1) * og]
        for ky in range(kh):
            for kx in range(kw):
                win = xs[:, :, ky * dh : ky * dh + (oh - 1) * sh + 1 : sh,
                         kx * dw : kx * dw + (ow - 1) * sw + 1 : sw]  # fmt: skip
                acc[:, g * og : (g + 1) * og] += np.einsum("nchw,oc->nohw", win, wg[:, :, ky, kx])
    acc += bias.astype(np.int64)[None, :, None, None]
    assert np.all((acc >= INT32_MIN) & (acc <= INT32_MAX)), "int32 accumulator overflow"
    m = multiplier.astype(np.int64)[None, :, None, None]
    s = shift.astype(np.int64)[None, :, None, None]
    # int64 is exact here: |acc * m| < 2**62 and the rounding term is < 2**62.
    v = (acc * m + (np.int64(1) << (s - 1))) >> s
    return np.clip(v + q.out_zero_point, q.clamp[0], q.clamp[1]).astype(q.out_dtype)



def reference_max_pool2d_int8(
    x: np.ndarray,
    pool: tuple[int, int],
    strides: tuple[int, int],
    padding: tuple[int, int, int, int],
) -> np.ndarray:
    """numpy: ``out[n, c, y, x] = max x[n, c, y*sh + ky - pt, x*sw + kx - pl]`` over the window
    positions inside the input (padding never wins: it is the type's minimum)."""
    kh, kw = pool
    sh, sw = strides
    pt, pl, pb, pr = padding
    n, c, h, w = x.shape
    oh = (h + pt + pb - kh) // sh + 1
    ow = (w + pl + pr - kw) // sw + 1
    lo = np.iinfo(x.dtype).min
    xp = np.full((n, c, h + pt + pb, w + pl + pr), lo, dtype=x.dtype)
    xp[:, :, pt : pt + h, pl : pl + w] = x
    out = np.full((n, c, oh, ow), lo, dtype=x.dtype)
    for ky in range(kh):
        for kx in range(kw):
            win = xp[:, :, ky : ky + (oh - 1) * sh + 1 : sh, kx : kx + (ow - 1) * sw + 1 : sw]
            out = np.maximum(out, win)
    return out


def reference_dense_int8_float(
    x: np.ndarray, x_zero_point: int, weight: np.ndarray, scale: np.ndarray, bias: np.ndarray
) -> np.ndarray:
    """numpy: ``y[n, o] = float32(sum_i (x[n, i] - z_x) * weight[o, i]) * scale[o] + bias[o]``:
    the integer sum exact (int64), then one fused multiply-add rounded once to float32 (as
    LLVM contracts the kernel's multiply and add into ``vfmadd``; computed in float64, whose
    product of two float32 values is exact)."""
    acc = (x.astype(np.int64) - int(x_zero_point)) @ weight.astype(np.int64).T
    y = acc.astype(np.float32).astype(np.float64) * scale.astype(np.float32).reshape(1, -1)
    return (y + bias.astype(np.float32).reshape(1, -1)).astype(np.float32)


def reference_add_int8(a: np.ndarray, b: np.ndarray, q: QAdd) -> np.ndarray:
    """numpy, float32 as onnxruntime computes ``Q(DQ(a) + DQ(b))`` on a QDQ model:
    ``clip(round_half_even((float(a - z_a) * s_a + float(b - z_b) * s_b) / s_y) + z_y, lo, hi)``
    (each operation rounded to float32)."""
    f32 = np.float32
    da = (a.astype(np.int32) - int(q.a_zero_point)).astype(f32) * f32(q.a_scale)
    db = (b.astype(np.int32) - int(q.b_zero_point)).astype(f32) * f32(q.b_scale)
    v = np.rint((da + db) / f32(q.y_scale)) + f32(q.y_zero_point)
    return np.clip(v, q.clamp[0], q.clamp[1]).astype(q.out_dtype)
