"""Reach a held-out accuracy target by keeping the most damaged tensors in float.

:func:`reach` quantizes, evaluates on held-out samples, and while a target is not met, keeps
more layers in float and quantizes again. The targets (any of them, all must be met):

* ``cosine``: the mean cosine similarity of the int8 and fp32 outputs (the lowest over the
  outputs; ``--target-cosine``);
* ``agreement``: top-1 agreement of int8 with fp32 on the first output that has a class axis
  (``--target-agreement``): the argmax over that axis, per sample for ``(N, C)``, per sample
  and step for ``(N, T, C)``, per sample and position for ``(N, C, H, W, ...)``
  (:func:`bnfold.quant.report.class_axis`). A model without such an output (e.g. a
  single-channel heat map ``(N, 1, H, W)``) is rejected before quantizing
  (:func:`require_class_axis`): there is no class to agree on; use the cosine target there.

Which layers:

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
``max_rounds``; each round is one quantization and one held-out evaluation. The report also
gives ``float_mac_share``: the share of the conv/matmul multiply-accumulates (at batch 1) done
by the nodes kept in float, a static estimate of the latency cost (float MACs cost several
int8 ones on CPUs with int8 dot products); a compiled model's measured latency is the real one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import onnx

from bnfold.errors import BnfoldError
from bnfold.quant.quantize import QuantReport, quantize
from bnfold.quant.report import Accuracy, class_axis, evaluate

logger = logging.getLogger(__name__)

Feeds = dict[str, Any]
METRICS = {"cosine": "cosine", "agreement": "top-1 agreement"}
_NO_CLASS_AXIS = ("--target-agreement needs an output with a class axis ((N, C), (N, T, C) or "
                  "(N, C, H, W) with C > 1)")  # fmt: skip


def require_class_axis(model: onnx.ModelProto) -> None:
    """Reject ``model`` for the agreement target (one-line :class:`BnfoldError`) when no graph
    output can have a class axis, judged from the declared shapes: an output of unknown rank
    passes here (the held-out outputs decide, after the first quantization)."""
    shapes = []
    for out in model.graph.output:
        t = out.type.tensor_type
        if not t.HasField("shape"):
            return
        shape = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if class_axis(shape) is not None:
            return
        shapes.append(f"{out.name} {tuple(shape)}".replace("None", "?"))
    raise BnfoldError(f"{_NO_CLASS_AXIS}; outputs: {', '.join(shapes)}; use --target-cosine")


def scores(acc: Accuracy) -> dict[str, float | None]:
    """The held-out value of each metric a target can name."""
    return {"cosine": acc.cosine, "agreement": acc.top1}


def _shortfall(acc: Accuracy, targets: dict[str, float]) -> float:
    """How far the worst metric is below its target (<= 0: every target is met)."""
    got = scores(acc)
    return max(t - (got[m] if got[m] is not None else -math.inf) for m, t in targets.items())


def mac_share(model: onnx.ModelProto, nodes: Sequence[str]) -> float | None:
    """The share of Conv/ConvTranspose/Gemm/MatMul multiply-accumulates done by ``nodes`` (at
    batch 1; unknown dims count as 1, a node whose shapes have unknown rank is not counted).
    None when the model has none."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # an estimate for the report: go on with the declared shapes
        logger.info("shape inference for the MAC share failed: %s", e)
        inferred = model
    shapes = {}
    for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = [d.dim_value or 1 for d in dims]
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    total = kept = 0
    wanted = set(nodes)
    for node in inferred.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        out, w = shapes.get(node.output[0]), shapes.get(node.input[1])
        if not out or not w:  # unknown rank (a dynamic reshape upstream): not counted
            continue
        n_out = math.prod(out[1:]) if out else 1
        if node.op_type == "Conv":
            macs = n_out * math.prod(w[1:])  # each output: Cin/group * kernel
        elif node.op_type == "ConvTranspose":
            macs = math.prod(shapes.get(node.input[0], [1])[1:]) * math.prod(w[1:])
        else:  # each output: K, from B of shape (..., K, M), or (M, K) with Gemm's transB
            trans = any(a.name == "transB" and a.i for a in node.attribute)  # Gemm only
            macs = n_out * (w[-1] if trans else w[-2] if len(w) >= 2 else w[0])
        total += macs
        kept += macs if node.name in wanted else 0
    return kept / total if total else None


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


def reach(
    model: Any,
    calib_feeds: Sequence[Feeds],
    held_batches: Sequence[Feeds],
    targets: dict[str, float | None],
    first: tuple[onnx.ModelProto, QuantReport, Accuracy],
    max_rounds: int = 6,
    progress: Callable[[int], None] | None = None,
    **options: Any,
) -> tuple[onnx.ModelProto, QuantReport, Accuracy]:
    """Quantize ``model`` with ``options`` (as :func:`bnfold.quant.quantize.quantize`) keeping
    layers in float until the held-out metrics reach ``targets`` (see module doc).

    Args:
        model: The fp32 model (path or proto).
        calib_feeds: Calibration samples.
        held_batches: Held-out batches (never used to calibrate).
        targets: ``{"cosine": x, "agreement": y}``; a missing or None entry is no target.
        first: The result with the caller's options (int8 model, report, accuracy).
        max_rounds: Quantizations to try beyond ``first``.
        progress: Called with each evaluated batch's sample count.

    Returns:
        The result closest to the targets (the first that meets them all, since the search
        stops there). Its report's ``target`` says what was kept in float, the MAC share of
        those nodes, each round's metrics, and whether the targets were met.
    """
    targets = {m: float(t) for m, t in targets.items() if t is not None}
    if unknown := set(targets) - set(METRICS):
        raise BnfoldError(f"unknown target metric(s) {sorted(unknown)}; known: {list(METRICS)}")
    int8, report, acc = first
    if "agreement" in targets and acc.top1 is None:
        shapes = ", ".join(f"{o.name}" for o in acc.outputs)
        raise BnfoldError(f"{_NO_CLASS_AXIS}; outputs: {shapes}; use --target-cosine")
    base = sorted(set(options.pop("exclude", ())))
    kept: list[str] = []  # tensors taken out of int8, in the order chosen
    rounds = [{"float_tensors": [], "float_nodes": [], **scores(acc)}]
    best = (int8, report, acc, 0)
    k = 1
    for _ in range(max_rounds):
        if _shortfall(acc, targets) <= 0:
            break
        loss = local_loss(report, acc)
        fresh = sorted((t for t in loss if t not in kept), key=lambda t: -loss[t])[:k]
        if not fresh:
            break
        kept.extend(fresh)
        chosen = sorted(float_nodes_for(first[1].float_model, kept) - set(base))
        logger.info("targets %s: %d tensors, %d nodes in float", targets, len(kept), len(chosen))
        int8, report = quantize(model, calib_feeds, exclude=[*base, *chosen], **options)
        acc = evaluate(model, int8, report, held_batches, progress=progress)
        rounds.append({"float_tensors": list(kept), "float_nodes": chosen, **scores(acc)})
        if _shortfall(acc, targets) < _shortfall(best[2], targets):
            best = (int8, report, acc, len(rounds) - 1)
        k *= 2
    int8, report, acc, at = best
    report.target = {
        **targets,
        "met": _shortfall(acc, targets) <= 0,
        "float_nodes": rounds[at]["float_nodes"],
        "float_tensors": rounds[at]["float_tensors"],
        "float_mac_share": mac_share(report.float_model, rounds[at]["float_nodes"]),
        "rounds": rounds,
    }
    return int8, report, acc


def summary(target: dict[str, Any]) -> str:
    """One line for the CLI: the targets, met or not, and what was kept in float."""
    goals = ", ".join(f"{METRICS[m]} {target[m]:g}" for m in METRICS if m in target)
    share = target.get("float_mac_share")
    cost = f" ({share:.1%} of the conv/matmul MACs)" if share is not None else ""
    nodes = target["float_nodes"]
    return (f"target {goals} {'met' if target['met'] else 'NOT met'} with {len(nodes)} node(s) "
            f"kept in float{cost}: {', '.join(nodes) or '-'}")  # fmt: skip
