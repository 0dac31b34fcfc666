"""onnxruntime, set up one way: every session bnfold makes comes from :func:`session`.

The settings, and why:

* graph optimizations **off** unless asked: onnxruntime as the reference runs the model as
  written (its own fusions fold BatchNormalization too and would hide a bug of bnfold's);
  ``optimize=True`` is for timing onnxruntime at its best (``bnfold bench``);
* the CPU provider only: the reference must not depend on which GPU build is installed;
* ``threads``: ``intra_op_num_threads`` (and one inter-op thread), for side-by-side timings at a
  fixed thread count; None: onnxruntime's default;
* log severity 4 (fatal only) by default: its errors reach the user as one
  :class:`~bnfold.errors.BnfoldError` line, not as its own log lines.

onnxruntime is imported inside the functions (it takes a while to import, and ``bnfold --help``
must not pay for it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from bnfold.errors import BnfoldError

FATAL = 4
ERROR = 3


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def session(
    model: bytes | str | os.PathLike[str],
    *,
    optimize: bool = False,
    threads: int | None = None,
    log_severity: int = FATAL,
) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU with bnfold's settings (module doc).

    Args:
        model: The serialized model, or a path to it.
        optimize: onnxruntime's graph optimizations (ORT_ENABLE_ALL) instead of none.
        threads: Intra-op threads (one inter-op thread); None: onnxruntime's default.
        log_severity: onnxruntime's ``log_severity_level``.

    Raises:
        BnfoldError: onnxruntime refuses the model (one line).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = log_severity
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    source = os.fspath(model) if isinstance(model, os.PathLike) else model
    try:
        return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise BnfoldError(f"onnxruntime cannot run the model: {_first_line(e)}") from None


def run(
    sess: Any, feeds: Mapping[str, np.ndarray], names: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Run ``sess`` once; ``{output name: array}`` for ``names`` (default: every output).

    Raises:
        BnfoldError: onnxruntime fails on these feeds (one line).
    """
    names = [o.name for o in sess.get_outputs()] if names is None else list(names)
    try:
        return dict(zip(names, sess.run(names, dict(feeds)), strict=True))
    except Exception as e:
        raise BnfoldError(f"onnxruntime cannot run the model: {_first_line(e)}") from None
