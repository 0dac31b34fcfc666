"""fold_pad: fold a constant zero ``Pad`` into the padding of the Conv or pool that follows it.

Exporters write explicit padding as a ``Pad`` node (torch's ``F.pad``, TF-"same" padding ported
to torch), which costs a full copy of the activation and hides the padding from the conv
schedules. A Conv pads with zeros, so::

    Conv(Pad(x, p, value=0), pads=q)  ==  Conv(x, pads=q + p)

where ``p`` is the Pad's amounts on the spatial axes, in the Conv's layout
``[x1_begin, x2_begin, ..., x1_end, x2_end, ...]``. The same holds for

* ``AveragePool`` with ``count_include_pad=1`` (its padding is zeros that count in the divisor,
  as the Pad's zeros did); with ``count_include_pad=0`` the divisor would change: declined;
* ``MaxPool`` only where the input is known non-negative (the output of Relu, Sigmoid,
  HardSigmoid, Softplus, Abs, Exp, or a Clip with a constant min >= 0): MaxPool pads with
  -inf, so a zero from the Pad wins a window over negative values. Where every window holds at
  least one real element (dilations 1, floor mode, total pads < kernel) and the real values
  are >= 0, max(real values, zeros) == max(real values, -inf). Elsewhere declined.

Preconditions (each one that fails is reported as the reason): ``mode`` is ``constant``; the
value (``value`` attribute before opset 11, ``constant_value`` input from 11) is absent or a
constant 0; the amounts (``pads`` attribute before opset 11, input from 11, with ``axes`` from
18) are constant, non-negative, and zero on the batch and channel axes; the Pad's output has a
single consumer, which reads it as its data input; the rank matches the consumer's kernel; the
consumer's ``auto_pad`` is ``NOTSET`` or ``VALID`` (``SAME_*`` derives its pads from the padded
shape); pools: ``ceil_mode=0`` (the last window would move) and total pads < kernel
(onnxruntime refuses larger pool pads); MaxPool: the ``Indices`` output is unused.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from bnfold.ir import default_opset
from bnfold.passes._util import (
    BnfoldPassResult,
    Declined,
    Record,
    const_array,
    is_onnx_op,
    label,
    single_use,
)

logger = logging.getLogger(__name__)

CONSUMERS = ("Conv", "AveragePool", "MaxPool")
NON_NEGATIVE = ("Relu", "Sigmoid", "HardSigmoid", "Softplus", "Abs", "Exp")


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def pad_amounts(node: ir.Node, opset: int) -> np.ndarray:
    """The Pad's amounts over every axis, ``[begin..., end...]``; Declined unless it is a
    constant, non-negative zero padding."""
    mode = node.attributes.get_string("mode", "constant")
    if mode != "constant":
        raise Declined(f"mode {mode} is not constant")
    if opset < 11:
        value = float(node.attributes.get_float("value", 0.0))
        pads = node.attributes.get_ints("pads")
        if pads is None:
            raise Declined("Pad has no pads attribute")
        amounts = np.asarray(pads, np.int64)
    else:
        value_input = _input(node, 2)
        value = 0.0
        if value_input is not None:
            v = const_array(value_input)
            if v is None or v.size != 1:
                raise Declined("constant_value is not a constant scalar")
            value = float(v.reshape(-1)[0])
        pads_input = _input(node, 1)
        p = const_array(pads_input)
        if p is None:
            raise Declined("pads are not a constant (computed in the graph)")
        amounts = np.asarray(p, np.int64).reshape(-1)
        axes_input = _input(node, 3)
        if axes_input is not None:
            amounts = _spread_over_axes(amounts, axes_input, node)
    if value != 0.0:
        raise Declined(f"pads with {value:g}, not 0")
    if amounts.size % 2:
        raise Declined(f"{amounts.size} pads are not begin/end pairs")
    if np.any(amounts < 0):
        raise Declined("negative pads (a crop)")
    return amounts


def _spread_over_axes(amounts: np.ndarray, axes_input: ir.Value, node: ir.Node) -> np.ndarray:
    """Opset 18's ``axes``: the amounts of the listed axes, spread over every axis."""
    axes = const_array(axes_input)
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    if axes is None or rank is None:
        raise Declined("axes are not constant or the input rank is unknown")
    axes = [int(a) + rank if a < 0 else int(a) for a in axes.reshape(-1)]
    if amounts.size != 2 * len(axes) or len(set(axes)) != len(axes):
        raise Declined("pads do not match axes")
    if any(not 0 <= a < rank for a in axes):
        raise Declined(f"axes {axes} out of range for rank {rank}")
    full = np.zeros(2 * rank, np.int64)
    for i, a in enumerate(axes):
        full[a], full[rank + a] = amounts[i], amounts[len(axes) + i]
    return full


def _non_negative(value: ir.Value) -> bool:
    producer = value.producer()
    if producer is None:
        return False
    if is_onnx_op(producer, *NON_NEGATIVE):
        return True
    if is_onnx_op(producer, "Clip"):
        if "min" in producer.attributes:  # opset < 11
            return producer.attributes.get_float("min") >= 0
        low = const_array(_input(producer, 1))
        return low is not None and low.size == 1 and float(low.reshape(-1)[0]) >= 0
    return False


def consumer_pads(pad: ir.Node, spatial: np.ndarray) -> tuple[ir.Node, np.ndarray]:
    """The consumer that absorbs ``spatial`` (the Pad's spatial amounts, Conv layout), and the
    pads it would have; Declined with the reason where it cannot."""
    out = pad.outputs[0]
    if not single_use(out):
        raise Declined("Pad output has other consumers (or is a graph output)")
    use = next(iter(out.uses()))
    node = use.node
    if not is_onnx_op(node, *CONSUMERS) or use.idx != 0:
        raise Declined(f"consumer {node.op_type} is not the data input of Conv/AveragePool/MaxPool")
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        raise Declined(f"{node.op_type} auto_pad={auto_pad} derives its pads from the input shape")
    kernel = node.attributes.get_ints("kernel_shape")
    if kernel is None and is_onnx_op(node, "Conv"):
        w = _input(node, 1)
        kernel = list(w.shape)[2:] if w is not None and w.shape is not None else None
    if kernel is None or len(kernel) != spatial.size // 2:
        raise Declined(f"{node.op_type} kernel rank does not match the Pad's spatial axes")
    n = len(kernel)
    old = node.attributes.get_ints("pads") if auto_pad == "NOTSET" else None
    if old is not None and len(old) != 2 * n:
        raise Declined(f"{node.op_type} has {len(old)} pads for {n} spatial axes")
    pads = np.asarray(old if old is not None else [0] * 2 * n, np.int64) + spatial
    if is_onnx_op(node, "Conv"):
        return node, pads
    if node.attributes.get_int("ceil_mode", 0):
        raise Declined(f"{node.op_type} ceil_mode=1: the last window would move")
    if np.any(pads >= np.tile(np.asarray(kernel, np.int64), 2)):
        raise Declined(f"{node.op_type} pads would reach the kernel size")
    if is_onnx_op(node, "AveragePool") and not node.attributes.get_int("count_include_pad", 0):
        raise Declined("AveragePool count_include_pad=0 would leave the Pad's zeros out")
    if is_onnx_op(node, "MaxPool"):
        if any(d != 1 for d in node.attributes.get_ints("dilations", [1] * n)):
            raise Declined("MaxPool with dilations")
        if (
            len(node.outputs) > 1
            and node.outputs[1] is not None
            and (node.outputs[1].uses() or node.outputs[1].is_graph_output())
        ):
            raise Declined("MaxPool Indices output is used")
        if not _non_negative(pad.inputs[0]):
            raise Declined("MaxPool pads with -inf: the input is not known non-negative")
    return node, pads


def plan(pad: ir.Node, opset: int) -> tuple[ir.Node, np.ndarray]:
    """Does the fold apply: the consumer and its new pads, or Declined with the reason."""
    if pad.inputs[0] is None:
        raise Declined("Pad has no data input")
    amounts = pad_amounts(pad, opset)
    rank = amounts.size // 2
    if rank < 3:
        raise Declined(f"rank {rank} has no spatial axes")
    if np.any(amounts[[0, 1, rank, rank + 1]]):
        raise Declined("pads the batch or channel axis")
    spatial = np.concatenate([amounts[2:rank], amounts[rank + 2 :]])
    return consumer_pads(pad, spatial)


def rewrite(graph: ir.Graph, pad: ir.Node, consumer: ir.Node, pads: np.ndarray) -> None:
    """The consumer reads the Pad's input with the combined pads; the Pad goes."""
    consumer.attributes["pads"] = ir.AttrInt64s("pads", [int(p) for p in pads])
    if "auto_pad" in consumer.attributes:
        consumer.attributes["auto_pad"] = ir.AttrString("auto_pad", "NOTSET")
    consumer.replace_input_with(0, pad.inputs[0])
    graph.remove(pad, safe=True)


class FoldPad(ir.passes.InPlacePass):
    """Fold constant zero Pads into the following Conv / AveragePool / MaxPool's pads.

    Each Pad of the main graph is in the result's ``changed`` (``folded`` into its consumer) or
    ``declined`` (kept, with the reason).
    """

    def call(self, model: ir.Model) -> BnfoldPassResult:
        result = BnfoldPassResult(model, False)
        graph = model.graph
        opset = default_opset(model)
        for pad in list(graph):
            if not is_onnx_op(pad, "Pad"):
                continue
            name = label(pad)
            try:
                consumer, pads = plan(pad, opset)
            except Declined as e:
                result.declined.append(Record(name, "Pad", "kept", reason=str(e)))
                logger.debug("kept %s: %s", name, e)
                continue
            rewrite(graph, pad, consumer, pads)
            result.changed.append(Record(name, "Pad", "folded", "forward", [label(consumer)]))
            result.modified = True
            logger.debug("folded %s into %s", name, label(consumer))
        for node in ir.traversal.RecursiveGraphIterator(graph):
            if node.graph is not graph and is_onnx_op(node, "Pad"):
                reason = "inside a subgraph (If/Loop/Scan body); not folded"
                result.declined.append(Record(label(node), "Pad", "kept", reason=reason))
        return result
