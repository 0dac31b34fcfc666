"""What every int8 conv kernel shares, whatever its instruction set: the numpy reference, the
compile-time requantize arithmetic and per-channel epilogue constants, the geometry and tile
specs, and the TVMScript macros of the tiled-loop skeleton (zero-point-padded rows, the
accumulator init and the requantize-and-store of a tile).

The per-instruction-set kernels build on it: x86 (AVX2 ``vpmaddwd``, AVX-512 VNNI
``vpdpbusd``) in :mod:`bnfold.targets._int8`, aarch64 (NEON ``smlal``/``sadalp``, ``sdot``) in
:mod:`bnfold.targets._int8_neon`; :func:`bnfold.targets._int8.conv2d_int8` picks one. This
module imports neither, so the kernels form no import cycle.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

LANES = 8  # int32 lanes of a ymm register (the x86 kernels' row vectors; NEON pads to it)
_DTYPES = {"uint8": (0, 255), "int8": (-128, 127)}
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
EP_COLS = 6  # per-channel epilogue constants, see _epilogue_consts


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


# --------------------------------------------------------------------------------------------
# Reference


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


# --------------------------------------------------------------------------------------------
# Compile-time arithmetic


def _requant(acc: int, m: int, s: int, zp: int) -> int:
    return ((acc * m + (1 << (s - 1))) >> s) + zp


def acc_bounds(m: int, s: int, zp: int, qmin: int, qmax: int) -> tuple[int, int]:
    """``(lo, hi)``: the int32 range outside which the output is saturated at qmin / qmax.

    Requantization is nondecreasing in the accumulator (``m > 0``), so clamping the accumulator
    to ``[lo, hi]`` changes no output: ``lo`` is the largest accumulator that still gives
    ``<= qmin`` (or INT32_MIN), ``hi`` the smallest that gives ``>= qmax`` (or INT32_MAX)."""

    def first(pred: Any) -> int:  # smallest a in int32 with pred(a) true (pred monotone), or None
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

    hi = min(first(lambda a: _requant(a, m, s, zp) >= qmax), INT32_MAX)
    above = first(lambda a: _requant(a, m, s, zp) > qmin)  # first a giving > qmin
    lo = max(above - 1, INT32_MIN)
    return lo, hi


def _words(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """int32 words of int16 pairs: low half ``lo``, high half ``hi`` (both int8-ranged)."""
    lo16 = lo.astype(np.int16).view(np.uint16).astype(np.uint32)
    hi16 = hi.astype(np.int16).view(np.uint16).astype(np.uint32)
    return (lo16 | (hi16 << np.uint32(16))).view(np.int32)


def _epilogue_consts(bias: np.ndarray, q: QConv, rows: int) -> np.ndarray:
    """Per output channel (padded to ``rows``), int32 ``[bias, lo, hi, multiplier, shift1,
    shift2]`` (``shift1 + shift2 = shift``, see the module docstring) of ``q``, with ``bias``
    (``q.bias`` or the kernel's adjusted copy). int32 only: the caller wraps the arrays with
    ``relax.const``, which silently narrows int64 arrays to int32."""
    multiplier, shift, out_zero_point, clamp = q.multiplier, q.shift, q.out_zero_point, q.clamp
    ep = np.zeros((rows, EP_COLS), dtype=np.int32)
    ep[:, 3] = 1 << 30
    ep[:, 4] = 1
    for o in range(len(bias)):
        m, s = int(multiplier[o]), int(shift[o])
        lo, hi = acc_bounds(m, s, out_zero_point, *clamp)
        ep[o] = (int(bias[o]), lo, hi, m, min(s, 32), s - min(s, 32))
    return ep


# --------------------------------------------------------------------------------------------
# Planning


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The conv seen by the kernel: a 1x1 stride-1 unpadded conv is one row of H*W pixels."""

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


@dataclasses.dataclass(frozen=True)
class Tile:
    """Register tile: ``obn`` output channels x ``yt`` rows x ``xv`` vectors of 8 columns."""

    obn: int
    yt: int
    xv: int


def _chunks(tasks: int) -> int:
    """Parallel tasks for ``tasks`` independent iterations: enough to balance any thread count
    here, few enough that per-task set-up (workspace allocation) stays negligible."""
    return max(1, min(tasks, 64))


def _finish(func: Any) -> Any:
    return func.with_attr("tirx.is_scheduled", True)


def _padded_rows_macro(
    T: Any, nr: int, hp: int, pt: int, h: int, w: int, rb: int, pl: int, zp: int,
    x_dtype: str, lanes: int,
) -> Any:  # fmt: skip
    """``padded_rows(xf, xb)``: the TVMScript macro writing the ``nr`` zero-point-padded input
    rows (``hp`` per image and channel, ``pt`` above the input, ``pl`` columns left, ``rb``
    bytes each) of the flat NCHW input ``xf`` into ``xb``, rows in parallel chunks."""

    @T.macro
    def padded_rows(xf: Any, xb: Any) -> None:
        for chunk in T.parallel(_chunks(nr)):
            for r in range(chunk * nr // _chunks(nr), (chunk + 1) * nr // _chunks(nr)):
                row = T.Bind(r % hp - pt)
                src = T.Bind(r // hp * h * w + row * w)
                base = T.Bind(r * rb)
                if row >= 0 and row < h:
                    for q in range(pl):
                        xb[base + q] = T.cast(zp, x_dtype)
                    for v in range(w // lanes):
                        xb[T.ramp(base + pl + v * lanes, 1, lanes)] = xf[
                            T.ramp(src + v * lanes, 1, lanes)
                        ]
                    for q in range(w // lanes * lanes, w):
                        xb[base + pl + q] = xf[src + q]
                    for v in range((rb - pl - w) // lanes):
                        xb[T.ramp(base + pl + w + v * lanes, 1, lanes)] = T.broadcast(
                            T.cast(zp, x_dtype), lanes
                        )
                    for q in range((rb - pl - w) // lanes * lanes + pl + w, rb):
                        xb[base + q] = T.cast(zp, x_dtype)
                else:
                    for v in range(rb // lanes):
                        xb[T.ramp(base + v * lanes, 1, lanes)] = T.broadcast(
                            T.cast(zp, x_dtype), lanes
                        )

    return padded_rows


def _tile_macros(
    T: Any,
    obn: int,
    yt: int,
    xv: int,
    lanes: int,
    n_out: int,
    oh: int,
    ow: int,
    out_dtype: str,
    requant: Any,
    bind_acc: bool = False,
) -> tuple[Any, Any]:
    """``(init, store)``: the TVMScript macros every tiled kernel shares, for accumulators
    ``acc[((j * yt + yy) * xv + v) * lanes + lane]`` of channel ``ob * obn + j``, row
    ``y0 + yy``, columns ``x0 + v * lanes + lane``.

    ``init(acc, ep_, ob)`` sets them to the channel's bias; ``store(acc, res, of, ep_, nn, ob,
    y0, x0)`` requantizes each vector (``requant(acc_vector, ep_, o)``) into the local ``res``
    and stores it into the flat NCHW output ``of`` of ``n_out`` channels (a row's tail lane by
    lane; padding channels ``o >= n_out`` skipped). A depthwise kernel is ``obn == 1``.

    ``bind_acc``: the accumulator vector as a let binding. It changes LLVM's instruction
    selection (same results): each kernel keeps the form its speed was measured with."""
    outv = f"{out_dtype}x{lanes}"

    @T.macro
    def init(acc: Any, ep_: Any, ob: Any) -> None:
        for j in T.unroll(obn):
            for i in T.unroll(yt * xv):
                acc[T.ramp((j * yt * xv + i) * lanes, 1, lanes)] = T.broadcast(
                    ep_[ob * obn + j, 0], lanes
                )

    @T.macro
    def store(acc: Any, res: Any, of: Any, ep_: Any, nn: Any, ob: Any, y0: Any, x0: Any) -> None:
        # Straight from the accumulators, before anything else is stored.
        for j in T.unroll(obn):
            for yy in T.unroll(yt):
                for v in T.unroll(xv):
                    o = T.Bind(ob * obn + j)
                    if bind_acc:
                        av = acc[T.ramp(((j * yt + yy) * xv + v) * lanes, 1, lanes)]
                        res[T.ramp(0, 1, lanes)] = T.cast(requant(av, ep_, o), outv)
                    else:
                        res[T.ramp(0, 1, lanes)] = T.cast(
                            requant(acc[T.ramp(((j * yt + yy) * xv + v) * lanes, 1, lanes)],
                                    ep_, o),
                            outv,
                        )  # fmt: skip
                    ob_ = T.Bind(((nn * n_out + o) * oh + y0 + yy) * ow + x0 + v * lanes)
                    if o < n_out:
                        if x0 + v * lanes + lanes <= ow:
                            of[T.ramp(ob_, 1, lanes)] = res[T.ramp(0, 1, lanes)]
                        else:
                            for lane in range(lanes):
                                if x0 + v * lanes + lane < ow:
                                    of[ob_ + lane] = res[lane]

    return init, store
