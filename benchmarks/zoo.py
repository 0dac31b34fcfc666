"""A zoo of real CNN architectures as test and benchmark material (``make zoo``).

    python -m benchmarks.zoo --cache .cache/zoo [--only resnet18,densenet121]
        [--styles ts,ts_bn,dynamo] [--ci] [--retry] [--timeout 300]

Each architecture comes from torchvision's model definitions with seeded random weights and
randomized BatchNormalization statistics (running mean ~ N(0, 0.2), running var ~ U[0.3, 1.8],
gamma ~ U[0.4, 1.6], beta ~ N(0, 0.2)), so that a wrong fold shows; batch 1, eval mode. Every
architecture is exported the three ways users export, into ``<arch>.<style>.onnx``:

* ``ts``: the TorchScript exporter in eval mode (``dynamo=False``), which folds Conv+BN itself;
  BNs that follow a Concat/Add/ReLU stay.
* ``ts_bn``: the TorchScript exporter with ``training=TrainingMode.PRESERVE`` (the model still
  in eval mode): every BN stays, as models from Paddle, tf2onnx and most converters arrive.
* ``dynamo``: the dynamo exporter (``dynamo=True``, torch's default), whose graphs are spelled
  differently (no Constant nodes, other op spellings); saved as one self-contained file.

``index.json`` records per file: sha256, input shape, export seconds, BN and node counts,
opset, and how far onnxruntime's output of the file is from torch's (a check on the exporter,
not on bnfold). An export that fails or runs past ``--timeout`` is recorded with its reason
(data, not a crash) and not retried unless ``--retry``; what exists is skipped, and every file is
written to a temporary name and moved into place, so an interrupted build leaves no partial file.

How torchvision runs beside the local CPU torch (see ../shared/notes/model-zoo.md): torch 2.13's
matching ``torchvision==0.28.0`` wheel is fetched with ``pip download --no-deps`` (pip never
resolves its dependencies, which would pull a CUDA torch) and unpacked into
``CACHE/torchvision-site``, never installed into the venv. Its C extensions are linked against the
CUDA torch, so they are deleted, and the two ``register_fake`` decorators of NMS ops (which no
classification or segmentation model uses) in ``_meta_registrations.py`` become no-ops. Only this
builder puts that folder on ``sys.path``; bnfold itself never imports torchvision.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.models import _fetch_wheel
from bnfold import atomic
from bnfold.artifact import sha256_file
from bnfold.deadline import deadline

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

TORCHVISION = ("torchvision", "0.28.0")  # torch 2.13.0's matching release
STYLES = ("ts", "ts_bn", "dynamo")
INDEX = "index.json"
SITE = "torchvision-site"
TS_OPSET = 17
DEFAULT_TIMEOUT_S = 300.0
# onnxruntime vs torch on the exported file, relative to max|torch|: above this the export is
# recorded as suspect (the exporter's problem, not bnfold's).
_EXPORT_RTOL = 1e-4


@dataclasses.dataclass(frozen=True)
class Arch:
    """One architecture: torchvision builder name, input shape, what conv families it shows."""

    name: str
    families: tuple[str, ...]
    shape: tuple[int, ...] = (1, 3, 224, 224)
    segmentation: bool = False
    kwargs: tuple[tuple[str, Any], ...] = ()
    # torchvision builder when ``name`` is a variant of it.
    builder: str | None = None
    # Strided convs pad TF-"same" (asymmetric, via F.pad), as TF-ported models do.
    tf_same: bool = False


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("resnet18", ("residual",)),
        Arch("resnet50", ("residual", "bottleneck")),
        Arch("resnext50_32x4d", ("residual", "grouped")),
        Arch("wide_resnet50_2", ("residual", "wide")),
        Arch("mobilenet_v2", ("depthwise", "relu6")),
        Arch("mobilenet_v3_small", ("depthwise", "se", "hardswish")),
        Arch("mobilenet_v3_large", ("depthwise", "se", "hardswish")),
        Arch("efficientnet_b0", ("depthwise", "se", "silu")),
        Arch("efficientnet_b1", ("depthwise", "se", "silu", "240px"), (1, 3, 240, 240)),
        Arch("efficientnet_v2_s", ("fused-mbconv", "depthwise", "se", "silu")),
        Arch("regnet_x_400mf", ("grouped",)),
        Arch("regnet_y_400mf", ("grouped", "se")),
        Arch("mnasnet0_5", ("depthwise",)),
        Arch("mnasnet1_0", ("depthwise",)),
        Arch("shufflenet_v2_x1_0", ("depthwise", "channel-shuffle", "concat")),
        Arch("squeezenet1_1", ("concat", "no-bn")),
        Arch("densenet121", ("concat-heavy", "bn-after-concat")),
        Arch("googlenet", ("concat", "pool-with-padding"), kwargs=(("aux_logits", False),
                                                                  ("init_weights", True))),
        Arch("inception_v3", ("asymmetric-1x7-7x1", "concat", "299px"), (1, 3, 299, 299),
             kwargs=(("aux_logits", False), ("init_weights", True))),
        Arch("vgg11_bn", ("plain", "large-dense")),
        Arch("alexnet", ("plain", "large-strided-stem", "no-bn")),
        Arch("convnext_tiny", ("depthwise-7x7", "layernorm", "gelu", "no-bn")),
        Arch("lraspp_mobilenet_v3_large", ("segmentation", "dilated", "se", "resize"),
             segmentation=True),
        Arch("deeplabv3_mobilenet_v3_large", ("segmentation", "dilated", "aspp", "resize"),
             segmentation=True),
        Arch("fcn_resnet50", ("segmentation", "dilated", "residual", "resize"),
             segmentation=True),
        Arch("resnet101", ("residual", "deep")),
        Arch("regnet_y_800mf", ("grouped", "se")),
        Arch("densenet169", ("concat-heavy", "bn-after-concat")),
        Arch("shufflenet_v2_x0_5", ("depthwise", "channel-shuffle", "concat")),
        Arch("efficientnet_b0_tfsame", ("depthwise", "se", "silu", "pad-subgraph"),
             builder="efficientnet_b0", tf_same=True),
    )
}  # fmt: skip

# The representative third that `make test` builds and compiles (one export style each, the
# styles spread over it): grouped + SE, depthwise + SE + HardSwish, SE + SiLU, asymmetric 1x7/7x1,
# dilated + resize, concat-heavy with BN after Concat, channel shuffle, plain residual, a model
# without any BN, and Pad amounts from a constant subgraph (TF-"same" padding), chosen among the
# small members of each family to fit CI's time.
CI: tuple[tuple[str, str], ...] = (
    ("regnet_y_400mf", "ts_bn"),
    ("mobilenet_v3_small", "dynamo"),
    ("efficientnet_b0", "ts"),
    ("inception_v3", "dynamo"),
    ("lraspp_mobilenet_v3_large", "ts_bn"),
    ("densenet121", "ts"),
    ("shufflenet_v2_x1_0", "dynamo"),
    ("resnet18", "ts_bn"),
    ("squeezenet1_1", "ts"),
    ("efficientnet_b0_tfsame", "ts"),
)


class ZooError(RuntimeError):
    """The zoo cannot be built at all (torchvision unavailable, bad arguments)."""


def file_name(arch: str, style: str) -> str:
    """``<arch>.<style>.onnx``."""
    return f"{arch}.{style}.onnx"


def read_index(cache: Path) -> dict[str, Any]:
    """The cache's index (``{"models": {}}`` when there is none yet)."""
    path = Path(cache) / INDEX
    if not path.is_file():
        return {"models": {}}
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------
# torchvision beside the CPU torch


def torchvision_site(cache: Path) -> Path:
    """``CACHE/torchvision-site``: torchvision's pure-Python code, patched to import without its
    CUDA-linked C extensions (built once; a stamp file marks a complete folder)."""
    site = Path(cache) / SITE
    stamp = site / f".bnfold-zoo-{TORCHVISION[1]}"
    if stamp.is_file():
        return site
    wheel = _fetch_wheel(Path(cache), *TORCHVISION)
    with tempfile.TemporaryDirectory(prefix=".site-", dir=cache) as tmp:
        staged = Path(tmp) / SITE
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(staged)
        # _C.so, image.so, ... link libtorch_cuda.so: absent, torchvision falls back to
        # "extension not available", which only NMS/IO/video ops need.
        for so in (staged / "torchvision").glob("*.so"):
            so.unlink()
        meta = staged / "torchvision" / "_meta_registrations.py"
        text, n = re.subn(r"^@torch\.library\.register_fake\(",
                          "@(lambda *_a, **_k: (lambda f: f))(", meta.read_text(),
                          flags=re.MULTILINE)  # fmt: skip
        if n != 2:
            raise ZooError(f"{meta.name} of torchvision {TORCHVISION[1]}: expected 2 "
                           f"register_fake decorators, found {n}")  # fmt: skip
        meta.write_text(text)
        (staged / stamp.name).write_text(f"{wheel.name}: *.so deleted, register_fake no-op\n")
        if site.exists():  # an incomplete folder from an interrupted run
            shutil.rmtree(site)
        os.replace(staged, site)
    logger.info("unpacked %s into %s", wheel.name, site)
    return site


def import_torchvision(cache: Path) -> ModuleType:
    """Import the patched torchvision of ``CACHE/torchvision-site`` (first on ``sys.path``)."""
    site = torchvision_site(cache)
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    import warnings

    with warnings.catch_warnings():
        # "Failed to load image Python extension": expected, the .so files were deleted.
        warnings.simplefilter("ignore", UserWarning)
        import torchvision
    if Path(torchvision.__file__).resolve().parent != (site / "torchvision").resolve():
        raise ZooError(f"imported torchvision from {torchvision.__file__}, not {site}; "
                       "an installed torchvision shadows the zoo's")  # fmt: skip
    return torchvision


# --------------------------------------------------------------------------------------------
# Models


def seed_of(arch: str) -> int:
    """A fixed seed per architecture (the same model whatever subset is built)."""
    return zlib.crc32(arch.encode())


def randomize_bn(model: torch.nn.Module, gen: torch.Generator) -> int:
    """Give every BatchNorm non-trivial statistics and affine parameters; returns the count."""
    import torch

    n = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.3)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=gen) * 1.2 + 0.4)
                    m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
                n += 1
    return n


def build_model(tv: ModuleType, arch: Arch) -> torch.nn.Module:
    """The architecture in eval mode with seeded random weights and randomized BN statistics;
    a segmentation model returns only its ``out`` map."""
    import torch

    torch.manual_seed(seed_of(arch.name))
    kwargs: dict[str, Any] = {"weights": None, **dict(arch.kwargs)}
    if arch.segmentation:
        kwargs.update(weights_backbone=None, aux_loss=False)
        if arch.name.startswith("lraspp"):
            kwargs.pop("aux_loss")  # LR-ASPP has no auxiliary head
    model = tv.models.get_model(arch.builder or arch.name, **kwargs)
    if arch.tf_same:
        _tf_same_padding(model)
    randomize_bn(model, torch.Generator().manual_seed(seed_of(arch.name) + 1))
    if arch.segmentation:
        model = _out_only(model)
    return model.eval()


def _out_only(model: torch.nn.Module) -> torch.nn.Module:
    """Wrap a segmentation model so that its forward returns the ``out`` tensor, not a dict."""
    import torch

    class OutOnly(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)["out"]

    return OutOnly(model)


def _tf_same_padding(model: torch.nn.Module) -> int:
    """Make every strided Conv2d pad TF-"same" (the extra row/column at the bottom/right, through
    ``F.pad``) instead of symmetrically; returns how many. This is how TF-ported models (timm's
    ``tf_*`` EfficientNets, EfficientNet-Lite) arrive: torch exports the pad amounts as a small
    constant subgraph feeding ``Pad``."""
    import math

    import torch
    import torch.nn.functional as F

    class Conv2dSame(torch.nn.Module):
        def __init__(self, conv: torch.nn.Conv2d) -> None:
            super().__init__()
            conv.padding = (0, 0)
            self.conv = conv

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pads = []
            for i, k, s, d in zip(x.shape[-2:], self.conv.kernel_size, self.conv.stride,
                                  self.conv.dilation, strict=True):  # fmt: skip
                total = max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
                pads.append((total // 2, total - total // 2))
            (top, bottom), (left, right) = pads
            return self.conv(F.pad(x, [left, right, top, bottom]))

    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Conv2d) and max(child.stride) > 1:
                setattr(parent, name, Conv2dSame(child))
                n += 1
    return n


def model_input(arch: Arch) -> np.ndarray:
    """The seeded input the export is checked on."""
    rng = np.random.default_rng(seed_of(arch.name))
    return rng.standard_normal(arch.shape).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Export


def export(model: torch.nn.Module, x: np.ndarray, style: str, dest: Path) -> None:
    """Export ``model`` at input ``x`` in ``style`` to the single self-contained file ``dest``."""
    import onnx
    import torch

    args = (torch.from_numpy(x),)
    names = {"input_names": ["input"], "output_names": ["output"]}
    with tempfile.TemporaryDirectory(prefix=".export-", dir=dest.parent) as tmp:
        raw = Path(tmp) / "model.onnx"
        # The dynamo exporter prints its optimizer's progress; the index records what matters.
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            if style == "dynamo":
                torch.onnx.export(model, args, str(raw), dynamo=True, verbose=False,
                                  external_data=False, **names)  # fmt: skip
            elif style in ("ts", "ts_bn"):
                mode = torch.onnx.TrainingMode.PRESERVE if style == "ts_bn" else (
                    torch.onnx.TrainingMode.EVAL)  # fmt: skip
                torch.onnx.export(model, args, str(raw), dynamo=False, training=mode,
                                  opset_version=TS_OPSET, **names)  # fmt: skip
            else:
                raise ZooError(f"unknown style {style!r}; expected one of {STYLES}")
        # Whatever the exporter wrote beside it (external data), one file comes out (< 2 GB).
        proto = onnx.load(str(raw), load_external_data=True)
        with atomic.atomic_path(dest) as part:
            onnx.save(proto, str(part), save_as_external_data=False)


def _check_export(path: Path, x: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """Counts of the exported file and onnxruntime's deviation from torch on it."""
    import onnx

    from bnfold.check import run_onnxruntime

    proto = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in proto.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]  # fmt: skip
    if external:
        raise ZooError(f"{path.name} is not self-contained: {len(external)} external tensors")
    got = next(iter(run_onnxruntime(path, {proto.graph.input[0].name: x}).values()))
    scale = float(np.max(np.abs(ref)))
    ratio = float(np.max(np.abs(got - ref))) / scale if scale else float("inf")
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {
        "bn_count": ops.get("BatchNormalization", 0),
        "nodes": len(proto.graph.node),
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0),
        "ort_vs_torch": ratio,
        "ort_vs_torch_ok": bool(np.isfinite(ratio) and ratio <= _EXPORT_RTOL),
        "max_abs_ref": scale,
    }


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def build(
    cache: Path,
    pairs: list[tuple[str, str]],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    retry: bool = False,
) -> dict[str, Any]:
    """Export every ``(arch, style)`` not already in the cache; returns the updated index."""
    import torch

    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    tv = import_torchvision(cache)
    torch.set_num_threads(os.cpu_count() or 1)
    t_start = time.perf_counter()
    built = failed = 0
    by_arch: dict[str, list[str]] = {}
    for arch, style in pairs:
        by_arch.setdefault(arch, []).append(style)
    for name, styles in by_arch.items():
        arch = ARCHS[name]
        todo = []
        for style in styles:
            key = f"{name}.{style}"
            entry = read_index(cache)["models"].get(key)
            path = cache / file_name(name, style)
            status = None if entry is None else entry["status"]
            if (status == "failed" and not retry) or (status == "ok" and path.is_file()):
                continue
            todo.append(style)
        if not todo:
            continue
        t0 = time.perf_counter()
        model = build_model(tv, arch)
        x = model_input(arch)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        build_s = time.perf_counter() - t0
        for style in todo:
            key = f"{name}.{style}"
            path = cache / file_name(name, style)
            entry: dict[str, Any] = {
                "arch": name, "style": style, "file": path.name, "families": list(arch.families),
                "input": {"name": "input", "shape": list(arch.shape)},
                "output_shape": list(ref.shape), "seed": seed_of(name),
                "model_build_s": round(build_s, 2),
            }  # fmt: skip
            t1 = time.perf_counter()
            try:
                # The same SIGALRM limit bnfold puts on RPC calls.
                with deadline(timeout_s, f"exporting {path.name}"):
                    export(model, x, style, path)
                entry["export_s"] = round(time.perf_counter() - t1, 2)
                entry.update(_check_export(path, x, ref))
                entry["sha256"] = sha256_file(path)
                entry["bytes"] = path.stat().st_size
                entry["status"] = "ok"
                built += 1
                logger.info("%-40s %6.1f s  %5d nodes %4d BN  ort/torch %.1e", path.name,
                            entry["export_s"], entry["nodes"], entry["bn_count"],
                            entry["ort_vs_torch"])  # fmt: skip
            except Exception as exc:  # an export failing is data, not a crash
                path.unlink(missing_ok=True)
                entry.update(status="failed", reason=_one_line(exc),
                             export_s=round(time.perf_counter() - t1, 2))  # fmt: skip
                failed += 1
                logger.warning("%-40s FAILED after %.1f s: %s", path.name, entry["export_s"],
                               entry["reason"])  # fmt: skip
            _update_index(cache, {key: entry})
        del model
    total = time.perf_counter() - t_start
    index = _update_index(cache, {}, last_build={
        "seconds": round(total, 1), "exported": built, "failed": failed,
        "requested": len(pairs), "cpu_count": os.cpu_count(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })  # fmt: skip
    logger.info("zoo: %d exported, %d failed, %d requested, in %.1f s", built, failed,
                len(pairs), total)  # fmt: skip
    return index


def _update_index(cache: Path, entries: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Merge ``entries`` into the index on disk (read again: another build may have written)."""
    import onnx
    import torch

    index = read_index(cache)
    index["models"].update(entries)
    index.update(extra)
    index["versions"] = {"torch": torch.__version__, "torchvision": TORCHVISION[1],
                         "onnx": onnx.__version__, "python": platform.python_version()}  # fmt: skip
    index["ts_opset"] = TS_OPSET
    atomic.write_json(cache / INDEX, index)
    return index


def select(only: str | None, styles: str | None, ci: bool) -> list[tuple[str, str]]:
    """The ``(arch, style)`` pairs to build."""
    chosen_styles = STYLES if not styles else tuple(s for s in styles.split(",") if s)
    bad = [s for s in chosen_styles if s not in STYLES]
    if bad:
        raise ZooError(f"unknown style(s) {bad}; expected {list(STYLES)}")
    names = list(ARCHS) if not only else [n for n in only.split(",") if n]
    unknown = [n for n in names if n not in ARCHS]
    if unknown:
        raise ZooError(f"unknown architecture(s) {unknown}; known: {', '.join(ARCHS)}")
    if ci:
        return [(a, s) for a, s in CI if (not only or a in names) and s in chosen_styles]
    return [(a, s) for a in names for s in chosen_styles]


def main(argv: list[str] | None = None) -> int:
    """Build the zoo; exit 0 even when some exports failed (they are recorded), 2 on bad use."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(".cache/zoo"))
    parser.add_argument("--only", help="comma-separated architectures (default: all)")
    parser.add_argument("--styles", help=f"comma-separated subset of {','.join(STYLES)}")
    parser.add_argument("--ci", action="store_true", help="only the CI third (see CI)")
    parser.add_argument("--retry", action="store_true", help="export recorded failures again")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds one export may take before it is recorded as failed")
    parser.add_argument("--list", action="store_true", help="print the architectures and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("torch", "onnxscript", "torch.onnx", "torch._dynamo", "torch.export"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.list:
        for a in ARCHS.values():
            print(f"{a.name:<30} {'x'.join(map(str, a.shape)):<12} {', '.join(a.families)}")
        return 0
    try:
        pairs = select(args.only, args.styles, args.ci)
        build(args.cache, pairs, timeout_s=args.timeout, retry=args.retry)
    except ZooError as exc:
        print(f"zoo: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
