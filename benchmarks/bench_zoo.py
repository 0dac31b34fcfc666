"""Every zoo model compiled for x86 and timed against onnxruntime (``make bench-zoo``).

    python -m benchmarks.bench_zoo [--zoo .cache/zoo] [--style ts_bn] [--threads 1,2]
        [--only resnet18,densenet121] [--rounds 5] [--block 3] [--fresh]
        [--json benchmarks/results/zoo.json] [--plot benchmarks/results/zoo.png]

Per model of the zoo (``benchmarks/zoo.py``; one export style, ``ts_bn`` by default since it
carries every BatchNormalization): ``bnfold compile --target x86`` with its verification against
the unfolded model in onnxruntime, then, per thread count, the artifact against onnxruntime
ORT_ENABLE_ALL on the original file, timed by :func:`bnfold.device.bench.measure` (one timing server
per engine, alternating blocks, never at the same time; medians). Recorded per model: compile
seconds, the verification's worst max_abs/max|ref|, latency ratio compiled/onnxruntime, and the
manifest's ``compile.schedule_rules`` (how many functions fell to "unscheduled"). A model that
fails to compile or verify is a row with its one-line reason, not a crash.

The JSON is rewritten after every model, and a rerun skips what it already holds (``--fresh``
starts over), so an interrupted run on 2 shared cores keeps its figures. Compiled folders are
kept under ``ZOO/compiled`` and reused while their source's sha256 matches.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import zoo
from bnfold.device.bench import cpu_name, measure

logger = logging.getLogger("bench_zoo")

DEFAULT_JSON = Path("benchmarks/results/zoo.json")
DEFAULT_PLOT = Path("benchmarks/results/zoo.png")


def _compile(path: Path, outdir: Path) -> dict[str, Any]:
    """Compile (or reuse) ``path`` for x86 with verification; the row's compile fields."""
    from bnfold import artifact
    from bnfold.errors import BnfoldError, CheckFailed
    from bnfold.lower import compiler as lower

    if (outdir / artifact.MANIFEST).is_file():
        manifest = artifact.load(outdir)
        if (manifest.source.get("sha256") == artifact.sha256_file(path)
                and manifest.verification.get("status") in ("passed", "failed")):  # fmt: skip
            logger.info("%s: reusing %s", path.name, outdir)
            return _compile_fields(manifest)
    try:
        lower.compile_model(path, "x86", outdir, atol=0.0, rtol=1e-4)
    except CheckFailed as exc:  # the artifact exists and is timed, but is marked wrong
        logger.warning("%s: %s", path.name, exc)
    except BnfoldError as exc:
        return {"status": "compile failed", "reason": zoo._one_line(exc)}
    return _compile_fields(artifact.load(outdir))


def _compile_fields(manifest: Any) -> dict[str, Any]:
    """The row's compile fields from a folder's :class:`bnfold.artifact.Manifest`."""
    c = manifest.compile
    v = manifest.verification
    rules = c.get("schedule_rules", {})
    return {
        "status": "passed" if v.get("status") == "passed" else "verify failed",
        "compile_s": c["seconds"],
        "compile_peak_rss_mb": c.get("peak_rss_mb"),
        "verify_ratio": v.get("worst_abs_over_max_ref"),
        "schedule_rules": rules,
        "unscheduled": rules.get("unscheduled", 0),
        "functions": sum(rules.values()),
    }


def _time(outdir: Path, path: Path, threads: int, rounds: int, block: int,
          cpu_time: bool) -> dict[str, Any]:  # fmt: skip
    # The machine is shared: its load when the model was timed says how far to trust the figure.
    load = os.getloadavg()[0]
    engines = {"compiled": (outdir, path), "ort": (outdir, path)}
    times = measure(engines, threads, rounds, block, cpu_time=cpu_time and threads == 1)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"tvm_ms": med["compiled"], "ort_ms": med["ort"], "ratio": med["compiled"] / med["ort"],
            "samples": len(times["compiled"]), "loadavg_1m": round(load, 2),
            "clock": "thread CPU time" if cpu_time and threads == 1 else "wall"}  # fmt: skip


def geomean(values: list[float]) -> float:
    """Geometric mean (nan for no values)."""
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def summary(rows: list[dict[str, Any]], threads: list[int]) -> dict[str, Any]:
    """Per thread count: geomean ratio over timed models, the worst model, counts."""
    out: dict[str, Any] = {"models": len(rows),
                           "compiled": sum(r["status"] != "compile failed" for r in rows),
                           "verified": sum(r["status"] == "passed" for r in rows)}  # fmt: skip
    for t in threads:
        timed = [(r["model"], r["latency"][str(t)]["ratio"]) for r in rows
                 if str(t) in r.get("latency", {})]  # fmt: skip
        if timed:
            worst = max(timed, key=lambda mr: mr[1])
            out[f"{t}T"] = {"geomean_ratio": geomean([v for _, v in timed]), "timed": len(timed),
                            "worst": {"model": worst[0], "ratio": worst[1]},
                            "above_1.5x": sorted(m for m, v in timed if v > 1.5)}  # fmt: skip
    return out


def table(rows: list[dict[str, Any]], threads: list[int]) -> str:
    head = f"{'model':<34} {'status':<14} {'compile s':>9} {'verify':>8} {'unsched':>7}"
    for t in threads:
        head += f" {f'tvm ms {t}T':>10} {f'ort ms {t}T':>10} {f'ratio {t}T':>8}"
    lines = [head]
    for r in rows:
        line = f"{r['model']:<34} {r['status']:<14} "
        if r["status"] == "compile failed":
            lines.append(line + r["reason"])
            continue
        line += f"{r['compile_s']:>9.1f} {r['verify_ratio']:>8.1e} {r['unscheduled']:>7d}"
        for t in threads:
            lat = r.get("latency", {}).get(str(t))
            line += (f" {lat['tvm_ms']:>10.2f} {lat['ort_ms']:>10.2f} {lat['ratio']:>8.2f}"
                     if lat else f" {'-':>10} {'-':>10} {'-':>8}")  # fmt: skip
        lines.append(line)
    s = summary(rows, threads)
    lines.append(f"{s['compiled']}/{s['models']} compiled, {s['verified']} verified")
    for t in threads:
        if f"{t}T" in s:
            st = s[f"{t}T"]
            worst = st["worst"]
            lines.append(f"{t} thread(s): geomean compiled/onnxruntime {st['geomean_ratio']:.2f} "
                         f"over {st['timed']} models; worst {worst['model']} "
                         f"{worst['ratio']:.2f}x; above 1.5x: {len(st['above_1.5x'])}")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], threads: list[int], dest: Path) -> None:
    """Latency ratio per model (sorted by the 1-thread ratio) and compile seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    timed = [r for r in rows if r.get("latency")]
    if not timed:
        return
    t0 = str(threads[0])
    timed.sort(key=lambda r: r["latency"].get(t0, {}).get("ratio", float("inf")))
    names = [r["model"] for r in timed]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 0.32 * len(names) + 2),
                                  gridspec_kw={"width_ratios": [3, 1]}, sharey=True)  # fmt: skip
    height = 0.8 / len(threads)
    for i, t in enumerate(threads):
        vals = [r["latency"].get(str(t), {}).get("ratio", float("nan")) for r in timed]
        ys = [y + i * height for y in range(len(names))]
        ax.barh(ys, vals, height=height, label=f"{t} thread(s)")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    fmt = matplotlib.ticker.FormatStrFormatter("%.2g")
    ax.xaxis.set_major_formatter(fmt)
    ax.xaxis.set_minor_formatter(fmt)
    ax.set_yticks([y + height * (len(threads) - 1) / 2 for y in range(len(names))], names)
    ax.set_xlabel("latency bnfold / onnxruntime ORT_ENABLE_ALL (lower is better)")
    ax.legend(loc="lower right")
    ax2.barh(range(len(names)), [r["compile_s"] for r in timed], color="gray")
    ax2.axvline(60, color="r", lw=0.8, ls="--")
    ax2.set_xlabel("compile s (goal < 60)")
    fig.suptitle(f"bnfold zoo on {cpu_name()}, batch 1")
    fig.tight_layout()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, dest)


def main(argv: list[str] | None = None) -> int:
    """Compile, verify, time; table on stdout, JSON and plot written; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path(".cache/zoo"))
    parser.add_argument("--style", default="ts_bn", choices=zoo.STYLES)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--only", help="comma-separated architectures (default: every one built)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block", type=int, default=3)
    parser.add_argument("--fresh", action="store_true", help="ignore the rows in --json")
    parser.add_argument("--report-only", action="store_true",
                        help="only print the table and redraw the plot from --json")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile and verify only (a later run times them)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="1 thread: time each run by its thread's CPU time (a shared host)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    threads = [int(t) for t in args.threads.split(",")]
    if args.report_only:
        import json

        rows = json.loads(args.json.read_text())["rows"]
        print(table(rows, threads))
        plot(rows, threads, args.plot)
        return 0

    index = zoo.read_index(args.zoo)["models"]
    names = args.only.split(",") if args.only else list(zoo.ARCHS)
    keys = [f"{a}.{args.style}" for a in names
            if index.get(f"{a}.{args.style}", {}).get("status") == "ok"]  # fmt: skip
    if not keys:
        print(f"bench_zoo: no {args.style} models in {args.zoo}; run `make zoo` first",
              file=sys.stderr)  # fmt: skip
        return 2
    old: dict[str, dict[str, Any]] = {}
    if args.json.is_file() and not args.fresh:
        import json

        with contextlib.suppress(ValueError, KeyError):
            old = {r["model"]: r for r in json.loads(args.json.read_text())["rows"]}
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for key in keys:
        path = args.zoo / index[key]["file"]
        row = old.get(key) if old.get(key, {}).get("sha256") == index[key]["sha256"] else None
        if row is None:
            row = {"model": key, "arch": index[key]["arch"], "style": args.style,
                   "sha256": index[key]["sha256"], "families": index[key]["families"],
                   "input_shape": index[key]["input"]["shape"], "latency": {}}  # fmt: skip
        outdir = args.zoo / "compiled" / key
        if "status" not in row or any(str(t) not in row["latency"] for t in threads):
            row.update(_compile(path, outdir))
        if row["status"] != "compile failed" and not args.compile_only:
            for t in threads:
                if str(t) not in row["latency"]:
                    row["latency"][str(t)] = _time(outdir, path, t, args.rounds, args.block,
                                                   args.cpu_time)
                    lat = row["latency"][str(t)]
                    logger.info("%-34s %dT tvm %8.2f ms ort %8.2f ms ratio %5.2f (unscheduled "
                                "%d, compile %.1f s)", key, t, lat["tvm_ms"], lat["ort_ms"],
                                lat["ratio"], row["unscheduled"], row["compile_s"])  # fmt: skip
        rows.append(row)
        _write(args, rows, old, threads)
    logger.info("bench_zoo: %d models in %.0f s", len(rows), time.perf_counter() - t_start)
    print(table(rows, threads))
    plot(rows, threads, args.plot)
    print(f"wrote {args.json} and {args.plot}")
    return 0


def _write(args: argparse.Namespace, rows: list[dict[str, Any]],
           old: dict[str, dict[str, Any]], threads: list[int]) -> None:  # fmt: skip
    """The JSON: this run's rows, then rows of an earlier run not redone (kept, not lost)."""
    from bnfold import atomic
    from bnfold.lower import compiler as lower

    done = {r["model"] for r in rows}
    all_rows = rows + [r for k, r in old.items() if k not in done]
    atomic.write_json(args.json, {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "versions": lower.versions(),
        "zoo_style": args.style,
        "batch": 1,
        "ort": "ORT_ENABLE_ALL on the original file, intra_op_num_threads = threads",
        "method": f"bnfold.device.bench.measure: one process per engine, alternating blocks of "
                  f"{args.block} runs x {args.rounds} rounds, medians",
        "summary": summary(all_rows, threads),
        "rows": all_rows,
    })  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
