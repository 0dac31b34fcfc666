"""drop_implied_activations: remove an activation that the QuantizeLinear after it already does.

In a QDQ model an activation often sits right before a ``QuantizeLinear`` whose saturation
already clips to the activation's range. ``Q(v) = clip(round(v / s) + z, q_min, q_max)`` is
monotone and saturates, so for every ``v``::

    Q(Relu(v))       == Q(v)   when z == q_min                 (Q maps every v <= 0 to q_min)
    Q(Clip(v, a, b)) == Q(v)   when Q(a) <= q_min and Q(b) >= q_max   (absent bounds: +-inf)
    Q(Min(v, c))     == Q(v)   when Q(c) >= q_max
    Q(Max(v, c))     == Q(v)   when Q(c) <= q_min

Dropping such an activation is exact, and it leaves the integer lowering
(:mod:`bnfold.lower.int8_rules`) the plain pattern ``quantize(conv + bias)``. Chains
(``Clip -> Min -> Q``) go one activation at a time.

Preconditions (else the activation stays): the activation is an ONNX ``Relu``, ``Clip``,
``Min`` or ``Max`` (two inputs), its output is not a graph output and is read only by a
``QuantizeLinear`` as its data input; that quantize's scale and zero point are constant
scalars, the zero point present and 8-bit; every bound the activation has is a constant
scalar (a bound computed at run time is never assumed away; ``Clip``'s ``min``/``max``
attributes before opset 11 count as bounds).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bnfold.passes._util import BnfoldPassResult, Record, const_array, is_onnx_op, label

ACTIVATIONS = ("Relu", "Clip", "Min", "Max")
INT_RANGES = {"uint8": (0, 255), "int8": (-128, 127)}
_ABSENT = object()  # an optional bound the node does not have (as opposed to a non-constant one)


def _scalar(value: ir.Value | None) -> float | None:
    arr = const_array(value)
    return float(arr.reshape(())) if arr is not None and arr.size == 1 else None


def _bound(node: ir.Node, index: int, attr: str) -> float | object | None:
    """The activation's bound at input ``index`` (or attribute ``attr``): a float, ``_ABSENT``,
    or None when it exists but is not a constant scalar."""
    if index < len(node.inputs) and node.inputs[index] is not None:
        return _scalar(node.inputs[index])
    a = node.attributes.get(attr) if attr else None
    return _ABSENT if a is None else float(a.as_float())


def implied(node: ir.Node, q: ir.Node) -> bool:
    """Whether ``Q(node(v)) == Q(v)`` for every ``v`` (see the module docstring)."""
    scale = _scalar(q.inputs[1]) if len(q.inputs) > 1 else None
    zp_value = q.inputs[2] if len(q.inputs) > 2 else None
    zp = const_array(zp_value)
    if scale is None or scale <= 0 or zp is None or zp.size != 1:
        return False
    dtype = np.dtype(zp.dtype).name
    if dtype not in INT_RANGES:
        return False
    qmin, qmax = INT_RANGES[dtype]
    z = int(zp.reshape(()))

    def q_of(v: float) -> float:
        return float(np.round(v / scale) + z)

    if node.op_type == "Relu":
        return z == qmin
    if node.op_type == "Clip":
        lo, hi = _bound(node, 1, "min"), _bound(node, 2, "max")
        if not isinstance(lo, float) and lo is not _ABSENT:
            return False
        if not isinstance(hi, float) and hi is not _ABSENT:
            return False
        return (not isinstance(lo, float) or q_of(lo) <= qmin) and (
            not isinstance(hi, float) or q_of(hi) >= qmax
        )
    if len(node.inputs) != 2:
        return False
    c = _scalar(node.inputs[1])
    if c is None:
        return False
    return q_of(c) >= qmax if node.op_type == "Min" else q_of(c) <= qmin


def _reader(node: ir.Node) -> ir.Node | None:
    """The QuantizeLinear that is the only reader of ``node``'s output, as its data input."""
    out = node.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1:
        return None
    user, index = uses[0]
    return user if is_onnx_op(user, "QuantizeLinear") and index == 0 else None


class DropImpliedActivations(ir.passes.InPlacePass):
    """Remove the activations a following QuantizeLinear already implies (exact)."""

    def call(self, model: ir.Model) -> BnfoldPassResult:
        result = BnfoldPassResult(model, False)
        graph = model.graph
        changed = True
        while changed:  # a chain drops from the quantize backward, one activation per sweep
            changed = False
            for node in list(graph):
                if not is_onnx_op(node, *ACTIVATIONS) or not node.inputs:
                    continue
                q = _reader(node)
                if q is None or not implied(node, q):
                    continue
                q.replace_input_with(0, node.inputs[0])
                graph.remove(node, safe=True)
                result.changed.append(Record(label(node), node.op_type, "removed"))
                result.modified = changed = True
        return result
