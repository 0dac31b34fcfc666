"""``bnfold bench`` on a small conv+BN model: four engines, interleaved, gates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from click.testing import CliRunner

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

from bnfold.cli.deploy import bench_cmd  # noqa: E402
from bnfold.device import bench  # noqa: E402
from bnfold.errors import CheckFailed  # noqa: E402
from bnfold.lower import compiler as lower  # noqa: E402

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
convbn (float[1,3,8,8] x) => (float[1,8,8,8] y) <
    float[8,3,3,3] w = {W}, float[8] scale = {S}, float[8] shift = {B},
    float[8] mean = {B}, float[8] var = {S}
> {
    c = Conv <pads = [1, 1, 1, 1]> (x, w)
    y = BatchNormalization <epsilon = 1e-5> (c, scale, shift, mean, var)
}
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)

    def vals(n: int, lo: float, hi: float) -> str:
        return "{" + ", ".join(f"{v:.6f}" for v in rng.uniform(lo, hi, n)) + "}"

    text = MODEL.replace("{W}", vals(216, -1, 1)).replace("{S}", vals(8, 0.5, 2))
    text = text.replace("{B}", vals(8, -1, 1))
    path = tmp_path_factory.mktemp("bench") / "convbn.onnx"
    onnx.save(onnx.parser.parse_model(text), path)
    return path


@pytest.fixture(scope="module")
def outdir(model: Path) -> Path:
    out = model.parent / "x86"
    lower.compile_model(model, "x86", out, verify=False)
    return out


def test_bench_outdir_all_engines_and_json(outdir: Path, tmp_path: Path) -> None:
    js = tmp_path / "b.json"
    res = CliRunner().invoke(
        bench_cmd, [str(outdir), "--rounds", "2", "--block", "3", "--json", str(js)]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(js.read_text())
    assert set(data["engines"]) == set(bench.ENGINES) and data["original_used"]
    for s in data["engines"].values():
        assert s["samples"] == 6 and 0 < s["min_ms"] <= s["p50_ms"] <= s["p90_ms"]
    assert data["engines"]["ort"]["ratio_to_ort"] == 1.0
    assert "bnfold compiled (TVM)" in res.output


def test_bench_model_path_and_gates(model: Path) -> None:
    res = CliRunner().invoke(
        bench_cmd, [str(model), "--rounds", "1", "--block", "2", "--max-latency-ms", "1e-6"]
    )
    assert isinstance(res.exception, CheckFailed) and "max-latency-ms" in str(res.exception)


def test_gate_logic() -> None:
    r = {"engines": {"compiled": {"p50_ms": 2.0, "ratio_to_ort": 1.5}}}
    assert bench.gate(r, max_latency_ms=3, max_ratio=2) == []
    assert len(bench.gate(r, max_latency_ms=1, max_ratio=1)) == 2
