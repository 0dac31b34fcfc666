"""bnfold's graph passes, one per file; the registry below is the only way they are found.

The registry key, the file name and the CLI name are the same word (``fold_bn`` lives in
``fold_bn.py`` as ``FoldBn``).
"""

from __future__ import annotations

from bnfold.passes.fold_bn import FoldBn
from bnfold.passes.lift_constants import LiftConstants
from bnfold.passes.remove_identity import RemoveIdentity
from bnfold.passes.remove_unused import RemoveUnused

PASSES = {
    "lift_constants": LiftConstants,
    "remove_identity": RemoveIdentity,
    "fold_bn": FoldBn,
    "remove_unused": RemoveUnused,
}

# The default fp32 pipeline, in order.
FP32 = ("lift_constants", "remove_identity", "fold_bn", "remove_unused")

__all__ = ["FP32", "PASSES", "FoldBn", "LiftConstants", "RemoveIdentity", "RemoveUnused"]
