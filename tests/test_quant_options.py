"""``QuantOptions``: one typed set of quantization options, its defaults in one place, and the
library call ``bnfold.quant.run.quantize(model, options)`` that the CLI commands run.

The CLI's option defaults are QuantOptions' defaults (a command line without options parses to
``QuantOptions()``); the library call gives the same int8 model and report as the command.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bnfold.errors import BnfoldError
from bnfold.quant import run
from bnfold.quant.options import (
    ACTIVATION_TYPES,
    DEFAULTS,
    INT8_MODEL,
    REJECTED_MODEL,
    REPORT,
    QuantOptions,
)
from bnfold.testing import parse


def _parsed(command: Any, *args: str) -> dict[str, Any]:
    """The parameters click hands ``command`` for ``args``."""
    with command.make_context(command.name, list(args)) as ctx:
        return dict(ctx.params)


def test_cli_defaults_are_the_options_defaults(tmp_path: Path) -> None:
    from bnfold.cli.quant import quantize_cmd

    params = _parsed(quantize_cmd, str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q"))
    del params["model"], params["outdir"]
    assert QuantOptions(**params) == DEFAULTS


def test_compile_takes_the_same_options(tmp_path: Path) -> None:
    from bnfold.cli.lower import compile_cmd
    from bnfold.cli.quant import quantize_cmd

    args = ("--calib", "d.npz", "--per-tensor", "--method", "percentile", "--exclude", "a",
            "--exclude", "b", "--mean", "0.5,0.4,0.3", "--crop", "8x8",
            "--min-cosine", "0.5")  # fmt: skip
    q = _parsed(quantize_cmd, "m.onnx", "-o", "q", *args)
    c = _parsed(compile_cmd, "m.onnx", "-o", "c", "--int8", *args)
    fields = set(QuantOptions.__dataclass_fields__)
    want = QuantOptions(**{k: v for k, v in q.items() if k in fields})
    assert QuantOptions(**{k: v for k, v in c.items() if k in fields}) == want
    assert want.per_channel is False and want.exclude == ("a", "b")
    assert want.preprocess.mean == (0.5, 0.4, 0.3) and want.preprocess.crop == (8, 8)
    assert want.quantize_kwargs()["method"] == "percentile"


def test_activation_types_agree_with_the_pass() -> None:
    from bnfold.passes.quantize_int8 import ACTIVATION_TYPES as PASS_TYPES

    assert set(ACTIVATION_TYPES) == set(PASS_TYPES)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("method", "mse", "method 'mse' is not one of minmax, percentile, entropy"),
        ("activation_type", "int4", "activation_type 'int4' is not one of uint8, int8"),
        ("bias_correction", "yes", "bias_correction 'yes' is not one of"),
        ("layout", "CHW", "layout 'CHW' is not one of NCHW, NHWC"),
        ("eval_fraction", 1.0, "eval_fraction must be in (0, 1)"),
        ("percentile", 10.0, "percentile must be in [50, 100]"),
        ("calib_size", 0, "calib_size must be at least 1"),
        ("min_cosine", float("nan"), "min_cosine must be in [0, 1]"),
        ("target_cosine", 1.5, "target_cosine must be in [0, 1]"),
    ],
)
def test_bad_options_are_one_line(field: str, value: Any, message: str) -> None:
    with pytest.raises(BnfoldError, match=re.escape(message)):
        QuantOptions(**{field: value})


def test_options_are_frozen_and_exclude_is_a_tuple() -> None:
    options = QuantOptions(exclude=["b", "a"])  # type: ignore[arg-type]
    assert options.exclude == ("b", "a")
    with pytest.raises(AttributeError):
        options.method = "entropy"  # type: ignore[misc]


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3,8,8] x) => (float[N,10] logits) {
        c1 = Conv <pads=[1,1,1,1]> (x, W1, B1)
        r = Relu (c1)
        gp = GlobalAveragePool (r)
        f = Flatten (gp)
        logits = Gemm <transB=1> (f, Wf, Bf)
    }"""
    tensors = {"W1": rng.normal(0, 0.3, (8, 3, 3, 3)), "B1": rng.normal(0, 0.3, 8),
               "Wf": rng.normal(0, 1, (10, 8)), "Bf": np.zeros(10)}  # fmt: skip
    return parse(text, **{k: np.asarray(v, np.float32) for k, v in tensors.items()})


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    model, data = tmp_path / "m.onnx", tmp_path / "c.npz"
    onnx.save(_model(), model)
    rng = np.random.default_rng(1)
    np.savez(data, x=rng.normal(0, 1, (20, 3, 8, 8)).astype(np.float32))
    return model, data


def test_library_call_is_the_command(files: tuple[Path, Path], tmp_path: Path) -> None:
    """``run.quantize`` + ``run.write`` write what ``bnfold quantize`` writes."""
    from bnfold.cli.quant import quantize_cmd

    model, data = files
    cli_out, lib_out = tmp_path / "cli", tmp_path / "lib"
    result = CliRunner().invoke(quantize_cmd, [str(model), "--calib", str(data), "-o",
                                               str(cli_out), "--method", "percentile"])  # fmt: skip
    assert result.exit_code == 0, result.output
    options = QuantOptions(calib_path=data, method="percentile")
    got = run.quantize(model, options)
    assert got.failures == [] and got.model_file == INT8_MODEL
    assert run.write(got, lib_out) == lib_out / INT8_MODEL
    assert (lib_out / INT8_MODEL).read_bytes() == (cli_out / INT8_MODEL).read_bytes()
    cli_report = json.loads((cli_out / REPORT).read_text())
    lib_report = json.loads((lib_out / REPORT).read_text())
    for report in (cli_report, lib_report):
        report.pop("seconds")
    assert lib_report == cli_report
    assert lib_report["options"]["method"] == "percentile"


def test_library_call_reports_a_failed_gate(files: tuple[Path, Path], tmp_path: Path) -> None:
    """A gate the model cannot pass is a result with failures (nothing raised) until
    ``raise_if_failed``; it is written as the rejected model, replacing a passing one."""
    from bnfold.errors import CheckFailed

    model, data = files
    out = tmp_path / "q"
    run.write(run.quantize(model, QuantOptions(calib_path=data, min_cosine=0)), out)
    assert (out / INT8_MODEL).is_file()
    strict = run.quantize(model, QuantOptions(calib_path=data, min_top1_agreement=1.0,
                                              min_cosine=1.0))  # fmt: skip
    assert strict.failures and strict.model_file == REJECTED_MODEL
    run.write(strict, out)
    assert (out / REJECTED_MODEL).is_file() and not (out / INT8_MODEL).exists()
    with pytest.raises(CheckFailed, match=r"int8 accuracy gate failed.*; try --no-cle"):
        strict.raise_if_failed(["--no-cle"])


def test_library_call_needs_calibration_data(files: tuple[Path, Path]) -> None:
    with pytest.raises(BnfoldError, match="needs calibration data"):
        run.quantize(files[0], QuantOptions())


def test_library_call_reads_the_model_file_once(
    files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quantize, the held-out evaluation and the target search (which quantizes again) all use
    the one proto read at the start: the file is moved away as soon as it has been read."""
    from bnfold import ir as bir

    model, data = files
    reads: list[Path] = []
    read_bytes = bir._read_bytes

    def read_then_remove(path: Path) -> bytes:
        got = read_bytes(path)
        reads.append(path)
        if path == model:
            path.rename(tmp_path / "moved.onnx")
        return got

    monkeypatch.setattr(bir, "_read_bytes", read_then_remove)
    # An unreachable cosine makes the target search run all its rounds.
    got = run.quantize(model, QuantOptions(calib_path=data, target_cosine=1.0, min_cosine=0))
    assert reads == [model]
    assert got.report.source == str(model)
    assert len(got.report.target["rounds"]) > 1
