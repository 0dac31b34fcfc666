"""int8 accuracy of ImageNet MobileNetV2 on real images: onnxruntime's quantizer vs bnfold.

    python -m benchmarks.int8_accuracy [--cache .cache/models] [--out out/int8_accuracy]

The data: 12 photographs of things (objects, animals, people, scenes) that ship with
scikit-image, scikit-learn and matplotlib (every natural photograph they install; nothing is
downloaded). Calibration: 9 fixed views of each of the 6 ``CALIBRATION`` photos (ImageNet
center crop, the whole short side, a zoom, each with its mirror image, and three off-center
crops): 54 samples. Evaluation: 40 views of each of the 6 ``EVALUATION`` photos (the 9 fixed
views and 31 random resized crops, seeded by the photo's name): 240 samples. The split is by
photo: no view of an evaluation photo is ever seen by a calibrator. Seven pictures with no
ImageNet object (microscopy, astronomy, textures, a silhouette) are a second, separate
evaluation set ("non-objects"), reported in its own column.

``--paired FILE`` runs only bnfold's defaults (and without CLE / bias correction) against
onnxruntime ``quantize_static`` per-channel after ``quant_pre_process`` on both folds (each
split calibrates, the other is held out: 480 held-out views of 11 scenes), with the paired
statistics a 0.02 difference needs: McNemar's exact test on the per-view agreement and a
bootstrap over scenes (views of one photo are not independent) for the agreement and cosine
differences.

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
import zlib
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
EVALUATION = ("chelsea", "rocket", "camera", "flower", "coins", "grace_hopper")
# Every natural photograph installed with scikit-image, scikit-learn and matplotlib (no
# downloads): 12 photos, 11 independent scenes. The paired comparison (``--paired``) runs both
# folds, each split calibrating and the other held out, so every photo is held out once.
FOLDS = ((CALIBRATION, EVALUATION), (EVALUATION, CALIBRATION))
# Held-out views per photo: the 9 fixed VIEWS, then random resized crops (area 25-100% of the
# photo, aspect 3:4 to 4:3, mirrored half the time; seeded by the photo's name) up to this.
HELD_VIEWS = 40
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
    if name == "grace_hopper":  # matplotlib's sample photograph
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            from PIL import Image

            return np.asarray(Image.open(f).convert("RGB"))
    return _load_image(name)


def random_crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random resized crop (torchvision's RandomResizedCrop with area 25-100%, aspect 3:4
    to 4:3) and random mirror of a uint8 HxWx3 image, ImageNet-normalized to 3x224x224."""
    h, w = image.shape[:2]
    area = rng.uniform(0.25, 1.0) * h * w
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw, ch = min(w, round(np.sqrt(area * aspect))), min(h, round(np.sqrt(area / aspect)))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    x = _resize(image[top : top + ch, left : left + cw].astype(np.float32) / 255.0, CROP, CROP)
    if rng.random() < 0.5:
        x = x[:, ::-1]
    x = (x - _IMAGENET_MEAN) / _IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def held_views(names: tuple[str, ...], per_photo: int = HELD_VIEWS) -> tuple[list, np.ndarray]:
    """``per_photo`` views of each named picture (the fixed VIEWS, then random crops seeded by
    the name) as batch-1 feeds, and each view's scene (for a bootstrap over scenes: the stereo
    motorcycle pair is one scene)."""
    feeds, photo = [], []
    for n in names:
        image = load_picture(n)
        rng = np.random.default_rng(zlib.crc32(n.encode()))
        xs = [view(image, *v) for v in VIEWS[:per_photo]]
        xs += [random_crop(image, rng) for _ in range(per_photo - len(xs))]
        feeds += [{"input": x[None]} for x in xs]
        photo += [n.removesuffix("_left").removesuffix("_right")] * len(xs)
    return feeds, np.array(photo)


def mcnemar(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Exact McNemar test of paired booleans: ``a_only`` (a right, b wrong), ``b_only`` and the
    two-sided p-value of ``a_only`` ~ Binomial(a_only + b_only, 1/2)."""
    from scipy.stats import binomtest

    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = a_only + b_only
    p = binomtest(a_only, n, 0.5).pvalue if n else 1.0
    return {"a_only": a_only, "b_only": b_only, "p": float(p)}


def bootstrap_diff(
    a: np.ndarray, b: np.ndarray, clusters: np.ndarray, reps: int = 10000
) -> dict[str, float]:
    """Mean of ``a - b`` over views and its 95% percentile interval from resampling whole
    clusters (scenes) with replacement: views of one photo are not independent."""
    rng = np.random.default_rng(0)
    names = np.unique(clusters)
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    sums = np.array([d[clusters == c].sum() for c in names])
    counts = np.array([np.sum(clusters == c) for c in names])
    pick = rng.integers(0, len(names), (reps, len(names)))
    means = sums[pick].sum(1) / counts[pick].sum(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(d.mean()), "ci95": [float(lo), float(hi)], "clusters": len(names)}


PAIRED = {
    "bnfold": {},
    "bnfold-no-cle": {"cle": False},
    "bnfold-no-bias-correction": {"bias_correction": "none"},
}


def paired(cache: Path, work: Path) -> dict[str, Any]:
    """bnfold (defaults, and without CLE / bias correction) vs onnxruntime ``quantize_static``
    per-channel after ``quant_pre_process`` (:func:`benchmarks.int8_real.ort_quantize`) on both
    FOLDS: per-view top-1 agreement with fp32 and logit cosine, paired over the same views;
    McNemar on agreement, bootstrap over scenes for the differences."""
    from benchmarks.int8_real import ort_quantize

    path = model_path(cache, "mobilenet_v2")
    agree: dict[str, list] = {}
    cos: dict[str, list] = {}
    scenes = []
    for cal_names, held_names in FOLDS:
        cal = views(cal_names)
        held, scene = held_views(held_names)
        scenes.append(scene)
        x = np.concatenate([f["input"] for f in held])
        ref = run_onnxruntime(path, {"input": x})["logits"]
        models = {tag: quantize(path, cal, **kw)[0] for tag, kw in PAIRED.items()}
        models["ort"] = ort_quantize(path, cal, work)
        for tag, m in models.items():
            got = run_onnxruntime(m, {"input": x})["logits"]
            agree.setdefault(tag, []).append(ref.argmax(1) == got.argmax(1))
            norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
            cos.setdefault(tag, []).append(np.sum(ref * got, 1) / norms)
        logger.info("fold %s done", held_names)
    clusters = np.concatenate(scenes)
    a = {k: np.concatenate(v) for k, v in agree.items()}
    c = {k: np.concatenate(v).astype(np.float64) for k, v in cos.items()}
    rows = {k: {"top1_agreement": float(a[k].mean()), "cosine": float(c[k].mean()),
                "per_scene_agreement": {s: float(a[k][clusters == s].mean())
                                        for s in np.unique(clusters)}}
            for k in a}  # fmt: skip
    versus = {}
    for x, y in [*((k, "ort") for k in PAIRED), *((k, "bnfold") for k in PAIRED if k != "bnfold")]:
        versus[f"{x} - {y}"] = {
            "agreement": bootstrap_diff(a[x], a[y], clusters),
            "mcnemar": mcnemar(a[x], a[y]),
            "cosine": bootstrap_diff(c[x], c[y], clusters),
        }
    return {"data": f"{len(FOLDS)} folds; {len(clusters)} held-out views of "
                    f"{len(np.unique(clusters))} scenes ({HELD_VIEWS} per photo); calibration: "
                    f"{len(VIEWS)} views of each photo of the other fold",
            "held_out_views": len(clusters), "rows": rows, "paired": versus}  # fmt: skip


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
    cal, ev, hard = views(CALIBRATION), held_views(EVALUATION)[0], views(NON_OBJECTS)
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
    ap.add_argument(
        "--paired",
        type=Path,
        default=None,
        help="only the two-fold paired comparison with onnxruntime, into this JSON",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")  # fmt: skip
    if args.paired is not None:
        with tempfile.TemporaryDirectory() as tmp:
            result = paired(args.cache, Path(tmp))
        args.paired.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        for k, r in result["rows"].items():
            print(f"{k}: top-1 agreement {r['top1_agreement']:.4f}, cosine {r['cosine']:.5f}")
        for k, v in result["paired"].items():
            ag, co, mc = v["agreement"], v["cosine"], v["mcnemar"]
            print(
                f"{k}: agreement {ag['mean']:+.4f} [{ag['ci95'][0]:+.4f}, {ag['ci95'][1]:+.4f}]"
                f" McNemar {mc['a_only']}/{mc['b_only']} p={mc['p']:.3g}; cosine "
                f"{co['mean']:+.5f} [{co['ci95'][0]:+.5f}, {co['ci95'][1]:+.5f}]"
            )
        return
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
