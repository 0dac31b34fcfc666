"""remove_unused: drop nodes and initializers that no graph output depends on.

Folding leaves old weights and the folded nodes' parameters behind; this removes them. Graph
inputs and outputs are never touched (names, order, shapes and types stay as they were).
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from bnfold.passes._util import BnfoldPassResult, Record


class RemoveUnused(ir.passes.InPlacePass):
    """Dead-code elimination over nodes and initializers (onnx_ir's pass, with a record)."""

    def call(self, model: ir.Model) -> BnfoldPassResult:
        nodes = sum(1 for _ in model.graph)
        inits = len(model.graph.initializers)
        inner = RemoveUnusedNodesPass()(model)
        result = BnfoldPassResult(model, inner.modified)
        dropped_nodes = nodes - sum(1 for _ in model.graph)
        dropped_inits = inits - len(model.graph.initializers)
        if dropped_nodes or dropped_inits:
            result.changed.append(
                Record(f"{dropped_nodes} nodes, {dropped_inits} initializers", "-", "removed")
            )
        return result
