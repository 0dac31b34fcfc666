"""Integer compute for QDQ models in TVM: ``DQ -> conv2d/matmul (-> bias) (-> act) -> Q`` groups
become int8 x int8 -> int32 convolutions / matmuls with a fixed-point requantize.

TVM 0.27's ONNX importer turns ``QuantizeLinear`` / ``DequantizeLinear`` into ``R.quantize`` /
``R.dequantize`` around *float* operators, so an imported QDQ model is smaller but not faster.
:func:`rewrite` finds, in the imported Relax module, every group::

    q = quantize(act(conv2d(dequantize(x_q, s_x, z_x), dequantize(W_q, s_w, 0)) + b), s_y, z_y)

(``conv2d`` may be ``matmul`` with a ``permute_dims``-ed weight; the bias and ``act`` are
optional; ``act`` is ``relu``) with constant ``W_q`` (int8, zero point 0, scale per output
channel or per tensor), scalar ``s_x, z_x, s_y, z_y``, and replaces it by integer arithmetic:

    acc[o]  = b'[o] + sum x_q * W_q           (int32; the input padded with z_x)
    b'[o]   = round(b[o] / (s_x s_w[o])) - z_x sum W_q[o]
    y_q     = clip((acc * m[o] + 2^(k[o]-1)) >> k[o] + z_y, lo, hi)

where ``m[o] 2^-k[o]`` is ``M[o] = s_x s_w[o] / s_y`` with a 31-bit mantissa
``m in [2^30, 2^31)`` (gemmlowp / TFLite style), and ``[lo, hi]`` is the output type's range
narrowed by the activation: ``relu`` -> ``lo = max(lo, z_y)``. Padding with ``z_x`` (the real
zero) and subtracting ``z_x sum W_q`` is exact: padded positions add ``z_x W - z_x W = 0``.

The result equals the float computation onnxruntime does on the QDQ model up to float rounding
(``round(v)`` of a value that float rounding moved across a .5 boundary), i.e. within 1 LSB.

An activation that the output's quantization already implies (``Relu`` before a ``Q`` whose
``z_y`` is the type's minimum, ``Clip(a, b)`` whose range contains the quantized range) is
dropped from the ONNX model first (:func:`drop_implied_activations`): exact, since ``Q`` is
monotone and saturates, and it keeps the Relax pattern a plain ``quantize(conv + bias)``.

Convolutions use the target's int8 kernel (:mod:`bnfold.targets._int8`) where it has one, else
Relax's ``conv2d(out_dtype="int32")`` scheduled by bnfold's CPU rules. A group that does not
match stays float (dequantize -> float op -> quantize) and is reported with the reason.

Three more patterns, where the target has the kernel (x86):

* ``quantize(act(dequantize(a) + dequantize(b)))`` (a residual connection, same shapes): one
  8-bit kernel computing onnxruntime's float32 formula
  ``clip(round((float(a - z_a) s_a + float(b - z_b) s_b) / s_y) + z_y, lo, hi)``;
* ``quantize(max_pool2d(dequantize(x)))`` with the same scale and zero point (a pass-through):
  the 8-bit max-pool kernel on ``x`` (other pass-through ops are Relax ops on ``x``);
* ``matmul(dequantize(x_q), dequantize(W_q)) (+ b)`` whose float result is not quantized again
  (a classifier's last Gemm, :func:`_float_output_roots`): the integer matmul with the float
  epilogue ``float(sum (x_q - z_x) W_q) s_x s_w[o] + b[o]`` (AVX-512 VNNI kernel, else Relax
  integer ops), as onnxruntime's QGemm with a float output; recorded as ``float_output``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from bnfold import check
from bnfold.targets import _int8

logger = logging.getLogger(__name__)

INT_RANGES = {"uint8": (0, 255), "int8": (-128, 127)}
MAX_SHIFT = 62
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


@dataclasses.dataclass
class Int8Record:
    """What happened to one quantize group (or, ``float_output``, one matmul with a float
    result): ``op`` (conv2d/matmul), ``how`` (``kernel``: the target's int8 kernel; ``relax``:
    Relax integer ops), or ``reason`` why it stayed float."""

    output: str
    op: str
    how: str | None = None
    reason: str | None = None
    float_output: bool | None = None  # a matmul with a float result (``f0``...), not a quantize

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass
class _Group:
    """An integer conv2d/matmul found by the rewrite: ``call`` (the float conv2d/matmul),
    its 8-bit input ``x_q`` with zero point ``z_x``, the int8 weight ``w_q`` (as the call
    reads it: OIHW, or (I, O) / (O, I) when ``transpose``), ``n_out`` output channels with
    accumulator scales ``acc_scale = s_x s_w[o]``; the bias folded into the accumulator
    (``b_eff = round(b / acc_scale) - z_x sum W``) for a requantized output, or kept apart for
    a float one (``bias`` as float, ``zero_fix = -z_x sum W`` as integer)."""

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


def requant_params(scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-point ``(multiplier, shift)`` with ``scale ~ multiplier * 2^-shift``,
    ``multiplier in [2^30, 2^31)``, ``1 <= shift <= 62`` (per element of ``scale``).

    A scale too small for 62 bits of shift maps everything to 0 (multiplier 0).
    """
    scale = np.asarray(scale, dtype=np.float64).reshape(-1)
    if np.any(~np.isfinite(scale)) or np.any(scale < 0):
        raise ValueError("requantize scales must be finite and >= 0")
    mant, exp = np.frexp(scale)  # scale = mant * 2^exp, mant in [0.5, 1)
    mult = np.round(mant * 2.0**31).astype(np.int64)
    carry = mult == 2**31  # mant rounded up to 1.0
    mult[carry] //= 2
    exp = exp + carry
    shift = 31 - exp.astype(np.int64)
    too_small = (shift > MAX_SHIFT) | (scale == 0)
    mult[too_small], shift[too_small] = 0, 1
    if np.any(shift < 1):
        raise ValueError(f"requantize scale {scale.max():g} is too large (>= 2^30)")
    return mult.astype(np.int32), shift.astype(np.int32)


def requantize_reference(
    acc: np.ndarray, multiplier: np.ndarray, shift: np.ndarray, zero_point: int,
    clamp: tuple[int, int], dtype: str, axis: int = 1,
) -> np.ndarray:  # fmt: skip
    """numpy: ``clip((acc * m + 2^(k-1)) >> k + z, lo, hi)``, per channel along ``axis``."""
    shape = [1] * acc.ndim
    shape[axis] = -1
    m = multiplier.astype(np.int64).reshape(shape)
    k = shift.astype(np.int64).reshape(shape)
    v = (acc.astype(np.int64) * m + (np.int64(1) << (k - 1))) >> k
    return np.clip(v + zero_point, clamp[0], clamp[1]).astype(dtype)


# --------------------------------------------------------------------------------------------
# ONNX pre-step


def _const_value(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
    return None


def _implied(model: onnx.ModelProto, node: onnx.NodeProto, q: onnx.NodeProto) -> bool:
    """Whether ``Q(node(v)) == Q(v)`` for every ``v`` (see :func:`drop_implied_activations`)."""
    scale = _const_value(model, q.input[1])
    zp = _const_value(model, q.input[2]) if len(q.input) > 2 and q.input[2] else None
    if scale is None or scale.size != 1 or zp is None or zp.size != 1:
        return False
    dtype = np.dtype(zp.dtype).name
    if dtype not in INT_RANGES:
        return False
    qmin, qmax = INT_RANGES[dtype]
    s, z = float(scale.reshape(())), int(zp.reshape(()))

    def bound(i: int) -> float | None:
        if len(node.input) <= i or not node.input[i]:
            return None
        v = _const_value(model, node.input[i])
        return float(v.reshape(())) if v is not None and v.size == 1 else None

    def q_of(v: float | None) -> float | None:
        return None if v is None else float(np.round(v / s) + z)

    if node.op_type == "Relu":
        return z == qmin
    if node.op_type == "Clip":
        lo, hi = q_of(bound(1)), q_of(bound(2))
        return (lo is None or lo <= qmin) and (hi is None or hi >= qmax)
    if node.op_type in ("Min", "Max") and len(node.input) == 2:
        c = q_of(bound(1))
        if c is None:
            return False
        return c >= qmax if node.op_type == "Min" else c <= qmin
    return False


def drop_implied_activations(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` without the activations (``Relu``, ``Clip``, ``Min``/``Max`` with a
    constant bound) whose only reader is a ``QuantizeLinear`` that already clips to their
    range; and how many went.

    ``Q(relu(v)) == Q(v)`` when ``z_y`` is the type's minimum (``Q`` saturates below ``z_y``
    there); ``Q(clip(v, a, b)) == Q(v)`` when ``Q(a) <= q_min`` and ``Q(b) >= q_max``, since
    ``Q`` is monotone; ``Min``/``Max`` likewise. Both exact. Chains (``Clip -> Min -> Q``) go
    one activation at a time.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    outputs = {o.name for o in g.output}
    total = 0
    while True:
        readers: dict[str, list[onnx.NodeProto]] = {}
        for node in g.node:
            for name in node.input:
                readers.setdefault(name, []).append(node)
        drop = None
        for node in g.node:
            if node.op_type not in ("Relu", "Clip", "Min", "Max") or node.output[0] in outputs:
                continue
            users = readers.get(node.output[0], [])
            if len(users) == 1 and users[0].op_type == "QuantizeLinear":
                if _implied(out, node, users[0]):
                    drop = node
                    break
        if drop is None:
            return out, total
        for user in readers[drop.output[0]]:
            for i, name in enumerate(user.input):
                if name == drop.output[0]:
                    user.input[i] = drop.input[0]
        g.node.remove(drop)
        total += 1


# --------------------------------------------------------------------------------------------
# Relax rewrite


def _op_name(expr: Any) -> str | None:
    import tvm
    from tvm import relax

    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return str(expr.op.name)
    return None


def _try_kernel(what: str, name: str, make: Any) -> Any:
    """What ``make()`` returns (a kernel, or None where it declines); None, with a warning, if
    it raises: a kernel bug must not break the build, the group then stays on Relax ops."""
    try:
        return make()
    except Exception as e:
        logger.warning("int8 %s kernel for %s failed (%s); using Relax ops", what, name, e)
        return None


def _emit_kernel(bb: Any, func: Any, symbol: str, args: list[Any], out_type: Any) -> Any:
    """Add the kernel PrimFunc under its own ``symbol`` (every PrimFunc needs one in the module)
    and emit its ``call_tir``."""
    from tvm import relax

    gv = bb.add_func(func.with_attr("global_symbol", symbol), symbol)
    return bb.emit(relax.call_tir(gv, args, out_type))


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


def rewrite(
    mod: Any, target: Any | None = None, select: Callable[[str], bool] | None = None
) -> tuple[Any, list[Int8Record]]:
    """``mod`` with every matching quantize group in integer arithmetic (see the module
    docstring), dead float code removed; and a record per ``quantize`` considered.

    ``target``: a ``tvm.target.Target`` whose int8 kernels to use (None: Relax ops only).
    ``select``: which groups (by record name, ``q0``, ``q1``, ... in program order) to rewrite;
    the others stay float (for bisecting a mismatch).
    """
    import tvm
    from tvm import relax

    records: list[Int8Record] = []
    float_records: list[Int8Record] = []

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def __init__(self, mod: Any) -> None:
            super().__init__(mod)
            self.mod_ = mod
            self.kernels = 0

        def transform(self) -> Any:
            for gv, func in self.mod_.functions_items():
                if isinstance(func, relax.Function):
                    self.float_roots = _float_output_roots(func)
                    self.builder_.update_func(gv, self.visit_expr(func))
            return self.builder_.get()

        def value(self, expr: Any) -> Any:
            if isinstance(expr, relax.Var):
                bound = self.lookup_binding(expr)
                return bound if bound is not None else expr
            return expr

        def visit_call_(self, call: Any) -> Any:
            root = any(call.same_as(c) for c in self.float_roots)
            call = self.visit_expr_post_order(call)
            if root:
                return self.float_output(call)
            if _op_name(call) != "relax.quantize":
                return call
            name = f"q{len(records)}"
            if select is not None and not select(name):
                records.append(Int8Record(name, "-", reason="not selected"))
                return call
            found = self.match(call, name)
            if isinstance(found, str):
                records.append(Int8Record(name, found.split(":", 1)[0], reason=found))
                return call
            return found

        # ---- matching ----

        def match(self, q: Any, name: str) -> Any:
            """The integer expression replacing quantize call ``q``, or a reason string."""
            s_y, z_y = _scalar(q.args[1]), _scalar(q.args[2])
            out_dtype = str(q.ty.dtype)
            if s_y is None or z_y is None or out_dtype not in INT_RANGES:
                return "quantize: output scale/zero point not constant scalars"
            e = self.value(q.args[0])
            moved = self.passthrough(e, s_y, z_y, out_dtype, name)
            if moved is not None:
                return moved
            acts: list[tuple[str, np.ndarray]] = []  # outermost first
            while True:
                act = self.activation(e)
                if act is None:
                    break
                acts.append(act[:2])
                e = act[2]
            added = self.add_kernel(e, acts, float(s_y), int(z_y), out_dtype, name)
            if added is not None:
                return added
            g = self.core(e)
            if isinstance(g, str):
                return g
            try:
                mult, shift = requant_params(g.acc_scale / s_y)
            except ValueError as err:  # a multiplier the fixed-point form cannot hold
                return f"{g.kind}: {err}"
            clamp = _clamp(acts[::-1], g.n_out, s_y, int(z_y), out_dtype, g.kind == "conv2d")
            if isinstance(clamp, str):
                return f"{g.kind}: {clamp}"
            return self.emit_integer(
                g.kind, g.call, g.x_q, g.z_x, g.w_q, g.transpose, g.b_eff.astype(np.int32),
                mult, shift, int(z_y), out_dtype, clamp, name,
            )  # fmt: skip

        def core(self, e: Any) -> _Group | str:
            """The integer form of ``e = conv2d|matmul(dequantize(x_q), dequantize(W_q)) (+ b)``
            (see :class:`_Group`), or the reason it has none."""
            bias_expr = None
            if _op_name(e) == "relax.add":
                a, b = self.value(e.args[0]), self.value(e.args[1])
                if _op_name(a) not in ("relax.nn.conv2d", "relax.matmul"):
                    a, b = b, a
                e, bias_expr = a, b
            op = _op_name(e)
            if op not in ("relax.nn.conv2d", "relax.matmul"):
                what = op.removeprefix("relax.") if op else "graph input"
                return f"{what}: not a conv2d/matmul group (dequantize -> float -> quantize)"
            kind = op.split(".")[-1]
            x = self.value(e.args[0])
            if _op_name(x) != "relax.dequantize":
                return f"{kind}: input is not dequantized"
            s_x, z_x = _scalar(x.args[1]), _scalar(x.args[2])
            if s_x is None or z_x is None or str(x.args[0].ty.dtype) not in INT_RANGES:
                return f"{kind}: input scale/zero point not constant scalars"
            w_expr = self.value(e.args[1])
            transpose = False
            if kind == "matmul" and _op_name(w_expr) == "relax.permute_dims":
                axes = w_expr.attrs.axes
                if axes is None or _ints(axes) != [1, 0]:
                    return "matmul: weight permutation is not a 2-D transpose"
                transpose, w_expr = True, self.value(w_expr.args[0])
            if _op_name(w_expr) != "relax.dequantize":
                return f"{kind}: weight is not a dequantized constant"
            w_q, s_w, z_w = (_const(a) for a in w_expr.args[:3])
            if w_q is None or s_w is None or z_w is None or w_q.dtype != np.int8:
                return f"{kind}: weight is not a constant int8 tensor"
            if np.any(z_w != 0):
                return f"{kind}: weight zero point is not 0"
            if kind == "matmul":
                if w_q.ndim != 2 or x.args[0].ty.ndim != 2:
                    return "matmul: not 2-D"
                w_oi = w_q if transpose else w_q.T  # (O, I)
                w_axis = int(w_expr.attrs.axis)
                per_out = w_axis == (0 if transpose else 1)
            else:
                w_oi = w_q
                per_out = int(w_expr.attrs.axis) == 0
            n_out = w_oi.shape[0]
            s_w = np.asarray(s_w, dtype=np.float64).reshape(-1)
            if s_w.size not in (1, n_out) or (s_w.size > 1 and not per_out):
                return f"{kind}: weight scale is not per output channel or per tensor"
            s_w = np.broadcast_to(s_w, (n_out,))
            acc_scale = s_x * s_w
            bias = np.zeros(n_out, dtype=np.float64)
            if bias_expr is not None:
                b = self.bias_values(bias_expr, n_out, kind)
                if isinstance(b, str):
                    return b
                bias = b
            with np.errstate(divide="ignore", invalid="ignore"):
                b_acc = np.where(acc_scale > 0, np.round(bias / acc_scale), 0.0)
            w_sum = w_oi.reshape(n_out, -1).astype(np.int64).sum(axis=1)
            b_eff = b_acc - int(z_x) * w_sum
            if np.any(np.abs(b_eff) >= 2**31):
                return f"{kind}: bias does not fit int32"
            return _Group(kind, e, x.args[0], int(z_x), w_q, transpose, n_out, acc_scale,
                          b_eff, bias, -int(z_x) * w_sum)  # fmt: skip

        def add_kernel(
            self, e: Any, acts: list[tuple[str, np.ndarray]], s_y: float, z_y: int,
            out_dtype: str, name: str,
        ) -> Any:  # fmt: skip
            """``call_tir`` of the target's quantized-add kernel for ``quantize(act(
            dequantize(a) + dequantize(b)))`` (a residual connection; ``acts``: the peeled
            activations, outermost first), or None (no kernel, or not that pattern: the group
            stays float). Same shapes only, scalar scales and zero points, activation bounds
            that are scalars."""
            if target is None or _op_name(e) != "relax.add":
                return None
            parts = [self.value(a) for a in e.args]
            if any(_op_name(p) != "relax.dequantize" for p in parts):
                return None
            shape = [int(v) for v in e.ty.shape.values]
            q: list[tuple[Any, float, int]] = []
            for p in parts:
                s, z = _scalar(p.args[1]), _scalar(p.args[2])
                x = p.args[0]
                if s is None or z is None or str(x.ty.dtype) not in INT_RANGES:
                    return None
                if [int(v) for v in x.ty.shape.values] != shape:
                    return None
                q.append((x, float(s), int(z)))
            clamp = _clamp(acts[::-1], 1, s_y, z_y, out_dtype, False)
            if isinstance(clamp, str):
                return None

            (a, s_a, z_a), (b, s_b, z_b) = q
            func = _try_kernel("add", name, lambda: _int8.add_int8(
                tuple(shape), str(a.ty.dtype), s_a, z_a, str(b.ty.dtype), s_b, z_b,
                s_y, z_y, out_dtype, (int(clamp[0][0]), int(clamp[1][0])), target,
            ))  # fmt: skip
            if func is None:
                return None
            y = _emit_kernel(self.builder_, func, f"int8_add_{name}", [a, b],
                             relax.TensorType(shape, out_dtype))  # fmt: skip
            records.append(Int8Record(name, "add", how="kernel"))
            return y

        def float_output(self, e: Any) -> Any:
            """``e = matmul(dequantize(x_q), dequantize(W_q)) (+ b)`` whose float result is
            not quantized again (a classifier's last Gemm): the integer matmul, then
            ``float(acc - z_x sum W) * s_x s_w[o] + b[o]`` (as onnxruntime's QGemm with a
            float output; the float computation on the dequantized values up to float
            rounding). ``e`` unchanged if it does not match."""
            name = f"f{len(float_records)}"
            if select is not None and not select(name):
                float_records.append(Int8Record(name, "-", reason="not selected",
                                                float_output=True))  # fmt: skip
                return e
            g = self.core(e)
            if isinstance(g, str) or g.kind != "matmul":
                reason = g if isinstance(g, str) else f"{g.kind}: float output"
                float_records.append(Int8Record(name, reason.split(":", 1)[0], reason=reason,
                                                float_output=True))  # fmt: skip
                return e
            bb = self.builder_
            dtype = str(e.ty.dtype)
            if target is not None and dtype == "float32":
                w_oi = np.ascontiguousarray(g.w_q if g.transpose else g.w_q.T)
                x_shape = tuple(int(v) for v in g.x_q.ty.shape.values)
                kernel = _try_kernel("dense", name, lambda: _int8.dense_int8_float(
                    x_shape, str(g.x_q.ty.dtype), g.z_x, w_oi, g.acc_scale, g.bias, target
                ))  # fmt: skip
                if kernel is not None:
                    func, consts = kernel
                    y = _emit_kernel(bb, func, f"int8_dense_{name}",
                                     [g.x_q, *[relax.const(c) for c in consts]],
                                     _tensor_type(e, dtype))  # fmt: skip
                    float_records.append(Int8Record(name, "matmul", how="kernel",
                                                    float_output=True))  # fmt: skip
                    return y
            w = np.ascontiguousarray(g.w_q.T if g.transpose else g.w_q)  # (I, O)
            acc = bb.emit(relax.op.matmul(g.x_q, relax.const(w), out_dtype="int32"))
            if np.any(g.zero_fix != 0):
                acc = bb.emit(relax.op.add(acc, relax.const(
                    g.zero_fix.reshape(1, -1).astype(np.int32), "int32")))  # fmt: skip
            y = bb.emit(relax.op.astype(acc, dtype))
            y = bb.emit(relax.op.multiply(y, relax.const(g.acc_scale.reshape(1, -1), dtype)))
            if np.any(g.bias != 0):
                y = bb.emit(relax.op.add(y, relax.const(g.bias.reshape(1, -1), dtype)))
            float_records.append(Int8Record(name, "matmul", how="relax", float_output=True))
            return y

        def passthrough(self, e: Any, s_y: float, z_y: float, dtype: str, name: str) -> Any:
            """``quantize(op(dequantize(x_q, s, z)), s, z)`` for an op that only moves or
            selects values (max pooling, reshapes): ``op(x_q)``, exactly (dequantize is
            increasing and ``quantize(dequantize(v)) == v``); None if ``e`` is not that."""
            op = _op_name(e)
            if op not in PASSTHROUGH_OPS:
                return None
            x = self.value(e.args[0])
            if _op_name(x) != "relax.dequantize" or str(x.args[0].ty.dtype) != dtype:
                return None
            if (_scalar(x.args[1]), _scalar(x.args[2])) != (s_y, z_y) or s_y <= 0:
                return None
            if op == "relax.nn.max_pool2d":
                y = self.max_pool_kernel(e, x.args[0], name)
                if y is not None:
                    records.append(Int8Record(name, "max_pool2d", how="kernel"))
                    return y
            y = self.builder_.emit(relax.Call(e.op, [x.args[0], *e.args[1:]], e.attrs))
            records.append(Int8Record(name, op.split(".")[-1], how="relax"))
            return y

        def max_pool_kernel(self, pool: Any, x_q: Any, name: str) -> Any:
            """``call_tir`` of the target's 8-bit max-pool kernel on ``x_q`` for the
            ``max_pool2d`` call ``pool`` (NCHW, dilation 1, floor mode), or None (no kernel:
            Relax's max_pool2d on the 8-bit tensor instead)."""
            if target is None:
                return None
            a = pool.attrs
            if (str(a.layout) != "NCHW" or str(a.out_layout) != "NCHW" or bool(a.ceil_mode)
                    or _ints(a.dilation) != [1, 1] or x_q.ty.ndim != 4):  # fmt: skip
                return None

            pt, pl, pb, pr = _ints(a.padding)
            x_shape = tuple(int(v) for v in x_q.ty.shape.values)
            func = _try_kernel("max pool", name, lambda: _int8.max_pool2d_int8(
                x_shape, str(x_q.ty.dtype), tuple(_ints(a.pool_size)), tuple(_ints(a.strides)),
                (pt, pl, pb, pr), target,
            ))  # fmt: skip
            if func is None:
                return None
            return _emit_kernel(
                self.builder_, func, f"int8_max_pool2d_{name}", [x_q],
                _tensor_type(pool, str(x_q.ty.dtype)),
            )

        def activation(self, e: Any) -> tuple[str, np.ndarray, Any] | None:
            """``(max|min, bound, input)`` if ``e`` is an activation with a constant bound, as
            TVM's importer writes them: ``relu``; ``Clip`` as ``call_tir(maximum|minimum, (v,
            where(isnan(c), -+inf, c)))``; ``Min``/``Max`` as ``min|max(stack(broadcast_to(v),
            broadcast_to(c)), axis=0)``."""
            op = _op_name(e)
            if op == "relax.nn.relu":
                return "max", np.zeros(1), self.value(e.args[0])
            if op == "relax.call_tir" and isinstance(e.args[0], tvm.ir.GlobalVar):
                fname = e.args[0].name_hint
                kind = next((k for k in ("max", "min") if fname.startswith(k + "imum")), None)
                args = list(e.args[1].fields) if isinstance(e.args[1], relax.Tuple) else []
                if kind is None or len(args) != 2:
                    return None
                bound = self.value(args[1])
                if _op_name(bound) == "relax.where":
                    bound = self.value(bound.args[2])
                c = _const(bound)
                if c is None or np.any(np.isnan(c)):
                    return None
                return kind, c.astype(np.float64), self.value(args[0])
            if op in ("relax.max", "relax.min"):
                stacked = self.value(e.args[0])
                axis = e.attrs.axis
                if _op_name(stacked) != "relax.stack" or axis is None or _ints(axis) != [0]:
                    return None
                parts = [self.value(p) for p in stacked.args[0].fields]
                parts = [self.value(p.args[0]) if _op_name(p) == "relax.broadcast_to" else p
                         for p in parts]  # fmt: skip
                consts = [_const(p) for p in parts]
                if len(parts) != 2 or sum(c is not None for c in consts) != 1:
                    return None
                c = consts[0] if consts[0] is not None else consts[1]
                v = parts[1] if consts[0] is not None else parts[0]
                return op.split(".")[-1], c.astype(np.float64), v
            return None

        def bias_values(self, expr: Any, n_out: int, kind: str) -> np.ndarray | str:
            if _op_name(expr) == "relax.reshape":
                expr = self.value(expr.args[0])
            if _op_name(expr) == "relax.dequantize":
                b_q, s_b, z_b = (_const(a) for a in expr.args[:3])
                if b_q is None or s_b is None or z_b is None:
                    return f"{kind}: bias is not a constant"
                b = (b_q.astype(np.float64) - z_b.astype(np.float64)) * s_b.astype(np.float64)
            else:
                b = _const(expr)
                if b is None:
                    return f"{kind}: bias is not a constant"
                b = b.astype(np.float64)
            if b.size != n_out:
                return f"{kind}: bias is not one value per output channel"
            return b.reshape(-1)

        # ---- emitting ----

        def emit_integer(
            self, kind: str, call: Any, x_q: Any, z_x: int, w_q: np.ndarray, transpose: bool,
            b_eff: np.ndarray, mult: np.ndarray, shift: np.ndarray, z_y: int, out_dtype: str,
            clamp: tuple[np.ndarray, np.ndarray], name: str,
        ) -> Any:  # fmt: skip
            bb = self.builder_
            lo, hi = clamp
            uniform = bool(np.all(lo == lo[0]) and np.all(hi == hi[0]))
            if kind == "conv2d":
                a = call.attrs
                if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW":
                    return f"conv2d: layout {a.data_layout}/{a.kernel_layout}"
                strides, dilation = _ints(a.strides), _ints(a.dilation)
                pad = _ints(a.padding)  # top, left, bottom, right
                groups = int(a.groups)
                x_shape = tuple(int(v) for v in x_q.ty.shape.values)
                x_kernel = x_q
                # A strided unpadded 1x1 conv reads only every s-th row and column: it is the
                # stride-1 1x1 conv (one long row, see the kernel) of the subsampled input.
                # Exact; the kernel's strided repack would read (and phase-split) all of it
                # (ResNet-18's downsample 1x1/2 convs, 1 thread: 0.069, 0.065, 0.066 ms ->
                # slice + conv 0.009 + 0.057, 0.005 + 0.045, 0.003 + 0.049 ms).
                subsample = (
                    w_q.shape[2:] == (1, 1) and max(strides) > 1 and not any(pad)
                    and dilation == [1, 1] and groups == 1
                )  # fmt: skip
                kernel = None
                if target is not None:
                    k_shape, k_strides = x_shape, tuple(strides)
                    if subsample:
                        sh, sw = strides
                        k_shape = (*x_shape[:2], -(-x_shape[2] // sh), -(-x_shape[3] // sw))
                        k_strides = (1, 1)
                    kernel = _try_kernel("conv", name, lambda: _int8.conv2d_int8(
                        k_shape, str(x_q.ty.dtype), z_x, w_q, b_eff, k_strides,
                        tuple(pad), tuple(dilation), groups, mult, shift, z_y, out_dtype,
                        (int(lo.min()), int(hi.max())), target,
                    ))  # fmt: skip
                    if kernel is not None and subsample:
                        x_kernel = bb.emit(relax.op.strided_slice(
                            x_q, axes=[2, 3], begin=[0, 0], end=list(x_shape[2:]),
                            strides=list(strides),
                        ))  # fmt: skip
                if kernel is not None:
                    func, consts = kernel
                    y = _emit_kernel(bb, func, f"int8_conv2d_{name}",
                                     [x_kernel, *[relax.const(c) for c in consts]],
                                     _tensor_type(call, out_dtype))  # fmt: skip
                    if not uniform:  # per-channel bounds (equalized Clip): one more u8 pass
                        y = bb.emit(relax.op.maximum(y, relax.const(lo.reshape(1, -1, 1, 1),
                                                                    out_dtype)))  # fmt: skip
                        y = bb.emit(relax.op.minimum(y, relax.const(hi.reshape(1, -1, 1, 1),
                                                                    out_dtype)))  # fmt: skip
                    records.append(Int8Record(name, kind, how="kernel"))
                    return y
                x_in = x_q
                if any(pad):
                    x_in = bb.emit(relax.op.nn.pad(
                        x_q, [0, 0, 0, 0, pad[0], pad[2], pad[1], pad[3]], pad_value=float(z_x)
                    ))  # fmt: skip
                acc = bb.emit(relax.op.nn.conv2d(
                    x_in, relax.const(w_q), strides=strides, padding=0, dilation=dilation,
                    groups=groups, out_dtype="int32",
                ))  # fmt: skip
                chan = (1, -1, 1, 1)
            else:
                w = w_q.T if transpose else w_q  # (I, O)
                acc = bb.emit(relax.op.matmul(x_q, relax.const(np.ascontiguousarray(w)),
                                              out_dtype="int32"))  # fmt: skip
                chan = (1, -1)
            acc = bb.emit(relax.op.add(acc, relax.const(b_eff.reshape(chan), "int32")))

            def i64(a: np.ndarray | int) -> Any:
                a = np.asarray(a, dtype=np.int64)
                return relax.const(a.reshape(chan) if a.size > 1 else a.reshape(()), "int64")

            # (acc * m + 2^(k-1)) >> k in int64: acc < 2^31 and m < 2^31, so it cannot overflow.
            k = shift.astype(np.int64)
            v = bb.emit(relax.op.astype(acc, "int64"))
            v = bb.emit(relax.op.multiply(v, i64(mult)))
            v = bb.emit(relax.op.add(v, i64(np.int64(1) << (k - 1))))
            v = bb.emit(relax.op.right_shift(v, i64(k)))
            v = bb.emit(relax.op.add(v, i64(z_y)))
            v = bb.emit(relax.op.maximum(v, i64(lo[:1] if uniform else lo)))
            v = bb.emit(relax.op.minimum(v, i64(hi[:1] if uniform else hi)))
            y = bb.emit(relax.op.astype(v, out_dtype))
            records.append(Int8Record(name, kind, how="relax"))
            return y

    new = relax.transform.DeadCodeElimination()(_Rewriter(mod).transform())
    done = sum(r.how is not None for r in records)
    logger.info("int8: %d of %d quantize groups in integer arithmetic", done, len(records))
    return new, records + float_records


# Readers after which a conv2d/matmul result may still become a quantize group's input (an
# alias ``v = w`` is not followed: counted as one).
_QUANTIZE_PATH_OPS = (
    "relax.quantize", "relax.nn.relu", "relax.max", "relax.min", "relax.call_tir", "relax.add",
    "relax.stack", "relax.broadcast_to", "alias",
)  # fmt: skip


def _float_output_roots(func: Any) -> list[Any]:
    """The calls ``matmul(...)`` / ``add(matmul(...), b)`` of ``func`` whose result no
    quantize group can take in: no reader is a quantize, an activation or an add (a bias
    add is itself the root). Rewriting one of them as a float-output integer matmul cannot take
    a matmul away from a quantize group that :func:`rewrite` would have made integer."""
    from tvm import relax

    bindings: dict[Any, Any] = {}
    readers: dict[Any, list[str]] = {}

    def read(expr: Any, by: str) -> None:
        if isinstance(expr, relax.Var):
            readers.setdefault(expr, []).append(by)
        elif isinstance(expr, relax.Tuple):
            for f in expr.fields:
                read(f, by)

    body = func.body
    for block in body.blocks:
        for b in block.bindings:
            if not isinstance(b, relax.VarBinding):
                continue
            bindings[b.var] = b.value
            if isinstance(b.value, relax.Call):
                by = _op_name(b.value) or "call"
                for a in b.value.args:
                    read(a, by)
            else:
                read(b.value, "alias")
    read(body.body, "output")
    roots = []
    for var, value in bindings.items():
        op = _op_name(value)
        if op not in ("relax.matmul", "relax.add"):
            continue
        if any(r in _QUANTIZE_PATH_OPS for r in readers.get(var, [])):
            continue
        if op == "relax.add" and not any(
            isinstance(a, relax.Var) and _op_name(bindings.get(a)) == "relax.matmul"
            for a in value.args
        ):
            continue
        roots.append(value)
    return roots


def summarize(records: list[Int8Record], dropped: int = 0) -> dict[str, Any]:
    """The manifest's ``compile.int8`` record: how many quantize groups became integer code
    (with the target's kernels or Relax ops), and why the others stayed float; and how many
    matmuls with a float result (``float_output`` records) became integer matmuls."""
    quantize = [r for r in records if not r.float_output]
    reasons: dict[str, int] = {}
    for r in quantize:
        if r.how is None and r.reason:
            reasons[r.reason] = reasons.get(r.reason, 0) + 1
    return {
        "integer": True,
        "quantize_groups": len(quantize),
        "integer_groups": sum(r.how is not None for r in quantize),
        "kernel_groups": sum(r.how == "kernel" for r in quantize),
        "float_output_matmuls": sum(r.how is not None for r in records if r.float_output),
        "activations_dropped": dropped,
        "float_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "groups": [r.to_dict() for r in records],
    }


def _clamp(
    acts: list[tuple[str, np.ndarray]],
    n_out: int,
    s_y: float,
    z_y: int,
    dtype: str,
    conv: bool,
) -> tuple[np.ndarray, np.ndarray] | str:
    """Per-channel ``(lo, hi)`` int64 bounds of the quantized output: the activations
    ``acts`` (innermost first), moved into the quantized domain (``Q`` is monotone, so
    ``Q(max(v, c)) == max(Q(v), Q(c))``), then the type's saturation."""
    lo = np.full(n_out, -np.inf)
    hi = np.full(n_out, np.inf)
    shape = (1, n_out, 1, 1) if conv else (1, n_out)
    for kind, c in acts:
        try:
            per = np.broadcast_to(c.reshape(c.shape if c.ndim else (1,)), shape)
        except ValueError:
            return "activation bound does not broadcast to the output channels"
        flat = per.reshape(-1, n_out) if not conv else per.reshape(n_out, -1).T
        if np.any(flat != flat[:1]):
            return "activation bound varies over positions, not only channels"
        qc = np.round(flat[0] / s_y) + z_y
        if kind == "max":
            lo, hi = np.maximum(lo, qc), np.maximum(hi, qc)
        else:
            lo, hi = np.minimum(lo, qc), np.minimum(hi, qc)
    qmin, qmax = INT_RANGES[dtype]
    return np.clip(lo, qmin, qmax).astype(np.int64), np.clip(hi, qmin, qmax).astype(np.int64)


def _tensor_type(call: Any, dtype: str) -> Any:
    from tvm import relax

    return relax.TensorType([int(v) for v in call.ty.shape.values], dtype)


# --------------------------------------------------------------------------------------------
# Layer-by-layer check against onnxruntime


def is_qdq(model: onnx.ModelProto) -> bool:
    """Whether ``model`` holds ``QuantizeLinear`` nodes (a QDQ model)."""
    return any(n.op_type == "QuantizeLinear" and n.domain in ("", "ai.onnx")
               for n in model.graph.node)  # fmt: skip


def quantized_tensors(model: onnx.ModelProto) -> dict[str, int]:
    """``{name: ONNX element type}`` of every ``QuantizeLinear`` output (the activations that
    exist as 8-bit tensors in an integer runtime)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    types: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type != "QuantizeLinear":
            continue
        zp = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        dtype = numpy_helper.to_array(zp).dtype if zp is not None else np.dtype(np.uint8)
        types[n.output[0]] = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    return types


def with_quantized_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are its own plus every quantized tensor."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for name, elem in quantized_tensors(model).items():
        if name not in have:
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return out


def cut_at_quantized(
    model: onnx.ModelProto, values: dict[str, np.ndarray]
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Every layer on its own: a copy of ``model`` in which each reader of a quantized tensor
    reads a new graph input (``bnfold_cut_<k>``) instead, and whose outputs are the quantized
    tensors; and the feeds for those inputs (``values``: the quantized tensors as onnxruntime
    computed them). Run on those feeds, each layer sees exactly onnxruntime's input, so its
    output can be compared bit for bit: a 1-LSB difference in one layer cannot compound.
    """
    out = with_quantized_outputs(model)
    g = out.graph
    types = quantized_tensors(model)
    feeds: dict[str, np.ndarray] = {}
    cuts: dict[str, str] = {}
    for node in g.node:
        if node.op_type == "QuantizeLinear":
            continue
        for i, name in enumerate(node.input):
            if name in types and name in values:
                # Plain names: TVM's importer renames (and warns about) ones like "/a/b".
                cut = cuts.setdefault(name, f"bnfold_cut_{len(cuts)}")
                if cut not in feeds:
                    feeds[cut] = values[name]
                    g.input.append(onnx.helper.make_tensor_value_info(
                        cut, types[name], list(values[name].shape)))  # fmt: skip
                node.input[i] = cut
    del g.output[:]
    for name, elem in types.items():
        shape = list(values[name].shape) if name in values else None
        g.output.append(onnx.helper.make_tensor_value_info(name, elem, shape))
    return out, feeds


def lsb_diffs(
    reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]
) -> dict[str, dict[str, float]]:
    """Per quantized tensor: ``max_lsb`` (max |difference| in quantization steps) and
    ``off`` (the fraction of elements that differ at all)."""
    result: dict[str, dict[str, float]] = {}
    for name, ref in reference.items():
        got = candidate[name]
        diff = np.abs(ref.astype(np.int64) - got.astype(np.int64))
        result[name] = {"max_lsb": int(diff.max(initial=0)), "off": float(np.mean(diff > 0))}
    return result


def layer_inputs(
    model: onnx.ModelProto, sample: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """onnxruntime's quantized tensors of ``model`` on ``sample`` (optimizations off), and the
    feeds of the cut model (:func:`cut_at_quantized`) that give each layer those inputs."""
    names = list(quantized_tensors(model))
    ran = check.run_onnxruntime(with_quantized_outputs(model), sample)
    values = {k: ran[k] for k in names}
    return values, cut_at_quantized(model, values)[1]


def layerwise_record(
    values: dict[str, np.ndarray], got: dict[str, np.ndarray], max_lsb: int
) -> dict[str, Any]:
    """The layer-by-layer gate: every quantized tensor in ``got`` within ``max_lsb``
    quantization steps of onnxruntime's ``values``."""
    diffs = lsb_diffs(values, {k: got[k] for k in values})
    worst = max(diffs, key=lambda k: (diffs[k]["max_lsb"], diffs[k]["off"]))
    return {
        "status": "passed" if diffs[worst]["max_lsb"] <= max_lsb else "failed",
        "gate": f"every quantized tensor within {max_lsb} LSB of onnxruntime, layer by layer",
        "max_lsb": diffs[worst]["max_lsb"],
        "worst": worst,
        "tensors": len(diffs),
        "tensors_off_by_one": sum(d["max_lsb"] == 1 for d in diffs.values()),
        "max_off_fraction": max(d["off"] for d in diffs.values()),
        "layers": diffs,
    }
