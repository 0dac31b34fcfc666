"""Per-layer comparison of two ONNX models (``bnfold verify --per-layer``).

Output-only verification says *that* two models part, not *where*. Here every intermediate float
tensor of the candidate is paired with the reference tensor it computes, both models are run in
onnxruntime (optimizations off) with those tensors as extra outputs, and each pair is measured
like an output (max abs, max rel, cosine; the same gate), in the candidate's graph order. The
first pair past the gate is the first layer where the models part.

Pairing: the same name, as for any two models that share tensor names (like Polygraphy's
``--mark all``), unless the candidate carries bnfold's tensor map (``bnfold.tensor_map``
metadata, written by ``bnfold fold``): a folded conv's output computes the BN's output, a merged
conv's output the Add's, and a conv whose weights absorbed a BN that now lives under another
name computes nothing the original has (it is left out instead of reported as a false mismatch).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from bnfold import ir as bir
from bnfold import onnxrt
from bnfold.atomic import atomic_path
from bnfold.errors import BnfoldError
from bnfold.metrics import OutputMetrics, measure
from bnfold.passes._util import TENSOR_MAP, parse_tensor_map

_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


@dataclasses.dataclass
class Layer:
    """One paired tensor: the candidate's name, the reference's, the candidate op, its metrics."""

    candidate: str
    reference: str
    op: str
    metrics: OutputMetrics


@dataclasses.dataclass
class PerLayer:
    """Every paired tensor in the candidate's graph order."""

    layers: list[Layer]
    atol: float
    rtol: float

    @property
    def first_failure(self) -> Layer | None:
        return next((la for la in self.layers if not la.metrics.passed), None)

    def to_dict(self) -> dict[str, Any]:
        first = self.first_failure
        return {
            "layers": [
                {"candidate": la.candidate, "reference": la.reference, "op": la.op,
                 **{k: v if not isinstance(v, float) or np.isfinite(v) else None
                    for k, v in dataclasses.asdict(la.metrics).items() if k != "name"}}
                for la in self.layers
            ],
            "first_failure": None if first is None else first.candidate,
        }  # fmt: skip

    def table(self) -> str:
        """Plain-text table, then the first layer past the gate."""
        names = [_row_name(la) for la in self.layers]
        width = max([36, *map(len, names)])
        lines = [f"{'layer (candidate tensor)':<{width}} {'op':<14} {'max_abs':>10} "
                 f"{'max_rel':>10} {'cosine':>12}  result"]  # fmt: skip
        for la, name in zip(self.layers, names, strict=True):
            m = la.metrics
            res = "PASS" if m.passed else ("FAIL (NaN/Inf)" if not m.finite else "FAIL")
            lines.append(f"{name:<{width}} {la.op[:14]:<14} {m.max_abs:>10.3g} "
                         f"{m.max_rel:>10.3g} {m.cosine:>12.9f}  {res}")  # fmt: skip
        first = self.first_failure
        lines.append(
            f"{len(self.layers)} layers compared; "
            + ("all within the gate" if first is None else
               f"first past the gate: {first.candidate} ({first.op})")
        )  # fmt: skip
        return "\n".join(lines)


_NAME_WIDTH = 64


def _row_name(layer: Layer) -> str:
    """``candidate=reference`` when it fits, else the candidate alone: the name to look up in
    the candidate model (a mapped reference name, e.g. a folded BN's output, repeats its
    layer's tail). Cut from the left past ``_NAME_WIDTH``: exporters' names differ at the end."""
    name = layer.candidate
    if layer.reference != layer.candidate and len(name) + 1 + len(layer.reference) <= _NAME_WIDTH:
        name += f"={layer.reference}"
    return name if len(name) <= _NAME_WIDTH else "…" + name[-(_NAME_WIDTH - 1) :]


def plot(result: PerLayer, path: str | os.PathLike[str], title: str = "") -> None:
    """Write a PNG of max_abs / max|ref| per layer (log scale, graph order) with the gate."""
    try:
        import matplotlib
    except ImportError:
        raise BnfoldError("the per-layer plot needs matplotlib (pip install matplotlib)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-12  # an exact layer is drawn at the bottom of the axis
    ratio = [max(la.metrics.max_abs / la.metrics.max_ref, floor)
             if la.metrics.max_ref and np.isfinite(la.metrics.max_abs) else 1.0
             for la in result.layers]  # fmt: skip
    fig, ax = plt.subplots(figsize=(max(8.0, 0.14 * len(ratio) + 3), 4.5))
    ax.semilogy(range(len(ratio)), ratio, "o-", ms=3, label="max_abs / max|ref|")
    ax.axhline(result.rtol, color="k", ls="--", lw=1, label=f"gate rtol {result.rtol:g}")
    first = result.first_failure
    if first is not None:
        i = result.layers.index(first)
        ax.plot([i], [ratio[i]], "rs", ms=8, label=f"first past the gate: {first.candidate}")
    ax.set_xlabel("layer (candidate tensor, graph order)")
    ax.set_ylabel("max_abs / max|ref|")
    ax.set_title(title or "per-layer agreement", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _float_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type of every float tensor shape inference knows."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    g = inferred.graph
    return {
        vi.name: vi.type.tensor_type.elem_type
        for vi in (*g.value_info, *g.output)
        if vi.type.tensor_type.elem_type in _FLOATS
    }


def pairs(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> list[tuple[str, str, str]]:
    """(candidate tensor, reference tensor, candidate op) for every intermediate float tensor
    of the candidate that computes a reference tensor, in the candidate's graph order."""
    tmap: Mapping[str, str | None] = {}
    for prop in candidate.metadata_props:
        if prop.key == TENSOR_MAP:
            tmap = parse_tensor_map(prop.value)
    ref_types, cand_types = _float_types(reference), _float_types(candidate)
    found, seen = [], set()
    for node in candidate.graph.node:
        for name in node.output:
            ref = tmap.get(name, name) if name in tmap else name
            if not name or ref is None or ref in seen:
                continue
            if ref_types.get(ref) is not None and cand_types.get(name) == ref_types[ref]:
                found.append((name, ref, node.op_type))
                seen.add(ref)
    return found


def _with_outputs(proto: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    types = _float_types(proto)
    have = {o.name for o in out.graph.output}
    for name in names:
        if name not in have:
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
    return out


def compare(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feed_sets: Sequence[Mapping[str, np.ndarray]],
    atol: float,
    rtol: float,
) -> PerLayer:
    """Run both models with every paired tensor as an output and measure each pair."""
    found = pairs(reference, candidate)
    ref_model = _with_outputs(reference, [r for _, r, _ in found])
    cand_model = _with_outputs(candidate, [c for c, _, _ in found])
    ref_sess = onnxrt.session(bir.to_bytes(ref_model))
    cand_sess = onnxrt.session(bir.to_bytes(cand_model))
    ref_runs = [onnxrt.run(ref_sess, f) for f in feed_sets]
    cand_runs = [onnxrt.run(cand_sess, f) for f in feed_sets]
    ref_out = {k: np.concatenate([r[k] for r in ref_runs]) for k in ref_runs[0]}
    cand_out = {k: np.concatenate([r[k] for r in cand_runs]) for k in cand_runs[0]}
    layers = []
    for c, r, op in found:  # measured exactly as verify measures an output
        if ref_out[r].shape != cand_out[c].shape:
            continue  # a rewrite that changed the layout (not a tensor of the same meaning)
        layers.append(Layer(c, r, op, measure(c, ref_out[r], cand_out[c], atol, rtol)))
    return PerLayer(layers, atol, rtol)
