"""Reach a held-out accuracy target by keeping the most damaged tensors in float.

:func:`reach_cosine` quantizes, evaluates on held-out samples, and while the mean output cosine
is below the target, keeps more layers in float and quantizes again. Which ones:

* every quantized tensor ``t`` gets its *local loss*, the relative noise power its own layer
  adds: ``L(t) = 10^(-SQNR(t)/10) - 10^(-U(t)/10)``, where ``U(t)`` is the lowest SQNR of the
  quantized tensors its producer reads (walking back through float tensors such as a conv's
  pre-activation output; ``inf``, no noise, at a graph input). The SQNR is end to end, so it
  mostly falls along the graph; ``L`` is the part that ``t``'s layer adds;
* the ``k`` tensors with the largest ``L`` are taken out of int8: their producer and every
  node that reads them stay float, so the tensor is never quantized (a tensor is quantized only
  because an int8 node reads it). ``k`` doubles each round (1, 2, 4, ...), so a target that
  needs many float layers takes few rounds.

The search stops at the target, when nothing is left to keep in float, or after
``max_rounds``; each round is one quantization and one held-out evaluation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import onnx

from bnfold.quant.quantize import QuantReport, quantize
from bnfold.quant.report import Accuracy, evaluate

logger = logging.getLogger(__name__)

Feeds = dict[str, Any]


def local_loss(report: QuantReport, acc: Accuracy) -> dict[str, float]:
    """``{tensor: L(t)}`` for every quantized tensor with a finite SQNR (see module doc)."""
    graph = report.float_model.graph
    producers = {o: n for n in graph.node for o in n.output}
    sqnr = {r["tensor"]: r["sqnr_db"] for r in acc.layers}

    def upstream(name: str, seen: set[str]) -> float:
        node = producers.get(name)
        if node is None:
            return math.inf
        best = math.inf
        for v in node.input:
            if not v or v in seen:
                continue
            seen.add(v)
            best = min(best, sqnr[v] if v in sqnr else upstream(v, seen))
        return best

    def noise(db: float) -> float:
        return 10.0 ** (-db / 10.0) if math.isfinite(db) else (0.0 if db > 0 else math.inf)

    out = {}
    for t, s in sqnr.items():
        if s != math.inf:
            added = noise(s) - noise(upstream(t, {t}))
            out[t] = 0.0 if math.isnan(added) else added  # inf - inf: nothing known to add
    return out


def float_nodes_for(model: onnx.ModelProto, tensors: Sequence[str]) -> set[str]:
    """The nodes to keep in float so that ``tensors`` are never quantized: their producers
    and every reader."""
    names: set[str] = set()
    wanted = set(tensors)
    for node in model.graph.node:
        if wanted.intersection(node.output) or wanted.intersection(node.input):
            names.add(node.name)
    return names


def reach_cosine(
    model: Any,
    calib_feeds: Sequence[Feeds],
    held_batches: Sequence[Feeds],
    target: float,
    first: tuple[onnx.ModelProto, QuantReport, Accuracy],
    max_rounds: int = 6,
    progress: Callable[[int], None] | None = None,
    **options: Any,
) -> tuple[onnx.ModelProto, QuantReport, Accuracy]:
    """Quantize ``model`` with ``options`` (as :func:`bnfold.quant.quantize.quantize`) keeping
    layers in float until the held-out mean cosine reaches ``target`` (see module doc).

    Args:
        model: The fp32 model (path or proto).
        calib_feeds: Calibration samples.
        held_batches: Held-out batches (never used to calibrate).
        target: The mean output cosine to reach.
        first: The result with the caller's options (int8 model, report, accuracy).
        max_rounds: Quantizations to try beyond ``first``.
        progress: Called with each evaluated batch's sample count.

    Returns:
        The result with the highest held-out cosine (the first that meets the target, since
        the search stops there). Its report's ``target`` says what was kept in float, each
        round's cosine, and whether the target was met.
    """
    int8, report, acc = first
    base = sorted(set(options.pop("exclude", ())))
    kept: list[str] = []  # tensors taken out of int8, in the order chosen
    rounds = [{"float_tensors": [], "float_nodes": [], "cosine": acc.cosine, "top1": acc.top1}]
    best = (int8, report, acc, 0)
    k = 1
    for _ in range(max_rounds):
        if acc.cosine >= target:
            break
        loss = local_loss(report, acc)
        fresh = sorted((t for t in loss if t not in kept), key=lambda t: -loss[t])[:k]
        if not fresh:
            break
        kept.extend(fresh)
        chosen = sorted(float_nodes_for(first[1].float_model, kept) - set(base))
        logger.info("target cosine %.4f: %d tensors, %d nodes in float", target, len(kept),
                    len(chosen))  # fmt: skip
        int8, report = quantize(model, calib_feeds, exclude=[*base, *chosen], **options)
        acc = evaluate(model, int8, report, held_batches, progress=progress)
        rounds.append({"float_tensors": list(kept), "float_nodes": chosen, "cosine": acc.cosine,
                       "top1": acc.top1})  # fmt: skip
        if acc.cosine > best[2].cosine:
            best = (int8, report, acc, len(rounds) - 1)
        k *= 2
    int8, report, acc, at = best
    report.target = {
        "cosine": target,
        "met": acc.cosine >= target,
        "float_nodes": rounds[at]["float_nodes"],
        "float_tensors": rounds[at]["float_tensors"],
        "rounds": rounds,
    }
    return int8, report, acc
