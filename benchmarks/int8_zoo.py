"""``bnfold compile --int8`` over the zoo: exit codes, never 3 (issue 14).

    python -m benchmarks.int8_zoo [--zoo .cache/zoo] [--style ts_bn] [--only a,b]
        [--samples 24] [--timeout 900] [--json benchmarks/results/int8_zoo.json]

Per zoo export (``ZOO/*.STYLE.onnx``), ``bnfold compile MODEL --int8 --calib random.npz
--min-cosine 0`` runs as a user would run it, in its own process: random-image calibration
(uniform pixels in [0, 1), ImageNet mean/std, the model input's shape; a fifth held out by the
command itself), the accuracy gate off (random images say nothing about accuracy; the held-out
cosine is still recorded), and the int8 artifact's layer-by-layer check on (its default). Per
model: the exit code (0 ok, 1 a check failed, 2 bad input, 3 internal error), the command's
one-line error, the held-out cosine, the quantized/integer group counts, the check's status,
the wall seconds (shared cores: only a guide) and the child's CPU seconds, and each step's
seconds as the quantization report and the manifest give them.

The JSON is rewritten after every model and a rerun skips models it already holds, so a run on
shared cores can be stopped and resumed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)


def random_images(model: Path, n: int, dest: Path) -> None:
    """``n`` random ImageNet-normalized images for every input of ``model``, as an .npz."""
    proto = onnx.load(str(model), load_external_data=False)
    init = {i.name for i in proto.graph.initializer}
    rng = np.random.default_rng(0)
    arrays = {}
    for inp in proto.graph.input:
        if inp.name in init:
            continue
        dims = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
        x = rng.random((n, *dims[1:]), dtype=np.float32)
        if len(dims) == 4 and dims[1] == 3:
            x = (x - MEAN) / STD
        arrays[inp.name] = x.astype(np.float32)
    np.savez(dest, **arrays)


def run_one(model: Path, samples: int, timeout: float) -> dict[str, Any]:
    """``bnfold compile --int8`` on ``model``; its exit code and what its outputs say."""
    row: dict[str, Any] = {"model": model.name}
    with tempfile.TemporaryDirectory(prefix="int8-zoo-") as tmp:
        data, out = Path(tmp) / "calib.npz", Path(tmp) / "out"
        random_images(model, samples, data)
        cmd = [sys.executable, "-m", "bnfold", "compile", str(model), "--int8", "--calib",
               str(data), "--min-cosine", "0", "-o", str(out)]  # fmt: skip
        start = time.perf_counter()
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "TVM_NUM_THREADS": "1"})  # fmt: skip
            row["exit"] = proc.returncode
            err = proc.stderr.strip().splitlines()
            if proc.returncode:
                row["error"] = err[-1] if err else ""
        except subprocess.TimeoutExpired:
            row["exit"] = "timeout"
        row["seconds"] = round(time.perf_counter() - start, 1)
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # a killed child is not counted
        row["cpu_seconds"] = round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 1)
        report = out / "quant_report.json"
        if report.is_file():
            r = json.loads(report.read_text())
            row["cosine"] = (r.get("accuracy") or {}).get("cosine")
            row["counts"] = r.get("counts")
            row["quantize_steps"] = r.get("seconds")
        manifest = out / "manifest.json"
        if manifest.is_file():
            m = json.loads(manifest.read_text())
            q = m["compile"].get("int8") or {}
            row["int8"] = {k: q.get(k) for k in ("quantize_groups", "integer_groups",
                                                  "kernel_groups")}  # fmt: skip
            v = m.get("verification", {})
            row["verification"] = {k: v.get(k) for k in ("status", "max_lsb", "tensors")}
            row["compile_steps"] = m["compile"].get("steps")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=Path(".cache/zoo"))
    ap.add_argument("--style", default="ts_bn")
    ap.add_argument("--only", default=None, help="comma-separated model names")
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/int8_zoo.json"))
    args = ap.parse_args()
    # Smallest first: a run stopped early has covered as many models as it could.
    models = sorted(args.zoo.glob(f"*.{args.style}.onnx"), key=lambda p: p.stat().st_size)
    if args.only:
        wanted = set(args.only.split(","))
        models = [m for m in models if m.name.split(".")[0] in wanted]
    rows = json.loads(args.json.read_text())["rows"] if args.json.is_file() else []
    done = {r["model"] for r in rows}
    for model in models:
        if model.name in done:
            continue
        row = run_one(model, args.samples, args.timeout)
        print(json.dumps(row), flush=True)
        rows.append(row)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"style": args.style, "exit_codes": exit_codes(rows),
                                         "rows": rows}, indent=2) + "\n")  # fmt: skip
    print(f"{len(rows)} models; exit codes: {exit_codes(rows)}")


def exit_codes(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How many models ended with each exit code."""
    exits = [str(r["exit"]) for r in rows]
    return {c: exits.count(c) for c in sorted(set(exits))}


if __name__ == "__main__":
    main()
