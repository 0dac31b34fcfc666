"""The tiled loop every int8 conv kernel runs, whatever its instruction set, as TVMScript macros.

A kernel is two stages in one PrimFunc: stage 1 repacks the activation (padded with the zero
point, stride phases split, channels grouped as the instruction wants them); stage 2 runs
register tiles of ``obn`` output channels x ``yt`` rows x ``xv`` vectors of ``lanes`` columns
(:func:`tiled_loop`): set the accumulators to the bias, run the instruction set's
multiply-accumulate over the reduction (channel groups x kernel rows x kernel taps), then
requantize each accumulator vector and store it straight into the NCHW output
(:func:`tile_macros`). Stage 1 is the kernel's own (its layout is what the instruction
wants); stage 2 differs between kernels only in the multiply-accumulate step, given as a
function (:class:`Isa`'s ``mac`` applied to the kernel's operands).

Tiles run in parallel in up to 64 chunks, not one task per tile: TVM gives every ``local``
buffer inside a parallel loop a workspace allocation per iteration (measured: 3x slower on
the 112x112 layers with one task per tile). The last row tile is moved up to end at the last
output row (overlapping the one before it) when ``yt`` does not divide the rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from bnfold.targets.int8.spec import Geometry, QConv, Tile

# A kernel: the scheduled PrimFunc and the constant arrays it takes after its input.
Kernel = tuple[Any, list[np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Isa:
    """One instruction set's int8 conv kernels, as :mod:`bnfold.targets.int8` dispatches them.

    ``lanes``: int32 lanes of its accumulator vectors; ``mac(T, lanes, acc, a, w)``: its
    multiply-accumulate step, the accumulator vector ``acc`` plus the products of activation
    operand ``a`` and weight operand ``w`` (their forms are the instruction's); ``dense``
    (``groups == 1``) and ``depthwise`` (``groups == C == O``): ``(geometry, x_dtype, spec,
    tile or None) -> Kernel``, or None where the instruction set cannot take that conv."""

    name: str
    lanes: int
    mac: Callable[[Any, int, Any, Any, Any], Any]
    dense: Callable[[Geometry, str, QConv, Tile | None], Kernel | None]
    depthwise: Callable[[Geometry, str, QConv, Tile | None], Kernel | None]


def chunks(tasks: int) -> int:
    """Parallel tasks for ``tasks`` independent iterations: enough to balance any thread count
    here, few enough that per-task set-up (workspace allocation) stays negligible."""
    return max(1, min(tasks, 64))


def finish(func: Any) -> Any:
    """``func`` marked as scheduled (bnfold's CPU pipeline leaves it alone)."""
    return func.with_attr("tirx.is_scheduled", True)


def in_root_block(func: Any) -> Any:
    """``func`` with its body inside an (empty) root block. Relax's RewriteDataflowReshape
    checks every one-input ``call_tir`` for a reshape, and that check requires a block-rooted
    body (it fails on a plain loop nest); the kernels with constant inputs are not checked."""
    from tvm import s_tir

    root = s_tir.SBlock([], [], [], "root", func.body)
    return func.with_body(s_tir.SBlockRealize([], True, root))


# --------------------------------------------------------------------------------------------
# Stage 1 pieces


def padded_rows_macro(
    T: Any, nr: int, hp: int, pt: int, h: int, w: int, rb: int, pl: int, zp: int,
    x_dtype: str, lanes: int,
) -> Any:  # fmt: skip
    """``padded_rows(xf, xb)``: the TVMScript macro writing the ``nr`` zero-point-padded input
    rows (``hp`` per image and channel, ``pt`` above the input, ``pl`` columns left, ``rb``
    bytes each) of the flat NCHW input ``xf`` into ``xb``, rows in parallel chunks."""

    @T.macro
    def padded_rows(xf: Any, xb: Any) -> None:
        for chunk in T.parallel(chunks(nr)):
            for r in range(chunk * nr // chunks(nr), (chunk + 1) * nr // chunks(nr)):
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


def row_copy_macro(T: Any, w: int, pl: int, rwd: int, zp: int, x_dtype: str, lanes: int) -> Any:
    """``row_copy(rowb, at, xf, src)``: the TVMScript macro copying the input row at ``src`` of
    ``xf`` into the local bytes ``rowb[at : at + rwd]``, ``pl`` zero-point columns before it
    and zero-point vectors after it (the strided repacks read their phases from there)."""

    @T.macro
    def row_copy(rowb: Any, at: Any, xf: Any, src: Any) -> None:
        for q in range(pl):
            rowb[at + q] = T.cast(zp, x_dtype)
        for v in range(w // lanes):
            rowb[T.ramp(at + pl + v * lanes, 1, lanes)] = xf[T.ramp(src + v * lanes, 1, lanes)]
        for q in range(w // lanes * lanes, w):
            rowb[at + pl + q] = xf[src + q]
        for v in range((rwd - pl - w + lanes - 1) // lanes):
            rowb[T.ramp(at + pl + w + v * lanes, 1, lanes)] = T.broadcast(
                T.cast(zp, x_dtype), lanes
            )

    return row_copy


# --------------------------------------------------------------------------------------------
# Stage 2: the tiled loop


def tile_macros(
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


@dataclasses.dataclass(frozen=True)
class TileLoop:
    """Stage 2 of a kernel on ``geo``: ``tile`` (``obn == 1`` for a depthwise kernel) on
    vectors of ``lanes`` columns, ``blocks`` channel blocks (depthwise: channels), a
    reduction over ``reduce`` channel groups (pairs, quads, channels; depthwise: none) x
    ``kh`` kernel rows x ``kw`` taps (or tap pairs) per row, the taps unrolled; the output
    of ``out_dtype``."""

    geo: Geometry
    tile: Tile
    lanes: int
    blocks: int
    reduce: int
    kh: int
    kw: int
    out_dtype: str

    @property
    def nx(self) -> int:
        return -(-self.geo.ow // (self.tile.xv * self.lanes))

    @property
    def ny(self) -> int:
        return -(-self.geo.oh // self.tile.yt)

    @property
    def tasks(self) -> int:
        """Register tiles: images x channel blocks x row tiles x column tiles."""
        return self.geo.n * self.blocks * self.ny * self.nx


def tiled_loop(T: Any, loop: TileLoop, init: Any, store: Any, step: Callable[..., Any]) -> Any:
    """``tiles(of, ep_, xs, ws)``: the TVMScript macro of stage 2 (see the module docstring)
    writing the flat output ``of``, with ``init`` and ``store`` of :func:`tile_macros` and the
    multiply-accumulate ``step(xs, ws, acc, nn, ob, r, ky, kx, j, y0, yy, x0, v)`` -> the new
    accumulator vector ``acc`` of channel ``j`` of block ``ob``, row ``y0 + yy``, vector ``v``
    from column ``x0``, after reduction group ``r``, tap ``(ky, kx)``, from the repacked
    activation ``xs`` and the packed weight ``ws``. For a depthwise kernel ``nn`` is image x
    channel, ``ob`` the channel, ``r`` and ``j`` 0."""
    geo, L = loop.geo, loop.lanes
    OBN, YT, XV = loop.tile.obn, loop.tile.yt, loop.tile.xv
    OB, R, KH, KW = loop.blocks, loop.reduce, loop.kh, loop.kw
    NT, NY, NX, OH, TX = loop.tasks, loop.ny, loop.nx, geo.oh, XV * L
    out_dtype = loop.out_dtype

    def slot(j: Any, yy: Any, v: Any) -> Any:
        """The accumulator vector of channel j, row yy, vector v of the tile."""
        return T.ramp(((j * YT + yy) * XV + v) * L, 1, L)

    def dw_slot(yy: Any, v: Any) -> Any:
        return T.ramp((yy * XV + v) * L, 1, L)

    @T.macro
    def dense_steps(xs: Any, ws: Any, acc: Any, nn: Any, ob: Any, y0: Any, x0: Any) -> None:
        for r in range(R):
            for ky in range(KH):
                for kx in T.unroll(KW):
                    for j in T.unroll(OBN):
                        for yy in T.unroll(YT):
                            for v in T.unroll(XV):
                                acc[slot(j, yy, v)] = step(xs, ws, acc[slot(j, yy, v)], nn, ob,
                                                           r, ky, kx, j, y0, yy, x0, v)  # fmt: skip

    @T.macro
    def depthwise_steps(xs: Any, ws: Any, acc: Any, nc: Any, c: Any, y0: Any, x0: Any) -> None:
        for ky in T.unroll(KH):
            for kx in T.unroll(KW):
                for yy in T.unroll(YT):
                    for v in T.unroll(XV):
                        acc[dw_slot(yy, v)] = step(xs, ws, acc[dw_slot(yy, v)], nc, c, 0, ky,
                                                   kx, 0, y0, yy, x0, v)  # fmt: skip

    @T.macro
    def tiles(of: Any, ep_: Any, xs: Any, ws: Any) -> None:
        # Tiles in up to 64 parallel chunks, local buffers allocated once per chunk.
        for chunk in T.parallel(chunks(NT)):
            acc = T.alloc_buffer((OBN * YT * XV * L,), "int32", scope="local")
            res = T.alloc_buffer((L,), out_dtype, scope="local")
            for t in range(chunk * NT // chunks(NT), (chunk + 1) * NT // chunks(NT)):
                if geo.depthwise:
                    nc = T.Bind(t // (NY * NX))
                    c = T.Bind(nc % OB)
                    y0 = T.Bind(T.min(t // NX % NY * YT, OH - YT))
                    x0 = T.Bind(t % NX * TX)
                    init(acc, ep_, c)
                    depthwise_steps(xs, ws, acc, nc, c, y0, x0)
                    store(acc, res, of, ep_, nc // OB, c, y0, x0)
                else:
                    nn = T.Bind(t // (OB * NY * NX))
                    ob = T.Bind(t // (NY * NX) % OB)
                    y0 = T.Bind(T.min(t // NX % NY * YT, OH - YT))
                    x0 = T.Bind(t % NX * TX)
                    init(acc, ep_, ob)
                    dense_steps(xs, ws, acc, nn, ob, y0, x0)
                    store(acc, res, of, ep_, nn, ob, y0, x0)

    return tiles


# --------------------------------------------------------------------------------------------
# Weight packing shared by the 4-byte dot product kernels (AVX-512 VNNI, sdot)


def quad_words(weight: np.ndarray, rows: int, obn: int) -> np.ndarray:
    """``wq[ob, q, ky, kx, j]``: the int32 word of ``weight[ob*obn + j, 4q .. 4q+3, ky, kx]``
    (little-endian: byte k is channel 4q + k), zero beyond the ``O`` channels (padded to
    ``rows``) and the ``C`` input channels (padded to a multiple of 4)."""
    o, c, kh, kw = weight.shape
    cq = (c + 3) // 4
    wpad = np.zeros((rows, 4 * cq, kh, kw), dtype=np.int8)
    wpad[:o, :c] = weight
    quads = np.ascontiguousarray(wpad.reshape(rows, cq, 4, kh, kw).transpose(0, 1, 3, 4, 2))
    words = quads.view(np.int32)[..., 0]  # (rows, CQ, KH, KW)
    words = words.reshape(rows // obn, obn, cq, kh, kw)
    return np.ascontiguousarray(words.transpose(0, 2, 3, 4, 1))


# --------------------------------------------------------------------------------------------
# The PrimFunc


def conv_func(
    T: Any,
    geo: Geometry,
    x_dtype: str,
    out_dtype: str,
    weight: tuple[tuple[int, ...], str],
    ep_shape: tuple[int, int],
    staged: tuple[int, str],
    stage1: Any,
    tiles: Any,
    flat_weight: int = 0,
) -> Any:
    """The kernel's PrimFunc ``(x, weight, ep, out)`` (``weight``: its shape and type, ``ep``
    the int32 epilogue constants): ``stage1(xf, xs)`` from the flat input into a buffer of
    ``staged`` (size, type), then ``tiles(of, ep_, xs, ws)`` into the flat output, ``ws`` the
    weight buffer, or a flat view of its ``flat_weight`` elements where that is not 0."""
    N, C, H, W = geo.x_shape
    O, OH, OW = geo.out_shape[1:]  # noqa: E741
    symbol = "dwconv2d_int8" if geo.depthwise else "conv2d_int8"
    flat = flat_weight > 0

    @T.prim_func
    def conv(
        x: T.Buffer(geo.x_shape, x_dtype),
        wq_: T.Buffer(weight[0], weight[1]),
        ep_: T.Buffer(ep_shape, "int32"),
        out: T.Buffer(geo.out_shape, out_dtype),
    ):
        T.func_attr({"global_symbol": symbol, "tirx.noalias": True})
        xf = T.decl_buffer((N * C * H * W,), x_dtype, data=x.data)
        of = T.decl_buffer((N * O * OH * OW,), out_dtype, data=out.data)
        if flat:
            wf = T.decl_buffer((flat_weight,), weight[1], data=wq_.data)
            xs = T.alloc_buffer((staged[0],), staged[1])
            stage1(xf, xs)
            tiles(of, ep_, xs, wf)
        else:
            xs = T.alloc_buffer((staged[0],), staged[1])
            # Stage 1: the activation repacked (padded, stride phases split).
            stage1(xf, xs)
            # Stage 2: register tiles in parallel.
            tiles(of, ep_, xs, wq_)

    return finish(conv)
