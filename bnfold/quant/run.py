"""A whole quantization as one library call: what ``bnfold quantize`` and ``compile --int8`` run.

:func:`quantize` takes a model and its :class:`~bnfold.quant.options.QuantOptions` and goes::

    read samples (calib, eval) -> hold out (unless eval data is given) -> quantize
        -> evaluate on the held-out samples -> (target cosine / agreement search) -> gate

and returns a :class:`QuantResult`; :func:`write` puts its files in a folder. Nothing here
prints: the CLI shows the result and turns a failed gate into exit code 1
(:meth:`QuantResult.raise_if_failed`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Sequence
from pathlib import Path

import onnx

from bnfold import ir
from bnfold.atomic import write_bytes, write_json
from bnfold.errors import BnfoldError
from bnfold.outputs import staged_folder
from bnfold.quant import calib
from bnfold.quant import report as quant_report
from bnfold.quant import target as quant_target
from bnfold.quant.options import INT8_MODEL, PLOT, REJECTED_MODEL, REPORT, QuantOptions
from bnfold.quant.quantize import Progress, QuantReport, ticker
from bnfold.quant.quantize import quantize as quantize_model

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class QuantResult:
    """A quantized model, what was done to it and how it compares with the original.

    Attributes:
        int8: The QDQ model.
        report: Every node's fate (:class:`~bnfold.quant.quantize.QuantReport`); its
            ``accuracy`` and ``target`` are filled.
        accuracy: fp32 vs int8 on the held-out samples.
        failures: What fails the accuracy gate (empty when it passes).
        options: The options it was made with.
    """

    int8: onnx.ModelProto
    report: QuantReport
    accuracy: quant_report.Accuracy
    failures: list[str]
    options: QuantOptions

    @property
    def model_file(self) -> str:
        """The int8 model's file name: a model that fails the gate is never ``INT8_MODEL``."""
        return REJECTED_MODEL if self.failures else INT8_MODEL

    def raise_if_failed(self, hints: Sequence[str] = ()) -> None:
        """Raise :class:`~bnfold.errors.CheckFailed` (exit 1) when the gate failed; its line
        names the worst layers and ``hints`` (what to try)."""
        quant_report.gate(
            self.accuracy, self.options.min_top1_agreement, self.options.min_cosine, hints
        )


def _samples(
    path: Path,
    specs: Sequence[calib.InputSpec],
    options: QuantOptions,
    limit: int | None,
    progress: Progress | None,
    stage: str,
) -> list[calib.Feeds]:
    total = limit or 0
    if path.is_dir():
        total = min(len(calib.list_images(path)), limit or 10**9)
    tick = ticker(progress, stage, max(total, 1))
    return calib.load_samples(path, specs, options.preprocess, limit, tick)


def quantize(
    model: Path, options: QuantOptions, *, progress: Progress | None = None
) -> QuantResult:
    """Quantize the model file ``model`` as ``options`` say and evaluate it on held-out data.

    Args:
        model: The fp32 model file.
        options: What to do; ``options.calib_path`` is required.
        progress: Told ``(stage, done, total)`` as samples are read, calibrated and evaluated.

    Returns:
        The result; ``failures`` says whether it passes the gate (nothing is raised for that).

    Raises:
        BnfoldError: Bad input: no calibration data, unreadable samples or model, a gate that
            cannot be evaluated (a top-1 floor without a classifier output).
    """
    if options.calib_path is None:
        raise BnfoldError("int8 quantization needs calibration data (calib_path)")
    # Read once: quantization, the held-out evaluation and the target search all take this
    # proto (each works on its own copy), so they see the same model even if the file changes.
    proto = ir.load_proto(model)
    specs = calib.input_specs(proto)
    samples = _samples(options.calib_path, specs, options, options.calib_size, progress,
                       "reading calib")  # fmt: skip
    if options.eval_path is not None:
        cal = samples
        held = _samples(options.eval_path, specs, options, options.eval_size, progress,
                        "reading eval")  # fmt: skip
    else:
        cal, held = calib.split(samples, options.eval_fraction)
    kwargs = options.quantize_kwargs()
    int8, report = quantize_model(proto, cal, progress=progress, source=str(model), **kwargs)
    held_batches = calib.batches(held, specs)
    n_held = sum(int(next(iter(b.values())).shape[0]) for b in held_batches)
    acc = quant_report.evaluate(
        proto, int8, report, held_batches, progress=ticker(progress, "evaluating", n_held)
    )
    goals = {"cosine": options.target_cosine, "agreement": options.target_agreement}
    if any(v is not None for v in goals.values()):
        int8, report, acc = quant_target.reach(
            proto, cal, held_batches, goals, (int8, report, acc), source=str(model), **kwargs
        )
    report.source = str(model)
    failures = quant_report.gate_failures(acc, options.min_top1_agreement, options.min_cosine)
    return QuantResult(int8, report, acc, failures, options)


def write(result: QuantResult, outdir: Path, protected: Collection[Path] = ()) -> Path:
    """Write the int8 model (as :attr:`QuantResult.model_file`), ``quant_report.json`` and
    ``sqnr.png`` into ``outdir``; returns the model's path.

    The files appear together or not at all (an interrupt while writing the plot left the
    model and report without it). A model that fails the gate is kept (to inspect, or to take
    anyway) but never where a passing one goes; a model of the other kind from an earlier run
    is removed, since the report next to it now describes this one.
    """
    name = result.model_file
    stale = INT8_MODEL if name == REJECTED_MODEL else REJECTED_MODEL
    with staged_folder(outdir, protected) as stage:
        write_bytes(stage / name, result.int8.SerializeToString(deterministic=True))
        write_json(stage / REPORT, result.report.to_dict())
        quant_report.plot_sqnr(result.report, result.accuracy, stage / PLOT)
    (outdir / stale).unlink(missing_ok=True)
    return outdir / name
