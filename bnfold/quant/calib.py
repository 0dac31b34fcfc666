"""Calibration and evaluation data: a folder of images, or an ``.npz``/``.npy`` of ready inputs.

Images (``.jpg``, ``.jpeg``, ``.png``, ``.bmp`` at the top of the folder, in name order) are
preprocessed as the model's training pipeline would, in this order::

    decode -> RGB (or grayscale for 1-channel inputs) -> resize -> center crop
           -> x * scale -> (x - mean) / std -> BGR if asked -> NCHW or NHWC

``resize`` is either a short-side length (aspect kept, torchvision's ``Resize(256)``) or an
exact ``HxW``; without it the image is resized straight to the crop size. The crop defaults to
the model input's height and width. ImageNet models usually want ``resize=256, crop=224,
mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)`` with the default ``scale=1/255``.

Arrays: an ``.npz`` holds one array per model input, an ``.npy`` the single input; the first
axis counts samples. Every sample must match the model's static dimensions.

Every problem (missing or empty folder, unreadable image, wrong shape or dtype, NaN) raises
:class:`BnfoldError` with one line that names the file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx

from bnfold.errors import BnfoldError
from bnfold.quant.options import LAYOUTS, Preprocess

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
}


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A model input: name, shape (None for a dynamic dimension) and numpy dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: type[np.generic]

    @property
    def batch(self) -> int | None:
        """The static batch size, or None when the batch dimension is dynamic."""
        return self.shape[0] if self.shape else None


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (initializers excluded)."""
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in tt.shape.dim
        )
        dtype = _FLOAT_TYPES.get(tt.elem_type)
        if dtype is None:
            name = onnx.TensorProto.DataType.Name(tt.elem_type)
            raise BnfoldError(f"input '{vi.name}' is {name}: calibration needs float inputs")
        specs.append(InputSpec(vi.name, dims, dtype))
    return specs


def _channels(values: tuple[float, ...], c: int, what: str) -> np.ndarray:
    if len(values) not in (1, c):
        raise BnfoldError(f"--{what} has {len(values)} values; the model input has {c} channels")
    return np.asarray(values if len(values) == c else values * c, np.float32)


def image_geometry(spec: InputSpec, pre: Preprocess) -> tuple[str, int, tuple[int, int]]:
    """``(layout, channels, (height, width))`` of an image input, or BnfoldError."""
    if len(spec.shape) != 4:
        raise BnfoldError(
            f"input '{spec.name}' has rank {len(spec.shape)}; an image folder needs a 4-D input"
        )
    _, d1, d2, d3 = spec.shape
    layout = pre.layout
    if layout is None:
        layout = "NHWC" if d3 in (1, 3) and d1 not in (1, 3) else "NCHW"
    if layout not in LAYOUTS:
        raise BnfoldError(f"layout '{layout}' is not one of {', '.join(LAYOUTS)}")
    c, h, w = (d1, d2, d3) if layout == "NCHW" else (d3, d1, d2)
    if c not in (1, 3):
        raise BnfoldError(
            f"input '{spec.name}' has {c} channels in {layout} layout; images give 1 or 3 "
            "(wrong --layout?)"
        )
    size = pre.crop or ((h, w) if h and w else None)
    if size is None:
        raise BnfoldError(f"input '{spec.name}' has a dynamic height/width; give --crop HxW")
    if h and w and tuple(size) != (h, w):
        raise BnfoldError(f"--crop {size[0]}x{size[1]} does not match the model's {h}x{w}")
    return layout, c, (int(size[0]), int(size[1]))


def preprocess_image(image: np.ndarray, spec: InputSpec, pre: Preprocess) -> np.ndarray:
    """One decoded uint8 image (HxW or HxWxC) as a model input sample (no batch axis)."""
    from PIL import Image

    layout, c, (ch, cw) = image_geometry(spec, pre)
    img = Image.fromarray(np.asarray(image, np.uint8))
    img = img.convert("L" if c == 1 else "RGB")
    if pre.resize is None:
        size = (ch, cw)
    elif isinstance(pre.resize, int):
        short = min(img.height, img.width)
        size = (round(img.height * pre.resize / short), round(img.width * pre.resize / short))
    else:
        size = (int(pre.resize[0]), int(pre.resize[1]))
    if size[0] < ch or size[1] < cw:
        raise BnfoldError(f"resize gives {size[0]}x{size[1]}, smaller than the {ch}x{cw} crop")
    if (img.height, img.width) != size:
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    top, left = (size[0] - ch) // 2, (size[1] - cw) // 2
    x = np.asarray(img, np.float32)[top : top + ch, left : left + cw]
    if x.ndim == 2:
        x = x[..., None]
    x = (x * np.float32(pre.scale) - _channels(pre.mean, c, "mean")) / _channels(pre.std, c, "std")
    if pre.bgr:
        x = x[..., ::-1]
    if layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x, dtype=spec.dtype)


def list_images(folder: Path) -> list[Path]:
    """The image files at the top of ``folder``, in name order; BnfoldError if there are none."""
    if not folder.is_dir():
        raise BnfoldError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        extra = f" ({len(files)} other file(s))" if files else ""
        raise BnfoldError(f"{folder}: no {'/'.join(IMAGE_SUFFIXES)} images in the folder{extra}")
    return images


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to uint8 RGB (HxWx3); BnfoldError naming the file if it cannot."""
    try:
        from PIL import Image
    except ImportError:
        raise BnfoldError("reading images needs pillow (pip install pillow)") from None
    try:
        # Pillow warns about what it then handles (a palette PNG with transparency, an image
        # over its decompression-bomb pixel count): logged, not printed around the CLI's lines.
        with warnings.catch_warnings(record=True) as caught, Image.open(path) as img:
            warnings.simplefilter("always")
            img.load()
            rgb = np.asarray(img.convert("RGB"))
        for w in caught:
            logger.info("%s: %s", path, w.message)
        return rgb
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BnfoldError(f"{path}: cannot read image ({msg})") from None


def load_images(
    folder: Path,
    spec: InputSpec,
    pre: Preprocess,
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Feeds]:
    """Read and preprocess up to ``limit`` images of ``folder``: one batch-1 feed each."""
    image_geometry(spec, pre)  # fail on a bad layout before reading anything
    samples = []
    for path in list_images(folder)[:limit]:
        x = preprocess_image(read_image(path), spec, pre)
        samples.append({spec.name: x[None]})
        if progress is not None:
            progress(1)
    logger.info("read %d image(s) from %s", len(samples), folder)
    return samples


def _check_array(path: Path, spec: InputSpec, a: np.ndarray) -> np.ndarray:
    if a.dtype.kind not in "fiu":
        raise BnfoldError(f"{path}: input '{spec.name}' has dtype {a.dtype}, not numbers")
    if a.ndim == len(spec.shape) - 1:
        a = a[None]  # a single sample without its batch axis
    want = "x".join("N" if d is None else str(d) for d in spec.shape)
    if a.ndim != len(spec.shape) or any(
        d is not None and d != n for d, n in zip(spec.shape[1:], a.shape[1:], strict=True)
    ):
        raise BnfoldError(
            f"{path}: input '{spec.name}' has shape {'x'.join(map(str, a.shape))}, "
            f"the model wants {want} (first axis: samples)"
        )
    if a.shape[0] == 0:
        raise BnfoldError(f"{path}: input '{spec.name}' has no samples")
    a = a.astype(spec.dtype, copy=False)
    if not np.all(np.isfinite(a)):
        raise BnfoldError(f"{path}: input '{spec.name}' has NaN or Inf values")
    return a


def load_arrays(path: Path, specs: Sequence[InputSpec], limit: int | None = None) -> list[Feeds]:
    """Read an ``.npz`` (one array per input) or ``.npy`` (single input): one feed per sample."""
    if not path.is_file():
        raise BnfoldError(f"{path}: no such file")
    names = [s.name for s in specs]
    try:
        if path.suffix.lower() == ".npy":
            if len(specs) != 1:
                raise BnfoldError(f"{path}: an .npy feeds one input; the model has {names}")
            arrays = {names[0]: np.load(path, allow_pickle=False)}
        else:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
    except BnfoldError:
        raise
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BnfoldError(f"{path}: cannot read arrays ({msg})") from None
    missing = [n for n in names if n not in arrays]
    if missing:
        raise BnfoldError(f"{path}: no array for input(s) {missing} (has {sorted(arrays)})")
    checked = {s.name: _check_array(path, s, arrays[s.name]) for s in specs}
    counts = {len(a) for a in checked.values()}
    if len(counts) != 1:
        raise BnfoldError(f"{path}: the arrays have different sample counts {sorted(counts)}")
    n = min(counts.pop(), limit) if limit else counts.pop()
    return [{k: a[i : i + 1] for k, a in checked.items()} for i in range(n)]


def load_samples(
    source: str | os.PathLike[str],
    specs: Sequence[InputSpec],
    pre: Preprocess | None = None,
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Feeds]:
    """Calibration or evaluation samples from a folder of images or an ``.npz``/``.npy`` file.

    Returns one feed per sample, each with a batch axis of 1.
    """
    path = Path(source)
    if limit is not None and limit < 1:
        raise BnfoldError(f"the sample limit must be at least 1, not {limit}")
    if path.is_dir():
        if len(specs) != 1:
            raise BnfoldError(
                f"{path}: an image folder feeds one input; the model has "
                f"{[s.name for s in specs]} (give an .npz)"
            )
        return load_images(path, specs[0], pre or Preprocess(), limit, progress)
    if path.suffix.lower() in (".npz", ".npy"):
        samples = load_arrays(path, specs, limit)
        if progress is not None:
            progress(len(samples))
        return samples
    if not path.exists():
        raise BnfoldError(f"{path}: no such file or folder")
    raise BnfoldError(f"{path}: expected a folder of images, an .npz or an .npy")


def batches(samples: Sequence[Feeds], specs: Sequence[InputSpec], size: int = 8) -> list[Feeds]:
    """Group batch-1 samples into batches the model accepts.

    A dynamic batch dimension takes up to ``size`` samples per batch; a static one exactly its
    value (the last samples that do not fill a batch are dropped, with a warning).
    """
    static = {s.batch for s in specs if s.batch is not None}
    if len(static) > 1:
        raise BnfoldError(f"the model's inputs have different batch sizes {sorted(static)}")
    fixed = static.pop() if static else None
    n = fixed or size
    full = len(samples) // n * n if fixed else len(samples)
    if full == 0:
        raise BnfoldError(f"the model takes batches of {n}; only {len(samples)} sample(s) given")
    if full < len(samples):
        logger.warning(
            "the model takes batches of %d: %d sample(s) left out", n, len(samples) - full
        )
    out = []
    for i in range(0, full, n):
        group = samples[i : i + n]
        out.append({k: np.concatenate([g[k] for g in group], axis=0) for k in group[0]})
    return out


def split(samples: Sequence[Feeds], eval_fraction: float) -> tuple[list[Feeds], list[Feeds]]:
    """``(calibration, evaluation)``: every ``round(1 / eval_fraction)``-th sample is held out.

    Interleaving (rather than a tail) spreads the held-out samples over the folder's order.
    """
    if not 0 < eval_fraction < 1:
        raise BnfoldError(f"the held-out fraction must be in (0, 1), not {eval_fraction}")
    if len(samples) < 2:
        raise BnfoldError(
            f"{len(samples)} sample(s) cannot be split into calibration and evaluation"
        )
    step = max(2, round(1 / eval_fraction))
    held_at = {i for i in range(len(samples)) if i % step == step - 1} or {len(samples) - 1}
    kept = [s for i, s in enumerate(samples) if i not in held_at]
    held = [s for i, s in enumerate(samples) if i in held_at]
    return kept, held
