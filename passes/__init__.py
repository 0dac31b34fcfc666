"""bnfold's graph passes, one per file; the registry below is the only way they are found.

The registry key, the file name and the CLI name are the same word (``fold_bn`` lives in
``fold_bn.py`` as ``FoldBn``).
"""

from __future__ import annotations

from bnfold.passes.bias_correction import BiasCorrection
from bnfold.passes.drop_implied_activations import DropImpliedActivations
from bnfold.passes.equalize import Equalize
from bnfold.passes.fold_bn import FoldBn
from bnfold.passes.fold_pad import FoldPad
from bnfold.passes.lift_constants import LiftConstants
from bnfold.passes.merge_branches import MergeBranches
from bnfold.passes.quantize_int8 import QuantizeInt8
from bnfold.passes.remove_identity import RemoveIdentity
from bnfold.passes.remove_unused import RemoveUnused

PASSES = {
    "lift_constants": LiftConstants,
    "remove_identity": RemoveIdentity,
    "fold_bn": FoldBn,
    "fold_pad": FoldPad,
    "merge_branches": MergeBranches,
    "remove_unused": RemoveUnused,
    "equalize": Equalize,
    "bias_correction": BiasCorrection,
    "quantize_int8": QuantizeInt8,
    "drop_implied_activations": DropImpliedActivations,
}

# The default fp32 pipeline, in order.
FP32 = (
    "lift_constants",
    "remove_identity",
    "fold_bn",
    "fold_pad",
    "merge_branches",
    "remove_unused",
)
# int8, on the folded graph; driven by bnfold.quant.quantize (needs calibration data).
INT8 = ("equalize", "bias_correction", "quantize_int8")
# Before the integer lowering of a QDQ model (bnfold.lower.compiler, on the frozen graph).
LOWER_INT8 = ("drop_implied_activations",)

__all__ = [
    "FP32",
    "INT8",
    "LOWER_INT8",
    "PASSES",
    "BiasCorrection",
    "DropImpliedActivations",
    "Equalize",
    "FoldBn",
    "FoldPad",
    "LiftConstants",
    "MergeBranches",
    "QuantizeInt8",
    "RemoveIdentity",
    "RemoveUnused",
]
