"""How two outputs are compared: one implementation for ``verify``, ``compile``'s verification,
``verify --per-layer`` and the int8 accuracy report.

For a reference ``a`` and a candidate ``b`` of the same shape (computed in float64):

* ``max_abs = max |a - b|``;
* ``max_rel = max |a - b| / max(|a|, 1e-3 max|a|)``: element-wise, with the denominator floored
  so that near-zero elements do not dominate;
* :func:`cosine`: of the whole tensors, each scaled to max 1 first (the same angle, and no
  overflow in the dot product); 1 when both are zero;
* :func:`cosines`: one per sample (rows along the first axis), for the int8 report's mean and
  minimum;
* :func:`sqnr_db`: ``10 log10(sum a^2 / sum (a - b)^2)``, infinite when the two are equal;
* :func:`top_agreement`: for classifier-shaped outputs ``(N, K)``, ``K >= 2``: how often ``b``'s
  top class is ``a``'s (top-1), and how often ``a``'s top class is among ``b``'s top 5 (top-5,
  ``K >= 5``).

The verification gate (:func:`measure`): every value finite and
``max_abs <= atol + rtol * max|a|``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from bnfold.errors import BnfoldError


@dataclasses.dataclass
class OutputMetrics:
    """Agreement of one output (or one intermediate tensor) with its reference."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    max_ref: float
    cosine: float
    finite: bool
    top1: float | None = None
    top5: float | None = None
    passed: bool = False


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two whole tensors (float64), each scaled to max 1 first."""
    sa, sb = (x.ravel() / top if (top := np.max(np.abs(x))) > 0 else x.ravel() for x in (a, b))
    na, nb = np.linalg.norm(sa), np.linalg.norm(sb)
    return float(np.dot(sa, sb) / (na * nb)) if na > 0 and nb > 0 else float(na == nb)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity per sample (the first axis), in float64; 1 where both are zero."""
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.sum(a * b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((na > 0) & (nb > 0), dot / (na * nb), (na == nb).astype(np.float64))


def sqnr_db(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)`` of two powers (sums of squares): ``inf`` without noise,
    ``-inf`` without signal."""
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def class_axis(shape: Sequence[int | str | None]) -> int | None:
    """The axis a top-1 agreement takes the argmax over, for an output of ``shape``: 1 for rank
    2 (``(N, C)``) and for rank 4 or more (``(N, C, H, W)``: per position), 2 for rank 3
    (``(N, T, C)``: per step, e.g. a CTC recognizer); None for rank 0-1 or when that axis has a
    single entry (a one-channel heat map). Unknown dims (str/None) count as more than one."""
    rank = len(shape)
    if rank < 2:
        return None
    axis = 2 if rank == 3 else 1
    return None if shape[axis] == 1 else axis


def class_agreement(ref: np.ndarray, got: np.ndarray) -> float | None:
    """How often ``got``'s top class is ``ref``'s, over :func:`class_axis` (per sample, step or
    position); None for an output without a class axis."""
    axis = class_axis(ref.shape)
    if axis is None:
        return None
    return float(np.mean(np.argmax(ref, axis=axis) == np.argmax(got, axis=axis)))


def top_agreement(ref: np.ndarray, got: np.ndarray) -> tuple[float | None, float | None]:
    """``(top-1, top-5)`` agreement of a classifier-shaped output ``(N, K)``; None where it
    does not apply (not 2-D, ``K < 2``; top-5 needs ``K >= 5``)."""
    if ref.ndim != 2 or ref.shape[1] < 2:
        return None, None
    top_ref = np.argmax(ref, axis=1)
    top1 = float(np.mean(top_ref == np.argmax(got, axis=1)))
    if ref.shape[1] < 5:
        return top1, None
    top5 = np.argsort(-got, axis=1)[:, :5]
    return top1, float(np.mean([t in row for t, row in zip(top_ref, top5, strict=True)]))


def measure(name: str, ref: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> OutputMetrics:
    """Every metric of the module doc for one output, and the gate.

    Raises:
        BnfoldError: Not tensors (a sequence or map output), or different shapes.
    """
    for what, value in (("reference", ref), ("candidate", got)):
        if not isinstance(value, np.ndarray | np.generic):
            raise BnfoldError(
                f"output '{name}' of the {what} is a {type(value).__name__}, not a tensor "
                "(a sequence or map output): verify compares tensor outputs only"
            )
    if np.shape(ref) != np.shape(got):
        raise BnfoldError(f"output '{name}': shapes differ, {np.shape(ref)} vs {np.shape(got)}")
    a = np.asarray(ref, np.float64)
    b = np.asarray(got, np.float64)
    finite = bool(np.all(np.isfinite(a)) and np.all(np.isfinite(b)))
    if not finite or a.size == 0:
        nan = float("nan")
        return OutputMetrics(name, tuple(a.shape), nan, nan, nan, nan, finite, passed=finite)
    with np.errstate(over="ignore"):  # outputs near the float64 max: an Inf error is FAIL
        diff = np.abs(a - b)
    max_ref = float(np.max(np.abs(a)))
    floor = max(1e-3 * max_ref, np.finfo(np.float64).tiny)
    max_rel = float(np.max(diff / np.maximum(np.abs(a), floor)))
    m = OutputMetrics(name, tuple(a.shape), float(diff.max()), max_rel, max_ref, cosine(a, b),
                      finite)  # fmt: skip
    m.top1, m.top5 = top_agreement(a, b)
    m.passed = m.max_abs <= atol + rtol * max_ref
    return m
