"""Post-training int8 quantization: fold, equalize, calibrate, correct biases, write QDQ.

The pipeline, each step named and logged::

    load -> name nodes -> keep BN statistics -> fold_bn -> equalize (CLE)
         -> float twin -> plan -> calibrate (onnxruntime) -> bias_correction -> quantize_int8

Folding comes first because it is what makes the rest possible: with BN folded, a conv's
weights are the weights that are quantized (and can be equalized), and its output is the tensor
that feeds the activation, so no un-normalized conv output has to be quantized per tensor.

The *float twin* is the folded (and equalized) float model, saved before bias correction: it
computes what the original model computes (exactly, up to float rounding), and its tensors have
the names of the int8 model's tensors, so it is what per-layer SQNR compares against.

Activation ranges come from onnxruntime's calibrators (``minmax``, ``percentile``,
``entropy``), run on the float twin.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from bnfold import ir as bir
from bnfold import onnxrt, pipeline
from bnfold.errors import BnfoldError
from bnfold.passes._util import Namer, is_onnx_op, label
from bnfold.passes.bias_correction import (
    BiasCorrection,
    analytic_window_means,
    collect_window_means,
    corrected_layers,
)
from bnfold.passes.equalize import BN_STATS_KEY, Equalize
from bnfold.passes.quantize_int8 import ACTIVATION_TYPES, MIN_OPSET, QuantizeInt8, plan
from bnfold.quant import calib
from bnfold.quant.options import BIAS_CORRECTION, DEFAULTS, METHODS
from bnfold.steps import Steps

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
Progress = Callable[[str, int, int], None]


@dataclasses.dataclass
class QuantReport:
    """What :func:`quantize` did: every node's fate, every quantized tensor, CLE, bias
    correction; ``accuracy`` is filled by :func:`bnfold.quant.report.evaluate`.

    ``float_model`` (not serialized) is the float twin: see the module doc.
    """

    source: str
    options: dict[str, Any]
    calibration_samples: int = 0
    batchnorms: dict[str, int] = dataclasses.field(default_factory=dict)
    layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    tensors: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    equalization: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    equalization_declined: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    bias_correction: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    accuracy: dict[str, Any] | None = None
    target: dict[str, Any] | None = None  # filled by bnfold.quant.target
    float_model: onnx.ModelProto | None = dataclasses.field(default=None, repr=False)

    def counts(self) -> dict[str, int]:
        """Nodes by fate: ``int8``, ``fused`` (activation inside an int8 layer), ``float``."""
        out = {"int8": 0, "fused": 0, "float": 0}
        for layer in self.layers:
            out[layer["status"]] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.pop("float_model")
        d["counts"] = self.counts()
        return d

    def table(self) -> str:
        """Per-node table (int8 layers, float nodes and why), then totals."""
        rows = [("node", "op", "status", "weights / reason")]
        for layer in self.layers:
            if layer["status"] == "int8" and "weight_sqnr_db" in layer:
                detail = (
                    f"{'per-channel' if layer['per_channel'] else 'per-tensor'} weights "
                    f"SQNR {layer['weight_sqnr_db']:.1f} dB, bias {layer['bias']}"
                )
            elif layer["status"] == "fused":
                detail = f"into {layer['into']}"
            else:
                detail = layer.get("reason") or ""
            rows.append((layer["node"], layer["op"], layer["status"], detail))
        w0 = min(max(len(r[0]) for r in rows), 56)
        w1 = max(len(r[1]) for r in rows)
        lines = [f"{a[-w0:]:<{w0}}  {b:<{w1}}  {c:<6}  {d}" for a, b, c, d in rows]
        lines.insert(1, "-" * min(w0 + w1 + 60, 120))
        c = self.counts()
        o = self.options
        lines.append("")
        lines.append(
            f"nodes: {c['int8']} int8, {c['fused']} fused activations, {c['float']} float; "
            f"{len(self.tensors)} activation tensors quantized ({o['activation_type']}, "
            f"{o['method']}, {self.calibration_samples} calibration samples)"
        )
        bc = self.bias_correction
        lines.append(
            f"CLE: {len(self.equalization)} pairs equalized; bias correction "
            f"({bc.get('mode', 'none')}): {len(bc.get('corrected', []))} layers"
        )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# onnxruntime helpers


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs are ``names`` (float tensors) instead."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    for name in names:
        out.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        )
    return out


class Runner:
    """An onnxruntime session (optimizations off) that returns chosen tensors by name.

    Graph inputs are answered from the feed itself (ORT cannot output an input).
    """

    def __init__(self, model: onnx.ModelProto, names: Sequence[str]) -> None:
        inputs = {i.name for i in model.graph.input}
        self.names = list(names)
        self._computed = [n for n in self.names if n not in inputs]
        proto = with_outputs(model, self._computed) if self._computed else None
        self._sess = onnxrt.session(proto.SerializeToString()) if proto is not None else None

    def __call__(self, feed: Feeds) -> dict[str, np.ndarray]:
        got: dict[str, np.ndarray] = {}
        if self._sess is not None:
            got = onnxrt.run(self._sess, feed, self._computed)
        got.update({k: v for k, v in feed.items() if k in self.names})
        return {n: got[n] for n in self.names}


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: Sequence[Feeds], done: Callable[[int], None] | None) -> None:
        self._it = iter(feeds)
        self._done = done
        self._last = 0

    def get_next(self) -> Feeds | None:
        if self._done is not None and self._last:
            self._done(self._last)
        feed = next(self._it, None)
        self._last = int(next(iter(feed.values())).shape[0]) if feed else 0
        return feed


def _chunks(feeds: Sequence[Feeds], size: int) -> list[list[Feeds]]:
    """Runs of up to ``size`` feeds with one batch size each (the histogram calibrators stack
    a chunk's outputs into one array)."""
    out: list[list[Feeds]] = []
    for feed in feeds:
        n = next(iter(feed.values())).shape[0]
        last = out[-1] if out else None
        if last and len(last) < size and next(iter(last[0].values())).shape[0] == n:
            last.append(feed)
        else:
            out.append([feed])
    return out


def calibrate(
    float_model: onnx.ModelProto,
    feeds: Sequence[Feeds],
    tensors: Sequence[str],
    method: str = DEFAULTS.method,
    percentile: float = DEFAULTS.percentile,
    progress: Callable[[int], None] | None = None,
) -> dict[str, tuple[float, float]]:
    """Activation ranges ``{tensor: (lo, hi)}`` from onnxruntime's calibrator for ``method``.

    The calibrators are asymmetric here (post-ReLU tensors would waste half of the int8 grid
    on a symmetric range). Feeds are handed over in chunks, so the histogram calibrators keep
    only one chunk of activations in memory at a time.
    """
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    if method not in methods:
        raise BnfoldError(f"calibration method '{method}' is not one of {', '.join(METHODS)}")
    wanted = set(tensors)
    # The calibrators select the inputs and outputs of nodes of these types.
    op_types = sorted(
        {n.op_type for n in float_model.graph.node if wanted.intersection(n.input)}
        | {n.op_type for n in float_model.graph.node if wanted.intersection(n.output)}
    )
    extra: dict[str, Any] = {"symmetric": False}
    if method == "percentile":
        extra["percentile"] = percentile
    with tempfile.TemporaryDirectory(prefix="bnfold-calib-") as tmp:
        path = Path(tmp) / "float.onnx"
        path.write_bytes(float_model.SerializeToString())
        sink = io.StringIO()
        try:
            with contextlib.redirect_stdout(sink):  # the histogram calibrators print
                calibrator = create_calibrator(
                    path,
                    op_types,
                    augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                    calibrate_method=methods[method],
                    extra_options=extra,
                )
                for chunk in _chunks(feeds, 8):
                    calibrator.collect_data(_Reader(chunk, progress))
                data = calibrator.compute_data()
        except Exception as e:  # onnxruntime rejects the feeds (shape, dtype, names)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BnfoldError(f"calibration failed: {' '.join(msg.split())}") from None
        if sink.getvalue().strip():
            logger.debug("onnxruntime calibrator: %s", sink.getvalue().strip())
        del calibrator
    ranges = {}
    for name in tensors:
        if name not in data:
            raise BnfoldError(f"the calibrator gave no range for tensor '{name}'")
        lo, hi = data[name].range_value
        ranges[name] = (float(np.asarray(lo).min()), float(np.asarray(hi).max()))
    return ranges


# --------------------------------------------------------------------------------------------
# Steps


def ticker(progress: Progress | None, stage: str, total: int) -> Callable[[int], None]:
    """``tick(n)``: ``n`` more of ``total`` done in ``stage``, told to ``progress``."""
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(stage, done, total)

    return tick


def _as_ir(
    model: ir.Model | onnx.ModelProto | str | os.PathLike[str], source: str | None = None
) -> tuple[ir.Model, str]:
    """A private IR copy of ``model`` with default opset >= 13 (per-channel QDQ needs it);
    ``source`` names it in messages (default: the path, else the graph's name)."""
    if isinstance(model, (str, os.PathLike)):
        proto, source = bir.load_proto(model), source or str(model)
    elif isinstance(model, onnx.ModelProto):
        proto, source = model, source or model.graph.name or "<ModelProto>"
    else:
        proto, source = bir.to_proto(model), source or model.graph.name or "<model>"
    if bir.default_opset(proto) < MIN_OPSET:
        from onnx import version_converter

        try:
            proto = version_converter.convert_version(proto, MIN_OPSET)
        except Exception as e:
            raise BnfoldError(
                f"{source}: opset {bir.default_opset(proto)} cannot be converted to "
                f"{MIN_OPSET} for int8 QDQ ({str(e).splitlines()[0]})"
            ) from None
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return bir.from_proto(copy, source=source), source


def _name_nodes(model: ir.Model) -> None:
    """Give every unnamed node a unique name, so that labels stay stable through the passes."""
    namer = Namer(model.graph)
    seen: set[str] = set()
    for node in model.graph:
        if not node.name or node.name in seen:
            node.name = namer(label(node) if not node.name else node.name)
        seen.add(node.name)


def _keep_bn_stats(model: ir.Model) -> dict[str, ir.Node]:
    """Attach ``(beta, |gamma|)`` of each BN to the Conv/Gemm it reads (analytic bias
    correction); returns BN label -> that node."""
    owners = {}
    for node in model.graph:
        if not is_onnx_op(node, "BatchNormalization") or len(node.inputs) < 3:
            continue
        producer = node.inputs[0].producer() if node.inputs[0] is not None else None
        gamma, beta = (
            v.const_value.numpy() if v is not None and v.const_value is not None else None
            for v in node.inputs[1:3]
        )
        if producer is None or gamma is None or beta is None:
            continue
        if is_onnx_op(producer, "Conv", "Gemm"):
            producer.meta[BN_STATS_KEY] = (
                np.asarray(beta, np.float64),
                np.abs(np.asarray(gamma, np.float64)),
            )
            owners[label(node)] = producer
    return owners


def quantize(
    model: ir.Model | onnx.ModelProto | str | os.PathLike[str],
    calib_feeds: Sequence[Feeds],
    *,
    per_channel: bool = DEFAULTS.per_channel,
    activation_type: str = DEFAULTS.activation_type,
    method: str = DEFAULTS.method,
    cle: bool = DEFAULTS.cle,
    bias_correction: bool | str = DEFAULTS.bias_correction,
    exclude: Sequence[str] = DEFAULTS.exclude,
    percentile: float = DEFAULTS.percentile,
    batch_size: int = 8,
    progress: Progress | None = None,
    source: str | None = None,
) -> tuple[onnx.ModelProto, QuantReport]:
    """Quantize ``model`` to a QDQ int8 model.

    Args:
        model: A path, an ``onnx.ModelProto`` or an IR model (never changed: a copy is used).
        calib_feeds: Calibration samples, ``{input name: array}`` with a leading batch axis
            (see :mod:`bnfold.quant.calib`). Batch-1 samples are grouped into batches.
        per_channel: Per-output-channel weight scales (else one per weight tensor).
        activation_type: ``"uint8"`` or ``"int8"`` (asymmetric either way).
        method: Activation calibration: ``"minmax"``, ``"percentile"`` or ``"entropy"``.
        cle: Cross-layer equalization (:mod:`bnfold.passes.equalize`) after folding.
        bias_correction: ``True``/``"empirical"`` (calibration data), ``"analytic"`` (BN
            statistics, data-free), ``False``/``"none"``.
        exclude: Node names to keep in float.
        percentile: The percentile of the ``percentile`` method.
        batch_size: Samples per onnxruntime run for models with a dynamic batch.
        progress: ``(stage, done, total)`` callback, e.g. for a progress bar.
        source: What to call the model in messages and the report (default: its path, else
            its graph's name), for a caller that read the file itself.

    Returns:
        The int8 model and its :class:`QuantReport`.
    """
    if activation_type not in ACTIVATION_TYPES:
        raise BnfoldError(f"activation type '{activation_type}' is not one of uint8, int8")
    if method not in METHODS:
        raise BnfoldError(f"calibration method '{method}' is not one of {', '.join(METHODS)}")
    mode = {True: "empirical", False: "none"}.get(bias_correction, bias_correction)  # type: ignore[call-overload]
    if mode not in BIAS_CORRECTION:
        raise BnfoldError(f"bias correction '{bias_correction}' is not one of {BIAS_CORRECTION}")
    if not calib_feeds:
        raise BnfoldError("no calibration samples")

    steps = Steps(digits=4)

    work, source = _as_ir(model, source)
    _name_nodes(work)
    owners = _keep_bn_stats(work)
    work, fold_report = pipeline.fold(work)
    for rec in fold_report.batchnorms:
        owner = owners.get(rec.node)
        if owner is not None and not (rec.action == "folded" and rec.direction == "backward"):
            owner.meta.pop(BN_STATS_KEY, None)
    steps.lap("fold")
    report = QuantReport(
        source,
        {
            "per_channel": per_channel,
            "activation_type": activation_type,
            "method": method,
            "cle": cle,
            "bias_correction": mode,
            **({"percentile": percentile} if method == "percentile" else {}),
        },
        batchnorms=fold_report.counts(),
    )
    if cle:
        eq = Equalize()
        result = eq(work)
        report.equalization = eq.pairs
        report.equalization_declined = [
            {"node": r.node, "reason": r.reason} for r in getattr(result, "declined", [])
        ]
        steps.lap("equalize")
    twin = bir.to_proto(work)
    report.float_model = twin
    qplan = plan(work, exclude)
    specs = calib.input_specs(twin)
    feeds = calib.batches(calib_feeds, specs, batch_size)
    n_samples = sum(int(next(iter(f.values())).shape[0]) for f in feeds)
    report.calibration_samples = n_samples

    tick = ticker(progress, "calibrating", n_samples)
    ranges = calibrate(twin, feeds, qplan.tensors, method, percentile, tick)
    steps.lap("calibrate")
    if mode != "none":
        if mode == "empirical":
            names = sorted({n.inputs[0].name for n in corrected_layers(work)})
            means = collect_window_means(
                work, feeds, Runner(twin, names), ticker(progress, "bias correction", n_samples)
            )
            skipped: dict[str, str] = {}
        else:
            means, skipped = analytic_window_means(work)
        bc = BiasCorrection(means, per_channel=per_channel, skipped=skipped)
        result = bc(work)
        report.bias_correction = {
            "mode": mode,
            "corrected": [r.node for r in result.changed],
            "skipped": {r.node: r.reason for r in result.declined},
            "max_abs_shift": bc.shifts,
        }
        steps.lap("bias_correction")
    else:
        report.bias_correction = {"mode": "none"}
    qpass = QuantizeInt8(ranges, per_channel, activation_type, exclude)
    qpass(work)
    steps.lap("quantize_int8")
    weights = {w.node: w for w in qpass.weights}
    for p in qplan.nodes:
        row: dict[str, Any] = {"node": p.node, "op": p.op, "status": p.status}
        if p.reason:
            row["reason"] = p.reason
        if p.into:
            row["into"] = p.into
        if p.node in weights:
            w = weights[p.node]
            row.update(
                per_channel=w.per_channel, weight_sqnr_db=round(w.weight_sqnr_db, 3), bias=w.bias
            )
        report.layers.append(row)
    report.tensors = [dataclasses.asdict(tq) for tq in qpass.tensors]
    int8 = bir.to_proto(work)
    try:
        onnx.checker.check_model(int8)
    except Exception as e:
        raise RuntimeError(f"the int8 model fails onnx.checker: {e}") from e
    report.seconds = {**steps.seconds, "total": steps.total()}
    logger.info("quantize: %s", report.counts())
    return int8, report
