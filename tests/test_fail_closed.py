"""Fail closed in every command (docs/hardening.md, "Fail closed in every command").

Each test is one class of input that broke the contract (exit 0 with a wrong result, a file
bnfold does not own destroyed, a partial output, exit 3 or a hang on merely unusual input, or
more than one stderr line), stated as the behaviour that must hold: exit 2 (or 1) with one
line, nothing written, the input and everything else untouched. Every case runs through
``bnfold.cli.main`` in this process, which is what the ``bnfold`` script runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as oh

from bnfold import ir as bir
from bnfold.check import run_onnxruntime
from bnfold.cli import Interrupted, main
from bnfold.testing import parse

C = 4


def _bn_tensors(rng: np.random.Generator, c: int = C) -> dict[str, np.ndarray]:
    return {
        "W": rng.standard_normal((c, 3, 3, 3)).astype(np.float32),
        "g": rng.uniform(0.5, 2.0, c).astype(np.float32),
        "b": rng.standard_normal(c).astype(np.float32),
        "m": rng.standard_normal(c).astype(np.float32),
        "v": rng.uniform(0.5, 2.0, c).astype(np.float32),
    }


def conv_bn(bn_outputs: str = "y", opset: int = 13, c: int = C) -> onnx.ModelProto:
    """Conv -> BN; ``bn_outputs`` spells the BN's outputs (more than one: training mode)."""
    text = f"""
    <ir_version: 7, opset_import: ["" : {opset}]>
    g (float[1,3,8,8] x) => (float[1,{c},8,8] y) {{
        c1 = Conv <pads=[1,1,1,1]> (x, W)
        {bn_outputs} = BatchNormalization (c1, g, b, m, v)
    }}
    """
    return parse(text, **_bn_tensors(np.random.default_rng(0), c))


def invoke(
    argv: list[str | Path], capfd: pytest.CaptureFixture[str]
) -> tuple[int, list[str], str]:
    """Run ``bnfold ARGV`` in this process: (exit code, non-empty stderr lines, stdout)."""
    capfd.readouterr()
    code = 0
    try:
        main([str(a) for a in argv])
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err, captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    return code, lines, captured.out


def run_cli(argv: list[str | Path], capfd: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Run ``bnfold ARGV`` in this process: (exit code, non-empty stderr lines)."""
    code, lines, _ = invoke(argv, capfd)
    return code, lines


def assert_refused(result: tuple[int, list[str]], must: str) -> None:
    code, lines = result
    assert code == 2, f"exit {code}: {lines}"
    assert len(lines) == 1, lines
    assert must.lower() in lines[0].lower(), lines[0]


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder`` with its bytes (files) or kind (others)."""
    out: dict[str, bytes | str] = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = f"link -> {os.readlink(p)}"
        elif p.is_file():
            out[rel] = p.read_bytes()
        else:
            out[rel] = "dir" if p.is_dir() else "special"
    return out


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BNFOLD_DEBUG", raising=False)


# --------------------------------------------------------------------------------------------
# 1. training-mode BatchNormalization, by its outputs and inside functions
# --------------------------------------------------------------------------------------------

TRAINING_FORMS = {
    # opset 7-13: outputs 1..4 exist only in training mode (torch writes this for train()).
    "five-outputs-opset12": ("y, rm, rv, sm, sv", 12),
    "five-outputs-opset7": ("y, rm, rv, sm, sv", 7),
    "five-outputs-opset9": ("y, rm, rv, sm, sv", 9),
}


@pytest.mark.parametrize("form", sorted(TRAINING_FORMS))
@pytest.mark.parametrize("command", ["fold", "inspect", "quantize", "compile"])
def test_training_mode_bn_by_outputs_is_refused(
    form: str, command: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    outputs, opset = TRAINING_FORMS[form]
    model = tmp_path / "train.onnx"
    onnx.save(conv_bn(outputs, opset), model)
    before = snapshot(tmp_path)
    calib = tmp_path.parent / f"{tmp_path.name}-calib.npz"
    np.savez(calib, x=np.zeros((4, 3, 8, 8), np.float32))
    argv: list[str | Path] = {
        "fold": ["fold", model, "-o", tmp_path / "out.onnx"],
        "inspect": ["inspect", model],
        "quantize": ["quantize", model, "-o", tmp_path / "q", "--calib", calib],
        "compile": ["compile", model, "-o", tmp_path / "c", "--no-verify"],
    }[command]
    if command == "compile":
        pytest.importorskip("tvm")
    assert_refused(run_cli(argv, capfd), "training mode")
    assert snapshot(tmp_path) == before


def test_training_mode_bn_differs_from_inference(tmp_path: Path) -> None:
    """Why the refusal matters: the two forms compute different things on the same weights
    (batch statistics vs the running ones), so folding the training form was a wrong result."""
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32) * 3 + 1
    train = run_onnxruntime(conv_bn("y, rm, rv, sm, sv", 12), {"x": x})["y"]
    infer = run_onnxruntime(conv_bn("y", 12), {"x": x})["y"]
    assert np.max(np.abs(train - infer)) > 0.1


def test_inference_bn_with_one_output_still_folds(tmp_path: Path, capfd) -> None:
    """The check looks at outputs 1..4 only: the usual single-output BN folds exactly."""
    model = tmp_path / "m.onnx"
    onnx.save(conv_bn("y", 12), model)
    code, lines = run_cli(["fold", model, "-o", tmp_path / "f.onnx"], capfd)
    assert code == 0 and lines == []
    folded = onnx.load(tmp_path / "f.onnx")
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    x = np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(np.float32)
    ref, got = run_onnxruntime(onnx.load(model), {"x": x}), run_onnxruntime(folded, {"x": x})
    np.testing.assert_allclose(got["y"], ref["y"], rtol=1e-5, atol=1e-5)


FUNCTION_MODEL = """
<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
g (float[1,3,4,4] x) => (float[1,3,4,4] y) {
    y = local.F (x)
}
<domain: "local", opset_import: ["" : 17]>
F (x) => (y) {
    s = Constant <value = float[3] {1, 2, 3}> ()
    t = Constant <value = float[3] {0, 0.5, 1}> ()
    OUTPUTS = BatchNormalization TRAINING (x, s, t, t, s)
}
"""


def _function_model(training: bool) -> onnx.ModelProto:
    text = FUNCTION_MODEL.replace("OUTPUTS", "y, rm, rv" if training else "y")
    return onnx.parser.parse_model(text.replace("TRAINING", "<training_mode = 1>" * training))


def test_bn_inside_a_model_local_function_is_counted(tmp_path: Path, capfd) -> None:
    model = tmp_path / "fn.onnx"
    onnx.save(_function_model(training=False), model)
    code, lines, out = invoke(["inspect", model, "--json"], capfd)
    assert (code, lines) == (0, [])
    declined = json.loads(out)["fold"]["batchnorms"]
    assert len(declined) == 1, declined
    assert declined[0]["node"].startswith("F/") and "model-local function" in declined[0]["reason"]


def test_training_mode_bn_inside_a_function_is_refused(tmp_path: Path, capfd) -> None:
    model = tmp_path / "fn.onnx"
    onnx.save(_function_model(training=True), model)
    for argv in (["inspect", model], ["fold", model, "-o", tmp_path / "o.onnx"]):
        assert_refused(run_cli(argv, capfd), "training mode")
    assert not (tmp_path / "o.onnx").exists()


# --------------------------------------------------------------------------------------------
# 2. never touch a file bnfold does not own
# --------------------------------------------------------------------------------------------


def _external_model(folder: Path, name: str = "ext.onnx", c: int = 64) -> Path:
    """Conv -> BN with its tensors in ``NAME.data`` (large enough to be written external)."""
    path = folder / name
    onnx.save(conv_bn("y", 13, c), path, save_as_external_data=True,
              all_tensors_to_one_file=True, location=f"{name}.data", size_threshold=0)  # fmt: skip
    return path


@pytest.mark.parametrize(
    "args, must",
    [
        (["-o", "ext.onnx.data"], "would overwrite"),
        (["-o", "x.onnx", "--report", "ext.onnx.data"], "would overwrite"),
        (["-o", "fifo"], "not a regular file"),
        (["-o", "null-device"], "not a regular file"),
        (["-o", "link.onnx"], "symbolic link"),
        (["-o", "dangling.onnx"], "symbolic link"),
        (["-o", "sub/ext.onnx.data/../x.onnx"], ""),
        (["-o", "data-dir.onnx", "--external-data"], "is a directory"),
    ],
    ids=["output-is-input-data", "report-is-input-data", "fifo", "device", "symlink",
         "dangling-symlink",
         "path-through-missing-folder", "external-data-over-a-folder"],
)  # fmt: skip
def test_fold_never_writes_what_it_does_not_own(
    args: list[str],
    must: str,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _external_model(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    if "null-device" in args:  # a character device like /dev/null, made here (a regression
        try:  # then replaces this node, not the system's)
            os.mknod(tmp_path / "null-device", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("creating a device node needs root")
    (tmp_path / "target.txt").write_text("not bnfold's")
    os.symlink("target.txt", tmp_path / "link.onnx")
    os.symlink("nowhere.txt", tmp_path / "dangling.onnx")
    (tmp_path / "data-dir.onnx.data").mkdir()
    (tmp_path / "data-dir.onnx.data" / "keep.txt").write_text("the user's")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    result = run_cli(["fold", model.name, *args], capfd)
    if must:
        assert_refused(result, must)
        assert snapshot(tmp_path) == before
    else:  # a missing folder on the way is created: allowed, and the input is untouched
        assert result[0] in (0, 2), result
        assert (tmp_path / "ext.onnx.data").read_bytes() == before["ext.onnx.data"]
    assert bir.load(model) is not None  # the input still loads


def test_fold_twice_from_the_folder_of_the_first_data_file(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnx's external-data writer refused a location that exists relative to the *working
    directory*: the second fold of the same model, run from the output's folder, was exit 3."""
    model = _external_model(tmp_path)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert run_cli(["fold", "ext.onnx", "-o", "f.onnx"], capfd) == (0, [])
    assert (tmp_path / "f.onnx.data").is_file()
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
    ref = run_onnxruntime(model, {"x": x})["y"]
    got = run_onnxruntime(tmp_path / "f.onnx", {"x": x})["y"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("as_data", [False, True], ids=["folded-model", "folded-data"])
def test_compile_refuses_an_input_among_its_outputs(
    as_data: bool, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "c"
    out.mkdir()
    if as_data:  # the input's external data is OUTDIR/model.folded.onnx.data
        model = _external_model(out, "model.folded.onnx")
    else:
        model = out / "model.folded.onnx"
        onnx.save(conv_bn(), model)
    before = snapshot(tmp_path)
    assert_refused(run_cli(["compile", model, "-o", out, "--no-verify"], capfd), "overwrite")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1"])
@pytest.mark.parametrize("option", ["--atol", "--rtol"])
def test_verify_refuses_a_tolerance_that_is_not_finite(
    option: str, value: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(conv_bn(), model)
    code, lines = run_cli(["verify", model, model, f"{option}={value}"], capfd)
    assert code == 2 and len(lines) == 1 and option in lines[0], lines


# --------------------------------------------------------------------------------------------
# 3. compile and quantize outputs are one transaction
# --------------------------------------------------------------------------------------------


def _calib(tmp_path: Path) -> Path:
    path = tmp_path / "calib.npz"
    rng = np.random.default_rng(4)
    np.savez(path, x=rng.standard_normal((8, 3, 8, 8)).astype(np.float32))
    return path


def _old_outdir(tmp_path: Path, names: tuple[str, ...]) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    for name in names:
        (out / name).write_bytes(f"old {name}".encode())
    (out / "notes.txt").write_text("the user's own file")
    return out


def _leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("how", ["error", "SIGINT", "SIGTERM"])
def test_compile_failing_after_the_fold_leaves_outdir_as_it_was(
    how: str, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tvm")
    from bnfold.lower import compiler as lower

    model = tmp_path / "m.onnx"
    onnx.save(conv_bn(), model)
    out = _old_outdir(tmp_path, ("model.so", "manifest.json", "model.folded.onnx"))
    before = snapshot(out)

    def fail_in_build(*args: object, **kwargs: object) -> None:
        assert any(p.name == lower.FOLDED for p in tmp_path.rglob("*") if ".out." in str(p))
        if how == "error":
            raise lower.BnfoldError("TVM cannot build this")
        raise Interrupted(signal.SIGINT if how == "SIGINT" else signal.SIGTERM)

    monkeypatch.setattr(lower, "build", fail_in_build)
    code, lines = run_cli(["compile", model, "-o", out, "--no-verify"], capfd)
    assert code == {"error": 2, "SIGINT": 130, "SIGTERM": 143}[how], lines
    assert len(lines) == 1, lines
    assert snapshot(out) == before
    assert _leftovers(tmp_path) == []


def test_compile_replaces_outputs_and_keeps_other_files(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tvm")
    from bnfold import runtime

    model = tmp_path / "m.onnx"
    onnx.save(conv_bn(), model)
    out = _old_outdir(tmp_path, ("model.so", "manifest.json", "model.folded.onnx"))
    code, lines = run_cli(["compile", model, "-o", out, "--no-verify"], capfd)
    assert code == 0, lines
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert _leftovers(tmp_path) == [] and _leftovers(out) == []
    # Nothing in the manifest points into the temp folder it was built in.
    assert str(tmp_path / ".out.") not in (out / "manifest.json").read_text()
    x = np.random.default_rng(5).standard_normal((1, 3, 8, 8)).astype(np.float32)
    got = runtime.load(out)(x)["y"]
    np.testing.assert_allclose(got, run_onnxruntime(model, {"x": x})["y"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("how", ["error", "SIGTERM"])
def test_quantize_interrupted_while_writing_leaves_nothing(
    how: str, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from bnfold.quant import report as quant_report

    model = tmp_path / "m.onnx"
    onnx.save(conv_bn(), model)
    out = _old_outdir(tmp_path, ("model.int8.onnx", "quant_report.json", "sqnr.png"))
    before = snapshot(out)

    def fail_in_plot(*args: object, **kwargs: object) -> None:
        if how == "error":
            raise OSError(28, "No space left on device")
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(quant_report, "plot_sqnr", fail_in_plot)
    code, lines = run_cli(["quantize", model, "-o", out, "--calib", _calib(tmp_path)], capfd)
    assert code == {"error": 2, "SIGTERM": 143}[how] and len(lines) == 1, lines
    assert snapshot(out) == before
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------
# 4. exit 2, not 3, on valid or merely unusual input
# --------------------------------------------------------------------------------------------


def _graph_model(node: onnx.NodeProto, x: onnx.ValueInfoProto, y: onnx.ValueInfoProto,
                 *inits: onnx.TensorProto) -> onnx.ModelProto:  # fmt: skip
    graph = oh.make_graph([node], "g", [x], [y], list(inits))
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)], ir_version=7)


def _scalar_model() -> onnx.ModelProto:
    return _graph_model(oh.make_node("Relu", ["x"], ["y"]),
                        oh.make_tensor_value_info("x", TensorProto.FLOAT, []),
                        oh.make_tensor_value_info("y", TensorProto.FLOAT, []))  # fmt: skip


@pytest.mark.parametrize("inputs", ["npz", "npy", "random"])
def test_verify_a_scalar_model(inputs: str, tmp_path: Path, capfd) -> None:
    model = tmp_path / "s.onnx"
    onnx.save(_scalar_model(), model)
    np.savez(tmp_path / "s.npz", x=np.float32(-2.5))
    np.save(tmp_path / "s.npy", np.float32(3.5))
    extra = [] if inputs == "random" else ["--inputs", tmp_path / f"s.{inputs}"]
    code, lines = run_cli(["verify", model, model, *extra], capfd)
    assert (code, lines) == (0, [])


@pytest.mark.parametrize(
    "case, must",
    [("sequence-output", "not a tensor"), ("zero-samples", "no samples"),
     ("huge-input", "out of memory")],
)  # fmt: skip
def test_verify_unusual_input_is_one_line(case: str, must: str, tmp_path: Path, capfd) -> None:
    f = TensorProto.FLOAT
    model = tmp_path / "m.onnx"
    extra: list[str | Path] = []
    if case == "sequence-output":
        onnx.save(_graph_model(oh.make_node("SequenceConstruct", ["x"], ["y"]),
                               oh.make_tensor_value_info("x", f, [2]),
                               oh.make_tensor_sequence_value_info("y", f, [2])), model)  # fmt: skip
    elif case == "zero-samples":
        onnx.save(conv_bn(), model)
        np.savez(tmp_path / "z.npz", x=np.zeros((0, 3, 8, 8), np.float32))
        extra = ["--inputs", tmp_path / "z.npz"]
    else:  # 4e12 elements declared: numpy cannot allocate them
        big = [2000000, 2000000]
        onnx.save(_graph_model(oh.make_node("Relu", ["x"], ["y"]),
                               oh.make_tensor_value_info("x", f, big),
                               oh.make_tensor_value_info("y", f, big)), model)  # fmt: skip
    assert_refused(run_cli(["verify", model, model, *extra], capfd), must)


def test_value_named_like_a_renamed_one(tmp_path: Path, capfd) -> None:
    """fold renames a replaced graph output to ``<name>.bnfold_replaced``; a model that already
    has a value of that name made the folded graph assign it twice (exit 3)."""
    f = TensorProto.FLOAT
    rng = np.random.default_rng(6)
    inits = [onnx.numpy_helper.from_array(a, n) for n, a in {
        "W": rng.standard_normal((3, 4)).astype(np.float32), **{
            k: v[:3] for k, v in _bn_tensors(rng, 3).items() if k != "W"}}.items()]  # fmt: skip
    graph = oh.make_graph(
        [oh.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["bn"]),
         oh.make_node("MatMul", ["bn", "W"], ["y"]),
         oh.make_node("Relu", ["x"], ["y.bnfold_replaced"])],
        "g", [oh.make_tensor_value_info("x", f, [2, 3])],
        [oh.make_tensor_value_info("y", f, [2, 4]),
         oh.make_tensor_value_info("y.bnfold_replaced", f, [2, 3])], inits)  # fmt: skip
    model = tmp_path / "m.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)], ir_version=7), model)
    assert run_cli(["inspect", model], capfd)[0] == 0
    assert run_cli(["fold", model, "-o", tmp_path / "f.onnx"], capfd) == (0, [])
    folded = onnx.load(tmp_path / "f.onnx")
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    x = rng.standard_normal((2, 3)).astype(np.float32)
    ref, got = run_onnxruntime(onnx.load(model), {"x": x}), run_onnxruntime(folded, {"x": x})
    assert list(ref) == list(got)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small x86 compile output (module-wide: TVM's build takes a few seconds)."""
    pytest.importorskip("tvm")
    from bnfold.lower import compiler as lower

    root = tmp_path_factory.mktemp("compiled")
    model = root / "m.onnx"
    onnx.save(conv_bn(), model)
    lower.compile_model(model, "x86", root / "out", verify=False)
    return root / "out"


def _broken_copy(compiled: Path, dest: Path, case: str) -> Path:
    out = dest / case
    shutil.copytree(compiled, out)
    manifest = json.loads((out / "manifest.json").read_text())
    if case == "manifest-object-empty":
        manifest = {}
    elif case == "manifest-list":
        manifest = []
    elif case == "negative-shape":
        manifest["inputs"][0]["shape"] = [1, -3, 8, 8]
    elif case == "huge-shape":
        manifest["inputs"][0]["shape"] = [200000, 200000, 3, 8]
    elif case == "missing-library":
        (out / "model.so").unlink()
    elif case == "truncated-library":  # loading it died of SIGBUS, no message
        (out / "model.so").write_bytes((out / "model.so").read_bytes()[:4096])
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


RUN_CASES = {
    "manifest-object-empty": "not a valid",
    "manifest-list": "not a valid",
    "negative-shape": "non-negative",
    "huge-shape": "out of memory",
    "missing-library": "missing",
    "truncated-library": "sha256",
}


@pytest.mark.parametrize("case", sorted(RUN_CASES))
def test_run_unusual_folder_is_one_line(case: str, compiled: Path, tmp_path: Path, capfd) -> None:
    out = _broken_copy(compiled, tmp_path, case)
    assert_refused(run_cli(["run", out], capfd), RUN_CASES[case])


@pytest.mark.parametrize("fmt", ["npy", "npz"])
def test_run_reads_inputs_as_verify_does(fmt: str, compiled: Path, tmp_path: Path, capfd) -> None:
    x = np.random.default_rng(7).standard_normal((1, 3, 8, 8)).astype(np.float32)
    path = tmp_path / f"x.{fmt}"
    np.save(path, x) if fmt == "npy" else np.savez(path, x=x)
    code, lines = run_cli(["run", compiled, "--inputs", path, "-o", tmp_path / "y.npz"], capfd)
    assert (code, lines) == (0, [])
    with np.load(tmp_path / "y.npz") as got:
        ref = run_onnxruntime(compiled / "model.folded.onnx", {"x": x})["y"]
        np.testing.assert_allclose(got["y"], ref, rtol=1e-4, atol=1e-4)


def test_run_output_named_like_a_savez_parameter(tmp_path: Path, capfd) -> None:
    """np.savez(f, **outputs) broke on an output called 'file' (exit 3)."""
    pytest.importorskip("tvm")
    from bnfold.lower import compiler as lower

    model = tmp_path / "m.onnx"
    text = """<ir_version: 7, opset_import: ["" : 13]>
    g (float[2,3] x) => (float[2,3] file, float[2,3] allow_pickle) {
        file = Relu (x)
        allow_pickle = Neg (x)
    }"""
    onnx.save(parse(text), model)
    lower.compile_model(model, "x86", tmp_path / "out", verify=False)
    assert run_cli(["run", tmp_path / "out", "-o", tmp_path / "y.npz"], capfd) == (0, [])
    with np.load(tmp_path / "y.npz") as got:
        assert sorted(got.files) == ["allow_pickle", "file"]
        assert np.all(got["file"] >= 0) and got["allow_pickle"].shape == (2, 3)


# --------------------------------------------------------------------------------------------
# 5. one sanitized line: names from the model, onnxruntime's log, Pillow's warnings
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["two\nlines", "red\x1b[31mtext", "bell\x07\r", "sep\u2028x"])
def test_names_with_control_characters_stay_on_one_line(
    name: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    proto = conv_bn("y, rm, rv, sm, sv", 12)
    proto.graph.node[1].name = name  # the message names the (training-mode) BN
    model = tmp_path / "m.onnx"
    onnx.save(proto, model)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["fold", str(model), "-o", str(tmp_path / "o.onnx")])
    err = capfd.readouterr().err
    assert exc.value.code == 2
    assert err.count("\n") == 1 and err.endswith("\n"), repr(err)
    assert not any(ch in err[:-1] for ch in "\n\r\x1b\x07\u2028"), repr(err)


def test_onnxruntime_log_does_not_leak_from_verify(tmp_path: Path, capfd) -> None:
    """A run-time failure inside onnxruntime: its own `[E:onnxruntime...]` line stays out."""
    shape = onnx.numpy_helper.from_array(np.array([3], np.int64), "s")
    model = tmp_path / "r.onnx"
    onnx.save(_graph_model(oh.make_node("Reshape", ["x", "s"], ["y"]),
                           oh.make_tensor_value_info("x", TensorProto.FLOAT, ["n"]),
                           oh.make_tensor_value_info("y", TensorProto.FLOAT, [3]), shape),
              model)  # fmt: skip
    result = run_cli(["verify", model, model, "--shape", "x:4"], capfd)
    assert_refused(result, "onnxruntime cannot run")
    assert "[E:onnxruntime" not in result[1][0]


def _images(folder: Path, kind: str) -> Path:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(8)
    for i in range(6):
        if kind == "palette-transparency":  # Pillow warns when converting these to RGB
            img = Image.fromarray(rng.integers(0, 4, (8, 8), dtype=np.uint8), mode="P")
            img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
            # Partial alpha per palette entry: read back as bytes, which RGB cannot express.
            img.save(folder / f"{i}.png", transparency=bytes([0, 128, 255, 64]))
        else:
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                folder / f"{i}.png")  # fmt: skip
    return folder


@pytest.mark.parametrize("kind", ["palette-transparency", "decompression-bomb-warning"])
def test_pillow_warnings_do_not_leak_from_quantize(
    kind: str, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    if kind == "decompression-bomb-warning":  # 64 pixels: over the limit, under twice it
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)
    model = tmp_path / "m.onnx"
    onnx.save(conv_bn(), model)
    calib = _images(tmp_path / "img", kind)
    # Warnings as a real process shows them (pytest would otherwise record them quietly).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        code, lines = run_cli(["quantize", model, "-o", tmp_path / "q", "--calib", calib], capfd)
    shown = [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]
    assert (code, lines, shown) == (0, [], [])
    assert (tmp_path / "q" / "model.int8.onnx").is_file()


# --------------------------------------------------------------------------------------------
# 6. deploy: every RPC call has a deadline; a dying server is one line
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def misbehaving_server(request: pytest.FixtureRequest) -> Iterator[int]:
    """A loopback TCP server that accepts and then: says nothing, sends garbage, or hangs up.
    It stops itself with the test (and its accept loop ends when the socket closes)."""
    mode = request.param
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    conns: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            conns.append(conn)
            if mode == "garbage":
                conn.sendall(b"\xde\xad\xbe\xef" * 64)
            elif mode == "hang-up":
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    sock.close()
    for conn in conns:
        conn.close()
    thread.join(5)


@pytest.mark.parametrize("misbehaving_server", ["silent", "garbage", "hang-up"], indirect=True)
def test_deploy_against_a_misbehaving_server_ends_with_one_line(
    misbehaving_server: int, compiled: Path
) -> None:
    """In a process of its own (a hang fails the test through the subprocess timeout)."""
    env = {k: v for k, v in os.environ.items() if k != "BNFOLD_DEBUG"}
    proc = subprocess.run(
        [sys.executable, "-m", "bnfold", "deploy", str(compiled), "--rpc",
         f"127.0.0.1:{misbehaving_server}", "--timeout", "2"],
        capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "RPC server" in lines[0]


@pytest.mark.parametrize("warmup", [3, 1], ids=["dies-in-warm-up", "dies-in-timing"])
def test_deploy_server_dying_after_the_check_run(
    warmup: int, compiled: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from bnfold.device import deploy
    from bnfold.testing.rpc import free_port, start_server, stop

    port = free_port()
    server = start_server(port)
    real_run = deploy._run

    def run_then_kill(vm: object, args: list[object]) -> object:
        result = real_run(vm, args)
        stop([server])  # the device goes away after the check run (with its session workers)
        return result

    monkeypatch.setattr(deploy, "_run", run_then_kill)
    try:
        code, lines = run_cli(["deploy", compiled, "--rpc", f"127.0.0.1:{port}",
                               "--warmup", str(warmup), "--timeout", "20"], capfd)  # fmt: skip
    finally:
        stop([server])
    assert code == 2 and len(lines) == 1, lines
    assert "RPC" in lines[0]


@pytest.mark.parametrize("target", ["model.so", "manifest.json", "x.npz"])
def test_run_output_never_over_the_folder_or_the_inputs(
    target: str, compiled: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "out"
    shutil.copytree(compiled, folder)
    np.savez(folder / "x.npz", x=np.zeros((1, 3, 8, 8), np.float32))
    before = snapshot(folder)
    argv = ["run", folder, "--inputs", folder / "x.npz", "-o", folder / target]
    assert_refused(run_cli(argv, capfd), "would overwrite")
    assert snapshot(folder) == before
