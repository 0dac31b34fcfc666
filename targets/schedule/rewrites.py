"""Relax-level rewrites before operator fusion that give the CPU schedule rules better-shaped
work (:func:`bnfold.targets.schedule.fused_passes` runs them in this order):

- :func:`transposed_conv_as_conv`: a transposed conv whose kernel equals its stride becomes a
  1x1 conv plus a depth-to-space rearrangement;
- :func:`dead_taps_trimmed`: kernel taps that only read padding are dropped (a dilated conv on
  a small map becomes a 1x1 conv);
- :func:`padded_taps_banded`: a conv whose products mostly read padding runs as bands without
  padding;
- :func:`channels_last_weights`: convs on narrow maps get weights packed into panels of a
  channel-lanes tile (:mod:`bnfold.targets.schedule.conv`);
- :func:`packed_matmul_weights`: Linears on rows get weights packed into column panels of
  the matmul rule's tile (:mod:`bnfold.targets.schedule.matmul`).

Each is a module pass made by :func:`call_rewrite` from a decision (``wanted``) and a rewrite
of one Relax call. The packing rewrites take their panel widths from the rules' own tile
choices (:func:`~bnfold.targets.schedule.conv.channel_tile`,
:func:`~bnfold.targets.schedule.matmul.gemm_tile`), so that the rule finds the layout it tiles.
"""

from __future__ import annotations

from typing import Any

from bnfold.targets.schedule._common import row_tile, vector_lanes
from bnfold.targets.schedule.conv import channel_tile
from bnfold.targets.schedule.matmul import gemm_tile


def call_rewrite(name: str, wanted: Any, rewrite: Any) -> Any:
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


def static_shape(expr: Any) -> list[int] | None:
    """The shape of a Relax tensor expression as ints; None if unknown or symbolic."""
    shape = getattr(expr.ty, "shape", None)
    values = getattr(shape, "values", None)
    if values is None:
        return None
    try:
        return [int(v) for v in values]
    except TypeError:  # a symbolic dimension
        return None


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
            and len(static_shape(call.args[0]) or ()) == 4
        )

    def rewrite(bb: Any, call: Any) -> Any:
        w = call.args[1].value.numpy()
        c, o, kh, kw = w.shape
        n, _, h, wd = static_shape(call.args[0])  # type: ignore[misc]
        w1 = np.ascontiguousarray(w.transpose(1, 2, 3, 0).reshape(o * kh * kw, c, 1, 1))
        y = bb.emit(relax.op.nn.conv2d(call.args[0], relax.const(w1)))
        y = bb.emit(relax.op.reshape(y, (n, o, kh, kw, h, wd)))
        y = bb.emit(relax.op.permute_dims(y, [0, 1, 4, 2, 5, 3]))
        return relax.op.reshape(y, (n, o, h * kh, wd * kw))

    return call_rewrite("bnfold.TransposedConvAsConv", wanted, rewrite)


def _const_nchw_conv(call: Any) -> tuple[list[int], list[int]] | None:
    """Input and output shapes of a Relax ``conv2d`` with NCHW data, constant OIHW weights and
    static shapes; None for any other call."""
    import tvm

    if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.nn.conv2d":
        return None
    a = call.attrs
    if (a.data_layout, a.kernel_layout, a.out_layout) != ("NCHW", "OIHW", "NCHW"):
        return None
    x_shape, y_shape = static_shape(call.args[0]), static_shape(call)
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

    return call_rewrite("bnfold.DeadTapsTrimmed", lambda c: plan(c) is not None, rewrite)


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

    return call_rewrite("bnfold.PaddedTapsBanded", lambda c: plan(c) is not None, rewrite)


def channels_last_weights(target: Any) -> Any:
    """A Relax pass: a dense NCHW conv2d whose output rows are narrower than a vector (7x7 and 14x14
    maps on AVX-512, 7x7 on AVX2) and whose output channels fill whole vectors gets its constant
    weights packed at compile time into panels of the ``P`` output channels of a channel-lanes tile
    (:func:`~bnfold.targets.schedule.conv.channel_tile`), ``Wp[F / P, C, KH, KW, P]``, so that the
    conv rule can put the output channels on the lanes (with columns on the lanes, a 7-column row
    uses 7 of 16) and a tile's reduction reads one contiguous panel. The call becomes a ``call_te``
    of TOPI's NCHW conv reading ``Wp``: the same products in the same order. Measured, 1 thread, Zen
    4 (AVX-512), channel lanes (``IHWO`` weights) against column lanes, ms: 1x1 320->1280 7x7 0.568
    -> 0.392, 160->960 7x7 0.226 -> 0.158, 96->576 14x14 0.252 -> 0.237, 3x3 256->256 14x14 2.34 ->
    2.10, 3x3 s2 128->256 28x28 1.30 -> 1.16. Ice Lake, 1 thread, ratio to onnxruntime, ``IHWO`` ->
    panels (``IHWO`` rows of 512 channels are 2 KiB apart: a tile's reduction crossed a page every
    other step): 3x3 256->256 on 14x14 1.71 -> 0.90, 512->512 on 7x7 2.69 -> 1.22."""
    import numpy as np
    import tvm
    from tvm import relax

    lanes = vector_lanes(target)
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
        shape = static_shape(call)
        if shape is None or len(shape) != 4:
            return False
        # Columns on the lanes need a row tile of whole (half) vectors or one that nearly
        # fills its vectors: a prime row (17, 19, 149 columns) gets scalar or mostly empty
        # vectors (Inception's 1x7 on 17x17, AVX-512: 121 ms, as channel lanes 1.1 ms).
        # Fine as columns: 8 of 16 lanes (56 columns), 14 of 16 (28 columns).
        cols, half = row_tile(shape[3], lanes), max(4, lanes // 2)
        fill = cols / (-(-cols // lanes) * lanes)
        odd = cols % half != 0 and fill < 0.75
        # Full-width AVX-512, a windowed conv whose row tile is part of a vector (56 columns:
        # 8 of 16, 28: 14 of 16): channel lanes use whole vectors. Measured, Ice Lake,
        # 1 thread, ratio to onnxruntime before -> after: 3x3 64 -> 64 on 56 x 56
        # 2.08 -> 1.17, 128 -> 128 on 28 x 28 1.67 -> 1.06, 3x3/2 64 -> 128 from 56 x 56
        # 1.91 -> 1.36; but a 1x1 24 -> 144 on 56 x 56 0.98 -> 1.28, so 1x1 convs keep their
        # columns. Zen 4 runs a 512-bit operation as two 256-bit halves, and half-vector
        # tiles measured better there: it keeps them.
        window = int(call.args[1].value.shape[2]) * int(call.args[1].value.shape[3]) > 1
        part = lanes >= 16 and cols < lanes and window and full_width
        # AVX2 (8 lanes, 16 registers): a row tile of part of a vector (28 columns: 4 of 8,
        # 14: 7 of 8) takes the channel lanes too, unless a 1x1 conv's pixels fill whole vectors
        # (the pixel tiles of the conv rule). Measured, Zen 3, 1 thread, ratio to
        # onnxruntime before -> after: 3x3 128 -> 128 on 28 x 28 2.45 -> 1.17, 256 -> 256 on
        # 14 x 14 1.70 -> 1.09, 1x1 1024 -> 256 on 14 x 14 2.51 -> 1.55.
        if lanes < 16 and cols % lanes and not _pixel_tiles_fit(call, lanes):
            part = True
        return shape[1] % half == 0 and (shape[3] < lanes or odd or part)

    def rewrite(bb: Any, call: Any) -> Any:
        a = call.attrs
        w = call.args[1].value.numpy()
        o, i, kh, kw = w.shape
        vec, j, _ = channel_tile(o, static_shape(call)[3], lanes, kh * kw == 1)  # type: ignore[index]
        panel = j * vec
        packed = w.reshape(o // panel, panel, i, kh, kw).transpose(0, 2, 3, 4, 1)
        return bb.call_te(
            _packed_conv, call.args[0], relax.const(np.ascontiguousarray(packed)),
            [int(v) for v in a.strides], [int(v) for v in a.padding],
            [int(v) for v in a.dilation], primfunc_name_hint="conv2d_packed",
        )  # fmt: skip

    return call_rewrite("bnfold.ChannelsLastWeights", wanted, rewrite)


def _pixel_tiles_fit(call: Any, lanes: int) -> bool:
    """Whether the conv rule will tile this Relax conv's pixels as a GEMM (its pixel tiles):
    an AVX2 1x1 stride-1 unpadded conv whose ``H * W`` pixels fill whole vectors."""
    a, w = call.attrs, call.args[1]
    shape = static_shape(call)
    return (
        lanes < 16
        and shape is not None
        and [int(d) for d in w.value.shape[2:]] == [1, 1]
        and all(int(v) == 1 for v in a.strides)
        and all(int(v) == 0 for v in a.padding)
        and gemm_tile(shape[1], shape[2] * shape[3], lanes) is not None
    )


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
    """A Relax pass: a float32 ``matmul(x, W)`` with a constant ``W[K, N]`` that the matmul rule
    tiles as rows x ``P`` columns (:func:`~bnfold.targets.schedule.matmul.gemm_tile`) gets its
    weight packed at compile time into column panels, ``Wp[N / P, K, P]`` (``Wp[j // P, k,
    j % P] = W[k, j]``): a tile's reduction then reads one contiguous panel instead of ``K``
    rows ``N`` floats apart (a new 4 KiB page every step once ``N >= 1024``: ConvNeXt's 768 -> 3072
    Linear on 7 x 7, 1 thread, 11.7 ms against onnxruntime's 3.3). The same products summed in
    the same order: exact. The call becomes a ``call_te`` of the same matmul reading ``Wp``."""
    import numpy as np
    import tvm
    from tvm import relax

    lanes = vector_lanes(target)

    def tile(call: Any) -> tuple[int, int] | None:
        if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.matmul":
            return None
        x, w = call.args
        shape = static_shape(x)
        if not isinstance(w, tvm.ir.expr.Constant) or shape is None or len(shape) < 2:
            return None
        if len(w.value.shape) != 2 or str(w.value.dtype) != "float32":
            return None
        if getattr(call.ty, "dtype", "") != "float32" or str(x.ty.dtype) != "float32":
            return None
        return gemm_tile(shape[-2], int(w.value.shape[1]), lanes)

    def rewrite(bb: Any, call: Any) -> Any:
        panel = tile(call)[1]  # type: ignore[index]
        w = call.args[1].value.numpy()
        k, n = w.shape
        packed = np.ascontiguousarray(w.reshape(k, n // panel, panel).transpose(1, 0, 2))
        return bb.call_te(_packed_matmul, call.args[0], relax.const(packed),
                          primfunc_name_hint="matmul_packed")  # fmt: skip

    return call_rewrite("bnfold.PackedMatmulWeights", lambda c: tile(c) is not None, rewrite)


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
