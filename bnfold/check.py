"""Verification: run a reference and a candidate model on the same inputs and compare outputs.

The reference runs in onnxruntime with every graph optimization off, so that what is compared is
the model as written, not onnxruntime's own fusions (which fold BN too and would hide a bug).

Metrics per output (:mod:`bnfold.metrics`, shared with the int8 report): max abs error, max
relative error, cosine similarity, and for classifier-shaped outputs (N, K) top-1 and top-5
agreement. Gate: every value finite and ``max_abs <= atol + rtol * max|reference|``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bnfold import ir as bir
from bnfold import onnxrt
from bnfold import per_layer as layerwise
from bnfold.errors import BnfoldError
from bnfold.metrics import OutputMetrics, measure

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
ModelLike = str | os.PathLike[str] | bytes | onnx.ModelProto | Any

_ONNX_TO_NP = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``NAME:1x3x224x224`` into ``("NAME", (1, 3, 224, 224))``."""
    name, sep, dims = text.rpartition(":")
    if not sep or not name or not dims:
        raise BnfoldError(f"bad shape '{text}': expected NAME:DxDxD, e.g. input:1x3x224x224")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        raise BnfoldError(f"bad shape '{text}': dimensions must be integers") from None
    if any(d <= 0 for d in shape):
        raise BnfoldError(f"bad shape '{text}': dimensions must be positive")
    return name, shape


def _proto(model: ModelLike, max_size_bytes: int | None = None) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, os.PathLike)):
        return bir.load_proto(model, check=False, infer_shapes=False, max_size_bytes=max_size_bytes)
    if isinstance(model, bytes):
        return onnx.load_model_from_string(model)

    return bir.to_proto(model)


def _model_bytes(model: ModelLike, max_size_bytes: int | None = None) -> bytes:
    if isinstance(model, bytes):
        return model

    return bir.to_bytes(_proto(model, max_size_bytes))


def _static(d: onnx.TensorShapeProto.Dimension) -> bool:
    # Some exporters (paddle2onnx) write a dynamic dimension as dim_value -1.
    return d.HasField("dim_value") and d.dim_value > 0


def graph_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not initializers."""
    inits = {i.name for i in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in inits]


def input_shapes(
    proto: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, tuple[int, ...]]:
    """Concrete shape of every input; dynamic dimensions come from ``shapes`` or fail clearly."""
    shapes = dict(shapes or {})
    names = [i.name for i in graph_inputs(proto)]
    for name in shapes:
        if name not in names:
            raise BnfoldError(f"--shape names '{name}', which is not a model input ({names})")
    out = {}
    for vi in graph_inputs(proto):
        dims = vi.type.tensor_type.shape.dim
        if vi.name in shapes:
            if len(shapes[vi.name]) != len(dims):
                raise BnfoldError(
                    f"--shape {vi.name}: rank {len(shapes[vi.name])} does not match the model's "
                    f"rank {len(dims)}"
                )
            out[vi.name] = shapes[vi.name]
            continue
        if not all(_static(d) for d in dims):
            # A dynamic batch alone defaults to 1; any other dynamic dim needs --shape.
            if all(_static(d) for d in list(dims)[1:]):
                out[vi.name] = (1, *(d.dim_value for d in list(dims)[1:]))
                continue
            shown = "x".join(str(d.dim_value) if _static(d) else "?" for d in dims)
            raise BnfoldError(
                f"input '{vi.name}' has dynamic dimensions ({shown}); give them with "
                f"--shape {vi.name}:{shown.replace('?', 'N')}"
            )
        out[vi.name] = tuple(d.dim_value for d in dims)
    return out


def random_inputs(
    proto: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], seed: int = 0
) -> Feeds:
    """Random feeds: standard normal for floats, small non-negative integers otherwise."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in graph_inputs(proto):
        dtype = _ONNX_TO_NP.get(vi.type.tensor_type.elem_type)
        if dtype is None:
            raise BnfoldError(f"input '{vi.name}' has an element type bnfold cannot generate")
        shape = shapes[vi.name]
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[vi.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[vi.name] = rng.integers(0, 4, shape).astype(dtype)
    return feeds


def load_inputs(path: str | os.PathLike[str], proto: onnx.ModelProto) -> Feeds:
    """Read an ``.npz`` (one array per input name) or ``.npy`` (single-input models)."""
    return load_arrays(path, [i.name for i in graph_inputs(proto)])


def load_arrays(path: str | os.PathLike[str], names: list[str]) -> Feeds:
    """Read an ``.npz`` (one array per name in ``names``) or an ``.npy`` (one name only)."""
    p = Path(path)
    if not p.is_file():
        raise BnfoldError(f"{p}: no such inputs file")
    try:
        if p.suffix == ".npy":
            if len(names) != 1:
                raise BnfoldError(f"{p}: .npy works for single-input models; this one has {names}")
            return {names[0]: np.load(p, allow_pickle=False)}
        with np.load(p, allow_pickle=False) as data:
            feeds = {k: data[k] for k in data.files}
    except BnfoldError:
        raise
    except Exception as e:
        raise BnfoldError(f"{p}: cannot read inputs ({str(e).splitlines()[0]})") from None
    missing = [n for n in names if n not in feeds]
    if missing:
        raise BnfoldError(f"{p}: no array for input(s) {missing} (has {sorted(feeds)})")
    return {n: feeds[n] for n in names}


def run_onnxruntime(
    model: ModelLike, feeds: Feeds, *, optimize: bool = False, threads: int | None = None
) -> dict[str, np.ndarray]:
    """Run ``model`` in onnxruntime on the CPU; graph optimizations off unless ``optimize``
    (the session: :func:`bnfold.onnxrt.session`)."""
    sess = onnxrt.session(_model_bytes(model), optimize=optimize, threads=threads)
    return onnxrt.run(sess, feeds)


@dataclasses.dataclass
class VerifyResult:
    """Result of :func:`verify` / :func:`compare_outputs`; ``passed`` is the gate."""

    outputs: list[OutputMetrics]
    atol: float
    rtol: float
    samples: int = 1
    reference: str = ""
    candidate: str = ""
    layers: layerwise.PerLayer | None = None  # --per-layer (diagnostic, not the gate)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def worst_ratio(self) -> float:
        """max over outputs of max_abs / max|reference| (0 when the reference is all zeros)."""
        return max((o.max_abs / o.max_ref if o.max_ref else 0.0) for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; a metric that is NaN/Inf becomes None (``null``: strict JSON)."""
        d = dataclasses.asdict(self)
        for o in d["outputs"]:
            for k, v in o.items():
                if isinstance(v, float) and not np.isfinite(v):
                    o[k] = None
        d["passed"] = self.passed
        d["layers"] = self.layers.to_dict() if self.layers is not None else None
        return d

    def table(self) -> str:
        """Plain-text table (what the CLI prints)."""
        lines = [
            f"{'output':<28} {'max_abs':>10} {'max_rel':>10} {'max|ref|':>10} {'cosine':>12} "
            f"{'top1':>6} {'top5':>6}  result"
        ]
        for o in self.outputs:
            t1 = f"{o.top1:.3f}" if o.top1 is not None else "-"
            t5 = f"{o.top5:.3f}" if o.top5 is not None else "-"
            res = "PASS" if o.passed else ("FAIL (NaN/Inf)" if not o.finite else "FAIL")
            lines.append(
                f"{o.name[:28]:<28} {o.max_abs:>10.3g} {o.max_rel:>10.3g} {o.max_ref:>10.3g} "
                f"{o.cosine:>12.9f} {t1:>6} {t5:>6}  {res}"
            )
        lines.append(
            f"{'PASS' if self.passed else 'FAIL'}: {self.samples} sample(s); gate max_abs <= "
            f"{self.atol:g} + {self.rtol:g} x max|ref|; worst max_abs/max|ref| = "
            f"{self.worst_ratio:.3g}"
        )
        if self.layers is not None:
            lines += ["", self.layers.table()]
        return "\n".join(lines)


def compare_outputs(
    ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], atol: float, rtol: float
) -> VerifyResult:
    """Compare two dicts of outputs by name (the reference's names and order)."""
    missing = [n for n in ref if n not in got]
    if missing:
        raise BnfoldError(f"candidate has no output(s) {missing}")
    return VerifyResult([measure(n, ref[n], got[n], atol, rtol) for n in ref], atol, rtol)


def _concat(runs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(runs) == 1:
        return runs[0]
    return {k: np.concatenate([r[k] for r in runs], axis=0) for k in runs[0]}


def _split_batches(proto: onnx.ModelProto, feeds: Feeds) -> list[Feeds]:
    """Split a stacked sample set when the model's batch dimension is fixed smaller."""
    fixed = {}
    for vi in graph_inputs(proto):
        dims = vi.type.tensor_type.shape.dim
        if dims and _static(dims[0]):
            fixed[vi.name] = dims[0].dim_value
    batch = {n: a.shape[0] for n, a in feeds.items() if a.ndim > 0}
    if not fixed or not batch:
        return [feeds]
    b = next(iter(fixed.values()))
    n = next(iter(batch.values()))
    if n == b or b <= 0 or n % b or any(v != n for v in batch.values()):
        return [feeds]
    return [{k: v[i : i + b] for k, v in feeds.items()} for i in range(0, n, b)]


def _samples(feeds: Feeds) -> int:
    """Samples in one feed set: the first array's first dimension (1 for a 0-d input)."""
    first = next(iter(feeds.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim > 0 else 1


def verify(
    reference: ModelLike,
    candidate: ModelLike | Callable[[Feeds], dict[str, np.ndarray]],
    *,
    inputs: str | os.PathLike[str] | Feeds | None = None,
    random: int = 1,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    atol: float = 1e-6,
    rtol: float = 1e-5,
    seed: int = 0,
    max_size_bytes: int | None = None,
    per_layer: bool = False,
) -> VerifyResult:
    """Run ``reference`` (onnxruntime, optimizations off) and ``candidate`` and compare.

    Args:
        reference: The original model (path, bytes, ModelProto or IR model).
        candidate: A model like ``reference``, or a callable ``feeds -> outputs`` (a compiled
            artifact).
        inputs: An ``.npz``/``.npy`` path or a dict of arrays; if None, ``random`` random sets.
        random: Number of random input sets when ``inputs`` is None.
        shapes: Concrete shapes for dynamic inputs (``{"x": (1, 3, 224, 224)}``).
        atol: Absolute tolerance of the gate.
        rtol: Tolerance relative to max|reference| of the gate.
        seed: Seed of the random inputs.
        max_size_bytes: Refuse a model file (with its external data) larger than this.
        per_layer: Also compare every intermediate tensor the two models share
            (:mod:`bnfold.per_layer`; ``result.layers``). The candidate must be a model.
    """
    ref_proto = _proto(reference, max_size_bytes)
    if inputs is None:
        if random < 1:
            raise BnfoldError("--random must be at least 1")
        concrete = input_shapes(ref_proto, shapes)
        feed_sets = [random_inputs(ref_proto, concrete, seed + i) for i in range(random)]
    else:
        feeds = load_inputs(inputs, ref_proto) if not isinstance(inputs, dict) else dict(inputs)
        feed_sets = _split_batches(ref_proto, feeds)
        if not feed_sets:
            raise BnfoldError(f"{inputs}: holds no samples (its arrays have 0 rows)")
    ref_bytes = _model_bytes(ref_proto)
    if callable(candidate) and not isinstance(candidate, (onnx.ModelProto, bytes)):
        run_candidate = candidate
    else:
        cand_bytes = _model_bytes(candidate, max_size_bytes)

        def run_candidate(f: Feeds) -> dict[str, np.ndarray]:
            return run_onnxruntime(cand_bytes, f)

    ref_runs = [run_onnxruntime(ref_bytes, f) for f in feed_sets]
    cand_runs = [run_candidate(f) for f in feed_sets]
    result = compare_outputs(_concat(ref_runs), _concat(cand_runs), atol, rtol)
    result.samples = (
        sum(_samples(f) for f in feed_sets)
        if inputs is not None
        else len(feed_sets)
    )
    result.reference = str(reference) if isinstance(reference, (str, os.PathLike)) else ""
    result.candidate = str(candidate) if isinstance(candidate, (str, os.PathLike)) else ""
    if per_layer:
        if callable(candidate) and not isinstance(candidate, (onnx.ModelProto, bytes)):
            raise BnfoldError("--per-layer compares two ONNX models, not a compiled artifact")
        cand_proto = _proto(candidate, max_size_bytes)
        result.layers = layerwise.compare(ref_proto, cand_proto, feed_sets, atol, rtol)
    logger.info("verify: %s", "PASS" if result.passed else "FAIL")
    return result
