"""Tuning-free CPU schedules for TVM's Relax CPU pipeline: parallel, vectorized, register-tiled.

TVM 0.27's default CPU pipeline schedules nothing: every fused operator is a plain,
single-threaded loop nest (MobileNetV2 ~25x slower than onnxruntime here). TOPI's x86 schedules
are gone and MetaSchedule needs minutes per model, so these rules are applied with dlight's
``ApplyDefaultSchedule`` right after operator fusion, in the spirit of the old
``topi/x86/conv2d_avx_*`` schedules, written with ``tvm.s_tir.Schedule``:

- ``conv``: a fused NCHW conv2d (any group count) and its elementwise epilogue. The output is
  tiled as ``fi`` output channels x ``xi`` output columns: ``xi`` vectorized (a divisor of the
  row, so no tail predicate), ``fi`` unrolled, i.e. ``fi`` vector accumulators kept in registers
  while the reduction (channels, kernel window) runs around them; the epilogue (bias, clip,
  residual add) is applied to the tile straight from the accumulators; tiles run in parallel.
  A depthwise conv (one channel per tile) takes several rows per tile instead. Rows narrower
  than a vector (7x7 and 14x14 maps) put output channels on the lanes instead, with weights
  packed into contiguous panels of a tile's channels at compile time
  (:func:`channels_last_weights`); so do rows whose best tile fills its vectors badly (prime
  widths: 17, 19, 149) and, on full-width AVX-512, windowed convs on half-vector rows (56,
  28 columns). The zero padding becomes a border fill plus a condition-free copy.
- Before the rules, Relax rewrites give them better-shaped work: a transposed conv whose
  kernel equals its stride becomes a 1x1 conv plus a depth-to-space rearrangement
  (:func:`transposed_conv_as_conv`); kernel taps that only read padding are dropped
  (:func:`dead_taps_trimmed`: a dilated conv on a small map becomes a 1x1 conv) and a conv
  whose products mostly read padding runs as bands without padding
  (:func:`padded_taps_banded`); convs on narrow maps get packed weights
  (:func:`channels_last_weights`), and so do Linears on rows (:func:`packed_matmul_weights`).
- ``matmul``: dense layers whose output columns are contiguous in the weight: for one row
  (batch-1 dense) column tiles vectorized, reduction outside, tiles in parallel; for many
  rows (a Linear on NHWC data) a register tile of rows x column vectors (``gemm``).
- ``pool``: 8-bit max pooling (int8 models): padded rows made where they are read, rows in
  parallel.
- ``elementwise``: injective-only functions: producers inlined, the innermost loop vectorized,
  the outer ones run in parallel.
- ``generic`` (:mod:`bnfold.targets._schedule_generic`), tried last: whatever the others leave
  (float pools, global pools, reductions, softmax) gets parallel outer loops and a vectorized
  inner one where legal, so no function keeps TVM's plain loop nest.
- Before fusion, ``sigmoid`` becomes ``1 / (1 + fast_exp(-x))`` in vector arithmetic
  (:mod:`bnfold.targets._fast_math`): SiLU / squeeze-excite epilogues stay in registers.

A rule that cannot apply declines (the function keeps TVM's default loops), so an unusual
operator costs speed, never correctness; ``bnfold compile`` verifies the result anyway.
Measured on a 2-core Zen 4 (1 thread): MobileNetV2 184 -> ~11.5 ms, ResNet-18 1870 -> ~43 ms.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

from bnfold.targets._tuning_db import chosen_database

logger = logging.getLogger(__name__)

# A parallel task should have at least this many innermost iterations, so that the thread
# pool's per-task cost stays small.
_MIN_TASK = 512


def _divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is <= ``limit`` (at least 1)."""
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


def _extent(sch: Any, loop: Any) -> int | None:
    from tvm import tirx

    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _blocks(sch: Any) -> list[Any]:
    root = sch.get_sblock("root") if _has_root(sch) else None
    return list(sch.get_child_blocks(root)) if root is not None else []


def _has_root(sch: Any) -> bool:
    try:
        sch.get_sblock("root")
    except Exception:
        return False
    return True


def _is_reduction(sch: Any, block: Any) -> bool:
    return any(int(iv.iter_type) != 0 for iv in sch.get(block).iter_vars)


def _single_reduction(sch: Any, blocks: list[Any], name: str) -> Any:
    """The function's only reduction block, if its name contains ``name``; else None."""
    reductions = [b for b in blocks if _is_reduction(sch, b)]
    if len(reductions) != 1 or name not in sch.get(reductions[0]).name_hint:
        return None
    return reductions[0]


def _vector_lanes(target: Any) -> int:
    """fp32 lanes of the target's widest vector register."""
    from tvm.target import codegen

    try:
        bits = int(codegen.llvm_get_vector_width(target))
    except Exception:
        bits = 128
    return max(4, bits // 32)


def _parallel_vectorize(sch: Any, block: Any, lanes: int) -> None:
    """Vectorize a spatial block's innermost loop (a divisor-sized piece of it), and run its
    outer loops, fused, in parallel. The innermost loop keeps its own index (fusing it with the
    outer ones would put div/mod in every lane's address and defeat vectorization)."""
    loops = sch.get_loops(block)
    extents = [_extent(sch, lp) for lp in loops]
    if not loops or any(e is None for e in extents):
        return
    *outer, last = loops
    vec = _divisor_at_most(extents[-1], lanes)  # type: ignore[arg-type]
    if vec >= 4:
        _, inner = sch.split(last, factors=[None, vec])
        sch.vectorize(inner)
    total = 1
    for e in extents:
        total *= e  # type: ignore[operator]
    if outer and total >= 2 * _MIN_TASK:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def _schedule_pad(sch: Any, block: Any, lanes: int, outer: int = 0) -> None:
    """A padded copy: the zero border and the in-bounds copy as two condition-free loops.
    ``outer``: loops of the consumer's tile around the copy (after ``compute_at``): those stay
    as they are; 0: a whole-tensor copy, run in parallel."""
    phases = _phases(sch, block)
    blocks = [block]
    inner = outer > 0
    if "if_then_else" in str(sch.get(block).body):
        try:
            blocks.insert(0, sch.decompose_padding(block, sch.get_loops(block)[outer]))
        except Exception as e:  # not a recognizable padding: keep the conditional copy
            logger.debug("decompose_padding: %s", str(e).splitlines()[0] if str(e) else e)
    for b in blocks:
        if phases > 1:
            _phase_order(sch, b, phases, lanes, inner)
        elif inner:
            last = sch.get_loops(b)[-1]
            vec = _divisor_at_most(_extent(sch, last) or 1, lanes)
            if vec >= 4:
                _, v = sch.split(last, factors=[None, vec])
                sch.vectorize(v)
        else:
            _parallel_vectorize(sch, b, lanes)


def _phases(sch: Any, block: Any) -> int:
    """The stride phases of a padded copy stored by :func:`_split_stride_phases` (1: none)."""
    shape = _shape(sch.get(block).writes[0])
    return shape[3] if len(shape) == 5 else 1


def _phase_order(sch: Any, block: Any, phases: int, lanes: int, inner: bool = False) -> None:
    """Loop over a phase-split copy in storage order: the column loop split by the stride,
    the phase outside, so that the stores are contiguous (the loads take the stride)."""
    *outer, last = sch.get_loops(block)
    extent = _extent(sch, last)
    if extent is None or extent % phases:
        return
    col, phase = sch.split(last, factors=[None, phases])
    sch.reorder(phase, col)
    sch.unroll(phase)
    vec = _divisor_at_most(extent // phases, lanes)
    if vec >= 4:
        _, inner = sch.split(col, factors=[None, vec])
        sch.vectorize(inner)
    if outer and not inner:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def schedule_elementwise(func: Any, target: Any, _tunable: bool) -> Any:
    """Injective-only functions (pad, add, clip, reshape, ...): inline, parallelize, vectorize."""
    found = _elementwise(func, target)
    return None if found is None else found[0]


def _elementwise(func: Any, target: Any) -> tuple[Any, str] | None:
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    blocks = _blocks(sch)
    if not blocks or any(_is_reduction(sch, b) for b in blocks):
        return None
    for b in blocks[:-1]:
        try:
            sch.compute_inline(b)
        except Exception:
            return None
    _parallel_vectorize(sch, _blocks(sch)[-1], _vector_lanes(target))
    return sch, "elementwise"


def schedule_conv(func: Any, target: Any, _tunable: bool) -> Any:
    """A fused NCHW conv2d (one reduction block over n, f, y, x | c, ky, kx) + epilogue."""
    found = _conv(func, target)
    return None if found is None else found[0]


def _conv(func: Any, target: Any) -> tuple[Any, str] | None:
    """:func:`schedule_conv`, and the kind of conv it scheduled (see :func:`conv_kind`)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    blocks = _blocks(sch)
    conv = _single_reduction(sch, blocks, "conv2d")
    if conv is None:
        return None
    if len(sch.get(conv).iter_vars) != 7:
        return None
    lanes = _vector_lanes(target)
    before = blocks[: blocks.index(conv)]
    after = blocks[blocks.index(conv) + 1 :]

    # The epilogue (bias, clip, residual add) is applied per tile, so it must be elementwise on
    # the conv's output: a broadcast onto a bigger tensor (squeeze-excitation scaling) would be
    # computed, unrolled, once per tile.
    out_shape = _shape(sch.get(conv).writes[0])
    if any(_shape(sch.get(b).writes[0]) != out_shape for b in after):
        # Leave the (small) conv as it is and run the broadcast epilogue in parallel.
        for b in after[:-1]:
            sch.compute_inline(b)
        _parallel_vectorize(sch, after[-1], _vector_lanes(target))
        return sch, "conv (broadcast epilogue only)"
    for b in after[:-1]:
        sch.compute_inline(b)
    epilogue = after[-1] if after else None

    n, f, y, x, rc, ry, rx = sch.get_loops(conv)
    ext = [_extent(sch, lp) for lp in (n, f, y, x, rc, ry, rx)]
    if any(e is None for e in ext):
        return None
    _, ef, ey, ex, erc, ery, erx = ext
    depthwise = erc == 1 and ef > 1
    local_pad = depthwise and ery * erx > 1  # type: ignore[operator]
    # The input's padded copy: a 1x1 conv's is a plain copy, read the input directly instead;
    # a real padding stays its own loop nest (inlined, it would test bounds in the inner loop).
    if ery == 1 and erx == 1 and _plain_copy_input(sch, before, ey, ex):
        for b in before:
            sch.compute_inline(b)
    else:
        for b in before:
            _split_stride_phases(sch, conv, b)
            if not local_pad:
                _schedule_pad(sch, b, lanes)
    if _weights_channels_last(sch, conv):
        return _conv_channel_lanes(sch, conv, epilogue, ext, lanes)  # type: ignore[arg-type]
    xi_n = _row_tile(ex, lanes)
    xo, xi = sch.split(x, factors=[None, xi_n])
    vregs = -(-xi_n // lanes)
    # Output channels per tile: one accumulator row each; AVX-512 has 32 vector registers.
    budget = 16 if lanes >= 16 else 8
    fi_n = 1 if depthwise else _divisor_at_most(ef, max(1, budget // vregs))
    fo, fi = sch.split(f, factors=[None, fi_n])
    # A depthwise conv has one output channel per tile: take several rows instead, so that
    # there are several independent accumulators (and fewer, larger parallel tasks).
    yi_n = _divisor_at_most(ey, max(1, budget // vregs)) if depthwise else 1
    yo, yi = sch.split(y, factors=[None, yi_n])
    sch.reorder(n, fo, yo, xo, rc, ry, rx, fi, yi, xi)

    # Accumulate the tile in a local buffer (registers after LLVM's SROA); the epilogue reads
    # it directly, so the full-size conv output is never written.
    acc = _accumulate(sch, conv, epilogue, xo)
    if local_pad:
        # A depthwise conv does few operations per input element: a padded copy of the whole
        # input would be written and read back through memory. Pad the rows a tile reads,
        # where it reads them (they stay in L1). Kernel alone, 1 thread, ms: 3x3 32ch 112x112
        # 0.187 -> 0.147, 3x3/2 96ch 112x112 0.45 -> 0.34, 144ch 56x56 0.23 -> 0.19.
        for b in before:
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
    if ery * erx <= 9:  # type: ignore[operator]
        sch.unroll(rx)
    sch.parallel(sch.fuse(n, fo, yo))
    sch.decompose_reduction(conv, rc)
    return sch, conv_kind(int(ery), int(erx), depthwise)  # type: ignore[arg-type]


def _accumulate(sch: Any, block: Any, epilogue: Any, loop: Any) -> Any:
    """Accumulate ``block``'s tile in a local buffer (registers after LLVM's SROA), stored at
    ``loop`` through the epilogue (if any), so the full-size result is never written; returns
    the block that stores the tile."""
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, loop)
    if epilogue is None:
        return acc
    sch.reverse_compute_at(epilogue, loop)
    sch.compute_inline(acc)
    return epilogue


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


def _weights_channels_last(sch: Any, conv: Any) -> bool:
    """Whether the conv reads panel-packed weights, output channels innermost
    (``[F / P, C, KH, KW, P]``, made by :func:`channels_last_weights`)."""
    from tvm.tirx.analysis import undefined_vars

    block = sch.get(conv)
    f_var = block.iter_vars[1].var
    for region in block.reads:
        if len(region.region) == 5 and any(
            v.same_as(f_var) for v in undefined_vars(region.region[4].min)
        ):
            return True
    return False


def _conv_channel_lanes(
    sch: Any, conv: Any, epilogue: Any, ext: list[int], lanes: int
) -> tuple[Any, str]:
    """A conv whose output rows are narrower than a vector (7x7 maps), or have no divisor that
    fills one (17, 19, 149 columns): output channels on the lanes instead of columns.
    A tile is ``J`` vectors of channels x ``xi`` columns of a row:
    per reduction step ``J`` weight vectors (contiguous: packed weights) and ``xi`` broadcast
    activations feed ``J * xi`` multiply-adds. The epilogue stores each vector with the
    channel stride (a scatter), once per tile."""
    _, ef, _, ex, _, ery, erx = ext
    n, f, y, x, rc, ry, rx = sch.get_loops(conv)
    vec, j, xi_n = _channel_tile(ef, ex, lanes)
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
    channel = next(lp for lp in inner if _extent(sch, lp) == fi_n)
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
    if ery * erx <= 9:
        sch.unroll(rx)
    sch.parallel(sch.fuse(n, fo, y))
    sch.decompose_reduction(conv, rc)
    return sch, conv_kind(int(ery), int(erx), False) + " (channel lanes)"


def _avx512_accumulators(vectors: int) -> int:
    """Accumulator registers a tile may use on AVX-512 (32 vector registers) when each
    reduction step loads ``vectors`` operand vectors and one broadcast: the rest, less one
    spare. One more and LLVM spills accumulators inside the reduction loop (measured: a
    4 x 7 tile of 28 ran 20% slower than 1 x 14)."""
    return 32 - vectors - 1 - 1


def _channel_tile(ef: int, ex: int, lanes: int) -> tuple[int, int, int]:
    """A channel-lanes conv tile: (channels per vector, vectors of channels ``J``, columns
    ``xi``). Per reduction step the tile loads ``J`` weight vectors and broadcasts ``xi``
    activations for ``J * xi`` multiply-adds, in at most 16 accumulators (8 below AVX-512).
    Larger tiles measured slower on a 2-core Ice Lake (1 thread, 3x3 256 -> 256 on 14 x 14,
    against 1 x 14: 2 x 14 +40-70%, 4 x 5 +20-35%, 4 x 7 (spilling) +15%)."""
    budget = 16 if lanes >= 16 else 8
    # Channels in whole vectors, else in half vectors (728 channels: Xception, on AVX-512).
    vec = lanes if ef % lanes == 0 else lanes // 2
    j = 2 if ef % (2 * vec) == 0 and ex <= budget // 2 else 1
    xi_n = ex if ex * j <= budget else _divisor_at_most(ex, budget // j)
    if 2 * xi_n <= budget // j:
        # No useful divisor (a prime row: 17, 19, 149 columns): full tiles and a partial last
        # one. Columns are unrolled here, not vectorized, so the tail costs a scalar test per
        # column, not the vectorization; one accumulator per tile would run at FMA latency.
        tiles = -(-ex // (budget // j))
        xi_n = -(-ex // tiles)
    return vec, j, xi_n


def _const_nchw_conv(call: Any) -> tuple[list[int], list[int]] | None:
    """Input and output shapes of a Relax ``conv2d`` with NCHW data, constant OIHW weights and
    static shapes; None for any other call."""
    import tvm

    if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.nn.conv2d":
        return None
    a = call.attrs
    if (a.data_layout, a.kernel_layout, a.out_layout) != ("NCHW", "OIHW", "NCHW"):
        return None
    x_shape, y_shape = _static_shape(call.args[0]), _static_shape(call)
    if not isinstance(call.args[1], tvm.ir.expr.Constant) or x_shape is None or y_shape is None:
        return None
    return x_shape, y_shape


def _live_taps(
    size: int, out: int, k: int, pad: int, pad_end: int, dil: int, stride: int
) -> tuple[int, int, int, int] | None:
    """Along one axis of a conv: the taps ``lo..hi`` that read real input for some output
    (tap ``t`` reads input ``o * stride + t * dil - pad``), and the pads that keep the same
    outputs with only those taps; None if every tap is live or the trimmed pads would be
    negative."""
    live = [t for t in range(k)
            if t * dil - pad <= size - 1 and (out - 1) * stride + t * dil - pad >= 0]  # fmt: skip
    if not live or len(live) == k:
        return None
    lo, hi = live[0], live[-1]
    new_pad, new_end = pad - lo * dil, pad_end - (k - 1 - hi) * dil
    if new_pad < 0 or new_end < 0:
        return None
    if (size + new_pad + new_end - dil * (hi - lo) - 1) // stride + 1 != out:
        return None
    return lo, hi, new_pad, new_end


def dead_taps_trimmed() -> Any:
    """A Relax pass: kernel rows / columns of a conv that only ever read the zero padding
    are dropped, with the padding reduced to match. A dilated conv on a map smaller than its
    dilation (DeepLabV3's ASPP: 3x3 at dilation 24 and 36 on 14 x 14) reads real input only
    through its centre tap: it becomes a 1x1 conv (1 thread: 71 ms -> ~1 ms for 960 -> 256
    channels), instead of nine taps over a padded copy 86 x 86 wide. Exact: the dropped
    products are ``0 * w``, whose sum adds nothing (a ``-0.0`` sum may become ``+0.0``;
    an infinite or NaN weight would have made NaN there). Constant NCHW / OIHW weights."""
    import numpy as np
    from tvm import relax

    def plan(call: Any) -> tuple[tuple[int, int, int, int], ...] | None:
        shapes = _const_nchw_conv(call)
        if shapes is None:
            return None
        (x_shape, y_shape), a, w = shapes, call.attrs, call.args[1]
        pads = [int(p) for p in a.padding]
        axes = []
        for ax in (0, 1):
            found = _live_taps(
                x_shape[2 + ax],
                y_shape[2 + ax],
                int(w.value.shape[2 + ax]),
                pads[ax],
                pads[2 + ax],
                int(a.dilation[ax]),
                int(a.strides[ax]),
            )
            k = int(w.value.shape[2 + ax])
            axes.append(found or (0, k - 1, pads[ax], pads[2 + ax]))  # fmt: skip
        trimmed = [hi - lo + 1 for lo, hi, _, _ in axes]
        return tuple(axes) if trimmed != [int(d) for d in w.value.shape[2:]] else None

    def rewrite(_bb: Any, call: Any) -> Any:
        (ylo, yhi, top, bottom), (xlo, xhi, left, right) = plan(call)  # type: ignore[misc]
        a = call.attrs
        w = np.ascontiguousarray(call.args[1].value.numpy()[:, :, ylo : yhi + 1, xlo : xhi + 1])
        return relax.op.nn.conv2d(
            call.args[0], relax.const(w), strides=a.strides, padding=(top, left, bottom, right),
            dilation=a.dilation, groups=a.groups, data_layout="NCHW", kernel_layout="OIHW",
            out_layout="NCHW", out_dtype=a.out_dtype,
        )  # fmt: skip

    return _call_rewrite("bnfold.DeadTapsTrimmed", lambda c: plan(c) is not None, rewrite)


def _tap_bands(
    size: int, out: int, k: int, pad: int, dil: int, stride: int
) -> list[tuple[int, int, int, int]] | None:
    """Along one axis of a conv: the runs of outputs ``o0..o1-1`` that read real input through
    the same taps ``lo..hi`` (tap ``t`` of output ``o`` reads ``o * stride + t * dil - pad``),
    as ``(o0, o1, lo, hi)``; None if some output reads nothing but padding."""
    bands: list[tuple[int, int, int, int]] = []
    for o in range(out):
        live = [t for t in range(k) if 0 <= o * stride + t * dil - pad < size]
        if not live:
            return None
        if bands and bands[-1][2:] == (live[0], live[-1]):
            bands[-1] = (bands[-1][0], o + 1, live[0], live[-1])
        else:
            bands.append((o, o + 1, live[0], live[-1]))
    return bands


# Band a conv when at most this share of its products reads real input (DeepLabV3's
# dilation-12 ASPP branch on 14 x 14: 17%); a 3x3 conv with padding 1 on 56 x 56 is 97%.
_BAND_LIVE_SHARE = 0.5


def padded_taps_banded() -> Any:
    """A Relax pass: a conv whose products mostly read its zero padding (a dilated conv on a
    map not much larger than its dilation) is computed as bands of outputs that read the same
    live taps: each band a conv without padding, on the slice of the input it reads, with
    only those taps, the bands concatenated back. DeepLabV3's 3x3 dilation-12 conv on 14 x 14
    (960 -> 256 channels) reads real input in 17% of its products: 3 x 3 bands (the inner
    10 x 10 a 1x1 conv). The same live products; only the summation order differs (as between
    any two conv algorithms). Constant NCHW / OIHW weights."""
    import numpy as np
    from tvm import relax

    def plan(call: Any) -> list[list[tuple[int, int, int, int]]] | None:
        shapes = _const_nchw_conv(call)
        if shapes is None:
            return None
        (x_shape, y_shape), a, w = shapes, call.attrs, call.args[1]
        axes, share = [], 1.0
        for ax in (0, 1):
            k = int(w.value.shape[2 + ax])
            bands = _tap_bands(x_shape[2 + ax], y_shape[2 + ax], k, int(a.padding[ax]),
                               int(a.dilation[ax]), int(a.strides[ax]))  # fmt: skip
            if bands is None:
                return None
            share *= sum((o1 - o0) * (hi - lo + 1) for o0, o1, lo, hi in bands) / (
                y_shape[2 + ax] * k
            )
            axes.append(bands)
        if share > _BAND_LIVE_SHARE or len(axes[0]) * len(axes[1]) > 16:
            return None
        return axes

    def rewrite(bb: Any, call: Any) -> Any:
        rows_bands, col_bands = plan(call)  # type: ignore[misc]
        a = call.attrs
        w = call.args[1].value.numpy()
        (sy, sx), (dy, dx) = [int(v) for v in a.strides], [int(v) for v in a.dilation]
        top, left = int(a.padding[0]), int(a.padding[1])
        rows = []
        for o0, o1, ylo, yhi in rows_bands:
            pieces = []
            for p0, p1, xlo, xhi in col_bands:
                r0, c0 = o0 * sy + ylo * dy - top, p0 * sx + xlo * dx - left
                r1, c1 = (o1 - 1) * sy + yhi * dy - top + 1, (p1 - 1) * sx + xhi * dx - left + 1
                part = bb.emit(relax.op.strided_slice(call.args[0], [2, 3], [r0, c0], [r1, c1]))
                taps = np.ascontiguousarray(w[:, :, ylo : yhi + 1, xlo : xhi + 1])
                pieces.append(bb.emit(relax.op.nn.conv2d(
                    part, relax.const(taps), strides=a.strides, padding=0, dilation=a.dilation,
                    groups=a.groups, out_dtype=a.out_dtype,
                )))  # fmt: skip
            rows.append(pieces[0] if len(pieces) == 1 else bb.emit(relax.op.concat(pieces, 3)))
        return rows[0] if len(rows) == 1 else relax.op.concat(rows, 2)

    return _call_rewrite("bnfold.PaddedTapsBanded", lambda c: plan(c) is not None, rewrite)


def channels_last_weights(target: Any) -> Any:
    """A Relax pass: a dense NCHW conv2d whose output rows are narrower than a vector (7x7 and
    14x14 maps on AVX-512, 7x7 on AVX2) and whose output channels fill whole vectors gets its
    constant weights packed at compile time into panels of the ``P`` output channels of a
    channel-lanes tile (:func:`_channel_tile`), ``Wp[F / P, C, KH, KW, P]``, so that
    :func:`_conv` can put the output channels on the lanes (with columns on the lanes, a
    7-column row uses 7 of 16) and a tile's reduction reads one contiguous panel. The call
    becomes a ``call_te`` of TOPI's NCHW conv reading ``Wp``: the same products in the same
    order. Measured, 1 thread, Zen 4 (AVX-512), channel lanes (``IHWO`` weights) against
    column lanes, ms: 1x1 320->1280 7x7 0.568 -> 0.392, 160->960 7x7 0.226 -> 0.158, 96->576
    14x14 0.252 -> 0.237, 3x3 256->256 14x14 2.34 -> 2.10, 3x3 s2 128->256 28x28 1.30 -> 1.16.
    Ice Lake, 1 thread, ratio to onnxruntime, ``IHWO`` -> panels (``IHWO`` rows of 512
    channels are 2 KiB apart: a tile's reduction crossed a page every other step): 3x3
    256->256 on 14x14 1.71 -> 0.90, 512->512 on 7x7 2.69 -> 1.22."""
    import numpy as np
    import tvm
    from tvm import relax

    lanes = _vector_lanes(target)
    full_width = not str(target.attrs.get("mcpu") or "").startswith("znver")

    def wanted(call: Any) -> bool:
        if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.nn.conv2d":
            return False
        a = call.attrs
        w = call.args[1]
        if (a.data_layout, a.kernel_layout, a.out_layout) != ("NCHW", "OIHW", "NCHW"):
            return False
        if int(a.groups) != 1 or not isinstance(w, tvm.ir.expr.Constant):
            return False
        if str(w.value.dtype) != "float32":
            return False
        shape = _static_shape(call)
        if shape is None or len(shape) != 4:
            return False
        # Columns on the lanes need a row tile of whole (half) vectors or one that nearly
        # fills its vectors: a prime row (17, 19, 149 columns) gets scalar or mostly empty
        # vectors (Inception's 1x7 on 17x17, AVX-512: 121 ms, as channel lanes 1.1 ms).
        # Fine as columns: 8 of 16 lanes (56 columns), 14 of 16 (28 columns).
        row_tile, half = _row_tile(shape[3], lanes), max(4, lanes // 2)
        fill = row_tile / (-(-row_tile // lanes) * lanes)
        odd = row_tile % half != 0 and fill < 0.75
        # Full-width AVX-512, a windowed conv whose row tile is part of a vector (56 columns:
        # 8 of 16, 28: 14 of 16): channel lanes use whole vectors. Measured, Ice Lake,
        # 1 thread, ratio to onnxruntime before -> after: 3x3 64 -> 64 on 56 x 56
        # 2.08 -> 1.17, 128 -> 128 on 28 x 28 1.67 -> 1.06, 3x3/2 64 -> 128 from 56 x 56
        # 1.91 -> 1.36; but a 1x1 24 -> 144 on 56 x 56 0.98 -> 1.28, so 1x1 convs keep their
        # columns. Zen 4 runs a 512-bit operation as two 256-bit halves, and half-vector
        # tiles measured better there: it keeps them.
        window = int(call.args[1].value.shape[2]) * int(call.args[1].value.shape[3]) > 1
        part = lanes >= 16 and row_tile < lanes and window and full_width
        return shape[1] % half == 0 and (shape[3] < lanes or odd or part)

    def rewrite(bb: Any, call: Any) -> Any:
        a = call.attrs
        w = call.args[1].value.numpy()
        o, i, kh, kw = w.shape
        vec, j, _ = _channel_tile(o, _static_shape(call)[3], lanes)  # type: ignore[index]
        panel = j * vec
        packed = w.reshape(o // panel, panel, i, kh, kw).transpose(0, 2, 3, 4, 1)
        return bb.call_te(
            _packed_conv, call.args[0], relax.const(np.ascontiguousarray(packed)),
            [int(v) for v in a.strides], [int(v) for v in a.padding],
            [int(v) for v in a.dilation], primfunc_name_hint="conv2d_packed",
        )  # fmt: skip

    return _call_rewrite("bnfold.ChannelsLastWeights", wanted, rewrite)


def _packed_conv(
    x: Any, wp: Any, strides: list[int], padding: list[int], dilation: list[int]
) -> Any:
    """TOPI's NCHW conv2d (a ``pad_temp`` copy if padded, then the ``conv2d_nchw`` reduction
    over ``rc, ry, rx``) reading panel-packed weights ``wp[f // P, c, ky, kx, f % P]``."""
    from tvm import te, tirx, topi

    n, c, h, w = x.shape
    panels, _, kh, kw, p = wp.shape
    top, left, bottom, right = padding
    sy, sx = strides
    dy, dx = dilation
    if any(padding):
        x = topi.nn.pad(x, [0, 0, top, left], [0, 0, bottom, right], name="pad_temp")
    oh = (h + top + bottom - dy * (kh - 1) - 1) // sy + 1
    ow = (w + left + right - dx * (kw - 1) - 1) // sx + 1
    rc = te.reduce_axis((0, c), name="rc")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    return te.compute(
        (n, panels * p, oh, ow),
        lambda b, f, yy, xx: te.sum(
            x[b, rc, yy * sy + ry * dy, xx * sx + rx * dx]
            * wp[tirx.floordiv(f, p), rc, ry, rx, tirx.floormod(f, p)],
            axis=[rc, ry, rx],
        ),
        name="conv2d_nchw",
    )


def packed_matmul_weights(target: Any) -> Any:
    """A Relax pass: a float32 ``matmul(x, W)`` with a constant ``W[K, N]`` that
    :func:`_matmul` tiles as rows x ``P`` columns (:func:`_gemm_tile`) gets its weight packed
    at compile time into column panels, ``Wp[N / P, K, P]`` (``Wp[j // P, k, j % P] =
    W[k, j]``): a tile's reduction then reads one contiguous panel instead of ``K`` rows ``N``
    floats apart (a new 4 KiB page every step once ``N >= 1024``: ConvNeXt's 768 -> 3072
    Linear on 7 x 7, 1 thread, 11.7 ms against onnxruntime's 3.3). The same products summed in
    the same order: exact. The call becomes a ``call_te`` of the same matmul reading ``Wp``."""
    import numpy as np
    import tvm
    from tvm import relax

    lanes = _vector_lanes(target)

    def tile(call: Any) -> tuple[int, int] | None:
        if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.matmul":
            return None
        x, w = call.args
        shape = _static_shape(x)
        if not isinstance(w, tvm.ir.expr.Constant) or shape is None or len(shape) < 2:
            return None
        if len(w.value.shape) != 2 or str(w.value.dtype) != "float32":
            return None
        if getattr(call.ty, "dtype", "") != "float32" or str(x.ty.dtype) != "float32":
            return None
        return _gemm_tile(shape[-2], int(w.value.shape[1]), lanes)

    def rewrite(bb: Any, call: Any) -> Any:
        panel = tile(call)[1]  # type: ignore[index]
        w = call.args[1].value.numpy()
        k, n = w.shape
        packed = np.ascontiguousarray(w.reshape(k, n // panel, panel).transpose(1, 0, 2))
        return bb.call_te(_packed_matmul, call.args[0], relax.const(packed),
                          primfunc_name_hint="matmul_packed")  # fmt: skip

    return _call_rewrite("bnfold.PackedMatmulWeights", lambda c: tile(c) is not None, rewrite)


def _packed_matmul(x: Any, wp: Any) -> Any:
    """``y[..., j] = sum_k x[..., k] * wp[j // P, k, j % P]`` (TE; the block is ``matmul``)."""
    from tvm import te, tirx

    panels, k_ext, panel = wp.shape
    k = te.reduce_axis((0, k_ext), name="k")

    def body(*i: Any) -> Any:
        j = i[-1]
        row = x[(*i[:-1], k)] * wp[tirx.floordiv(j, panel), k, tirx.floormod(j, panel)]
        return te.sum(row, axis=k)

    return te.compute((*x.shape[:-1], panels * panel), body, name="matmul")


def _static_shape(expr: Any) -> list[int] | None:
    """The shape of a Relax tensor expression as ints; None if unknown or symbolic."""
    shape = getattr(expr.ty, "shape", None)
    values = getattr(shape, "values", None)
    if values is None:
        return None
    try:
        return [int(v) for v in values]
    except TypeError:  # a symbolic dimension
        return None


def _call_rewrite(name: str, wanted: Any, rewrite: Any) -> Any:
    """A module pass replacing every Relax call for which ``wanted(call)`` holds by
    ``rewrite(block_builder, call)`` (its operands already rewritten)."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class _Mutator(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = self.visit_expr_post_order(call)
            return rewrite(self.builder_, call) if wanted(call) else call

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod: Any, _ctx: Any) -> Any:
        m = _Mutator(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                m.builder_.update_func(gv, m.visit_expr(func))
        return m.builder_.get()

    return _pass


def transposed_conv_as_conv() -> Any:
    """A Relax pass: a ``conv2d_transpose`` whose kernel equals its stride (no padding,
    dilation 1, one group, constant weights; PP-OCR det's 2x2/2 upsampling) becomes a 1x1 conv
    to ``O * s * s`` channels and a depth-to-space rearrangement:

        y[n, o, s*h + i, s*w + j] = sum_c x[n, c, h, w] * W[c, o, i, j]
                                  = conv1x1(x, W')[n, (o*s + i)*s + j, h, w],
        W'[(o*s + i)*s + j, c] = W[c, o, i, j].

    The same products over the same channels: exact up to summation order. TVM's own lowering
    dilates the input with zeros (3 of 4 products are zero) in loops no rule schedules
    (PP-OCR det: 45.6 ms of 61 ms)."""
    import numpy as np
    import tvm
    from tvm import relax

    def wanted(call: Any) -> bool:
        if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.nn.conv2d_transpose":
            return False
        a, w = call.attrs, call.args[1]
        if (a.data_layout, a.kernel_layout, a.out_layout) != ("NCHW", "IOHW", "NCHW"):
            return False
        if not isinstance(w, tvm.ir.expr.Constant) or int(a.groups) != 1:
            return False
        kh, kw = (int(d) for d in w.value.shape[2:])
        return (
            [int(v) for v in a.strides] == [kh, kw]
            and all(int(v) == 0 for v in (*a.padding, *a.output_padding))
            and all(int(v) == 1 for v in a.dilation)
            and len(_static_shape(call.args[0]) or ()) == 4
        )

    def rewrite(bb: Any, call: Any) -> Any:
        w = call.args[1].value.numpy()
        c, o, kh, kw = w.shape
        n, _, h, wd = _static_shape(call.args[0])  # type: ignore[misc]
        w1 = np.ascontiguousarray(w.transpose(1, 2, 3, 0).reshape(o * kh * kw, c, 1, 1))
        y = bb.emit(relax.op.nn.conv2d(call.args[0], relax.const(w1)))
        y = bb.emit(relax.op.reshape(y, (n, o, kh, kw, h, wd)))
        y = bb.emit(relax.op.permute_dims(y, [0, 1, 4, 2, 5, 3]))
        return relax.op.reshape(y, (n, o, h * kh, wd * kw))

    return _call_rewrite("bnfold.TransposedConvAsConv", wanted, rewrite)


def _pool(func: Any, target: Any) -> tuple[Any, str] | None:
    """An 8-bit windowed pool (``max_pool2d`` of an int8 model: one reduction over the window
    after an optional padded copy): the padded rows are made per output row, where they are
    read, and rows run in parallel. Measured on a 64 x 112 x 112 3x3/2 max pool (1 thread):
    uint8 0.33 -> 0.10 ms. Float pools are left to TVM's default loops, which were faster for
    them (0.18 ms against 0.25-0.42 for every variant tried: vectorized rows, unrolled window,
    parallel rows)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    blocks = _blocks(sch)
    pool = _single_reduction(sch, blocks, "pool")
    if pool is None:
        return None
    kinds = [int(iv.iter_type) for iv in sch.get(pool).iter_vars]
    if kinds != [0, 0, 0, 0, 2, 2]:  # n, c, y, x spatial | window rows, columns
        return None
    if str(sch.get(pool).writes[0].source.dtype) not in ("uint8", "int8"):
        return None
    before, after = blocks[: blocks.index(pool)], blocks[blocks.index(pool) + 1 :]
    if after:
        return None
    n, c, y, _, _, _ = sch.get_loops(pool)
    outer = sch.fuse(n, c, y)
    for b in reversed(before):
        sch.compute_at(b, outer)
    sch.parallel(outer)
    return sch, "pool"


def conv_kind(kh: int, kw: int, depthwise: bool) -> str:
    """``depthwise``, or ``conv{kh}x{kw}`` (``conv1x1``, ``conv3x3``) for a conv window."""
    if depthwise:
        return "depthwise"
    return f"conv{kh}x{kw}"


def schedule_matmul(func: Any, target: Any, _tunable: bool) -> Any:
    """A fused matmul/dense whose output columns are contiguous in the weight (B[k, j]): a
    register tile of rows x column vectors with the reduction outside, tiles in parallel."""
    found = _matmul(func, target)
    return None if found is None else found[0]


def _matmul(func: Any, target: Any) -> tuple[Any, str] | None:
    """:func:`schedule_matmul`. A row count of 1 (batch-1 dense, GEMV): tiles of columns,
    vectorized. Several rows that share the weight (a Linear on NHWC data, ConvNeXt's MLPs:
    ``[1, 56, 56, 96] x [96, 384]``): a tile of ``mi`` rows x ``jv`` column vectors (see
    :func:`_gemm_tile`), ``mi * jv`` accumulators in registers, each row's element broadcast
    against ``jv`` weight vectors per reduction step. Tiles of a column panel run
    consecutively, so the panel of weights stays in cache while the rows stream by. Each
    output is still accumulated over ``k`` in order."""
    from tvm import s_tir
    from tvm.tirx.analysis import undefined_vars

    sch = s_tir.Schedule(func)
    blocks = _blocks(sch)
    red = _single_reduction(sch, blocks, "matmul")
    if red is None:
        return None
    stmt = sch.get(red)
    kinds = [int(iv.iter_type) for iv in stmt.iter_vars]
    if len(kinds) < 3 or kinds[-1] == 0 or any(k != 0 for k in kinds[:-1]):
        return None
    # The last spatial iterator must be the last index of the weight (contiguous columns), or
    # its column within a panel (``Wp[j // P, k, j % P]``, :func:`packed_matmul_weights`).
    j_var = stmt.iter_vars[-2].var
    weights = [
        r for r in stmt.reads if any(v.same_as(j_var) for v in undefined_vars(r.region[-1].min))
    ]
    if len(weights) != 1:
        return None
    packed = not weights[0].region[-1].min.same_as(j_var)
    lanes = _vector_lanes(target)
    after = blocks[blocks.index(red) + 1 :]
    if any(_is_reduction(sch, b) for b in after) or blocks.index(red) != 0:
        return None
    if any(_shape(sch.get(b).writes[0]) != _shape(stmt.writes[0]) for b in after):
        return None
    # Rows: the spatial iterators the weight does not depend on, all of them outer to j.
    used = [v for rng in weights[0].region for v in undefined_vars(rng.min)]
    row_vars = [iv.var for iv in stmt.iter_vars[:-2]]
    shared = not any(v.same_as(r) for v in used for r in row_vars)
    if not shared and len(kinds) > 4:
        return None
    for b in after[:-1]:
        sch.compute_inline(b)
    epilogue = after[-1] if after else None
    *spatial, j, k = sch.get_loops(red)
    ej = _extent(sch, j)
    rows = [_extent(sch, lp) for lp in spatial]
    if ej is None or any(e is None for e in rows):
        return None
    tile = _gemm_tile(rows[-1] if shared and rows else 1, ej, lanes)  # type: ignore[arg-type]
    if packed and (tile is None or tile[1] != _shape(weights[0])[-1]):
        return None  # packed for another tile: cannot happen unless the two rules disagree
    if tile is None:
        return _gemv(sch, red, epilogue, ej, lanes)
    mi_n, ji_n = tile
    *outer, row = spatial
    ro, ri = sch.split(row, factors=[None, mi_n])
    jo, ji = sch.split(j, factors=[None, ji_n])
    sch.reorder(jo, *outer, ro, k, ri, ji)
    acc = _accumulate(sch, red, epilogue, ro)
    # The tile's store (and epilogue): rows unrolled, columns in whole vectors.
    *tile_rows, cols = sch.get_loops(acc)[len(outer) + 2 :]
    c_o, c_i = sch.split(cols, factors=[None, lanes])
    for lp in (*tile_rows, c_o):
        sch.unroll(lp)
    sch.vectorize(c_i)
    j_o, j_i = sch.split(ji, factors=[None, lanes])
    sch.unroll(ri)
    sch.unroll(j_o)
    sch.vectorize(j_i)
    sch.parallel(sch.fuse(jo, *outer, ro))
    sch.decompose_reduction(red, k)
    return sch, "gemm"


def _gemm_tile(rows: int, cols: int, lanes: int) -> tuple[int, int] | None:
    """Rows x columns of a matmul's register tile, or None for a single row or columns that
    are not whole vectors (then :func:`_gemv`). ``rows`` is the innermost row extent (the
    tile's rows divide it, so no row test is needed). Per reduction step a tile of ``mi`` rows
    x ``jv`` vectors does ``mi * jv`` multiply-adds for ``jv`` vector loads and ``mi``
    broadcasts: the tile with the most multiply-adds per load whose accumulators fit the
    vector registers with a few to spare (AVX-512: 32, AVX2: 16)."""
    if rows < 2 or cols % lanes:
        return None
    best: tuple[float, int, int] | None = None
    for jv in (4, 3, 2, 1):
        if (cols // lanes) % jv:
            continue
        budget = _avx512_accumulators(jv) if lanes >= 16 else 12
        mi = _divisor_at_most(rows, budget // jv)
        score = mi * jv / (mi + jv)
        if best is None or score > best[0]:
            best = (score, mi, jv)
    if best is None or best[1] < 2:
        return None
    return best[1], best[2] * lanes


def _gemv(sch: Any, red: Any, epilogue: Any, ej: int, lanes: int) -> tuple[Any, str] | None:
    """One row per tile: tiles of columns vectorized, the reduction outside, in parallel."""
    *spatial, j, k = sch.get_loops(red)
    half = max(4, lanes // 2)
    ji_n = max((m for m in range(half, 4 * lanes + 1, half) if ej % m == 0), default=0)
    if not ji_n:
        # No whole-vector divisor (10 classes): one odd-sized vector if the row is short, else
        # the largest divisor that still fills a few lanes.
        ji_n = ej if ej <= 2 * lanes else _divisor_at_most(ej, 2 * lanes)
        if ji_n < 2:
            return None
    jo, ji = sch.split(j, factors=[None, ji_n])
    sch.reorder(*spatial, jo, k, ji)
    acc = _accumulate(sch, red, epilogue, jo)
    sch.vectorize(sch.get_loops(acc)[-1])
    sch.vectorize(ji)
    sch.parallel(sch.fuse(*spatial, jo))
    sch.decompose_reduction(red, k)
    return sch, "dense"


def _shape(region: Any) -> list[int]:
    return [int(d) for d in region.source.shape]


def _row_tile(width: int, lanes: int) -> int:
    """Output columns per tile: a divisor of the row (a tail would need a predicate, which
    kills vectorization), whole vectors if possible, else at most one vector: LLVM handles a
    <14 x float> well but a <28 x float> badly (measured: 2.3 vs 16.7 ms)."""
    for cand in (lanes, lanes // 2):
        if cand >= 4 and width % cand == 0:
            return cand
    best = _divisor_at_most(width, lanes)
    return width if best < 4 and width <= 2 * lanes else best


def _plain_copy_input(sch: Any, before: list[Any], ey: int, ex: int) -> bool:
    """Whether the conv's input producer is an unpadded copy of the same H x W (stride 1)."""
    if len(before) != 1:
        return len(before) == 0
    block = sch.get(before[0])
    shape = _shape(block.writes[0])
    return (
        len(shape) == 4
        and shape[2] == ey
        and shape[3] == ex
        and "if_then_else" not in str(block.body)
    )


def _generic(func: Any, target: Any) -> Any:
    """The fallback rule (:mod:`bnfold.targets._schedule_generic`, which builds on this
    module's helpers, hence the import here)."""
    from bnfold.targets._schedule_generic import _generic as generic

    return generic(func, target)


# (rule, function) pairs tried in order by :func:`apply_rules`; the generic rule last.
_RULES: tuple[tuple[str, Any], ...] = (
    ("bnfold_conv", _conv),
    ("bnfold_matmul", _matmul),
    ("bnfold_pool", _pool),
    ("bnfold_elementwise", _elementwise),
    ("bnfold_generic", _generic),
)


@dataclasses.dataclass(frozen=True)
class Match:
    """What happened to one PrimFunc: the rule that scheduled it (None: every rule declined,
    TVM's default loops stay) and the kind of operator it saw (``conv3x3``, ``depthwise``,
    ``conv1x1``, ``dense``, ``elementwise``, ``generic``); when declined, the last rule's
    reason (or ``""``)."""

    function: str
    rule: str | None
    kind: str


_RECORDS: list[list[Match]] = []


@contextlib.contextmanager
def recording() -> Iterator[list[Match]]:
    """Collect a :class:`Match` for every PrimFunc the CPU rules see inside the block."""
    record: list[Match] = []
    _RECORDS.append(record)
    try:
        yield record
    finally:
        _RECORDS.remove(record)


def summarize(matches: list[Match]) -> dict[str, int]:
    """``{"bnfold_conv:conv3x3": 7, ..., "unscheduled": 1}``: PrimFuncs per rule and kind."""
    counts = collections.Counter(f"{m.rule}:{m.kind}" if m.rule else "unscheduled" for m in matches)
    return dict(sorted(counts.items()))


def _try(name: str, rule: Any, func: Any, target: Any) -> tuple[Any, str] | str | None:
    """``rule(func, target)``: a (schedule, kind) pair, or a decline: None, or its reason (a
    string, from rules that give one), also when a schedule primitive refuses."""
    try:
        return rule(func, target)
    except Exception as e:  # a schedule primitive refused: keep the default loops
        logger.debug("%s declined: %s", name, str(e).splitlines()[0] if str(e) else e)
        return None


def schedule_function(func: Any, target: Any, name: str = "") -> tuple[Any, Match]:
    """The first rule that takes ``func``: its schedule (None if all decline) and the match."""
    reason = ""
    for rule_name, rule in _RULES:
        found = _try(rule_name, rule, func, target)
        if isinstance(found, str):
            reason = f"{rule_name}: {found}"
        elif found is not None:
            return found[0], Match(name, rule_name, found[1])
    return None, Match(name, None, reason)


def cpu_rules() -> list[Any]:
    """The schedule rules as dlight rules, in the order they are tried (for
    ``dlight.ApplyDefaultSchedule``; bnfold's pipeline uses :func:`apply_rules`)."""
    from tvm.s_tir import dlight as dl

    def dlight_rule(rule_name: str, rule: Any) -> Any:
        def apply(func: Any, target: Any, _tunable: bool) -> Any:
            found = _try(rule_name, rule, func, target)
            return None if found is None or isinstance(found, str) else found[0]

        return dl.ScheduleRule.from_callable(rule_name)(apply)

    return [dlight_rule(n, r) for n, r in _RULES]


def apply_rules() -> Any:
    """A module pass: ``dlight.ApplyDefaultSchedule`` with bnfold's rules, which also reports
    what it did with each PrimFunc to every :func:`recording` block."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="bnfold.ApplyCpuRules")
    def _apply(mod: Any, _ctx: Any) -> Any:
        updated = {}
        for g_var, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if "tirx.is_scheduled" in func.attrs and int(func.attrs["tirx.is_scheduled"]) == 1:
                # Scheduled before the rules: a tuned schedule from a MetaSchedule database.
                for record in _RECORDS:
                    record.append(Match(g_var.name_hint, "tuned", "database"))
                continue
            target = func.attrs.get("target") or tvm.target.Target.current(allow_none=False)
            sch, match = schedule_function(func, target, g_var.name_hint)
            for record in _RECORDS:
                record.append(match)
            logger.debug("%s: %s %s", match.function, match.rule or "unscheduled", match.kind)
            if sch is not None:
                updated[g_var] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        for g_var, func in updated.items():
            mod[g_var] = func
        return mod

    return _apply


def fused_passes(target: Any) -> list[Any]:
    """The CPU pipeline up to operator fusion: the PrimFuncs bnfold's rules (and MetaSchedule,
    :mod:`bnfold.lower.tune`) schedule are the ones these passes leave."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from bnfold.targets._fast_math import fast_sigmoid

    return [
        transposed_conv_as_conv(),
        dead_taps_trimmed(),
        padded_taps_banded(),
        fast_sigmoid(),
        channels_last_weights(target),
        packed_matmul_weights(target),
        *cpu.library_dispatch_passes(target),
        *cpu.legalize_passes(target),
    ]


def cpu_pipeline(target: Any, database: str | None = None) -> Any:
    """Relax's CPU pipeline with bnfold's rules (:func:`apply_rules`) after operator fusion.

    ``database``: a MetaSchedule work folder (``bnfold tune --db``); the functions for which
    ``bnfold tune`` chose a record (:func:`bnfold.targets._tuning_db.chosen_database`) take the
    tuned schedule, bnfold's rules schedule the others.
    """
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        tuned: Any = contextlib.nullcontext()
        if database is not None:
            tuned = chosen_database(database)
        with target, tuned:
            # The database pass takes the target when it is made, and the database (the one
            # entered above) when it runs.
            apply_db = [] if database is None else [tvm.relax.transform.MetaScheduleApplyDatabase()]
            seq = tvm.transform.Sequential(
                fused_passes(target)
                + apply_db
                + [apply_rules()]
                + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline
