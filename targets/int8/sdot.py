"""aarch64 with the ARMv8.2-A dot product (``+dotprod``: ``mcpu`` ``cortex-a55``,
``cortex-a76``, ``neoverse-n1`` and later, or ``mattr`` ``+dotprod``; :func:`supports`).

``sdot`` (``llvm.aarch64.neon.sdot.v4i32.v16i8``, :func:`mac`) multiplies 4 signed bytes by 4
signed bytes and adds the 4 products to each of 4 int32 lanes without saturation: 16
multiply-adds per instruction, exact for every int8 weight (each product is at most
``128 * 128``; the int32 accumulation wraps like the reference's int32 sum, so the result is
exact whenever the true accumulator fits int32, the contract).

Dense convs (``groups == 1``): the layout of the AVX-512 VNNI kernel with 4 lanes. The
reduction runs over *quads* of input channels. Activation word ``xq[n, q, row, phase, col]``
(4 bytes) holds ``x[4q + k]`` (k = 0..3, low byte first) of one pixel as *int8*: uint8
activations are made ``x - 128`` (a flip of the top bit) and the bias takes ``+128 * sum(w)``,
the mirror image of the VNNI kernel (which makes int8 activations unsigned). Weight word
``wq[ob, q, ky, kx, j]`` holds ``w[ob*OBN + j, 4q + k]`` (:func:`skeleton.quad_words`). A step
loads 16 bytes = 4 consecutive output columns of one quad and one q register = the words of 4
output channels; ``sdot acc, x, w.4b[j]`` (lane-indexed form, from the lane broadcast) adds to
lane ``i`` ``sum_k x[4q+k, col i] * w[o_j, 4q+k]``.

Stage 1 (per padded input row and quad) copies the 4 channels' rows into a local byte buffer,
padded with the zero point, then writes the words of each stride phase 16 columns at a time: a
byte interleave of 4 vectors (``st4``), after a strided byte gather per channel for stride > 1
(stride 2: ``uzp1``). Stage 2 runs register tiles of ``OBN`` channels x ``YT`` rows x ``XV``
vectors of 4 columns (:func:`choose_tile`); the epilogue is :func:`neon.requant_vec4`.
Depthwise convs use the NEON kernel (:func:`neon.depthwise`).

Built and checked bit-exactly under qemu only: the speed on real ARM cores is not measured.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from bnfold.targets.int8 import neon, skeleton
from bnfold.targets.int8.skeleton import Isa, Kernel, TileLoop
from bnfold.targets.int8.spec import Geometry, QConv, Tile, epilogue_consts, shifted_bias

logger = logging.getLogger(__name__)

SDOT = "llvm.aarch64.neon.sdot.v4i32.v16i8"
SDOT_VEC = 16  # bytes of a q register: 4 columns x one quad of input channels
L = neon.NEON_LANES


def supports(target: Any) -> bool:
    """Whether ``target`` is an aarch64 LLVM target with the ARMv8.2-A dot product
    (``sdot``): its ``mcpu`` (``cortex-a55``, ``cortex-a76``, ``neoverse-n1``, ... but not
    ``generic``, ``cortex-a53``, ``cortex-a72``) or ``mattr`` (``+dotprod``) says so."""
    if not neon.supports(target):
        return False
    try:
        from tvm.target import codegen

        return bool(codegen.target_has_features("dotprod", target))
    except Exception as e:  # an LLVM without the query: the baseline kernel
        logger.debug("dot product check failed: %s", e)
        return False


def mac(T: Any, lanes: int, acc: Any, a: Any, w: Any) -> Any:
    """``sdot(acc, a, w)``: ``lanes`` x 4 signed activation bytes times 4 signed weight bytes,
    summed into each int32 lane of ``acc``."""
    return T.call_llvm_pure_intrin(f"int32x{lanes}", SDOT, acc, a, w)


def choose_tile(o: int, oh: int, ow: int, kw: int = 1) -> Tile:
    """The register tile of :func:`dense` with the least padded work per instruction.

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
    vecs = -(-ow // L)
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


def dense(geo: Geometry, x_dtype: str, q: QConv, tile: Tile | None) -> Kernel:
    """``sdot`` on int8 quad words (see the module docstring)."""
    from tvm.script import tirx as T

    N, C, O = geo.n, geo.c, geo.o  # noqa: E741
    KH, KW, SH, SW, DH, DW = geo.kh, geo.kw, geo.sh, geo.sw, geo.dh, geo.dw
    OH, OW = geo.oh, geo.ow
    V = SDOT_VEC
    tile = tile or choose_tile(O, OH, OW, KW)
    # A tile's weights are read as q registers of 4 channels.
    tile = Tile(-(-tile.obn // 4) * 4, tile.yt, tile.xv)
    OBN = tile.obn
    CQ = (C + 3) // 4
    OB = -(-O // OBN)
    loop = TileLoop(geo, tile, L, OB, CQ, KH, KW, q.out_dtype)
    HP = geo.hp
    # Words per phase row: the padded output width plus the kernel row's reach, rounded up to
    # whole 16-word stores of the repack.
    WQ = -(-(loop.nx * tile.xv * L + ((KW - 1) * DW) // SW) // V) * V
    wq = skeleton.quad_words(q.weight, OB * OBN, OBN)
    # Wrapped to int32, not clipped: sdot's sums wrap modulo 2**32 too, so the accumulator is
    # exact whenever the true one fits int32, whatever the shifted partial sums do.
    bias = (shifted_bias(q, 128 if x_dtype == "uint8" else 0) + 2**31) % 2**32 - 2**31
    ep = epilogue_consts(bias.astype(np.int32), q, OB * OBN)

    def step(xq: Any, wq_: Any, acc: Any, nn: Any, ob: Any, cq: Any, ky: Any, kx: Any, j: Any,
             y0: Any, yy: Any, x0: Any, v: Any) -> Any:  # fmt: skip
        a = xq[T.ramp((((((nn * CQ + cq) * HP + (y0 + yy) * SH + ky * DH) * SW
                          + kx * DW % SW) * WQ) + x0 + v * L + kx * DW // SW) * 4,
                      1, V)]  # fmt: skip
        # Channel j's word in all 4 lanes, taken from the q register of 4 channels: LLVM folds
        # the lane broadcast into sdot's indexed form.
        w = T.Shuffle([wq_[ob, cq, ky, kx, T.ramp(j // 4 * 4, 1, 4)]], [j % 4] * 4)
        return mac(T, L, acc, a, T.reinterpret("int8x16", w))

    init, store = skeleton.tile_macros(T, OBN, tile.yt, tile.xv, L, O, OH, OW, q.out_dtype,
                                       neon.neon_requant(T, q))  # fmt: skip
    tiles = skeleton.tiled_loop(T, loop, init, store, step)
    repack = _quad_repack(T, geo, x_dtype, q.x_zero_point, HP, WQ)

    func = skeleton.conv_func(T, geo, x_dtype, q.out_dtype, (wq.shape, "int32"), ep.shape,
                              (N * CQ * HP * SW * WQ * 4, "int8"), repack, tiles)  # fmt: skip
    return func, [wq, ep]


def _quad_repack(T: Any, geo: Geometry, x_dtype: str, zp: int, hp: int, wq: int) -> Any:
    """``repack(xf, xq)``: stage 1 of :func:`dense` (see the module docstring), rows in up to
    64 parallel chunks."""
    N, C, H, W = geo.n, geo.c, geo.h, geo.w
    SW, PT, PL = geo.sw, geo.pt, geo.pl
    CQ, HP, WQ, V = (C + 3) // 4, hp, wq, SDOT_VEC
    NR = N * CQ * HP
    # Padded input row as bytes: the input row, and every byte the repack's loads reach.
    RWD = -(-max(SW * WQ + SW, PL + W) // V) * V
    SHIFTED = x_dtype == "uint8"  # activations made int8: x - 128
    ZPS = zp - (128 if SHIFTED else 0)

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

    @T.macro
    def padded_row(xf: Any, rowb: Any, k: Any, src: Any) -> None:
        for q in range(PL):
            rowb[k * RWD + q] = T.int8(ZPS)
        for v in range(W // V):
            rowb[T.ramp(k * RWD + PL + v * V, 1, V)] = to_i8(xf[T.ramp(src + v * V, 1, V)], V)
        for q in range(W // V * V, W):
            rowb[k * RWD + PL + q] = to_i8(xf[src + q], 1)
        for v in range((RWD - PL - W + V - 1) // V):
            rowb[T.ramp(k * RWD + PL + W + v * V, 1, V)] = T.broadcast(T.int8(ZPS), V)

    @T.macro
    def repack(xf: Any, xq: Any) -> None:
        for chunk in T.parallel(skeleton.chunks(NR)):
            rowb = T.alloc_buffer((4 * RWD + V,), "int8", scope="local")
            for r in range(chunk * NR // skeleton.chunks(NR),
                           (chunk + 1) * NR // skeleton.chunks(NR)):  # fmt: skip
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
                        padded_row(xf, rowb, k, src)
                    for ph in range(SW):
                        for v in range(WQ // V):
                            # Word q, byte k = channel 4cq+k at padded column q * SW + ph.
                            xq[T.ramp(base + (ph * WQ + v * V) * 4, 1, 4 * V)] = T.Shuffle(
                                [column(rowb, k, ph, v) for k in range(4)],
                                [k * V + i for i in range(V) for k in range(4)],
                            )

    return repack


ISA = Isa("sdot", L, mac, dense, neon.depthwise)
