"""Accuracy of an int8 model against its fp32 original, on held-out inputs; JSON, PNG, gate.

Per output (onnxruntime, optimizations off, so the QDQ model runs exactly as written; the
metrics are :mod:`bnfold.metrics`, as for ``verify``):

* top-1 agreement: how often the int8 model's top class is the fp32 model's, the argmax over
  the output's class axis (:func:`class_axis`): ``(N, C)`` per sample; ``(N, T, C)`` (a
  sequence of class scores, e.g. a CTC recognizer) per sample and step; ``(N, C, H, W, ...)``
  (a segmentation map, channel-first as ONNX convs write it) per sample and position. An
  output whose class axis has one entry (a single-channel heat map) has no top-1;
* top-5 agreement (``(N, C)`` outputs): how often the fp32 model's top class is among the int8
  model's top 5;
* cosine similarity of each sample's output vector (mean and minimum over samples);
* with labels: the accuracy of both models.

Per quantized tensor: ``SQNR = 10 log10(sum x^2 / sum (x - x~)^2)`` in dB, where ``x`` is the
tensor in the float twin (the folded, equalized fp32 model, which has the int8 model's tensor
names) and ``x~`` its dequantized value in the int8 model. The error is end to end: it holds
every upstream layer's error too, so the curve shows where accuracy is lost. Weight SQNR per
layer comes from the quantization report.

The samples must not be the calibration samples: a range fitted on a sample always covers it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx

from bnfold import ir as bir
from bnfold import metrics
from bnfold.atomic import atomic_path
from bnfold.errors import BnfoldError, CheckFailed
from bnfold.metrics import class_axis  # noqa: F401  (the quant target's, and the tests')
from bnfold.quant.quantize import QuantReport, Runner

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]


@dataclasses.dataclass
class OutputAgreement:
    """fp32 vs int8 on one model output."""

    name: str
    samples: int
    cosine_mean: float
    cosine_min: float
    sqnr_db: float
    top1: float | None = None
    top5: float | None = None
    accuracy_fp32: float | None = None
    accuracy_int8: float | None = None


@dataclasses.dataclass
class Accuracy:
    """The accuracy report: output agreement and per-tensor SQNR (in graph order)."""

    samples: int
    outputs: list[OutputAgreement]
    layers: list[dict[str, Any]]

    @property
    def top1(self) -> float | None:
        """Top-1 agreement of the first output that has a class axis (None if none has)."""
        return next((o.top1 for o in self.outputs if o.top1 is not None), None)

    @property
    def cosine(self) -> float:
        """The smallest mean cosine similarity over the outputs."""
        return min(o.cosine_mean for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["top1"], d["cosine"] = self.top1, self.cosine
        return d

    def table(self) -> str:
        """Plain text: one line per output, then the worst layers by SQNR."""
        lines = [
            f"{'output':<24} {'samples':>7} {'top1':>6} {'top5':>6} {'cos mean':>9} "
            f"{'cos min':>8} {'SQNR dB':>8} {'acc fp32':>8} {'acc int8':>8}"
        ]

        def f(v: float | None, fmt: str = ".3f") -> str:
            return "-" if v is None else format(v, fmt)

        for o in self.outputs:
            lines.append(
                f"{o.name[:24]:<24} {o.samples:>7} {f(o.top1):>6} {f(o.top5):>6} "
                f"{o.cosine_mean:>9.5f} {o.cosine_min:>8.5f} {o.sqnr_db:>8.2f} "
                f"{f(o.accuracy_fp32):>8} {f(o.accuracy_int8):>8}"
            )
        worst = sorted(self.layers, key=lambda r: r["sqnr_db"])[:5]
        if worst:
            lines.append("lowest activation SQNR: " + ", ".join(
                f"{r['tensor']} {r['sqnr_db']:.1f} dB" for r in worst
            ))  # fmt: skip
        return "\n".join(lines)


def evaluate(
    reference: onnx.ModelProto | str | os.PathLike[str],
    int8: onnx.ModelProto,
    report: QuantReport,
    feeds: Sequence[Feeds],
    *,
    labels: np.ndarray | None = None,
    progress: Callable[[int], None] | None = None,
) -> Accuracy:
    """Compare ``int8`` with the fp32 ``reference`` on held-out ``feeds`` (batches).

    Also stores the result in ``report.accuracy``.

    Args:
        reference: The original fp32 model (outputs are compared with it).
        int8: The QDQ model from :func:`bnfold.quant.quantize.quantize`.
        report: Its report (the float twin and the quantized tensors' names).
        feeds: Held-out batches, not the calibration ones.
        labels: Class labels of the samples, in order, for classifier accuracy.
        progress: Called with the number of samples of each batch when it is done.
    """
    if not feeds:
        raise BnfoldError("no evaluation samples")
    ref_proto = reference
    if not isinstance(reference, onnx.ModelProto):
        ref_proto = bir.load_proto(reference, check=False, infer_shapes=False)
    outputs = [o.name for o in int8.graph.output]
    tensors = [t for t in report.tensors if t["name"] not in outputs]
    ref_run = Runner(ref_proto, outputs)
    int8_run = Runner(int8, outputs + [t["dequantized"] for t in tensors])
    twin_run = Runner(report.float_model, [t["name"] for t in tensors]) if tensors else None
    sig = np.zeros(len(tensors))
    noise = np.zeros(len(tensors))
    ref_out: dict[str, list[np.ndarray]] = {n: [] for n in outputs}
    got_out: dict[str, list[np.ndarray]] = {n: [] for n in outputs}
    for feed in feeds:
        r, q = ref_run(feed), int8_run(feed)
        for n in outputs:
            ref_out[n].append(r[n])
            got_out[n].append(q[n])
        if twin_run is not None:
            tw = twin_run(feed)
            for i, t in enumerate(tensors):
                x = tw[t["name"]].astype(np.float64)
                sig[i] += float(np.sum(x * x))
                noise[i] += float(np.sum((x - q[t["dequantized"]]) ** 2))
        if progress is not None:
            progress(int(next(iter(feed.values())).shape[0]))
    samples = sum(int(next(iter(f.values())).shape[0]) for f in feeds)
    agreements = []
    for n in outputs:
        a, b = np.concatenate(ref_out[n]), np.concatenate(got_out[n])
        if not np.all(np.isfinite(b)):
            logger.warning("int8 output %s has NaN/Inf values", n)
        cos = metrics.cosines(a, b)
        diff = a.astype(np.float64) - b
        agr = OutputAgreement(
            n,
            int(a.shape[0]),
            float(np.nanmean(cos)),
            float(np.nanmin(cos)),
            metrics.sqnr_db(float(np.sum(a.astype(np.float64) ** 2)), float(np.sum(diff**2))),
        )
        agr.top1 = metrics.class_agreement(a, b)
        _, agr.top5 = metrics.top_agreement(a, b)
        if a.ndim == 2 and a.shape[1] >= 2:
            top_ref = a.argmax(axis=1)
            if labels is not None:
                lab = np.asarray(labels).reshape(-1)
                if lab.shape[0] != a.shape[0]:
                    raise BnfoldError(f"{lab.shape[0]} labels for {a.shape[0]} samples")
                agr.accuracy_fp32 = float(np.mean(top_ref == lab))
                agr.accuracy_int8 = float(np.mean(b.argmax(axis=1) == lab))
        agreements.append(agr)
    producers = {o: n for n in report.float_model.graph.node for o in n.output}
    # A fused activation's tensor is its layer's output: name the layer (what --exclude takes).
    into = {r["node"]: r["into"] for r in report.layers if r.get("into")}
    layers = [
        {
            "tensor": t["name"],
            "producer": producers[t["name"]].op_type if t["name"] in producers else "input",
            "node": into.get(producers[t["name"]].name, producers[t["name"]].name)
            if t["name"] in producers
            else None,
            "sqnr_db": round(metrics.sqnr_db(s, e), 3),
            "scale": t["scale"],
        }
        for t, s, e in zip(tensors, sig, noise, strict=True)
    ]
    acc = Accuracy(samples, agreements, layers)
    report.accuracy = acc.to_dict()
    return acc


def gate_failures(
    acc: Accuracy, min_top1: float | None = None, min_cosine: float | None = None
) -> list[str]:
    """What fails the accuracy gate (empty when it passes). ``min_cosine`` 0 (or less) or
    None disables the cosine floor."""
    failed = []
    if min_top1 is not None:
        if acc.top1 is None:
            raise BnfoldError(
                "--min-top1-agreement needs an output with a class axis: (N, C), "
                "(N, T, C) or (N, C, H, W) with C > 1"
            )
        if acc.top1 < min_top1:
            failed.append(f"top-1 agreement {acc.top1:.4f} < {min_top1:g}")
    if min_cosine is not None and min_cosine > 0 and acc.cosine < min_cosine:
        failed.append(f"cosine similarity {acc.cosine:.5f} < {min_cosine:g}")
    return failed


def worst_layers(acc: Accuracy, n: int = 3) -> list[dict[str, Any]]:
    """The ``n`` quantized tensors with the lowest SQNR (end to end), lowest first."""
    return sorted(acc.layers, key=lambda r: r["sqnr_db"])[:n]


def gate(
    acc: Accuracy,
    min_top1: float | None = None,
    min_cosine: float | None = None,
    hints: Sequence[str] = (),
) -> None:
    """Raise :class:`CheckFailed` (exit 1) when top-1 agreement or cosine is below its floor;
    its one line names the worst layers by SQNR and ``hints`` (what to try)."""
    failed = gate_failures(acc, min_top1, min_cosine)
    if not failed:
        return
    msg = f"int8 accuracy gate failed on {acc.samples} held-out sample(s): {'; '.join(failed)}"
    worst = worst_layers(acc)
    if worst:
        msg += "; lowest activation SQNR: " + ", ".join(
            f"{r.get('node') or r['tensor']} {r['sqnr_db']:.1f} dB" for r in worst
        )
    if hints:
        msg += f"; try {', '.join(hints)}"
    raise CheckFailed(msg)


def plot_sqnr(report: QuantReport, acc: Accuracy, path: str | os.PathLike[str]) -> None:
    """Write a PNG of per-layer SQNR: activations (end to end) and weights, in graph order."""
    try:
        import matplotlib
    except ImportError:
        raise BnfoldError("the SQNR plot needs matplotlib (pip install matplotlib)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    act = [r["sqnr_db"] for r in acc.layers]
    weights = [(r["node"], r["weight_sqnr_db"]) for r in report.layers if "weight_sqnr_db" in r]
    o = report.options
    fig, ax = plt.subplots(figsize=(max(8.0, 0.14 * max(len(act), len(weights)) + 3), 4.5))
    cap = 80.0  # an exact tensor (infinite SQNR) is drawn at the top of the axis
    if act:
        ax.plot(range(len(act)), [min(v, cap) for v in act], "o-", ms=3, label="activations")
    if weights:
        ax.plot(range(len(weights)), [min(w, cap) for _, w in weights], "s--", ms=3,
                label="weights")  # fmt: skip
    ax.set_xlabel("quantized tensor / layer (graph order)")
    ax.set_ylabel("SQNR (dB)")
    top1 = f", top-1 agreement {acc.top1:.3f}" if acc.top1 is not None else ""
    ax.set_title(
        f"{os.path.basename(report.source)}: int8 "
        f"({'per-channel' if o['per_channel'] else 'per-tensor'}, {o['activation_type']}, "
        f"{o['method']}, CLE {'on' if o['cle'] else 'off'}, bias corr. {o['bias_correction']})"
        f"\n{acc.samples} held-out samples{top1}, cosine {acc.cosine:.4f}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
