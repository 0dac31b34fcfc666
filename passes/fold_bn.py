"""fold_bn: fold BatchNormalization, and constant per-channel Mul/Add/Sub/Div, into linear ops.

At inference a BatchNormalization is a fixed per-channel affine map on channel axis 1::

    y = s * x + t,    s = gamma / sqrt(var + epsilon),    t = beta - s * mean

A constant Mul/Add/Sub/Div whose constant varies along at most one axis is the same kind of map
(what some exporters leave in place of a BN). The pass folds each such map, computing in float64
and casting back to the model dtype:

1. **backward**, into the producing Conv / ConvTranspose / Gemm / MatMul (output channels)::

       s * (W x + b) + t  ->  (s W) x + (s b + t)

   MatMul has no bias input; a following ``Add`` of a constant is taken as its bias, and one is
   created if the fold needs it.
   **Through** a ``Concat`` on the channel axis, a ``MaxPool`` (every ``s > 0``), an average
   pool (padding not counted) or a nearest ``Resize``/``Upsample`` whose output feeds only the
   map, the map moves onto the op's inputs (a Concat gives each input its slice of ``s``/``t``)
   and folds into each input's producer, all or none; the op stays. The math and the
   preconditions of each op are in passes/_through.py; a failed one is the backward reason
   (``through Concat (...) input i: ...``).
2. **forward**, into every consuming Conv / Gemm / MatMul (input channels)::

       W (s x + t) + b  ->  (W s) x + (W t + b)

   exact only where the convolution pads nothing (padding would have been ``t`` before the map),
   so a map with a non-zero shift before a padded Conv is declined with reason ``padding``.
   A MatMul's following ``Add`` of a constant takes the shift ``W t`` as a Gemm's ``C`` does
   (a Gemm without ``C`` gains one; a MatMul without a bias Add gets one).
   **Through** a ``MaxPool`` (every ``s > 0``), an average pool (padding not counted) or a
   nearest ``Resize`` the map moves onto the op's output and on to its consumers; through a
   ``Flatten`` (axis 1) or a ``Reshape`` to ``(N, C*H*W)`` channel ``c`` becomes the features
   ``c*H*W .. (c+1)*H*W - 1``, so the map, repeated ``H*W`` times per channel, folds into the
   Gemm / MatMul that reads the flattened features (``W' = W * repeat(s)`` on the input-feature
   axis, transB minded; ``b' = b + W repeat(t)``). The ops stay; the rules and their
   preconditions are in passes/_through.py, and a failed one is the forward reason
   (``through Flatten (...): ...``).
3. A BatchNormalization that folds neither way becomes ``Mul(s) -> Add(t)``, which every runtime
   and quantizer handles (onnxruntime's quantizer leaves a lone BN in float).

Preconditions (each one that fails is reported as the reason): the map's parameters and the
op's weights and bias are constant initializers (not graph inputs); ``training_mode == 0`` and
``spatial == 1`` (opset 7-8), and the running-statistics outputs are unused;
``var + epsilon > 0`` and every result finite (and within float16 range for float16 models);
backward: the op's output feeds only the map; forward: every consumer of the map's output (or,
through the ops above, of theirs) is a foldable Conv/Gemm/MatMul reading it as its data input
(a Gemm with ``transA=0``), and none of those values is a graph output; the map's channel axis
is the op's channel axis and the channel counts match. A weight used by another node is copied,
never changed under it. Graph inputs and outputs keep their names.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from bnfold.passes import _linear, _through
from bnfold.passes._util import (
    BnfoldPassResult,
    Declined,
    Namer,
    Record,
    cast_checked,
    const_array,
    is_onnx_op,
    label,
    note_changed,
    note_replaced,
    np_dtype,
    set_constant_input,
    single_use,
    tensor_map,
)

logger = logging.getLogger(__name__)

AFFINE_OPS = ("Mul", "Add", "Sub", "Div")
_HEADROOM = {t: float(np.finfo(t).max) * 2.0**-16 for t in (np.float32, np.float64)}
LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclasses.dataclass(frozen=True)
class Affine:
    """``y = scale * x + shift`` along ``axis`` of ``x``.

    ``axis`` is 1 for a BatchNormalization, negative (counted from the end) for a broadcast
    constant, and None when the map is the same for every channel (``scale``/``shift`` then have
    one element). ``ndim`` is the constant's rank (a constant of higher rank than ``x`` would
    broadcast ``x`` up, which is not a map of ``x``).
    """

    node: ir.Node
    x: ir.Value
    scale: np.ndarray
    shift: np.ndarray
    axis: int | None
    ndim: int = 1

    def channels(self, rank: int | None, axis: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``scale``/``shift`` as (count,) vectors for channel ``axis`` of a rank-``rank`` value."""
        if rank is not None and self.ndim > rank and self.axis != 1:
            raise Declined("constant has a higher rank than the data it scales")
        if self.axis is not None:
            pos = self.axis if self.axis >= 0 else (None if rank is None else rank + self.axis)
            if pos is None:
                raise Declined("rank of the data is unknown")
            if pos != axis:
                raise Declined(f"channel axis {pos} is not the op's channel axis {axis}")
            if self.scale.shape[0] != count:
                raise Declined(f"{self.scale.shape[0]} channels do not match the op's {count}")
            return self.scale, self.shift
        return np.full(count, self.scale[0]), np.full(count, self.shift[0])


def _affine_of_bn(node: ir.Node) -> Affine:
    if len(node.inputs) < 5 or any(v is None for v in node.inputs[:5]):
        raise Declined("BatchNormalization is missing inputs")
    params = [const_array(v) for v in node.inputs[1:5]]
    if any(p is None for p in params):
        raise Declined("BN parameters are not constant")
    if node.attributes.get_int("spatial", 1) != 1:
        raise Declined("spatial=0 (per-activation statistics) is not supported")
    if any(v is not None and (v.uses() or v.is_graph_output()) for v in node.outputs[1:]):
        raise Declined("running-statistics outputs are used (training graph)")
    gamma, beta, mean, var = (np.asarray(p, dtype=np.float64) for p in params)
    if not all(p.ndim == 1 and p.shape == gamma.shape for p in (beta, mean, var)):
        raise Declined("BN parameters are not 1-D vectors of one length")
    eps = float(node.attributes.get_float("epsilon", 1e-5))
    denom = var + eps
    if not np.all(np.isfinite(denom)) or not np.all(np.isfinite(gamma)):
        raise Declined("BN parameters are not finite")
    if np.any(denom <= 0):
        raise Declined("var + epsilon <= 0 (the BN divides by zero or a negative number)")
    with np.errstate(over="ignore", invalid="ignore"):
        scale = gamma / np.sqrt(denom)
        shift = beta - scale * mean
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
        raise Declined("BN scale or shift is not finite")
    return Affine(node, node.inputs[0], scale, shift, axis=1)


def _affine_of_binary(node: ir.Node) -> Affine:
    a, b = node.inputs[0], node.inputs[1]
    ca, cb = const_array(a), const_array(b)
    if (ca is None) == (cb is None):
        raise Declined("needs exactly one constant input")
    const_first = cb is None
    x, c = (b, ca) if const_first else (a, cb)
    if const_first and node.op_type == "Div":
        raise Declined("constant / x is not affine")
    if np_dtype(x.dtype) is None or c is None or c.dtype.kind != "f":
        raise Declined("dtype cannot be folded")
    c = np.asarray(c, dtype=np.float64)
    varying = [i for i, d in enumerate(c.shape) if d != 1]
    if len(varying) > 1:
        raise Declined("constant is not per-channel")
    axis = None if not varying else varying[0] - c.ndim
    vec = c.reshape(-1)
    one, zero = np.ones_like(vec), np.zeros_like(vec)
    if node.op_type == "Mul":
        scale, shift = vec, zero
    elif node.op_type == "Add":
        scale, shift = one, vec
    elif node.op_type == "Sub":
        scale, shift = (-one, vec) if const_first else (one, -vec)
    else:  # Div
        if np.any(vec == 0):
            raise Declined("division by zero")
        scale, shift = 1.0 / vec, zero
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
        raise Declined("constant is not finite")
    return Affine(node, x, scale, shift, axis=axis, ndim=c.ndim)


def affine_of(node: ir.Node) -> Affine:
    """The per-channel affine map a node computes, or Declined with the reason it is not one."""
    if is_onnx_op(node, "BatchNormalization"):
        return _affine_of_bn(node)
    if is_onnx_op(node, *AFFINE_OPS) and len(node.inputs) == 2:
        return _affine_of_binary(node)
    raise Declined(f"{node.op_type} is not a per-channel affine map")


@dataclasses.dataclass
class Site:
    """A linear op whose output channels can absorb an affine map (backward fold)."""

    node: ir.Node
    weight: np.ndarray
    bias: np.ndarray | None
    out_rank: int | None
    axis: int
    channels: int
    bias_add: ir.Node | None = None  # MatMul's bias: a following Add of a constant

    @property
    def out(self) -> ir.Value:
        return (self.bias_add or self.node).outputs[0]


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _weights(node: ir.Node) -> tuple[np.ndarray, np.ndarray | None]:
    w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None:
        raise Declined(f"{node.op_type} weight is not a constant initializer")
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias = const_array(bias_value)
    if bias_value is not None and bias is None:
        raise Declined(f"{node.op_type} bias is not a constant initializer")
    _check_shapes(node, w, bias)
    return np.asarray(w, np.float64), None if bias is None else np.asarray(bias, np.float64)


def _check_shapes(node: ir.Node, w: np.ndarray, bias: np.ndarray | None) -> None:
    """Decline weights and biases whose shapes the op cannot have (onnx.checker and shape
    inference do not compare them; onnxruntime refuses such a model)."""
    if node.op_type == "Gemm":
        trans_b = bool(node.attributes.get_int("transB", 0))
        if w.ndim != 2:
            raise Declined(f"Gemm weight has rank {w.ndim}, not 2")
        n = w.shape[0] if trans_b else w.shape[1]
        if bias is not None and (bias.ndim > 2 or bias.shape[-1:] not in ((), (1,), (n,))):
            raise Declined(f"Gemm bias shape {bias.shape} does not fit its {n} outputs")
        return
    group = node.attributes.get_int("group", 1)
    if w.ndim < 3 or group < 1 or w.shape[0] % group:
        raise Declined(f"{node.op_type} weight shape {w.shape} does not fit group={group}")
    m = w.shape[0] if node.op_type == "Conv" else w.shape[1] * group
    if bias is not None and bias.shape != (m,):
        raise Declined(f"{node.op_type} bias shape {bias.shape} does not match {m} channels")


def _site_of(node: ir.Node) -> Site:
    """Describe ``node`` as a backward fold site, or decline."""
    if np_dtype(node.outputs[0].dtype) is None:
        raise Declined(f"{node.op_type} dtype cannot be folded")
    if is_onnx_op(node, "Conv"):
        w, b = _weights(node)
        return Site(node, w, b, w.ndim, 1, w.shape[0])
    if is_onnx_op(node, "ConvTranspose"):
        w, b = _weights(node)
        group = node.attributes.get_int("group", 1)
        return Site(node, w, b, w.ndim, 1, w.shape[1] * group)
    if is_onnx_op(node, "Gemm"):
        w, b = _weights(node)
        trans_b = bool(node.attributes.get_int("transB", 0))
        return Site(node, w, b, 2, 1, w.shape[0] if trans_b else w.shape[1])
    if is_onnx_op(node, "MatMul"):
        w = const_array(node.inputs[1])
        if w is None or w.ndim != 2:
            raise Declined("MatMul weight is not a constant 2-D initializer")
        rank = _rank(node.outputs[0])
        if rank is None:
            rank = _rank(node.inputs[0])
        if rank is None:
            raise Declined("rank of the MatMul output is unknown")
        return Site(node, np.asarray(w, np.float64), None, rank, rank - 1, w.shape[1])
    raise Declined(f"producer {node.op_type} is not Conv/ConvTranspose/Gemm/MatMul")


def _is_bias_add(node: ir.Node) -> bool:
    """An ``Add`` of a constant (per channel, or one value) after a MatMul: taken as its bias.

    Its constant may broadcast along any axis: ``(x W + c) + d == x W + (c + d)`` whatever the
    shape of ``d``, as long as the sum's output shape stays (``d`` has the MatMul's columns).
    """
    if not is_onnx_op(node, "Add"):
        return False
    try:
        return bool(np.all(affine_of(node).scale == 1))
    except Declined:
        return False


def find_site(aff: Affine) -> Site:
    """The linear op that produces ``aff``'s input, if the map can fold into it."""
    producer = aff.x.producer()
    if producer is None:
        raise Declined("input comes from a graph input, not a linear op")
    bias_add = None
    if is_onnx_op(producer, "Add"):
        # MatMul -> Add(constant bias) -> map: the Add is the MatMul's bias.
        inner = next(
            (v.producer() for v in producer.inputs if v is not None and const_array(v) is None),
            None,
        )
        if inner is not None and is_onnx_op(inner, "MatMul") and _is_bias_add(producer):
            if not single_use(inner.outputs[0]):
                raise Declined("MatMul output has other consumers")
            bias_add, producer = producer, inner
    if not single_use(aff.x):
        raise Declined(f"{producer.op_type} output has other consumers")
    site = _site_of(producer)
    if is_onnx_op(producer, "MatMul") and bias_add is None and np.all(aff.scale == 1):
        raise Declined("this Add is the MatMul's bias; nothing to fold it into")
    site.bias_add = bias_add
    if bias_add is not None:
        # A bias of higher rank broadcasts the MatMul output up: the channel axis is then the
        # last axis of the Add's output, not of the MatMul's.
        rank = _rank(bias_add.outputs[0])
        if rank is None:
            raise Declined("rank of the MatMul bias Add output is unknown")
        site.out_rank, site.axis = rank, rank - 1
        site.bias = np.asarray(
            const_array(next(v for v in bias_add.inputs if const_array(v) is not None)), np.float64
        )
    return site


def _cast(array: np.ndarray, like: ir.Value, what: str) -> np.ndarray:
    # cast_checked checks the float64 values (and the float16 range), not the float32 range:
    # a finite float64 above 3.4e38 would become Inf in a float32 model (and warn on stderr).
    with np.errstate(over="ignore"):
        out = cast_checked(array, like.dtype, what)
    if not np.all(np.isfinite(out)):
        raise Declined(f"folded {what} would overflow {out.dtype}")
    # Headroom: the folded op sums products of these values with its input, where the original
    # applied the scale once, after the sum. A weight within 2**16 of the float32/float64 max
    # can overflow that sum (Inf) where the original model stays finite. (float16 models keep
    # the check above only: their range is too small for any headroom.)
    if out.dtype != np.float16 and np.max(np.abs(out), initial=0.0) > _HEADROOM[out.dtype.type]:
        raise Declined(f"folded {what} would come within 2**16 of the {out.dtype} maximum")
    return out


def _plan_backward(
    graph: ir.Graph, namer: Namer, aff: Affine, site: Site
) -> tuple[str, Callable[[], ir.Value]]:
    """Compute ``site``'s weights with ``aff`` absorbed (or decline); return the label of the
    absorbing node and a function that writes them into the graph and returns the value that
    now carries the map's result."""
    node = site.node
    dt = node.outputs[0]
    s, t = aff.channels(site.out_rank, site.axis, site.channels)
    name = label(node)
    # Every new tensor is computed (and may be declined) before the graph is touched: a decline
    # after a first change would leave, say, a scaled weight behind an unscaled bias.
    if is_onnx_op(node, "Conv", "ConvTranspose"):
        if node.op_type == "Conv":
            w = _linear.conv_scale_out(site.weight, s)
        else:
            w = _linear.conv_transpose_scale_out(
                site.weight, s, node.attributes.get_int("group", 1)
            )
        w = _cast(w, dt, "weight")
        b = _cast(_linear.bias_after(site.bias, s, t), dt, "bias")

        def apply() -> ir.Value:
            set_constant_input(graph, namer, node, 1, w, f"{name}_W")
            set_constant_input(graph, namer, node, 2, b, f"{name}_B")
            return site.out

    elif is_onnx_op(node, "Gemm"):
        trans_b = bool(node.attributes.get_int("transB", 0))
        beta = float(node.attributes.get_float("beta", 1.0))
        w = _cast(_linear.gemm_b_scale_out(site.weight, s, trans_b), dt, "weight")
        keeps_c = site.bias is not None and beta != 0.0
        c = _cast(s * site.bias + t / beta if keeps_c else t, dt, "bias")

        def apply() -> ir.Value:
            if not keeps_c:
                node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
            set_constant_input(graph, namer, node, 1, w, f"{name}_B")
            set_constant_input(graph, namer, node, 2, c, f"{name}_C")
            return site.out

    else:  # MatMul, with or without a bias Add
        w = _cast(_linear.gemm_b_scale_out(site.weight, s, False), dt, "weight")
        b = None
        if site.bias_add is not None:
            b = _cast(_linear.bias_after(site.bias, s, t), dt, "bias")
        elif np.any(t):
            b = _cast(t, dt, "bias")

        def apply() -> ir.Value:
            set_constant_input(graph, namer, node, 1, w, f"{name}_W")
            if site.bias_add is not None:
                bias_index = next(
                    i for i, v in enumerate(site.bias_add.inputs) if const_array(v) is not None
                )
                set_constant_input(graph, namer, site.bias_add, bias_index, b, f"{name}_bias")
            elif b is not None:
                return _append_add(graph, namer, node, b, name).outputs[0]
            return site.out

    return name, apply


def _backward_pairs(aff: Affine) -> list[tuple[Affine, Site]]:
    """Where ``aff`` folds backward: one (map, site) for a linear producer, or, through a
    Concat / MaxPool / nearest Resize (passes/_through.py), one per producer of its inputs,
    each with its slice of the map."""
    producer = aff.x.producer()
    if producer is None or not is_onnx_op(producer, *_through.THROUGH_OPS):
        return [(aff, find_site(aff))]
    if not single_use(aff.x):
        raise Declined(f"{producer.op_type} output has other consumers")
    rank = _rank(aff.x)
    if rank is None or rank < 2:
        raise Declined(f"rank of the {producer.op_type} output is unknown or below 2")
    count = aff.x.shape[1]
    if not isinstance(count, int):
        raise Declined(f"channel count of the {producer.op_type} output is unknown")
    s, t = aff.channels(rank, 1, count)
    pairs = []
    for i, (value, ps, pt) in enumerate(_through.split(producer, s, t, rank)):
        sub = dataclasses.replace(aff, x=value, scale=ps, shift=pt, axis=1, ndim=1)
        try:
            pairs += _backward_pairs(sub)
        except Declined as e:
            raise Declined(f"through {producer.op_type} ({label(producer)}) input {i}: {e}") from e
    return pairs


def _fold_backward(
    graph: ir.Graph, namer: Namer, aff: Affine, pairs: list[tuple[Affine, Site]]
) -> list[str]:
    """Fold each (slice of) ``aff`` into its site, all or none; return the absorbing labels."""
    plans = [_plan_backward(graph, namer, sub, site) for sub, site in pairs]
    for _, site in pairs:
        # Scaled weights: their outputs no longer compute the original tensors (the one that
        # replaces the map's output is noted again below).
        for value in {site.node.outputs[0], site.out}:
            note_changed(graph, value.name)
    finals = [apply() for _, apply in plans]
    # Through a Concat/MaxPool/Resize that op stays and carries the result; directly, the
    # site's output (or a new bias Add after a MatMul) does.
    direct = len(pairs) == 1 and pairs[0][0] is aff
    _bypass(graph, namer, aff.node, finals[0] if direct else aff.x)
    return [name for name, _ in plans]


def _append_add(
    graph: ir.Graph, namer: Namer, node: ir.Node, bias: np.ndarray, base: str
) -> ir.Node:
    """Insert ``Add(node's output, bias)`` after ``node`` and move the output's users onto it."""
    out = node.outputs[0]
    bias_value = ir.Value(
        name=namer(f"{base}_bias"),
        shape=ir.Shape(bias.shape),
        type=ir.TensorType(out.dtype),
        const_value=ir.tensor(bias),
    )
    bias_value.const_value.name = bias_value.name
    graph.register_initializer(bias_value)
    result = ir.Value(name=namer(f"{out.name}_biased"), shape=out.shape, type=out.type)
    add = ir.Node("", "Add", [out, bias_value], outputs=[result], name=namer(f"{base}_bias_add"))
    graph.insert_after(node, add)
    users = [(u.node, u.idx) for u in out.uses() if u.node is not add]
    for user, idx in users:
        user.replace_input_with(idx, result)
    # The sum computes what ``out`` did; ``out`` itself lost the bias.
    note_replaced(graph, out.name, result.name)
    note_changed(graph, out.name)
    if out.is_graph_output():
        name = out.name
        graph.outputs[list(graph.outputs).index(out)] = result
        # The namer: a value of the model may already be called "<name>.bnfold_replaced".
        out.name = namer(f"{name}.bnfold_replaced")
        tensor_map(graph).pop(result.name, None)
        result.name = name
    return add


def _replace_value(graph: ir.Graph, old: ir.Value, new: ir.Value, namer: Namer) -> None:
    """Send every user of ``old`` to ``new``; if ``old`` is a graph output, ``new`` takes its
    place and its name (graph outputs keep their names). Noted in the tensor map."""
    name = old.name
    was_output = old.is_graph_output()
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    if was_output:
        old.name = namer(f"{name}.bnfold_replaced")
        tensor_map(graph).pop(new.name, None)
        new.name = name
    note_replaced(graph, name, new.name)


def _bypass(graph: ir.Graph, namer: Namer, node: ir.Node, replacement: ir.Value) -> None:
    """Remove single-output ``node``, sending its users to ``replacement`` (output names kept)."""
    _replace_value(graph, node.outputs[0], replacement, namer)
    graph.remove(node, safe=True)


@dataclasses.dataclass
class _Consumer:
    node: ir.Node
    weight: np.ndarray
    bias: np.ndarray | None
    s: np.ndarray
    t: np.ndarray
    # The values between the map and this consumer (outputs of the pools / Flatten it was
    # reached through): they stay, but no longer compute the original tensors.
    path: tuple[ir.Value, ...] = ()
    bias_add: ir.Node | None = None  # MatMul's bias: the following Add of a constant


def _consumer(aff: Affine, node: ir.Node, rank: int | None) -> _Consumer:
    """``node`` (reading the map's output, of rank ``rank``, as input 0) as a forward fold site."""
    if not is_onnx_op(node, "Conv", "Gemm", "MatMul"):
        raise Declined(f"consumer {node.op_type} ({label(node)}) is not Conv/Gemm/MatMul")
    if np_dtype(node.outputs[0].dtype) is None:
        raise Declined(f"consumer {label(node)} dtype cannot be folded")
    if node.op_type == "Conv":
        w, b = _weights(node)
        group = node.attributes.get_int("group", 1)
        s, t = aff.channels(w.ndim, 1, w.shape[1] * group)
        pads = node.attributes.get_ints("pads", [])
        auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
        if np.any(t) and (any(pads) or auto_pad not in ("NOTSET", "VALID")):
            raise Declined(f"padding: consumer {label(node)} pads its input and shift != 0")
        return _Consumer(node, w, b, s, t)
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            raise Declined(f"consumer {label(node)} has transA=1")
        w, b = _weights(node)
        trans_b = bool(node.attributes.get_int("transB", 0))
        s, t = aff.channels(2, 1, w.shape[1] if trans_b else w.shape[0])
        return _Consumer(node, w, b, s, t)
    w = const_array(node.inputs[1])
    if w is None or w.ndim != 2:
        raise Declined(f"consumer {label(node)} weight is not a constant 2-D initializer")
    if rank is None:
        raise Declined("rank of the MatMul input is unknown")
    s, t = aff.channels(rank, rank - 1, w.shape[0])
    out = node.outputs[0]
    # MatMul -> Add(constant): the shift W t joins that bias instead of a second Add. (Its shape
    # cannot change the output's: the sum has the MatMul's columns already.)
    add = next(iter(out.uses())).node if single_use(out) else None
    if add is not None and _is_bias_add(add):
        bias = np.asarray(next(c for c in map(const_array, add.inputs) if c is not None))
        return _Consumer(node, np.asarray(w, np.float64), bias.astype(np.float64), s, t,
                         bias_add=add)  # fmt: skip
    return _Consumer(node, np.asarray(w, np.float64), None, s, t)


def _consumers_through(
    aff: Affine, node: ir.Node, rank: int | None, path: tuple[ir.Value, ...]
) -> list[_Consumer]:
    """The consumers behind a pool / nearest Resize / Flatten / Reshape that reads the map's
    output: the map moves onto that op's output (passes/_through.py) and folds further."""
    value = node.inputs[0]
    try:
        if rank is None or rank < 2:
            raise Declined("rank of its input is unknown or below 2")
        # The channel count: from the value's shape, or (shape inference left none) from a
        # per-channel map itself; channels() checks it against the op's.
        dim = value.shape[1] if value.shape is not None and len(value.shape) > 1 else None
        count = dim if isinstance(dim, int) else None
        if count is None and aff.axis is not None:
            count = aff.scale.shape[0]
        if count is None:
            raise Declined("channel count of its input is unknown")
        s, t = aff.channels(rank, 1, count)
        if is_onnx_op(node, *_through.FLATTEN_OPS):
            (s, t), out_rank = _through.flatten_map(node, s, t), 2
        else:
            ((_, s, t),), out_rank = _through.split(node, s, t, rank), rank
        out = node.outputs[0]
        sub = dataclasses.replace(aff, scale=s, shift=t, axis=1, ndim=1)
        return _consumers(sub, out, out_rank, (*path, out))
    except Declined as e:
        raise Declined(f"through {node.op_type} ({label(node)}): {e}") from e


def _consumers(
    aff: Affine,
    value: ir.Value | None = None,
    rank: int | None = None,
    path: tuple[ir.Value, ...] = (),
) -> list[_Consumer]:
    """Every consumer of the map's output (``value``, of rank ``rank``), each foldable forward,
    reached directly or through the ops of ``_through.FORWARD_OPS`` / ``FLATTEN_OPS``; else
    Declined."""
    if value is None:
        value = aff.node.outputs[0]
        rank = _rank(value) if _rank(value) is not None else _rank(aff.x)
    if value.is_graph_output():
        raise Declined("output is a graph output")
    found = []
    for use in value.uses():
        node, idx = use.node, use.idx
        if idx == 0 and is_onnx_op(node, *_through.FORWARD_OPS, *_through.FLATTEN_OPS):
            found += _consumers_through(aff, node, rank, path)
        elif idx != 0:
            raise Declined(f"consumer {node.op_type} ({label(node)}) reads it as input {idx}")
        else:
            found.append(dataclasses.replace(_consumer(aff, node, rank), path=path))
    if not found:
        raise Declined("output has no consumers")
    return found


def _fold_forward(
    graph: ir.Graph, namer: Namer, aff: Affine, consumers: list[_Consumer]
) -> list[str]:
    names = []
    # Compute every new tensor first: a decline (overflow) must leave the graph untouched.
    plans = []
    for c in consumers:
        dt = c.node.outputs[0]
        name = label(c.node)
        if c.node.op_type == "Conv":
            group = c.node.attributes.get_int("group", 1)
            w, b = _linear.conv_fold_input(c.weight, c.bias, c.s, c.t, group)
            plans.append(
                (c, name, _cast(w, dt, "weight"), None if b is None else _cast(b, dt, "bias"))
            )
        elif c.node.op_type == "Gemm":
            trans_b = bool(c.node.attributes.get_int("transB", 0))
            alpha = float(c.node.attributes.get_float("alpha", 1.0))
            beta = float(c.node.attributes.get_float("beta", 1.0))
            w, shift = _linear.matrix_fold_input(c.weight, c.s, c.t, trans_b)
            bias = None
            if np.any(shift):
                if c.bias is not None and beta != 0.0:
                    bias = c.bias + alpha * shift / beta
                else:
                    bias = alpha * shift
            plans.append(
                (c, name, _cast(w, dt, "weight"), None if bias is None else _cast(bias, dt, "bias"))
            )
        else:
            w, shift = _linear.matrix_fold_input(c.weight, c.s, c.t, False)
            bias = None
            if np.any(shift):
                bias = shift if c.bias is None else c.bias + shift
                bias = _cast(bias, dt, "bias")
            plans.append((c, name, _cast(w, dt, "weight"), bias))
    for c, name, w, bias in plans:
        node = c.node
        set_constant_input(graph, namer, node, 1, w, f"{name}_W")
        if bias is not None:
            if node.op_type == "Conv":
                set_constant_input(graph, namer, node, 2, bias, f"{name}_B")
            elif node.op_type == "Gemm":
                beta = float(node.attributes.get_float("beta", 1.0))
                if c.bias is None or beta == 0.0:
                    node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
                set_constant_input(graph, namer, node, 2, bias, f"{name}_C")
            elif c.bias_add is not None:
                index = [const_array(v) is not None for v in c.bias_add.inputs].index(True)
                set_constant_input(graph, namer, c.bias_add, index, bias, f"{name}_bias")
                # The MatMul's own output now lacks W t; the Add's still computes the original.
                note_changed(graph, node.outputs[0].name)
            else:
                _append_add(graph, namer, node, bias, name)
        names.append(name)
    # The pools / Flatten the map was moved through stay, and now carry unmapped values.
    for value in dict.fromkeys(v for c in consumers for v in c.path):
        note_changed(graph, value.name)
    y = aff.node.outputs[0]
    for use in list(y.uses()):
        use.node.replace_input_with(use.idx, aff.x)
    graph.remove(aff.node, safe=True)
    return names


def _to_mul_add(graph: ir.Graph, namer: Namer, aff: Affine) -> None:
    """Replace a BatchNormalization with ``Mul(s) -> Add(t)`` on channel axis 1."""
    node = aff.node
    rank = _rank(aff.x)
    if rank is None:
        raise Declined("rank of the BN input is unknown, cannot broadcast Mul/Add")
    shape = (aff.scale.shape[0],) + (1,) * (rank - 2)
    base = label(node)
    dt = node.outputs[0]
    scale = _cast(aff.scale.reshape(shape), dt, "scale")
    shift = _cast(aff.shift.reshape(shape), dt, "shift")
    out = node.outputs[0]
    s_val = ir.Value(
        name=namer(f"{base}_scale"),
        shape=ir.Shape(shape),
        type=ir.TensorType(dt.dtype),
        const_value=ir.tensor(scale),
    )
    t_val = ir.Value(
        name=namer(f"{base}_shift"),
        shape=ir.Shape(shape),
        type=ir.TensorType(dt.dtype),
        const_value=ir.tensor(shift),
    )
    for v in (s_val, t_val):
        v.const_value.name = v.name
        graph.register_initializer(v)
    mid = ir.Value(name=namer(f"{base}_scaled"), shape=out.shape, type=out.type)
    res = ir.Value(name=namer(f"{base}_affine"), shape=out.shape, type=out.type)
    mul = ir.Node("", "Mul", [aff.x, s_val], outputs=[mid], name=namer(f"{base}_mul"))
    add = ir.Node("", "Add", [mid, t_val], outputs=[res], name=namer(f"{base}_add"))
    graph.insert_after(node, [mul, add])
    _bypass(graph, namer, node, res)


class FoldBn(ir.passes.InPlacePass):
    """Fold BatchNormalization and constant per-channel Mul/Add/Sub/Div into linear ops.

    Every BatchNormalization in the result's ``changed`` (``folded`` backward/forward, or
    ``affine``: rewritten as Mul+Add, with the reason it could not fold) or ``declined`` (kept,
    with the reason). Constant Mul/Add/Sub/Div that folded are in ``changed`` too.

    Args:
        forward: Also try folding into the consumers.
        to_affine: Rewrite a BN that folds neither way as Mul+Add.
        fold_affine_ops: Also fold constant per-channel Mul/Add/Sub/Div (not only BN).
    """

    def __init__(self, forward: bool = True, to_affine: bool = True, fold_affine_ops: bool = True):
        super().__init__()
        self.forward = forward
        self.to_affine = to_affine
        self.fold_affine_ops = fold_affine_ops

    def _candidate(self, node: ir.Node) -> bool:
        if node.graph is None:  # removed earlier in this pass
            return False
        if is_onnx_op(node, "BatchNormalization"):
            return True
        return self.fold_affine_ops and is_onnx_op(node, *AFFINE_OPS)

    def call(self, model: ir.Model) -> BnfoldPassResult:
        graph = model.graph
        namer = Namer(graph)
        result = BnfoldPassResult(model, False)
        reasons: dict[ir.Node, list[str]] = {}  # BN -> why each direction declined
        # Labels are taken before rewriting: folding renames values that unnamed nodes go by.
        labels = {n: label(n) for n in graph}

        def done(node: ir.Node, direction: str, into: list[str]) -> None:
            kind = "BatchNormalization" if node.op_type == "BatchNormalization" else node.op_type
            result.changed.append(
                Record(labels.get(node) or label(node), kind, "folded", direction, into)
            )
            result.modified = True
            logger.debug("folded %s %s into %s", labels.get(node) or label(node), direction, into)

        for node in list(graph):
            if not self._candidate(node):
                continue
            try:
                aff = affine_of(node)
                into = _fold_backward(graph, namer, aff, _backward_pairs(aff))
                done(node, "backward", into)
            except Declined as e:
                reasons.setdefault(node, []).append(f"backward: {e}")
        if self.forward:
            # Reverse order: in a Mul -> Add -> Conv chain the Add folds first, then the Mul.
            for node in reversed(list(graph)):
                if not self._candidate(node):
                    continue
                try:
                    aff = affine_of(node)
                    into = _fold_forward(graph, namer, aff, _consumers(aff))
                    done(node, "forward", into)
                except Declined as e:
                    reasons.setdefault(node, []).append(f"forward: {e}")
        for node in list(graph):
            if node.graph is None or not is_onnx_op(node, "BatchNormalization"):
                continue
            why = "; ".join(reasons.get(node, []))
            rec = Record(labels.get(node) or label(node), "BatchNormalization", "kept", reason=why)
            if self.to_affine:
                try:
                    _to_mul_add(graph, namer, affine_of(node))
                    rec.action = "affine"
                    result.modified = True
                except Declined as e:
                    rec.reason = f"{why}; affine: {e}" if why else f"affine: {e}"
            (result.changed if rec.action == "affine" else result.declined).append(rec)
        for node in ir.traversal.RecursiveGraphIterator(graph):
            if node.graph is not graph and is_onnx_op(node, "BatchNormalization"):
                result.declined.append(
                    Record(
                        label(node),
                        "BatchNormalization",
                        "kept",
                        reason="inside a subgraph (If/Loop/Scan body); not folded",
                    )
                )
        # BNs in model-local functions are reported too (inspect counts them), not folded: a
        # function's weights are its inputs, not constants of the graph.
        for function in model.functions.values():
            for node in ir.traversal.RecursiveGraphIterator(function):
                if is_onnx_op(node, "BatchNormalization"):
                    result.declined.append(
                        Record(
                            f"{function.name}/{label(node)}",
                            "BatchNormalization",
                            "kept",
                            reason="inside a model-local function; not folded",
                        )
                    )
        return result
