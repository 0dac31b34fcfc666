"""bnfold: fold BatchNormalization exactly, verify it, and compile ONNX CNNs for edge devices.

The public Python API mirrors the CLI::

    import bnfold
    model = bnfold.load("model.onnx")
    folded, report = bnfold.fold(model)
    bnfold.save(folded, "model.folded.onnx")
    result = bnfold.verify("model.onnx", "model.folded.onnx", random=2)

Heavy modules (onnxruntime, TVM) are imported lazily, inside the functions that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["BnfoldError", "CheckFailed", "__version__", "fold", "load", "save", "verify"]

from bnfold.errors import BnfoldError, CheckFailed

if TYPE_CHECKING:
    import onnx_ir as ir

    from bnfold.check import VerifyResult
    from bnfold.report import FoldReport


def load(path: Any, **kwargs: Any) -> ir.Model:
    """Load and check an ONNX model (weights are normalized by the fold pipeline); see
    :func:`bnfold.ir.load`."""
    from bnfold import ir as _ir

    return _ir.load(path, **kwargs)


def save(model: ir.Model, path: Any, **kwargs: Any) -> None:
    """Save a model atomically and deterministically; see :func:`bnfold.ir.save`."""
    from bnfold import ir as _ir

    _ir.save(model, path, **kwargs)


def fold(model: Any, **kwargs: Any) -> tuple[ir.Model, FoldReport]:
    """Fold every foldable BatchNormalization; see :func:`bnfold.pipeline.fold`."""
    from bnfold import pipeline

    return pipeline.fold(model, **kwargs)


def verify(reference: Any, candidate: Any, **kwargs: Any) -> VerifyResult:
    """Compare two models in onnxruntime (optimizations off); see :func:`bnfold.check.verify`."""
    from bnfold import check

    return check.verify(reference, candidate, **kwargs)
