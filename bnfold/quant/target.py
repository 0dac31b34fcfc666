"""Reach a held-out accuracy target by keeping the most damaged tensors in float.

:func:`reach` quantizes, evaluates on held-out samples, and while a target is not met, keeps
more layers in float and quantizes again. The targets (any of them, all must be met):

* ``cosine``: the mean cosine similarity of the int8 and fp32 outputs (the lowest over the
  outputs; ``--target-cosine``);
* ``agreement``: top-1 agreement of int8 with fp32 on the first output that has a class axis
  (``--target-agreement``): the argmax over that axis, per sample for ``(N, C)``, per sample
  and step for ``(N, T, C)``, per sample and position for ``(N, C, H, W, ...)``
  (:func:`bnfold.metrics.class_axis`). A model without such an output (e.g. a
  single-channel heat map ``(N, 1, H, W)``) is rejected before quantizing
  (:func:`require_class_axis`): there is no class to agree on; use the cosine target there.

Which layers (measured, not estimated):

* the *probe*: up to :data:`PROBE_SAMPLES` calibration samples, spread over the calibration
  set (the held-out samples only ever decide whether a target is met, never the ranking); the
  ranking runs on its first :data:`RANKING_SAMPLES`;
* the *sensitivity* of a quantized tensor ``t`` is the output error that quantizing ``t``
  adds, measured end to end on the probe: ``S(t) = E(int8) - E(int8 computed as if t were
  kept float)`` (:func:`bypass`: t's readers read the float tensor, its producer and readers
  use their float weights; no recalibration), where ``E`` is the relative error energy
  ``sum((fp32 - int8)^2) / sum(fp32^2)`` of the outputs the targets look at (the class output
  for agreement; the worst output for cosine). One onnxruntime run per tensor;
* a round ranks the tensors by ``S`` on the current int8 model and walks down the ranking,
  bypassing one more tensor at a time (one probe run each), until the probe's own metrics
  meet the targets (at least ``round`` tensors a round, so that a held-out shortfall that the
  probe does not show still moves the search). The tensors so chosen are taken out of int8:
  their producer and every node that reads them stay float (a tensor is quantized only
  because an int8 node reads it), the model is quantized again and evaluated on the held-out
  samples. The next round re-measures ``S`` on that model (greedy).

Ranking by a per-tensor SQNR estimate instead (the noise each layer adds, read off the SQNR
along the graph) kept 32 nodes and 46% of the MACs in float for top-1 agreement 0.95 on
MobileNetV2, where a few layers dominate the end-to-end error; the SQNR does not see how much
of a layer's noise reaches the classifier's decision.

The search stops at the target, when nothing is left to keep in float, or after
``max_rounds``; each round is one quantization and one held-out evaluation. The report also
gives ``float_mac_share``: the share of the conv/matmul multiply-accumulates (at batch 1) done
by the nodes kept in float, a static estimate of the latency cost (float MACs cost several
int8 ones on CPUs with int8 dot products); a compiled model's measured latency is the real one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np
import onnx

from bnfold import ir as bir
from bnfold import metrics
from bnfold.errors import BnfoldError
from bnfold.quant import calib
from bnfold.quant.quantize import QuantReport, Runner, quantize
from bnfold.quant.report import Accuracy, class_axis, evaluate

logger = logging.getLogger(__name__)

Feeds = dict[str, Any]
METRICS = {"cosine": "cosine", "agreement": "top-1 agreement"}
PROBE_SAMPLES = 32
# The ranking runs the probe once per quantized tensor: on its first samples only (the walk
# down the ranking, one run per step, uses them all).
RANKING_SAMPLES = 8
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


def _gap(got: dict[str, float | None], targets: dict[str, float]) -> float:
    """How far the worst metric of ``got`` is below its target (<= 0: every target is met)."""
    return max(t - (got[m] if got[m] is not None else -math.inf) for m, t in targets.items())


def _shortfall(acc: Accuracy, targets: dict[str, float]) -> float:
    return _gap(scores(acc), targets)


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


def bypass(
    int8: onnx.ModelProto, twin: onnx.ModelProto, tensors: Sequence[dict[str, Any]]
) -> onnx.ModelProto:
    """A copy of ``int8`` computed as if ``tensors`` (entries of :attr:`QuantReport.tensors`)
    were kept in float the way :func:`reach` keeps them: their readers read the float tensor
    instead of its dequantized value, and their producer and readers
    (:func:`float_nodes_for`) take their float weights and biases from ``twin`` (the float
    twin) instead of the dequantized int8 ones. Nothing is quantized again."""
    out = onnx.ModelProto()
    out.CopyFrom(int8)
    to_float = {t["dequantized"]: t["name"] for t in tensors}
    keep = float_nodes_for(twin, list(to_float.values()))
    twin_nodes = {n.name: n for n in twin.graph.node}
    twin_inits = {i.name: i for i in twin.graph.initializer}
    inits = {i.name for i in out.graph.initializer}
    weight_dq = {n.output[0] for n in out.graph.node
                 if n.op_type == "DequantizeLinear" and n.input[0] in inits}  # fmt: skip
    for node in out.graph.node:
        for i, name in enumerate(node.input):
            if name in to_float:
                node.input[i] = to_float[name]
            elif name in weight_dq and node.name in keep and node.name in twin_nodes:
                twin_inputs = twin_nodes[node.name].input
                # An input the twin's node lacks (the bias that bias correction gave a conv
                # without one) or that is not a constant there keeps its dequantized value.
                original = twin_inputs[i] if i < len(twin_inputs) else ""
                if original not in twin_inits:
                    continue
                if original not in inits:
                    out.graph.initializer.append(twin_inits[original])
                    inits.add(original)
                node.input[i] = original
    return out


class Probe:
    """A few calibration samples, the fp32 outputs on them, and the metrics of a model there."""

    def __init__(self, model: Any, calib_feeds: Sequence[Feeds], targets: dict[str, float]) -> None:
        proto = model if isinstance(model, onnx.ModelProto) else bir.load_proto(
            model, check=False, infer_shapes=False)  # fmt: skip
        step = max(1, len(calib_feeds) // PROBE_SAMPLES)
        picked = list(calib_feeds[::step][:PROBE_SAMPLES])
        specs = calib.input_specs(proto)
        self.batches = calib.batches(picked, specs, 8)
        self.few = calib.batches(picked[:RANKING_SAMPLES], specs, 8)
        self.outputs = [o.name for o in proto.graph.output]
        self.ref = self._run(proto, self.batches)
        self.ref_few = self._run(proto, self.few)
        self.targets = targets
        self.watched = self.outputs
        if set(targets) == {"agreement"}:  # the class output only
            self.watched = [n for n in self.outputs if class_axis(self.ref[n].shape) is not None]
            self.watched = self.watched[:1] or self.outputs

    def _run(self, model: onnx.ModelProto, batches: Sequence[Feeds]) -> dict[str, np.ndarray]:
        run = Runner(model, self.outputs)
        got = [run(b) for b in batches]
        return {n: np.concatenate([g[n] for g in got]) for n in self.outputs}

    def measure(self, model: onnx.ModelProto, few: bool = False) -> tuple[float, float]:
        """``(E, shortfall)`` of ``model`` on the probe (``few``: on its first
        :data:`RANKING_SAMPLES` samples): its relative output error energy and how far its
        worst metric is below its target (<= 0: met there)."""
        ref = self.ref_few if few else self.ref
        got = self._run(model, self.few if few else self.batches)
        err = 0.0
        for n in self.watched:
            r, g = ref[n].astype(np.float64), got[n].astype(np.float64)
            err = max(err, float(np.sum((r - g) ** 2) / max(np.sum(r * r), 1e-30)))
        cos = min(float(np.nanmean(metrics.cosines(ref[n], got[n]))) for n in self.outputs)
        agreements = (metrics.class_agreement(ref[n], got[n]) for n in self.outputs)
        agr = next((a for a in agreements if a is not None), None)
        return err, _gap({"cosine": cos, "agreement": agr}, self.targets)


def sensitivity(
    probe: Probe, int8: onnx.ModelProto, report: QuantReport, skip: Collection[str] = ()
) -> dict[str, float]:
    """``{tensor: S(t)}`` (see module doc) for every quantized tensor of ``int8`` that is not
    a graph output and not in ``skip``."""
    outputs = {o.name for o in int8.graph.output}
    base, _ = probe.measure(int8, few=True)
    out = {}
    for t in report.tensors:
        if t["name"] in outputs or t["name"] in skip:
            continue
        err, _ = probe.measure(bypass(int8, report.float_model, [t]), few=True)
        out[t["name"]] = base - err
    return out


def walk(
    probe: Probe,
    int8: onnx.ModelProto,
    report: QuantReport,
    ranked: Sequence[str],
    at_least: int,
) -> list[str]:
    """The head of ``ranked`` that, bypassed together, meets the targets on the probe (at
    least ``at_least`` tensors; all of ``ranked`` when even that does not)."""
    records = {t["name"]: t for t in report.tensors}
    chosen: list[str] = []
    for name in ranked:
        chosen.append(name)
        if len(chosen) < at_least:
            continue
        chosen_records = [records[n] for n in chosen]
        _, short = probe.measure(bypass(int8, report.float_model, chosen_records))
        if short <= 0:
            break
    return chosen


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
    probe: Probe | None = None
    for round_ in range(1, max_rounds + 1):
        if _shortfall(acc, targets) <= 0:
            break
        probe = probe or Probe(model, calib_feeds, targets)
        sens = sensitivity(probe, int8, report, skip=kept)
        ranked = sorted((t for t in sens if sens[t] > 0), key=lambda t: -sens[t])
        if not ranked:
            break
        fresh = walk(probe, int8, report, ranked, round_)
        kept.extend(fresh)
        chosen = sorted(float_nodes_for(first[1].float_model, kept) - set(base))
        logger.info("targets %s: %d tensors, %d nodes in float", targets, len(kept), len(chosen))
        int8, report = quantize(model, calib_feeds, exclude=[*base, *chosen], **options)
        acc = evaluate(model, int8, report, held_batches, progress=progress)
        rounds.append({"float_tensors": list(kept), "float_nodes": chosen, **scores(acc),
                       "sensitivity": {t: sens[t] for t in fresh}})  # fmt: skip
        if _shortfall(acc, targets) < _shortfall(best[2], targets):
            best = (int8, report, acc, len(rounds) - 1)
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
