"""What a quantization is asked to do: :class:`QuantOptions`, its defaults, and its file names.

One frozen dataclass holds every option of ``bnfold quantize`` (and of ``compile --int8``):
where the samples come from, how images become inputs (:class:`Preprocess`), how the model is
quantized, and the accuracy gate. Its field defaults are the only copy of the defaults: the
CLI's options and :func:`bnfold.quant.quantize.quantize` take theirs from here.

This module imports nothing heavy (no numpy, no onnx): the CLI reads the defaults and the
output names while ``bnfold --help`` is being built.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from bnfold.errors import BnfoldError

# The files a quantization writes into its folder.
INT8_MODEL = "model.int8.onnx"
# Where the int8 model goes when it fails the accuracy gate: never at INT8_MODEL, so nothing
# that picks up OUTDIR/model.int8.onnx (a script, a deploy step) takes a model that failed.
REJECTED_MODEL = "model.int8.rejected.onnx"
REPORT = "quant_report.json"
PLOT = "sqnr.png"
INT8_OUTPUTS = (INT8_MODEL, REJECTED_MODEL, REPORT, PLOT)

METHODS = ("minmax", "percentile", "entropy")
BIAS_CORRECTION = ("empirical", "analytic", "none")
# The keys of bnfold.passes.quantize_int8.ACTIVATION_TYPES (which imports numpy): a test
# checks that the two agree.
ACTIVATION_TYPES = ("uint8", "int8")
LAYOUTS = ("NCHW", "NHWC")


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input (see :mod:`bnfold.quant.calib` for the order).

    Attributes:
        resize: Short side length (int), exact ``(height, width)``, or None (straight to the
            crop size).
        crop: Center crop ``(height, width)``; None means the model input's size.
        mean: Subtracted after scaling; one value, or one per channel (in RGB order).
        std: Divides after the mean; one value, or one per channel (in RGB order).
        scale: Multiplies the 0..255 pixel values first.
        bgr: Reverse the channel order (after normalization) for models trained on BGR.
        layout: ``NCHW`` or ``NHWC``; None guesses from the model input's shape.
    """

    resize: int | tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0 / 255.0
    bgr: bool = False
    layout: str | None = None


_PRE = Preprocess()


@dataclasses.dataclass(frozen=True)
class QuantOptions:
    """Every option of a quantization; the field names are the CLI's parameter names, so
    ``QuantOptions(**parsed)`` is the whole mapping from the command line.

    Attributes:
        calib_path: Calibration data: a folder of images, or an ``.npz``/``.npy`` of inputs.
        calib_size: Use at most this many calibration samples.
        eval_path: Held-out data for the accuracy report; None holds out ``eval_fraction`` of
            the calibration samples (every k-th, never used to calibrate).
        eval_size: Use at most this many ``eval_path`` samples.
        eval_fraction: Without ``eval_path``: the fraction of samples held out.
        per_tensor: One weight scale per tensor instead of one per output channel.
        activation_type: One of :data:`ACTIVATION_TYPES`.
        method: Activation calibration, one of :data:`METHODS`.
        percentile: The percentile of ``method="percentile"``.
        cle: Cross-layer equalization after folding.
        bias_correction: One of :data:`BIAS_CORRECTION`.
        exclude: Node names to keep in float.
        resize, crop, mean, std, scale, bgr, layout: Images only: see :class:`Preprocess`.
        target_cosine: Keep the most damaged layers in float until the held-out mean cosine
            reaches this (:func:`bnfold.quant.target.reach`); None: no search.
        target_agreement: The same for top-1 agreement over the first output with a class
            axis (:func:`bnfold.metrics.class_axis`); with both, both must be met.
        min_top1_agreement: The gate's top-1 agreement floor; None: no floor.
        min_cosine: The gate's mean cosine floor; 0 disables it.
    """

    calib_path: Path | None = None
    calib_size: int | None = None
    eval_path: Path | None = None
    eval_size: int | None = None
    eval_fraction: float = 0.2
    per_tensor: bool = False
    activation_type: str = "uint8"
    method: str = "minmax"
    percentile: float = 99.999
    cle: bool = True
    bias_correction: str = "empirical"
    exclude: tuple[str, ...] = ()
    resize: int | tuple[int, int] | None = _PRE.resize
    crop: tuple[int, int] | None = _PRE.crop
    mean: tuple[float, ...] = _PRE.mean
    std: tuple[float, ...] = _PRE.std
    scale: float = _PRE.scale
    bgr: bool = _PRE.bgr
    layout: str | None = _PRE.layout
    target_cosine: float | None = None
    target_agreement: float | None = None
    min_top1_agreement: float | None = None
    min_cosine: float = 0.9

    def __post_init__(self) -> None:
        # The CLI's option types already refuse all of this; a library caller gets one line.
        choices = {
            "activation_type": ACTIVATION_TYPES,
            "method": METHODS,
            "bias_correction": BIAS_CORRECTION,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise BnfoldError(
                    f"{name} '{getattr(self, name)}' is not one of {', '.join(allowed)}"
                )
        if self.layout is not None and self.layout not in LAYOUTS:
            raise BnfoldError(f"layout '{self.layout}' is not one of {', '.join(LAYOUTS)}")
        if not 0 < self.eval_fraction < 1:
            raise BnfoldError(f"eval_fraction must be in (0, 1), not {self.eval_fraction}")
        if not 50 <= self.percentile <= 100:
            raise BnfoldError(f"percentile must be in [50, 100], not {self.percentile}")
        for name in ("calib_size", "eval_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise BnfoldError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("target_cosine", "target_agreement", "min_top1_agreement", "min_cosine"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and 0 <= value <= 1):
                raise BnfoldError(f"{name} must be in [0, 1], not {value}")
        # A list from a library caller becomes a tuple: the options stay hashable and frozen.
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @property
    def per_channel(self) -> bool:
        """One weight scale per output channel (the default) rather than per tensor."""
        return not self.per_tensor

    @property
    def preprocess(self) -> Preprocess:
        """How images become inputs."""
        return Preprocess(
            resize=self.resize, crop=self.crop, mean=self.mean, std=self.std,
            scale=self.scale, bgr=self.bgr, layout=self.layout,
        )  # fmt: skip

    def quantize_kwargs(self) -> dict[str, object]:
        """The keyword arguments of :func:`bnfold.quant.quantize.quantize` (and of
        :func:`bnfold.quant.target.reach`, which passes them on)."""
        return {
            "per_channel": self.per_channel,
            "activation_type": self.activation_type,
            "method": self.method,
            "cle": self.cle,
            "bias_correction": self.bias_correction,
            "exclude": self.exclude,
            "percentile": self.percentile,
        }


DEFAULTS = QuantOptions()
