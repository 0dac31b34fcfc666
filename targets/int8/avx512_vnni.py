"""x86 AVX-512 VNNI (the target's CPU has ``avx512vnni``, ``avx512bw`` and ``avx512vl``:
``znver4``, ``icelake-server``, ``sapphirerapids``): ``vpdpbusd`` (``llvm.x86.avx512.vpdpbusd
.512`` / ``.256``, :func:`mac`) multiplies 4 adjacent *unsigned* bytes by 4 *signed* bytes and
adds the 4 products to each int32 lane, without saturation, so it is exact (``4 * 255 * 128 <
2**31``; the int32 accumulation is exact whenever the true accumulator fits int32).

Dense convs (``groups == 1``) run over *quads* of input channels: activation word ``xw[n, q,
row, phase, col]`` holds bytes ``x[4q + k]`` (k = 0..3, low byte first) of one pixel, as uint8
(int8 activations are made ``x + 128``, a flip of the top bit, and the bias takes ``-128 *
sum(w)``); weight word ``wq[ob, q, ky, kx, j]`` holds ``w[ob*OBN + j, 4q + k]``
(:func:`skeleton.quad_words`; zero beyond O and C, so the activation bytes there do not
matter). The weight word of (o, quad, ky, kx) is broadcast, and 16 (zmm) or 8 (ymm, for 7- and
56-column rows, :func:`vnni_lanes`) output columns are one vector: 64 multiply-adds per zmm
instruction. Tiles, stride phases and the epilogue (on 16 or 8 lanes) are as for AVX2.

Rows that leave lanes empty (7, 14, 28 columns) put output channels on the 16 lanes instead
(:func:`_dense_oc`); few input channels (an RGB input, 3 x 7x7) make the quads of (channel,
kx) taps of a kernel row instead of channels. Depthwise convs keep the AVX2 kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import numpy as np

from bnfold.targets.int8 import avx2, skeleton
from bnfold.targets.int8.skeleton import Isa, Kernel, TileLoop
from bnfold.targets.int8.spec import (
    INT32_MAX,
    INT32_MIN,
    Geometry,
    QConv,
    Tile,
    epilogue_consts,
    shifted_bias,
)

logger = logging.getLogger(__name__)

VPDPBUSD = {16: "llvm.x86.avx512.vpdpbusd.512", 8: "llvm.x86.avx512.vpdpbusd.256"}


def supports(target: Any) -> bool:
    """Whether ``target`` is an x86-64 LLVM target whose CPU has AVX-512 VNNI (with BW and VL,
    which the 8-bit and 256-bit forms need): ``znver4``, ``icelake-server``, ``sapphirerapids``
    (its ``mcpu``, or ``mattr`` such as ``+avx512vnni``)."""
    if not avx2.supports(target):
        return False
    try:
        from tvm.target import codegen

        return bool(codegen.target_has_features(["avx512vnni", "avx512bw", "avx512vl"], target))
    except Exception as e:
        logger.debug("AVX-512 VNNI check failed: %s", e)
        return False


def mac(T: Any, lanes: int, acc: Any, a: Any, w: Any) -> Any:
    """``vpdpbusd(acc, a, w)``: ``lanes`` x 4 unsigned activation bytes times 4 signed weight
    bytes, summed into each int32 lane of ``acc``."""
    return T.call_llvm_pure_intrin(f"int32x{lanes}", VPDPBUSD[lanes], acc, a, w)


def choose_tile(o: int, oh: int, ow: int, kw: int, lanes: int) -> Tile:
    """:func:`avx2.choose_tile` for ``vpdpbusd`` on 32 vector registers.

    Budget: ``obn*yt*xv`` accumulators + the ``yt*xv`` activation vectors of one step + 2
    temporaries <= 32 (the weight words are broadcast from memory by the ``vpdpbusd`` itself).
    The accumulator limit is lower with a kernel row unrolled, where LLVM keeps operands
    across taps. Output maps of 5 to 8 rows may take all rows in one tile (no overlapping row
    tile: 3x3 512ch 7x7, 2 channels x 7 rows 0.59 ms, 4 x 4 rows 0.67 ms)."""
    best: tuple[float, Tile] | None = None
    vecs = -(-ow // lanes)
    limit = 24 if kw == 1 else 16
    rows = ([oh] if 4 < oh <= 8 else []) + list(range(min(oh, 4), 0, -1))
    for obn in (1, 2, 3, 4, 6, 8, 12, 16):
        for yt in rows:
            for xv in range(1, min(vecs, 4) + 1):
                acc = obn * yt * xv
                if acc > limit or acc + yt * xv + 2 > 32:
                    continue
                work = (-(-o // obn) * obn) * (-(-oh // yt) * yt) * (-(-vecs // xv) * xv)
                # Per step: acc x vpdpbusd + yt*xv loads + obn broadcasts (+ loop overhead).
                cost = work * (acc + yt * xv + obn + 2) / acc
                if best is None or cost < best[0]:
                    best = (cost, Tile(obn, yt, xv))
    assert best is not None
    return best[1]


def choose_tile_oc(o: int, oh: int, ow: int, kw: int) -> Tile:
    """The tile of the VNNI kernel with output channels on the 16 lanes: ``obn`` = 16 x J
    channels x ``yt`` rows x ``xv`` columns; per step J weight vectors and ``yt * xv``
    activation broadcasts. One row (measured, 3x3 512ch 7x7: 2 x 16 channels x 7 columns
    0.52 ms, x 7 rows 0.53 ms; 3x3 128ch 28x28: 0.55 ms, 4 rows x 1 column 0.57 ms)."""
    best: tuple[float, Tile] | None = None
    limit = 24 if kw == 1 else 16
    for j in (1, 2):  # 3 x 16 channels: 0.54 ms, 4 x 16 x 4 columns: 0.57 (28x28)
        for yt in (1,):
            for xv in range(1, min(ow, 16) + 1):
                acc = j * yt * xv
                if acc > limit or acc + j + 2 > 32:
                    continue
                work = (-(-o // (16 * j)) * 16 * j) * (-(-oh // yt) * yt) * (-(-ow // xv) * xv)
                cost = work * (acc + yt * xv + j + 2) / acc
                if best is None or cost < best[0]:
                    best = (cost, Tile(16 * j, yt, xv))
    assert best is not None
    return best[1]


def vnni_lanes(ow: int) -> int:
    """int32 lanes of the VNNI kernel for output rows of ``ow``: 16 (zmm) unless 8 (ymm) wastes
    fewer padded columns (a 7- or 56-column row). Both issue the same multiply-adds per cycle
    on Zen 4 (a zmm ``vpdpbusd`` is two 256-bit halves), so only the padding decides."""
    return 16 if -(-ow // 16) * 16 <= -(-ow // 8) * 8 else 8


def requant_lanes(T: Any, acc: Any, m: Any, s: Any, zp: int, qmin: int, qmax: int,
                  lanes: int) -> Any:  # fmt: skip
    """:func:`avx2.requant_vec` with a channel per lane (``m``, ``s``: int32 vectors): in int64
    throughout, exact without the clamp (``|acc * m| < 2**62``, the rounding term
    ``<= 2**61``)."""
    i64 = f"int64x{lanes}"
    s64 = T.cast(s, i64)
    one = T.broadcast(T.int64(1), lanes)
    v = T.shift_right(T.cast(acc, i64) * T.cast(m, i64) + T.shift_left(one, s64 - one), s64)
    v = v + T.broadcast(T.int64(zp), lanes)
    v = T.max(T.min(v, T.broadcast(T.int64(qmax), lanes)), T.broadcast(T.int64(qmin), lanes))
    return T.cast(v, f"int32x{lanes}")


def dense(geo: Geometry, x_dtype: str, q: QConv, tile: Tile | None, lanes: int | None = None,
          ocl: bool | None = None) -> Kernel:  # fmt: skip
    """The VNNI dense kernel on ``lanes`` (None: :func:`vnni_lanes`), output channels on the
    lanes where ``ocl`` (None: for kernels larger than 1x1 of 32 or more channels whose rows
    leave lanes empty: 3x3 512ch 7x7 0.52 ms vs 0.59; 256ch 14x14 0.53 vs 0.59; 128ch 28x28
    0.55 vs 0.59; not 1x1 convs: 1x1 s2 64->128 0.09 vs 0.07 ms). ``tile``: the register tile
    (None: chosen)."""
    vl = lanes or vnni_lanes(geo.ow)
    if ocl is None:
        ocl = tile is None and geo.kh * geo.kw > 1 and geo.o >= 32 and geo.ow % vl != 0
    if ocl:
        return _dense_oc(geo, x_dtype, q, tile or choose_tile_oc(geo.o, geo.oh, geo.ow, geo.kw))
    return _dense_rows(geo, x_dtype, q, tile, vl)


@dataclasses.dataclass(frozen=True)
class _Quads:
    """The quad layout of a VNNI dense conv: the conv as the kernel runs it (with tap quads,
    a KH x 1 conv over C * KW channels of column stride 1), the repacked rows and the packed
    weight with its epilogue constants."""

    taps: bool  # quads of (channel, kx) taps instead of channels
    c: int
    kw: int
    sw: int
    dw: int
    pl: int
    cq: int
    hp: int
    wq: int
    rwd: int
    zpw: int
    words: np.ndarray
    ep: np.ndarray


def _quads(geo: Geometry, x_dtype: str, q: QConv, obn: int, tx: int, vl: int) -> _Quads:
    """The layout of ``q`` for tiles of ``obn`` channels x ``tx`` columns on ``vl`` lanes.

    Few input channels (an RGB input, 3 x 7x7): the quads run over (channel, kx) taps of a
    kernel row instead of channels (21 taps in 6 quads, not 7 quads of 3 channels). The
    repack writes, per padded input row and output column x, the bytes xpad[c, row, x * SW +
    kx] of tap c * KW + kx."""
    C, KW, SW, DW, PL, O = geo.c, geo.kw, geo.sw, geo.dw, geo.pl, geo.o  # noqa: E741
    weight = q.weight
    taps = _use_taps(geo)
    if taps:
        weight = np.ascontiguousarray(weight.transpose(0, 1, 3, 2).reshape(O, C * KW, geo.kh, 1))
        C, KW, SW, DW, PL = C * KW, 1, 1, 1, 0
    CQ = (C + 3) // 4
    OB = -(-O // obn)
    HP = geo.hp
    WQ = -(-geo.ow // tx) * tx + ((KW - 1) * DW) // SW
    # Padded input rows as bytes (strided repack), long enough for the last SW*VL-byte load.
    RWD = -(-(SW * WQ + SW * vl) // vl) * vl
    if taps:
        RWD = -(-(geo.sw * WQ + geo.kw + geo.sw * vl) // vl) * vl
    shifted = x_dtype == "int8"
    zp = (q.x_zero_point + 128 * shifted) & 0xFF
    zpw = int(np.array([zp] * 4, dtype=np.uint8).view(np.int32)[0])
    bias = shifted_bias(q, -128 if shifted else 0)
    if np.any(np.abs(bias) >= 2**31):
        bias = np.clip(bias, INT32_MIN, INT32_MAX)  # only if the true accumulator overflows
    ep = epilogue_consts(bias.astype(np.int32), q, OB * obn)
    words = skeleton.quad_words(weight, OB * obn, obn)
    return _Quads(taps, C, KW, SW, DW, PL, CQ, HP, WQ, RWD, zpw, words, ep)


def _quad_fn(T: Any, shifted: bool) -> Any:
    """``quad(b, lanes)``: int32 word(s) of 4 activation bytes loaded as int32 (``lanes`` 1: a
    scalar), as uint8. Shifts and ors only: TVM emits ``add`` with ``nsw``, which a top byte
    >= 128 would break."""

    def quad(b: list[Any], lanes: int) -> Any:
        def k(v: int) -> Any:
            return v if lanes == 1 else T.broadcast(v, lanes)

        if shifted:  # the two's-complement bytes with the top bit flipped: x + 128
            b = [v & k(0xFF) for v in b[:3]] + [b[3]]
        w = b[0] | (b[1] << k(8)) | (b[2] << k(16)) | (b[3] << k(24))
        return w ^ k(-0x7F7F7F80) if shifted else w  # -0x7F7F7F80 == int32(0x80808080)

    return quad


def _repack(T: Any, geo: Geometry, x_dtype: str, q: QConv, lay: _Quads, vl: int) -> Any:
    """``repack(xf, xw)``: stage 1, the activation as quad words, padded, stride phases split
    (rows in up to 64 parallel chunks)."""
    if lay.taps:
        return _tap_repack(T, geo, x_dtype, q, lay, vl)
    N, C, H, W = geo.n, geo.c, geo.h, geo.w
    SW, PT, PL = geo.sw, geo.pt, geo.pl
    CQ, HP, WQ, RWD, ZPW, VL = lay.cq, lay.hp, lay.wq, lay.rwd, lay.zpw, vl
    NR = N * CQ * HP
    ZP = q.x_zero_point
    quad = _quad_fn(T, x_dtype == "int8")
    row_copy = skeleton.row_copy_macro(T, W, PL, RWD, ZP, x_dtype, VL)

    @T.macro
    def unit_stride(xf: Any, xw: Any, base: Any, c0: Any, c1: Any, c2: Any, c3: Any,
                    row: Any) -> None:  # fmt: skip
        for q in range(PL):
            xw[base + q] = ZPW
        for v in range(W // VL):
            at = row * W + v * VL
            xw[T.ramp(base + PL + v * VL, 1, VL)] = quad(
                [T.cast(xf[T.ramp(cc + at, 1, VL)], f"int32x{VL}") for cc in (c0, c1, c2, c3)],
                VL,
            )  # fmt: skip
        for q in range(W // VL * VL, W):
            xw[base + PL + q] = quad(
                [T.cast(xf[cc + row * W + q], "int32") for cc in (c0, c1, c2, c3)], 1
            )  # fmt: skip
        for q in range(PL + W, WQ):
            xw[base + q] = ZPW

    @T.macro
    def strided(xf: Any, xw: Any, rowb: Any, base: Any, nn: Any, cq: Any, row: Any) -> None:
        # The 4 channels' padded rows as bytes, then VL words per step, each channel's phase
        # taken from one SW*VL-byte load by a byte shuffle (constant indices: the phase moves
        # the load).
        for k in T.unroll(4):
            src = T.Bind((nn * C + T.min(4 * cq + k, C - 1)) * H * W + row * W)
            row_copy(rowb, k * RWD, xf, src)
        for ph in range(SW):
            for v in range(WQ // VL):
                xw[T.ramp(base + ph * WQ + v * VL, 1, VL)] = quad(
                    [T.cast(T.Shuffle([rowb[T.ramp(k * RWD + v * SW * VL + ph, 1, SW * VL)]],
                                      [SW * i for i in range(VL)]), f"int32x{VL}")
                     for k in range(4)], VL,
                )  # fmt: skip
            for q in range(WQ // VL * VL, WQ):
                xw[base + ph * WQ + q] = quad(
                    [T.cast(rowb[k * RWD + q * SW + ph], "int32") for k in range(4)], 1
                )  # fmt: skip

    @T.macro
    def repack(xf: Any, xw: Any) -> None:
        for chunk in T.parallel(skeleton.chunks(NR)):
            rowb = T.alloc_buffer((4 * RWD + VL,), x_dtype, scope="local")
            for r in range(chunk * NR // skeleton.chunks(NR),
                           (chunk + 1) * NR // skeleton.chunks(NR)):  # fmt: skip
                nn = T.Bind(r // (CQ * HP))
                cq = T.Bind(r // HP % CQ)
                row = T.Bind(r % HP - PT)
                # Channels beyond C read channel C-1 again; their weight bytes are zero.
                c0 = T.Bind((nn * C + T.min(4 * cq, C - 1)) * H * W)
                c1 = T.Bind((nn * C + T.min(4 * cq + 1, C - 1)) * H * W)
                c2 = T.Bind((nn * C + T.min(4 * cq + 2, C - 1)) * H * W)
                c3 = T.Bind((nn * C + T.min(4 * cq + 3, C - 1)) * H * W)
                base = T.Bind(r * SW * WQ)
                if row < 0 or row >= H:
                    for q in range(SW * WQ):
                        xw[base + q] = ZPW
                elif SW == 1:
                    unit_stride(xf, xw, base, c0, c1, c2, c3, row)
                else:
                    strided(xf, xw, rowb, base, nn, cq, row)

    return repack


def _tap_repack(T: Any, geo: Geometry, x_dtype: str, q: QConv, lay: _Quads, vl: int) -> Any:
    """:func:`_repack` for quads of (channel, kx) taps: per padded input row, the input
    channels' rows as bytes, then for each output column the words of its taps."""
    N, C0, H, W = geo.n, geo.c, geo.h, geo.w
    KW0, SW0, PT, PL0 = geo.kw, geo.sw, geo.pt, geo.pl
    C, CQ, HP, WQ, RWD, ZPW, VL = lay.c, lay.cq, lay.hp, lay.wq, lay.rwd, lay.zpw, vl
    NR = N * HP
    quad = _quad_fn(T, x_dtype == "int8")
    row_copy = skeleton.row_copy_macro(T, W, PL0, RWD, q.x_zero_point, x_dtype, VL)

    def tap(rowt: Any, cq: Any, k: int, col: Any) -> Any:
        """The padded input byte offset of tap 4cq + k (beyond C: the last tap again) at
        column offset ``col``."""
        return (T.min(4 * cq + k, C - 1) // KW0 * RWD + T.min(4 * cq + k, C - 1) % KW0 + col)

    @T.macro
    def row_words(xw: Any, rowt: Any, nn: Any, r: Any) -> None:
        for cq in T.unroll(CQ):
            for v in range(WQ // VL):
                xw[T.ramp(((nn * CQ + cq) * HP + r % HP) * WQ + v * VL, 1, VL)] = (
                    quad([T.cast(T.Shuffle(
                        [rowt[T.ramp(tap(rowt, cq, k, v * SW0 * VL), 1, SW0 * VL)]],
                        [SW0 * i for i in range(VL)]), f"int32x{VL}")
                        for k in range(4)], VL)
                )  # fmt: skip
            for q in range(WQ // VL * VL, WQ):
                xw[((nn * CQ + cq) * HP + r % HP) * WQ + q] = quad(
                    [T.cast(rowt[tap(rowt, cq, k, q * SW0)], "int32") for k in range(4)], 1
                )  # fmt: skip

    @T.macro
    def repack(xf: Any, xw: Any) -> None:
        for chunk in T.parallel(skeleton.chunks(NR)):
            rowt = T.alloc_buffer((C0 * RWD + VL,), x_dtype, scope="local")
            for r in range(chunk * NR // skeleton.chunks(NR),
                           (chunk + 1) * NR // skeleton.chunks(NR)):  # fmt: skip
                nn = T.Bind(r // HP)
                row = T.Bind(r % HP - PT)
                if row < 0 or row >= H:
                    for cq in range(CQ):
                        for q in range(WQ):
                            xw[((nn * CQ + cq) * HP + r % HP) * WQ + q] = ZPW
                else:
                    for k in T.unroll(C0):
                        src = T.Bind((nn * C0 + k) * H * W + row * W)
                        row_copy(rowt, k * RWD, xf, src)
                    row_words(xw, rowt, nn, r)

    return repack


def _dense_rows(geo: Geometry, x_dtype: str, q: QConv, tile: Tile | None, vl: int) -> Kernel:
    """``vl`` output columns on the lanes: tiles of OBN channels x YT rows x XV vectors, the
    weight word of a channel broadcast to every lane."""
    from tvm.script import tirx as T

    N, O = geo.n, geo.o  # noqa: E741
    KH, SH, DH, OH, OW = geo.kh, geo.sh, geo.dh, geo.oh, geo.ow
    if tile is None:
        tile = choose_tile(O, OH, OW, 1 if _use_taps(geo) else geo.kw, vl)
    OBN, VL = tile.obn, vl
    lay = _quads(geo, x_dtype, q, OBN, tile.xv * VL, VL)
    CQ, HP, WQ, KW, SW, DW = lay.cq, lay.hp, lay.wq, lay.kw, lay.sw, lay.dw
    OB = -(-O // OBN)
    loop = TileLoop(geo, tile, VL, OB, CQ, KH, KW, q.out_dtype)
    BYTES = f"int8x{4 * VL}"

    def step(xw: Any, wq_: Any, acc: Any, nn: Any, ob: Any, cq: Any, ky: Any, kx: Any, j: Any,
             y0: Any, yy: Any, x0: Any, v: Any) -> Any:  # fmt: skip
        a = xw[T.ramp(((((nn * CQ + cq) * HP + (y0 + yy) * SH + ky * DH) * SW
                        + kx * DW % SW) * WQ) + x0 + v * VL + kx * DW // SW, 1, VL)]  # fmt: skip
        w = T.broadcast(wq_[ob, cq, ky, kx, j], VL)
        return mac(T, VL, acc, T.reinterpret(BYTES, a), T.reinterpret(BYTES, w))

    init, store = skeleton.tile_macros(T, OBN, tile.yt, tile.xv, VL, O, OH, OW, q.out_dtype,
                                       avx2.x86_requant(T, q, VL))  # fmt: skip
    tiles = skeleton.tiled_loop(T, loop, init, store, step)
    repack = _repack(T, geo, x_dtype, q, lay, VL)

    func = skeleton.conv_func(T, geo, x_dtype, q.out_dtype, (lay.words.shape, "int32"),
                              lay.ep.shape, (N * CQ * HP * SW * WQ, "int32"), repack,
                              tiles)  # fmt: skip
    return func, [lay.words, lay.ep]


def _use_taps(geo: Geometry) -> bool:
    """Whether the quads of ``geo`` run over (channel, kx) taps: fewer quads than channel quads
    (few input channels, dilation 1)."""
    C, KW = geo.c, geo.kw
    return KW > 1 and geo.dw == 1 and C < 4 and -(-C * KW // 4) < KW * -(-C // 4)


def _dense_oc(geo: Geometry, x_dtype: str, q: QConv, tile: Tile) -> Kernel:
    """Output channels on the 16 lanes: tiles of J x 16 channels x YT rows x XV columns (the
    last column tile moved left to end at OW), one activation word broadcast per pixel, one
    weight vector per 16 channels; the epilogue per lane (:func:`requant_lanes`)."""
    from tvm.script import tirx as T

    N, O = geo.n, geo.o  # noqa: E741
    KH, SH, DH, OH, OW = geo.kh, geo.sh, geo.dh, geo.oh, geo.ow
    VL = 16
    OBN, YT, XV = tile.obn, tile.yt, tile.xv
    assert OBN % 16 == 0 and XV <= OW and YT <= OH
    OCJ = OBN // 16
    lay = _quads(geo, x_dtype, q, OBN, XV, VL)
    CQ, HP, WQ, KW, SW, DW = lay.cq, lay.hp, lay.wq, lay.kw, lay.sw, lay.dw
    OB = -(-O // OBN)
    NX = -(-OW // XV)
    NY = -(-OH // YT)  # the last row tile is moved up to end at OH (overlapping the one before)
    NT = N * OB * NY * NX
    BYTES = f"int8x{4 * VL}"
    out_dtype, zp, (qmin, qmax) = q.out_dtype, q.out_zero_point, q.clamp
    repack = _repack(T, geo, x_dtype, q, lay, VL)

    def slot(yy: Any, p: Any, j: Any) -> Any:
        return T.ramp(((yy * XV + p) * OCJ + j) * VL, 1, VL)

    def pixel(xw: Any, nn: Any, cq: Any, ky: Any, kx: Any, y0: Any, yy: Any, x0: Any,
              p: Any) -> Any:  # fmt: skip
        """The activation word of quad cq, tap (ky, kx), output pixel (y0 + yy, x0 + p), on
        every lane."""
        return T.reinterpret(BYTES, T.broadcast(xw[
            ((((nn * CQ + cq) * HP + (y0 + yy) * SH + ky * DH) * SW + kx * DW % SW) * WQ)
            + x0 + p + kx * DW // SW], VL))  # fmt: skip

    @T.macro
    def steps(xw: Any, wq_: Any, acc: Any, nn: Any, ob: Any, y0: Any, x0: Any) -> None:
        for cq in range(CQ):
            for ky in range(KH):
                for kx in T.unroll(KW):
                    for yy in T.unroll(YT):
                        for p in T.unroll(XV):
                            for j in T.unroll(OCJ):
                                acc[slot(yy, p, j)] = mac(
                                    T, VL, acc[slot(yy, p, j)],
                                    pixel(xw, nn, cq, ky, kx, y0, yy, x0, p),
                                    T.reinterpret(BYTES, wq_[ob, cq, ky, kx, T.ramp(j * VL, 1,
                                                                                    VL)]),
                                )  # fmt: skip

    @T.macro
    def store(acc: Any, res: Any, of: Any, ep_: Any, nn: Any, ob: Any, y0: Any, x0: Any) -> None:
        for yy in T.unroll(YT):
            for p in T.unroll(XV):
                for j in T.unroll(OCJ):
                    o0 = T.Bind(ob * OBN + j * VL)
                    res[T.ramp(0, 1, VL)] = T.cast(
                        requant_lanes(T, acc[slot(yy, p, j)], ep_[3, T.ramp(o0, 1, VL)],
                                      ep_[4, T.ramp(o0, 1, VL)] + ep_[5, T.ramp(o0, 1, VL)],
                                      zp, qmin, qmax, VL),
                        f"{out_dtype}x{VL}")  # fmt: skip
                    for lane in range(VL):
                        if o0 + lane < O:
                            of[((nn * O + o0 + lane) * OH + y0 + yy) * OW + x0 + p] = res[lane]

    @T.macro
    def tiles(of: Any, ep_: Any, xw: Any, wq_: Any) -> None:
        # Tiles in up to 64 parallel chunks, local buffers allocated once per chunk.
        for chunk in T.parallel(skeleton.chunks(NT)):
            acc = T.alloc_buffer((OBN * YT * XV,), "int32", scope="local")
            res = T.alloc_buffer((VL,), out_dtype, scope="local")
            for t in range(chunk * NT // skeleton.chunks(NT),
                           (chunk + 1) * NT // skeleton.chunks(NT)):  # fmt: skip
                nn = T.Bind(t // (OB * NY * NX))
                ob = T.Bind(t // (NY * NX) % OB)
                y0 = T.Bind(T.min(t // NX % NY * YT, OH - YT))
                x0 = T.Bind(T.min(t % NX * XV, OW - XV))
                for i in T.unroll(YT * XV):
                    for j in T.unroll(OCJ):
                        acc[T.ramp((i * OCJ + j) * VL, 1, VL)] = ep_[
                            0, T.ramp(ob * OBN + j * VL, 1, VL)
                        ]
                steps(xw, wq_, acc, nn, ob, y0, x0)
                store(acc, res, of, ep_, nn, ob, y0, x0)

    ep = np.ascontiguousarray(lay.ep.T)  # (EP_COLS, channels): a channel per lane
    func = skeleton.conv_func(T, geo, x_dtype, out_dtype, (lay.words.shape, "int32"), ep.shape,
                              (N * CQ * HP * SW * WQ, "int32"), repack, tiles)  # fmt: skip
    return func, [lay.words, ep]


ISA = Isa("vnni", 16, mac, dense, avx2.depthwise)
# Forced layouts (benchmarks, tests): 8 (ymm) or 16 (zmm) columns on the lanes, or output
# channels on the lanes.
ISA_256 = dataclasses.replace(ISA, name="vnni256", dense=functools.partial(dense, lanes=8,
                                                                            ocl=False))
ISA_512 = dataclasses.replace(ISA, name="vnni512", dense=functools.partial(dense, lanes=16,
                                                                            ocl=False))
ISA_OC = dataclasses.replace(ISA, name="vnnioc", dense=functools.partial(dense, ocl=True))
