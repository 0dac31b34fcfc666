"""The int8 rewrite's rules: one pattern each, a check, and an emit that cannot fail.

:func:`bnfold.lower.int8.rewrite` walks an imported QDQ module and, at every ``quantize`` call
(a *site*), tries :data:`QUANTIZE_RULES` in order; at every matmul whose float result is not
quantized again, :data:`FLOAT_OUTPUT_RULES`. A rule's ``match`` returns

* ``None``: the site is not this rule's pattern (the next rule is tried);
* a :class:`Decline`: it is, but a precondition fails (the reason goes to the manifest; the
  next rule is still tried, and the first decline is what the record keeps);
* a match object: everything ``emit`` needs, *including* the target kernel already built (a
  kernel that declines or fails to build is decided here, in ``match``), so that ``emit`` only
  adds bindings and cannot decline.

The arithmetic (fixed-point requantize, clamp bounds) is in :mod:`bnfold.lower.fixed_point`;
the math of each pattern is in :mod:`bnfold.lower.int8`'s docstring. The rules, in order:

=====================  ======================================================================
``passthrough``        ``quantize(op(dequantize(x_q, s, z)), s, z)`` for an op that only moves
                       or selects values (max pooling, reshapes): ``op(x_q)``, exactly
``quantized_add``      ``quantize(act(dequantize(a) + dequantize(b)))``: the target's 8-bit add
``integer_conv``       ``quantize(act(conv2d|matmul(dequantize(x_q), dequantize(W_q)) (+ b)))``:
                       int8 x int8 -> int32, bias in the accumulator, fixed-point requantize
``float_output``       ``matmul(dequantize(x_q), dequantize(W_q)) (+ b)`` read as float: the
                       integer matmul with a float epilogue (onnxruntime's QGemm, float output)
=====================  ======================================================================
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from bnfold.lower import fixed_point
from bnfold.lower.fixed_point import INT_RANGES, clamp_bounds
from bnfold.targets import int8 as int8_kernels

logger = logging.getLogger(__name__)

# Ops whose output values are input values: run on the quantized tensor when the quantize
# after them repeats the input's scale and zero point (quantize_int8's "pass-through" ops).
PASSTHROUGH_OPS = (
    "relax.nn.max_pool2d",
    "relax.reshape",
    "relax.permute_dims",
    "relax.squeeze",
    "relax.expand_dims",
    "relax.flatten",
)


# --------------------------------------------------------------------------------------------
# What a rule sees and returns


@dataclasses.dataclass(frozen=True)
class Context:
    """The rewrite's state a rule may use: the block builder (``emit`` only), ``value`` (a
    variable's bound expression, as the mutator knows it) and the TVM target whose int8 kernels
    to use (None: Relax ops only)."""

    bb: Any
    value: Callable[[Any], Any]
    target: Any | None


@dataclasses.dataclass(frozen=True)
class Decline:
    """A rule's pattern matched but a precondition did not hold: ``op`` and the ``reason``
    (which starts with the op, ``"conv2d: weight zero point is not 0"``)."""

    op: str
    reason: str


def decline(op: str, why: str) -> Decline:
    return Decline(op, f"{op}: {why}")


@dataclasses.dataclass(frozen=True)
class QuantizeSite:
    """One ``quantize`` call: its record ``name`` (``q0``, ``q1``...), output scale / zero point
    / type, its ``input`` expression, and that input with its activations peeled off
    (``acts``: ``("max"|"min", bound)``, outermost first; ``core``: what is left)."""

    name: str
    call: Any
    s_y: float
    z_y: int
    out_dtype: str
    input: Any
    acts: tuple[tuple[str, np.ndarray], ...]
    core: Any


@dataclasses.dataclass(frozen=True)
class FloatSite:
    """A matmul (or bias add of one) whose float result no quantize reads: ``name`` (``f0``...)
    and the expression ``expr``."""

    name: str
    expr: Any


class Match(Protocol):
    """What a rule's ``match`` found: the record's ``op`` and ``how`` (``kernel``: the
    target's int8 kernel; ``relax``: Relax integer ops)."""

    op: str
    how: str


class Rule(Protocol):
    name: str

    def match(self, ctx: Context, site: Any) -> Match | Decline | None: ...

    def emit(self, ctx: Context, site: Any, m: Any) -> Any: ...


def quantize_site(ctx: Context, call: Any, name: str) -> QuantizeSite | Decline:
    """The :class:`QuantizeSite` of ``quantize`` call ``call``, or why it has none."""
    s_y, z_y = _scalar(call.args[1]), _scalar(call.args[2])
    out_dtype = str(call.ty.dtype)
    if s_y is None or z_y is None or out_dtype not in INT_RANGES:
        return decline("quantize", "output scale/zero point not constant scalars")
    e = ctx.value(call.args[0])
    core, acts = e, []
    while (act := _activation(ctx, core)) is not None:
        acts.append(act[:2])
        core = act[2]
    return QuantizeSite(name, call, float(s_y), int(z_y), out_dtype, e, tuple(acts), core)


# --------------------------------------------------------------------------------------------
# Relax helpers


def op_name(expr: Any) -> str | None:
    """The Relax op name of a call (``relax.nn.conv2d``), or None."""
    import tvm
    from tvm import relax

    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return str(expr.op.name)
    return None


def _const(expr: Any) -> np.ndarray | None:
    import tvm

    if isinstance(expr, tvm.ir.expr.Constant):
        return expr.value.numpy()
    return None


def _scalar(expr: Any) -> float | None:
    v = _const(expr)
    if v is None or v.size != 1:
        return None
    return v.reshape(()).item()


def _ints(values: Any) -> list[int]:
    return [int(v) for v in values]


def _shape(expr: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in expr.ty.shape.values)


def _tensor_type(call: Any, dtype: str) -> Any:
    from tvm import relax

    return relax.TensorType(list(_shape(call)), dtype)


@functools.cache
def _kernel_thread() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread that builds kernels (see :func:`_try_kernel`), started on first use."""
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bnfold-int8-kernel")


def _try_kernel(what: str, name: str, make: Callable[[], Any]) -> Any:
    """What ``make()`` returns (a kernel, or None where it declines); None, with a warning, if
    it raises: a kernel bug must not break the build, the group then stays on Relax ops.

    ``make`` runs on a thread of its own, from a short stack. TVMScript's parser calls
    ``inspect.stack()`` a few times per PrimFunc, and that looks up the module of every frame:
    here the Relax mutator's recursion (and the CLI's) is on the stack, and under ``python -m``
    or ``-c`` so are frames without a module file (``<frozen runpy>``, ``<string>``), each of
    which makes ``inspect.getmodule`` scan all of ``sys.modules`` (about 2600 with TVM).
    ``compile --int8`` of mnasnet0_5 (122 kernels, built twice with the layer-wise build)
    spent 600 of its 870 s there, about 5 s per kernel."""
    try:
        return _kernel_thread().submit(make).result()
    except Exception as e:
        logger.warning("int8 %s kernel for %s failed (%s); using Relax ops", what, name, e)
        return None


def _emit_kernel(bb: Any, func: Any, symbol: str, args: list[Any], out_type: Any) -> Any:
    """Add the kernel PrimFunc under its own ``symbol`` (every PrimFunc needs one in the module)
    and emit its ``call_tir``."""
    from tvm import relax

    gv = bb.add_func(func.with_attr("global_symbol", symbol), symbol)
    return bb.emit(relax.call_tir(gv, args, out_type))


def _activation(ctx: Context, e: Any) -> tuple[str, np.ndarray, Any] | None:
    """``(max|min, bound, input)`` if ``e`` is an activation with a constant bound, as TVM's
    importer writes them: ``relu``; ``Clip`` as ``call_tir(maximum|minimum, (v, where(isnan(c),
    -+inf, c)))``; ``Min``/``Max`` as ``min|max(stack(broadcast_to(v), broadcast_to(c)),
    axis=0)``."""
    import tvm
    from tvm import relax

    op = op_name(e)
    if op == "relax.nn.relu":
        return "max", np.zeros(1), ctx.value(e.args[0])
    if op == "relax.call_tir" and isinstance(e.args[0], tvm.ir.GlobalVar):
        fname = e.args[0].name_hint
        kind = next((k for k in ("max", "min") if fname.startswith(k + "imum")), None)
        args = list(e.args[1].fields) if isinstance(e.args[1], relax.Tuple) else []
        if kind is None or len(args) != 2:
            return None
        bound = ctx.value(args[1])
        if op_name(bound) == "relax.where":
            bound = ctx.value(bound.args[2])
        c = _const(bound)
        if c is None or np.any(np.isnan(c)):
            return None
        return kind, c.astype(np.float64), ctx.value(args[0])
    if op in ("relax.max", "relax.min"):
        stacked = ctx.value(e.args[0])
        axis = e.attrs.axis
        if op_name(stacked) != "relax.stack" or axis is None or _ints(axis) != [0]:
            return None
        parts = [ctx.value(p) for p in stacked.args[0].fields]
        parts = [ctx.value(p.args[0]) if op_name(p) == "relax.broadcast_to" else p
                 for p in parts]  # fmt: skip
        consts = [_const(p) for p in parts]
        if len(parts) != 2 or sum(c is not None for c in consts) != 1:
            return None
        c = consts[0] if consts[0] is not None else consts[1]
        v = parts[1] if consts[0] is not None else parts[0]
        return op.split(".")[-1], c.astype(np.float64), v
    return None


# --------------------------------------------------------------------------------------------
# The integer conv2d/matmul group (shared by integer_conv and float_output)


@dataclasses.dataclass(frozen=True)
class IntegerGroup:
    """An integer conv2d/matmul: ``call`` (the float conv2d/matmul), its 8-bit input ``x_q``
    with zero point ``z_x``, the int8 weight ``w_q`` (as the call reads it: OIHW, or (I, O) /
    (O, I) when ``transpose``), ``n_out`` output channels with accumulator scales
    ``acc_scale = s_x s_w[o]``; the bias folded into the accumulator (``b_eff = round(b /
    acc_scale) - z_x sum W``) for a requantized output, or kept apart for a float one (``bias``
    as float, ``zero_fix = -z_x sum W`` as integer)."""

    kind: str
    call: Any
    x_q: Any
    z_x: int
    w_q: np.ndarray
    transpose: bool
    n_out: int
    acc_scale: np.ndarray
    b_eff: np.ndarray
    bias: np.ndarray
    zero_fix: np.ndarray


def integer_group(ctx: Context, e: Any) -> IntegerGroup | Decline:
    """The integer form of ``e = conv2d|matmul(dequantize(x_q), dequantize(W_q)) (+ b)``, or
    the reason it has none."""
    bias_expr = None
    if op_name(e) == "relax.add":
        a, b = ctx.value(e.args[0]), ctx.value(e.args[1])
        if op_name(a) not in ("relax.nn.conv2d", "relax.matmul"):
            a, b = b, a
        e, bias_expr = a, b
    op = op_name(e)
    if op not in ("relax.nn.conv2d", "relax.matmul"):
        what = op.removeprefix("relax.") if op else "graph input"
        return decline(what, "not a conv2d/matmul group (dequantize -> float -> quantize)")
    kind = op.split(".")[-1]
    x = ctx.value(e.args[0])
    if op_name(x) != "relax.dequantize":
        return decline(kind, "input is not dequantized")
    s_x, z_x = _scalar(x.args[1]), _scalar(x.args[2])
    if s_x is None or z_x is None or str(x.args[0].ty.dtype) not in INT_RANGES:
        return decline(kind, "input scale/zero point not constant scalars")
    w_expr = ctx.value(e.args[1])
    transpose = False
    if kind == "matmul" and op_name(w_expr) == "relax.permute_dims":
        axes = w_expr.attrs.axes
        if axes is None or _ints(axes) != [1, 0]:
            return decline("matmul", "weight permutation is not a 2-D transpose")
        transpose, w_expr = True, ctx.value(w_expr.args[0])
    if op_name(w_expr) != "relax.dequantize":
        return decline(kind, "weight is not a dequantized constant")
    w_q, s_w, z_w = (_const(a) for a in w_expr.args[:3])
    if w_q is None or s_w is None or z_w is None or w_q.dtype != np.int8:
        return decline(kind, "weight is not a constant int8 tensor")
    if np.any(z_w != 0):
        return decline(kind, "weight zero point is not 0")
    if kind == "matmul":
        if w_q.ndim != 2 or x.args[0].ty.ndim != 2:
            return decline("matmul", "not 2-D")
        w_oi = w_q if transpose else w_q.T  # (O, I)
        per_out = int(w_expr.attrs.axis) == (0 if transpose else 1)
    else:
        w_oi = w_q
        per_out = int(w_expr.attrs.axis) == 0
    n_out = w_oi.shape[0]
    s_w = np.asarray(s_w, dtype=np.float64).reshape(-1)
    if s_w.size not in (1, n_out) or (s_w.size > 1 and not per_out):
        return decline(kind, "weight scale is not per output channel or per tensor")
    acc_scale = s_x * np.broadcast_to(s_w, (n_out,))
    bias = np.zeros(n_out, dtype=np.float64)
    if bias_expr is not None:
        b = _bias_values(ctx, bias_expr, n_out, kind)
        if isinstance(b, Decline):
            return b
        bias = b
    with np.errstate(divide="ignore", invalid="ignore"):
        b_acc = np.where(acc_scale > 0, np.round(bias / acc_scale), 0.0)
    w_sum = w_oi.reshape(n_out, -1).astype(np.int64).sum(axis=1)
    b_eff = b_acc - int(z_x) * w_sum
    if np.any(np.abs(b_eff) >= 2**31):
        return decline(kind, "bias does not fit int32")
    return IntegerGroup(kind, e, x.args[0], int(z_x), w_q, transpose, n_out, acc_scale,
                        b_eff, bias, -int(z_x) * w_sum)  # fmt: skip


def _bias_values(ctx: Context, expr: Any, n_out: int, kind: str) -> np.ndarray | Decline:
    if op_name(expr) == "relax.reshape":
        expr = ctx.value(expr.args[0])
    if op_name(expr) == "relax.dequantize":
        b_q, s_b, z_b = (_const(a) for a in expr.args[:3])
        if b_q is None or s_b is None or z_b is None:
            return decline(kind, "bias is not a constant")
        b = (b_q.astype(np.float64) - z_b.astype(np.float64)) * s_b.astype(np.float64)
    else:
        b = _const(expr)
        if b is None:
            return decline(kind, "bias is not a constant")
        b = b.astype(np.float64)
    if b.size != n_out:
        return decline(kind, "bias is not one value per output channel")
    return b.reshape(-1)


# --------------------------------------------------------------------------------------------
# passthrough


@dataclasses.dataclass(frozen=True)
class PassthroughMatch:
    op: str
    how: str
    x_q: Any
    pool_kernel: Any | None  # the 8-bit max-pool PrimFunc, when the target has one


class Passthrough:
    """``quantize(op(dequantize(x_q, s, z)), s, z)`` -> ``op(x_q)``: exact, since dequantize
    is increasing and ``quantize(dequantize(v)) == v``. Max pooling uses the target's 8-bit
    kernel where it has one (NCHW, dilation 1, floor mode)."""

    name = "passthrough"

    def match(self, ctx: Context, site: QuantizeSite) -> PassthroughMatch | None:
        e = site.input
        op = op_name(e)
        if op not in PASSTHROUGH_OPS:
            return None
        x = ctx.value(e.args[0])
        if op_name(x) != "relax.dequantize" or str(x.args[0].ty.dtype) != site.out_dtype:
            return None
        if (_scalar(x.args[1]), _scalar(x.args[2])) != (site.s_y, site.z_y) or site.s_y <= 0:
            return None
        x_q = x.args[0]
        if op == "relax.nn.max_pool2d":
            kernel = self._pool_kernel(ctx, e, x_q, site.name)
            if kernel is not None:
                return PassthroughMatch("max_pool2d", "kernel", x_q, kernel)
        return PassthroughMatch(op.split(".")[-1], "relax", x_q, None)

    @staticmethod
    def _pool_kernel(ctx: Context, pool: Any, x_q: Any, name: str) -> Any:
        if ctx.target is None:
            return None
        a = pool.attrs
        if (str(a.layout) != "NCHW" or str(a.out_layout) != "NCHW" or bool(a.ceil_mode)
                or _ints(a.dilation) != [1, 1] or x_q.ty.ndim != 4):  # fmt: skip
            return None
        pt, pl, pb, pr = _ints(a.padding)
        return _try_kernel("max pool", name, lambda: int8_kernels.max_pool2d_int8(
            _shape(x_q), str(x_q.ty.dtype), tuple(_ints(a.pool_size)), tuple(_ints(a.strides)),
            (pt, pl, pb, pr), ctx.target,
        ))  # fmt: skip

    def emit(self, ctx: Context, site: QuantizeSite, m: PassthroughMatch) -> Any:
        from tvm import relax

        e = site.input
        if m.pool_kernel is not None:
            return _emit_kernel(ctx.bb, m.pool_kernel, f"int8_max_pool2d_{site.name}", [m.x_q],
                                _tensor_type(e, str(m.x_q.ty.dtype)))  # fmt: skip
        return ctx.bb.emit(relax.Call(e.op, [m.x_q, *e.args[1:]], e.attrs))


# --------------------------------------------------------------------------------------------
# quantized_add


@dataclasses.dataclass(frozen=True)
class AddMatch:
    a: Any
    b: Any
    kernel: Any
    op: str = "add"
    how: str = "kernel"


class QuantizedAdd:
    """``quantize(act(dequantize(a) + dequantize(b)))`` (a residual connection): the target's
    8-bit add, onnxruntime's float32 formula ``clip(round((float(a - z_a) s_a + float(b - z_b)
    s_b) / s_y) + z_y, lo, hi)``. Same shapes, scalar scales and zero points, activation
    bounds that are scalars; only where the target has the kernel."""

    name = "quantized_add"

    def match(self, ctx: Context, site: QuantizeSite) -> AddMatch | Decline | None:
        e = site.core
        if op_name(e) != "relax.add":
            return None
        parts = [ctx.value(a) for a in e.args]
        if any(op_name(p) != "relax.dequantize" for p in parts):
            return None  # a bias add, or float on one side: integer_conv's or nobody's
        if ctx.target is None:
            return decline("add", "no 8-bit add kernel without a target")
        shape = _shape(e)
        q: list[tuple[Any, float, int]] = []
        for p in parts:
            s, z = _scalar(p.args[1]), _scalar(p.args[2])
            x = p.args[0]
            if s is None or z is None or str(x.ty.dtype) not in INT_RANGES:
                return decline("add", "an input's scale/zero point are not constant scalars")
            if _shape(x) != shape:
                return decline("add", "inputs of different shapes (broadcast)")
            q.append((x, float(s), int(z)))
        clamp = clamp_bounds(list(site.acts[::-1]), 1, site.s_y, site.z_y, site.out_dtype, False)
        if isinstance(clamp, str):
            return decline("add", clamp)
        (a, s_a, z_a), (b, s_b, z_b) = q
        spec = int8_kernels.QAdd(
            str(a.ty.dtype), s_a, z_a, str(b.ty.dtype), s_b, z_b,
            site.s_y, site.z_y, site.out_dtype, (int(clamp[0][0]), int(clamp[1][0])),
        )  # fmt: skip
        kernel = _try_kernel("add", site.name,
                             lambda: int8_kernels.add_int8(shape, spec, ctx.target))  # fmt: skip
        if kernel is None:
            return decline("add", "the target has no 8-bit add kernel for these types")
        return AddMatch(a, b, kernel)

    def emit(self, ctx: Context, site: QuantizeSite, m: AddMatch) -> Any:
        from tvm import relax

        return _emit_kernel(ctx.bb, m.kernel, f"int8_add_{site.name}", [m.a, m.b],
                            relax.TensorType(list(_shape(site.core)), site.out_dtype))  # fmt: skip


# --------------------------------------------------------------------------------------------
# integer_conv


@dataclasses.dataclass(frozen=True)
class ConvMatch:
    group: IntegerGroup
    mult: np.ndarray
    shift: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    kernel: tuple[Any, list[np.ndarray]] | None  # (PrimFunc, its constant arguments)
    subsample: bool  # the kernel runs on x_q[:, :, ::sh, ::sw] (a strided unpadded 1x1 conv)

    @property
    def op(self) -> str:
        return self.group.kind

    @property
    def how(self) -> str:
        return "kernel" if self.kernel is not None else "relax"


class IntegerConv:
    """``quantize(act(conv2d|matmul(dequantize(x_q), dequantize(W_q)) (+ b)))`` in integer
    arithmetic: the target's int8 conv kernel where it has one, else Relax's integer
    conv2d/matmul (``out_dtype="int32"``) and the requantize as int64 Relax ops."""

    name = "integer_conv"

    def match(self, ctx: Context, site: QuantizeSite) -> ConvMatch | Decline:
        g = integer_group(ctx, site.core)
        if isinstance(g, Decline):
            return g
        try:
            # Through the module: tests skew it to show the layer-by-layer gate catches it.
            mult, shift = fixed_point.requant_params(g.acc_scale / site.s_y)
        except ValueError as err:  # a multiplier the fixed-point form cannot hold
            return decline(g.kind, str(err))
        clamp = clamp_bounds(list(site.acts[::-1]), g.n_out, site.s_y, site.z_y,
                             site.out_dtype, g.kind == "conv2d")  # fmt: skip
        if isinstance(clamp, str):
            return decline(g.kind, clamp)
        lo, hi = clamp
        kernel, subsample = None, False
        if g.kind == "conv2d":
            a = g.call.attrs
            if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW":
                return decline("conv2d", f"layout {a.data_layout}/{a.kernel_layout}")
            strides, dilation, pad = _ints(a.strides), _ints(a.dilation), _ints(a.padding)
            # A strided unpadded 1x1 conv reads only every s-th row and column: it is the
            # stride-1 1x1 conv (one long row, see the kernel) of the subsampled input. Exact;
            # the kernel's strided repack would read (and phase-split) all of it (ResNet-18's
            # downsample 1x1/2 convs, 1 thread: 0.069, 0.065, 0.066 ms -> slice + conv
            # 0.009 + 0.057, 0.005 + 0.045, 0.003 + 0.049 ms).
            subsample = (
                g.w_q.shape[2:] == (1, 1) and max(strides) > 1 and not any(pad)
                and dilation == [1, 1] and int(a.groups) == 1
            )  # fmt: skip
            if ctx.target is not None:
                x_shape, k_strides = _shape(g.x_q), tuple(strides)
                if subsample:
                    sh, sw = strides
                    x_shape = (*x_shape[:2], -(-x_shape[2] // sh), -(-x_shape[3] // sw))
                    k_strides = (1, 1)
                spec = int8_kernels.QConv(
                    g.z_x, g.w_q, g.b_eff.astype(np.int32), k_strides, tuple(pad),
                    tuple(dilation), int(a.groups), mult, shift, site.z_y, site.out_dtype,
                    (int(lo.min()), int(hi.max())),
                )  # fmt: skip
                kernel = _try_kernel("conv", site.name, lambda: int8_kernels.conv2d_int8(
                    x_shape, str(g.x_q.ty.dtype), spec, ctx.target))  # fmt: skip
        return ConvMatch(g, mult, shift, lo, hi, kernel, subsample and kernel is not None)

    def emit(self, ctx: Context, site: QuantizeSite, m: ConvMatch) -> Any:
        from tvm import relax

        bb, g = ctx.bb, m.group
        uniform = bool(np.all(m.lo == m.lo[0]) and np.all(m.hi == m.hi[0]))
        if m.kernel is not None:
            x = g.x_q
            if m.subsample:
                strides = _ints(g.call.attrs.strides)
                x = bb.emit(relax.op.strided_slice(
                    g.x_q, axes=[2, 3], begin=[0, 0], end=list(_shape(g.x_q)[2:]),
                    strides=strides,
                ))  # fmt: skip
            func, consts = m.kernel
            y = _emit_kernel(bb, func, f"int8_conv2d_{site.name}",
                             [x, *[relax.const(c) for c in consts]],
                             _tensor_type(g.call, site.out_dtype))  # fmt: skip
            if not uniform:  # per-channel bounds (equalized Clip): one more 8-bit pass
                chan = (1, -1, 1, 1)
                y = bb.emit(relax.op.maximum(y, relax.const(m.lo.reshape(chan), site.out_dtype)))
                y = bb.emit(relax.op.minimum(y, relax.const(m.hi.reshape(chan), site.out_dtype)))
            return y
        if g.kind == "conv2d":
            a = g.call.attrs
            pad = _ints(a.padding)  # top, left, bottom, right
            x_in = g.x_q
            if any(pad):
                x_in = bb.emit(relax.op.nn.pad(
                    g.x_q, [0, 0, 0, 0, pad[0], pad[2], pad[1], pad[3]], pad_value=float(g.z_x)
                ))  # fmt: skip
            acc = bb.emit(relax.op.nn.conv2d(
                x_in, relax.const(g.w_q), strides=_ints(a.strides), padding=0,
                dilation=_ints(a.dilation), groups=int(a.groups), out_dtype="int32",
            ))  # fmt: skip
            chan: tuple[int, ...] = (1, -1, 1, 1)
        else:
            w = g.w_q.T if g.transpose else g.w_q  # (I, O)
            acc = bb.emit(relax.op.matmul(g.x_q, relax.const(np.ascontiguousarray(w)),
                                          out_dtype="int32"))  # fmt: skip
            chan = (1, -1)
        acc = bb.emit(relax.op.add(acc, relax.const(g.b_eff.astype(np.int32).reshape(chan),
                                                    "int32")))  # fmt: skip

        def i64(v: np.ndarray | int) -> Any:
            v = np.asarray(v, dtype=np.int64)
            return relax.const(v.reshape(chan) if v.size > 1 else v.reshape(()), "int64")

        # (acc * m + 2^(k-1)) >> k in int64: acc < 2^31 and m < 2^31, so it cannot overflow.
        k = m.shift.astype(np.int64)
        v = bb.emit(relax.op.astype(acc, "int64"))
        v = bb.emit(relax.op.multiply(v, i64(m.mult)))
        v = bb.emit(relax.op.add(v, i64(np.int64(1) << (k - 1))))
        v = bb.emit(relax.op.right_shift(v, i64(k)))
        v = bb.emit(relax.op.add(v, i64(site.z_y)))
        v = bb.emit(relax.op.maximum(v, i64(m.lo[:1] if uniform else m.lo)))
        v = bb.emit(relax.op.minimum(v, i64(m.hi[:1] if uniform else m.hi)))
        return bb.emit(relax.op.astype(v, site.out_dtype))


# --------------------------------------------------------------------------------------------
# float_output


@dataclasses.dataclass(frozen=True)
class FloatOutputMatch:
    group: IntegerGroup
    dtype: str
    kernel: tuple[Any, list[np.ndarray]] | None
    op: str = "matmul"

    @property
    def how(self) -> str:
        return "kernel" if self.kernel is not None else "relax"


class FloatOutputMatmul:
    """``matmul(dequantize(x_q), dequantize(W_q)) (+ b)`` whose float result is not quantized
    again (a classifier's last Gemm): the integer matmul, then ``float(acc - z_x sum W) * s_x
    s_w[o] + b[o]`` (onnxruntime's QGemm with a float output; the float computation on the
    dequantized values up to float rounding). The target's dense kernel (AVX-512 VNNI) for a
    float32 result where it has one, else Relax integer ops."""

    name = "float_output"

    def match(self, ctx: Context, site: FloatSite) -> FloatOutputMatch | Decline:
        g = integer_group(ctx, site.expr)
        if isinstance(g, Decline):
            return g
        if g.kind != "matmul":
            return decline(g.kind, "float output")
        dtype = str(site.expr.ty.dtype)
        kernel = None
        if ctx.target is not None and dtype == "float32":
            w_oi = np.ascontiguousarray(g.w_q if g.transpose else g.w_q.T)
            kernel = _try_kernel("dense", site.name, lambda: int8_kernels.dense_int8_float(
                _shape(g.x_q), str(g.x_q.ty.dtype), g.z_x, w_oi, g.acc_scale, g.bias,
                ctx.target,
            ))  # fmt: skip
        return FloatOutputMatch(g, dtype, kernel)

    def emit(self, ctx: Context, site: FloatSite, m: FloatOutputMatch) -> Any:
        from tvm import relax

        bb, g, dtype = ctx.bb, m.group, m.dtype
        if m.kernel is not None:
            func, consts = m.kernel
            return _emit_kernel(bb, func, f"int8_dense_{site.name}",
                                [g.x_q, *[relax.const(c) for c in consts]],
                                _tensor_type(site.expr, dtype))  # fmt: skip
        w = np.ascontiguousarray(g.w_q.T if g.transpose else g.w_q)  # (I, O)
        acc = bb.emit(relax.op.matmul(g.x_q, relax.const(w), out_dtype="int32"))
        if np.any(g.zero_fix != 0):
            acc = bb.emit(relax.op.add(acc, relax.const(
                g.zero_fix.reshape(1, -1).astype(np.int32), "int32")))  # fmt: skip
        y = bb.emit(relax.op.astype(acc, dtype))
        y = bb.emit(relax.op.multiply(y, relax.const(g.acc_scale.reshape(1, -1), dtype)))
        if np.any(g.bias != 0):
            y = bb.emit(relax.op.add(y, relax.const(g.bias.reshape(1, -1), dtype)))
        return y


# The tables :func:`bnfold.lower.int8.rewrite` applies, in order; the first match emits.
QUANTIZE_RULES: tuple[Rule, ...] = (Passthrough(), QuantizedAdd(), IntegerConv())
FLOAT_OUTPUT_RULES: tuple[Rule, ...] = (FloatOutputMatmul(),)
