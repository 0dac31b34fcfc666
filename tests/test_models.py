"""Real models (built by `make models`): every BN folded or reported, outputs verified on real
inputs.

Gate: max abs error <= max(1e-5 x max|reference|, 2 x the model's own float32 noise floor). The
noise floor is how far the ORIGINAL model's output moves when its input is perturbed by one
float32 rounding step (1e-7 relative): a fold is exact maths but rounds differently, so no fold
can be held below that. For PP-OCR det it is ~1.7e-5 x max|ref| on the real page image; for the
other models it is below the 1e-5 bound, which then applies.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import bnfold
from bnfold import ir as bir
from bnfold.check import run_onnxruntime

CACHE = Path(os.environ.get("BNFOLD_MODELS", ".cache/models"))
# name -> (BN count, expected outcome counts)
EXPECTED = {
    "mobilenet_v2": 52,
    "resnet18": 20,
    "ppocr_det": 3,
    "ppocr_rec": 6,
    "ppocr_cls": 35,
}

pytestmark = pytest.mark.models


def _need(name: str) -> tuple[Path, dict[str, np.ndarray]]:
    model, inputs = CACHE / f"{name}.onnx", CACHE / "inputs" / f"{name}.npz"
    if not model.is_file() or not inputs.is_file():
        if os.environ.get("BNFOLD_MODELS"):  # `make test` built them: missing is a failure
            pytest.fail(f"{model} or {inputs} missing; run `make models`")
        pytest.skip("real models not fetched (run `make models`)")
    with np.load(inputs) as data:
        return model, {k: data[k] for k in data.files}


def noise_floor(model: Path, feeds: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> float:
    """Max output change of the original model under 1e-7 relative input perturbations."""
    rng = np.random.default_rng(1)
    worst = 0.0
    for _ in range(2):
        moved = {
            k: (v * (1 + 1e-7 * rng.choice([-1.0, 1.0], v.shape))).astype(v.dtype)
            for k, v in feeds.items()
        }
        out = run_onnxruntime(model, moved)
        worst = max(worst, max(float(np.max(np.abs(out[k] - ref[k]))) for k in ref))
    return worst


@pytest.mark.parametrize("name", list(EXPECTED))
def test_real_model_folds_and_verifies(name: str) -> None:
    path, feeds = _need(name)
    t0 = time.perf_counter()
    folded, report = bnfold.fold(bnfold.load(path))
    elapsed = time.perf_counter() - t0
    assert report.bn_before == EXPECTED[name]
    # Every BN has exactly one record; on these models every one folds backward.
    assert len(report.batchnorms) == EXPECTED[name]
    assert report.counts()["folded_backward"] == EXPECTED[name], report.table()
    assert report.bn_after == 0
    proto = bir.to_proto(folded)
    onnx.checker.check_model(proto, full_check=True)
    ref = run_onnxruntime(path, feeds)
    got = run_onnxruntime(proto, feeds)
    floor = noise_floor(path, feeds, ref)
    for key in ref:
        scale = float(np.max(np.abs(ref[key])))
        err = float(np.max(np.abs(ref[key] - got[key])))
        bound = max(1e-5 * scale, 2 * floor)
        print(
            f"{name}: {report.bn_before} BN, fold {report.pass_ms:.1f} ms pass / "
            f"{elapsed * 1e3:.0f} ms total, err {err:.3g} max|ref| {scale:.3g} "
            f"floor {floor:.3g}"
        )
        assert err <= bound, f"{key}: {err:g} > {bound:g} (floor {floor:g}, max|ref| {scale:g})"
        assert np.all(np.isfinite(got[key]))
    cos = [
        float(
            np.dot(ref[k].ravel(), got[k].ravel())
            / (np.linalg.norm(ref[k]) * np.linalg.norm(got[k]))
        )
        for k in ref
    ]
    assert min(cos) > 0.999999


def test_mobilenet_v2_top1_unchanged_and_fold_is_fast() -> None:
    path, feeds = _need("mobilenet_v2")
    result = bnfold.verify(path, bnfold.fold(bnfold.load(path))[0], inputs=feeds)
    assert result.passed, result.table()
    assert result.outputs[0].top1 == 1.0 and result.outputs[0].top5 == 1.0
    assert result.samples == 8


def test_folding_a_real_model_twice_is_byte_identical(tmp_path: Path) -> None:
    path, _ = _need("ppocr_cls")
    outs = []
    for i in range(2):
        out = tmp_path / f"f{i}.onnx"
        bnfold.save(bnfold.fold(bnfold.load(path))[0], out)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
