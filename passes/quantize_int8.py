"""quantize_int8: rewrite a folded fp32 model as a QDQ int8 model (QuantizeLinear/DequantizeLinear).

Weights are int8, symmetric, with the restricted range ``[-127, 127]`` (so ``-128`` never
appears and a u8 x s8 pair product cannot overflow int16 twice)::

    s_w = max|W| / 127        (per output channel, or one for the tensor)
    W_q = clip(round(W / s_w), -127, 127),   W ~ s_w * W_q

Activations are uint8 or int8, asymmetric (the range is widened to contain 0, so that 0, the
padding value, is exact)::

    s_x = (hi - lo) / 255,   z_x = q_min - round(lo / s_x),   x ~ s_x * (x_q - z_x)

where ``[lo, hi]`` comes from calibration (:mod:`bnfold.quant.quantize` uses onnxruntime's
calibrators). A bias becomes int32 with scale ``s_x * s_w`` and zero point 0, so that
``b_q + sum(W_q * (x_q - z_x))`` is the exact integer accumulator of the layer.

Which nodes run in int8 (:func:`plan`), and why the others do not:

* ``Conv``, ``Gemm`` (``transA=0``), ``MatMul`` with a constant weight: int8 weights, int8 input.
* ``Relu``, ``Clip``, ``Min``/``Max`` with constant bounds, directly after one of those (and
  only used there): *fused*; the activation is applied to the accumulator and the tensor is
  quantized after it, as integer kernels do (the pre-activation tensor is never quantized).
* ``Add`` of two activations, ``GlobalAveragePool``, ``AveragePool``, ``Concat``: int8 inputs and
  output. ``MaxPool``, ``Flatten``, ``Reshape``, ``Transpose``, ``Squeeze``, ``Unsqueeze``: their
  output reuses the input's scale and zero point (they move values, never create new ones).
* Everything else stays float (reason ``no int8 kernel``); so does a node the caller excludes,
  a node whose weight is not a constant initializer, and a pass-through node that reads only
  a constant (Paddle exports a conv's bias as ``Reshape(B, shape) -> Add``: an initializer is
  not an activation, and no calibrator gives it a range).

Every float tensor read by an int8 node gets one ``QuantizeLinear -> DequantizeLinear`` pair at
its producer, and every reader of that tensor reads the dequantized value (in a real int8
runtime the float tensor does not exist). Graph outputs stay float.

Preconditions: BatchNormalization already folded (run :func:`bnfold.pipeline.fold` first: a BN
between a conv and its activation would leave the conv's raw output to be quantized per
tensor, which is what makes quantizing an unfolded model lose accuracy); default-domain opset 13
or newer (per-channel ``axis``); float32 tensors; node names unique.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Mapping

import numpy as np
import onnx_ir as ir

from bnfold.errors import BnfoldError
from bnfold.passes._util import BnfoldPassResult, Namer, Record, const_array, is_onnx_op, label

logger = logging.getLogger(__name__)

WEIGHT_QMAX = 127
INT32_MAX = 2**31 - 1
ACTIVATION_TYPES = {"uint8": (np.uint8, 0, 255), "int8": (np.int8, -128, 127)}
COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
ACTIVATION_OPS = ("Relu", "Clip", "Min", "Max")
INT8_OPS = ("Add", "GlobalAveragePool", "AveragePool", "Concat")
PASSTHROUGH_OPS = ("MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze")
MIN_OPSET = 13


# --------------------------------------------------------------------------------------------
# Arithmetic


def weight_axis(node: ir.Node) -> int:
    """Axis of the weight (input 1) that holds the output channels."""
    if is_onnx_op(node, "Conv"):
        return 0
    if is_onnx_op(node, "Gemm"):
        return 0 if node.attributes.get_int("transB", 0) else 1
    return 1  # MatMul (K, N)


def weight_scale(w: np.ndarray, axis: int | None) -> np.ndarray:
    """Symmetric int8 scale ``max|W| / 127``, per slice along ``axis`` (or one, if None).

    An all-zero channel gets scale 1 (any scale quantizes it exactly).
    """
    a = np.abs(np.asarray(w, np.float64))
    if axis is None:
        m = np.array(a.max(initial=0.0))
    else:
        m = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1).max(axis=1, initial=0.0)
    return np.where(m > 0, m / WEIGHT_QMAX, 1.0).astype(np.float32)


def _broadcast(v: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None or v.ndim == 0:
        return v
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def quantize_weight(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``(W_q int8, s_w float32)`` with ``W ~ s_w * W_q``; ``axis`` None means per tensor."""
    scale = weight_scale(w, axis)
    s = _broadcast(scale.astype(np.float64), w.ndim, axis)
    q = np.clip(np.round(np.asarray(w, np.float64) / s), -WEIGHT_QMAX, WEIGHT_QMAX)
    return q.astype(np.int8), scale


def fake_quant_weight(w: np.ndarray, axis: int | None) -> np.ndarray:
    """``s_w * W_q``: the weight as the int8 model sees it (float64)."""
    q, scale = quantize_weight(w, axis)
    return q.astype(np.float64) * _broadcast(scale.astype(np.float64), w.ndim, axis)


def activation_qparams(lo: float, hi: float, activation_type: str) -> tuple[np.float32, int]:
    """Asymmetric ``(scale, zero_point)`` for the range ``[lo, hi]`` widened to contain 0."""
    _, qmin, qmax = ACTIVATION_TYPES[activation_type]
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise BnfoldError(f"calibrated range [{lo}, {hi}] is not finite")
    scale = (hi - lo) / (qmax - qmin)
    if scale <= 0 or not np.isfinite(np.float32(scale)) or np.float32(scale) == 0:
        return np.float32(1.0), 0  # an all-zero tensor: any scale is exact
    zp = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    return np.float32(scale), zp


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - x~)^2)`` in dB."""
    ref = np.asarray(reference, np.float64)
    noise = float(np.sum((ref - np.asarray(approx, np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return 10.0 * float(np.log10(signal / noise))


# --------------------------------------------------------------------------------------------
# Plan: which nodes are int8, which tensors get Q/DQ


@dataclasses.dataclass
class NodePlan:
    """What happens to one node: ``int8``, ``fused`` (into ``into``) or ``float``."""

    node: str
    op: str
    status: str
    reason: str | None = None
    into: str | None = None


@dataclasses.dataclass
class Plan:
    """The decision for every node, and the tensors to quantize (in graph order)."""

    nodes: list[NodePlan]
    tensors: list[str]
    passthrough: dict[str, str]  # output tensor -> input tensor whose qparams it reuses

    def status(self) -> dict[str, str]:
        return {p.node: p.status for p in self.nodes}


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.FLOAT


def _compute_reason(node: ir.Node) -> str | None:
    """Why a Conv/Gemm/MatMul cannot be int8, or None if it can."""
    if len(node.inputs) < 2 or const_array(node.inputs[1]) is None:
        return "weight is not a constant initializer"
    if not _is_float(node.inputs[0]) or not _is_float(node.outputs[0]):
        return "not float32"
    if len(node.inputs) > 2 and node.inputs[2] is not None and const_array(node.inputs[2]) is None:
        return "bias is not a constant initializer"
    if is_onnx_op(node, "Gemm") and node.attributes.get_int("transA", 0):
        return "Gemm with transA=1"
    if is_onnx_op(node, "MatMul") and const_array(node.inputs[1]).ndim != 2:
        return "MatMul weight is not 2-D"
    return None


def _constant_bounds(node: ir.Node) -> bool:
    if is_onnx_op(node, "Relu"):
        return True
    if is_onnx_op(node, "Clip"):
        if node.attributes.get("min") is not None or node.attributes.get("max") is not None:
            return True  # opset < 11: bounds are attributes
        return all(v is None or const_array(v) is not None for v in node.inputs[1:])
    # Min/Max: exactly one constant operand.
    consts = [const_array(v) is not None for v in node.inputs]
    return len(node.inputs) == 2 and sum(consts) == 1


def _activation_input(node: ir.Node) -> ir.Value | None:
    """The tensor an activation acts on: input 0, except for a Min/Max whose constant bound
    comes first (``Min(6, x)``, as some exporters write it)."""
    if is_onnx_op(node, "Min", "Max") and len(node.inputs) == 2:
        if const_array(node.inputs[0]) is not None:
            return node.inputs[1]
    return node.inputs[0] if node.inputs else None


def _data_inputs(node: ir.Node) -> list[ir.Value]:
    """Non-constant float inputs (the activations a node reads)."""
    if is_onnx_op(node, *COMPUTE_OPS):
        return [node.inputs[0]]
    if is_onnx_op(node, "Reshape", "Squeeze", "Unsqueeze"):
        # A reshaped constant (Paddle's exported conv bias, Reshape(B, shape) -> Add) is not an
        # activation: no calibrator gives an initializer a range.
        return [node.inputs[0]] if const_array(node.inputs[0]) is None else []
    return [v for v in node.inputs if _is_float(v) and const_array(v) is None]


def plan(model: ir.Model, exclude: Collection[str] = ()) -> Plan:
    """Decide, for every node of the main graph, whether it runs in int8 (see module doc).

    Args:
        model: A folded float32 model.
        exclude: Node names (or labels) to keep in float.
    """
    graph = model.graph
    decided: dict[ir.Node, NodePlan] = {}
    int8: set[ir.Node] = set()
    for node in graph:
        name = label(node)
        if name in exclude or node.name in exclude:
            decided[node] = NodePlan(name, node.op_type, "float", "excluded by the caller")
        elif is_onnx_op(node, *COMPUTE_OPS):
            why = _compute_reason(node)
            decided[node] = NodePlan(name, node.op_type, "float" if why else "int8", why)
        elif is_onnx_op(node, *ACTIVATION_OPS):
            x = _activation_input(node)
            src = x.producer() if x is not None else None
            head = src
            while head is not None and decided.get(head) and decided[head].status == "fused":
                up = _activation_input(head)
                head = up.producer() if up is not None else None
            fusable = (
                src is not None
                and head is not None
                and head in int8
                and is_onnx_op(head, *COMPUTE_OPS)
                and len(x.uses()) == 1
                and not x.is_graph_output()
                and _constant_bounds(node)
                and _is_float(node.outputs[0])
            )
            if fusable:
                decided[node] = NodePlan(name, node.op_type, "fused", into=label(head))
            else:
                why = "not directly after an int8 Conv/Gemm/MatMul"
                if src is not None and len(x.uses()) > 1:
                    why = f"its input has {len(x.uses())} readers"
                decided[node] = NodePlan(name, node.op_type, "float", why)
        elif is_onnx_op(node, *INT8_OPS, *PASSTHROUGH_OPS):
            data = _data_inputs(node)
            if not data:
                decided[node] = NodePlan(name, node.op_type, "float", "reads only constants")
            elif not all(_is_float(v) for v in data) or not _is_float(node.outputs[0]):
                decided[node] = NodePlan(name, node.op_type, "float", "not float32 activations")
            elif is_onnx_op(node, "Add") and len(data) != 2:
                decided[node] = NodePlan(name, node.op_type, "float", "Add of a constant")
            else:
                decided[node] = NodePlan(name, node.op_type, "int8")
        else:
            decided[node] = NodePlan(name, node.op_type, "float", "no int8 kernel")
        if decided[node].status == "int8":
            int8.add(node)

    tensors: list[str] = []
    seen: set[str] = set()
    passthrough: dict[str, str] = {}
    for node in graph:
        if decided[node].status != "int8":
            continue
        for v in _data_inputs(node):
            if v.name not in seen:
                seen.add(v.name)
                tensors.append(v.name)
        if is_onnx_op(node, *PASSTHROUGH_OPS):
            passthrough[node.outputs[0].name] = node.inputs[0].name
    # A pass-through output reuses its input's qparams, so its input must be quantized too
    # (it is: it is that node's data input).
    return Plan(list(decided.values()), tensors, passthrough)


# --------------------------------------------------------------------------------------------
# Rewrite


@dataclasses.dataclass
class TensorQuant:
    """One quantized activation: its range, scale, zero point and the dequantized value's name."""

    name: str
    lo: float
    hi: float
    scale: float
    zero_point: int
    dequantized: str


@dataclasses.dataclass
class WeightQuant:
    """One int8 layer: weight granularity, weight SQNR and what happened to its bias."""

    node: str
    op: str
    per_channel: bool
    weight_sqnr_db: float
    bias: str  # "int32", "float (reason)", "none"


def _value(graph: ir.Graph, namer: Namer, base: str, array: np.ndarray) -> ir.Value:
    name = namer(base)
    v = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(v)
    return v


class QuantizeInt8(ir.passes.InPlacePass):
    """Insert QuantizeLinear/DequantizeLinear pairs and int8 weights (see module doc).

    Args:
        ranges: Calibrated ``(lo, hi)`` of every tensor in :attr:`Plan.tensors`.
        per_channel: Per-output-channel weight scales (else one per tensor).
        activation_type: ``"uint8"`` or ``"int8"``.
        exclude: Node names to keep in float.
    """

    def __init__(
        self,
        ranges: Mapping[str, tuple[float, float]] | None = None,
        per_channel: bool = True,
        activation_type: str = "uint8",
        exclude: Collection[str] = (),
    ) -> None:
        super().__init__()
        if activation_type not in ACTIVATION_TYPES:
            raise BnfoldError(
                f"activation type '{activation_type}' is not one of {list(ACTIVATION_TYPES)}"
            )
        self.ranges = dict(ranges or {})
        self.per_channel = per_channel
        self.activation_type = activation_type
        self.exclude = tuple(exclude)
        self.plan: Plan | None = None
        self.tensors: list[TensorQuant] = []
        self.weights: list[WeightQuant] = []

    def requires(self, model: ir.Model) -> None:
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        if opset < MIN_OPSET:
            raise BnfoldError(f"int8 QDQ needs opset {MIN_OPSET}+, the model has {opset}")

    def call(self, model: ir.Model) -> BnfoldPassResult:
        graph = model.graph
        namer = Namer(graph)
        result = BnfoldPassResult(model, False)
        self.plan = plan(model, self.exclude)
        missing = [t for t in self.plan.tensors if t not in self.ranges]
        missing = [t for t in missing if t not in self.plan.passthrough]
        if missing:
            raise BnfoldError(
                f"no calibrated range for {len(missing)} tensor(s), e.g. {missing[0]}"
            )
        values = {v.name: v for v in graph.inputs}
        for node in graph:
            values.update({v.name: v for v in node.outputs})
        qparams: dict[str, tuple[np.float32, int]] = {}
        for name in self.plan.tensors:
            if name in self.plan.passthrough and self.plan.passthrough[name] in qparams:
                qparams[name] = qparams[self.plan.passthrough[name]]
            else:
                lo, hi = self.ranges[name]
                qparams[name] = activation_qparams(lo, hi, self.activation_type)
        by_name = {label(n): n for n in graph}
        # Weights first: their bias scale needs the input's activation scale.
        for p in self.plan.nodes:
            node = by_name[p.node]
            if p.status == "int8" and is_onnx_op(node, *COMPUTE_OPS):
                self._quantize_weights(graph, namer, node, qparams[node.inputs[0].name][0])
            if p.status == "int8":
                result.changed.append(Record(p.node, p.op, "int8"))
            elif p.status == "fused":
                result.changed.append(Record(p.node, p.op, "fused", into=[p.into or ""]))
            else:
                result.declined.append(Record(p.node, p.op, "float", reason=p.reason))
        for name in self.plan.tensors:
            scale, zp = qparams[name]
            source = name if name in self.ranges else self.plan.passthrough.get(name, name)
            lo, hi = self.ranges.get(source, (0.0, 0.0))
            dq = self._insert_qdq(graph, namer, values[name], scale, zp)
            self.tensors.append(
                TensorQuant(name, float(lo), float(hi), float(scale), int(zp), dq.name)
            )
        result.modified = bool(self.plan.tensors) or bool(self.weights)
        logger.info(
            "quantize_int8: %d int8 nodes, %d fused, %d float, %d tensors quantized",
            sum(p.status == "int8" for p in self.plan.nodes),
            sum(p.status == "fused" for p in self.plan.nodes),
            sum(p.status == "float" for p in self.plan.nodes),
            len(self.plan.tensors),
        )
        return result

    def _insert_qdq(
        self, graph: ir.Graph, namer: Namer, value: ir.Value, scale: np.float32, zp: int
    ) -> ir.Value:
        """``value -> Q -> DQ``; every reader of ``value`` now reads the DQ output."""
        npdt = ACTIVATION_TYPES[self.activation_type][0]
        base = value.name
        users = [(u.node, u.idx) for u in value.uses()]  # before Q becomes a reader too
        s = _value(graph, namer, f"{base}_scale", np.array(scale, np.float32))
        z = _value(graph, namer, f"{base}_zero_point", np.array(zp, npdt))
        q_out = ir.Value(
            name=namer(f"{base}_quantized"),
            shape=value.shape,
            type=ir.TensorType(ir.DataType.from_numpy(np.dtype(npdt))),
        )
        dq_out = ir.Value(name=namer(f"{base}_dequantized"), shape=value.shape, type=value.type)
        q = ir.Node("", "QuantizeLinear", [value, s, z], outputs=[q_out], name=namer(f"{base}_Q"))
        dq = ir.Node(
            "", "DequantizeLinear", [q_out, s, z], outputs=[dq_out], name=namer(f"{base}_DQ")
        )
        producer = value.producer()
        if producer is not None:
            graph.insert_after(producer, [q, dq])
        else:
            graph.insert_before(graph[0], [q, dq])
        for user, idx in users:
            user.replace_input_with(idx, dq_out)
        return dq_out

    def _quantize_weights(
        self, graph: ir.Graph, namer: Namer, node: ir.Node, x_scale: np.float32
    ) -> None:
        name = label(node)
        w = np.asarray(const_array(node.inputs[1]), np.float32)
        axis = weight_axis(node) if self.per_channel else None
        wq, w_scale = quantize_weight(w, axis)
        deq = wq.astype(np.float64) * _broadcast(w_scale.astype(np.float64), w.ndim, axis)
        self.weights.append(
            WeightQuant(name, node.op_type, self.per_channel, sqnr_db(w, deq), "none")
        )
        node.replace_input_with(
            1, self._dq_const(graph, namer, node.inputs[1].name, wq, w_scale, axis)
        )
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        if bias_value is None:
            return
        bias = np.asarray(const_array(bias_value), np.float64)
        n_out = w.shape[axis if axis is not None else weight_axis(node)]
        if is_onnx_op(node, "Gemm"):
            alpha = float(node.attributes.get_float("alpha", 1.0))
            beta = float(node.attributes.get_float("beta", 1.0))
            if alpha != 1.0:
                self.weights[-1].bias = "float (Gemm alpha != 1)"
                return
            if (
                bias.size not in (1, n_out)
                or bias.ndim > 2
                or (bias.ndim == 2 and bias.shape[0] != 1)
            ):
                self.weights[-1].bias = "float (Gemm C is not a per-column vector)"
                return
            bias = np.broadcast_to(bias.reshape(-1), (n_out,)) * beta
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        b_scale = np.float64(x_scale) * np.broadcast_to(w_scale.astype(np.float64), (n_out,))
        bq = np.round(bias.reshape(-1) / b_scale)
        if np.any(np.abs(bq) > INT32_MAX):
            self.weights[-1].bias = "float (int32 bias would overflow)"
            return
        bq = bq.astype(np.int32)
        b_scale32 = b_scale.astype(np.float32)
        b_axis: int | None = 0
        if not self.per_channel:
            b_scale32, b_axis = np.array(b_scale32[0], np.float32), None
        node.replace_input_with(
            2, self._dq_const(graph, namer, bias_value.name, bq, b_scale32, b_axis)
        )
        self.weights[-1].bias = "int32"

    def _dq_const(
        self,
        graph: ir.Graph,
        namer: Namer,
        base: str,
        q: np.ndarray,
        scale: np.ndarray,
        axis: int | None,
    ) -> ir.Value:
        """An initializer ``q`` behind a DequantizeLinear; returns the DQ output."""
        qv = _value(graph, namer, f"{base}_quantized", q)
        sv = _value(graph, namer, f"{base}_scale", np.asarray(scale, np.float32))
        zv = _value(graph, namer, f"{base}_zero_point", np.zeros(np.shape(scale), q.dtype))
        out = ir.Value(
            name=namer(f"{base}_dequantized"),
            shape=ir.Shape(q.shape),
            type=ir.TensorType(ir.DataType.FLOAT),
        )
        attrs = [] if axis is None or np.ndim(scale) == 0 else [ir.AttrInt64("axis", axis)]
        dq = ir.Node(
            "", "DequantizeLinear", [qv, sv, zv], attrs, outputs=[out], name=namer(f"{base}_DQ")
        )
        graph.insert_before(graph[0], dq)
        return out
