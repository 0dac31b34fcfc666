"""int8 x int8 -> int32 conv kernels with a fixed-point requantize epilogue, as TVM PrimFuncs.

The math (bit-exact; :func:`reference_conv2d_int8` is the numpy statement of it)::

    xpad = x padded with x_zero_point (the real 0)
    acc[n,o,y,x] = bias[o] + sum_{c in group(o), ky, kx} xpad[n, c, y*sh + ky*dh, x*sw + kx*dw]
                                                        * weight[o, c - c0(o), ky, kx]   (int32)
    v = (int64(acc) * multiplier[o] + 2**(shift[o] - 1)) >> shift[o]        (arithmetic shift)
    out = clip(v + out_zero_point, qmin, qmax)                              (uint8 / int8)

The instruction (x86 AVX2): ``vpmaddwd`` (``llvm.x86.avx2.pmadd.wd``) multiplies 16 x int16 by
16 x int16 and sums adjacent pairs into 8 x int32. Every operand is a widened 8-bit value, so
each product fits in 16 x 16 -> 32 bits and the pair sum (< 2 * 255 * 127 + 1) is exact; the
int32 accumulation is an ordinary ``vpaddd`` (exact as long as the true accumulator fits int32,
which the contract guarantees). ``vpmaddubsw`` (u8 x s8 -> int16) would be twice as dense but
saturates (255 * 127 * 2 > 32767), so it is not used. One ``vpmaddwd`` + ``vpaddd`` does 16
multiply-adds where an fp32 FMA does 8.

Layout (dense conv, ``groups == 1``): the reduction runs over *pairs* of input channels. Every
pair ``(x[2p], x[2p+1])`` of one pixel is one 32-bit word (two int16 halves, low = even channel):

* activation, repacked at run time by the first stage of the PrimFunc (padding included, the
  zero point as border value, stride phases split so that every load is contiguous)::

      xw[n, p, row, phase, q]   int32 word,   input column = q * sw + phase - pad_left

* weight, packed at compile time: ``wq[ob, p, ky, kx, j]`` = the word of
  ``(weight[ob*OBN + j, 2p], weight[ob*OBN + j, 2p+1])`` (zero rows/halves beyond O and C).

The vector lanes run along the output *row* (8 consecutive output columns, so results are stored
straight into NCHW). A register tile is ``OBN`` output channels x ``YT`` rows x ``XV`` vectors of
8 columns: ``OBN * YT * XV`` int32x8 accumulators. For each (pair, ky, kx) the tile loads
``YT * XV`` activation vectors (16 x int16: 8 columns x 2 channels) and broadcasts ``OBN`` weight
words (``vpbroadcastd``: the same channel pair for every column), so that ``vpmaddwd(a, b)``
lane ``i`` is ``x[2p, col_i] * w[o, 2p] + x[2p+1, col_i] * w[o, 2p+1]``. A 1x1 stride-1 unpadded
conv is computed as one long row of ``H * W`` pixels.

AVX-512 VNNI (the target's CPU has ``avx512vnni``, ``avx512bw`` and ``avx512vl``: ``znver4``,
``icelake-server``, ``sapphirerapids``; :func:`supports_vnni`): dense convs use ``vpdpbusd``
(``llvm.x86.avx512.vpdpbusd.512`` / ``.256``) instead, see :func:`_dense_vnni`. It multiplies
4 adjacent *unsigned* bytes by 4 *signed* bytes and adds the 4 products to each int32 lane,
without saturation, so it is exact (``4 * 255 * 128 < 2**31``, the int32 accumulation as
above). The reduction runs over *quads* of input channels: one 32-bit word per pixel holds
``x[4q .. 4q+3]`` (as uint8: int8 activations are shifted by +128 and the bias absorbs
``-128 * sum(w)``), the weight word of (o, quad, ky, kx) is broadcast, and 16 (zmm) or 8 (ymm,
for 7- and 56-column rows) output columns are one vector: 64 multiply-adds per zmm
instruction. Tiles, stride phases and the epilogue (on 16 or 8 lanes) are as for AVX2.
Depthwise convs keep the AVX2 kernels on these CPUs.

Depthwise (``groups == C == O``): the pairs run along the kernel row instead: taps ``kx`` and
``kx + 1`` of one kernel row are one ``vpmaddwd`` (an odd last tap is paired with a zero
weight), so a 3x3 conv is 6 ``vpmaddwd`` per 8 outputs. With dilation 1 the first stage only
writes the padded image as bytes and the tiles build their operands from it: stride 2, the pairs
``(xpad[2x + kx], xpad[2x + kx + 1])`` of 8 columns are 16 adjacent bytes (one widening load,
``vpmovzxbw``); stride 1, 9 bytes duplicated into pairs by one ``vpshufb``, then widened. A tile
is one channel x ``YT`` rows x 1 vector (rows share operands: row y+1's tap ky is row y's tap
ky+1). Dilated depthwise convs use repacked pair words like the dense conv.

The epilogue runs on the accumulators of a tile, before anything is stored: clamp the
accumulator to the range outside which the output is saturated anyway (computed exactly per
channel at compile time; requantization is monotone, so the clamp changes no output, and it
keeps every later value inside int32), multiply to int64 (``vpmuldq`` on the even and odd lanes
in place), add the rounding term, then the shift as a logical 64-bit shift by
``min(shift, 32)`` (whose low 32 bits equal the arithmetic shift's) and an arithmetic 32-bit
shift by the rest, add the zero point, clip, narrow, store (tails of a row lane by lane).

Tiles run in parallel in up to 64 chunks, not one task per tile: TVM gives every ``local``
buffer inside a parallel loop a workspace allocation per iteration (measured: 3x slower on
the 112x112 layers with one task per tile).

aarch64 (NEON): the kernels live in :mod:`bnfold.targets._int8_neon`. Dense convs use ``sdot``
where the target has the dot product extension (``+dotprod``: ``cortex-a55``, ``cortex-a76``,
``neoverse-n1``, ...), else ``smull`` + ``smlal`` + ``sadalp`` (which needs ``|w| <= 127``);
depthwise convs one ``smlal`` per tap on int16. Built and checked under qemu only: their speed
on real ARM cores is not measured.

Unsupported (returns None, the caller falls back to generic Relax ops): grouped convs other than
depthwise, a depthwise conv with a channel multiplier; x86 without AVX2, other targets; on
aarch64 without the dot product, dense convs whose weight holds -128.

Besides the convs (x86; the callers are in :mod:`bnfold.lower.int8`): an 8-bit max pool
(:func:`max_pool2d_int8`), the add of two quantized tensors (:func:`add_int8`, a residual
connection) and a dense layer with a float output (:func:`dense_int8_float`, VNNI), each with
its numpy reference.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from bnfold.targets import _int8_neon
from bnfold.targets._int8_common import (  # noqa: F401  (re-exported: tests and benchmarks)
    _DTYPES,
    EP_COLS,
    INT32_MAX,
    INT32_MIN,
    LANES,
    Geometry,
    QConv,
    Tile,
    _chunks,
    _epilogue_consts,
    _finish,
    _padded_rows_macro,
    _requant,
    _tile_macros,
    _words,
    acc_bounds,
    reference_conv2d_int8,
)

logger = logging.getLogger(__name__)

_PMADDWD = "llvm.x86.avx2.pmadd.wd"


# --------------------------------------------------------------------------------------------
# Planning (AVX2)


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


def supports_avx2(target: Any) -> bool:
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


def supports_vnni(target: Any) -> bool:
    """Whether ``target`` is an x86-64 LLVM target whose CPU has AVX-512 VNNI (with BW and VL,
    which the 8-bit and 256-bit forms need): ``znver4``, ``icelake-server``, ``sapphirerapids``
    (its ``mcpu``, or ``mattr`` such as ``+avx512vnni``)."""
    if not supports_avx2(target):
        return False
    try:
        from tvm.target import codegen

        return bool(codegen.target_has_features(["avx512vnni", "avx512bw", "avx512vl"], target))
    except Exception as e:
        logger.debug("AVX-512 VNNI check failed: %s", e)
        return False


# --------------------------------------------------------------------------------------------
# Entry point


def conv2d_int8(
    x_shape: tuple[int, int, int, int],
    x_dtype: str,
    q: QConv,
    target: Any,
    tile: Tile | None = None,
    isa: str | None = None,
) -> tuple[Any, list[np.ndarray]] | None:
    """A scheduled PrimFunc ``(x, *constants, out)`` of conv ``q`` on an ``x_shape`` input and
    the constant arrays it takes after x, or None when the case is not accelerated (see the
    module docstring). The kernel is picked here: NEON / ``sdot`` on aarch64; on x86 AVX-512
    VNNI, the AVX2 tap-paired kernel for few input channels, or AVX2.

    ``tile`` overrides the register tile of a dense conv, ``isa`` the x86 dense kernel
    (benchmarks, tests): ``"avx2"``, ``"vnni"`` (lanes chosen by :func:`vnni_lanes`),
    ``"vnni256"`` or ``"vnni512"``; None: VNNI where the target has it, else AVX2."""
    n, c, h, w = (int(d) for d in x_shape)
    o, cg, kh, kw = (int(d) for d in q.weight.shape)
    (sh, sw), (dh, dw), (pt, pl, pb, pr), groups = q.strides, q.dilation, q.padding, q.groups
    if x_dtype not in _DTYPES or q.out_dtype not in _DTYPES or q.weight.dtype != np.int8:
        return None
    neon = _int8_neon.supports_neon(target)
    if not neon and not supports_avx2(target):
        logger.debug("int8 conv: no int8 kernel for target %s", target)
        return None
    oh = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow = (w + pl + pr - (kw - 1) * dw - 1) // sw + 1
    if oh < 1 or ow < 1 or min(sh, sw, dh, dw) < 1 or min(pt, pl, pb, pr) < 0:
        return None
    if not (np.all(q.shift >= 1) and np.all(q.shift <= 62) and np.all(q.multiplier > 0)):
        return None
    geo = Geometry(n, c, h, w, o, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow)
    if groups == 1 and cg == c:
        if kh == kw == 1 and sh == sw == 1 and pt == pl == pb == pr == 0:
            # One long row: no padding, no row tails, fewer partial vectors.
            geo = Geometry(n, c, 1, h * w, o, 1, 1, 1, 1, 1, 1, 0, 0, 1, h * w)
        if neon:
            return _int8_neon.dense(geo, x_dtype, q, tile, (n, c, h, w),
                                    (n, o, oh, ow), target)  # fmt: skip
        if (isa is None and supports_vnni(target)) or isa in ("vnni", "vnni256", "vnni512",
                                                                  "vnnioc"):
            vl = {"vnni256": 8, "vnni512": 16, "vnnioc": 16}.get(isa or "", vnni_lanes(geo.ow))
            # Rows that leave lanes empty (7, 14, 28 columns): output channels on the lanes
            # (3x3 512ch 7x7 0.52 ms vs 0.59; 256ch 14x14 0.53 vs 0.59; 128ch 28x28 0.55 vs
            # 0.59). Not for 1x1 convs (1x1 s2 64->128: 0.09 vs 0.07 ms).
            ocl = isa == "vnnioc" or (
                isa in (None, "vnni") and tile is None and kh * kw > 1 and o >= 32
                and geo.ow % vl != 0
            )  # fmt: skip
            if ocl:
                vl = 16
            if ocl and tile is None:
                tile = choose_tile_vnni_oc(o, geo.oh, geo.ow, geo.kw)
            return _dense_vnni(geo, x_dtype, q, tile, vl, (n, c, h, w),
                               (n, o, oh, ow), ocl)  # fmt: skip
        kp = (kw + 1) // 2
        if dw == 1 and sw in (1, 2) and kw > 1 and c * kp <= (c + 1) // 2 * kw:
            # Few odd channels (an RGB input): pairing kernel taps wastes fewer lanes than
            # pairing channels (3 channels x 7x7: 84 vpmaddwd per step, not 98).
            return _dense_direct(geo, x_dtype, q, tile)  # fmt: skip
        tile = tile or choose_tile(o, geo.oh, geo.ow, geo.kw)
        return _dense(geo, x_dtype, q, tile, (n, c, h, w),
                      (n, o, oh, ow))  # fmt: skip
    if groups == c == o and cg == 1 and neon:
        return _int8_neon.depthwise(geo, x_dtype, q)  # fmt: skip
    if groups == c == o and cg == 1:
        return _depthwise(geo, x_dtype, q, tile)  # fmt: skip
    return None


def _x86_requant(T: Any, zp: int, qmin: int, qmax: int, big: bool, lanes: int = LANES) -> Any:
    """``requant(acc, ep_, o)`` for :func:`_tile_macros`: :func:`_requant_vec` of channel o."""

    def requant(acc: Any, ep_: Any, o: Any) -> Any:
        return _requant_vec(T, acc, ep_[o, 1], ep_[o, 2], ep_[o, 3], ep_[o, 4], ep_[o, 5],
                            zp, qmin, qmax, big, lanes)  # fmt: skip

    return requant


# --------------------------------------------------------------------------------------------
# Dense conv (groups == 1)


def _dense(
    geo: Geometry,
    x_dtype: str,
    q: QConv,
    tile: Tile,
    x_shape: tuple[int, int, int, int],
    out_shape: tuple[int, int, int, int],
) -> tuple[Any, list[np.ndarray]]:
    x_zero_point, weight, bias, shift = q.x_zero_point, q.weight, q.bias, q.shift
    out_zero_point, out_dtype, clamp = q.out_zero_point, q.out_dtype, q.clamp
    from tvm.script import tirx as T

    N, C, H, W, O = geo.n, geo.c, geo.h, geo.w, geo.o  # noqa: E741
    KH, KW, SH, SW, DH, DW = geo.kh, geo.kw, geo.sh, geo.sw, geo.dh, geo.dw
    PT, PL, OH, OW = geo.pt, geo.pl, geo.oh, geo.ow
    OBN, YT, XV = tile.obn, tile.yt, tile.xv
    CP = (C + 1) // 2
    OB = -(-O // OBN)
    TX = XV * LANES
    NX = -(-OW // TX)
    NY = -(-OH // YT)  # the last row tile is moved up to end at OH (overlapping the one before)
    # Repacked activation: rows needed by the output, columns by the padded output width.
    HP = (OH - 1) * SH + (KH - 1) * DH + 1
    WQ = NX * TX + ((KW - 1) * DW) // SW
    XSIZE = N * CP * HP * SW * WQ
    NR, NT = N * CP * HP, N * OB * NY * NX  # repacked rows, register tiles
    # Padded input row as bytes (strided repack), long enough for the last 16-byte load.
    RWD = -(-(SW * WQ + SW + 2 * LANES) // LANES) * LANES
    qmin, qmax = clamp
    ZP = int(x_zero_point)
    ZPW = int(_words(np.array([ZP]), np.array([ZP]))[0])
    SIGNED = x_dtype == "int8"

    # Weight words: (OB, CP, KH, KW, OBN), zero beyond O and C.
    wpad = np.zeros((OB * OBN, 2 * CP, KH, KW), dtype=np.int8)
    wpad[:O, :C] = weight
    words = _words(wpad[:, 0::2], wpad[:, 1::2])  # (OB*OBN, CP, KH, KW)
    wq = np.ascontiguousarray(words.reshape(OB, OBN, CP, KH, KW).transpose(0, 2, 3, 4, 1))
    ep = _epilogue_consts(bias, q, OB * OBN)
    BIG = bool(np.all(shift >= 32))  # see _requant_vec

    def word(lo: Any, hi: Any) -> Any:
        """int32 (vector) word of two 8-bit values: low half lo, high half hi."""
        if SIGNED:
            return (lo & 0xFFFF) | (hi << 16)
        return lo | (hi << 16)

    def wordv(lo: Any, hi: Any) -> Any:
        if SIGNED:
            return (lo & T.broadcast(0xFFFF, LANES)) | (hi << T.broadcast(16, LANES))
        return lo | (hi << T.broadcast(16, LANES))

    def slot(j: Any, yy: Any, v: Any) -> Any:
        """The accumulator vector of channel j, row yy, vector v of the tile."""
        return T.ramp(((j * YT + yy) * XV + v) * LANES, 1, LANES)

    init, store = _tile_macros(T, OBN, YT, XV, LANES, O, OH, OW, out_dtype,
                               _x86_requant(T, out_zero_point, qmin, qmax, BIG), bind_acc=True)

    @T.prim_func
    def conv(
        x: T.Buffer(x_shape, x_dtype),
        wq_: T.Buffer((OB, CP, KH, KW, OBN), "int32"),
        ep_: T.Buffer((OB * OBN, EP_COLS), "int32"),
        out: T.Buffer(out_shape, out_dtype),
    ):
        T.func_attr({"global_symbol": "conv2d_int8", "tirx.noalias": True})
        xf = T.decl_buffer((N * C * H * W,), x_dtype, data=x.data)
        of = T.decl_buffer((N * O * OH * OW,), out_dtype, data=out.data)
        xw = T.alloc_buffer((XSIZE,), "int32")
        # Stage 1: repack the activation into pair words, padded, stride phases split.
        # Rows in up to 64 parallel chunks (see the module docstring).
        for chunk in T.parallel(_chunks(NR)):
            rowb = T.alloc_buffer((2 * RWD + LANES,), x_dtype, scope="local")
            for r in range(chunk * NR // _chunks(NR), (chunk + 1) * NR // _chunks(NR)):
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
                else:
                    # Strided: both channels' padded rows as bytes, then 8 words per step from
                    # unconditional loads (stride 2: a 16-byte load widened to int16 has the
                    # even columns in the low halves of its int32 lanes).
                    for k in T.unroll(2):
                        src = T.Bind(T.if_then_else(k == 0, c0, c1) + row * W)
                        for q in range(PL):
                            rowb[k * RWD + q] = T.cast(ZP, x_dtype)
                        for v in range(W // LANES):
                            rowb[T.ramp(k * RWD + PL + v * LANES, 1, LANES)] = xf[
                                T.ramp(src + v * LANES, 1, LANES)
                            ]
                        for q in range(W // LANES * LANES, W):
                            rowb[k * RWD + PL + q] = xf[src + q]
                        for v in range((RWD - PL - W + LANES - 1) // LANES):
                            rowb[T.ramp(k * RWD + PL + W + v * LANES, 1, LANES)] = T.broadcast(
                                T.cast(ZP, x_dtype), LANES
                            )
                    for ph in range(SW):
                        for v in range(WQ // LANES):
                            if SW == 2:
                                xw[T.ramp(base + ph * WQ + v * LANES, 1, LANES)] = (
                                    T.reinterpret("int32x8", T.cast(
                                        rowb[T.ramp(ph + v * 2 * LANES, 1, 2 * LANES)], "int16x16"
                                    )) & T.broadcast(0xFFFF, LANES)
                                ) | (T.reinterpret("int32x8", T.cast(
                                    rowb[T.ramp(RWD + ph + v * 2 * LANES, 1, 2 * LANES)], "int16x16"
                                )) << T.broadcast(16, LANES))  # fmt: skip
                            else:
                                xw[T.ramp(base + ph * WQ + v * LANES, 1, LANES)] = wordv(
                                    T.cast(rowb[T.ramp(ph + v * SW * LANES, SW, LANES)], "int32x8"),
                                    T.cast(
                                        rowb[T.ramp(RWD + ph + v * SW * LANES, SW, LANES)],
                                        "int32x8",
                                    ),
                                )
                        for q in range(WQ // LANES * LANES, WQ):
                            xw[base + ph * WQ + q] = word(
                                T.cast(rowb[q * SW + ph], "int32"),
                                T.cast(rowb[RWD + q * SW + ph], "int32"),
                            )
        # Stage 2: register tiles of OBN channels x YT rows x XV vectors, in parallel.
        # Tiles in up to 64 parallel chunks, local buffers allocated once per chunk.
        for chunk in T.parallel(_chunks(NT)):
            acc = T.alloc_buffer((OBN * YT * XV * LANES,), "int32", scope="local")
            res = T.alloc_buffer((LANES,), out_dtype, scope="local")
            for t in range(chunk * NT // _chunks(NT), (chunk + 1) * NT // _chunks(NT)):
                nn = T.Bind(t // (OB * NY * NX))
                ob = T.Bind(t // (NY * NX) % OB)
                y0 = T.Bind(T.min(t // NX % NY * YT, OH - YT))
                x0 = T.Bind(t % NX * TX)
                init(acc, ep_, ob)
                for cp in range(CP):
                    for ky in range(KH):
                        for kx in T.unroll(KW):
                            for j in T.unroll(OBN):
                                for yy in T.unroll(YT):
                                    for v in T.unroll(XV):
                                        acc[slot(j, yy, v)] = acc[
                                            slot(j, yy, v)
                                        ] + T.call_llvm_pure_intrin(
                                            "int32x8",
                                            _PMADDWD,
                                            T.reinterpret(
                                                "int16x16",
                                                xw[
                                                    T.ramp(
                                                        ((((nn * CP + cp) * HP + (y0 + yy) * SH
                                                           + ky * DH) * SW + kx * DW % SW) * WQ)
                                                        + x0 + v * LANES + kx * DW // SW,
                                                        1,
                                                        LANES,
                                                    )
                                                ],
                                            ),
                                            T.reinterpret(
                                                "int16x16",
                                                T.broadcast(wq_[ob, cp, ky, kx, j], LANES),
                                            ),
                                        )  # fmt: skip
                store(acc, res, of, ep_, nn, ob, y0, x0)

    return _finish(conv), [wq, ep]


# --------------------------------------------------------------------------------------------
# Dense conv with AVX-512 VNNI (groups == 1)

_VPDPBUSD = {16: "llvm.x86.avx512.vpdpbusd.512", 8: "llvm.x86.avx512.vpdpbusd.256"}


def choose_tile_vnni(o: int, oh: int, ow: int, kw: int, lanes: int) -> Tile:
    """:func:`choose_tile` for ``vpdpbusd`` on 32 vector registers.

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


def choose_tile_vnni_oc(o: int, oh: int, ow: int, kw: int) -> Tile:
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


def _requant_lanes(T: Any, acc: Any, m: Any, s: Any, zp: int, qmin: int, qmax: int,
                   lanes: int) -> Any:  # fmt: skip
    """:func:`_requant_vec` with a channel per lane (``m``, ``s``: int32 vectors): in int64
    throughout, exact without the clamp (``|acc * m| < 2**62``, the rounding term
    ``<= 2**61``)."""
    i64 = f"int64x{lanes}"
    s64 = T.cast(s, i64)
    one = T.broadcast(T.int64(1), lanes)
    v = T.shift_right(T.cast(acc, i64) * T.cast(m, i64) + T.shift_left(one, s64 - one), s64)
    v = v + T.broadcast(T.int64(zp), lanes)
    v = T.max(T.min(v, T.broadcast(T.int64(qmax), lanes)), T.broadcast(T.int64(qmin), lanes))
    return T.cast(v, f"int32x{lanes}")


def vnni_lanes(ow: int) -> int:
    """int32 lanes of the VNNI kernel for output rows of ``ow``: 16 (zmm) unless 8 (ymm) wastes
    fewer padded columns (a 7- or 56-column row). Both issue the same multiply-adds per cycle
    on Zen 4 (a zmm ``vpdpbusd`` is two 256-bit halves), so only the padding decides."""
    return 16 if -(-ow // 16) * 16 <= -(-ow // 8) * 8 else 8


def _dense_vnni(
    geo: Geometry,
    x_dtype: str,
    q: QConv,
    tile: Tile | None,
    vl: int,
    x_shape: tuple[int, int, int, int],
    out_shape: tuple[int, int, int, int],
    ocl: bool = False,
) -> tuple[Any, list[np.ndarray]]:
    """AVX-512 VNNI: ``vpdpbusd`` (u8 x s8, 4 products summed into each int32 lane) on
    ``vl`` = 16 (zmm) or 8 (ymm, AVX512VL) lanes.

    The reduction runs over *quads* of input channels: activation word ``xw[n, q, row, phase,
    col]`` holds bytes ``x[4q + k]`` (k = 0..3, low byte first) of one pixel, as uint8 (int8
    activations are made ``x + 128``, a flip of the top bit, and the bias takes
    ``-128 * sum(w)``); weight word ``wq[ob, q, ky, kx, j]`` holds ``w[ob*OBN + j, 4q + k]``
    (zero beyond O and C, so the activation bytes there do not matter). ``vpdpbusd`` is
    non-saturating: a lane's 4 products (each ``|u8 * s8| <= 255 * 128``) and the int32
    accumulator add exactly. Tiles, row phases and the epilogue are as in :func:`_dense`."""
    x_zero_point, weight, bias, shift = q.x_zero_point, q.weight, q.bias, q.shift
    out_zero_point, out_dtype, clamp = q.out_zero_point, q.out_dtype, q.clamp
    from tvm.script import tirx as T

    N, C, H, W, O = geo.n, geo.c, geo.h, geo.w, geo.o  # noqa: E741
    KH, KW, SH, SW, DH, DW = geo.kh, geo.kw, geo.sh, geo.sw, geo.dh, geo.dw
    PT, PL, OH, OW = geo.pt, geo.pl, geo.oh, geo.ow
    VL = vl
    # Few input channels (an RGB input, 3 x 7x7): the quads run over (channel, kx) taps of a
    # kernel row instead of channels (21 taps in 6 quads, not 7 quads of 3 channels). The
    # repack writes, per padded input row and output column x, the bytes
    # xpad[c, row, x * SW + kx] of tap c * KW + kx; the kernel is then a KH x 1 conv over C * KW
    # channels with column stride 1.
    TAPS = KW > 1 and DW == 1 and C < 4 and -(-C * KW // 4) < KW * -(-C // 4)
    C0, KW0, SW0, PL0 = C, KW, SW, PL
    if TAPS:
        weight = np.ascontiguousarray(weight.transpose(0, 1, 3, 2).reshape(O, C * KW, KH, 1))
        C, KW, SW, DW, PL = C * KW, 1, 1, 1, 0
    if tile is None:
        tile = choose_tile_vnni(O, OH, OW, KW, VL)
    OBN, YT, XV = tile.obn, tile.yt, tile.xv
    # Output channels on the lanes: a tile is OBN = OCJ x 16 channels x YT rows x XV columns.
    OCL = ocl
    OCJ = OBN // 16
    if OCL:
        assert VL == 16 and OBN % 16 == 0 and XV <= OW and YT <= OH
    CQ = (C + 3) // 4
    OB = -(-O // OBN)
    TX = XV if OCL else XV * VL
    NX = -(-OW // TX)
    NY = -(-OH // YT)  # the last row tile is moved up to end at OH (overlapping the one before)
    HP = (OH - 1) * SH + (KH - 1) * DH + 1
    WQ = NX * TX + ((KW - 1) * DW) // SW
    XSIZE = N * CQ * HP * SW * WQ
    NR, NT = N * CQ * HP, N * OB * NY * NX
    # Padded input rows as bytes (strided repack), long enough for the last SW*VL-byte load.
    RWD = -(-(SW * WQ + SW * VL) // VL) * VL
    if TAPS:
        NR = N * HP
        RWD = -(-(SW0 * WQ + KW0 + SW0 * VL) // VL) * VL
    qmin, qmax = clamp
    ZP = int(x_zero_point)
    SHIFTED = x_dtype == "int8"
    ZPW = int(np.array([(ZP + 128 * SHIFTED) & 0xFF] * 4, dtype=np.uint8).view(np.int32)[0])
    BYTES = f"int8x{4 * VL}"
    INTRIN = _VPDPBUSD[VL]

    wpad = np.zeros((OB * OBN, 4 * CQ, KH, KW), dtype=np.int8)
    wpad[:O, :C] = weight
    quads = np.ascontiguousarray(wpad.reshape(OB * OBN, CQ, 4, KH, KW).transpose(0, 1, 3, 4, 2))
    words = quads.view(np.int32)[..., 0]  # (OB*OBN, CQ, KH, KW), little-endian: byte k = 4q+k
    wq = np.ascontiguousarray(words.reshape(OB, OBN, CQ, KH, KW).transpose(0, 2, 3, 4, 1))
    bias2 = bias.astype(np.int64)
    if SHIFTED:
        bias2 = bias2 - 128 * weight.astype(np.int64).sum(axis=(1, 2, 3))
    if np.any(np.abs(bias2) >= 2**31):
        bias2 = np.clip(bias2, INT32_MIN, INT32_MAX)  # only if the true accumulator overflows
    ep = _epilogue_consts(bias2.astype(np.int32), q,
                          OB * OBN)  # fmt: skip
    BIG = bool(np.all(shift >= 32))  # see _requant_vec
    EPS = (EP_COLS, OB * OBN) if OCL else (OB * OBN, EP_COLS)

    def quad(b: list[Any], lanes: int) -> Any:
        """int32 word(s) of 4 activation bytes loaded as int32 (``lanes`` 1: a scalar). Shifts
        and ors only: TVM emits ``add`` with ``nsw``, which a top byte >= 128 would break."""

        def k(v: int) -> Any:
            return v if lanes == 1 else T.broadcast(v, lanes)

        if SHIFTED:  # the two's-complement bytes with the top bit flipped: x + 128
            b = [v & k(0xFF) for v in b[:3]] + [b[3]]
        w = b[0] | (b[1] << k(8)) | (b[2] << k(16)) | (b[3] << k(24))
        return w ^ k(-0x7F7F7F80) if SHIFTED else w  # -0x7F7F7F80 == int32(0x80808080)

    def slot(j: Any, yy: Any, v: Any) -> Any:
        return T.ramp(((j * YT + yy) * XV + v) * VL, 1, VL)

    init, store = _tile_macros(T, OBN, YT, XV, VL, O, OH, OW, out_dtype,
                               _x86_requant(T, out_zero_point, qmin, qmax, BIG, VL))

    @T.prim_func
    def conv_vnni(
        x: T.Buffer(x_shape, x_dtype),
        wq_: T.Buffer((OB, CQ, KH, KW, OBN), "int32"),
        ep_: T.Buffer(EPS, "int32"),
        out: T.Buffer(out_shape, out_dtype),
    ):
        T.func_attr({"global_symbol": "conv2d_int8", "tirx.noalias": True})
        xf = T.decl_buffer((N * C0 * H * W,), x_dtype, data=x.data)
        of = T.decl_buffer((N * O * OH * OW,), out_dtype, data=out.data)
        xw = T.alloc_buffer((XSIZE,), "int32")
        # Stage 1: repack the activation into quad words, padded, stride phases split.
        if TAPS:
            for chunk in T.parallel(_chunks(NR)):
                rowt = T.alloc_buffer((C0 * RWD + VL,), x_dtype, scope="local")
                for r in range(chunk * NR // _chunks(NR), (chunk + 1) * NR // _chunks(NR)):
                    nn = T.Bind(r // HP)
                    row = T.Bind(r % HP - PT)
                    if row < 0 or row >= H:
                        for cq in range(CQ):
                            for q in range(WQ):
                                xw[((nn * CQ + cq) * HP + r % HP) * WQ + q] = ZPW
                    else:
                        for k in T.unroll(C0):
                            src = T.Bind((nn * C0 + k) * H * W + row * W)
                            for q in range(PL0):
                                rowt[k * RWD + q] = T.cast(ZP, x_dtype)
                            for v in range(W // VL):
                                rowt[T.ramp(k * RWD + PL0 + v * VL, 1, VL)] = xf[
                                    T.ramp(src + v * VL, 1, VL)
                                ]
                            for q in range(W // VL * VL, W):
                                rowt[k * RWD + PL0 + q] = xf[src + q]
                            for v in range((RWD - PL0 - W + VL - 1) // VL):
                                rowt[T.ramp(k * RWD + PL0 + W + v * VL, 1, VL)] = T.broadcast(
                                    T.cast(ZP, x_dtype), VL
                                )
                        for cq in T.unroll(CQ):
                            for v in range(WQ // VL):
                                xw[T.ramp(((nn * CQ + cq) * HP + r % HP) * WQ + v * VL, 1, VL)] = (
                                    quad([T.cast(T.Shuffle(
                                        [rowt[T.ramp(T.min(4 * cq + k, C - 1) // KW0 * RWD
                                                     + T.min(4 * cq + k, C - 1) % KW0
                                                     + v * SW0 * VL, 1, SW0 * VL)]],
                                        [SW0 * i for i in range(VL)]), f"int32x{VL}")
                                        for k in range(4)], VL)
                                )  # fmt: skip
                            for q in range(WQ // VL * VL, WQ):
                                xw[((nn * CQ + cq) * HP + r % HP) * WQ + q] = quad(
                                    [T.cast(rowt[T.min(4 * cq + k, C - 1) // KW0 * RWD
                                                 + T.min(4 * cq + k, C - 1) % KW0 + q * SW0],
                                            "int32") for k in range(4)], 1)  # fmt: skip
        else:
            for chunk in T.parallel(_chunks(NR)):
                rowb = T.alloc_buffer((4 * RWD + VL,), x_dtype, scope="local")
                for r in range(chunk * NR // _chunks(NR), (chunk + 1) * NR // _chunks(NR)):
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
                        for q in range(PL):
                            xw[base + q] = ZPW
                        for v in range(W // VL):
                            at = row * W + v * VL
                            xw[T.ramp(base + PL + v * VL, 1, VL)] = quad(
                                [T.cast(xf[T.ramp(cc + at, 1, VL)], f"int32x{VL}")
                                 for cc in (c0, c1, c2, c3)], VL,
                            )  # fmt: skip
                        for q in range(W // VL * VL, W):
                            xw[base + PL + q] = quad(
                                [T.cast(xf[cc + row * W + q], "int32")
                                 for cc in (c0, c1, c2, c3)], 1
                            )  # fmt: skip
                        for q in range(PL + W, WQ):
                            xw[base + q] = ZPW
                    else:
                        # Strided: the 4 channels' padded rows as bytes, then VL words per step,
                        # each channel's phase taken from one SW*VL-byte load by a byte shuffle
                        # (constant indices: the phase moves the load).
                        for k in T.unroll(4):
                            src = T.Bind((nn * C + T.min(4 * cq + k, C - 1)) * H * W + row * W)
                            for q in range(PL):
                                rowb[k * RWD + q] = T.cast(ZP, x_dtype)
                            for v in range(W // VL):
                                rowb[T.ramp(k * RWD + PL + v * VL, 1, VL)] = xf[
                                    T.ramp(src + v * VL, 1, VL)
                                ]
                            for q in range(W // VL * VL, W):
                                rowb[k * RWD + PL + q] = xf[src + q]
                            for v in range((RWD - PL - W + VL - 1) // VL):
                                rowb[T.ramp(k * RWD + PL + W + v * VL, 1, VL)] = T.broadcast(
                                    T.cast(ZP, x_dtype), VL
                                )
                        for ph in range(SW):
                            for v in range(WQ // VL):
                                xw[T.ramp(base + ph * WQ + v * VL, 1, VL)] = quad(
                                    [T.cast(T.Shuffle([rowb[T.ramp(k * RWD + v * SW * VL + ph, 1,
                                                                   SW * VL)]],
                                                      [SW * i for i in range(VL)]),
                                            f"int32x{VL}")
                                     for k in range(4)], VL,
                                )  # fmt: skip
                            for q in range(WQ // VL * VL, WQ):
                                xw[base + ph * WQ + q] = quad(
                                    [T.cast(rowb[k * RWD + q * SW + ph], "int32")
                                     for k in range(4)], 1
                                )  # fmt: skip
        if OCL:
            # Stage 2, output channels on the lanes: tiles of J x 16 channels x YT rows x P
            # columns (the last column tile moved left to end at OW), one activation word
            # broadcast per pixel, one weight vector per 16 channels.
            for chunk in T.parallel(_chunks(NT)):
                acc = T.alloc_buffer((OBN * YT * XV,), "int32", scope="local")
                res = T.alloc_buffer((VL,), out_dtype, scope="local")
                for t in range(chunk * NT // _chunks(NT), (chunk + 1) * NT // _chunks(NT)):
                    nn = T.Bind(t // (OB * NY * NX))
                    ob = T.Bind(t // (NY * NX) % OB)
                    y0 = T.Bind(T.min(t // NX % NY * YT, OH - YT))
                    x0 = T.Bind(T.min(t % NX * XV, OW - XV))
                    for i in T.unroll(YT * XV):
                        for j in T.unroll(OCJ):
                            acc[T.ramp((i * OCJ + j) * VL, 1, VL)] = ep_[
                                0, T.ramp(ob * OBN + j * VL, 1, VL)
                            ]
                    for cq in range(CQ):
                        for ky in range(KH):
                            for kx in T.unroll(KW):
                                for yy in T.unroll(YT):
                                    for p in T.unroll(XV):
                                        for j in T.unroll(OCJ):
                                            acc[T.ramp(((yy * XV + p) * OCJ + j) * VL, 1, VL)] = (
                                                T.call_llvm_pure_intrin(
                                                    f"int32x{VL}", INTRIN,
                                                    acc[T.ramp(((yy * XV + p) * OCJ + j) * VL, 1,
                                                               VL)],
                                                    T.reinterpret(BYTES, T.broadcast(xw[
                                                        ((((nn * CQ + cq) * HP + (y0 + yy) * SH
                                                           + ky * DH) * SW + kx * DW % SW) * WQ)
                                                        + x0 + p + kx * DW // SW], VL)),
                                                    T.reinterpret(BYTES, wq_[
                                                        ob, cq, ky, kx, T.ramp(j * VL, 1, VL)]),
                                                )
                                            )  # fmt: skip
                    for yy in T.unroll(YT):
                        for p in T.unroll(XV):
                            for j in T.unroll(OCJ):
                                o0 = T.Bind(ob * OBN + j * VL)
                                res[T.ramp(0, 1, VL)] = T.cast(
                                    _requant_lanes(
                                        T, acc[T.ramp(((yy * XV + p) * OCJ + j) * VL, 1, VL)],
                                        ep_[3, T.ramp(o0, 1, VL)],
                                        ep_[4, T.ramp(o0, 1, VL)] + ep_[5, T.ramp(o0, 1, VL)],
                                        out_zero_point, qmin, qmax, VL),
                                    f"{out_dtype}x{VL}")  # fmt: skip
                                for lane in range(VL):
                                    if o0 + lane < O:
                                        of[((nn * O + o0 + lane) * OH + y0 + yy) * OW + x0 + p] = (
                                            res[lane]
                                        )
        else:
            for chunk in T.parallel(_chunks(NT)):
                acc = T.alloc_buffer((OBN * YT * XV * VL,), "int32", scope="local")
                res = T.alloc_buffer((VL,), out_dtype, scope="local")
                for t in range(chunk * NT // _chunks(NT), (chunk + 1) * NT // _chunks(NT)):
                    nn = T.Bind(t // (OB * NY * NX))
                    ob = T.Bind(t // (NY * NX) % OB)
                    y0 = T.Bind(T.min(t // NX % NY * YT, OH - YT))
                    x0 = T.Bind(t % NX * TX)
                    init(acc, ep_, ob)
                    for cq in range(CQ):
                        for ky in range(KH):
                            for kx in T.unroll(KW):
                                for j in T.unroll(OBN):
                                    for yy in T.unroll(YT):
                                        for v in T.unroll(XV):
                                            acc[slot(j, yy, v)] = T.call_llvm_pure_intrin(
                                                f"int32x{VL}",
                                                INTRIN,
                                                acc[slot(j, yy, v)],
                                                T.reinterpret(
                                                    BYTES,
                                                    xw[
                                                        T.ramp(
                                                            ((((nn * CQ + cq) * HP + (y0 + yy) * SH
                                                               + ky * DH) * SW + kx * DW % SW) * WQ)
                                                            + x0 + v * VL + kx * DW // SW,
                                                            1,
                                                            VL,
                                                        )
                                                    ],
                                                ),
                                                T.reinterpret(
                                                    BYTES, T.broadcast(wq_[ob, cq, ky, kx, j], VL)
                                                ),
                                            )  # fmt: skip
                    store(acc, res, of, ep_, nn, ob, y0, x0)

    return _finish(conv_vnni), [wq, np.ascontiguousarray(ep.T) if OCL else ep]


# --------------------------------------------------------------------------------------------
# Dense conv with few input channels: pairs of kernel taps (groups == 1, dilation 1, stride <= 2)


def _dense_direct(
    geo: Geometry,
    x_dtype: str,
    q: QConv,
    tile: Tile | None = None,
) -> tuple[Any, list[np.ndarray]]:
    """The depthwise scheme (taps ``kx``, ``kx + 1`` paired, operands widened straight from the
    padded bytes) with a reduction over the input channels and ``OBN`` output channels per
    tile (weight words ``wq[ob, c, ky, kp, j]``)."""
    x_zero_point, weight, bias, shift = q.x_zero_point, q.weight, q.bias, q.shift
    out_zero_point, out_dtype, clamp = q.out_zero_point, q.out_dtype, q.clamp
    from tvm.script import tirx as T

    N, C, H, W, O = geo.n, geo.c, geo.h, geo.w, geo.o  # noqa: E741
    KH, KW, SH, SW, DH = geo.kh, geo.kw, geo.sh, geo.sw, geo.dh
    PT, PL, OH, OW = geo.pt, geo.pl, geo.oh, geo.ow
    KP = (KW + 1) // 2
    if tile is None:
        tile = choose_tile(O, OH, OW, KW)
    OBN, YT, XV = tile.obn, tile.yt, tile.xv
    OB = -(-O // OBN)
    TX = XV * LANES
    NX = -(-OW // TX)
    NY = -(-OH // YT)
    HP = (OH - 1) * SH + (KH - 1) * DH + 1
    RB = -(-(SW * NX * TX + 2 * KP + 2 * LANES) // LANES) * LANES
    XB = N * C * HP * RB
    NR, NT = N * C * HP, N * OB * NY * NX
    qmin, qmax = clamp
    ZP = int(x_zero_point)
    PAIRS = [i // 2 + i % 2 for i in range(2 * LANES)]

    wpad = np.zeros((OB * OBN, C, KH, 2 * KP), dtype=np.int8)
    wpad[:O, :, :, :KW] = weight
    words = _words(wpad[..., 0::2], wpad[..., 1::2])  # (O', C, KH, KP)
    wq = np.ascontiguousarray(words.reshape(OB, OBN, C, KH, KP).transpose(0, 2, 3, 4, 1))
    ep = _epilogue_consts(bias, q, OB * OBN)
    BIG = bool(np.all(shift >= 32))  # see _requant_vec
    x_shape = (N, C, H, W)
    out_shape = (N, O, OH, OW)

    def taps(xb: Any, at: Any) -> Any:
        v = xb[T.ramp(at, 1, 2 * LANES)]
        return T.cast(v if SW == 2 else T.Shuffle([v], PAIRS), "int16x16")

    def slot(j: Any, yy: Any, v: Any) -> Any:
        return T.ramp(((j * YT + yy) * XV + v) * LANES, 1, LANES)

    init, store = _tile_macros(T, OBN, YT, XV, LANES, O, OH, OW, out_dtype,
                               _x86_requant(T, out_zero_point, qmin, qmax, BIG))
    padded_rows = _padded_rows_macro(T, NR, HP, PT, H, W, RB, PL, ZP, x_dtype, LANES)

    @T.prim_func
    def conv_direct(
        x: T.Buffer(x_shape, x_dtype),
        wq_: T.Buffer((OB, C, KH, KP, OBN), "int32"),
        ep_: T.Buffer((OB * OBN, EP_COLS), "int32"),
        out: T.Buffer(out_shape, out_dtype),
    ):
        T.func_attr({"global_symbol": "conv2d_int8", "tirx.noalias": True})
        xf = T.decl_buffer((N * C * H * W,), x_dtype, data=x.data)
        of = T.decl_buffer((N * O * OH * OW,), out_dtype, data=out.data)
        xb = T.alloc_buffer((XB,), x_dtype)
        # Stage 1: the padded rows as bytes (zero point outside the input).
        padded_rows(xf, xb)
        # Stage 2: tiles of OBN channels x YT rows x XV vectors.
        for chunk in T.parallel(_chunks(NT)):
            acc = T.alloc_buffer((OBN * YT * XV * LANES,), "int32", scope="local")
            res = T.alloc_buffer((LANES,), out_dtype, scope="local")
            for t in range(chunk * NT // _chunks(NT), (chunk + 1) * NT // _chunks(NT)):
                nn = T.Bind(t // (OB * NY * NX))
                ob = T.Bind(t // (NY * NX) % OB)
                y0 = T.Bind(T.min(t // NX % NY * YT, OH - YT))
                x0 = T.Bind(t % NX * TX)
                init(acc, ep_, ob)
                for c in range(C):
                    for ky in range(KH):
                        for kp in T.unroll(KP):
                            for j in T.unroll(OBN):
                                for yy in T.unroll(YT):
                                    for v in T.unroll(XV):
                                        acc[slot(j, yy, v)] = acc[
                                            slot(j, yy, v)
                                        ] + T.call_llvm_pure_intrin(
                                            "int32x8",
                                            _PMADDWD,
                                            taps(
                                                xb,
                                                ((nn * C + c) * HP + (y0 + yy) * SH + ky * DH)
                                                * RB + SW * (x0 + v * LANES) + 2 * kp,
                                            ),
                                            T.reinterpret(
                                                "int16x16",
                                                T.broadcast(wq_[ob, c, ky, kp, j], LANES),
                                            ),
                                        )  # fmt: skip
                store(acc, res, of, ep_, nn, ob, y0, x0)

    return _finish(conv_direct), [wq, ep]


# --------------------------------------------------------------------------------------------
# Depthwise conv (groups == C == O)


def _depthwise(
    geo: Geometry,
    x_dtype: str,
    q: QConv,
    tile: Tile | None = None,
) -> tuple[Any, list[np.ndarray]] | None:
    x_zero_point, weight, bias, shift = q.x_zero_point, q.weight, q.bias, q.shift
    out_zero_point, out_dtype, clamp = q.out_zero_point, q.out_dtype, q.clamp
    from tvm.script import tirx as T

    N, C, H, W = geo.n, geo.c, geo.h, geo.w
    KH, KW, SH, SW, DH, DW = geo.kh, geo.kw, geo.sh, geo.sw, geo.dh, geo.dw
    PT, PL, OH, OW = geo.pt, geo.pl, geo.oh, geo.ow
    KP = (KW + 1) // 2  # tap pairs per kernel row
    if tile is None:
        # One column vector, several rows: rows share operands (row y+1's tap ky is row y's
        # tap ky+1), and no row is padded to a multiple of 2 vectors (measured best).
        XV = 1
        YT = min(8 if SH == 1 else 4, OH)
    else:
        XV, YT = tile.xv, tile.yt
    TX = XV * LANES
    NX = -(-OW // TX)
    NY = -(-OH // YT)  # the last row tile is moved up to end at OH (overlapping the one before)
    HP = (OH - 1) * SH + (KH - 1) * DH + 1
    WQ = NX * TX + (2 * (KP - 1) * DW) // SW
    # The padded row as bytes (zero point outside the input): the words are read from it with
    # unconditional vector loads. Long enough for the last word's second half.
    RW = -(-(SW * WQ + SW + DW + 2 * LANES) // LANES) * LANES
    XSIZE = N * C * HP * SW * WQ
    NR, NT = N * C * HP, N * C * NY * NX  # repacked rows, register tiles
    qmin, qmax = clamp
    ZP = int(x_zero_point)
    SIGNED = x_dtype == "int8"
    # Dilation 1, stride 1 or 2: the tiles read the padded bytes directly. Stride 2: taps
    # (u, u+1) of 8 output columns are 16 adjacent bytes, one widening load; stride 1: 9 bytes,
    # duplicated into pairs by one byte shuffle, then widened.
    DIRECT = SW in (1, 2) and DW == 1
    PAIRS = [i // 2 + i % 2 for i in range(2 * LANES)]  # 0, 1, 1, 2, 2, ..., 7, 8

    wpad = np.zeros((C, KH, 2 * KP), dtype=np.int8)
    wpad[:, :, :KW] = weight[:, 0]
    wq = np.ascontiguousarray(_words(wpad[:, :, 0::2], wpad[:, :, 1::2]))  # (C, KH, KP)
    ep = _epilogue_consts(bias, q, C)
    BIG = bool(np.all(shift >= 32))  # see _requant_vec
    x_shape = (N, C, H, W)
    out_shape = (N, C, OH, OW)

    def wordv(lo: Any, hi: Any) -> Any:
        if SIGNED:
            return (lo & T.broadcast(0xFFFF, LANES)) | (hi << T.broadcast(16, LANES))
        return lo | (hi << T.broadcast(16, LANES))

    def word(lo: Any, hi: Any) -> Any:
        if SIGNED:
            return (lo & 0xFFFF) | (hi << 16)
        return lo | (hi << 16)

    def taps(xb: Any, at: Any) -> Any:
        """int16x16 operand of a tap pair for 8 output columns, from padded bytes at ``at``."""
        v = xb[T.ramp(at, 1, 2 * LANES)]
        return T.cast(v if SW == 2 else T.Shuffle([v], PAIRS), "int16x16")

    init, store = _tile_macros(T, 1, YT, XV, LANES, C, OH, OW, out_dtype,
                               _x86_requant(T, out_zero_point, qmin, qmax, BIG))

    if DIRECT:
        # No words at all: the padded image as bytes, read by the tiles with widening loads.
        RB = -(-(SW * NX * TX + 2 * KP + 2 * LANES) // LANES) * LANES
        XB = N * C * HP * RB
        padded_rows = _padded_rows_macro(T, NR, HP, PT, H, W, RB, PL, ZP, x_dtype, LANES)

        @T.prim_func
        def dwconv_direct(
            x: T.Buffer(x_shape, x_dtype),
            wq_: T.Buffer((C, KH, KP), "int32"),
            ep_: T.Buffer((C, EP_COLS), "int32"),
            out: T.Buffer(out_shape, out_dtype),
        ):
            T.func_attr({"global_symbol": "dwconv2d_int8", "tirx.noalias": True})
            xf = T.decl_buffer((N * C * H * W,), x_dtype, data=x.data)
            of = T.decl_buffer((N * C * OH * OW,), out_dtype, data=out.data)
            xb = T.alloc_buffer((XB,), x_dtype)
            # Stage 1: the padded rows (zero point outside the input).
            padded_rows(xf, xb)
            # Stage 2: as dwconv below, the operands made from the bytes by taps().
            for chunk in T.parallel(_chunks(NT)):
                acc = T.alloc_buffer((YT * XV * LANES,), "int32", scope="local")
                res = T.alloc_buffer((LANES,), out_dtype, scope="local")
                for t in range(chunk * NT // _chunks(NT), (chunk + 1) * NT // _chunks(NT)):
                    nc = T.Bind(t // (NY * NX))
                    c = T.Bind(nc % C)
                    y0 = T.Bind(T.min(t // NX % NY * YT, OH - YT))
                    x0 = T.Bind(t % NX * TX)
                    init(acc, ep_, c)
                    for ky in T.unroll(KH):
                        for kp in T.unroll(KP):
                            for yy in T.unroll(YT):
                                for v in T.unroll(XV):
                                    acc[T.ramp((yy * XV + v) * LANES, 1, LANES)] = acc[
                                        T.ramp((yy * XV + v) * LANES, 1, LANES)
                                    ] + T.call_llvm_pure_intrin(
                                        "int32x8",
                                        _PMADDWD,
                                        taps(
                                            xb,
                                            (nc * HP + (y0 + yy) * SH + ky * DH) * RB
                                            + SW * (x0 + v * LANES) + 2 * kp
                                        ),
                                        T.reinterpret(
                                            "int16x16", T.broadcast(wq_[c, ky, kp], LANES)
                                        ),
                                    )  # fmt: skip
                    store(acc, res, of, ep_, nc // C, c, y0, x0)

        return _finish(dwconv_direct), [wq, ep]

    @T.prim_func
    def dwconv(
        x: T.Buffer(x_shape, x_dtype),
        wq_: T.Buffer((C, KH, KP), "int32"),
        ep_: T.Buffer((C, EP_COLS), "int32"),
        out: T.Buffer(out_shape, out_dtype),
    ):
        T.func_attr({"global_symbol": "dwconv2d_int8", "tirx.noalias": True})
        xf = T.decl_buffer((N * C * H * W,), x_dtype, data=x.data)
        of = T.decl_buffer((N * C * OH * OW,), out_dtype, data=out.data)
        xw = T.alloc_buffer((XSIZE,), "int32")
        # Stage 1: per (n, c, padded row): the padded row as bytes, then its tap-pair words.
        # Rows in up to 64 parallel chunks (see the module docstring).
        for chunk in T.parallel(_chunks(NR)):
            rowb = T.alloc_buffer((RW + LANES,), x_dtype, scope="local")
            for r in range(chunk * NR // _chunks(NR), (chunk + 1) * NR // _chunks(NR)):
                row = T.Bind(r % HP - PT)
                src = T.Bind(r // HP * H * W + row * W)
                base = T.Bind(r * SW * WQ)
                # Only the border gets the zero point (vector stores; the buffer has a spare
                # vector at the end for the last one).
                if row >= 0 and row < H:
                    for q in range(PL):
                        rowb[q] = T.cast(ZP, x_dtype)
                    for v in range(W // LANES):
                        rowb[T.ramp(PL + v * LANES, 1, LANES)] = xf[
                            T.ramp(src + v * LANES, 1, LANES)
                        ]
                    for q in range(W // LANES * LANES, W):
                        rowb[PL + q] = xf[src + q]
                    for v in range((RW - PL - W + LANES - 1) // LANES):
                        rowb[T.ramp(PL + W + v * LANES, 1, LANES)] = T.broadcast(
                            T.cast(ZP, x_dtype), LANES
                        )
                else:
                    for v in range(RW // LANES):
                        rowb[T.ramp(v * LANES, 1, LANES)] = T.broadcast(T.cast(ZP, x_dtype), LANES)
                for ph in range(SW):
                    for v in range(WQ // LANES):
                        xw[T.ramp(base + ph * WQ + v * LANES, 1, LANES)] = wordv(
                            T.cast(rowb[T.ramp(ph + v * SW * LANES, SW, LANES)], "int32x8"),
                            T.cast(
                                rowb[T.ramp(ph + v * SW * LANES + DW, SW, LANES)], "int32x8"
                            ),
                        )
                    for q in range(WQ // LANES * LANES, WQ):
                        xw[base + ph * WQ + q] = word(
                            T.cast(rowb[q * SW + ph], "int32"),
                            T.cast(rowb[q * SW + ph + DW], "int32"),
                        )
        # Stage 2: tiles of one channel x YT rows x XV vectors.
        # Tiles in up to 64 parallel chunks, local buffers allocated once per chunk.
        for chunk in T.parallel(_chunks(NT)):
            acc = T.alloc_buffer((YT * XV * LANES,), "int32", scope="local")
            res = T.alloc_buffer((LANES,), out_dtype, scope="local")
            for t in range(chunk * NT // _chunks(NT), (chunk + 1) * NT // _chunks(NT)):
                nc = T.Bind(t // (NY * NX))
                c = T.Bind(nc % C)
                y0 = T.Bind(T.min(t // NX % NY * YT, OH - YT))
                x0 = T.Bind(t % NX * TX)
                init(acc, ep_, c)
                for ky in T.unroll(KH):
                    for kp in T.unroll(KP):
                        for yy in T.unroll(YT):
                            for v in T.unroll(XV):
                                acc[T.ramp((yy * XV + v) * LANES, 1, LANES)] = acc[
                                    T.ramp((yy * XV + v) * LANES, 1, LANES)
                                ] + T.call_llvm_pure_intrin(
                                    "int32x8",
                                    _PMADDWD,
                                    T.reinterpret(
                                        "int16x16",
                                        xw[
                                            T.ramp(
                                                ((nc * HP + (y0 + yy) * SH + ky * DH) * SW
                                                 + 2 * kp * DW % SW) * WQ
                                                + x0 + v * LANES + 2 * kp * DW // SW,
                                                1,
                                                LANES,
                                            )
                                        ],
                                    ),
                                    T.reinterpret("int16x16", T.broadcast(wq_[c, ky, kp], LANES)),
                                )  # fmt: skip
                store(acc, res, of, ep_, nc // C, c, y0, x0)

    return _finish(dwconv), [wq, ep]


def _requant_vec(
    T: Any,
    acc: Any,
    lo: Any,
    hi: Any,
    m: Any,
    s1: Any,
    s2: Any,
    zp: int,
    qmin: int,
    qmax: int,
    big: bool = False,
    lanes: int = LANES,
) -> Any:
    """int32 x ``lanes`` output values of int32 x ``lanes`` accumulators (bias included) for
    one channel, exactly as the module docstring's epilogue: clamp, int64 multiply + round, the
    two shifts, clip.

    Written on the even and odd int32 lanes as 4 x int64 each (``vpmuldq`` multiplies the
    sign-extended low halves of int64 lanes), so that no lane is moved before the end: the even
    results are shifted right by ``s1`` (their low 32 bits stay in place), the odd ones left by
    ``32 - s1`` (the same 32 bits land in the high half), and one ``vpblendd`` merges them.

    ``big``: every channel shifts by >= 32 (the usual case: scales below 1). Then
    ``|acc * m| / 2**shift < 2**30`` for any int32 accumulator, so the clamp is not needed,
    ``s1`` is 32 and the odd lanes need no shift at all."""
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


# --------------------------------------------------------------------------------------------
# Max pool


POOL_LANES = 16  # uint8 / int8 lanes of an xmm register: a row of the pool in few vectors


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


def max_pool2d_int8(
    x_shape: tuple[int, int, int, int],
    dtype: str,
    pool: tuple[int, int],
    strides: tuple[int, int],
    padding: tuple[int, int, int, int],
    target: Any,
) -> Any | None:
    """A scheduled PrimFunc ``(x, out)``: the 8-bit max pool of
    :func:`reference_max_pool2d_int8` (NCHW, dilation 1, floor mode), or None where there is
    none (not x86 with AVX2, strides other than 1 and 2, windows larger than their stride
    allows the row buffer below to hold).

    Max pooling commutes with the (increasing) dequantize, so it runs on the quantized tensor
    itself, exactly. Per output row (rows in parallel chunks):

    1. the rows' maximum over the window rows inside the input, as bytes in a row buffer whose
       ``pl`` first and last bytes are the type's minimum (the identity of ``max``; the column
       padding), one contiguous vector of 16 bytes at a time (the last one moved back to end at
       the row's end: overlapping, never past it);
    2. 16 outputs at a time: the maximum over ``kx`` of the buffer's bytes ``x*sw + kx``; for
       stride 2 one contiguous 32-byte load whose even bytes a shuffle picks (``vpshufb`` /
       ``vpermb``), not 16 scalar loads. The last vector is again moved back to end at the row's
       end; rows narrower than 16 outputs use one vector of exactly their width.

    TVM's own max pool (a scalar loop over the window, the padded copy per element) took
    0.245 ms for ResNet-18's 64 x 112 x 112 3x3/2 pool on one Zen 4 core; this takes 0.065 ms
    (32- and 64-byte vectors: 0.17 and 0.20 ms, their stride-2 shuffles cost more).
    """
    from tvm.script import tirx as T

    n, c, h, w = (int(d) for d in x_shape)
    kh, kw = (int(k) for k in pool)
    sh, sw = (int(s) for s in strides)
    pt, pl, pb, pr = (int(p) for p in padding)
    if dtype not in _DTYPES or not supports_avx2(target):
        return None
    if sh not in (1, 2) or sw not in (1, 2) or min(pt, pl, pb, pr) < 0:
        return None
    if pt >= kh or pb >= kh or pl >= kw or pr >= kw:  # a window wholly in the padding
        return None
    oh = (h + pt + pb - kh) // sh + 1
    ow = (w + pl + pr - kw) // sw + 1
    if oh < 1 or ow < 1:
        return None
    N, C, H, W, KH, KW, SH, SW, PT, PL = n, c, h, w, kh, kw, sh, sw, pt, pl
    OH, OW = oh, ow
    LO = _DTYPES[dtype][0]
    # Input row vectors: 16 bytes, or the whole row if narrower (one odd-sized vector).
    IV = min(POOL_LANES, W)
    NIV = -(-W // IV)
    OV = min(POOL_LANES, OW)
    NOV = -(-OW // OV)
    # The row buffer: the padded row; after it, what the last output vector's loads read
    # beyond the row (the type's minimum too), in whole vectors.
    TAIL = -(-(SW * OV + KW) // POOL_LANES) * POOL_LANES
    RB = PL + W + TAIL
    NR = N * C * OH  # output rows
    CH = _chunks(NR)
    x_shape_ = (N, C, H, W)
    out_shape = (N, C, OH, OW)
    EVEN = [SW * i for i in range(OV)]

    def window(rows: Any, at: Any) -> Any:
        """``OV`` values ``rows[at + x*SW]``, x = 0..OV-1 (one contiguous load)."""
        if SW == 1:
            return rows[T.ramp(at, 1, OV)]
        return T.Shuffle([rows[T.ramp(at, 1, SW * OV)]], EVEN)

    def window_max(rows: Any, at: Any) -> Any:
        """The maximum over the window's columns of ``OV`` outputs starting at ``at``."""
        m = window(rows, at)
        for kx in range(1, KW):
            m = T.max(m, window(rows, at + kx))
        return m

    lo = T.broadcast(T.cast(LO, dtype), POOL_LANES)

    @T.prim_func
    def max_pool(x: T.Buffer(x_shape_, dtype), out: T.Buffer(out_shape, dtype)):
        T.func_attr({"global_symbol": "max_pool2d_int8", "tirx.noalias": True})
        xf = T.decl_buffer((N * C * H * W,), dtype, data=x.data)
        of = T.decl_buffer((N * C * OH * OW,), dtype, data=out.data)
        # One row buffer per chunk (a local buffer in a parallel loop would be allocated per
        # iteration, see the module docstring).
        rows = T.alloc_buffer((CH * RB,), dtype)
        for chunk in T.parallel(CH):
            rb = T.Bind(chunk * RB)
            # The column padding: written once, the rows only overwrite [PL, PL + W).
            for q in range(PL):
                rows[rb + q] = T.cast(LO, dtype)
            for v in range(TAIL // POOL_LANES):
                rows[T.ramp(rb + PL + W + v * POOL_LANES, 1, POOL_LANES)] = lo
            for r in range(chunk * NR // CH, (chunk + 1) * NR // CH):
                nc = T.Bind(r // OH)
                y = T.Bind(r % OH)
                # The window's first row inside the input (every window has one: pt, pb < kh),
                # copied; then the maximum with each row inside (itself again: max is
                # idempotent).
                first = T.Bind((nc * H + T.max(y * SH - PT, 0)) * W)
                for v in range(NIV):
                    j = T.Bind(T.min(v * IV, W - IV))
                    rows[T.ramp(rb + PL + j, 1, IV)] = xf[T.ramp(first + j, 1, IV)]
                for ky in T.unroll(KH):
                    row = T.Bind(y * SH + ky - PT)
                    if row >= 0 and row < H:
                        for v in range(NIV):
                            j = T.Bind(T.min(v * IV, W - IV))
                            rows[T.ramp(rb + PL + j, 1, IV)] = T.max(
                                rows[T.ramp(rb + PL + j, 1, IV)],
                                xf[T.ramp((nc * H + row) * W + j, 1, IV)],
                            )
                for v in range(NOV):
                    x0 = T.Bind(T.min(v * OV, OW - OV))
                    of[T.ramp((nc * OH + y) * OW + x0, 1, OV)] = window_max(rows, rb + x0 * SW)

    return _finish(_in_root_block(max_pool))


def _in_root_block(func: Any) -> Any:
    """``func`` with its body inside an (empty) root block. Relax's RewriteDataflowReshape
    checks every one-input ``call_tir`` for a reshape, and that check requires a block-rooted
    body (it fails on a plain loop nest); the kernels with constant inputs are not checked."""
    from tvm import s_tir

    root = s_tir.SBlock([], [], [], "root", func.body)
    return func.with_body(s_tir.SBlockRealize([], True, root))


# --------------------------------------------------------------------------------------------
# Dense layer with a float output (a classifier's last Gemm)


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


DENSE_OCJ = 4  # zmm accumulators per tile of the dense kernel: 64 outputs, 4 independent chains


def dense_int8_float(
    x_shape: tuple[int, int],
    x_dtype: str,
    x_zero_point: int,
    weight: np.ndarray,
    scale: np.ndarray,
    bias: np.ndarray,
    target: Any,
) -> tuple[Any, list[np.ndarray]] | None:
    """A scheduled PrimFunc ``(x, wq, ep, out)`` and its constants ``[wq, ep]`` for the dense
    layer of :func:`reference_dense_int8_float` (``x`` (N, NI) 8-bit, ``weight`` (NO, NI) int8,
    ``out`` (N, NO) float32), or None where there is none (not AVX-512 VNNI; an accumulator that
    could leave int32).

    AVX-512 VNNI, output channels on the lanes: the weight is packed at compile time as
    ``wq[ob, q, j]`` = the int32 word of ``weight[16 ob + j, 4q .. 4q+3]``; each step
    broadcasts one word of 4 input bytes and ``vpdpbusd`` adds its 4 products to 16 outputs, for
    ``DENSE_OCJ`` vectors (64 outputs) per tile. int8 inputs are shifted to uint8 (``x ^ 0x80 =
    x + 128``) as ``vpdpbusd`` wants; the accumulator starts at ``-(z_x + 128 shifted) sum_i
    W[o, i]``, which takes both the shift and the zero point out, so it ends at the exact
    ``sum (x - z_x) W``. Then ``float32(acc) * scale[o] + bias[o]``.

    TVM's Relax matmul (uint8 x int8 -> int32 then the float epilogue, bnfold's dense schedule)
    took 0.159 ms for ResNet-18's 512 -> 1000 layer on one Zen 4 core (the float matmul on the
    dequantized weight 0.18 ms); this takes 0.007 ms alone, 0.024 ms inside the model (where
    the 512 KB weight comes from L3).
    """
    from tvm.script import tirx as T

    if x_dtype not in _DTYPES or weight.dtype != np.int8 or weight.ndim != 2:
        return None
    if not supports_vnni(target):
        return None
    N, NI = (int(d) for d in x_shape)
    NO = int(weight.shape[0])
    if int(weight.shape[1]) != NI:
        return None
    SHIFTED = x_dtype == "int8"
    init = -(int(x_zero_point) + 128 * SHIFTED) * weight.astype(np.int64).sum(axis=1)
    # |acc| <= NI * 255 * 128 at every step (the products of uint8 and int8 bytes) plus init.
    if np.any(np.abs(init) + NI * 255 * 128 >= 2**31):
        return None
    VL, OCJ = 16, DENSE_OCJ
    OBN = VL * OCJ
    OB = -(-NO // OBN)
    IQ = -(-NI // 4)
    wpad = np.zeros((OB * OBN, 4 * IQ), dtype=np.int8)
    wpad[:NO, :NI] = weight
    words = np.ascontiguousarray(wpad.reshape(OB * OBN, IQ, 4)).view(np.int32)[..., 0]
    wq = np.ascontiguousarray(words.reshape(OB, OBN, IQ).transpose(0, 2, 1))  # (OB, IQ, OBN)
    ep = np.zeros((3, OB * OBN), dtype=np.float32)
    ep[0, :NO] = init.astype(np.int32).view(np.float32)  # the int32 start, stored bitwise
    ep[1, :NO] = scale
    ep[2, :NO] = bias
    NT = N * OB
    XB = N * 4 * IQ
    FLIP = 0x80 if SHIFTED else 0
    BYTES = f"int8x{4 * VL}"
    INTRIN = _VPDPBUSD[VL]

    @T.prim_func
    def dense(
        x: T.Buffer((N, NI), x_dtype),
        wq_: T.Buffer((OB, IQ, OBN), "int32"),
        ep_: T.Buffer((3, OB * OBN), "float32"),
        out: T.Buffer((N, NO), "float32"),
    ):
        T.func_attr({"global_symbol": "dense_int8_float", "tirx.noalias": True})
        xf = T.decl_buffer((N * NI,), x_dtype, data=x.data)
        of = T.decl_buffer((N * NO,), "float32", data=out.data)
        # The input as uint8 quads, zero bytes after NI (their weight bytes are zero too).
        xb = T.alloc_buffer((XB,), "uint8")
        xw = T.decl_buffer((N * IQ,), "int32", data=xb.data)
        for i in range(N * 4 * IQ):
            if i % (4 * IQ) < NI:
                xb[i] = T.cast(xf[i // (4 * IQ) * NI + i % (4 * IQ)], "uint8") ^ T.uint8(FLIP)
            else:
                xb[i] = T.uint8(0)
        for chunk in T.parallel(_chunks(NT)):
            acc = T.alloc_buffer((OBN,), "int32", scope="local")
            res = T.alloc_buffer((OBN,), "float32", scope="local")
            for t in range(chunk * NT // _chunks(NT), (chunk + 1) * NT // _chunks(NT)):
                nn = T.Bind(t // OB)
                ob = T.Bind(t % OB)
                for j in T.unroll(OCJ):
                    acc[T.ramp(j * VL, 1, VL)] = T.reinterpret(
                        f"int32x{VL}", ep_[0, T.ramp(ob * OBN + j * VL, 1, VL)]
                    )
                for q in range(IQ):
                    for j in T.unroll(OCJ):
                        acc[T.ramp(j * VL, 1, VL)] = T.call_llvm_pure_intrin(
                            f"int32x{VL}", INTRIN, acc[T.ramp(j * VL, 1, VL)],
                            T.reinterpret(BYTES, T.broadcast(xw[nn * IQ + q], VL)),
                            T.reinterpret(BYTES, wq_[ob, q, T.ramp(j * VL, 1, VL)]),
                        )  # fmt: skip
                for j in T.unroll(OCJ):
                    o0 = T.Bind(ob * OBN + j * VL)
                    res[T.ramp(j * VL, 1, VL)] = (
                        T.cast(acc[T.ramp(j * VL, 1, VL)], f"float32x{VL}")
                        * ep_[1, T.ramp(o0, 1, VL)]
                        + ep_[2, T.ramp(o0, 1, VL)]
                    )
                    if o0 + VL <= NO:
                        of[T.ramp(nn * NO + o0, 1, VL)] = res[T.ramp(j * VL, 1, VL)]
                    else:
                        for lane in range(VL):
                            if o0 + lane < NO:
                                of[nn * NO + o0 + lane] = res[j * VL + lane]

    return _finish(dense), [wq, ep]


# --------------------------------------------------------------------------------------------
# Add of two quantized tensors (a residual connection)


ADD_LANES = 16  # float32 lanes of a zmm register (two ymm halves on AVX2)


def reference_add_int8(
    a: np.ndarray, a_scale: float, a_zero_point: int,
    b: np.ndarray, b_scale: float, b_zero_point: int,
    y_scale: float, y_zero_point: int, out_dtype: str, clamp: tuple[int, int],
) -> np.ndarray:  # fmt: skip
    """numpy, float32 as onnxruntime computes ``Q(DQ(a) + DQ(b))`` on a QDQ model:
    ``clip(round_half_even((float(a - z_a) * s_a + float(b - z_b) * s_b) / s_y) + z_y, lo, hi)``
    (each operation rounded to float32)."""
    f32 = np.float32
    da = (a.astype(np.int32) - int(a_zero_point)).astype(f32) * f32(a_scale)
    db = (b.astype(np.int32) - int(b_zero_point)).astype(f32) * f32(b_scale)
    v = np.rint((da + db) / f32(y_scale)) + f32(y_zero_point)
    return np.clip(v, clamp[0], clamp[1]).astype(out_dtype)


def add_int8(
    shape: tuple[int, ...],
    a_dtype: str, a_scale: float, a_zero_point: int,
    b_dtype: str, b_scale: float, b_zero_point: int,
    y_scale: float, y_zero_point: int, out_dtype: str, clamp: tuple[int, int],
    target: Any,
) -> Any | None:  # fmt: skip
    """A scheduled PrimFunc ``(a, b, out)`` for :func:`reference_add_int8` on two 8-bit
    tensors of the same ``shape`` (no broadcasting), or None where there is none (not x86
    with AVX2). ``clamp`` takes a following ReLU (``lo = max(lo, z_y)``).

    The same float32 arithmetic as onnxruntime's ``DequantizeLinear -> Add -> QuantizeLinear``
    (the division by ``s_y`` kept: a reciprocal multiply would move more values across a
    rounding tie), on 16 lanes over the flat tensor, elements in parallel chunks; the last
    vector moved back to end at the tensor's end (overlapping, never past it). LLVM may
    contract the products and the sum into one FMA (one rounding fewer than onnxruntime):
    a rounding tie can then flip, 1 LSB at most.

    TVM's fused float function (the same formula, 14-lane vectors along 56-column rows) took
    0.053 ms for ResNet-18's 64 x 56 x 56 residual add on one Zen 4 core; this takes 0.036 ms
    (32 or 64 lanes: the same; a reciprocal multiply instead of the division: 0.033 ms).
    """
    from tvm.script import tirx as T

    if a_dtype not in _DTYPES or b_dtype not in _DTYPES or out_dtype not in _DTYPES:
        return None
    if not supports_avx2(target):
        return None
    TOTAL = int(np.prod(shape))
    VL = min(ADD_LANES, TOTAL)
    NV = -(-TOTAL // VL)
    CH = _chunks(max(1, NV // 64))  # chunks of >= 64 vectors: the task overhead stays small
    ZA, ZB, ZY = int(a_zero_point), int(b_zero_point), int(y_zero_point)
    SA, SB, SY = (float(np.float32(v)) for v in (a_scale, b_scale, y_scale))
    LO, HI = float(clamp[0]), float(clamp[1])
    fv = f"float32x{VL}"

    def dq(buf: Any, at: Any, zp: int, s: float) -> Any:
        v = T.cast(T.cast(buf[T.ramp(at, 1, VL)], f"int32x{VL}") - T.broadcast(zp, VL), fv)
        return v * T.broadcast(T.float32(s), VL)

    @T.prim_func
    def add(
        a: T.Buffer(shape, a_dtype), b: T.Buffer(shape, b_dtype), out: T.Buffer(shape, out_dtype)
    ):
        T.func_attr({"global_symbol": "add_int8", "tirx.noalias": True})
        af = T.decl_buffer((TOTAL,), a_dtype, data=a.data)
        bf = T.decl_buffer((TOTAL,), b_dtype, data=b.data)
        of = T.decl_buffer((TOTAL,), out_dtype, data=out.data)
        for chunk in T.parallel(CH):
            for v in range(chunk * NV // CH, (chunk + 1) * NV // CH):
                at = T.Bind(T.min(v * VL, TOTAL - VL))
                q = T.round((dq(af, at, ZA, SA) + dq(bf, at, ZB, SB)) / T.broadcast(
                    T.float32(SY), VL)) + T.broadcast(T.float32(ZY), VL)  # fmt: skip
                of[T.ramp(at, 1, VL)] = T.cast(
                    T.max(T.min(q, T.broadcast(T.float32(HI), VL)),
                          T.broadcast(T.float32(LO), VL)),
                    f"{out_dtype}x{VL}",
                )  # fmt: skip

    return _finish(add)
