"""equalize: cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization").

For two convolutions in a row, ``Conv1 -> f -> Conv2``, output channel ``c`` of Conv1 can be
scaled by any ``s_c > 0`` if Conv2's input channel ``c`` is scaled by ``1 / s_c``::

    W1'[c] = s_c W1[c],   b1'[c] = s_c b1[c],   W2'[:, c] = W2[:, c] / s_c

This is exact when ``f(s x) = s f(x)`` for ``s > 0`` (positive homogeneity): the identity,
``Relu``, ``LeakyRelu``, ``PRelu``; zero padding in Conv2 stays zero. With ``r1_c = max|W1[c]|``
and ``r2_c = max|W2[:, c]|``, the choice ``s_c = sqrt(r2_c / r1_c)`` makes both channel ranges
``sqrt(r1_c r2_c)``: equal, so one per-tensor int8 scale fits every channel of both weights as
well as possible. A chain ``Conv -> f -> DepthwiseConv -> f -> Conv`` is two pairs sharing the
depthwise conv; the pairs are equalized in turn until the scales stop changing.

**Clip (ReLU6) is not positively homogeneous**: ``clip(s y, 0, 6) != s clip(y, 0, 6)`` where
``y > 6`` or ``y > 6 / s``. What *is* exact is ``s clip(y, lo, hi) = clip(s y, s lo, s hi)``, a
clip with per-channel bounds, which a Clip op cannot hold (its bounds are scalars). So, for a
chain with a Clip (``lo <= 0 <= hi`` required, else the pair is declined):

1. the scales are normalized to ``max_c s_c = 1`` (over the live channels; a dead one, see
   below, keeps ``s_c = 1``), so ``[s_c lo, s_c hi]`` lies inside
   ``[lo, hi]`` for every channel (a common factor changes neither weight's relative channel
   ranges, so per-tensor quantization of the weights sees no difference; it also keeps the
   activation range within the original ``[lo, hi]``);
2. the Clip stays as it is, and a per-channel ``Min(x, s * hi)`` (and ``Max(x, s * lo)`` when
   ``lo < 0``) is inserted after it, which makes the chain exactly ``clip(s y, s lo, s hi)``.

So the result is exact in real arithmetic for every input, whether or not the bound is ever
reached; calibration data is not needed and no ReLU6 becomes a ReLU. ``Min``/``Max`` with a
constant operand in a chain are rescaled the same way (so running the pass twice is exact too).
Afterwards both weights' relative per-channel ranges ``r_c / max_c r_c`` are equal.

A *dead* channel, whose weight range is below ``DEAD_FRACTION`` of its layer's largest (a BN
with gamma ~ 0, folded), outputs its bias, a constant: it keeps ``s_c = 1`` (equalizing it would
multiply that constant up to the whole activation range and zero the live channels' int8 values).

Preconditions (each failing one is reported as a decline): Conv1's weight (and bias) and Conv2's
weight are constant initializers; Conv1's output and every activation's output have one reader
and are not graph outputs; Conv2 reads the chain as its input 0; channel counts match (any
``group`` for either conv, so depthwise convs are covered); float32/float64 tensors.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from bnfold.passes import _linear
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
    read_tensor_map,
    set_constant_input,
    write_tensor_map,
)

logger = logging.getLogger(__name__)

# Key of ``node.meta`` holding the (mean, std) of a conv's output channels, taken from the BN that
# was folded into it (see bnfold.passes.bias_correction); rescaled here with the channels.
BN_STATS_KEY = "bnfold.bn_output_stats"
_HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu")
_DTYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE)
_S_LIMIT = 1e6  # |log s| beyond this is a dead channel, not a range to equalize
# A channel whose weight range is below this fraction of its layer's largest is switched off
# (a folded BN with gamma ~ 0): its output is its bias, a constant. Equalizing it would give it
# ``s ~ sqrt(r2 / r1)``, huge, and multiply that constant by ``s`` (or, under a Clip, divide
# every other channel by it), so one constant channel fills the whole activation range and the
# real channels quantize to 0. It keeps ``s = 1``. (Real small channels sit far above this:
# the smallest in ImageNet MobileNetV2 is 4.5e-4 of its layer's largest.)
DEAD_FRACTION = 1e-5


@dataclasses.dataclass
class _Layer:
    node: ir.Node
    w: np.ndarray  # float64
    b: np.ndarray | None
    group: int


@dataclasses.dataclass
class Pair:
    """``first -> acts -> second``; ``scale`` is the product of every ``s`` applied so far."""

    first: _Layer
    acts: list[ir.Node]
    second: _Layer
    clip: bool
    scale: np.ndarray


def out_ranges(w: np.ndarray) -> np.ndarray:
    """``max|W[c]|`` per output channel of a conv weight (M, C/g, k...)."""
    return np.abs(w).reshape(w.shape[0], -1).max(axis=1)


def in_ranges(w: np.ndarray, group: int) -> np.ndarray:
    """``max|W[:, c]|`` per input channel ``c`` of a conv weight (M, C/g, k...) with ``group``."""
    m, c_per_g = w.shape[0], w.shape[1]
    a = np.abs(w).reshape(group, m // group, c_per_g, -1)
    return a.max(axis=(1, 3)).reshape(group * c_per_g)


def _layer(node: ir.Node, layers: dict[ir.Node, _Layer]) -> _Layer:
    if node in layers:
        return layers[node]
    if node.outputs[0].dtype not in _DTYPES:
        raise Declined(f"{label(node)} is not float32/float64")
    w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None:
        raise Declined(f"{label(node)} weight is not a constant initializer")
    bias_v = node.inputs[2] if len(node.inputs) > 2 else None
    b = const_array(bias_v)
    if bias_v is not None and b is None:
        raise Declined(f"{label(node)} bias is not a constant initializer")
    layer = _Layer(
        node,
        np.asarray(w, np.float64),
        None if b is None else np.asarray(b, np.float64),
        node.attributes.get_int("group", 1),
    )
    layers[node] = layer
    return layer


def _clip_bounds(node: ir.Node) -> tuple[float, float]:
    if node.attributes.get("min") is not None or node.attributes.get("max") is not None:
        return (
            node.attributes.get_float("min", -np.inf),
            node.attributes.get_float("max", np.inf),
        )
    bounds = []
    for i, default in ((1, -np.inf), (2, np.inf)):
        v = node.inputs[i] if len(node.inputs) > i else None
        if v is None:
            bounds.append(default)
            continue
        c = const_array(v)
        if c is None or c.size != 1:
            raise Declined(f"{label(node)} bounds are not constant scalars")
        bounds.append(float(c.reshape(())))
    return bounds[0], bounds[1]


def _bound_const(node: ir.Node, channels: int, rank: int) -> tuple[int, np.ndarray]:
    """Index and value of a Min/Max's constant operand, if it is a scalar or per-channel."""
    consts = [(i, const_array(v)) for i, v in enumerate(node.inputs)]
    found = [(i, c) for i, c in consts if c is not None]
    if len(node.inputs) != 2 or len(found) != 1:
        raise Declined(f"{label(node)} does not have exactly one constant operand")
    i, c = found[0]
    if c.size != 1:
        padded = (1,) * (rank - c.ndim) + tuple(c.shape)
        if c.ndim > rank or padded[1] != channels or np.prod(padded) != channels:
            raise Declined(f"{label(node)} constant is not per-channel")
    return i, np.asarray(c, np.float64)


def _is_activation(node: ir.Node) -> bool:
    return is_onnx_op(node, *_HOMOGENEOUS, "Clip", "Min", "Max")


def find_pair(first: ir.Node, layers: dict[ir.Node, _Layer]) -> Pair:
    """The pair that starts at Conv ``first``, or Declined with the reason."""
    l1 = _layer(first, layers)
    channels, rank = l1.w.shape[0], l1.w.ndim
    v = first.outputs[0]
    acts: list[ir.Node] = []
    clip = False
    while True:
        if v.is_graph_output():
            raise Declined("output is a graph output")
        uses = v.uses()
        if len(uses) != 1:
            raise Declined(f"output has {len(uses)} readers")
        user, idx = uses[0].node, uses[0].idx
        if is_onnx_op(user, "Conv") and idx == 0:
            break
        if not _is_activation(user):
            raise Declined(f"followed by {user.op_type}, not an activation or a Conv")
        if is_onnx_op(user, "PRelu") and (idx != 0 or const_array(user.inputs[1]) is None):
            raise Declined("PRelu slope is not constant")
        if is_onnx_op(user, "Clip"):
            if idx != 0:
                raise Declined("Clip bound is not constant")
            lo, hi = _clip_bounds(user)
            if lo > 0 or hi < 0:
                raise Declined(f"Clip({lo:g}, {hi:g}) does not contain 0")
            clip = True
        if is_onnx_op(user, "Min", "Max"):
            i, _ = _bound_const(user, channels, rank)
            if i == idx:
                raise Declined(f"{user.op_type} bound is not constant")
        acts.append(user)
        v = user.outputs[0]
    l2 = _layer(user, layers)
    if l2.w.shape[1] * l2.group != channels:
        raise Declined(f"{label(user)} reads {l2.w.shape[1] * l2.group} channels, not {channels}")
    if l2.w.shape[0] % l2.group:
        raise Declined(f"{label(user)} output channels do not divide by group")
    return Pair(l1, acts, l2, clip, np.ones(channels))


def _step(pair: Pair) -> float:
    """Equalize one pair once; return ``max |log s|`` (0 when already equalized)."""
    r1, r2 = out_ranges(pair.first.w), in_ranges(pair.second.w, pair.second.group)
    live = (r1 > DEAD_FRACTION * r1.max()) & (r2 > DEAD_FRACTION * r2.max())
    if not np.any(live):
        return 0.0
    s = np.ones_like(r1)
    s[live] = np.clip(np.sqrt(r2[live] / r1[live]), 1 / _S_LIMIT, _S_LIMIT)
    if pair.clip:
        # Normalize over the live channels only: a dead channel left at 1 while every live one
        # shrinks would make its constant output the largest value of the tensor.
        s[live] /= s[live].max()
    s[~live] = 1.0
    first, second = pair.first, pair.second
    first.w = _linear.conv_scale_out(first.w, s)
    if first.b is not None:
        first.b = first.b * s
    second.w = second.w * _linear.conv_input_channel_map(second.w.shape, second.group, 1.0 / s)
    pair.scale = pair.scale * s
    return float(np.max(np.abs(np.log(s[live]))))


def _spread(r: np.ndarray) -> float:
    """``max / min`` of the non-zero channel ranges: how badly one scale fits all channels."""
    live = r[r > 0]
    return float(live.max() / live.min()) if live.size else 1.0


def _new_value(namer: Namer, like: ir.Value, base: str) -> ir.Value:
    return ir.Value(name=namer(base), shape=like.shape, type=like.type)


def _insert_bound(
    graph: ir.Graph, namer: Namer, after: ir.Node, op: str, bound: np.ndarray
) -> ir.Node:
    """Insert ``op(after's output, bound)`` (Min or Max) and move the readers onto it."""
    out = after.outputs[0]
    base = label(after)
    dtype = np.float64 if out.dtype == ir.DataType.DOUBLE else np.float32
    name = namer(f"{base}_{op.lower()}_bound")
    const = ir.Value(
        name=name,
        shape=ir.Shape(bound.shape),
        type=out.type,
        const_value=ir.tensor(bound.astype(dtype), name=name),
    )
    graph.register_initializer(const)
    res = _new_value(namer, out, f"{out.name}_{op.lower()}")
    users = [(u.node, u.idx) for u in out.uses()]
    node = ir.Node("", op, [out, const], outputs=[res], name=namer(f"{base}_{op.lower()}"))
    graph.insert_after(after, node)
    for user, idx in users:
        user.replace_input_with(idx, res)
    return node


def _finish_acts(graph: ir.Graph, namer: Namer, pair: Pair) -> None:
    """Rescale every bound in the chain by the pair's total scale (see module doc)."""
    rank = pair.first.w.ndim
    shape = (pair.scale.shape[0],) + (1,) * (rank - 2)
    s = pair.scale.reshape(shape)
    if np.all(pair.scale == 1.0):
        return
    # The first conv's output and the chain's activations now hold s * (what they held): for
    # `verify --per-layer` they compute no tensor of the original (the second conv's output
    # still does).
    for node in (pair.first.node, *pair.acts):
        note_changed(graph, node.outputs[0].name)

    def inside(op: str, after: int, bound: float) -> bool:
        """A later Min (Max) whose bound is <= hi (>= lo) everywhere already clips inside the
        Clip's bound; rescaled with the rest, it keeps doing so."""
        for a in pair.acts[after + 1 :]:
            if is_onnx_op(a, op):
                c = _bound_const(a, pair.scale.shape[0], rank)[1]
                return bool(np.all(c <= bound) if op == "Min" else np.all(c >= bound))
        return False

    for i, act in enumerate(list(pair.acts)):
        if is_onnx_op(act, "Min", "Max"):
            i, c = _bound_const(act, pair.scale.shape[0], rank)
            new = np.broadcast_to(c.reshape(-1), pair.scale.shape).reshape(shape) * s
            dtype = act.outputs[0].dtype
            set_constant_input(
                graph, namer, act, i, cast_checked(new, dtype, "bound"), f"{label(act)}_bound"
            )
        elif is_onnx_op(act, "Clip"):
            lo, hi = _clip_bounds(act)
            last = act
            # A Min/Max already after the Clip (from an earlier run) is rescaled instead.
            if np.isfinite(lo) and lo < 0 and not inside("Max", i, lo):
                last = _insert_bound(graph, namer, last, "Max", lo * s)
                note_changed(graph, last.outputs[0].name)
            if np.isfinite(hi) and not inside("Min", i, hi):
                bound = _insert_bound(graph, namer, last, "Min", hi * s)
                note_changed(graph, bound.outputs[0].name)


class Equalize(ir.passes.InPlacePass):
    """Cross-layer equalization of every Conv -> (Relu|LeakyRelu|PRelu|Clip|Min|Max)* -> Conv.

    After the pass, :attr:`pairs` describes each equalized pair (the per-tensor range spread
    ``max_c r_c / min_c r_c`` of both weights before and after).

    Args:
        max_iterations: Rounds over all pairs (chains need several).
        tolerance: Stop when no scale of a round is further than this from 1 (in log).
    """

    def __init__(self, max_iterations: int = 50, tolerance: float = 1e-4) -> None:
        super().__init__()
        self.max_iterations = max_iterations
        self.tolerance = tolerance
        self.pairs: list[dict[str, object]] = []

    def call(self, model: ir.Model) -> BnfoldPassResult:
        graph = model.graph
        namer = Namer(graph)
        result = BnfoldPassResult(model, False)
        read_tensor_map(model)
        layers: dict[ir.Node, _Layer] = {}
        pairs: list[Pair] = []
        for node in list(graph):
            if not is_onnx_op(node, "Conv"):
                continue
            try:
                pairs.append(find_pair(node, layers))
            except Declined as e:
                result.declined.append(Record(label(node), "Conv", "kept", reason=str(e)))
        if not pairs:
            return result
        before = {
            id(p): (_spread(out_ranges(p.first.w)), _spread(in_ranges(p.second.w, p.second.group)))
            for p in pairs
        }
        rounds = 0
        for rounds in range(1, self.max_iterations + 1):  # noqa: B007
            worst = max(_step(p) for p in pairs)
            if worst < self.tolerance:
                break
        logger.info("equalize: %d pairs, %d rounds", len(pairs), rounds)
        for layer in layers.values():
            if not any(layer is p.first or layer is p.second for p in pairs):
                continue
            node, dtype = layer.node, layer.node.outputs[0].dtype
            name = label(node)
            w = cast_checked(layer.w, dtype, "weight")
            set_constant_input(graph, namer, node, 1, w, f"{name}_W")
            if layer.b is not None:
                set_constant_input(
                    graph, namer, node, 2, cast_checked(layer.b, dtype, "bias"), f"{name}_B"
                )
        for p in pairs:
            _finish_acts(graph, namer, p)
            stats = p.first.node.meta.get(BN_STATS_KEY)
            if stats is not None:
                mean, std = stats
                p.first.node.meta[BN_STATS_KEY] = (mean * p.scale, std * p.scale)
            via = "->".join(a.op_type for a in p.acts) or "direct"
            self.pairs.append(
                {
                    "first": label(p.first.node),
                    "second": label(p.second.node),
                    "via": via,
                    "clip": p.clip,
                    "spread_before": before[id(p)],
                    "spread_after": (
                        _spread(out_ranges(p.first.w)),
                        _spread(in_ranges(p.second.w, p.second.group)),
                    ),
                    "scale_min": float(p.scale.min()),
                    "scale_max": float(p.scale.max()),
                }
            )
            result.changed.append(
                Record(
                    label(p.first.node),
                    "Conv",
                    "equalized",
                    into=[label(p.second.node)],
                    reason=f"via {via}",
                )
            )
        write_tensor_map(model)
        result.modified = True
        return result
