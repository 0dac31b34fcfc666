"""int8 on real weights, each model with its task metric: bnfold vs onnxruntime's quantizer.

    python -m benchmarks.int8_real [--models mobilenet_v2,ppocr_det,ppocr_rec,ppocr_cls,digits]
        [--cache .cache/models] [--work out/int8_real] [--latency]
        [--json benchmarks/results/int8_real.json]

Per model, against the fp32 model on held-out views (onnxruntime with optimizations off, which
runs a QDQ model exactly as written), with the same calibration views for every quantizer:

* ``bnfold``: :func:`bnfold.quant.quantize.quantize` defaults (per-channel, CLE, empirical bias
  correction, min-max, uint8 activations), as ``bnfold quantize`` runs it;
* ``bnfold-target``: the same with ``--target-agreement 0.95``
  (:func:`bnfold.quant.target.reach`; the float nodes it kept are listed). The search, like the
  CLI, evaluates on the held-out views, so its figure is the one the CLI would show. ppocr_det's
  output (N, 1, H, W) has no class axis, so the option rejects it; ``--target-cosine 0.99`` is
  used there instead;
* ``ort``: onnxruntime ``quantize_static``, per-channel QDQ, min-max, uint8 activations, int8
  weights, after its ``quant_pre_process`` (shape inference and graph optimization).

Task metrics (all of int8 against fp32, except the labeled accuracies):

* mobilenet_v2 (ImageNet): top-1 agreement; views of photographs from scikit-image,
  scikit-learn and matplotlib (the split and views of :mod:`benchmarks.int8_accuracy`: 9 fixed
  views of each calibration photo, 40 views of each held-out photo; its ``--paired`` run swaps
  the split too and gives the paired statistics);
* ppocr_det: the heat map binarized at the model's 0.3 threshold: IoU of the int8 and fp32 text
  masks (pooled over the views) and the share of views with the same number of text boxes
  (8-connected components of at least 10 pixels, as a box count);
* ppocr_rec: the share of text lines whose CTC greedy-decoded index sequence (argmax per step,
  repeats collapsed, blanks dropped) equals fp32's;
* ppocr_cls: label agreement on text lines and their 180-degree rotations, and accuracy
  against the true orientation;
* digits (:mod:`benchmarks.digits`, scikit-learn's 8x8 digits): accuracy against the labels
  and agreement, on the 540 held-out digits (100 training digits calibrate).

The OCR views come from pages: skimage's scanned book page (``data.page()``), its photographed
sign (``data.text()``), and pages typeset here in four fonts (DejaVu Sans / Serif / Sans Mono,
STIX) from the Zen of Python. Split by source page, never by view: the calibrators see the
DejaVu Sans, DejaVu Sans Mono and (det only: its row profile finds no clean text lines)
``text()`` pages; the held-out views come from the scanned
page, the DejaVu Serif and the STIX pages. Det views are 320x320 tiles of each page at three
scales; rec (48x320) and cls (48x192) views are text lines cut from the pages (each line whole
and in overlapping windows), preprocessed as PaddleOCR's ``resize_norm_img``.

``--latency`` also compiles the fp32 model and the two bnfold int8 models for x86 and times
them at 1 thread (:func:`bnfold.device.bench.measure`: separate processes, alternating blocks);
only ratios measured side by side are reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks.models import _IMAGENET_MEAN, _IMAGENET_STD, _resize, model_path
from bnfold.check import run_onnxruntime
from bnfold.quant import calib

logger = logging.getLogger("int8_real")

MODELS = ("mobilenet_v2", "ppocr_det", "ppocr_rec", "ppocr_cls", "digits")
TARGET_AGREEMENT = 0.95
DET_THRESHOLD = 0.3  # PaddleOCR's DBPostProcess thresh
MIN_BOX_PIXELS = 10
Feeds = dict[str, np.ndarray]


@dataclasses.dataclass
class Task:
    """One model: its fp32 file, calibration and held-out feeds, and its task metric."""

    name: str
    path: Path
    calib: list[Feeds]
    held: list[Feeds]
    metric: Callable[[np.ndarray, np.ndarray], dict[str, float]]
    goals: dict[str, float]
    data: str  # what the views are, for the table
    labels: np.ndarray | None = None


# --------------------------------------------------------------------------------------------
# Pages and text lines


ZEN = """Beautiful is better than ugly. Explicit is better than implicit. Simple is better than
complex. Complex is better than complicated. Flat is better than nested. Sparse is better than
dense. Readability counts. Special cases aren't special enough to break the rules. Although
practicality beats purity. Errors should never pass silently. Unless explicitly silenced. In
the face of ambiguity, refuse the temptation to guess. There should be one and preferably only
one obvious way to do it. Although that way may not be obvious at first unless you're Dutch.
Now is better than never. Although never is often better than right now. If the
implementation is hard to explain, it's a bad idea. If the implementation is easy to explain,
it may be a good idea. Namespaces are one honking great idea, let's do more of those!"""
FONTS = {
    "sans": "DejaVuSans.ttf",
    "serif": "DejaVuSerif.ttf",
    "mono": "DejaVuSansMono.ttf",
    "stix": "STIXGeneral.ttf",
}
CALIB_PAGES = ("sans", "mono", "text")
HELD_PAGES = ("page", "serif", "stix")
# text() is a photograph whose row profile finds no clean lines: it calibrates det only.
LINE_CALIB_PAGES = ("sans", "mono")


def _font_path(file: str) -> str:
    import matplotlib

    return str(Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / file)


def typeset(
    font: str, width: int = 620, size: int = 18, offset: int = 0
) -> tuple[np.ndarray, list]:
    """A uint8 grayscale page of the Zen of Python in ``font`` (black on white), and its line
    boxes ``(top, bottom, left, right)``. ``offset`` starts at another word (different text)."""
    from PIL import Image, ImageDraw, ImageFont

    f = ImageFont.truetype(_font_path(FONTS[font]), size)
    words = ZEN.split()
    words = words[offset:] + words[:offset]
    lines, cur = [], ""
    for w in words:
        trial = f"{cur} {w}".strip()
        if f.getlength(trial) > width - 40 and cur:
            lines.append(cur)
            cur = w
        else:
            cur = trial
    lines.append(cur)
    step = int(size * 1.6)
    page = Image.new("L", (width, 30 + step * len(lines)), 255)
    draw = ImageDraw.Draw(page)
    boxes = []
    for i, line in enumerate(lines):
        x, y = 20, 15 + i * step
        draw.text((x, y), line, font=f, fill=0)
        left, top, right, bottom = draw.textbbox((x, y), line, font=f)
        boxes.append((max(top - 3, 0), bottom + 3, max(left - 3, 0), right + 3))
    return np.asarray(page), boxes


def _profile_lines(gray: np.ndarray, dark: bool = True) -> list[tuple[int, int, int, int]]:
    """Text line boxes of a scanned page from its row profile of dark pixels."""
    ink = gray < (gray.mean() - 2 * gray.std() if dark else 128)
    rows = ink.mean(axis=1) > 0.01
    boxes, start = [], None
    for y, on in enumerate([*rows, False]):
        if on and start is None:
            start = y
        elif not on and start is not None:
            if y - start >= 8:
                cols = np.flatnonzero(ink[start:y].any(axis=0))
                boxes.append((max(start - 2, 0), min(y + 2, gray.shape[0]), int(cols[0]),
                              int(cols[-1]) + 1))  # fmt: skip
            start = None
    return boxes


def page(name: str) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """A uint8 grayscale page and its text line boxes."""
    from skimage import data

    if name == "page":
        gray = data.page()
        return gray, _profile_lines(gray)
    if name == "text":
        gray = data.text()
        return gray, _profile_lines(gray)
    return typeset(name, offset={"sans": 0, "serif": 40, "mono": 80, "stix": 120}[name])


def _rgb01(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None].astype(np.float32) / 255.0, 3, axis=2)


def det_views(names: tuple[str, ...], size: int = 320) -> list[Feeds]:
    """320x320 tiles of each page at three scales, white-padded; PaddleOCR det normalization."""
    out = []
    for name in names:
        gray, _ = page(name)
        for scale in (0.8, 1.2, 1.8):
            h, w = round(gray.shape[0] * scale), round(gray.shape[1] * scale)
            img = _resize(_rgb01(gray), h, w)
            ph, pw = max(h, size), max(w, size)
            canvas = np.ones((ph, pw, 3), np.float32)
            canvas[:h, :w] = img
            for top in range(0, ph - size + 1, size):
                for left in range(0, pw - size + 1, size):
                    tile = canvas[top : top + size, left : left + size]
                    x = ((tile - _IMAGENET_MEAN) / _IMAGENET_STD).transpose(2, 0, 1)
                    out.append({"x": np.ascontiguousarray(x[None], dtype=np.float32)})
    return out


def line_crops(names: tuple[str, ...]) -> list[np.ndarray]:
    """Text lines of each page as float RGB crops: each line whole, and windows of about 8
    line heights (overlapping by half) along it."""
    crops = []
    for name in names:
        gray, boxes = page(name)
        for top, bottom, left, right in boxes:
            line = gray[top:bottom, left:right]
            crops.append(line)
            win = 8 * line.shape[0]
            for start in range(0, max(line.shape[1] - win, 0), win // 2):
                crops.append(line[:, start : start + win])
    return [_rgb01(c) * 255.0 for c in crops]


def norm_line(crop: np.ndarray, height: int, width: int) -> np.ndarray:
    """PaddleOCR's ``resize_norm_img``: keep the aspect up to the full width, (x/255-0.5)/0.5,
    pad right with zeros."""
    h, w = crop.shape[:2]
    rw = min(width, math.ceil(height * w / h))
    x = (_resize(crop, height, rw) / 255.0 - 0.5) / 0.5
    out = np.zeros((1, 3, height, width), np.float32)
    out[0, :, :, :rw] = x.transpose(2, 0, 1)
    return out


# --------------------------------------------------------------------------------------------
# Task metrics


def top1_agreement(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    return {"top1_agreement": float(np.mean(ref.argmax(1) == got.argmax(1)))}


def det_metric(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """IoU of the binarized text masks (pooled) and the share of views with equal box counts."""
    from skimage.measure import label, regionprops

    a, b = ref[:, 0] > DET_THRESHOLD, got[:, 0] > DET_THRESHOLD
    union = np.logical_or(a, b).sum()
    iou = float(np.logical_and(a, b).sum() / union) if union else 1.0

    def boxes(mask: np.ndarray) -> int:
        return sum(r.area >= MIN_BOX_PIXELS for r in regionprops(label(mask, connectivity=2)))

    same = [boxes(x) == boxes(y) for x, y in zip(a, b, strict=True)]
    return {"mask_iou": iou, "box_count_equal": float(np.mean(same)),
            "boxes_fp32": int(sum(boxes(x) for x in a))}  # fmt: skip


def ctc_greedy(probs: np.ndarray) -> list[tuple[int, ...]]:
    """Per sample: argmax per step, repeats collapsed, blanks (index 0) dropped."""
    out = []
    for best in probs.argmax(-1):
        seq = [int(i) for t, i in enumerate(best) if i != 0 and (t == 0 or i != best[t - 1])]
        out.append(tuple(seq))
    return out


def rec_metric(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    r, g = ctc_greedy(ref), ctc_greedy(got)
    return {"text_equal": float(np.mean([x == y for x, y in zip(r, g, strict=True)])),
            "step_agreement": float(np.mean(ref.argmax(-1) == got.argmax(-1)))}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Tasks


def _fixed(cache: Path, name: str, shape: tuple[int, ...], work: Path) -> Path:
    """A copy of the model with its input's dims fixed (both quantizers get the same file)."""
    model = onnx.load(str(model_path(cache, name)))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims, shape, strict=True):
        d.Clear()
        d.dim_value = v
    path = work / f"{name}.fixed.onnx"
    onnx.save(model, str(path))
    return path


def tasks(names: tuple[str, ...], cache: Path, work: Path) -> Iterator[Task]:
    """The named tasks, each built when the previous one is done."""
    for name in names:
        if name == "mobilenet_v2":
            from benchmarks.int8_accuracy import CALIBRATION, EVALUATION, held_views, views

            held, _ = held_views(EVALUATION)
            yield Task(name, model_path(cache, name), views(CALIBRATION), held,
                       top1_agreement, {"agreement": TARGET_AGREEMENT},
                       f"views of photos ({len(CALIBRATION)} calib / {len(EVALUATION)} "
                       "held-out photos)")  # fmt: skip
        elif name == "ppocr_det":
            yield Task(name, _fixed(cache, name, (1, 3, 320, 320), work),
                       det_views(CALIB_PAGES), det_views(HELD_PAGES), det_metric,
                       {"cosine": 0.99}, "320x320 page tiles")  # fmt: skip
        elif name in ("ppocr_rec", "ppocr_cls"):
            h, w = (48, 320) if name == "ppocr_rec" else (48, 192)
            cal_crops = line_crops(LINE_CALIB_PAGES)
            cal = [{"x": norm_line(c, h, w)} for c in cal_crops]
            held_crops = line_crops(HELD_PAGES)
            held = [{"x": norm_line(c, h, w)} for c in held_crops]
            labels = None
            metric: Callable[[np.ndarray, np.ndarray], dict[str, float]] = rec_metric
            if name == "ppocr_cls":  # upright (0) and rotated by 180 degrees (1)
                cal += [{"x": norm_line(c[::-1, ::-1], h, w)} for c in cal_crops]
                held += [{"x": norm_line(c[::-1, ::-1], h, w)} for c in held_crops]
                labels = np.array([0] * len(held_crops) + [1] * len(held_crops))
                metric = top1_agreement
            yield Task(name, _fixed(cache, name, (1, 3, h, w), work), cal, held, metric,
                       {"agreement": TARGET_AGREEMENT}, f"{h}x{w} text lines",
                       labels)  # fmt: skip
        elif name == "digits":
            from benchmarks.digits import CALIBRATION_SAMPLES, build

            path, d = build(work / "digits")
            cal = [{"x": d["x_train"][i : i + 1]} for i in range(CALIBRATION_SAMPLES)]
            held = [{"x": d["x_test"][i : i + 1]} for i in range(len(d["x_test"]))]
            goals = {"agreement": TARGET_AGREEMENT}
            yield Task(name, path, cal, held, top1_agreement, goals, "8x8 digits",
                       d["y_test"])  # fmt: skip
        else:
            raise SystemExit(f"unknown model {name}; known: {', '.join(MODELS)}")


# --------------------------------------------------------------------------------------------
# Quantizers


def ort_quantize(model: Path, cal: list[Feeds], work: Path) -> onnx.ModelProto:
    """onnxruntime: quant_pre_process, then quantize_static per-channel QDQ (min-max)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader:
        def __init__(self) -> None:
            self.it = iter(cal)

        def get_next(self) -> Feeds | None:
            return next(self.it, None)

    pre, out = work / f"{model.stem}.pre.onnx", work / f"{model.stem}.ort.int8.onnx"
    proto = onnx.load(str(model))
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:  # per-channel DequantizeLinear (axis) needs opset 13; ORT does not upgrade
        from onnx import version_converter

        model = work / f"{model.stem}.opset13.onnx"
        onnx.save(version_converter.convert_version(proto, 13), str(model))
    try:
        quant_pre_process(str(model), str(pre))
    except Exception as e:  # its symbolic shape inference asserts on some graphs (PP-OCR cls)
        logger.warning("quant_pre_process failed (%s: %s); again without symbolic shapes",
                       type(e).__name__, e)  # fmt: skip
        quant_pre_process(str(model), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)  # fmt: skip
    return onnx.load(str(out))


def _outputs(model: Any, held: list[Feeds]) -> np.ndarray:
    """The first output on every held-out feed, concatenated."""
    return np.concatenate([next(iter(run_onnxruntime(model, f).values())) for f in held])


def run_task(task: Task, work: Path, latency: bool) -> dict[str, Any]:
    """fp32 vs each quantizer on the task's held-out views; one result row each."""
    from bnfold.quant.quantize import quantize
    from bnfold.quant.report import evaluate
    from bnfold.quant.target import reach

    specs = calib.input_specs(onnx.load(str(task.path)))
    held_batches = calib.batches(task.held, specs, 8)
    ref = _outputs(task.path, task.held)
    result: dict[str, Any] = {
        "data": task.data, "calibration_samples": len(task.calib),
        "held_out_samples": len(task.held), "rows": {},
    }  # fmt: skip
    if task.labels is not None:
        result["fp32_accuracy"] = float(np.mean(ref.argmax(1) == task.labels))
    models: dict[str, onnx.ModelProto] = {}

    def row(tag: str, int8: onnx.ModelProto, seconds: float, **extra: Any) -> None:
        got = _outputs(int8, task.held)
        r = {**task.metric(ref, got), "seconds": round(seconds, 1), **extra}
        a, b = ref.reshape(len(ref), -1).astype(np.float64), got.reshape(len(got), -1)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30
        r["cosine"] = float(np.mean(np.sum(a * b, 1) / norms))
        if task.labels is not None:
            r["int8_accuracy"] = float(np.mean(got.argmax(1) == task.labels))
        result["rows"][tag] = r
        models[tag] = int8
        logger.info("%s %s: %s", task.name, tag, r)

    t0 = time.perf_counter()
    int8, report = quantize(task.path, task.calib)
    acc = evaluate(task.path, int8, report, held_batches)
    row("bnfold", int8, time.perf_counter() - t0,
        min_layer_sqnr_db=min((r["sqnr_db"] for r in acc.layers), default=None))  # fmt: skip
    first = (int8, report, acc)
    t0 = time.perf_counter()
    t_int8, t_report, _ = reach(task.path, task.calib, held_batches, task.goals, first)
    t = t_report.target
    row("bnfold-target", t_int8, time.perf_counter() - t0,
        goals=task.goals, met=t["met"], float_nodes=t["float_nodes"],
        float_mac_share=t["float_mac_share"], rounds=len(t["rounds"]) - 1)  # fmt: skip
    t0 = time.perf_counter()
    try:
        ort = ort_quantize(task.path, task.calib, work)
    except Exception as e:  # a row that says why, not a lost run
        result["rows"]["ort"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
        logger.warning("%s ort: %s", task.name, result["rows"]["ort"]["error"])
    else:
        row("ort", ort, time.perf_counter() - t0)
    if latency:
        result["latency"] = measure_latency(task, models, work)
    return result


def measure_latency(task: Task, models: dict[str, onnx.ModelProto], work: Path) -> dict:
    """Compile fp32, bnfold and bnfold-target for x86; 1-thread medians and ratios."""
    from bnfold.device.bench import measure
    from bnfold.lower import compiler as lower

    feed = task.held[0]
    shapes = {k: tuple(v.shape) for k, v in feed.items()}
    engines: dict[str, tuple[Path, Path]] = {}
    fp32_dir = work / f"{task.name}-fp32"
    lower.compile_model(task.path, "x86", fp32_dir, shapes, verify=False, threads=1)
    engines["fp32"] = (fp32_dir, task.path)
    for tag in ("bnfold", "bnfold-target"):
        path = work / f"{task.name}.{tag}.onnx"
        onnx.save(models[tag], str(path))
        out = work / f"{task.name}-{tag}"
        lower.compile_model(path, "x86", out, shapes, verify=False, fold=False, threads=1)
        engines[tag] = (out, path)
    times = measure({k: v for k, v in engines.items()}, 1, 8, 5)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"p50_ms": med, "bnfold_over_fp32": med["bnfold"] / med["fp32"],
            "target_over_fp32": med["bnfold-target"] / med["fp32"],
            "target_over_bnfold": med["bnfold-target"] / med["bnfold"]}  # fmt: skip


# --------------------------------------------------------------------------------------------


def table(name: str, r: dict[str, Any]) -> str:
    """A markdown table for one model."""
    rows = r["rows"]
    keys = [k for k in next(iter(rows.values())) if k not in (
        "seconds", "goals", "met", "float_nodes", "float_mac_share", "rounds", "min_layer_sqnr_db",
        "boxes_fp32")]  # fmt: skip
    acc = f", fp32 accuracy {r['fp32_accuracy']:.4f}" if "fp32_accuracy" in r else ""
    lines = [f"**{name}** ({r['data']}; {r['calibration_samples']} calibration, "
             f"{r['held_out_samples']} held-out samples{acc})", "",
             "| quantizer | " + " | ".join(keys) + " | float nodes kept | s |",
             "|---" * (len(keys) + 3) + "|"]  # fmt: skip
    for tag, row in rows.items():
        if "error" in row:
            lines.append(f"| {tag} | {row['error']} |")
            continue
        kept = "-"
        if "float_nodes" in row:
            goal = ", ".join(f"{k} {v}" for k, v in row["goals"].items())
            nodes = row["float_nodes"]
            more = " ..." if len(nodes) > 6 else ""
            share = row["float_mac_share"] or 0
            kept = (f"{goal} {'met' if row['met'] else 'NOT met'}: {len(nodes)} "
                    f"({share:.1%} of MACs) {', '.join(nodes[:6])}{more}")  # fmt: skip
        vals = " | ".join(f"{row[k]:.{6 if k == 'cosine' else 4}f}" if isinstance(row[k], float)
                          else str(row[k]) for k in keys)  # fmt: skip
        lines.append(f"| {tag} | {vals} | {kept} | {row['seconds']} |")
    if "latency" in r:
        lat = r["latency"]
        lines.append("")
        lines.append(f"compiled x86, 1 thread: bnfold int8 / fp32 {lat['bnfold_over_fp32']:.2f}, "
                     f"target int8 / fp32 {lat['target_over_fp32']:.2f}, target / bnfold int8 "
                     f"{lat['target_over_bnfold']:.2f}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--cache", type=Path, default=Path(".cache/models"))
    ap.add_argument("--work", type=Path, default=None, help="keep the models here")
    ap.add_argument("--latency", action="store_true")
    ap.add_argument(
        "--target-agreement",
        type=float,
        default=TARGET_AGREEMENT,
        help="the agreement target (other than 0.95: results keyed MODEL@X)",
    )
    ap.add_argument("--json", type=Path, default=None, help="merge the results into this file")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument(
        "--tables", type=Path, default=None, help="only print the tables of this results JSON"
    )
    args = ap.parse_args()
    if args.tables is not None:
        for name, r in json.loads(args.tables.read_text()).items():
            print(table(name, r), "\n")
        return
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="int8-real-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = {}
        for task in tasks(tuple(args.models.split(",")), args.cache, work):
            if "agreement" in task.goals and args.target_agreement != TARGET_AGREEMENT:
                task.goals = {"agreement": args.target_agreement}
                task.name = f"{task.name}@{args.target_agreement:g}"
            results[task.name] = run_task(task, work, args.latency)
            print(table(task.name, results[task.name]), "\n", flush=True)
            if args.json is not None:
                old = json.loads(args.json.read_text()) if args.json.is_file() else {}
                old[task.name] = results[task.name]
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
