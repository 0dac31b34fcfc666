"""Lowering through TVM: compile, export, load, run, verify, per target.

Small models are written as onnx.parser text; the real models run when ``make models`` has
built them (MobileNetV2 once per CPU target: compiling it takes a few seconds, verifying it
under qemu about a minute).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from click.testing import CliRunner

from bnfold import artifact, runtime
from bnfold import ir as bir
from bnfold.check import run_onnxruntime
from bnfold.cli.lower import compile_cmd, run_cmd
from bnfold.errors import BnfoldError
from bnfold.lower import compiler as lower
from bnfold.targets import get

pytest.importorskip("tvm")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.tvm

CACHE = Path(os.environ.get("BNFOLD_MODELS", ".cache/models"))

# Conv -> BN -> Relu -> GlobalAveragePool -> Flatten -> Gemm, with a dynamic batch.
CONV_BN = """
<ir_version: 8, opset_import: ["" : 17]>
convbn (float[N,3,16,16] x) => (float[N,4] y) <
    float[8,3,3,3] w = {WEIGHTS}, float[8] b = {BIAS},
    float[8] scale = {SCALE}, float[8] shift = {SHIFT},
    float[8] mean = {MEAN}, float[8] var = {VAR},
    float[4,8] fc = {FC}
> {
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    n = BatchNormalization <epsilon = 1e-5> (c, scale, shift, mean, var)
    r = Relu (n)
    p = GlobalAveragePool (r)
    f = Flatten (p)
    y = Gemm <transB = 1> (f, fc)
}
"""

# Shape arithmetic that TVM's importer cannot take unless the shapes are frozen first.
SHAPE_CHAIN = """
<ir_version: 8, opset_import: ["" : 13]>
chain (float[N,3,H,W] x) => (float[N,M] y) {
    s = Shape (x)
    s32 = Cast <to = 6> (s)
    starts = Constant <value_ints = [0]> ()
    ends = Constant <value_ints = [1]> ()
    n = Slice (s32, starts, ends)
    minus1 = Constant <value = int32[1] {-1}> ()
    shape = Concat <axis = 0> (n, minus1)
    shape64 = Cast <to = 7> (shape)
    y = Reshape (x, shape64)
}
"""

def _fill(text: str, rng: np.random.Generator) -> str:
    def vals(n: int, lo: float = -1.0, hi: float = 1.0) -> str:
        return "{" + ", ".join(f"{v:.6f}" for v in rng.uniform(lo, hi, n)) + "}"

    return (text.replace("{WEIGHTS}", vals(8 * 27)).replace("{BIAS}", vals(8))
            .replace("{SCALE}", vals(8, 0.5, 2)).replace("{SHIFT}", vals(8))
            .replace("{MEAN}", vals(8)).replace("{VAR}", vals(8, 0.1, 2))
            .replace("{FC}", vals(32)))  # fmt: skip


@pytest.fixture(scope="module")
def conv_bn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "conv_bn.onnx"
    model = onnx.parser.parse_model(_fill(CONV_BN, np.random.default_rng(0)))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def x86_build(conv_bn: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("x86")
    lower.compile_model(conv_bn, "x86", out, {"x": (2, 3, 16, 16)})
    return out


def test_x86_compile_writes_a_complete_folder(x86_build: Path, conv_bn: Path) -> None:
    m = json.loads((x86_build / lower.MANIFEST).read_text())
    assert m["format"] == artifact.FORMAT
    assert {"model.so", "model.folded.onnx", "manifest.json"} <= {
        p.name for p in x86_build.iterdir()
    }
    assert not [p for p in x86_build.iterdir() if ".tmp" in p.name]  # temp files renamed away
    assert m["inputs"] == [{"name": "x", "shape": [2, 3, 16, 16], "dtype": "float32"}]
    assert m["outputs"] == [{"name": "y", "shape": [2, 4], "dtype": "float32"}]
    assert m["target"]["name"] == "x86" and m["target"]["tvm"]["mcpu"]
    assert m["source"]["sha256"] == lower.sha256_file(conv_bn)
    assert m["artifact"]["sha256"]["model.so"] == lower.sha256_file(x86_build / "model.so")
    assert m["folded"]["sha256"] == lower.sha256_file(x86_build / lower.FOLDED)
    assert m["versions"]["apache-tvm"].startswith("0.27")
    assert m["fold_report"]["counts"]["folded_backward"] == 1
    assert m["compile"]["seconds"] > 0 and m["compile"]["peak_rss_mb"] > 0
    assert m["verification"]["status"] == "passed"
    assert m["verification"]["worst_abs_over_max_ref"] <= 1e-4
    folded = onnx.load(x86_build / lower.FOLDED)
    assert "BatchNormalization" not in {n.op_type for n in folded.graph.node}


def test_compile_reads_the_model_file_once(
    conv_bn: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The file is moved away as soon as it has been read: any second read (the hash, the
    # reference of the verification) would fail, and the manifest must hash what was compiled.
    model = tmp_path / "m.onnx"
    shutil.copy(conv_bn, model)
    original = model.read_bytes()
    reads: list[Path] = []
    read_bytes = bir._read_bytes

    def read_then_remove(path: Path) -> bytes:
        data = read_bytes(path)
        reads.append(path)
        path.rename(tmp_path / "moved.onnx")
        return data

    monkeypatch.setattr(bir, "_read_bytes", read_then_remove)
    events: list[tuple[str, bool]] = []
    manifest = lower.compile_model(
        model, "x86", tmp_path / "out", {"x": (1, 3, 16, 16)},
        progress=lambda step, seconds: events.append((step, seconds is not None)),
    )  # fmt: skip
    assert reads == [model]
    assert manifest.verification["status"] == "passed"
    assert manifest.source["sha256"] == hashlib.sha256(original).hexdigest()
    # ... and it said which step it was in, as it went: each one started, then ended.
    steps = ["fold", "freeze", "import", "build", "export", "verify"]
    assert events == [(s, done) for s in steps for done in (False, True)]
    assert set(manifest.compile["steps"]) == set(steps)


def test_runtime_load_runs_like_onnxruntime(x86_build: Path, conv_bn: Path) -> None:
    model = runtime.load(x86_build)
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    ref = run_onnxruntime(conv_bn, {"x": x})["y"]
    for got in (model(x)["y"], model(x=x)["y"], model.run({"x": x})["y"]):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    with pytest.raises(BnfoldError, match="compiled for float32"):
        model(x[:1])
    with pytest.raises(BnfoldError, match="missing"):
        model.run({"z": x})


def test_cpu_schedules_compute_what_the_default_loops_do(conv_bn: Path, tmp_path: Path) -> None:
    x = np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype(np.float32)
    outs = {}
    for schedule in (True, False):
        out = tmp_path / str(schedule)
        m = lower.compile_model(conv_bn, "x86", out, {"x": (1, 3, 16, 16)}, verify=False,
                                schedule=schedule)  # fmt: skip
        assert m.compile["schedules"] == ("bnfold cpu" if schedule else "tvm default")
        outs[schedule] = runtime.load(out)(x)["y"]
    # Scheduled reductions may add in another order (a global pool sums per-lane partial
    # sums): equal up to float rounding at the output's own scale.
    scale = float(np.abs(outs[False]).max())
    np.testing.assert_allclose(outs[True], outs[False], rtol=1e-5, atol=1e-6 * scale)


def test_conv_schedule_applies_to_a_fused_conv() -> None:
    import tvm
    from tvm import relax

    from bnfold.targets.schedule.conv import Conv

    model = onnx.parser.parse_model(_fill(CONV_BN, np.random.default_rng(0)))
    mod = lower.import_relax(model, {"x": (1, 3, 16, 16)})
    target = tvm.target.Target(get("x86").tvm_target())
    with target:
        mod = tvm.transform.Sequential([
            relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
            relax.transform.FuseOps(), relax.transform.FuseTIR(),
        ])(mod)  # fmt: skip
    funcs = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    conv = next(f for name, f in funcs.items() if "conv2d" in name)
    assert Conv().apply(conv, target, False) is not None
    assert all(Conv().apply(f, target, False) is None
               for name, f in funcs.items() if "conv2d" not in name)  # fmt: skip


def test_load_refuses_a_folder_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(BnfoldError, match=r"manifest\.json"):
        runtime.load(tmp_path)


def test_dynamic_dims_need_a_shape(tmp_path: Path) -> None:
    path = tmp_path / "chain.onnx"
    onnx.save(onnx.parser.parse_model(SHAPE_CHAIN), path)
    with pytest.raises(BnfoldError, match="--shape x:"):
        lower.compile_model(path, "x86", tmp_path / "out", None)


def test_shape_arithmetic_is_frozen(tmp_path: Path) -> None:
    path = tmp_path / "chain.onnx"
    onnx.save(onnx.parser.parse_model(SHAPE_CHAIN), path)
    m = lower.compile_model(path, "x86", tmp_path / "out", {"x": (2, 3, 4, 5)})
    assert m.outputs == [{"name": "y", "shape": [2, 60], "dtype": "float32"}]
    assert m.verified is True


def test_stacked_inputs_verify_one_compiled_batch_at_a_time(conv_bn: Path, tmp_path: Path) -> None:
    x = np.random.default_rng(4).standard_normal((3, 3, 16, 16)).astype(np.float32)
    m = lower.compile_model(conv_bn, "x86", tmp_path, None, inputs={"x": x})
    assert m.inputs[0]["shape"] == [1, 3, 16, 16]  # a dynamic batch compiles at 1
    assert m.verification["status"] == "passed"
    assert m.verification["result"]["samples"] == 3


def test_no_verify_says_why(conv_bn: Path, tmp_path: Path) -> None:
    m = lower.compile_model(conv_bn, "x86", tmp_path, {"x": (1, 3, 16, 16)}, verify=False)
    assert m.verification == {"status": "not verified", "why": "--no-verify"}
    assert m.verified is None


def test_cuda_builds_without_a_gpu(conv_bn: Path, tmp_path: Path) -> None:
    target = get("cuda:sm_80")
    m = lower.compile_model(conv_bn, target, tmp_path, {"x": (1, 3, 16, 16)})
    assert (tmp_path / "model.so").is_file()
    assert m.artifact["meta"]["cuda_source_sha256"]
    if shutil.which("nvcc"):
        assert (tmp_path / "model.fatbin").is_file()
    if not target.can_run():
        assert m.verification["status"] == "not verified"
        assert m.verification["why"] == target.can_run().why
        with pytest.raises(BnfoldError, match="CUDA"):
            runtime.load(tmp_path)


@pytest.mark.qemu
def test_arm64_runs_under_qemu_and_verifies(conv_bn: Path, tmp_path: Path) -> None:
    target = get("arm64:cortex-a72")
    if not target.can_run():
        pytest.skip(target.can_run().why)
    m = lower.compile_model(conv_bn, target, tmp_path, {"x": (1, 3, 16, 16)})
    assert m.verification["status"] == "passed", m.verification.get("table")
    assert m.target["tvm"]["mtriple"] == "aarch64-linux-gnu"
    model = runtime.load(tmp_path)
    assert isinstance(model, runtime.QemuModel)


def test_cli_compile_and_run(conv_bn: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(compile_cmd, [str(conv_bn), "-t", "x86", "-o", str(out),
                                              "--shape", "x:1x3x16x16"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    x = np.random.default_rng(2).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    result = CliRunner().invoke(run_cmd, [str(out), "--inputs", str(tmp_path / "x.npz"),
                                          "-o", str(tmp_path / "y.npz")])  # fmt: skip
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "y.npz") as y:
        np.testing.assert_allclose(y["y"], run_onnxruntime(conv_bn, {"x": x})["y"], rtol=1e-4,
                                   atol=1e-5)  # fmt: skip


def test_threads_default_to_the_cores_and_are_stored(x86_build: Path) -> None:
    m = json.loads((x86_build / lower.MANIFEST).read_text())
    assert m["runtime"]["threads"] == os.cpu_count()
    assert m["compile"]["schedule_rules"].get("bnfold_conv:conv3x3") == 1


def test_cli_threads_go_to_the_manifest_and_the_runtime(conv_bn: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [str(conv_bn), "-o", str(out), "--shape", "x:1x3x16x16", "--threads", "1"]
    result = CliRunner().invoke(compile_cmd, [*args, "--no-verify"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / lower.MANIFEST).read_text())["runtime"]["threads"] == 1
    assert runtime.load(out).threads == 1
    result = CliRunner().invoke(run_cmd, [str(out)])
    assert result.exit_code == 0, result.output
    assert "native, 1 thread)" in result.output
    bad = CliRunner().invoke(compile_cmd, [str(conv_bn), "-o", str(out), "--threads", "0"])
    assert bad.exit_code == 2


def test_threads_are_honoured_in_a_fresh_process(conv_bn: Path, tmp_path: Path) -> None:
    """TVM sizes its pool once per process (default: half the logical CPUs on x86): the
    manifest's count, and an explicit one, must win in a process that has not run TVM yet."""
    import subprocess
    import sys

    want = os.cpu_count() or 1
    lower.compile_model(conv_bn, "x86", tmp_path, {"x": (1, 3, 16, 16)}, verify=False,
                        threads=want)  # fmt: skip
    code = (
        "import sys, numpy, tvm; from bnfold import runtime; m = runtime.load(sys.argv[1]); "
        "m.run({'x': numpy.zeros((1, 3, 16, 16), 'float32')}); "
        "print(m.threads, tvm.runtime.num_threads())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=120, check=True)  # fmt: skip
    assert proc.stdout.split() == [str(want), str(want)]


def test_cli_compile_rejects_bad_target(conv_bn: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(compile_cmd, [str(conv_bn), "-t", "mips", "-o", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown target 'mips'" in result.output


def _real(name: str) -> tuple[Path, Path]:
    model, inputs = CACHE / f"{name}.onnx", CACHE / "inputs" / f"{name}.npz"
    if not model.is_file() or not inputs.is_file():
        if os.environ.get("BNFOLD_MODELS"):
            pytest.fail(f"{model} or {inputs} missing; run `make models`")
        pytest.skip("real models not fetched (run `make models`)")
    return model, inputs


@pytest.mark.models
@pytest.mark.slow
def test_mobilenet_v2_x86_verifies_on_real_images(tmp_path: Path) -> None:
    model, inputs = _real("mobilenet_v2")
    m = lower.compile_model(model, "x86", tmp_path, None, inputs=inputs)
    assert m.verification["status"] == "passed"
    assert m.verification["worst_abs_over_max_ref"] <= 1e-4
    # The memory budget for compiling MobileNetV2 (2 GB); its time is a benchmark's business
    # (benchmarks/results/mobilenet_v2.json), not a unit test's on a shared machine.
    assert m.compile["peak_rss_mb"] < 2048


@pytest.mark.models
@pytest.mark.qemu
@pytest.mark.slow
def test_ppocr_cls_arm64_verifies_under_qemu(tmp_path: Path) -> None:
    model, inputs = _real("ppocr_cls")
    target = get("arm64")
    if not target.can_run():
        pytest.skip(target.can_run().why)
    m = lower.compile_model(model, target, tmp_path, None, inputs=inputs)
    assert m.verification["status"] == "passed"


def test_armv7_builds_where_its_cross_compiler_is(conv_bn: Path, tmp_path: Path) -> None:
    target = get("armv7")
    if not target.can_build():
        pytest.skip(target.can_build().why)
    m = lower.compile_model(conv_bn, target, tmp_path, {"x": (1, 3, 16, 16)})
    assert m.verification == {"status": "not verified", "why": target.can_run().why}
    header = (tmp_path / "model.so").read_bytes()[:20]
    assert header[:5] == b"\x7fELF\x01"  # 32-bit ELF
    assert int.from_bytes(header[18:20], "little") == 40  # EM_ARM


def test_compile_refuses_a_missing_database(conv_bn: Path, tmp_path: Path) -> None:
    with pytest.raises(BnfoldError, match="not a tuning database"):
        lower.compile_model(conv_bn, "x86", tmp_path / "o", database=tmp_path / "nothing")
