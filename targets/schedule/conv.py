"""The conv rule: a fused NCHW conv2d (any group count) and its elementwise epilogue.

Takes one reduction block (``conv2d``) over ``n, f, y, x | c, ky, kx``, its producers (the
padded copy of the input) before it and its epilogue (bias, clip, residual add) after it.

- Columns on the lanes: the output is tiled as ``fi`` output channels x ``xi`` output columns:
  ``xi`` vectorized (a divisor of the row, so no tail predicate), ``fi`` unrolled, i.e. ``fi``
  vector accumulators kept in registers while the reduction (channels, kernel window) runs
  around them; the epilogue is applied to the tile straight from the accumulators; tiles run in
  parallel. A depthwise conv (one channel per tile) takes several rows per tile instead, and
  pads the rows a tile reads where it reads them.
- Channels on the lanes (:func:`_channel_lanes`): rows narrower than a vector (7x7 and 14x14
  maps), rows whose best tile fills its vectors badly (prime widths: 17, 19, 149) and, on
  full-width AVX-512, windowed convs on half-vector rows (56, 28 columns) read weights packed
  at compile time into panels of a tile's channels
  (:func:`bnfold.targets.schedule.rewrites.channels_last_weights`) and put output channels on
  the lanes.
- On AVX2 (8 lanes, 16 registers; the vector width comes from the CPU's features, see
  :func:`~bnfold.targets.schedule._common.vector_lanes`): a 1x1 stride-1 conv whose ``H * W``
  pixels fill whole vectors is tiled as a GEMM over its flattened pixels (channels x pixel
  vectors, :func:`_pointwise`, kind ``conv1x1 (pixel tiles)``), a row tile of part of a
  vector (28, 14 columns) otherwise puts the channels on the lanes, and column-lane tiles are
  4 channels x 2 rows.
- The zero padding becomes a border fill plus a condition-free copy; a strided conv's padded
  copy is stored as stride phases (:func:`_split_stride_phases`).
- An epilogue that broadcasts onto a bigger tensor (squeeze-excitation scaling) would be
  computed once per tile: the conv is left as it is and only the epilogue runs in parallel
  (kind ``conv (broadcast epilogue only)``).

The kinds: ``conv{kh}x{kw}`` (``conv1x1``, ``conv3x3``), ``depthwise``, with `` (channel
lanes)`` for the channel-lanes tiling. The depthwise case is this rule's (its kind is
``bnfold_conv:depthwise`` in the manifest): it shares the matching, padding, epilogue and
accumulation, only the tile's shape differs.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from bnfold.targets.schedule._common import (
    Found,
    Rule,
    accumulate,
    blocks,
    divisor_at_most,
    extent,
    inline_epilogue,
    parallel_vectorize,
    row_tile,
    shape,
    single_reduction,
    vector_lanes,
)
from bnfold.targets.schedule.matmul import gemm_tile

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What :meth:`Conv.decide` found: the conv block, the blocks before (padded copies) and
    after it (the epilogue), whether the epilogue broadcasts (then nothing else is set), the
    loop extents ``n, f, y, x, rc, ry, rx``, and how the input is read: directly (a 1x1 conv on
    a plain copy), through padded rows made per tile (a depthwise conv with a window), or
    through a whole padded copy."""

    conv: Any
    before: list[Any]
    after: list[Any]
    broadcast: bool = False
    ext: tuple[int, ...] = ()
    depthwise: bool = False
    local_pad: bool = False
    inline_input: bool = False
    channel_lanes: bool = False


class Conv(Rule):
    """A fused NCHW conv2d (one reduction block over n, f, y, x | c, ky, kx) + epilogue."""

    name = "bnfold_conv"

    def rewrite(self, sch: Any, plan: _Plan, target: Any) -> Found:
        lanes = vector_lanes(target)
        epilogue = inline_epilogue(sch, plan.after)
        if plan.broadcast:
            # Leave the (small) conv as it is and run the broadcast epilogue in parallel.
            parallel_vectorize(sch, epilogue, lanes)
            return sch, "conv (broadcast epilogue only)"
        conv = plan.conv
        # The input's padded copy: a 1x1 conv's is a plain copy, read the input directly
        # instead; a real padding stays its own loop nest (inlined, it would test bounds in the
        # inner loop).
        if plan.inline_input:
            for b in plan.before:
                sch.compute_inline(b)
        else:
            for b in plan.before:
                _split_stride_phases(sch, conv, b)
                if not plan.local_pad:
                    _schedule_pad(sch, b, lanes)
        if plan.channel_lanes:
            return _channel_lanes(sch, conv, epilogue, plan.ext, lanes)
        if _pixel_tiles(sch, plan, lanes):
            return _pointwise(sch, conv, epilogue, plan.ext, lanes)
        return _column_lanes(sch, plan, epilogue, lanes)

    def decide(self, sch: Any) -> _Plan | None:
        """The conv's plan, or None if the function is not one this rule takes."""
        found = blocks(sch)
        conv = single_reduction(sch, found, "conv2d")
        if conv is None:
            return None
        if len(sch.get(conv).iter_vars) != 7:
            return None
        before = found[: found.index(conv)]
        after = found[found.index(conv) + 1 :]
        # The epilogue (bias, clip, residual add) is applied per tile, so it must be elementwise
        # on the conv's output: a broadcast onto a bigger tensor (squeeze-excitation scaling)
        # would be computed, unrolled, once per tile.
        out_shape = shape(sch.get(conv).writes[0])
        if any(shape(sch.get(b).writes[0]) != out_shape for b in after):
            return _Plan(conv, before, after, broadcast=True)
        ext = [extent(sch, lp) for lp in sch.get_loops(conv)]
        if any(e is None for e in ext):
            return None
        _, ef, ey, ex, erc, ery, erx = ext
        depthwise = erc == 1 and ef > 1  # type: ignore[operator]
        return _Plan(
            conv,
            before,
            after,
            ext=tuple(ext),  # type: ignore[arg-type]
            depthwise=depthwise,
            local_pad=depthwise and ery * erx > 1,  # type: ignore[operator]
            inline_input=ery == 1 and erx == 1 and _plain_copy_input(sch, before, ey, ex),  # type: ignore[arg-type]
            channel_lanes=_weights_channels_last(sch, conv),
        )


def conv_kind(kh: int, kw: int, depthwise: bool) -> str:
    """``depthwise``, or ``conv{kh}x{kw}`` (``conv1x1``, ``conv3x3``) for a conv window."""
    if depthwise:
        return "depthwise"
    return f"conv{kh}x{kw}"


def _column_lanes(sch: Any, plan: _Plan, epilogue: Any, lanes: int) -> Found:
    """Output columns on the lanes: a tile of ``fi`` channels (a depthwise conv: ``yi`` rows)
    x ``xi`` columns, accumulated in registers, the reduction around it, tiles in parallel."""
    conv, depthwise = plan.conv, plan.depthwise
    n, f, y, x, rc, ry, rx = sch.get_loops(conv)
    _, ef, ey, ex, _, ery, erx = plan.ext
    xi_n = row_tile(ex, lanes)
    xo, xi = sch.split(x, factors=[None, xi_n])
    vregs = -(-xi_n // lanes)
    # Output channels per tile: one accumulator row each; AVX-512 has 32 vector registers.
    budget = 16 if lanes >= 16 else 8
    fi_n = 1 if depthwise else divisor_at_most(ef, max(1, budget // vregs))
    # A depthwise conv has one output channel per tile: take several rows instead, so that
    # there are several independent accumulators (and fewer, larger parallel tasks).
    yi_n = divisor_at_most(ey, max(1, budget // vregs)) if depthwise else 1
    if lanes < 16 and not depthwise and vregs == 1 and ey % 2 == 0 and fi_n >= 4:
        # AVX2: half the channels on two rows, the same 8 accumulators for 6 loads per step
        # (2 row vectors, 4 weight broadcasts) instead of 9. Measured, Zen 3, 1 thread, ratio
        # to onnxruntime, 8 x 1 -> 4 x 2: 3x3 64 -> 128 on 112 x 112 1.73-1.94 -> 1.43,
        # 64 -> 64 on 56 x 56 1.27-1.41 -> 1.14-1.24, 7x7/2 3 -> 64 stem 1.01-1.09 -> 0.95.
        fi_n = divisor_at_most(ef, fi_n // 2)
        yi_n = 2
    fo, fi = sch.split(f, factors=[None, fi_n])
    yo, yi = sch.split(y, factors=[None, yi_n])
    sch.reorder(n, fo, yo, xo, rc, ry, rx, fi, yi, xi)

    # Accumulate the tile in a local buffer (registers after LLVM's SROA); the epilogue reads
    # it directly, so the full-size conv output is never written.
    acc = accumulate(sch, conv, epilogue, xo)
    if plan.local_pad:
        # A depthwise conv does few operations per input element: a padded copy of the whole
        # input would be written and read back through memory. Pad the rows a tile reads,
        # where it reads them (they stay in L1). Kernel alone, 1 thread, ms: 3x3 32ch 112x112
        # 0.187 -> 0.147, 3x3/2 96ch 112x112 0.45 -> 0.34, 144ch 56x56 0.23 -> 0.19.
        for b in plan.before:
            sch.compute_at(b, yo)
            _schedule_pad(sch, b, lanes, outer=3)
    # Constant indices into the accumulators (unrolled), else LLVM keeps them in memory.
    # (A 1 x 1 x 1 tile, a depthwise conv on a prime row, has no loops left here.)
    tile_loops = sch.get_loops(acc)[4:]
    for lp in tile_loops[:-1]:
        sch.unroll(lp)
    if tile_loops:
        sch.vectorize(tile_loops[-1])
    # Annotate before splitting off the init: vectorize/parallel want a block with its init.
    sch.vectorize(xi)
    sch.unroll(fi)
    sch.unroll(yi)
    _tiles_in_parallel(sch, conv, (n, fo, yo), rc, rx, ery * erx)
    return sch, conv_kind(int(ery), int(erx), depthwise)


def _pixel_tiles(sch: Any, plan: _Plan, lanes: int) -> bool:
    """Whether :func:`_pointwise` takes the conv: on AVX2 (8 lanes, 16 registers) a 1x1
    stride-1 conv read straight from its input whose ``H * W`` pixels fill a GEMM tile's
    vectors (AVX-512's column tiles measured well and stay)."""
    _, ef, ey, ex, _, _, _ = plan.ext
    return (
        lanes < 16
        and not plan.depthwise
        and plan.inline_input
        and _reads_unstrided(sch, plan.conv, ey, ex)
        and gemm_tile(ef, ey * ex, lanes) is not None
    )


def _reads_unstrided(sch: Any, conv: Any, ey: int, ex: int) -> bool:
    """Whether the conv reads an input of its own output's H x W (a 1x1 conv: stride 1)."""
    block = sch.get(conv)
    return any(
        len(r.source.shape) == 4 and shape(r)[2:] == [ey, ex] and not r.source.same_as(
            block.writes[0].source)
        for r in block.reads
    )  # fmt: skip


def _pointwise(
    sch: Any, conv: Any, epilogue: Any, ext: tuple[int, ...], lanes: int
) -> tuple[Any, str]:
    """A 1x1 stride-1 conv is a GEMM, ``Y[F, H*W] = W[F, C] X[C, H*W]``: its pixels are one
    contiguous axis. The tile is ``mi`` output channels x ``jv`` vectors of pixels
    (:func:`~bnfold.targets.schedule.matmul.gemm_tile`), taken along the flattened ``H * W``
    axis (so a 28- or 56-column row still fills whole vectors, and rows are not tile
    boundaries); per input channel, ``jv`` vector loads and ``mi`` weight broadcasts feed
    ``mi * jv`` multiply-adds. The tile's pixel block stays in L1 while the channel blocks run
    over it. The conv, the accumulators and the epilogue are re-indexed ``(n, f, y * W + x)``,
    so that each tile's region is exact."""
    _, ef, ey, ex, _, _, _ = ext
    mi_n, pi_n = gemm_tile(ef, ey * ex, lanes)  # type: ignore[misc]

    def flat(n_: Any, f_: Any, y_: Any, x_: Any) -> Any:
        return (n_, f_, y_ * ex + x_)

    acc = sch.cache_write(conv, 0, "local")
    sch.transform_layout(conv, ("write", 0), flat)
    # The conv's own output, re-indexed too where it is an intermediate (never a parameter: that
    # would change the function's signature).
    allocated = sch.get(sch.get_sblock("root")).alloc_buffers
    if any(sch.get(acc).writes[0].source.same_as(b) for b in allocated):
        sch.transform_layout(acc, ("write", 0), flat)
    sch.transform_block_layout(
        conv, lambda n_, f_, y_, x_, c_, r_, s_: (*flat(n_, f_, y_, x_), c_, r_, s_)
    )
    sch.transform_block_layout(acc, flat)
    if epilogue is not None:
        sch.transform_block_layout(epilogue, flat)
    n, f, p, rc, ry, rx = sch.get_loops(conv)
    po, pi = sch.split(p, factors=[None, pi_n])
    fo, fi = sch.split(f, factors=[None, mi_n])
    # Pixel blocks outside channel blocks: measured faster than the reverse (the weights
    # stream from L2), 1 thread, Zen 3: 1x1 64 -> 256 on 56 x 56 3.94 -> 2.34 ms.
    sch.reorder(n, po, fo, rc, ry, rx, fi, pi)
    sch.reverse_compute_at(acc, fo)
    store = acc
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, fo)
        sch.compute_inline(acc)
        store = epilogue
    *tile_rows, cols = sch.get_loops(store)[3:]
    c_o, c_i = sch.split(cols, factors=[None, lanes])
    for lp in (*tile_rows, c_o):
        sch.unroll(lp)
    sch.vectorize(c_i)
    p_o, p_i = sch.split(pi, factors=[None, lanes])
    sch.unroll(fi)
    sch.unroll(p_o)
    sch.vectorize(p_i)
    sch.parallel(sch.fuse(n, po, fo))
    sch.decompose_reduction(conv, rc)
    return sch, "conv1x1 (pixel tiles)"


def _channel_lanes(
    sch: Any, conv: Any, epilogue: Any, ext: tuple[int, ...], lanes: int
) -> tuple[Any, str]:
    """A conv whose output rows are narrower than a vector (7x7 maps), or have no divisor that
    fills one (17, 19, 149 columns): output channels on the lanes instead of columns.
    A tile is ``J`` vectors of channels x ``xi`` columns of a row:
    per reduction step ``J`` weight vectors (contiguous: packed weights) and ``xi`` broadcast
    activations feed ``J * xi`` multiply-adds. The epilogue stores each vector with the
    channel stride (a scatter), once per tile."""
    _, ef, _, ex, _, ery, erx = ext
    n, f, y, x, rc, ry, rx = sch.get_loops(conv)
    vec, j, xi_n = channel_tile(ef, ex, lanes, ery * erx == 1)
    fi_n = j * vec
    fo, fi = sch.split(f, factors=[None, fi_n])
    xo, xi = sch.split(x, factors=[None, xi_n])
    sch.reorder(n, fo, y, xo, rc, ry, rx, xi, fi)
    acc = sch.cache_write(conv, 0, "local")
    # Channels innermost in the accumulator tile, so that each vector is contiguous (and
    # becomes registers).
    sch.transform_layout(conv, ("write", 0), lambda n_, f_, y_, x_: (n_, y_, x_, f_))
    sch.reverse_compute_at(acc, xo)
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, xo)
        sch.compute_inline(acc)
        acc = epilogue
    inner = sch.get_loops(acc)[4:]
    channel = next(lp for lp in inner if extent(sch, lp) == fi_n)
    others = [lp for lp in inner if not lp.same_as(channel)]
    sch.reorder(*others, channel)
    for lp in others:
        sch.unroll(lp)
    # Whole vectors, unrolled: LLVM splits one <64 x float> badly.
    for lp in (channel, fi):
        outer_vec, lane = sch.split(lp, factors=[None, vec])
        sch.unroll(outer_vec)
        sch.vectorize(lane)
    sch.unroll(xi)
    _tiles_in_parallel(sch, conv, (n, fo, y), rc, rx, ery * erx)
    return sch, conv_kind(int(ery), int(erx), False) + " (channel lanes)"


def _tiles_in_parallel(
    sch: Any, conv: Any, outer: tuple[Any, ...], rc: Any, rx: Any, window: int
) -> None:
    """The end of both tilings: a small window's columns unrolled, the ``outer`` tile loops
    fused and run in parallel, then the accumulators' init split off the reduction."""
    if window <= 9:
        sch.unroll(rx)
    sch.parallel(sch.fuse(*outer))
    sch.decompose_reduction(conv, rc)


def channel_tile(ef: int, ex: int, lanes: int, pointwise: bool = False) -> tuple[int, int, int]:
    """A channel-lanes conv tile: (channels per vector, vectors of channels ``J``, columns
    ``xi``). Per reduction step the tile loads ``J`` weight vectors and broadcasts ``xi``
    activations for ``J * xi`` multiply-adds, in at most 16 accumulators (8 below AVX-512).
    Larger tiles measured slower on a 2-core Ice Lake (1 thread, 3x3 256 -> 256 on 14 x 14,
    against 1 x 14: 2 x 14 +40-70%, 4 x 5 +20-35%, 4 x 7 (spilling) +15%)."""
    budget = 16 if lanes >= 16 else 8
    # Channels in whole vectors, else in half vectors (728 channels: Xception, on AVX-512).
    vec = lanes if ef % lanes == 0 else lanes // 2
    j = 2 if ef % (2 * vec) == 0 and ex <= budget // 2 else 1
    if pointwise and lanes < 16 and ef % (2 * vec) == 0:
        # AVX2, a 1x1 conv: two weight vectors per step and up to 12 accumulators (a 3x3
        # conv's tile stays: its reduction runs 9x longer per tile and measured 2x slower so).
        # Measured, Zen 3, 1 thread, ratio to onnxruntime, 1 x 7 -> 2 x 5: 1x1 1024 -> 256 on
        # 14 x 14 1.53 -> 1.21, 256 -> 1024 1.28 -> 1.17; 2048 -> 512 on 7 x 7 1.84 -> 1.76.
        budget, j = 12, 2
    xi_n = ex if ex * j <= budget else divisor_at_most(ex, budget // j)
    if 2 * xi_n <= budget // j:
        # No useful divisor (a prime row: 17, 19, 149 columns): full tiles and a partial last
        # one. Columns are unrolled here, not vectorized, so the tail costs a scalar test per
        # column, not the vectorization; one accumulator per tile would run at FMA latency.
        tiles = -(-ex // (budget // j))
        xi_n = -(-ex // tiles)
    return vec, j, xi_n


def _weights_channels_last(sch: Any, conv: Any) -> bool:
    """Whether the conv reads panel-packed weights, output channels innermost
    (``[F / P, C, KH, KW, P]``, made by
    :func:`~bnfold.targets.schedule.rewrites.channels_last_weights`)."""
    from tvm.tirx.analysis import undefined_vars

    block = sch.get(conv)
    f_var = block.iter_vars[1].var
    for region in block.reads:
        if len(region.region) == 5 and any(
            v.same_as(f_var) for v in undefined_vars(region.region[4].min)
        ):
            return True
    return False


def _plain_copy_input(sch: Any, before: list[Any], ey: int, ex: int) -> bool:
    """Whether the conv's input producer is an unpadded copy of the same H x W (stride 1)."""
    if len(before) != 1:
        return len(before) == 0
    block = sch.get(before[0])
    out = shape(block.writes[0])
    return len(out) == 4 and out[2] == ey and out[3] == ex and "if_then_else" not in str(block.body)


def _schedule_pad(sch: Any, block: Any, lanes: int, outer: int = 0) -> None:
    """A padded copy: the zero border and the in-bounds copy as two condition-free loops.
    ``outer``: loops of the consumer's tile around the copy (after ``compute_at``): those stay
    as they are; 0: a whole-tensor copy, run in parallel."""
    phases = _phases(sch, block)
    found = [block]
    inner = outer > 0
    if "if_then_else" in str(sch.get(block).body):
        try:
            found.insert(0, sch.decompose_padding(block, sch.get_loops(block)[outer]))
        except Exception as e:  # not a recognizable padding: keep the conditional copy
            logger.debug("decompose_padding: %s", str(e).splitlines()[0] if str(e) else e)
    for b in found:
        if phases > 1:
            _phase_order(sch, b, phases, lanes, inner)
        elif inner:
            last = sch.get_loops(b)[-1]
            vec = divisor_at_most(extent(sch, last) or 1, lanes)
            if vec >= 4:
                _, v = sch.split(last, factors=[None, vec])
                sch.vectorize(v)
        else:
            parallel_vectorize(sch, b, lanes)


def _phases(sch: Any, block: Any) -> int:
    """The stride phases of a padded copy stored by :func:`_split_stride_phases` (1: none)."""
    dims = shape(sch.get(block).writes[0])
    return dims[3] if len(dims) == 5 else 1


def _phase_order(sch: Any, block: Any, phases: int, lanes: int, inner: bool = False) -> None:
    """Loop over a phase-split copy in storage order: the column loop split by the stride,
    the phase outside, so that the stores are contiguous (the loads take the stride)."""
    *outer, last = sch.get_loops(block)
    ext = extent(sch, last)
    if ext is None or ext % phases:
        return
    col, phase = sch.split(last, factors=[None, phases])
    sch.reorder(phase, col)
    sch.unroll(phase)
    vec = divisor_at_most(ext // phases, lanes)
    if vec >= 4:
        _, inner = sch.split(col, factors=[None, vec])
        sch.vectorize(inner)
    if outer and not inner:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def _split_stride_phases(sch: Any, conv: Any, pad: Any) -> None:
    """A conv with column stride ``s`` reads its padded input at ``s * x + kx``: a strided
    (gathered) vector load per tap. Store the padded copy as ``s`` phases instead,
    ``[n, c, h, w % s, w // s]``, written in that order, so that every tap reads a contiguous
    vector (the copy reads with the stride, once per element instead of once per tap).
    Measured, 1 thread (kernel alone, ms): MobileNetV2's 3x3/2 depthwise 96ch 112x112
    0.78 -> 0.43, 144ch 56x56 0.32 -> 0.18-0.24, 192ch 28x28 0.12 -> 0.06."""
    from tvm.sym.pattern import detect_linear_equation

    buf = sch.get(pad).writes[0].source
    block = sch.get(conv)
    x_var = block.iter_vars[3].var
    regions = [r for r in block.reads if r.source.same_as(buf)]
    if len(buf.shape) != 4 or len(regions) != 1:
        return
    coef = detect_linear_equation(regions[0].region[3].min, [x_var])
    if len(coef) != 2 or not hasattr(coef[0], "value"):
        return
    stride, width = int(coef[0].value), int(buf.shape[3])
    if stride < 2 or width % stride:
        return
    try:
        sch.transform_layout(
            pad, ("write", 0), lambda n, c, h, w: (n, c, h, w % stride, w // stride)
        )
    except Exception as e:  # keep the strided reads
        logger.debug("stride phases: %s", str(e).splitlines()[0] if str(e) else e)
