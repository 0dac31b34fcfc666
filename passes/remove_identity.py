"""remove_identity: bypass Identity nodes so that weights and activations are seen directly.

Exporters put ``Identity`` between a weight and its user (PP-OCR, some torch exports) or between
two ops; either hides the pattern the folding passes look for. ``y = Identity(x)`` is removed
and every user of ``y`` reads ``x``. An Identity whose output is a graph output stays (graph
outputs keep their names), as does one inside a subgraph whose input comes from an outer scope.

Preconditions: none. Postcondition: the model computes the same function.
"""

from __future__ import annotations

import onnx_ir as ir

from bnfold.passes._util import BnfoldPassResult, Record, is_onnx_op, label


class RemoveIdentity(ir.passes.InPlacePass):
    """Remove Identity nodes (chains included) whose output is not a graph output."""

    def call(self, model: ir.Model) -> BnfoldPassResult:
        result = BnfoldPassResult(model, False)
        graph = model.graph
        for node in list(graph):
            if not is_onnx_op(node, "Identity") or node.graph is None:
                continue
            src, out = node.inputs[0], node.outputs[0]
            if src is None or out.is_graph_output():
                continue
            ir.convenience.replace_all_uses_with(out, src)
            graph.remove(node, safe=True)
            result.changed.append(Record(label(node), "Identity", "removed"))
            result.modified = True
        return result
