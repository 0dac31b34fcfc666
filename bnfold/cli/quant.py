"""CLI command ``bnfold quantize``, and the options ``compile --int8`` can share.

Registered explicitly by :mod:`bnfold.cli` through :data:`COMMANDS`. Nothing heavy is imported
at module level: numpy, onnx, onnxruntime and matplotlib load inside the command.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from bnfold.quant.options import (
    ACTIVATION_TYPES,
    BIAS_CORRECTION,
    DEFAULTS,
    INT8_MODEL,
    INT8_OUTPUTS,
    LAYOUTS,
    METHODS,
    PLOT,
    REJECTED_MODEL,
    REPORT,
    QuantOptions,
)

# The defaults and file names live with QuantOptions (one copy); this module shows them.
D = DEFAULTS


def _floats(values: tuple[float, ...]) -> str:
    """A default tuple as the user types it (``(0.0,)`` -> ``0``)."""
    return ",".join(f"{v:g}" for v in values)


class SizeType(click.ParamType):
    """``N`` (a short side) or ``HxW``."""

    name = "N|HxW"

    def __init__(self, allow_int: bool = True) -> None:
        self.allow_int = allow_int
        if not allow_int:
            self.name = "HxW"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, (int, tuple)):
            return value
        parts = str(value).lower().split("x")
        try:
            dims = [int(p) for p in parts]
        except ValueError:
            self.fail(f"'{value}' is not {self.name} with positive integers", param, ctx)
        if any(d <= 0 for d in dims) or len(dims) not in ((1, 2) if self.allow_int else (2,)):
            self.fail(f"'{value}' is not {self.name} with positive integers", param, ctx)
        return dims[0] if len(dims) == 1 else (dims[0], dims[1])


class FloatsType(click.ParamType):
    """Comma-separated floats, e.g. ``0.485,0.456,0.406``."""

    name = "F[,F...]"

    def __init__(self, positive: bool = False) -> None:
        self.positive = positive

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        try:
            vals = tuple(float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"'{value}' is not a comma-separated list of numbers", param, ctx)
        if self.positive and any(not v > 0 for v in vals):
            self.fail(f"'{value}': every value must be positive", param, ctx)
        return vals


DATA = click.Path(exists=False, path_type=Path)
QUANT_OPTIONS: tuple[Callable[[Any], Any], ...] = (
    click.option("--calib", "calib_path", type=DATA, default=D.calib_path,
                 help="Calibration data: a folder of .jpg/.png images, or an .npz (one array per "
                      "input) / .npy of ready inputs, first axis = samples."),
    click.option("--calib-size", type=click.IntRange(min=1), default=D.calib_size,
                 help="Use at most this many calibration samples (images in name order)."),
    click.option("--eval", "eval_path", type=DATA, default=D.eval_path,
                 help="Held-out data for the accuracy report (same formats as --calib). Default: "
                      "hold out --eval-fraction of the --calib samples."),
    click.option("--eval-size", type=click.IntRange(min=1), default=D.eval_size,
                 help="Use at most this many --eval samples."),
    click.option("--eval-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                 default=D.eval_fraction, show_default=True,
                 help="Without --eval: the fraction of --calib samples held out for evaluation "
                      "(every k-th sample; never used to calibrate)."),
    click.option("--per-tensor", is_flag=True, default=D.per_tensor,
                 help="One weight scale per tensor instead of one per output channel."),
    click.option("--activation-type", type=click.Choice(ACTIVATION_TYPES),
                 default=D.activation_type, show_default=True,
                 help="Element type of quantized activations."),
    click.option("--method", type=click.Choice(METHODS),
                 default=D.method, show_default=True,
                 help="How activation ranges are calibrated (onnxruntime's calibrators)."),
    click.option("--percentile", type=click.FloatRange(50, 100), default=D.percentile,
                 show_default=True, help="The percentile of --method percentile."),
    click.option("--cle/--no-cle", default=D.cle, show_default=True,
                 help="Cross-layer equalization of Conv->activation->Conv pairs after folding."),
    click.option("--bias-correction", type=click.Choice(BIAS_CORRECTION),
                 default=D.bias_correction, show_default=True,
                 help="Correct the output shift of int8 weights, from calibration data "
                      "(empirical) or from the folded BNs' statistics (analytic, data-free)."),
    click.option("--exclude", multiple=True, metavar="NODE", default=D.exclude,
                 help="Keep this node (by name) in float. Repeatable."),
    click.option("--resize", type=SizeType(), default=D.resize,
                 help="Images: resize the short side to N (aspect kept), or to exactly HxW. "
                      "Default: straight to the crop size."),
    click.option("--crop", type=SizeType(allow_int=False), default=D.crop,
                 help="Images: center crop HxW (default: the model input's size)."),
    click.option("--mean", type=FloatsType(), default=_floats(D.mean), show_default=True,
                 help="Images: subtracted after --scale; one value or one per channel (RGB)."),
    click.option("--std", type=FloatsType(positive=True), default=_floats(D.std),
                 show_default=True,
                 help="Images: divides after --mean; one value or one per channel (RGB)."),
    click.option("--scale", type=click.FloatRange(min=0, min_open=True), default=D.scale,
                 show_default="1/255", help="Images: multiplies the 0..255 pixel values first."),
    click.option("--bgr", is_flag=True, default=D.bgr, help="Images: feed channels in BGR order."),
    click.option("--layout", type=click.Choice(LAYOUTS), default=D.layout,
                 help="Images: the input layout (default: guessed from the model input)."),
    click.option("--target-cosine", type=click.FloatRange(0, 1), default=D.target_cosine,
                 help="Keep the layers that lose the most SQNR in float (more each round, up to "
                      "6 more quantizations) until the held-out mean cosine reaches this; the "
                      "report lists them."),
    click.option("--target-agreement", type=click.FloatRange(0, 1),
                 default=D.target_agreement,
                 help="Like --target-cosine, for top-1 agreement with fp32: the argmax over the "
                      "class axis of the first output that has one ((N, C) per sample, (N, T, C) "
                      "per step, (N, C, H, W) per pixel); a model without one is rejected."),
    click.option("--min-top1-agreement", type=click.FloatRange(0, 1),
                 default=D.min_top1_agreement,
                 help="Fail (exit 1) if int8 top-1 agrees with fp32 on fewer held-out samples."),
    click.option("--min-cosine", type=click.FloatRange(0, 1), default=D.min_cosine,
                 show_default=True,
                 help="Fail (exit 1) if the mean cosine similarity of the int8 and fp32 outputs "
                      "on the held-out samples is lower; the int8 model is then written as "
                      f"{REJECTED_MODEL}, not {INT8_MODEL}. 0 disables it."),
)  # fmt: skip


def quant_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Apply every :data:`QUANT_OPTIONS` to a command (``compile --int8`` can reuse them)."""
    for option in reversed(QUANT_OPTIONS):
        f = option(f)
    return f


class _Bars:
    """One click progress bar per stage, on stderr. Only on a terminal: in a log, or when
    stderr is captured, bars would be noise around the one-line error contract."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.stage: str | None = None
        self.bar: Any = None
        self.done = 0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage != self.stage:
            self.close()
            self.stage, self.done = stage, 0
            self.bar = click.progressbar(length=total, label=f"{stage:<16}", file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def run_quantize(
    model: Path, outdir: Path, options: QuantOptions, shown_as: Path | None = None
) -> Any:
    """``bnfold quantize`` after parsing (``compile --int8`` runs it too): quantize with
    :func:`bnfold.quant.run.quantize`, write the outputs, show them, apply the gate.

    Writes ``outdir/model.int8.onnx``, ``quant_report.json`` and ``sqnr.png``; a model that
    fails the accuracy gate is written as ``model.int8.rejected.onnx`` and the gate raises
    :class:`bnfold.errors.CheckFailed` (exit 1). ``shown_as``: the folder named in the output
    (``compile --int8`` writes into its temp folder, moved to OUTDIR later). Returns the
    QuantReport.
    """
    from bnfold.outputs import check_folder, protected_files
    from bnfold.quant import run

    if options.calib_path is None:
        raise click.UsageError("int8 quantization needs --calib DATA (images, .npz or .npy)")
    protected = protected_files(model)
    check_folder(outdir, INT8_OUTPUTS, protected)
    if options.target_agreement is not None:
        from bnfold.ir import load_proto
        from bnfold.quant.target import require_class_axis

        require_class_axis(load_proto(model))  # before the (long) quantization
    bars = _Bars()
    try:
        result = run.quantize(model, options, progress=bars)
    finally:
        bars.close()
    written = run.write(result, outdir, protected)
    report, acc = result.report, result.accuracy
    click.echo(report.table())
    click.echo("")
    click.echo(f"fp32 vs int8 on {acc.samples} held-out sample(s) (not used to calibrate):")
    click.echo(acc.table())
    if report.target is not None:
        from bnfold.quant.target import summary

        click.echo(summary(report.target))
    shown = shown_as or outdir
    click.echo(f"wrote {shown / written.name}, {shown / REPORT}, {shown / PLOT}")
    result.raise_if_failed(_hints(options, shown / written.name))
    return report


def _hints(options: QuantOptions, rejected: Path) -> list[str]:
    """What to try when the accuracy gate fails, given the options this run used."""
    hints = []
    if options.per_tensor:
        hints.append("per-channel weights (without --per-tensor)")
    if options.cle:
        hints.append("--no-cle")
    if options.method == "minmax":
        hints.append("--method percentile")
    hints.append("--exclude NODE for those layers")
    hints.append(f"or --min-cosine 0 to accept it (kept as {rejected})")
    return hints


@click.command("quantize")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "outdir", type=click.Path(file_okay=False, path_type=Path),
              required=True,
              help=f"Folder for {INT8_MODEL} (QDQ), {REPORT} and {PLOT}.")  # fmt: skip
@quant_options
def quantize_cmd(model: Path, outdir: Path, **opts: Any) -> None:
    """Quantize MODEL to int8 (QDQ ONNX) from calibration data, and report its accuracy.

    BatchNormalization is folded first; then cross-layer equalization, calibration of the
    activation ranges (onnxruntime's calibrators), bias correction, and int8 weights
    (per-channel unless --per-tensor). The int8 model is compared with MODEL on held-out
    samples (top-1/top-5 agreement, cosine similarity, per-layer SQNR); exit code 1 when a
    --min-* gate fails (by default: mean cosine below 0.9), and the int8 model is then written
    as model.int8.rejected.onnx, not model.int8.onnx.
    """
    run_quantize(model, outdir, QuantOptions(**opts))


COMMANDS = (quantize_cmd,)
