"""int8 accuracy of ImageNet MobileNetV2 on real images: onnxruntime's quantizer vs bnfold.

    python -m benchmarks.int8_accuracy [--cache .cache/models] [--out out/int8_accuracy]

The data: 11 photographs of things (objects, an animal, scenes) that ship with scikit-image /
scikit-learn, 9 views of each (ImageNet center crop, the whole short side, a zoom, each with
its mirror image, and three off-center crops): 54 calibration and 45 evaluation samples. The
split is by photo (``CALIBRATION`` / ``EVALUATION``): no view of an evaluation photo is ever
seen by a calibrator. Seven pictures with no ImageNet object (microscopy, astronomy, textures,
a silhouette) are a second, separate evaluation set ("non-objects"), reported in its own
column.

Measured side by side, each against the fp32 model on the held-out views (onnxruntime with
optimizations off, which runs a QDQ model exactly as written):

(a) onnxruntime ``quantize_static``, per-channel QDQ, on the unfolded model;
(b) bnfold per-channel (fold -> CLE -> bias correction), and (b0) without CLE / correction;
(c) bnfold per-tensor without CLE or bias correction;
(d) bnfold per-tensor with CLE and bias correction.

All use uint8 activations, int8 weights and min-max calibration unless the row says otherwise.
``top-1 ORT-int8`` is the same model run by onnxruntime with optimizations on (its integer
kernels; u8 x s8 on AVX2 can saturate, so this is informative, not the reference).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks.models import (
    _IMAGENET_MEAN,
    _IMAGENET_STD,
    _load_image,
    _resize,
    load_inputs,
    model_path,
)
from bnfold.check import run_onnxruntime
from bnfold.quant import calib
from bnfold.quant.quantize import quantize
from bnfold.quant.report import evaluate, plot_sqnr

logger = logging.getLogger(__name__)

# Photographs of things ImageNet has classes for (the stereo motorcycle pair stays in one split).
# The split is fixed here, by name: no view of an evaluation photo is seen by a calibrator.
CALIBRATION = ("astronaut", "coffee", "motorcycle_left", "motorcycle_right", "china", "clock")
EVALUATION = ("chelsea", "rocket", "camera", "flower", "coins")
# Not photographs of objects: microscopy, astronomy, textures, and a binary silhouette. No
# ImageNet class applies, and the fp32 model's answer is noise (top class probability ~0.1 with
# a logit margin ~0.1; on the horse silhouette 4 different classes over its 9 views), so top-1
# "agreement" there mostly measures that noise. Reported in its own column, never calibrated on.
NON_OBJECTS = (
    "hubble_deep_field", "immunohistochemistry", "retina", "moon", "gravel", "brick", "horse",
)  # fmt: skip
# (short side, crop position as a fraction of the slack (0.5 = centered), mirror)
VIEWS = ((256, 0.5, False), (256, 0.5, True), (224, 0.5, False), (224, 0.5, True),
         (320, 0.5, False), (320, 0.5, True), (288, 0.15, False), (288, 0.85, False),
         (288, 0.85, True))  # fmt: skip
CROP = 224


def view(image: np.ndarray, short: int, pos: float, mirror: bool) -> np.ndarray:
    """One ImageNet-preprocessed 3x224x224 view of a uint8 HxWx3 image."""
    h, w = image.shape[:2]
    scale = short / min(h, w)
    nh, nw = max(short, round(h * scale)), max(short, round(w * scale))
    x = _resize(image.astype(np.float32) / 255.0, nh, nw)
    top, left = round((nh - CROP) * pos), round((nw - CROP) * pos)
    x = x[top : top + CROP, left : left + CROP]
    if mirror:
        x = x[:, ::-1]
    x = (x - _IMAGENET_MEAN) / _IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def load_picture(name: str) -> np.ndarray:
    """A uint8 HxWx3 picture shipped with scikit-image or scikit-learn."""
    if name == "motorcycle_right":
        from skimage import data

        return data.stereo_motorcycle()[1]
    if name == "horse":  # a binary silhouette, black on white
        from skimage import data

        return np.repeat(data.horse()[..., None].astype(np.uint8) * 255, 3, axis=2)
    return _load_image(name)


def views(names: tuple[str, ...]) -> list[dict[str, np.ndarray]]:
    """Every view of every named picture, as batch-1 feeds."""
    return [{"input": view(load_picture(n), *v)[None]} for n in names for v in VIEWS]


def ort_quantize_static(model: Path, cal: list[dict[str, np.ndarray]]) -> onnx.ModelProto:
    """onnxruntime's own static quantizer, per-channel QDQ, on the unfolded model."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader:
        def __init__(self) -> None:
            self.it = iter(cal)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ort.int8.onnx"
        quantize_static(
            str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )  # fmt: skip
        return onnx.load(str(out))


def _top1(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.mean(ref.argmax(1) == got.argmax(1)))


def run(cache: Path, out: Path, methods: bool) -> list[dict[str, Any]]:
    """Every configuration; returns one row per configuration."""
    path = model_path(cache, "mobilenet_v2")
    t0 = time.perf_counter()
    cal, ev, hard = views(CALIBRATION), views(EVALUATION), views(NON_OBJECTS)
    logger.info("dataset: %d calibration, %d evaluation, %d non-object views (%.1f s)",
                len(cal), len(ev), len(hard), time.perf_counter() - t0)  # fmt: skip
    specs = calib.input_specs(onnx.load(str(path)))
    ev_batches = calib.batches(ev, specs, 8)
    x_ev = np.concatenate([f["input"] for f in ev])
    ref = run_onnxruntime(path, {"input": x_ev})["logits"]
    hard_feed = {"input": np.concatenate([f["input"] for f in hard])}
    ref_hard = run_onnxruntime(path, hard_feed)["logits"]
    # The 8-image set `make models` built: the fp32 model's own sanity check.
    sanity = run_onnxruntime(path, load_inputs(cache, "mobilenet_v2"))["logits"].argmax(1)
    logger.info("fp32 top-1 of the built input set: %s", sanity.tolist())
    rows: list[dict[str, Any]] = []

    def measure(tag: str, what: str, make: Callable[[], tuple[onnx.ModelProto, Any]]) -> None:
        start = time.perf_counter()
        model, report = make()
        seconds = time.perf_counter() - start
        got = run_onnxruntime(model, {"input": x_ev})["logits"]
        fast = run_onnxruntime(model, {"input": x_ev}, optimize=True)["logits"]
        row = {
            "config": tag,
            "what": what,
            "top1": _top1(ref, got),
            "top1_ort_int8": _top1(ref, fast),
            "top1_non_objects": _top1(ref_hard, run_onnxruntime(model, hard_feed)["logits"]),
            "top5": float(np.mean([t in r for t, r in zip(
                ref.argmax(1), np.argsort(-got, 1)[:, :5], strict=True)])),
            "cosine": float(np.mean(np.sum(ref * got, 1) / (
                np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)))),
            "seconds": round(seconds, 2),
        }  # fmt: skip
        if report is not None:
            acc = evaluate(path, model, report, ev_batches)
            row["min_layer_sqnr_db"] = min(r["sqnr_db"] for r in acc.layers)
            out.mkdir(parents=True, exist_ok=True)
            plot_sqnr(report, acc, out / f"sqnr_{tag}.png")
            (out / f"report_{tag}.json").write_text(
                json.dumps(report.to_dict(), indent=2, sort_keys=True, default=str)
            )
        rows.append(row)
        logger.info("%s: %s", tag, row)

    measure("a", "onnxruntime quantize_static per-channel QDQ, unfolded",
            lambda: (ort_quantize_static(path, cal), None))  # fmt: skip
    measure(
        "b0",
        "bnfold per-channel (no CLE, no bias correction)",
        lambda: quantize(path, cal, per_channel=True, cle=False, bias_correction=False),
    )
    measure("b", "bnfold per-channel + CLE + bias correction",
            lambda: quantize(path, cal, per_channel=True))  # fmt: skip
    measure(
        "c",
        "bnfold per-tensor, no CLE, no bias correction",
        lambda: quantize(path, cal, per_channel=False, cle=False, bias_correction=False),
    )
    measure("d", "bnfold per-tensor + CLE + bias correction",
            lambda: quantize(path, cal, per_channel=False))  # fmt: skip
    measure(
        "d-analytic",
        "bnfold per-tensor + CLE + analytic (data-free) bias correction",
        lambda: quantize(path, cal, per_channel=False, bias_correction="analytic"),
    )
    if methods:
        for method in ("percentile", "entropy"):
            measure(f"b-{method}", f"bnfold per-channel + CLE + bias correction, {method}",
                    lambda m=method: quantize(path, cal, method=m))  # fmt: skip
        measure(
            "b-p99.99",
            "bnfold per-channel + CLE + bias correction, percentile 99.99",
            lambda: quantize(path, cal, method="percentile", percentile=99.99),
        )
        measure("b-int8act", "bnfold per-channel + CLE + bias correction, int8 activations",
                lambda: quantize(path, cal, activation_type="int8"))  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path(".cache/models"))
    ap.add_argument("--out", type=Path, default=Path("out/int8_accuracy"))
    ap.add_argument("--no-methods", action="store_true", help="skip percentile/entropy rows")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")  # fmt: skip
    rows = run(args.cache, args.out, not args.no_methods)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(
        "| config | what | top-1 | top-5 | cosine | top-1 ORT int8 kernels | top-1 non-objects "
        "| s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['what']} | {r['top1']:.3f} | {r['top5']:.3f} | "
            f"{r['cosine']:.4f} | {r['top1_ort_int8']:.3f} | {r['top1_non_objects']:.3f} | "
            f"{r['seconds']:.1f} |"
        )
    print(f"wrote {args.out / 'results.json'} and the SQNR plots beside it")


if __name__ == "__main__":
    main()
