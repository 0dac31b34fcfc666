"""int8 accuracy of ImageNet MobileNetV2: bnfold's defaults beside AIMET's post-training recipe.

    make aimet-venv        # once: .aimet-venv with the CPU torch 2.13.0 and aimet-onnx
    python -m benchmarks.int8_aimet [--aimet-python .aimet-venv/bin/python] [--cache ...]

AIMET (Qualcomm's quantization toolkit, ``aimet-onnx``) needs torch and its own pins, so it runs
in a separate virtual environment: this module calls itself there with ``--produce`` to write
AIMET's QDQ model, and evaluates every model here, on the same data and with the same metric
as :mod:`benchmarks.int8_accuracy` (54 calibration views of 6 photographs, 45 held-out views of
5 others; top-1 agreement with the fp32 model and the mean cosine of the logits; every model
run by onnxruntime with optimizations off, which runs a QDQ model as written).

Rows, all per-channel int8 weights and uint8 activations with min-max ranges:

* ``aimet``: ``QuantizationSimModel`` with AIMET's per-channel config, encodings computed on
  the calibration views, exported with ``to_onnx_qdq``;
* ``aimet-cle``: AIMET's recipe before that: BN folding + cross-layer equalization + high-bias
  fold (``aimet_onnx.cross_layer_equalization.equalize_model``);
* ``aimet-cle-tfe``: the same with AIMET's ``tf_enhanced`` ranges (an SQNR search over
  histogram candidates) instead of min-max;
* ``ort``: onnxruntime ``quantize_static`` per-channel QDQ;
* ``bnfold``: ``bnfold quantize`` defaults (fold, CLE, empirical bias correction).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("int8_aimet")

DEFAULT_PYTHON = Path(".aimet-venv/bin/python")


def produce(model: Path, calib_npz: Path, out: Path, cle: bool, scheme: str) -> None:
    """(In AIMET's environment.) AIMET's QDQ model of ``model``, calibrated on ``calib_npz``
    (one array per input, the samples on the batch axis), written to ``out``."""
    import os

    import onnx
    from aimet_onnx.common import quantsim_config
    from aimet_onnx.cross_layer_equalization import equalize_model
    from aimet_onnx.quantsim import QuantizationSimModel

    proto = onnx.load(str(model))
    if cle:
        equalize_model(proto)  # folds the BNs first; in place
    config = os.path.join(os.path.dirname(quantsim_config.__file__),
                          "default_config_per_channel.json")  # fmt: skip
    sim = QuantizationSimModel(proto, param_type="int8", activation_type="int8",
                               quant_scheme=scheme, config_file=config)  # fmt: skip
    data = np.load(calib_npz)
    names = list(data.files)
    n = data[names[0]].shape[0]
    sim.compute_encodings([{k: data[k][i : i + 1] for k in names} for i in range(n)])
    onnx.save(sim.to_onnx_qdq(prequantize_constants=True), str(out))


def _aimet_model(python: Path, model: Path, cal: list[dict[str, np.ndarray]], cle: bool,
                 scheme: str, tmp: Path) -> Any:  # fmt: skip
    import onnx

    npz = tmp / "calib.npz"
    np.savez(npz, **{k: np.concatenate([f[k] for f in cal]) for k in cal[0]})
    out = tmp / f"aimet{'-cle' if cle else ''}-{scheme}.onnx"
    cmd = [str(python), "-m", "benchmarks.int8_aimet", "--produce", str(model), str(npz),
           str(out), "--scheme", scheme] + (["--cle"] if cle else [])  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"AIMET failed: {proc.stderr.strip().splitlines()[-1:]}")
    return onnx.load(str(out))


def run(cache: Path, python: Path, only: set[str] | None) -> list[dict[str, Any]]:
    from benchmarks.int8_accuracy import (
        CALIBRATION,
        EVALUATION,
        ort_quantize_static,
        views,
    )
    from benchmarks.models import model_path
    from bnfold.check import run_onnxruntime
    from bnfold.quant.quantize import quantize

    path = model_path(cache, "mobilenet_v2")
    cal, ev = views(CALIBRATION), views(EVALUATION)
    x_ev = {"input": np.concatenate([f["input"] for f in ev])}
    ref = run_onnxruntime(path, x_ev)["logits"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        makers = {
            "aimet": ("AIMET QuantSim per-channel, min-max",
                      lambda: _aimet_model(python, path, cal, False, "min_max", Path(tmp))),
            "aimet-cle": ("AIMET BN fold + CLE + high-bias fold, QuantSim per-channel",
                          lambda: _aimet_model(python, path, cal, True, "min_max", Path(tmp))),
            "aimet-cle-tfe": ("AIMET BN fold + CLE + high-bias fold, per-channel, tf_enhanced",
                              lambda: _aimet_model(python, path, cal, True, "tf_enhanced",
                                                   Path(tmp))),
            "ort": ("onnxruntime quantize_static per-channel QDQ",
                    lambda: ort_quantize_static(path, cal)),
            "bnfold": ("bnfold quantize defaults (fold, CLE, bias correction)",
                       lambda: quantize(path, cal)[0]),
        }  # fmt: skip
        for tag, (what, make) in makers.items():
            if only and tag not in only:
                continue
            t0 = time.perf_counter()
            try:
                model = make()
            except Exception as e:  # one row per configuration, a failure included
                rows.append({"config": tag, "what": what, "error": str(e)})
                logger.warning("%s: %s", tag, e)
                continue
            got = run_onnxruntime(model, x_ev)["logits"]
            cos = np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
            rows.append({
                "config": tag, "what": what,
                "top1_agreement": float(np.mean(ref.argmax(1) == got.argmax(1))),
                "cosine": float(np.mean(cos)), "cosine_min": float(np.min(cos)),
                "held_out_views": len(ev), "calibration_views": len(cal),
                "seconds": round(time.perf_counter() - t0, 1),
            })  # fmt: skip
            logger.info("%s: %s", tag, rows[-1])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--produce", nargs=3, metavar=("MODEL", "CALIB_NPZ", "OUT"))
    ap.add_argument("--cle", action="store_true")
    ap.add_argument("--scheme", default="min_max")
    ap.add_argument("--only", help="comma-separated configs to (re)run; the JSON keeps the others")
    ap.add_argument("--aimet-python", type=Path, default=DEFAULT_PYTHON)
    ap.add_argument("--cache", type=Path, default=Path(".cache/models"))
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/int8_aimet.json"))
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")  # fmt: skip
    if args.produce:
        produce(*(Path(p) for p in args.produce), cle=args.cle, scheme=args.scheme)
        return
    if not args.aimet_python.is_file():
        sys.exit(f"{args.aimet_python} not found: run `make aimet-venv` first")
    only = set(args.only.split(",")) if args.only else None
    rows = run(args.cache, args.aimet_python, only)
    if only and args.json.is_file():  # keep the rows of the configurations not rerun
        kept = [r for r in json.loads(args.json.read_text())["rows"] if r["config"] not in only]
        rows = kept + rows
    args.json.write_text(json.dumps({"model": "mobilenet_v2", "rows": rows}, indent=2) + "\n")
    print("| config | what | top-1 agreement | cosine (mean / min) |")
    print("|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | {r['what']} | failed: {r['error']} | |")
        else:
            print(f"| {r['config']} | {r['what']} | {r['top1_agreement']:.3f} | "
                  f"{r['cosine']:.4f} / {r['cosine_min']:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
