"""aarch64 NEON int8 conv kernels: the math, the numpy reference, the register-tile macros
and the requantize epilogue's constants are those of :mod:`bnfold.targets._int8`, whose
:func:`~bnfold.targets._int8.conv2d_int8` dispatches here for aarch64 targets.

Dense convs (``groups == 1``), chosen by :func:`dense` from the target's features:

* with the ARMv8.2-A dot product (``+dotprod``: ``mcpu`` ``cortex-a55``, ``cortex-a76``,
  ``neoverse-n1`` and later, or ``mattr`` ``+dotprod``; :func:`supports_dotprod`):
  :func:`_dense_sdot`. ``sdot`` multiplies 4 signed bytes by 4 signed bytes and adds the 4
  products to each int32 lane without saturation: 16 multiply-adds per instruction, exact for
  every int8 weight. The reduction runs over quads of input channels (one 32-bit word per
  pixel), each ``sdot`` takes one output channel's weight word by lane index from a register
  holding 4 channels, register tiles of up to 24 accumulators: the layout of the AVX-512
  VNNI kernel (:func:`~bnfold.targets._int8._dense_vnni`) with 4 lanes.
* baseline ARMv8.0-A (``generic``, ``cortex-a53``, ``cortex-a72``): :func:`_dense_neon`,
  ``smull`` + ``smlal`` on int8 pairs into int16, ``sadalp`` into int32: 16 multiply-adds per
  3 instructions. Two products must sum exactly in int16, which needs ``|w| <= 127``: a weight
  holding -128 gets None (the caller falls back to generic Relax ops).

Both kernels take signed activations: uint8 activations are shifted to int8 (``x - 128``, a
flip of the top bit) and the bias absorbs ``128 * sum(w)``.

Depthwise convs (``groups == C == O``) use :func:`depthwise` on every aarch64 target:
one ``smlal`` per tap on int16. ``sdot`` would need the taps of one channel as the 4-byte
reduction, i.e. a repack per output column, and is not used there.

Built and checked bit-exactly under qemu only: the speed on real ARM cores is not measured.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from bnfold.targets._int8_common import (
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
    _tile_macros,
)

logger = logging.getLogger(__name__)

NEON_LANES = 4  # int32 lanes of a q register
_SADDLP = "llvm.aarch64.neon.saddlp.v4i32.v8i16"


# --------------------------------------------------------------------------------------------
# Target checks and dispatch


def supports_neon(target: Any) -> bool:
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


def supports_dotprod(target: Any) -> bool:
    """Whether ``target`` is an aarch64 LLVM target with the ARMv8.2-A dot product
    (``sdot``): its ``mcpu`` (``cortex-a55``, ``cortex-a76``, ``neoverse-n1``, ... but not
    ``generic``, ``cortex-a53``, ``cortex-a72``) or ``mattr`` (``+dotprod``) says so."""
    if not supports_neon(target):
        return False
    try:
        from tvm.target import codegen

        return bool(codegen.target_has_features("dotprod", target))
    except Exception as e:  # an LLVM without the query: the baseline kernel
        logger.debug("dot product check failed: %s", e)
        return False


def dense(
    geo: Geometry,
    x_dtype: str,
    q: QConv,
    tile: Tile | None,
    x_shape: tuple[int, int, int, int],
    out_shape: tuple[int, int, int, int],
    target: Any,
) -> tuple[Any, list[np.ndarray]] | None:
    """The dense (``groups == 1``) kernel for the aarch64 ``target`` (see the module
    docstring): :func:`_dense_sdot` where it has the dot product, else :func:`_dense_neon`, or
    None for a weight holding -128 without the dot product. ``tile`` overrides the register
    tile (tests, benchmarks)."""
    if supports_dotprod(target):
        return _dense_sdot(geo, x_dtype, q, tile, x_shape, out_shape)  # fmt: skip
    # The int16 pair sums need |w| <= 127 (128 * 128 * 2 overflows int16).
    if int(q.weight.min()) < -127:
        logger.debug("int8 conv: weight holds -128 and %s has no dot product", target)
        return None
    return _dense_neon(geo, x_dtype, q, tile, x_shape, out_shape)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Dense conv with the dot product (groups == 1, ``+dotprod``)

_SDOT = "llvm.aarch64.neon.sdot.v4i32.v16i8"
SDOT_VEC = 16  # bytes of a q register: 4 columns x one quad of input channels


def choose_tile_sdot(o: int, oh: int, ow: int, kw: int = 1) -> Tile:
    """The register tile of :func:`_dense_sdot` with the least padded work per instruction.

    ``obn`` (a multiple of 4: the weights of 4 channels are one q register, each ``sdot``
    takes its channel's word by lane index) x ``yt`` rows x ``xv`` vectors of 4 columns.
    Budget (32 q registers): ``obn*yt*xv`` accumulators + the ``yt*xv`` activation vectors
    of one step + ``obn / 4`` weight registers + 1 spare <= 32, at most 24 accumulators
    (room for LLVM to load the next tap's operands early: no spills in the 1x1 and 3x3 loops
    checked, with the kernel row unrolled or not). Per step the tile issues
    ``obn*yt*xv`` ``sdot`` + ``yt*xv + obn/4`` loads; the cost is that per useful multiply-add,
    counting the padding of channels (``o`` rounded up to ``obn``), rows (the last row tile
    overlaps the one before it) and columns (rounded up to ``4 * xv``). Rows before columns on
    ties, as on x86."""
    del kw  # the same budget with a kernel row unrolled (see above)
    best: tuple[float, Tile] | None = None
    vecs = -(-ow // NEON_LANES)
    for obn in (4, 8, 12, 16, 20, 24):
        for yt in range(min(oh, 4), 0, -1):
            for xv in range(1, min(vecs, 6) + 1):
                acc = obn * yt * xv
                if acc > 24 or acc + yt * xv + obn // 4 + 1 > 32:
                    continue
                work = (-(-o // obn) * obn) * (-(-oh // yt) * yt) * (-(-vecs // xv) * xv)
                cost = work * (acc + yt * xv + obn // 4 + 2) / acc
                if best is None or cost < best[0]:
                    best = (cost, Tile(obn, yt, xv))
    assert best is not None
    return best[1]


def _dense_sdot(
    geo: Geometry,
    x_dtype: str,
    q: QConv,
    tile: Tile | None,
    x_shape: tuple[int, int, int, int],
    out_shape: tuple[int, int, int, int],
) -> tuple[Any, list[np.ndarray]]:
    """ARMv8.2-A dot product: ``sdot`` (``llvm.aarch64.neon.sdot.v4i32.v16i8``, s8 x s8, 4
    products summed into each of 4 int32 lanes), the NEON mirror of the VNNI kernel.

    The reduction runs over *quads* of input channels. Activation word ``xq[n, q, row, phase,
    col]`` (4 bytes) holds ``x[4q + k]`` (k = 0..3, low byte first) of one pixel as *int8*:
    uint8 activations are made ``x - 128`` (a flip of the top bit) and the bias takes
    ``+128 * sum(w)``, the mirror image of the VNNI kernel (which makes int8 activations
    unsigned). Weight word ``wq[ob, q, ky, kx, j]`` holds ``w[ob*OBN + j, 4q + k]`` (zero
    beyond O and C, so the activation bytes there do not matter). A step loads 16 bytes = 4
    consecutive output columns of one quad and one q register = the words of 4 output channels;
    ``sdot acc, x, w.4b[j]`` (lane-indexed form, from the lane broadcast) adds to lane ``i``
    ``sum_k x[4q+k, col i] * w[o_j, 4q+k]``: 16 multiply-adds per instruction. Each product
    is at most ``128 * 128`` in magnitude and ``sdot`` does not saturate, so any int8 weight
    (-128 included) is exact; the int32 accumulation wraps like the reference's int32 sum, so
    the result is exact whenever the true accumulator fits int32 (the contract).

    Stage 1 (per padded input row and quad) copies the 4 channels' rows into a local byte
    buffer, padded with the zero point, then writes the words of each stride phase 16 columns
    at a time: a byte interleave of 4 vectors (``st4``), after a strided byte gather per
    channel for stride > 1 (stride 2: ``uzp1``). Stage 2 runs register tiles of ``OBN``
    channels x ``YT`` rows x ``XV`` vectors of 4 columns (:func:`choose_tile_sdot`) in up to 64
    parallel chunks; the epilogue is :func:`_requant_vec4` on each accumulator vector."""
    x_zero_point, weight, bias, out_zero_point = q.x_zero_point, q.weight, q.bias, q.out_zero_point
    out_dtype, clamp = q.out_dtype, q.clamp
    from tvm.script import tirx as T

    N, C, H, W, O = geo.n, geo.c, geo.h, geo.w, geo.o  # noqa: E741
    KH, KW, SH, SW, DH, DW = geo.kh, geo.kw, geo.sh, geo.sw, geo.dh, geo.dw
    PT, PL, OH, OW = geo.pt, geo.pl, geo.oh, geo.ow
    L, V = NEON_LANES, SDOT_VEC
    tile = tile or choose_tile_sdot(O, OH, OW, KW)
    # A tile's weights are read as q registers of 4 channels.
    OBN, YT, XV = -(-tile.obn // 4) * 4, tile.yt, tile.xv
    CQ = (C + 3) // 4
    OB = -(-O // OBN)
    TX = XV * L
    NX = -(-OW // TX)
    NY = -(-OH // YT)  # the last row tile is moved up to end at OH (overlapping the one before)
    HP = (OH - 1) * SH + (KH - 1) * DH + 1
    # Words per phase row: the padded output width plus the kernel row's reach, rounded up to
    # whole 16-word stores of the repack.
    WQ = -(-(NX * TX + ((KW - 1) * DW) // SW) // V) * V
    XSIZE = N * CQ * HP * SW * WQ * 4
    NR, NT = N * CQ * HP, N * OB * NY * NX
    # Padded input row as bytes: the input row, and every byte the repack's loads reach.
    RWD = -(-max(SW * WQ + SW, PL + W) // V) * V
    qmin, qmax = clamp
    SHIFTED = x_dtype == "uint8"  # activations made int8: x - 128
    ZPS = int(x_zero_point) - (128 if SHIFTED else 0)

    wpad = np.zeros((OB * OBN, 4 * CQ, KH, KW), dtype=np.int8)
    wpad[:O, :C] = weight
    quads = np.ascontiguousarray(wpad.reshape(OB * OBN, CQ, 4, KH, KW).transpose(0, 1, 3, 4, 2))
    words = quads.view(np.int32)[..., 0]  # (OB*OBN, CQ, KH, KW), little-endian: byte k = 4q+k
    wq = np.ascontiguousarray(words.reshape(OB, OBN, CQ, KH, KW).transpose(0, 2, 3, 4, 1))
    bias2 = bias.astype(np.int64)
    if SHIFTED:
        bias2 = bias2 + 128 * weight.astype(np.int64).sum(axis=(1, 2, 3))
    # Wrapped to int32, not clipped: sdot's sums wrap modulo 2**32 too, so the accumulator is
    # exact whenever the true one fits int32, whatever the shifted partial sums do.
    bias2 = (bias2 + 2**31) % 2**32 - 2**31
    ep = _epilogue_consts(bias2.astype(np.int32), q,
                          OB * OBN)  # fmt: skip

    def to_i8(v: Any, lanes: int) -> Any:
        """Loaded activation bytes as int8 (uint8: the top bit flipped, i.e. ``x - 128``)."""
        if not SHIFTED:
            return v
        if lanes == 1:
            return T.reinterpret("int8", v ^ T.uint8(128))
        return T.reinterpret(f"int8x{lanes}", v ^ T.broadcast(T.uint8(128), lanes))

    def column(rowb: Any, k: int, ph: Any, v: Any) -> Any:
        """int8x16: channel k's bytes at padded columns ``(v * 16 + i) * SW + ph``."""
        at = k * RWD + ph + v * SW * V
        if SW == 1:
            return rowb[T.ramp(at, 1, V)]
        return T.Shuffle([rowb[T.ramp(at, 1, SW * V)]], [SW * i for i in range(V)])

    def slot(j: Any, yy: Any, v: Any) -> Any:
        return T.ramp(((j * YT + yy) * XV + v) * L, 1, L)

    def requant(acc: Any, ep_: Any, o: Any) -> Any:
        return _requant_vec4(T, acc, ep_[o, 1], ep_[o, 2], ep_[o, 3], ep_[o, 4], ep_[o, 5],
                             out_zero_point, qmin, qmax)  # fmt: skip

    init, store = _tile_macros(T, OBN, YT, XV, L, O, OH, OW, out_dtype, requant)

    @T.prim_func
    def conv_sdot(
        x: T.Buffer(x_shape, x_dtype),
        wq_: T.Buffer((OB, CQ, KH, KW, OBN), "int32"),
        ep_: T.Buffer((OB * OBN, EP_COLS), "int32"),
        out: T.Buffer(out_shape, out_dtype),
    ):
        T.func_attr({"global_symbol": "conv2d_int8", "tirx.noalias": True})
        xf = T.decl_buffer((N * C * H * W,), x_dtype, data=x.data)
        of = T.decl_buffer((N * O * OH * OW,), out_dtype, data=out.data)
        xq = T.alloc_buffer((XSIZE,), "int8")
        # Stage 1: repack the activation into int8 quad words, padded, stride phases split.
        for chunk in T.parallel(_chunks(NR)):
            rowb = T.alloc_buffer((4 * RWD + V,), "int8", scope="local")
            for r in range(chunk * NR // _chunks(NR), (chunk + 1) * NR // _chunks(NR)):
                nn = T.Bind(r // (CQ * HP))
                cq = T.Bind(r // HP % CQ)
                row = T.Bind(r % HP - PT)
                base = T.Bind(r * SW * WQ * 4)
                if row < 0 or row >= H:
                    for v in range(SW * WQ * 4 // V):
                        xq[T.ramp(base + v * V, 1, V)] = T.broadcast(T.int8(ZPS), V)
                else:
                    for k in T.unroll(4):
                        # Channels beyond C read channel C-1 again; their weight bytes are zero.
                        src = T.Bind((nn * C + T.min(4 * cq + k, C - 1)) * H * W + row * W)
                        for q in range(PL):
                            rowb[k * RWD + q] = T.int8(ZPS)
                        for v in range(W // V):
                            rowb[T.ramp(k * RWD + PL + v * V, 1, V)] = to_i8(
                                xf[T.ramp(src + v * V, 1, V)], V
                            )
                        for q in range(W // V * V, W):
                            rowb[k * RWD + PL + q] = to_i8(xf[src + q], 1)
                        for v in range((RWD - PL - W + V - 1) // V):
                            rowb[T.ramp(k * RWD + PL + W + v * V, 1, V)] = T.broadcast(
                                T.int8(ZPS), V
                            )
                    for ph in range(SW):
                        for v in range(WQ // V):
                            # Word q, byte k = channel 4cq+k at padded column q * SW + ph.
                            xq[T.ramp(base + (ph * WQ + v * V) * 4, 1, 4 * V)] = T.Shuffle(
                                [column(rowb, k, ph, v) for k in range(4)],
                                [k * V + i for i in range(V) for k in range(4)],
                            )
        # Stage 2: register tiles of OBN channels x YT rows x XV vectors of 4 columns.
        for chunk in T.parallel(_chunks(NT)):
            acc = T.alloc_buffer((OBN * YT * XV * L,), "int32", scope="local")
            res = T.alloc_buffer((L,), out_dtype, scope="local")
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
                                            "int32x4",
                                            _SDOT,
                                            acc[slot(j, yy, v)],
                                            xq[T.ramp(
                                                (((((nn * CQ + cq) * HP + (y0 + yy) * SH
                                                    + ky * DH) * SW + kx * DW % SW) * WQ)
                                                 + x0 + v * L + kx * DW // SW) * 4,
                                                1, V,
                                            )],
                                            # Channel j's word in all 4 lanes, taken from the
                                            # q register of 4 channels: LLVM folds the lane
                                            # broadcast into sdot's indexed form.
                                            T.reinterpret("int8x16", T.Shuffle(
                                                [wq_[ob, cq, ky, kx, T.ramp(j // 4 * 4, 1, 4)]],
                                                [j % 4] * 4,
                                            )),
                                        )  # fmt: skip
                store(acc, res, of, ep_, nn, ob, y0, x0)

    return _finish(conv_sdot), [wq, ep]


# --------------------------------------------------------------------------------------------
# Dense conv, baseline NEON (groups == 1)


def _dense_neon(
    geo: Geometry,
    x_dtype: str,
    q: QConv,
    tile: Tile | None,
    x_shape: tuple[int, int, int, int],
    out_shape: tuple[int, int, int, int],
) -> tuple[Any, list[np.ndarray]]:
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
    x_zero_point, weight, bias, out_zero_point = q.x_zero_point, q.weight, q.bias, q.out_zero_point
    out_dtype, clamp = q.out_dtype, q.clamp
    from tvm.script import tirx as T

    N, C, H, W, O = geo.n, geo.c, geo.h, geo.w, geo.o  # noqa: E741
    KH, KW, SH, SW, DH, DW = geo.kh, geo.kw, geo.sh, geo.sw, geo.dh, geo.dw
    PT, PL, OH, OW = geo.pt, geo.pl, geo.oh, geo.ow
    L = NEON_LANES
    vecs = -(-OW // L)
    if tile is None:
        # 32 q registers: 4 x 4 accumulators + 8 d-register operands + 4 weights + temps.
        XV = min(4, vecs)
        OBN = 4
        YT = 1
    else:
        OBN, YT, XV = tile.obn, tile.yt, tile.xv
    CQ = (C + 3) // 4
    OB = -(-O // OBN)
    TX = XV * L
    NX = -(-OW // TX)
    NY = -(-OH // YT)
    HP = (OH - 1) * SH + (KH - 1) * DH + 1
    WQ = NX * TX + ((KW - 1) * DW) // SW
    PLANE = HP * SW * WQ * 2  # bytes of one plane of one quad
    XSIZE = N * CQ * 2 * PLANE
    NR, NT = N * CQ * HP, N * OB * NY * NX
    qmin, qmax = clamp
    SHIFTED = x_dtype == "uint8"  # activations made int8: x - 128
    ZPS = int(x_zero_point) - (128 if SHIFTED else 0)

    # Weight: (OB, CQ, KH, KW, OBN, 16) int8, zero beyond O and C.
    wpad = np.zeros((OB * OBN, 4 * CQ, KH, KW), dtype=np.int8)
    wpad[:O, :C] = weight
    wq4 = wpad.reshape(OB * OBN, CQ, 4, KH, KW).transpose(0, 1, 3, 4, 2)  # (O', CQ, KH, KW, 4)
    lo = np.tile(wq4[..., 0:2], 4)  # (w0, w1) x 4
    hi = np.tile(wq4[..., 2:4], 4)
    wn = np.concatenate([lo, hi], axis=-1).reshape(OB, OBN, CQ, KH, KW, 16)
    wn = np.ascontiguousarray(wn.transpose(0, 2, 3, 4, 1, 5))
    bias2 = bias.astype(np.int64)
    if SHIFTED:
        bias2 = bias2 + 128 * weight.astype(np.int64).sum(axis=(1, 2, 3))
    if np.any(np.abs(bias2) >= 2**31):
        bias2 = np.clip(bias2, INT32_MIN, INT32_MAX)  # only if the true accumulator overflows
    ep = _epilogue_consts(bias2.astype(np.int32), q,
                          OB * OBN)  # fmt: skip

    def wat(ob: Any, cq: Any, ky: Any, kx: Any, j: Any) -> Any:
        """Offset of the 16 weight bytes of (ob*OBN + j, quad cq, ky, kx)."""
        return ((((ob * CQ + cq) * KH + ky) * KW + kx) * OBN + j) * 16

    def requant(acc: Any, ep_: Any, o: Any) -> Any:
        return _requant_vec4(T, acc, ep_[o, 1], ep_[o, 2], ep_[o, 3], ep_[o, 4], ep_[o, 5],
                             out_zero_point, qmin, qmax)  # fmt: skip

    init, store = _tile_macros(T, OBN, YT, XV, L, O, OH, OW, out_dtype, requant)

    @T.prim_func
    def conv(
        x: T.Buffer(x_shape, x_dtype),
        wn_: T.Buffer((OB, CQ, KH, KW, OBN, 16), "int8"),
        ep_: T.Buffer((OB * OBN, EP_COLS), "int32"),
        out: T.Buffer(out_shape, out_dtype),
    ):
        T.func_attr({"global_symbol": "conv2d_int8", "tirx.noalias": True})
        xf = T.decl_buffer((N * C * H * W,), x_dtype, data=x.data)
        of = T.decl_buffer((N * O * OH * OW,), out_dtype, data=out.data)
        wf = T.decl_buffer((wn.size,), "int8", data=wn_.data)
        xq = T.alloc_buffer((XSIZE,), "int8")
        # Stage 1: the two byte planes of every quad, padded (scalar: ARM speed is not
        # measured here; the repack is O(input) against O(input * O) for the conv).
        for chunk in T.parallel(_chunks(NR)):
            for r in range(chunk * NR // _chunks(NR), (chunk + 1) * NR // _chunks(NR)):
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
                                    xq[dst] = _to_i8(T, xf[((nn * C + c) * H + row) * W + col],
                                                     SHIFTED)  # fmt: skip
                                else:
                                    xq[dst] = T.int8(ZPS)
        # Stage 2: tiles of OBN channels x YT rows x XV vectors of 4 columns.
        for chunk in T.parallel(_chunks(NT)):
            acc = T.alloc_buffer((OBN * YT * XV * L,), "int32", scope="local")
            res = T.alloc_buffer((L,), out_dtype, scope="local")
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
                                        acc[T.ramp(((j * YT + yy) * XV + v) * L, 1, L)] = acc[
                                            T.ramp(((j * YT + yy) * XV + v) * L, 1, L)
                                        ] + T.call_llvm_pure_intrin(
                                            "int32x4",
                                            _SADDLP,
                                            T.cast(
                                                xq[T.ramp(
                                                    (((nn * CQ + cq) * 2 * HP
                                                      + (y0 + yy) * SH + ky * DH) * SW
                                                     + kx * DW % SW) * WQ * 2
                                                    + (x0 + v * L + kx * DW // SW) * 2,
                                                    1, 8,
                                                )],
                                                "int16x8",
                                            ) * T.cast(
                                                wf[T.ramp(wat(ob, cq, ky, kx, j), 1, 8)],
                                                "int16x8",
                                            ) + T.cast(
                                                xq[T.ramp(
                                                    ((((nn * CQ + cq) * 2 + 1) * HP
                                                      + (y0 + yy) * SH + ky * DH) * SW
                                                     + kx * DW % SW) * WQ * 2
                                                    + (x0 + v * L + kx * DW // SW) * 2,
                                                    1, 8,
                                                )],
                                                "int16x8",
                                            ) * T.cast(
                                                wf[T.ramp(wat(ob, cq, ky, kx, j) + 8, 1, 8)],
                                                "int16x8",
                                            ),
                                        )  # fmt: skip
                store(acc, res, of, ep_, nn, ob, y0, x0)

    return _finish(conv), [wn, ep]


def _to_i8(T: Any, v: Any, shifted: bool) -> Any:
    """A loaded activation as int8: ``x - 128`` for uint8 (flip the top bit), else as is."""
    if shifted:
        return T.cast(T.cast(v, "int32") - 128, "int8")
    return v


def _requant_vec4(
    T: Any, acc: Any, lo: Any, hi: Any, m: Any, s1: Any, s2: Any, zp: int, qmin: int, qmax: int
) -> Any:
    """:func:`_requant_vec` for 4 lanes in portable vector arithmetic (LLVM's NEON lowering)."""
    n = NEON_LANES
    a = T.max(T.min(acc, T.broadcast(hi, n)), T.broadcast(lo, n))
    rnd = T.shift_left(T.int64(1), T.cast(s1 + s2 - 1, "int64"))
    p = T.cast(a, f"int64x{n}") * T.broadcast(T.cast(m, "int64"), n) + T.broadcast(rnd, n)
    u = T.shift_right(T.cast(p, f"uint64x{n}"), T.broadcast(T.cast(s1, "uint64"), n))
    r = T.shift_right(T.cast(u, f"int32x{n}"), T.broadcast(s2, n)) + T.broadcast(zp, n)
    return T.max(T.min(r, T.broadcast(qmax, n)), T.broadcast(qmin, n))


def depthwise(
    geo: Geometry,
    x_dtype: str,
    q: QConv,
) -> tuple[Any, list[np.ndarray]]:
    """NEON depthwise: activations widened to int16, one ``smlal`` (int16 x int16 scalar ->
    int32, 4 lanes) per tap. No pairing trick pays on baseline NEON here (4 multiply-adds per
    instruction, as ``fmla``); the gain over the fp32 conv is the 4x smaller activations and
    staying in integers between the int8 layers. The first stage writes the padded image as
    bytes; a stride-2 operand is the even lanes of an 8-byte load (``uzp1``)."""
    x_zero_point, weight, bias, out_zero_point = q.x_zero_point, q.weight, q.bias, q.out_zero_point
    out_dtype, clamp = q.out_dtype, q.clamp
    from tvm.script import tirx as T

    N, C, H, W = geo.n, geo.c, geo.h, geo.w
    KH, KW, SH, SW, DH, DW = geo.kh, geo.kw, geo.sh, geo.sw, geo.dh, geo.dw
    PT, PL, OH, OW = geo.pt, geo.pl, geo.oh, geo.ow
    L = NEON_LANES
    XV = min(2, -(-OW // L))
    YT = min(4, OH)
    TX = XV * L
    NX = -(-OW // TX)
    NY = -(-OH // YT)
    HP = (OH - 1) * SH + (KH - 1) * DH + 1
    RB = -(-(SW * NX * TX + (KW - 1) * DW + 2 * LANES) // LANES) * LANES
    XB = N * C * HP * RB
    NR, NT = N * C * HP, N * C * NY * NX
    qmin, qmax = clamp
    ZP = int(x_zero_point)
    wq = np.ascontiguousarray(weight[:, 0].astype(np.int32))  # (C, KH, KW)
    ep = _epilogue_consts(bias, q, C)
    x_shape = (N, C, H, W)
    out_shape = (N, C, OH, OW)

    def operand(xb: Any, at: Any) -> Any:
        """int32x4 of 4 output columns' inputs at byte ``at`` (column stride SW)."""
        if SW == 1:
            v = xb[T.ramp(at, 1, L)]
        else:
            v = T.Shuffle([xb[T.ramp(at, 1, SW * L)]], [SW * i for i in range(L)])
        return T.cast(T.cast(v, f"int16x{L}"), f"int32x{L}")

    def requant(acc: Any, ep_: Any, o: Any) -> Any:
        return _requant_vec4(T, acc, ep_[o, 1], ep_[o, 2], ep_[o, 3], ep_[o, 4], ep_[o, 5],
                             out_zero_point, qmin, qmax)  # fmt: skip

    init, store = _tile_macros(T, 1, YT, XV, L, C, OH, OW, out_dtype, requant)

    @T.prim_func
    def dwconv_neon(
        x: T.Buffer(x_shape, x_dtype),
        wq_: T.Buffer((C, KH, KW), "int32"),
        ep_: T.Buffer((C, EP_COLS), "int32"),
        out: T.Buffer(out_shape, out_dtype),
    ):
        T.func_attr({"global_symbol": "dwconv2d_int8", "tirx.noalias": True})
        xf = T.decl_buffer((N * C * H * W,), x_dtype, data=x.data)
        of = T.decl_buffer((N * C * OH * OW,), out_dtype, data=out.data)
        xb = T.alloc_buffer((XB,), x_dtype)
        for chunk in T.parallel(_chunks(NR)):
            for r in range(chunk * NR // _chunks(NR), (chunk + 1) * NR // _chunks(NR)):
                row = T.Bind(r % HP - PT)
                src = T.Bind(r // HP * H * W + row * W)
                base = T.Bind(r * RB)
                for q in range(RB):
                    if row >= 0 and row < H and q >= PL and q < PL + W:
                        xb[base + q] = xf[src + q - PL]
                    else:
                        xb[base + q] = T.cast(ZP, x_dtype)
        for chunk in T.parallel(_chunks(NT)):
            acc = T.alloc_buffer((YT * XV * L,), "int32", scope="local")
            res = T.alloc_buffer((L,), out_dtype, scope="local")
            for t in range(chunk * NT // _chunks(NT), (chunk + 1) * NT // _chunks(NT)):
                nc = T.Bind(t // (NY * NX))
                c = T.Bind(nc % C)
                y0 = T.Bind(T.min(t // NX % NY * YT, OH - YT))
                x0 = T.Bind(t % NX * TX)
                init(acc, ep_, c)
                for ky in T.unroll(KH):
                    for kx in T.unroll(KW):
                        for yy in T.unroll(YT):
                            for v in T.unroll(XV):
                                acc[T.ramp((yy * XV + v) * L, 1, L)] = acc[
                                    T.ramp((yy * XV + v) * L, 1, L)
                                ] + operand(
                                    xb,
                                    (nc * HP + (y0 + yy) * SH + ky * DH) * RB
                                    + SW * (x0 + v * L) + kx * DW,
                                ) * T.broadcast(
                                    T.cast(T.cast(wq_[c, ky, kx], "int16"), "int32"), L
                                )  # fmt: skip
                store(acc, res, of, ep_, nc // C, c, y0, x0)

    return _finish(dwconv_neon), [wq, ep]
