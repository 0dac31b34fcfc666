"""``bnfold deploy`` / ``serve`` against real TVM RPC servers on loopback.

Servers run as subprocesses (``bnfold.rpc.serve`` in a plain ``python -c``), the tracker
as ``python -m tvm.exec.rpc_tracker``; each on a free port. The model is a small conv+BN built
with onnx.parser and compiled for x86; and for arm64, deployed to an aarch64 server run under
qemu-user (``bnfold serve --emulate arm64``, in the root ``make arm64-root`` builds).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from click.testing import CliRunner

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

from bnfold import rpc as bnfold_rpc  # noqa: E402
from bnfold.cli.deploy import deploy_cmd, serve_cmd  # noqa: E402
from bnfold.device import deploy, emulate  # noqa: E402
from bnfold.errors import BnfoldError, CheckFailed  # noqa: E402
from bnfold.lower import compiler as lower  # noqa: E402
from bnfold.targets import get  # noqa: E402
from bnfold.testing.rpc import free_port, start_server, start_tracker  # noqa: E402
from bnfold.testing.rpc import stop as _stop  # noqa: E402
from bnfold.testing.rpc import wait_port as _wait_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Runs the bnfold CLI (with every command registered) in a subprocess.
CLI_CODE = (
    "import sys; from bnfold.cli import cli, main; from bnfold.cli.deploy import COMMANDS; "
    "[cli.add_command(c) for c in COMMANDS]; main(sys.argv[1:])"
)

CONV_BN = """
<ir_version: 8, opset_import: ["" : 17]>
convbn (float[N,3,8,8] x) => (float[N,4] y) <
    float[8,3,3,3] w = {W}, float[8] b = {B8},
    float[8] scale = {S}, float[8] shift = {B8}, float[8] mean = {B8}, float[8] var = {S},
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


def _vals(rng: np.random.Generator, n: int, lo: float, hi: float) -> str:
    return "{" + ", ".join(f"{v:.6f}" for v in rng.uniform(lo, hi, n)) + "}"


def _model(rng: np.random.Generator) -> onnx.ModelProto:
    text = CONV_BN.replace("{W}", _vals(rng, 216, -1, 1)).replace("{B8}", _vals(rng, 8, -1, 1))
    text = text.replace("{S}", _vals(rng, 8, 0.5, 2)).replace("{FC}", _vals(rng, 32, -1, 1))
    return onnx.parser.parse_model(text)


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deploy")
    model = root / "convbn.onnx"
    onnx.save(_model(np.random.default_rng(0)), model)
    out = root / "x86"
    lower.compile_model(model, "x86", out, {"x": (1, 3, 8, 8)}, verify=False)
    return out


def _int8_build(rng: np.random.Generator, target: str, out: Path) -> Path:
    """The conv+BN model quantized by bnfold (QDQ) and compiled with integer kernels."""
    from bnfold.quant.quantize import quantize

    fp32 = onnx.shape_inference.infer_shapes(_model(rng))
    calib = [{"x": rng.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    int8, _ = quantize(fp32, calib)
    path = out.parent / f"{out.name}.int8.onnx"
    onnx.save(int8, str(path))
    lower.compile_model(path, target, out, verify=False, fold=False)
    return out


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    port = free_port()
    proc = start_server(port)
    yield port
    _stop([proc])


def test_deploy_loopback_passes_and_times(build: Path, server: int, tmp_path: Path) -> None:
    out = tmp_path / "deploy.json"
    res = CliRunner().invoke(
        deploy_cmd, [str(build), "--rpc", f"127.0.0.1:{server}", "--json", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "PASS" in res.output and "p50" in res.output and "note:" not in res.output
    data = json.loads(out.read_text())
    assert data["passed"] and data["reference"].endswith("convbn.onnx")
    lat = data["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] and lat["samples"] == 20


def test_deploy_given_inputs_and_missing_original(build: Path, server: int, tmp_path: Path) -> None:
    manifest = json.loads((build / lower.MANIFEST).read_text())
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("model.so", lower.FOLDED):
        (copy / name).write_bytes((build / name).read_bytes())
    manifest["source"]["path"] = str(tmp_path / "gone.onnx")
    (copy / lower.MANIFEST).write_text(json.dumps(manifest))
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    r = deploy.deploy(copy, f"127.0.0.1:{server}", inputs=tmp_path / "x.npz", repeat=3)
    assert r.passed and r.reference.endswith(lower.FOLDED)
    assert "not available" in r.reference_note and r.inputs.endswith("x.npz")


def test_deploy_runs_stacked_inputs_in_slices(build: Path, server: int) -> None:
    # The .npz that `bnfold compile --inputs` takes (N samples along the batch axis) runs on a
    # batch-1 artifact one slice at a time; every slice is checked, the first one is timed.
    x = np.random.default_rng(2).standard_normal((3, 3, 8, 8)).astype(np.float32)
    r = deploy.deploy(build, f"127.0.0.1:{server}", inputs={"x": x}, repeat=2)
    assert r.passed and r.samples == 3 and "3 sample(s)" in r.table
    with pytest.raises(BnfoldError, match=r"compiled for float32\[1, 3, 8, 8\]"):
        deploy.deploy(build, f"127.0.0.1:{server}", inputs={"x": x[:, :, :4]})


def test_deploy_int8_gates_layer_by_layer(server: int, tmp_path: Path) -> None:
    out = _int8_build(np.random.default_rng(5), "x86", tmp_path / "int8")
    assert (out / lower.LAYERWISE / lower.MANIFEST).is_file()
    js = tmp_path / "deploy.json"
    res = CliRunner().invoke(deploy_cmd, [str(out), "--rpc", f"127.0.0.1:{server}", "--json",
                                          str(js), "--repeat", "3"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "layer by layer on the device" in res.output
    data = json.loads(js.read_text())
    lw = data["layerwise"]
    assert data["passed"] and lw["status"] == "passed" and lw["max_lsb"] <= 1
    assert lw["tensors"] >= 3
    # --max-lsb 0 holds the same run to bit-exactness: it passes only if no tensor is off.
    res0 = CliRunner().invoke(deploy_cmd, [str(out), "--rpc", f"127.0.0.1:{server}",
                                           "--max-lsb", "0", "--repeat", "1"])  # fmt: skip
    assert res0.exit_code == (0 if lw["max_lsb"] == 0 else 1), res0.output


def test_deploy_gate_fails_with_exit_1(build: Path, server: int, tmp_path: Path) -> None:
    # The original is gone and model.folded.onnx is another model (other weights): FAIL.
    manifest = json.loads((build / lower.MANIFEST).read_text())
    manifest["source"]["path"] = str(tmp_path / "gone.onnx")
    (tmp_path / lower.MANIFEST).write_text(json.dumps(manifest))
    (tmp_path / "model.so").write_bytes((build / "model.so").read_bytes())
    onnx.save(_model(np.random.default_rng(7)), tmp_path / lower.FOLDED)
    res = CliRunner().invoke(deploy_cmd, [str(tmp_path), "--rpc", f"127.0.0.1:{server}"])
    assert isinstance(res.exception, CheckFailed) and "FAIL" in res.output, res.output


def test_deploy_errors_are_one_line(build: Path) -> None:
    with pytest.raises(BnfoldError, match="cannot reach"):
        deploy.deploy(build, f"127.0.0.1:{free_port()}")
    with pytest.raises(BnfoldError, match="HOST:PORT"):
        bnfold_rpc.parse_addr("localhost")
    res = CliRunner().invoke(deploy_cmd, [str(build)])
    assert res.exit_code == 2


def test_deploy_through_tracker_with_two_servers(build: Path) -> None:
    pytest.importorskip("tornado")  # TVM's tracker needs it; apache-tvm does not declare it
    from tvm import rpc

    tracker, addr = start_tracker()
    procs = [tracker]
    try:
        ports = [free_port() for _ in range(2)]
        procs += [start_server(port, addr, "edge") for port in ports]
        client = rpc.connect_tracker(*bnfold_rpc.parse_addr(addr))
        end = time.monotonic() + 20
        while time.monotonic() < end:
            queue = client.summary()["queue_info"].get("edge", {})
            if queue.get("free") == 2:
                break
            time.sleep(0.2)
        assert queue.get("free") == 2, client.summary()
        held = client.request("edge")  # hold one server: deploy must get the other one
        r = deploy.deploy(build, tracker=addr, key="edge", repeat=5)
        assert r.passed and r.latency_ms["p50"] > 0
        del held
        res = CliRunner().invoke(deploy_cmd, [str(build), "--tracker", addr, "--key", "edge"])
        assert res.exit_code == 0 and "PASS" in res.output, res.output
        # A registered server takes only sessions the tracker hands out: say so.
        with pytest.raises(BnfoldError, match="registered with a tracker: use --tracker"):
            deploy.deploy(build, f"127.0.0.1:{ports[0]}", key="edge")
    finally:
        _stop(procs)


def test_serve_warns_off_loopback(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tvm.rpc import server as tvm_server

    res = CliRunner().invoke(serve_cmd, ["--help"])
    text = " ".join(res.output.split())
    assert "no authentication" in text and "isolated network" in text

    def refuse(*args: object, **kwargs: object) -> int:
        raise OSError("not binding in a test")

    monkeypatch.setattr(tvm_server, "_popen_start_rpc_server", refuse)
    with pytest.raises(BnfoldError, match="cannot listen"):
        bnfold_rpc.serve("0.0.0.0", 9090)
    assert "NO authentication" in caplog.text
    caplog.clear()
    with pytest.raises(BnfoldError, match="cannot listen"):
        bnfold_rpc.serve("127.0.0.1", 9090)
    assert "NO authentication" not in caplog.text


def test_serve_command_serves_and_stops_on_sigterm(build: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI_CODE, "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        _wait_port(port, proc)
        assert deploy.deploy(build, f"127.0.0.1:{port}", repeat=2).passed
        proc.terminate()
        assert proc.wait(timeout=10) == 143
        assert f"listening on 127.0.0.1:{port}" in (proc.stdout.read() if proc.stdout else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _arm64_root() -> Path:
    """The arm64 root for the emulated server: ``$BNFOLD_ARM64_ROOT`` (``make test`` sets it;
    then it must be usable), else where ``make arm64-root`` puts it, else bnfold's default."""
    explicit = os.environ.get(emulate.ROOT_ENV)
    roots = [Path(explicit)] if explicit else [REPO / ".cache/bnfold/arm64-root",
                                               emulate.default_root()]  # fmt: skip
    why = ""
    for root in roots:
        why = emulate.why_not_ready(root)
        if not why:
            return root
    if explicit:
        pytest.fail(f"{emulate.ROOT_ENV} is set but unusable: {why}")
    pytest.skip(why)


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.qemu
def test_deploy_arm64_to_emulated_aarch64_server(
    build: Path, server: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _arm64_root()
    target = get("arm64")
    if not target.can_build():
        pytest.skip(target.can_build().why)
    model = tmp_path / "convbn.onnx"
    onnx.save(_model(np.random.default_rng(3)), model)
    out = tmp_path / "arm64"
    lower.compile_model(model, target, out, {"x": (1, 3, 8, 8)}, verify=False)

    port = free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, emulate.ROOT_ENV: str(root)}
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", CLI_CODE, "serve", "--emulate", "arm64", "--port", str(port)],
            stdout=subprocess.PIPE, stderr=err, env=env, text=True,
        )  # fmt: skip
    try:
        _wait_port(port, proc, timeout=120)  # importing TVM under qemu: ~5 s
        js = tmp_path / "deploy.json"
        res = CliRunner().invoke(deploy_cmd, [str(out), "--rpc", f"127.0.0.1:{port}", "--json",
                                              str(js), "--repeat", "5"])  # fmt: skip
        assert res.exit_code == 0, res.output + log.read_text()[-2000:]
        assert "PASS" in res.output and "p50" in res.output
        data = json.loads(js.read_text())
        assert data["passed"] and data["target"] == "arm64" and data["worst_ratio"] < 1e-5
        assert data["reference"].endswith("convbn.onnx")
        lat = data["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] and lat["samples"] == 5
        text = log.read_text()
        assert "load_module" in text, text  # the emulated server loaded the library
        # An int8 build (NEON int8 kernels) on the same emulated device: the layer-by-layer gate.
        int8 = _int8_build(np.random.default_rng(6), "arm64", tmp_path / "arm64-int8")
        js8 = tmp_path / "deploy8.json"
        res = CliRunner().invoke(deploy_cmd, [str(int8), "--rpc", f"127.0.0.1:{port}", "--json",
                                              str(js8), "--repeat", "2"])  # fmt: skip
        assert res.exit_code == 0, res.output + log.read_text()[-2000:]
        lw = json.loads(js8.read_text())["layerwise"]
        assert lw["status"] == "passed" and lw["max_lsb"] <= 1, lw
        qemu = re.search(r"pid (\d+)", text)
        assert qemu, text
        proc.terminate()
        assert proc.wait(timeout=20) == 143
        assert "emulated) listening on" in (proc.stdout.read() if proc.stdout else "")
        end = time.monotonic() + 10  # the qemu child is stopped with its parent
        while not _pid_gone(int(qemu.group(1))) and time.monotonic() < end:
            time.sleep(0.1)
        assert _pid_gone(int(qemu.group(1)))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        left = re.search(r"pid (\d+)", log.read_text())
        if left and not _pid_gone(int(left.group(1))):  # its parent was killed, not stopped
            os.kill(int(left.group(1)), 9)
    # The x86 server cannot load the aarch64 library: a one-line error, and it keeps serving.
    with pytest.raises(BnfoldError, match="on the RPC device failed"):
        deploy.deploy(out, f"127.0.0.1:{server}", repeat=1)
    assert deploy.deploy(build, f"127.0.0.1:{server}", repeat=1).passed
    # No root: one line naming what to run.
    monkeypatch.setenv(emulate.ROOT_ENV, str(tmp_path / "none"))
    with pytest.raises(BnfoldError, match="make arm64-root"):
        emulate.start_server(port=free_port())
