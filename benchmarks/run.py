"""The benchmark suite: latency, fold time and TVM's own BN folding on the real models.

For each model (MobileNetV2, ResNet-18, PP-OCR det/rec/cls; batch 1, shapes of the real inputs) it
compiles for ``x86``, runs ``bnfold.device.bench`` (four engines in separate processes, alternating
blocks: onnxruntime ORT_ENABLE_ALL and optimizations off on the original, onnxruntime on the folded
model, the compiled artifact), times bnfold's fold pass (median of ``--repeat``), onnxoptimizer's
``fuse_bn_into_conv`` (median of ``--repeat``; when ``bnfold[bench]`` is installed) and TVM Relax
``FoldBatchnormToConv2D`` + ``FoldConstant`` on the same frozen model (once: it takes seconds); see
:mod:`benchmarks.fold_speed`. Writes ``benchmarks/results/<model>.json``, ``suite.json``,
``README.md`` (a markdown table) and PNG plots.

    python -m benchmarks.run [--models mobilenet_v2,...] [--threads 1] [--rounds 8]
        [--no-tvm-fold] [--cache .cache/models] [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("benchmarks.run")

MODELS = ("mobilenet_v2", "resnet18", "ppocr_det", "ppocr_rec", "ppocr_cls")
RUNTIMES = ("ort", "ort_noopt", "ort_folded", "compiled")
COLORS = {"ort": "#4C72B0", "ort_noopt": "#8C8C8C", "ort_folded": "#55A868", "compiled": "#C44E52"}


def fold_times(model_path: Path, shapes: dict[str, tuple[int, ...]], repeat: int,
               tvm_fold: bool, feeds: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """bnfold fold time (median of ``repeat``), onnxoptimizer ``fuse_bn_into_conv`` time (median
    of ``repeat``, when installed; its error vs the original on ``feeds``) and TVM Relax BN
    folding time (once), with the BN each left."""
    import importlib.util

    import bnfold
    from benchmarks import fold_speed
    from bnfold import ir

    ms = []
    report = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        _, report = bnfold.fold(ir.load(model_path), check=False)
        ms.append((time.perf_counter() - t0) * 1e3)
    assert report is not None
    c = report.counts()
    row: dict[str, Any] = {"bn": report.bn_before, "bnfold_ms": statistics.median(ms),
                           "bnfold_pass_ms": report.pass_ms,
                           "bnfold_folded": c["folded_backward"] + c["folded_forward"]}  # fmt: skip
    if importlib.util.find_spec("onnxoptimizer") is not None:
        o = fold_speed.measure_onnxoptimizer(model_path, repeat, feeds)
        row.update(onnxopt_ms=o["ms"], onnxopt_bn_left=o["bn_left"],
                   onnxopt_worst_ratio=o.get("worst_ratio"))  # fmt: skip
    else:
        logger.warning("onnxoptimizer not installed (pip install 'bnfold[bench]'): no column")
    if tvm_fold:
        t = fold_speed.measure_tvm(model_path, shapes)
        row.update(tvm_fold_ms=t["ms"], tvm_bn_left=t["bn_left"])
    return row


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Compile, bench and fold-time one model; returns its JSON row."""
    from bnfold.device import bench
    from bnfold.lower import compiler as lower

    model_path = args.cache / f"{name}.onnx"
    inputs = args.cache / "inputs" / f"{name}.npz"
    outdir = args.workdir / f"{name}-x86"
    t0 = time.perf_counter()
    manifest = lower.compile_model(model_path, "x86", outdir, verify=True,
                                   inputs=inputs if inputs.is_file() else None)  # fmt: skip
    logger.info("%s: compiled in %.1f s, %s", name, time.perf_counter() - t0,
                manifest.verification["status"])  # fmt: skip
    result = bench.bench(outdir, threads=args.threads, rounds=args.rounds, block=args.block)
    result.pop("samples_ms")
    shapes = {s["name"]: tuple(s["shape"]) for s in manifest.inputs}
    feeds = None
    if inputs.is_file():
        import numpy as np

        with np.load(inputs, allow_pickle=False) as data:
            feeds = {k: data[k] for k in data.files}
    result["fold"] = fold_times(model_path, shapes, args.repeat, args.tvm_fold, feeds)
    result["verification"] = {k: manifest.verification.get(k) for k in
                              ("status", "worst_abs_over_max_ref", "inputs")}  # fmt: skip
    result["model"] = name
    return result


def markdown(rows: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    """The results README: one latency table and one fold-time table."""
    out = [
        "# bnfold benchmark suite",
        "",
        f"`python -m benchmarks.run` on {machine['cpu']} ({machine['cores']} cores), "
        f"{rows[0]['threads'] if rows else '?'} thread(s), batch 1, fp32. Latency: "
        f"{rows[0]['method'] if rows else ''}; ms (p50 / p90). Ratio: compiled p50 / "
        "onnxruntime ORT_ENABLE_ALL p50 (below 1: compiled is faster).",
        "",
        "| model | input | ORT all | ORT off | ORT folded | compiled | compiled/ORT | verified |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e = r["engines"]
        cells = [f"{e[k]['p50_ms']:.2f} / {e[k]['p90_ms']:.2f}" for k in RUNTIMES]
        shape = "x".join(str(d) for d in next(iter(r["inputs"].values())))
        v = r["verification"]
        out.append(f"| {r['model']} | {shape} | " + " | ".join(cells)
                   + f" | {e['compiled']['ratio_to_ort']:.2f}x | {v['status']} "
                   f"({v['worst_abs_over_max_ref']:.1e}) |")  # fmt: skip
    out += [
        "",
        "Fold time: bnfold's fold (load + all passes, median) vs onnxoptimizer "
        "`fuse_bn_into_conv` on the loaded model (median; Conv -> BN only) and TVM Relax "
        "`FoldBatchnormToConv2D` + `FoldConstant` on the imported model (once).",
        "",
        "| model | BN | bnfold ms | BN folded by bnfold | onnxoptimizer ms "
        "| BN folded by onnxoptimizer | TVM fold ms | TVM / bnfold | BN folded by TVM |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = r["fold"]
        tvm, opt = f.get("tvm_fold_ms"), f.get("onnxopt_ms")
        mine = f"{f['bnfold_folded']} of {f['bn']}" if "bnfold_folded" in f else "-"
        out.append(f"| {r['model']} | {f['bn']} | {f['bnfold_ms']:.1f} | {mine} | "
                   + (f"{opt:.1f} | {f['bn'] - f['onnxopt_bn_left']} of {f['bn']} | "
                      if opt is not None else "- | - | ")
                   + (f"{tvm:.0f} | {tvm / f['bnfold_ms']:.0f}x | "
                      f"{f['bn'] - f['tvm_bn_left']} of {f['bn']} |"
                      if tvm is not None else "- | - | - |"))  # fmt: skip
    out += ["", "Plots: `latency.png`, `fold_time.png`, `ratio.png`.", ""]
    return "\n".join(out)


def plots(rows: list[dict[str, Any]], results: Path) -> list[Path]:
    """latency.png (p50 bars, p90 whiskers), fold_time.png (log scale), ratio.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from bnfold.device.bench import LABELS

    written = []
    names = [r["model"] for r in rows]
    x = np.arange(len(rows))
    width = 0.2
    fig, ax = plt.subplots(figsize=(10, 5))
    for i, k in enumerate(RUNTIMES):
        p50 = np.array([r["engines"][k]["p50_ms"] for r in rows])
        p90 = np.array([r["engines"][k]["p90_ms"] for r in rows])
        ax.bar(x + (i - 1.5) * width, p50, width, yerr=[np.zeros_like(p50), p90 - p50],
               capsize=3, label=LABELS[k], color=COLORS[k])  # fmt: skip
    ax.set_xticks(x, names)
    ax.set_yscale("log")
    ax.set_ylabel("latency, ms (bar p50, whisker p90; log scale)")
    ax.set_title(f"Latency per model and runtime, {rows[0]['threads']} thread(s), batch 1")
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    written.append(results / "latency.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    series = [("bnfold_ms", "bnfold fold", "#C44E52"),
              ("onnxopt_ms", "onnxoptimizer fuse_bn_into_conv", "#55A868"),
              ("tvm_fold_ms", "TVM FoldBatchnormToConv2D + FoldConstant", "#4C72B0")]  # fmt: skip
    series = [s for s in series if all(s[0] in r["fold"] for r in rows)]
    bar = 0.8 / len(series)
    for i, (key, label, color) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * bar, [r["fold"][key] for r in rows], bar,
               label=label, color=color)  # fmt: skip
    ax.set_xticks(x, names)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log scale)")
    ax.set_title("BN folding time")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    written.append(results / "fold_time.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ratios = [r["engines"]["compiled"]["ratio_to_ort"] for r in rows]
    bars = ax.bar(x, ratios, 0.5, color=["#55A868" if v <= 1 else "#C44E52" for v in ratios])
    ax.bar_label(bars, [f"{v:.2f}x" for v in ratios], padding=6)
    ax.axhline(1.0, color="black", lw=1, ls="--")
    ax.set_xticks(x, names)
    ax.set_ylabel("compiled p50 / ORT_ENABLE_ALL p50")
    ax.set_title("Compiled (TVM + bnfold schedules) vs onnxruntime; below 1 = faster")
    fig.tight_layout()
    written.append(results / "ratio.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> int:
    """Run the suite; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3, help="bnfold fold repeats (median)")
    ap.add_argument("--no-tvm-fold", dest="tvm_fold", action="store_false")
    ap.add_argument("--cache", type=Path, default=Path(".cache/models"))
    ap.add_argument("--workdir", type=Path, default=Path(".cache/bench"))
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--plots-only", action="store_true", help="redraw from suite.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    import json

    from bnfold import atomic
    from bnfold.device.bench import cpu_name
    from bnfold.lower import compiler as lower

    args.results.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()}
    if args.plots_only:
        rows = json.loads((args.results / "suite.json").read_text())["rows"]
    else:
        rows = []
        for name in args.models.split(","):
            if not (args.cache / f"{name}.onnx").is_file():
                logger.error("%s missing: run `make models` first", args.cache / f"{name}.onnx")
                return 2
            row = run_model(name, args)
            atomic.write_json(args.results / f"{name}.json", row)
            rows.append(row)
            c = row["engines"]["compiled"]
            logger.info("%-13s compiled %.2f ms, ORT %.2f ms, ratio %.2f", name, c["p50_ms"],
                        row["engines"]["ort"]["p50_ms"], c["ratio_to_ort"])  # fmt: skip
        atomic.write_json(args.results / "suite.json", {
            "machine": machine, "versions": lower.versions(), "rows": rows})  # fmt: skip
    (args.results / "README.md").write_text(markdown(rows, machine))
    for p in plots(rows, args.results):
        print(f"wrote {p}")
    print(f"wrote {args.results / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
