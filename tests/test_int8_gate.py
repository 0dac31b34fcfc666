"""The default accuracy gate of ``bnfold quantize`` and ``compile --int8`` (issue 14).

An int8 model far from fp32 on the held-out samples (mean cosine < 0.9 by default) fails the
command (exit 1) with one stderr line naming the worst layers by SQNR and what to try; the model
is written as ``model.int8.rejected.onnx``, never as ``model.int8.onnx``. ``--min-cosine 0``
turns the gate off.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from bnfold.testing import parse


def _model(starved: bool) -> onnx.ModelProto:
    """Conv -> Conv -> GAP -> Gemm. With ``starved``, channel 0 of the first conv outputs a
    constant 1e4 that the second conv ignores: it fills the activation's int8 range, so the
    channels that matter quantize to 0 (int8 cannot do better there, whatever the options)."""
    rng = np.random.default_rng(0)
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3,8,8] x) => (float[N,10] logits) {
        c1 = Conv <pads=[1,1,1,1]> (x, W1, B1)
        c2 = Conv (c1, W2, B2)
        gp = GlobalAveragePool (c2)
        f = Flatten (gp)
        logits = Gemm <transB=1> (f, Wf, Bf)
    }"""
    w1 = rng.normal(0, 0.3, (8, 3, 3, 3))
    b1 = rng.normal(0, 0.3, 8)
    w2 = rng.normal(0, 0.3, (8, 8, 1, 1))
    if starved:
        w1[0], b1[0], w2[:, 0] = 0.0, 1e4, 0.0
    tensors = {"W1": w1, "B1": b1, "W2": w2, "B2": rng.normal(0, 0.3, 8),
               "Wf": rng.normal(0, 1, (10, 8)), "Bf": np.zeros(10)}  # fmt: skip
    return parse(text, **{k: np.asarray(v, np.float32) for k, v in tensors.items()})


def _files(tmp_path: Path, starved: bool) -> tuple[Path, Path]:
    model, data = tmp_path / "m.onnx", tmp_path / "c.npz"
    onnx.save(_model(starved), model)
    rng = np.random.default_rng(1)
    np.savez(data, x=rng.normal(0, 1, (30, 3, 8, 8)).astype(np.float32))
    return model, data


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``bnfold ARGS`` through its entry point (one stderr line per failure); (code, stdout,
    stderr)."""
    from bnfold.cli import cli, main
    from bnfold.cli.quant import COMMANDS

    for command in COMMANDS:  # registered as bnfold.cli does
        if command.name not in cli.commands:
            cli.add_command(command)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(list(args))
        raise SystemExit(0)
    got = capsys.readouterr()
    return int(e.value.code or 0), got.out, got.err


def _bnfold(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code, _, err = run_cli(capsys, *args)
    return code, err


def _quantize(capsys, model: Path, data: Path, out: Path, *extra: str) -> tuple[int, str]:
    return _bnfold(capsys, "quantize", str(model), "--calib", str(data), "-o", str(out), *extra)


def test_default_gate_passes_a_good_model(tmp_path: Path, capsys) -> None:
    model, data = _files(tmp_path, starved=False)
    code, err = _quantize(capsys, model, data, tmp_path / "q")
    assert code == 0, err
    assert (tmp_path / "q" / "model.int8.onnx").is_file()
    assert not (tmp_path / "q" / "model.int8.rejected.onnx").exists()


def test_default_gate_fails_garbage_with_one_line(tmp_path: Path, capsys) -> None:
    model, data = _files(tmp_path, starved=True)
    out = tmp_path / "q"
    code, err = _quantize(capsys, model, data, out)
    assert code == 1, err
    err = err.strip()
    assert err.splitlines() == [err], err
    assert "int8 accuracy gate failed on 6 held-out sample(s): cosine similarity" in err
    assert "< 0.9" in err and "lowest activation SQNR: " in err
    assert "--exclude NODE" in err and "--min-cosine 0" in err
    # The worst layer is named by its node (what --exclude takes).
    nodes = {n.name for n in onnx.load(out / "model.int8.rejected.onnx").graph.node}
    worst = err.split("lowest activation SQNR: ")[1].split(" ")[0]
    assert worst in nodes, (worst, err)
    assert not (out / "model.int8.onnx").exists()
    report = json.loads((out / "quant_report.json").read_text())
    assert report["accuracy"]["cosine"] < 0.9
    # Turned off: the same model is accepted, and replaces the rejected one.
    code, err = _quantize(capsys, model, data, out, "--min-cosine", "0")
    assert code == 0, err
    assert (out / "model.int8.onnx").is_file()
    assert not (out / "model.int8.rejected.onnx").exists()


def test_compile_int8_fails_the_gate_before_compiling(tmp_path: Path, capsys) -> None:
    pytest.importorskip("tvm")
    model, data = _files(tmp_path, starved=True)
    out = tmp_path / "out"
    code, err = _bnfold(capsys, "compile", str(model), "--int8", "--calib", str(data), "-o",
                        str(out))  # fmt: skip
    assert code == 1, err
    assert err.strip().splitlines() == [err.strip()] and "int8 accuracy gate failed" in err
    assert not (out / "model.int8.onnx").exists() and not (out / "model.so").exists()


def test_target_cosine_keeps_the_damaged_layers_in_float(tmp_path: Path, capsys) -> None:
    """The starved model fails the gate with everything in int8; --target-cosine finds the
    layers to keep in float, meets the target on the held-out samples and lists them."""
    model, data = _files(tmp_path, starved=True)
    out = tmp_path / "q"
    code, err = _quantize(capsys, model, data, out, "--target-cosine", "0.99")
    assert code == 0, err
    report = json.loads((out / "quant_report.json").read_text())
    target = report["target"]
    assert target["met"] and report["accuracy"]["cosine"] >= 0.99
    assert target["rounds"][0]["cosine"] < 0.9 and len(target["rounds"]) >= 2
    assert target["float_nodes"]
    floats = {r["node"] for r in report["layers"] if r["status"] == "float"}
    assert set(target["float_nodes"]) <= floats
    assert (out / "model.int8.onnx").is_file()
