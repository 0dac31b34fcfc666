"""x86 AVX2: ``vpmaddwd`` (``llvm.x86.avx2.pmadd.wd``) multiplies 16 x int16 by 16 x int16 and
sums adjacent pairs into 8 x int32 (:func:`mac`, then a ``vpaddd``).

Every operand is a widened 8-bit value, so each product fits in 16 x 16 -> 32 bits and the pair
sum (< 2 * 255 * 127 + 1) is exact; the int32 accumulation is exact as long as the true
accumulator fits int32, which the contract guarantees. ``vpmaddubsw`` (u8 x s8 -> int16) would
be twice as dense but saturates (255 * 127 * 2 > 32767), so it is not used. One ``vpmaddwd`` +
``vpaddd`` does 16 multiply-adds where an fp32 FMA does 8.

Dense conv (``groups == 1``, :func:`_dense_pairs`): the reduction runs over *pairs* of input
channels. Every pair ``(x[2p], x[2p+1])`` of one pixel is one 32-bit word (two int16 halves,
low = even channel):

* activation, repacked at run time by stage 1 (padding included, the zero point as border
  value, stride phases split so that every load is contiguous)::

      xw[n, p, row, phase, q]   int32 word,   input column = q * sw + phase - pad_left

* weight, packed at compile time: ``wq[ob, p, ky, kx, j]`` = the word of
  ``(weight[ob*OBN + j, 2p], weight[ob*OBN + j, 2p+1])`` (zero rows/halves beyond O and C).

The vector lanes run along the output *row* (8 consecutive output columns, so results are
stored straight into NCHW). For each (pair, ky, kx) a tile loads ``YT * XV`` activation vectors
(16 x int16: 8 columns x 2 channels) and broadcasts ``OBN`` weight words (``vpbroadcastd``: the
same channel pair for every column), so that ``vpmaddwd(a, b)`` lane ``i`` is
``x[2p, col_i] * w[o, 2p] + x[2p+1, col_i] * w[o, 2p+1]``.

Few odd input channels (an RGB input, :func:`_dense_taps`): taps ``kx`` and ``kx + 1`` of one
kernel row are paired instead, as in the depthwise kernel, with a reduction over the channels.

Depthwise (``groups == C == O``, :func:`depthwise`): the pairs run along the kernel row: taps
``kx`` and ``kx + 1`` are one ``vpmaddwd`` (an odd last tap is paired with a zero weight), so a
3x3 conv is 6 ``vpmaddwd`` per 8 outputs. With dilation 1 stage 1 only writes the padded image
as bytes and the tiles build their operands from it: stride 2, the pairs ``(xpad[2x + kx],
xpad[2x + kx + 1])`` of 8 columns are 16 adjacent bytes (one widening load, ``vpmovzxbw``);
stride 1, 9 bytes duplicated into pairs by one ``vpshufb``, then widened. A tile is one channel
x ``YT`` rows x 1 vector (rows share operands: row y+1's tap ky is row y's tap ky+1). Dilated
depthwise convs use repacked pair words like the dense conv.

The epilogue (:func:`requant_vec`, also the AVX-512 VNNI kernels'): clamp the accumulator (see
:mod:`bnfold.targets.int8.spec`), multiply to int64 (``vpmuldq`` on the even and odd lanes in
place), add the rounding term, the two shifts, add the zero point, clip, narrow, store.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from bnfold.targets.int8 import skeleton
from bnfold.targets.int8.skeleton import Isa, Kernel, TileLoop
from bnfold.targets.int8.spec import LANES, Geometry, QConv, Tile, epilogue_consts

logger = logging.getLogger(__name__)

PMADDWD = "llvm.x86.avx2.pmadd.wd"
PAIRS = [i // 2 + i % 2 for i in range(2 * LANES)]  # 0, 1, 1, 2, 2, ..., 7, 8


def supports(target: Any) -> bool:
    """Whether ``target`` is an x86-64 LLVM target whose CPU has AVX2."""
    try:
        from tvm.target import codegen

        if str(target.kind.name) != "llvm":
            return False
        triple = str(target.attrs.get("mtriple", "") or "")
        if triple and not triple.startswith(("x86_64", "i686", "i386")):
            return False
        if not triple:
            import platform

            if platform.machine() not in ("x86_64", "AMD64"):
                return False
        return bool(codegen.target_has_features("avx2", target))
    except Exception as e:  # an LLVM without the query: do not accelerate
        logger.debug("AVX2 check failed: %s", e)
        return False


def mac(T: Any, lanes: int, acc: Any, a: Any, w: Any) -> Any:
    """``acc + vpmaddwd(a, w)``: int16x16 operands, pairs of products summed into int32x8."""
    return acc + T.call_llvm_pure_intrin(f"int32x{lanes}", PMADDWD, a, w)


def choose_tile(o: int, oh: int, ow: int, kw: int = 1) -> Tile:
    """The register tile with the least padded work per useful multiply-add.

    ymm budget: ``obn*yt*xv`` accumulators + the activation vectors or weight broadcasts of one
    step (the smaller set stays live) + 2 temporaries <= 16. Efficiency grows with the number of
    accumulators (each load and loop step is shared by more ``vpmaddwd``). With a kernel row
    unrolled (``kw > 1``) LLVM keeps operands across taps and spills above 8 accumulators
    (measured: 3x3 64ch 56x56 1.6 ms with 8, 2.0 ms with 12), and 4 channels x 2 positions
    beat 8 channels x 1 (3x3 512ch 7x7: 2.0 vs 2.6 ms)."""
    best: tuple[float, Tile] | None = None
    vecs = -(-ow // LANES)
    limit = 12 if kw == 1 else 8
    for obn in (1, 2, 3, 4, 6, 8, 12) if kw == 1 else (1, 2, 3, 4):
        # Rows before columns on ties (measured: 4 x 2 rows beats 4 x 2 vectors, 3x3 convs).
        for yt in range(min(oh, 4), 0, -1):
            for xv in range(1, min(vecs, 4) + 1):
                acc = obn * yt * xv
                if acc > limit or acc + min(obn, yt * xv) + 2 > 16:
                    continue
                # The last row tile overlaps the one before it when yt does not divide oh.
                work = (-(-o // obn) * obn) * (-(-oh // yt) * yt) * (-(-vecs // xv) * xv)
                # Per step: acc x (vpmaddwd + vpaddd) + yt*xv loads + obn broadcasts; the
                # activation loads weigh double (measured: 4 channels x 2 rows beat 2 x 2 x 2).
                cost = work * (2 * acc + 2 * yt * xv + obn + 1) / acc
                if best is None or cost < best[0]:
                    best = (cost, Tile(obn, yt, xv))
    assert best is not None
    return best[1]


def pair_words(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """int32 words of int16 pairs: low half ``lo``, high half ``hi`` (both int8-ranged)."""
    lo16 = lo.astype(np.int16).view(np.uint16).astype(np.uint32)
    hi16 = hi.astype(np.int16).view(np.uint16).astype(np.uint32)
    return (lo16 | (hi16 << np.uint32(16))).view(np.int32)


def _word_fns(T: Any, signed: bool) -> tuple[Any, Any]:
    """``(word, wordv)``: the int32 word (scalar, int32x8) of two widened 8-bit values, low
    half ``lo``, high half ``hi`` (an int8 ``lo`` masked to its 16 bits)."""

    def word(lo: Any, hi: Any) -> Any:
        if signed:
            return (lo & 0xFFFF) | (hi << 16)
        return lo | (hi << 16)

    def wordv(lo: Any, hi: Any) -> Any:
        if signed:
            return (lo & T.broadcast(0xFFFF, LANES)) | (hi << T.broadcast(16, LANES))
        return lo | (hi << T.broadcast(16, LANES))

    return word, wordv


def _taps_fn(T: Any, sw: int) -> Any:
    """``taps(xb, at)``: the int16x16 operand of a tap pair for 8 output columns, widened from
    the padded bytes at ``at`` (stride 2: 16 adjacent bytes; stride 1: 9, duplicated)."""

    def taps(xb: Any, at: Any) -> Any:
        v = xb[T.ramp(at, 1, 2 * LANES)]
        return T.cast(v if sw == 2 else T.Shuffle([v], PAIRS), "int16x16")

    return taps


# --------------------------------------------------------------------------------------------
# Epilogue (also the AVX-512 VNNI kernels')


def requant_vec(T: Any, acc: Any, ep_: Any, o: Any, q: QConv, lanes: int = LANES) -> Any:
    """int32 x ``lanes`` output values of int32 x ``lanes`` accumulators (bias included) of
    channel ``o`` (its epilogue constants: row ``o`` of ``ep_``), exactly as
    :mod:`bnfold.targets.int8.spec` says: clamp, int64 multiply + round, the two shifts, clip.

    Written on the even and odd int32 lanes as 4 x int64 each (``vpmuldq`` multiplies the
    sign-extended low halves of int64 lanes), so that no lane is moved before the end: the even
    results are shifted right by ``s1`` (their low 32 bits stay in place), the odd ones left by
    ``32 - s1`` (the same 32 bits land in the high half), and one ``vpblendd`` merges them.

    ``big``: every channel shifts by >= 32 (the usual case: scales below 1). Then
    ``|acc * m| / 2**shift < 2**30`` for any int32 accumulator, so the clamp is not needed,
    ``s1`` is 32 and the odd lanes need no shift at all."""
    lo, hi, m, s1, s2 = ep_[o, 1], ep_[o, 2], ep_[o, 3], ep_[o, 4], ep_[o, 5]
    zp, (qmin, qmax), big = q.out_zero_point, q.clamp, bool(np.all(q.shift >= 32))
    if big:
        s1 = 32
    a = acc if big else T.max(T.min(acc, T.broadcast(hi, lanes)), T.broadcast(lo, lanes))
    half = lanes // 2
    a64 = T.reinterpret(f"int64x{half}", a)
    c32 = T.broadcast(T.int64(32), half)
    even = T.shift_right(T.shift_left(a64, c32), c32)  # sign-extended even lanes
    odd = T.shift_right(a64, c32)  # sign-extended odd lanes
    mv = T.broadcast(T.cast(m, "int64"), half)
    rnd = T.broadcast(T.shift_left(T.int64(1), T.cast(s1 + s2 - 1, "int64")), half)
    pe = even * mv + rnd
    po = odd * mv + rnd
    re = T.reinterpret(
        f"int32x{lanes}",
        T.shift_right(T.cast(pe, f"uint64x{half}"), T.broadcast(T.cast(s1, "uint64"), half)),
    )
    ro = T.reinterpret(
        f"int32x{lanes}",
        po if big else T.shift_left(po, T.broadcast(T.cast(32 - s1, "int64"), half)),
    )
    merged = T.Shuffle([re, ro], [i + lanes * (i % 2) for i in range(lanes)])
    r = T.shift_right(merged, T.broadcast(s2, lanes)) + T.broadcast(zp, lanes)
    return T.max(T.min(r, T.broadcast(qmax, lanes)), T.broadcast(qmin, lanes))


def x86_requant(T: Any, q: QConv, lanes: int = LANES) -> Any:
    """``requant(acc, ep_, o)`` for :func:`skeleton.tile_macros`: :func:`requant_vec`."""

    def requant(acc: Any, ep_: Any, o: Any) -> Any:
        return requant_vec(T, acc, ep_, o, q, lanes)

    return requant


# --------------------------------------------------------------------------------------------
# Dense conv (groups == 1)


def dense(geo: Geometry, x_dtype: str, q: QConv, tile: Tile | None) -> Kernel:
    """Pairs of kernel taps for few odd input channels (an RGB input: 3 channels x 7x7 is 84
    ``vpmaddwd`` per step, not 98), else pairs of channels."""
    kp = (geo.kw + 1) // 2
    if geo.dw == 1 and geo.sw in (1, 2) and geo.kw > 1 and geo.c * kp <= (geo.c + 1) // 2 * geo.kw:
        return _dense_taps(geo, x_dtype, q, tile)
    return _dense_pairs(geo, x_dtype, q, tile or choose_tile(geo.o, geo.oh, geo.ow, geo.kw))


def _pair_repack(T: Any, geo: Geometry, x_dtype: str, zp: int, hp: int, wq: int) -> Any:
    """``repack(xf, xw)``: stage 1 of :func:`_dense_pairs`, the channel-pair words of every
    padded input row, stride phases split (rows in up to 64 parallel chunks)."""
    N, C, H, W = geo.n, geo.c, geo.h, geo.w
    SW, PT, PL = geo.sw, geo.pt, geo.pl
    CP, HP, WQ, ZP = (C + 1) // 2, hp, wq, zp
    NR = N * CP * HP
    # Padded input row as bytes (strided repack), long enough for the last 16-byte load.
    RWD = -(-(SW * WQ + SW + 2 * LANES) // LANES) * LANES
    ZPW = int(pair_words(np.array([ZP]), np.array([ZP]))[0])
    word, wordv = _word_fns(T, x_dtype == "int8")
    row_copy = skeleton.row_copy_macro(T, W, PL, RWD, ZP, x_dtype, LANES)

    @T.macro
    def unit_stride(xf: Any, xw: Any, base: Any, c0: Any, c1: Any, row: Any) -> None:
        for q in range(PL):
            xw[base + q] = ZPW
        for v in range(W // LANES):
            at = row * W + v * LANES
            lo = T.Bind(T.cast(xf[T.ramp(c0 + at, 1, LANES)], "int32x8"))
            hi = T.Bind(T.cast(xf[T.ramp(c1 + at, 1, LANES)], "int32x8"))
            xw[T.ramp(base + PL + v * LANES, 1, LANES)] = wordv(lo, hi)
        for q in range(W // LANES * LANES, W):
            xw[base + PL + q] = word(
                T.cast(xf[c0 + row * W + q], "int32"),
                T.cast(xf[c1 + row * W + q], "int32"),
            )
        for q in range(PL + W, WQ):
            xw[base + q] = ZPW

    def stride2(rowb: Any, ph: Any, v: Any) -> Any:
        """A 16-byte load widened to int16 has the even columns in its int32 lanes' low
        halves."""
        return (
            T.reinterpret("int32x8", T.cast(
                rowb[T.ramp(ph + v * 2 * LANES, 1, 2 * LANES)], "int16x16"
            )) & T.broadcast(0xFFFF, LANES)
        ) | (T.reinterpret("int32x8", T.cast(
            rowb[T.ramp(RWD + ph + v * 2 * LANES, 1, 2 * LANES)], "int16x16"
        )) << T.broadcast(16, LANES))  # fmt: skip

    @T.macro
    def strided(xf: Any, xw: Any, rowb: Any, base: Any, c0: Any, c1: Any, row: Any) -> None:
        # Both channels' padded rows as bytes, then 8 words per step from unconditional loads.
        for k in T.unroll(2):
            src = T.Bind(T.if_then_else(k == 0, c0, c1) + row * W)
            row_copy(rowb, k * RWD, xf, src)
        for ph in range(SW):
            for v in range(WQ // LANES):
                if SW == 2:
                    xw[T.ramp(base + ph * WQ + v * LANES, 1, LANES)] = stride2(rowb, ph, v)
                else:
                    xw[T.ramp(base + ph * WQ + v * LANES, 1, LANES)] = wordv(
                        T.cast(rowb[T.ramp(ph + v * SW * LANES, SW, LANES)], "int32x8"),
                        T.cast(rowb[T.ramp(RWD + ph + v * SW * LANES, SW, LANES)], "int32x8"),
                    )
            for q in range(WQ // LANES * LANES, WQ):
                xw[base + ph * WQ + q] = word(
                    T.cast(rowb[q * SW + ph], "int32"),
                    T.cast(rowb[RWD + q * SW + ph], "int32"),
                )

    @T.macro
    def repack(xf: Any, xw: Any) -> None:
        for chunk in T.parallel(skeleton.chunks(NR)):
            rowb = T.alloc_buffer((2 * RWD + LANES,), x_dtype, scope="local")
            for r in range(chunk * NR // skeleton.chunks(NR),
                           (chunk + 1) * NR // skeleton.chunks(NR)):  # fmt: skip
                nn = T.Bind(r // (CP * HP))
                cp = T.Bind(r // HP % CP)
                row = T.Bind(r % HP - PT)
                c0 = T.Bind((nn * C + 2 * cp) * H * W)
                # An odd C's last pair reads channel C-1 twice; its weight half is zero.
                c1 = T.Bind((nn * C + T.min(2 * cp + 1, C - 1)) * H * W)
                base = T.Bind(r * SW * WQ)
                if row < 0 or row >= H:
                    for q in range(SW * WQ):
                        xw[base + q] = ZPW
                elif SW == 1:
                    unit_stride(xf, xw, base, c0, c1, row)
                else:
                    strided(xf, xw, rowb, base, c0, c1, row)

    return repack


def _dense_pairs(geo: Geometry, x_dtype: str, q: QConv, tile: Tile) -> Kernel:
    """Pairs of input channels, ``vpmaddwd`` on their words (see the module docstring)."""
    from tvm.script import tirx as T

    N, C, O = geo.n, geo.c, geo.o  # noqa: E741
    KH, KW, SH, SW, DH, DW = geo.kh, geo.kw, geo.sh, geo.sw, geo.dh, geo.dw
    OH, OW = geo.oh, geo.ow
    OBN = tile.obn
    CP = (C + 1) // 2
    OB = -(-O // OBN)
    loop = TileLoop(geo, tile, LANES, OB, CP, KH, KW, q.out_dtype)
    # Repacked activation: rows needed by the output, columns by the padded output width.
    HP = geo.hp
    WQ = loop.nx * tile.xv * LANES + ((KW - 1) * DW) // SW
    XSIZE = N * CP * HP * SW * WQ

    # Weight words: (OB, CP, KH, KW, OBN), zero beyond O and C.
    wpad = np.zeros((OB * OBN, 2 * CP, KH, KW), dtype=np.int8)
    wpad[:O, :C] = q.weight
    words = pair_words(wpad[:, 0::2], wpad[:, 1::2])  # (OB*OBN, CP, KH, KW)
    wq = np.ascontiguousarray(words.reshape(OB, OBN, CP, KH, KW).transpose(0, 2, 3, 4, 1))
    ep = epilogue_consts(q.bias, q, OB * OBN)

    repack = _pair_repack(T, geo, x_dtype, q.x_zero_point, HP, WQ)
    init, store = skeleton.tile_macros(T, OBN, tile.yt, tile.xv, LANES, O, OH, OW, q.out_dtype,
                                       x86_requant(T, q), bind_acc=True)  # fmt: skip

    def step(xw: Any, wq_: Any, acc: Any, nn: Any, ob: Any, cp: Any, ky: Any, kx: Any, j: Any,
             y0: Any, yy: Any, x0: Any, v: Any) -> Any:  # fmt: skip
        a = xw[T.ramp(((((nn * CP + cp) * HP + (y0 + yy) * SH + ky * DH) * SW
                         + kx * DW % SW) * WQ) + x0 + v * LANES + kx * DW // SW,
                       1, LANES)]  # fmt: skip
        w = T.broadcast(wq_[ob, cp, ky, kx, j], LANES)
        return mac(T, LANES, acc, T.reinterpret("int16x16", a), T.reinterpret("int16x16", w))

    tiles = skeleton.tiled_loop(T, loop, init, store, step)

    func = skeleton.conv_func(T, geo, x_dtype, q.out_dtype, (wq.shape, "int32"), ep.shape,
                              (XSIZE, "int32"), repack, tiles)  # fmt: skip
    return func, [wq, ep]


# --------------------------------------------------------------------------------------------
# Dense conv with few input channels: pairs of kernel taps (dilation 1, stride <= 2)


def _dense_taps(geo: Geometry, x_dtype: str, q: QConv, tile: Tile | None) -> Kernel:
    """The depthwise scheme (taps ``kx``, ``kx + 1`` paired, operands widened straight from the
    padded bytes) with a reduction over the input channels and ``OBN`` output channels per
    tile (weight words ``wq[ob, c, ky, kp, j]``)."""
    from tvm.script import tirx as T

    N, C, H, W, O = geo.n, geo.c, geo.h, geo.w, geo.o  # noqa: E741
    KH, KW, SH, SW, DH = geo.kh, geo.kw, geo.sh, geo.sw, geo.dh
    OH, OW = geo.oh, geo.ow
    KP = (KW + 1) // 2
    tile = tile or choose_tile(O, OH, OW, KW)
    OBN = tile.obn
    OB = -(-O // OBN)
    loop = TileLoop(geo, tile, LANES, OB, C, KH, KP, q.out_dtype)
    HP = geo.hp
    RB = -(-(SW * loop.nx * tile.xv * LANES + 2 * KP + 2 * LANES) // LANES) * LANES
    XB = N * C * HP * RB

    wpad = np.zeros((OB * OBN, C, KH, 2 * KP), dtype=np.int8)
    wpad[:O, :, :, :KW] = q.weight
    words = pair_words(wpad[..., 0::2], wpad[..., 1::2])  # (O', C, KH, KP)
    wq = np.ascontiguousarray(words.reshape(OB, OBN, C, KH, KP).transpose(0, 2, 3, 4, 1))
    ep = epilogue_consts(q.bias, q, OB * OBN)
    taps = _taps_fn(T, SW)

    def step(xb: Any, wq_: Any, acc: Any, nn: Any, ob: Any, c: Any, ky: Any, kp: Any, j: Any,
             y0: Any, yy: Any, x0: Any, v: Any) -> Any:  # fmt: skip
        a = taps(xb, ((nn * C + c) * HP + (y0 + yy) * SH + ky * DH) * RB
                 + SW * (x0 + v * LANES) + 2 * kp)  # fmt: skip
        return mac(T, LANES, acc, a,
                   T.reinterpret("int16x16", T.broadcast(wq_[ob, c, ky, kp, j], LANES)))

    init, store = skeleton.tile_macros(T, OBN, tile.yt, tile.xv, LANES, O, OH, OW, q.out_dtype,
                                       x86_requant(T, q))  # fmt: skip
    tiles = skeleton.tiled_loop(T, loop, init, store, step)
    padded_rows = skeleton.padded_rows_macro(T, N * C * HP, HP, geo.pt, H, W, RB, geo.pl,
                                             q.x_zero_point, x_dtype, LANES)  # fmt: skip

    # Stage 1: the padded rows as bytes (zero point outside the input).
    func = skeleton.conv_func(T, geo, x_dtype, q.out_dtype, (wq.shape, "int32"), ep.shape,
                              (XB, x_dtype), padded_rows, tiles)  # fmt: skip
    return func, [wq, ep]


# --------------------------------------------------------------------------------------------
# Depthwise conv (groups == C == O)


def depthwise(geo: Geometry, x_dtype: str, q: QConv, tile: Tile | None) -> Kernel:
    """Tap pairs of a kernel row per ``vpmaddwd``: read from the padded bytes (dilation 1,
    stride 1 or 2), else from repacked pair words (see the module docstring)."""
    from tvm.script import tirx as T

    N, C, H, W = geo.n, geo.c, geo.h, geo.w
    KH, KW, SH, SW, DH, DW = geo.kh, geo.kw, geo.sh, geo.sw, geo.dh, geo.dw
    OH, OW = geo.oh, geo.ow
    KP = (KW + 1) // 2  # tap pairs per kernel row
    if tile is None:
        # One column vector, several rows: rows share operands (row y+1's tap ky is row y's
        # tap ky+1), and no row is padded to a multiple of 2 vectors (measured best).
        tile = Tile(1, min(8 if SH == 1 else 4, OH), 1)
    tile = Tile(1, tile.yt, tile.xv)
    loop = TileLoop(geo, tile, LANES, C, 0, KH, KP, q.out_dtype)
    HP = geo.hp

    wpad = np.zeros((C, KH, 2 * KP), dtype=np.int8)
    wpad[:, :, :KW] = q.weight[:, 0]
    wq = np.ascontiguousarray(pair_words(wpad[:, :, 0::2], wpad[:, :, 1::2]))  # (C, KH, KP)
    ep = epilogue_consts(q.bias, q, C)
    init, store = skeleton.tile_macros(T, 1, tile.yt, tile.xv, LANES, C, OH, OW, q.out_dtype,
                                       x86_requant(T, q))  # fmt: skip

    def weight(wq_: Any, c: Any, ky: Any, kp: Any) -> Any:
        return T.reinterpret("int16x16", T.broadcast(wq_[c, ky, kp], LANES))

    # Dilation 1, stride 1 or 2: the tiles read the padded bytes directly. Stride 2: taps
    # (u, u+1) of 8 output columns are 16 adjacent bytes, one widening load; stride 1: 9 bytes,
    # duplicated into pairs by one byte shuffle, then widened.
    if SW in (1, 2) and DW == 1:
        # No words at all: the padded image as bytes, read by the tiles with widening loads.
        RB = -(-(SW * loop.nx * tile.xv * LANES + 2 * KP + 2 * LANES) // LANES) * LANES
        taps = _taps_fn(T, SW)

        def step_bytes(xb: Any, wq_: Any, acc: Any, nc: Any, c: Any, r: Any, ky: Any, kp: Any,
                       j: Any, y0: Any, yy: Any, x0: Any, v: Any) -> Any:  # fmt: skip
            a = taps(xb, (nc * HP + (y0 + yy) * SH + ky * DH) * RB
                     + SW * (x0 + v * LANES) + 2 * kp)  # fmt: skip
            return mac(T, LANES, acc, a, weight(wq_, c, ky, kp))

        tiles = skeleton.tiled_loop(T, loop, init, store, step_bytes)
        stage1 = skeleton.padded_rows_macro(T, N * C * HP, HP, geo.pt, H, W, RB, geo.pl,
                                            q.x_zero_point, x_dtype, LANES)  # fmt: skip
        xsize, xtype = N * C * HP * RB, x_dtype
    else:
        WQ = loop.nx * tile.xv * LANES + (2 * (KP - 1) * DW) // SW

        def step_words(xw: Any, wq_: Any, acc: Any, nc: Any, c: Any, r: Any, ky: Any, kp: Any,
                       j: Any, y0: Any, yy: Any, x0: Any, v: Any) -> Any:  # fmt: skip
            a = xw[T.ramp(((nc * HP + (y0 + yy) * SH + ky * DH) * SW + 2 * kp * DW % SW) * WQ
                          + x0 + v * LANES + 2 * kp * DW // SW, 1, LANES)]  # fmt: skip
            return mac(T, LANES, acc, T.reinterpret("int16x16", a), weight(wq_, c, ky, kp))

        tiles = skeleton.tiled_loop(T, loop, init, store, step_words)
        stage1 = _tap_pair_repack(T, geo, x_dtype, q.x_zero_point, HP, WQ)
        xsize, xtype = N * C * HP * SW * WQ, "int32"

    func = skeleton.conv_func(T, geo, x_dtype, q.out_dtype, (wq.shape, "int32"), ep.shape,
                              (xsize, xtype), stage1, tiles)  # fmt: skip
    return func, [wq, ep]


def _tap_pair_repack(T: Any, geo: Geometry, x_dtype: str, zp: int, hp: int, wq: int) -> Any:
    """``repack(xf, xw)``: stage 1 of the dilated depthwise conv, per (n, c, padded row) the
    padded row as bytes, then its tap-pair words (rows in up to 64 parallel chunks)."""
    N, C, H, W = geo.n, geo.c, geo.h, geo.w
    SW, DW, PT, PL = geo.sw, geo.dw, geo.pt, geo.pl
    HP, WQ, ZP = hp, wq, zp
    NR = N * C * HP
    # The padded row as bytes (zero point outside the input): the words are read from it with
    # unconditional vector loads. Long enough for the last word's second half.
    RW = -(-(SW * WQ + SW + DW + 2 * LANES) // LANES) * LANES
    word, wordv = _word_fns(T, x_dtype == "int8")

    @T.macro
    def padded_row(xf: Any, rowb: Any, src: Any) -> None:
        # Only the border gets the zero point (vector stores; the buffer has a spare vector at
        # the end for the last one).
        for q in range(PL):
            rowb[q] = T.cast(ZP, x_dtype)
        for v in range(W // LANES):
            rowb[T.ramp(PL + v * LANES, 1, LANES)] = xf[T.ramp(src + v * LANES, 1, LANES)]
        for q in range(W // LANES * LANES, W):
            rowb[PL + q] = xf[src + q]
        for v in range((RW - PL - W + LANES - 1) // LANES):
            rowb[T.ramp(PL + W + v * LANES, 1, LANES)] = T.broadcast(T.cast(ZP, x_dtype), LANES)

    @T.macro
    def row_words(xw: Any, rowb: Any, base: Any) -> None:
        for ph in range(SW):
            for v in range(WQ // LANES):
                xw[T.ramp(base + ph * WQ + v * LANES, 1, LANES)] = wordv(
                    T.cast(rowb[T.ramp(ph + v * SW * LANES, SW, LANES)], "int32x8"),
                    T.cast(rowb[T.ramp(ph + v * SW * LANES + DW, SW, LANES)], "int32x8"),
                )
            for q in range(WQ // LANES * LANES, WQ):
                xw[base + ph * WQ + q] = word(
                    T.cast(rowb[q * SW + ph], "int32"),
                    T.cast(rowb[q * SW + ph + DW], "int32"),
                )

    @T.macro
    def repack(xf: Any, xw: Any) -> None:
        for chunk in T.parallel(skeleton.chunks(NR)):
            rowb = T.alloc_buffer((RW + LANES,), x_dtype, scope="local")
            for r in range(chunk * NR // skeleton.chunks(NR),
                           (chunk + 1) * NR // skeleton.chunks(NR)):  # fmt: skip
                row = T.Bind(r % HP - PT)
                src = T.Bind(r // HP * H * W + row * W)
                base = T.Bind(r * SW * WQ)
                if row >= 0 and row < H:
                    padded_row(xf, rowb, src)
                else:
                    for v in range(RW // LANES):
                        rowb[T.ramp(v * LANES, 1, LANES)] = T.broadcast(
                            T.cast(ZP, x_dtype), LANES
                        )
                row_words(xw, rowb, base)

    return repack


ISA = Isa("avx2", LANES, mac, dense, depthwise)
