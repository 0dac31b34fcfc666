"""aarch64 baseline NEON (ARMv8.0-A: ``generic``, ``cortex-a53``, ``cortex-a72``).

Dense convs (``groups == 1``, :func:`dense`): ``smull`` + ``smlal`` on int8 pairs into int16,
``sadalp`` into int32 (:func:`mac`): 16 multiply-adds per 3 instructions. Two products must sum
exactly in int16, which needs ``|w| <= 127``: a weight holding -128 gets None (the caller falls
back to generic Relax ops; a CPU with the dot product uses :mod:`bnfold.targets.int8.sdot`).

Both dense kernels of aarch64 take signed activations: uint8 activations are shifted to int8
(``x - 128``, a flip of the top bit) and the bias absorbs ``128 * sum(w)``.

Depthwise convs (``groups == C == O``, :func:`depthwise`, on every aarch64 target): one
``smlal`` per tap on int16. ``sdot`` would need the taps of one channel as the 4-byte
reduction, i.e. a repack per output column, and is not used there.

Built and checked bit-exactly under qemu only: the speed on real ARM cores is not measured.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from bnfold.targets.int8 import skeleton
from bnfold.targets.int8.skeleton import Isa, Kernel, TileLoop
from bnfold.targets.int8.spec import (
    INT32_MAX,
    INT32_MIN,
    LANES,
    Geometry,
    QConv,
    Tile,
    epilogue_consts,
    shifted_bias,
)

logger = logging.getLogger(__name__)

NEON_LANES = 4  # int32 lanes of a q register
SADDLP = "llvm.aarch64.neon.saddlp.v4i32.v8i16"


def supports(target: Any) -> bool:
    """Whether ``target`` is an aarch64 LLVM target (NEON is part of ARMv8-A)."""
    try:
        if str(target.kind.name) != "llvm":
            return False
        triple = str(target.attrs.get("mtriple", "") or "")
        if not triple:
            import platform

            return platform.machine() in ("aarch64", "arm64")
        return triple.startswith(("aarch64", "arm64"))
    except Exception as e:
        logger.debug("aarch64 check failed: %s", e)
        return False


def mac(T: Any, lanes: int, acc: Any, a: tuple[Any, Any], w: tuple[Any, Any]) -> Any:
    """``acc + sadalp(smull(a0, w0) + smlal(a1, w1))``: two int8x8 operand pairs ``a`` and
    ``w`` (pairs of channels for ``lanes`` columns) widened to int16, their products summed in
    int16 (exact for ``|w| <= 127``), adjacent int16 lanes added into the int32 accumulator."""
    return acc + T.call_llvm_pure_intrin(
        f"int32x{lanes}", SADDLP,
        T.cast(a[0], "int16x8") * T.cast(w[0], "int16x8")
        + T.cast(a[1], "int16x8") * T.cast(w[1], "int16x8"),
    )  # fmt: skip


def to_i8(T: Any, v: Any, shifted: bool) -> Any:
    """A loaded activation as int8: ``x - 128`` for uint8 (flip the top bit), else as is."""
    if shifted:
        return T.cast(T.cast(v, "int32") - 128, "int8")
    return v


def requant_vec4(T: Any, acc: Any, ep_: Any, o: Any, q: QConv) -> Any:
    """The requantize of :mod:`bnfold.targets.int8.spec` of 4 accumulators of channel ``o``
    (its constants: row ``o`` of ``ep_``) in portable vector arithmetic (LLVM's NEON
    lowering)."""
    lo, hi, m, s1, s2 = ep_[o, 1], ep_[o, 2], ep_[o, 3], ep_[o, 4], ep_[o, 5]
    zp, (qmin, qmax) = q.out_zero_point, q.clamp
    n = NEON_LANES
    a = T.max(T.min(acc, T.broadcast(hi, n)), T.broadcast(lo, n))
    rnd = T.shift_left(T.int64(1), T.cast(s1 + s2 - 1, "int64"))
    p = T.cast(a, f"int64x{n}") * T.broadcast(T.cast(m, "int64"), n) + T.broadcast(rnd, n)
    u = T.shift_right(T.cast(p, f"uint64x{n}"), T.broadcast(T.cast(s1, "uint64"), n))
    r = T.shift_right(T.cast(u, f"int32x{n}"), T.broadcast(s2, n)) + T.broadcast(zp, n)
    return T.max(T.min(r, T.broadcast(qmax, n)), T.broadcast(qmin, n))


def neon_requant(T: Any, q: QConv) -> Any:
    """``requant(acc, ep_, o)`` for :func:`skeleton.tile_macros`: :func:`requant_vec4`."""

    def requant(acc: Any, ep_: Any, o: Any) -> Any:
        return requant_vec4(T, acc, ep_, o, q)

    return requant


# --------------------------------------------------------------------------------------------
# Dense conv (groups == 1)


def dense(geo: Geometry, x_dtype: str, q: QConv, tile: Tile | None) -> Kernel | None:
    """``smull`` + ``smlal`` + ``sadalp``, or None for a weight holding -128 (128 * 128 * 2
    overflows the int16 pair sums)."""
    if int(q.weight.min()) < -127:
        logger.debug("int8 conv: weight holds -128 and the target has no dot product")
        return None
    return _dense_planes(geo, x_dtype, q, tile)


def _dense_planes(geo: Geometry, x_dtype: str, q: QConv, tile: Tile | None) -> Kernel:
    """NEON (ARMv8-A baseline, no dot product): ``smull`` + ``smlal`` + ``sadalp``.

    Activations are made int8 (uint8 ``x`` becomes ``x - 128``, the bias takes
    ``128 * sum(w)``), so that two int8 x int8 products (|x * w| <= 128 * 127) sum exactly in
    int16; ``sadalp`` adds adjacent int16 lanes into the int32 accumulators. One step is 4
    output columns x 4 input channels = 16 multiply-adds in 3 instructions (fp32 ``fmla``: 4).

    Layout: channels in quads; per quad two byte planes, ``lo`` holding the pairs
    ``(x[4q], x[4q+1])`` and ``hi`` the pairs ``(x[4q+2], x[4q+3])`` of every column, so that
    8 bytes of a plane are one pair for 4 consecutive columns. The weight of (o, quad, ky, kx)
    is 16 bytes: ``(w0, w1)`` x 4 then ``(w2, w3)`` x 4. ``smull(lo, wlo) + smlal(hi, whi)``
    gives, in int16 lane ``2i + k``, ``x[4q+k, col i] * w_k + x[4q+2+k, col i] * w_{2+k}``."""
    from tvm.script import tirx as T

    N, C, O = geo.n, geo.c, geo.o  # noqa: E741
    KH, KW, SH, SW, DH, DW = geo.kh, geo.kw, geo.sh, geo.sw, geo.dh, geo.dw
    OH, OW = geo.oh, geo.ow
    L = NEON_LANES
    # 32 q registers: 4 x 4 accumulators + 8 d-register operands + 4 weights + temps.
    tile = tile or Tile(4, 1, min(4, -(-OW // L)))
    OBN = tile.obn
    CQ = (C + 3) // 4
    OB = -(-O // OBN)
    loop = TileLoop(geo, tile, L, OB, CQ, KH, KW, q.out_dtype)
    HP = geo.hp
    WQ = loop.nx * tile.xv * L + ((KW - 1) * DW) // SW
    wn = _pack_planes(q.weight, OB, OBN)
    bias = shifted_bias(q, 128 if x_dtype == "uint8" else 0)
    if np.any(np.abs(bias) >= 2**31):
        bias = np.clip(bias, INT32_MIN, INT32_MAX)  # only if the true accumulator overflows
    ep = epilogue_consts(bias.astype(np.int32), q, OB * OBN)

    def wat(ob: Any, cq: Any, ky: Any, kx: Any, j: Any) -> Any:
        """Offset of the 16 weight bytes of (ob*OBN + j, quad cq, ky, kx)."""
        return ((((ob * CQ + cq) * KH + ky) * KW + kx) * OBN + j) * 16

    def step(xq: Any, wf: Any, acc: Any, nn: Any, ob: Any, cq: Any, ky: Any, kx: Any, j: Any,
             y0: Any, yy: Any, x0: Any, v: Any) -> Any:  # fmt: skip
        lo = xq[T.ramp((((nn * CQ + cq) * 2 * HP + (y0 + yy) * SH + ky * DH) * SW
                        + kx * DW % SW) * WQ * 2 + (x0 + v * L + kx * DW // SW) * 2,
                       1, 8)]  # fmt: skip
        hi = xq[T.ramp(((((nn * CQ + cq) * 2 + 1) * HP + (y0 + yy) * SH + ky * DH) * SW
                        + kx * DW % SW) * WQ * 2 + (x0 + v * L + kx * DW // SW) * 2,
                       1, 8)]  # fmt: skip
        at = wat(ob, cq, ky, kx, j)
        return mac(T, L, acc, (lo, hi), (wf[T.ramp(at, 1, 8)], wf[T.ramp(at + 8, 1, 8)]))

    init, store = skeleton.tile_macros(T, OBN, tile.yt, tile.xv, L, O, OH, OW, q.out_dtype,
                                       neon_requant(T, q))  # fmt: skip
    tiles = skeleton.tiled_loop(T, loop, init, store, step)
    repack = _plane_repack(T, geo, x_dtype, q.x_zero_point, HP, WQ)

    # The weight as flat bytes (16 per channel, quad and tap).
    func = skeleton.conv_func(T, geo, x_dtype, q.out_dtype, (wn.shape, "int8"), ep.shape,
                              (N * CQ * 2 * HP * SW * WQ * 2, "int8"), repack, tiles,
                              flat_weight=wn.size)  # fmt: skip
    return func, [wn, ep]


def _pack_planes(weight: np.ndarray, ob: int, obn: int) -> np.ndarray:
    """``(OB, CQ, KH, KW, OBN, 16)`` int8: per (channel, quad, ky, kx) the weight pairs
    ``(w0, w1)`` x 4 then ``(w2, w3)`` x 4, zero beyond O and C."""
    o, c, kh, kw = weight.shape
    cq = (c + 3) // 4
    wpad = np.zeros((ob * obn, 4 * cq, kh, kw), dtype=np.int8)
    wpad[:o, :c] = weight
    wq4 = wpad.reshape(ob * obn, cq, 4, kh, kw).transpose(0, 1, 3, 4, 2)  # (O', CQ, KH, KW, 4)
    lo = np.tile(wq4[..., 0:2], 4)  # (w0, w1) x 4
    hi = np.tile(wq4[..., 2:4], 4)
    wn = np.concatenate([lo, hi], axis=-1).reshape(ob, obn, cq, kh, kw, 16)
    return np.ascontiguousarray(wn.transpose(0, 2, 3, 4, 1, 5))


def _plane_repack(T: Any, geo: Geometry, x_dtype: str, zp: int, hp: int, wq: int) -> Any:
    """``repack(xf, xq)``: stage 1 of :func:`_dense_planes`, the two byte planes of every quad,
    padded (scalar: ARM speed is not measured here; the repack is O(input) against
    O(input * O) for the conv)."""
    N, C, H, W = geo.n, geo.c, geo.h, geo.w
    SW, PT, PL = geo.sw, geo.pt, geo.pl
    CQ, HP, WQ = (C + 3) // 4, hp, wq
    NR = N * CQ * HP
    SHIFTED = x_dtype == "uint8"  # activations made int8: x - 128
    ZPS = zp - (128 if SHIFTED else 0)

    @T.macro
    def repack(xf: Any, xq: Any) -> None:
        for chunk in T.parallel(skeleton.chunks(NR)):
            for r in range(chunk * NR // skeleton.chunks(NR),
                           (chunk + 1) * NR // skeleton.chunks(NR)):  # fmt: skip
                nn = T.Bind(r // (CQ * HP))
                cq = T.Bind(r // HP % CQ)
                row = T.Bind(r % HP - PT)
                for half in range(2):
                    for k in range(2):
                        c = T.Bind(4 * cq + 2 * half + k)
                        for ph in range(SW):
                            for q in range(WQ):
                                col = T.Bind(q * SW + ph - PL)
                                dst = T.Bind(
                                    (((nn * CQ + cq) * 2 + half) * HP + r % HP) * SW * WQ * 2
                                    + (ph * WQ + q) * 2
                                    + k
                                )
                                if c < C and row >= 0 and row < H and col >= 0 and col < W:
                                    xq[dst] = to_i8(T, xf[((nn * C + c) * H + row) * W + col],
                                                    SHIFTED)  # fmt: skip
                                else:
                                    xq[dst] = T.int8(ZPS)

    return repack


# --------------------------------------------------------------------------------------------
# Depthwise conv (groups == C == O), also the sdot targets'


def depthwise(geo: Geometry, x_dtype: str, q: QConv, tile: Tile | None) -> Kernel:
    """NEON depthwise: activations widened to int16, one ``smlal`` (int16 x int16 scalar ->
    int32, 4 lanes) per tap. No pairing trick pays on baseline NEON here (4 multiply-adds per
    instruction, as ``fmla``); the gain over the fp32 conv is the 4x smaller activations and
    staying in integers between the int8 layers. Stage 1 writes the padded image as bytes; a
    stride-2 operand is the even lanes of an 8-byte load (``uzp1``). ``tile`` is not used (2
    vectors x 4 rows)."""
    from tvm.script import tirx as T

    N, C, H, W = geo.n, geo.c, geo.h, geo.w
    KH, KW, SH, SW, DH, DW = geo.kh, geo.kw, geo.sh, geo.sw, geo.dh, geo.dw
    PT, PL, OH, OW = geo.pt, geo.pl, geo.oh, geo.ow
    L = NEON_LANES
    tile = Tile(1, min(4, OH), min(2, -(-OW // L)))
    loop = TileLoop(geo, tile, L, C, 0, KH, KW, q.out_dtype)
    HP = geo.hp
    RB = -(-(SW * loop.nx * tile.xv * L + (KW - 1) * DW + 2 * LANES) // LANES) * LANES
    NR = N * C * HP
    ZP = q.x_zero_point
    wq = np.ascontiguousarray(q.weight[:, 0].astype(np.int32))  # (C, KH, KW)
    ep = epilogue_consts(q.bias, q, C)

    def operand(xb: Any, at: Any) -> Any:
        """int32x4 of 4 output columns' inputs at byte ``at`` (column stride SW)."""
        if SW == 1:
            v = xb[T.ramp(at, 1, L)]
        else:
            v = T.Shuffle([xb[T.ramp(at, 1, SW * L)]], [SW * i for i in range(L)])
        return T.cast(T.cast(v, f"int16x{L}"), f"int32x{L}")

    def step(xb: Any, wq_: Any, acc: Any, nc: Any, c: Any, r: Any, ky: Any, kx: Any, j: Any,
             y0: Any, yy: Any, x0: Any, v: Any) -> Any:  # fmt: skip
        a = operand(xb, (nc * HP + (y0 + yy) * SH + ky * DH) * RB + SW * (x0 + v * L) + kx * DW)
        return acc + a * T.broadcast(T.cast(T.cast(wq_[c, ky, kx], "int16"), "int32"), L)

    init, store = skeleton.tile_macros(T, 1, tile.yt, tile.xv, L, C, OH, OW, q.out_dtype,
                                       neon_requant(T, q))  # fmt: skip
    tiles = skeleton.tiled_loop(T, loop, init, store, step)

    @T.macro
    def padded_rows(xf: Any, xb: Any) -> None:
        for chunk in T.parallel(skeleton.chunks(NR)):
            for r in range(chunk * NR // skeleton.chunks(NR),
                           (chunk + 1) * NR // skeleton.chunks(NR)):  # fmt: skip
                row = T.Bind(r % HP - PT)
                src = T.Bind(r // HP * H * W + row * W)
                base = T.Bind(r * RB)
                for q in range(RB):
                    if row >= 0 and row < H and q >= PL and q < PL + W:
                        xb[base + q] = xf[src + q - PL]
                    else:
                        xb[base + q] = T.cast(ZP, x_dtype)

    func = skeleton.conv_func(T, geo, x_dtype, q.out_dtype, (wq.shape, "int32"), ep.shape,
                              (N * C * HP * RB, x_dtype), padded_rows, tiles)  # fmt: skip
    return func, [wq, ep]


ISA = Isa("neon", NEON_LANES, mac, dense, depthwise)
