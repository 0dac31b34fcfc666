"""Targets registry, capability reports, the runner's tensor format, and the lean CLI start."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from bnfold import runtime
from bnfold.cli.lower import targets_cmd
from bnfold.errors import BnfoldError
from bnfold.targets import TARGETS, Capability, Target, get, host_arch


def test_registry_is_explicit_and_named_by_key() -> None:
    assert list(TARGETS) == ["x86", "arm64", "armv7", "cuda"]
    for name, target in TARGETS.items():
        assert isinstance(target, Target)
        assert target.name == name
        assert target.device in ("cpu", "cuda")


def test_targets_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        TARGETS["x86"].cpu = "znver3"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("spec", "name", "cpu"),
    [("x86", "x86", ""), ("x86:znver3", "x86", "znver3"),
     ("arm64:cortex-a72", "arm64", "cortex-a72"), ("cuda:sm_90", "cuda", "sm_90"),
     ("cuda", "cuda", "sm_80")],
)  # fmt: skip
def test_get_parses_specs(spec: str, name: str, cpu: str) -> None:
    target = get(spec)
    assert (target.name, target.cpu) == (name, cpu)
    assert target.spec == (f"{name}:{cpu}" if cpu else name)


@pytest.mark.parametrize("spec", ["riscv", "arm64:cortex-z9", "cuda:sm_12", ""])
def test_get_rejects_unknown_with_one_line(spec: str) -> None:
    with pytest.raises(BnfoldError) as e:
        get(spec)
    assert "\n" not in str(e.value) and "known" in str(e.value)


def test_tvm_target_dicts() -> None:
    arm = get("arm64:cortex-a76").tvm_target()
    assert arm == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
                   "mattr": ["+neon"]}  # fmt: skip
    assert get("armv7").tvm_target()["mfloat-abi"] == "hard"
    cuda = get("cuda:sm_90")
    assert cuda.tvm_target()["kind"] == "cuda" and cuda.tvm_target()["arch"] == "sm_90"
    assert cuda.tvm_host()["kind"] == "llvm"
    assert get("x86:znver3").tvm_target()["mcpu"] == "znver3"


@pytest.mark.tvm
def test_x86_detects_the_host_cpu() -> None:
    pytest.importorskip("tvm")
    from tvm.target import codegen

    resolved = TARGETS["x86"].resolved()
    assert resolved.cpu
    assert resolved.cpu == "x86-64" or codegen.llvm_is_valid_cpu(resolved.cpu, "x86_64-linux-gnu")


def test_capabilities_say_why() -> None:
    for target in TARGETS.values():
        for cap in (target.can_build(), target.can_run()):
            assert isinstance(cap, Capability)
            assert cap.ok or cap.why  # a "no" always comes with a reason
    if host_arch() == "x86_64":
        assert not TARGETS["armv7"].can_run()


def test_targets_command_lists_every_target() -> None:
    result = CliRunner().invoke(targets_cmd, [])
    assert result.exit_code == 0, result.output
    for name in TARGETS:
        assert f"{name} " in result.output
    assert "build here:" in result.output and "run here:" in result.output
    as_json = CliRunner().invoke(targets_cmd, ["--json"])
    assert as_json.exit_code == 0 and '"name": "arm64"' in as_json.output


def test_tensor_file_round_trip(tmp_path) -> None:
    arrays = [np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.array([1, -2], np.int64),
              np.array([[True, False]]), np.float32(3.5).reshape(())]  # fmt: skip
    runtime.write_tensors(tmp_path / "t.bnt", arrays)
    back = runtime.read_tensors(tmp_path / "t.bnt")
    assert len(back) == len(arrays)
    for a, b in zip(arrays, back, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_cli_start_does_not_import_tvm_or_onnx() -> None:
    code = ("import sys, bnfold.cli.lower, bnfold.targets; "
            "bad = [m for m in ('tvm', 'onnx', 'onnxruntime') if m in sys.modules]; "
            "assert not bad, bad")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("width", "lanes", "tile"),
    [(112, 16, 16), (56, 16, 8), (28, 16, 14), (14, 16, 14), (7, 16, 7), (56, 4, 4), (7, 4, 7),
     (3, 16, 3), (17, 16, 17), (37, 16, 1)],
)  # fmt: skip
def test_conv_row_tile_divides_the_row(width: int, lanes: int, tile: int) -> None:
    from bnfold.targets.schedule._common import row_tile

    assert row_tile(width, lanes) == tile
    assert width % tile == 0
