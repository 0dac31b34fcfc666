"""bias_correction: remove the expected output shift that int8 weights add to each layer.

With int8 weights a layer computes ``W~ x + b`` instead of ``W x + b``, ``W~ = s_w W_q``. The
error ``dW x`` (``dW = W~ - W``) has a non-zero mean wherever ``E[x] != 0`` (after a ReLU it
always is), which shifts the next layer's input; the shift is systematic, so it adds up through
the network (Nagel et al. 2019, section 4.2). For a convolution, output channel ``o``::

    E[dy_o] = sum_{c, k} dW[o, c, k] * m[c, k]
    m[c, k] = mean over output positions p of x_pad[c, p * stride + k * dilation]

``m`` is the *window mean* of input channel ``c`` seen by kernel tap ``k``: with zero padding the
border taps see fewer real inputs, so ``m`` is exact where a per-channel mean is not. The pass
sets ``b' = b - E[dy]`` (creating a bias if there is none). For Gemm, ``m`` is the mean input
row and ``E[dy] = alpha * m dB``.

Two ways to get ``m``:

* **empirical** (:func:`collect_window_means`): run the float model on calibration data and
  average each layer's real input.
* **analytic** (:func:`analytic_window_means`), data-free: the BN folded into the layer that
  produces the input said its output channel ``c`` is ``~ N(beta_c, gamma_c^2)``
  (``BN_STATS_KEY`` in ``node.meta``, rescaled by ``equalize``). Through ``Relu``/``Clip``/
  ``Min``/``Max`` that gives a clipped normal, whose mean is closed-form::

      E[clip(Y, L, H)] = L + E[(Y - L)+] - E[(Y - H)+],
      E[(Y - a)+]      = (mu - a) Phi((mu - a) / sigma) + sigma phi((mu - a) / sigma)

  and ``Add`` of two such tensors adds their means. Spatially constant, so
  ``m[c, k] = E[x_c] * (fraction of output positions whose tap k is inside the input)``.
  Layers whose input has no such statistics (the first conv reads the image) are left alone,
  with that reason.

``dW`` must be computed with exactly the weight quantization the int8 model will use (same
per-channel / per-tensor choice, :func:`bnfold.passes.quantize_int8.fake_quant_weight`).

Preconditions: BN folded; weights and biases constant initializers; node labels unique.
Postcondition: only biases change.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from bnfold.errors import BnfoldError
from bnfold.passes._util import (
    BnfoldPassResult,
    Declined,
    Namer,
    Record,
    cast_checked,
    const_array,
    is_onnx_op,
    label,
    set_constant_input,
)
from bnfold.passes.equalize import BN_STATS_KEY, _clip_bounds
from bnfold.passes.quantize_int8 import fake_quant_weight, weight_axis

logger = logging.getLogger(__name__)

CORRECTED_OPS = ("Conv", "Gemm")


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Where each kernel tap of a convolution reads its input (per spatial axis)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]
    out: tuple[int, ...]


def conv_geometry(node: ir.Node, in_spatial: Sequence[int]) -> ConvGeometry:
    """Kernel, strides, dilations, explicit pads and output size of Conv ``node``."""
    w = const_array(node.inputs[1])
    nd = len(in_spatial)
    kernel = tuple(node.attributes.get_ints("kernel_shape", list(w.shape[2:])))
    strides = tuple(node.attributes.get_ints("strides", [1] * nd))
    dil = tuple(node.attributes.get_ints("dilations", [1] * nd))
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dil, strict=True)]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = [-(-i // s) for i, s in zip(in_spatial, strides, strict=True)]
        total = [
            max(0, (o - 1) * s + k - i)
            for o, s, k, i in zip(out, strides, span, in_spatial, strict=True)
        ]
        small = [t // 2 for t in total]
        big = [t - t // 2 for t in total]
        begin, end = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
    else:
        pads = list(node.attributes.get_ints("pads", [0] * (2 * nd)))
        if auto_pad == "VALID":
            pads = [0] * (2 * nd)
        begin, end = pads[:nd], pads[nd:]
        out = [
            (i + b + e - k) // s + 1
            for i, b, e, k, s in zip(in_spatial, begin, end, span, strides, strict=True)
        ]
    if any(o <= 0 for o in out):
        raise Declined(f"{label(node)} has an empty output")
    return ConvGeometry(kernel, strides, dil, tuple(begin), tuple(end), tuple(out))


def window_sums(x: np.ndarray, g: ConvGeometry) -> np.ndarray:
    """``sum over (n, p) of x_pad[n, c, p * stride + k * dilation]``, shape (C, *kernel)."""
    pad = [(0, 0), (0, 0), *zip(g.pads_begin, g.pads_end, strict=True)]
    xp = np.pad(np.asarray(x, np.float64), pad)
    out = np.empty((x.shape[1], *g.kernel))
    for k in np.ndindex(*g.kernel):
        idx = tuple(
            slice(ki * d, ki * d + (o - 1) * s + 1, s)
            for ki, d, o, s in zip(k, g.dilations, g.out, g.strides, strict=True)
        )
        out[(slice(None), *k)] = xp[(slice(None), slice(None), *idx)].sum(
            axis=(0, *range(2, x.ndim))
        )
    return out


class WindowMeans:
    """Accumulates the window means ``m`` of every corrected layer's input over batches."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def add(self, node: ir.Node, x: np.ndarray) -> None:
        name = label(node)
        if is_onnx_op(node, "Conv"):
            g = conv_geometry(node, x.shape[2:])
            s, n = window_sums(x, g), x.shape[0] * math.prod(g.out)
        else:
            rows = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
            s, n = rows.sum(axis=0), rows.shape[0]
        self.sums[name] = self.sums.get(name, 0) + s
        self.counts[name] = self.counts.get(name, 0) + n

    def means(self) -> dict[str, np.ndarray]:
        return {k: v / self.counts[k] for k, v in self.sums.items() if self.counts[k]}


def corrected_layers(model: ir.Model) -> list[ir.Node]:
    """Conv and Gemm nodes with constant weights (the layers this pass can correct)."""
    out = []
    for node in model.graph:
        if not is_onnx_op(node, *CORRECTED_OPS) or len(node.inputs) < 2:
            continue
        if const_array(node.inputs[1]) is None:
            continue
        if is_onnx_op(node, "Gemm") and node.attributes.get_int("transA", 0):
            continue
        out.append(node)
    return out


def collect_window_means(
    model: ir.Model,
    feeds: Iterable[Mapping[str, np.ndarray]],
    run: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]],
    progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Empirical window means of every corrected layer's input.

    Args:
        model: The IR model (its layers are named by :func:`label`).
        feeds: Calibration batches.
        run: ``feed -> {name: array}`` for the input of every layer of
            :func:`corrected_layers` (the float model in onnxruntime, optimizations off).
        progress: Called with the number of samples of each batch when it is done.
    """
    layers = corrected_layers(model)
    acc = WindowMeans()
    for feed in feeds:
        got = run(dict(feed))
        for node in layers:
            acc.add(node, np.asarray(got[node.inputs[0].name]))
        if progress is not None:
            progress(int(next(iter(feed.values())).shape[0]))
    return acc.means()


# --------------------------------------------------------------------------------------------
# Analytic means from BN statistics


def _normal_pdf(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    erf = np.frompyfunc(math.erf, 1, 1)
    return 0.5 * (1.0 + erf(z / math.sqrt(2)).astype(np.float64))


def _relu_mean(mu: np.ndarray, sigma: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``E[(Y - a)+]`` for ``Y ~ N(mu, sigma^2)`` (``a`` may be +-inf)."""
    d = mu - a
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(sigma > 0, d / np.where(sigma > 0, sigma, 1.0), 0.0)
        val = np.where(sigma > 0, d * _normal_cdf(z) + sigma * _normal_pdf(z), np.maximum(d, 0.0))
    val = np.where(np.isposinf(a), 0.0, val)
    return np.where(np.isneginf(a), np.inf, val)


def clipped_normal_mean(
    mu: np.ndarray, sigma: np.ndarray, lo: np.ndarray | float, hi: np.ndarray | float
) -> np.ndarray:
    """``E[clip(Y, lo, hi)]`` for ``Y ~ N(mu, sigma^2)``, per channel (bounds may be infinite)::

    E[clip(Y, lo, hi)] = lo + E[(Y - lo)+] - E[(Y - hi)+]     (lo = -inf: mu - E[(Y - hi)+])
    """
    mu, sigma = np.asarray(mu, np.float64), np.abs(np.asarray(sigma, np.float64))
    lo = np.broadcast_to(np.asarray(lo, np.float64), mu.shape)
    hi = np.broadcast_to(np.asarray(hi, np.float64), mu.shape)
    finite_lo = np.where(np.isneginf(lo), 0.0, lo)
    lower = np.where(np.isneginf(lo), mu, finite_lo + _relu_mean(mu, sigma, finite_lo))
    return lower - _relu_mean(mu, sigma, hi)


def channel_mean(value: ir.Value) -> np.ndarray:
    """Per-channel ``E[value]`` from folded-BN statistics, or Declined with the reason."""
    node = value.producer()
    if node is None:
        raise Declined("reads a graph input (no BN statistics)")
    if is_onnx_op(node, "Add") and all(const_array(v) is None for v in node.inputs):
        return channel_mean(node.inputs[0]) + channel_mean(node.inputs[1])
    lo_hi: list[tuple[np.ndarray | float, np.ndarray | float]] = []
    while is_onnx_op(node, "Relu", "Clip", "Min", "Max"):
        if is_onnx_op(node, "Relu"):
            lo_hi.append((0.0, np.inf))
        elif is_onnx_op(node, "Clip"):
            lo_hi.append(_clip_bounds(node))
        else:
            consts = [const_array(v) for v in node.inputs]
            c = next((c for c in consts if c is not None), None)
            if c is None:
                raise Declined(f"{node.op_type} {label(node)} has no constant bound")
            c = np.asarray(c, np.float64).reshape(-1)
            lo_hi.append((c, np.inf) if node.op_type == "Max" else (-np.inf, c))
        node = node.inputs[0].producer()
        if node is None:
            raise Declined("reads a graph input (no BN statistics)")
    stats = node.meta.get(BN_STATS_KEY)
    if stats is None:
        raise Declined(f"{label(node)} ({node.op_type}) has no folded-BN statistics")
    mu, sigma = stats
    lo: np.ndarray | float = -np.inf
    hi: np.ndarray | float = np.inf
    for a, b in reversed(lo_hi):  # innermost first
        lo, hi = np.maximum(lo, a), np.minimum(hi, b)
        hi = np.maximum(hi, lo)  # clip(clip(y, a, b), c, d) with disjoint ranges is constant
    return clipped_normal_mean(mu, sigma, lo, hi)


def analytic_window_means(model: ir.Model) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Data-free window means from BN statistics; also the reason for each layer left out."""
    means, reasons = {}, {}
    for node in corrected_layers(model):
        x = node.inputs[0]
        try:
            mean = channel_mean(x)
            if is_onnx_op(node, "Conv"):
                shape = x.shape
                if shape is None or not all(isinstance(d, int) for d in shape[2:]):
                    raise Declined("input spatial shape is not static")
                g = conv_geometry(node, list(shape[2:]))
                ones = np.ones((1, 1, *shape[2:]))
                frac = window_sums(ones, g)[0] / math.prod(g.out)
                mean = mean.reshape((-1,) + (1,) * len(g.kernel)) * frac
            means[label(node)] = mean
        except Declined as e:
            reasons[label(node)] = str(e)
    return means, reasons


# --------------------------------------------------------------------------------------------
# The pass


def expected_shift(node: ir.Node, w: np.ndarray, m: np.ndarray, per_channel: bool) -> np.ndarray:
    """``E[dW x]`` per output channel for window means ``m`` (see module doc)."""
    axis = weight_axis(node) if per_channel else None
    dw = fake_quant_weight(w, axis) - np.asarray(w, np.float64)
    if is_onnx_op(node, "Conv"):
        group = node.attributes.get_int("group", 1)
        m_out, c_per_g = dw.shape[0], dw.shape[1]
        if m.shape != (c_per_g * group, *dw.shape[2:]):
            raise BnfoldError(f"{label(node)}: window means {m.shape} do not fit weight {dw.shape}")
        groups_of_o = np.arange(m_out) // (m_out // group)
        per_o = m.reshape(group, c_per_g, *dw.shape[2:])[groups_of_o]
        return (dw * per_o).reshape(m_out, -1).sum(axis=1)
    trans_b = bool(node.attributes.get_int("transB", 0))
    alpha = float(node.attributes.get_float("alpha", 1.0))
    return alpha * (dw @ m if trans_b else m @ dw)


class BiasCorrection(ir.passes.InPlacePass):
    """Subtract ``E[dW x]`` from the bias of every layer that has window means.

    Args:
        means: Window means per layer label (from :func:`collect_window_means` or
            :func:`analytic_window_means`).
        per_channel: The weight quantization the int8 model will use.
        skipped: Reasons for layers without means (reported as declines).
    """

    def __init__(
        self,
        means: Mapping[str, np.ndarray] | None = None,
        per_channel: bool = True,
        skipped: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.means = dict(means or {})
        self.per_channel = per_channel
        self.skipped = dict(skipped or {})
        self.shifts: dict[str, float] = {}  # label -> max |E[dy]| / max |bias or 1|

    def call(self, model: ir.Model) -> BnfoldPassResult:
        graph = model.graph
        namer = Namer(graph)
        result = BnfoldPassResult(model, False)
        for node in corrected_layers(model):
            name = label(node)
            if name not in self.means:
                why = self.skipped.get(name, "no input statistics")
                result.declined.append(Record(name, node.op_type, "kept", reason=why))
                continue
            try:
                self._correct(graph, namer, node, self.means[name])
            except Declined as e:
                result.declined.append(Record(name, node.op_type, "kept", reason=str(e)))
                continue
            result.changed.append(Record(name, node.op_type, "corrected"))
            result.modified = True
        logger.info(
            "bias_correction: %d corrected, %d left", len(result.changed), len(result.declined)
        )
        return result

    def _correct(self, graph: ir.Graph, namer: Namer, node: ir.Node, m: np.ndarray) -> None:
        w = np.asarray(const_array(node.inputs[1]), np.float64)
        shift = expected_shift(node, w, np.asarray(m, np.float64), self.per_channel)
        bias_v = node.inputs[2] if len(node.inputs) > 2 else None
        bias = const_array(bias_v)
        dtype = node.outputs[0].dtype
        if is_onnx_op(node, "Gemm"):
            beta = float(node.attributes.get_float("beta", 1.0))
            if bias is not None and (bias.size not in (1, shift.size) or beta == 0.0):
                raise Declined("Gemm C is not a per-column vector")
            if bias is None or beta == 0.0:
                new = -shift
                node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
            else:
                new = np.broadcast_to(np.asarray(bias, np.float64).reshape(-1), shift.shape)
                new = new - shift / beta
        else:
            new = -shift if bias is None else np.asarray(bias, np.float64) - shift
        ref = float(np.max(np.abs(bias))) if bias is not None and bias.size else 0.0
        self.shifts[label(node)] = float(np.max(np.abs(shift))) / max(ref, 1e-12)
        set_constant_input(
            graph, namer, node, 2, cast_checked(new, dtype, "bias"), f"{label(node)}_B"
        )
