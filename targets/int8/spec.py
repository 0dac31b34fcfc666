"""The int8 conv every kernel implements, as data: :class:`QConv` (the frozen spec), the
:class:`Geometry` a kernel sees, the register :class:`Tile`, and the compile-time requantize
arithmetic (the per-channel epilogue constants).

The math (bit-exact; :func:`bnfold.targets.int8.reference.reference_conv2d_int8` is its numpy
statement)::

    xpad = x padded with x_zero_point (the real 0)
    acc[n,o,y,x] = bias[o] + sum_{c in group(o), ky, kx} xpad[n, c, y*sh + ky*dh, x*sw + kx*dw]
                                                        * weight[o, c - c0(o), ky, kx]   (int32)
    v = (int64(acc) * multiplier[o] + 2**(shift[o] - 1)) >> shift[o]        (arithmetic shift)
    out = clip(v + out_zero_point, qmin, qmax)                              (uint8 / int8)

The epilogue constants of a channel are ``[bias, lo, hi, multiplier, shift1, shift2]``:
``[lo, hi]`` is the accumulator range outside which the output saturates anyway
(:func:`acc_bounds`; requantization is monotone, so clamping the accumulator there changes no
output and keeps every later value inside int32), and ``shift1 + shift2 = shift`` with
``shift1 = min(shift, 32)``: a logical 64-bit shift by ``shift1`` (whose low 32 bits equal the
arithmetic shift's) then an arithmetic 32-bit shift by ``shift2``.

Nothing here imports TVM.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

LANES = 8  # int32 lanes of a ymm register (the x86 kernels' row vectors)
DTYPES = {"uint8": (0, 255), "int8": (-128, 127)}
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
EP_COLS = 6  # per-channel epilogue constants, see epilogue_consts


@dataclasses.dataclass(frozen=True, eq=False)
class QConv:
    """One quantized 2-D convolution, all but its input (NCHW): the input's zero point, the
    int8 ``weight`` (OIHW), the int32 ``bias`` (in accumulator units, the ``-z_x sum W``
    correction included), strides, pads (top, left, bottom, right), dilation and groups, the
    fixed-point requantize per output channel (``multiplier`` in ``[2^30, 2^31)``, ``shift``),
    the output's zero point and type, and the ``clamp`` of the output (activations included).

    Every int8 conv kernel and the numpy reference take one; Python ints throughout (a numpy
    scalar would make int64 constants inside the int32 vector code)."""

    x_zero_point: int
    weight: np.ndarray
    bias: np.ndarray
    strides: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]
    groups: int
    multiplier: np.ndarray
    shift: np.ndarray
    out_zero_point: int
    out_dtype: str
    clamp: tuple[int, int]

    def __post_init__(self) -> None:
        for name in ("x_zero_point", "groups", "out_zero_point"):
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("strides", "padding", "dilation", "clamp"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))


@dataclasses.dataclass(frozen=True)
class QAdd:
    """The add of two quantized tensors of one shape, ``Q(DQ(a) + DQ(b))`` (a residual
    connection): each input's type, scale and zero point, the output's scale, zero point and
    type, and the ``clamp`` of the output (a following ReLU: ``lo = max(lo, z_y)``)."""

    a_dtype: str
    a_scale: float
    a_zero_point: int
    b_dtype: str
    b_scale: float
    b_zero_point: int
    y_scale: float
    y_zero_point: int
    out_dtype: str
    clamp: tuple[int, int]


# --------------------------------------------------------------------------------------------
# Geometry


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The conv seen by the kernel (a 1x1 stride-1 unpadded conv is one row of H*W pixels),
    and the NCHW shapes of its input and output tensors."""

    n: int
    c: int
    h: int
    w: int
    o: int
    kh: int
    kw: int
    sh: int
    sw: int
    dh: int
    dw: int
    pt: int
    pl: int
    oh: int
    ow: int
    x_shape: tuple[int, int, int, int]
    out_shape: tuple[int, int, int, int]
    depthwise: bool = False  # groups == C == O (else groups == 1)

    @property
    def hp(self) -> int:
        """Padded input rows the output reads (per image and channel)."""
        return (self.oh - 1) * self.sh + (self.kh - 1) * self.dh + 1


@dataclasses.dataclass(frozen=True)
class Tile:
    """Register tile: ``obn`` output channels x ``yt`` rows x ``xv`` vectors of columns."""

    obn: int
    yt: int
    xv: int


def geometry(x_shape: tuple[int, int, int, int], x_dtype: str, q: QConv) -> Geometry | None:
    """The kernels' view of conv ``q`` on an ``x_shape`` input of ``x_dtype``, or None where no
    kernel applies: types other than 8-bit, an empty output, a requantize outside
    ``1 <= shift <= 62, multiplier > 0``, grouped convs other than depthwise (one input channel
    per output channel)."""
    n, c, h, w = (int(d) for d in x_shape)
    o, cg, kh, kw = (int(d) for d in q.weight.shape)
    (sh, sw), (dh, dw), (pt, pl, pb, pr), groups = q.strides, q.dilation, q.padding, q.groups
    if x_dtype not in DTYPES or q.out_dtype not in DTYPES or q.weight.dtype != np.int8:
        return None
    oh = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow = (w + pl + pr - (kw - 1) * dw - 1) // sw + 1
    if oh < 1 or ow < 1 or min(sh, sw, dh, dw) < 1 or min(pt, pl, pb, pr) < 0:
        return None
    if not (np.all(q.shift >= 1) and np.all(q.shift <= 62) and np.all(q.multiplier > 0)):
        return None
    shapes = ((n, c, h, w), (n, o, oh, ow))
    if groups == 1 and cg == c:
        if kh == kw == 1 and sh == sw == 1 and pt == pl == pb == pr == 0:
            # One long row: no padding, no row tails, fewer partial vectors.
            return Geometry(n, c, 1, h * w, o, 1, 1, 1, 1, 1, 1, 0, 0, 1, h * w, *shapes)
        return Geometry(n, c, h, w, o, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow, *shapes)
    if groups == c == o and cg == 1:
        return Geometry(n, c, h, w, o, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow, *shapes,
                        depthwise=True)  # fmt: skip
    return None


# --------------------------------------------------------------------------------------------
# Compile-time requantize arithmetic


def requant(acc: int, m: int, s: int, zp: int) -> int:
    """The requantized value of accumulator ``acc`` (before the clip)."""
    return ((acc * m + (1 << (s - 1))) >> s) + zp


def acc_bounds(m: int, s: int, zp: int, qmin: int, qmax: int) -> tuple[int, int]:
    """``(lo, hi)``: the int32 range outside which the output is saturated at qmin / qmax.

    Requantization is nondecreasing in the accumulator (``m > 0``), so clamping the accumulator
    to ``[lo, hi]`` changes no output: ``lo`` is the largest accumulator that still gives
    ``<= qmin`` (or INT32_MIN), ``hi`` the smallest that gives ``>= qmax`` (or INT32_MAX)."""

    def first(pred: Any) -> int:  # smallest a in int32 with pred(a) true (pred monotone)
        lo, hi = INT32_MIN, INT32_MAX
        if not pred(hi):
            return INT32_MAX + 1
        while lo < hi:
            mid = (lo + hi) // 2
            if pred(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo

    hi = min(first(lambda a: requant(a, m, s, zp) >= qmax), INT32_MAX)
    above = first(lambda a: requant(a, m, s, zp) > qmin)  # first a giving > qmin
    lo = max(above - 1, INT32_MIN)
    return lo, hi


def epilogue_consts(bias: np.ndarray, q: QConv, rows: int) -> np.ndarray:
    """Per output channel (padded to ``rows``), int32 ``[bias, lo, hi, multiplier, shift1,
    shift2]`` (see the module docstring) of ``q``, with ``bias`` (``q.bias`` or the kernel's
    adjusted copy). int32 only: the caller wraps the arrays with ``relax.const``, which
    silently narrows int64 arrays to int32."""
    multiplier, shift, out_zero_point, clamp = q.multiplier, q.shift, q.out_zero_point, q.clamp
    ep = np.zeros((rows, EP_COLS), dtype=np.int32)
    ep[:, 3] = 1 << 30
    ep[:, 4] = 1
    for o in range(len(bias)):
        m, s = int(multiplier[o]), int(shift[o])
        lo, hi = acc_bounds(m, s, out_zero_point, *clamp)
        ep[o] = (int(bias[o]), lo, hi, m, min(s, 32), s - min(s, 32))
    return ep


def shifted_bias(q: QConv, delta: int) -> np.ndarray:
    """int64 ``bias + delta * sum(w)`` per output channel: the bias of a kernel that feeds the
    activations shifted by ``-delta`` (``x ^ 0x80``: ``delta`` is +-128)."""
    return q.bias.astype(np.int64) + delta * q.weight.astype(np.int64).sum(axis=(1, 2, 3))
