"""lift_constants: make every weight a plain initializer before folding.

Exporters hide weights in three ways; each becomes a named initializer, which is what the
folding passes look for:

* ``Constant`` nodes (PP-OCR's paddle2onnx export holds all its weights this way);
* ``Identity`` chains in front of a constant are removed by the next pass, ``remove_identity``;
* for IR version < 4, initializers that the spec required to be listed as graph inputs. They
  are constants by that spec, so they leave the input list (and the IR version becomes 4). From
  IR 4 on, an initializer that is also a graph input is a default a user may override at run
  time, so it is left alone and never treated as a constant.

Preconditions: none. Postcondition: the model computes the same function.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from bnfold.passes._util import BnfoldPassResult, Record, is_onnx_op, label

logger = logging.getLogger(__name__)


class LiftConstants(ir.passes.InPlacePass):
    """Turn Constant nodes and IR<4 weight inputs into initializers."""

    def call(self, model: ir.Model) -> BnfoldPassResult:
        result = BnfoldPassResult(model, False)
        graph = model.graph
        if model.ir_version < 4:
            weights = [v for v in graph.inputs if v.is_initializer()]
            for v in weights:
                graph.inputs.remove(v)
            if weights:
                result.changed.append(
                    Record(
                        f"{len(weights)} initializers",
                        "input",
                        "lifted",
                        reason="IR < 4 listed weights as graph inputs",
                    )
                )
            model.ir_version = 4
            result.modified = True
        constants = [
            n for n in ir.traversal.RecursiveGraphIterator(graph) if is_onnx_op(n, "Constant")
        ]
        lifted = LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        if lifted.modified:
            result.modified = True
            result.changed.extend(
                Record(label(n), "Constant", "lifted") for n in constants if n.graph is None
            )
        logger.info("lift_constants: %d changes", len(result.changed))
        return result
