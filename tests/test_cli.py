"""The ``bnfold`` command line: normal flows (CliRunner) and the exit-code/stderr contract.

Normal flows run in-process through ``click.testing.CliRunner`` against ``bnfold.cli.cli``. The
contract (README, "Exit codes") is what ``bnfold.cli.main`` does with exceptions: exit code 2 for
bad input or usage, exactly one non-empty line on stderr, no traceback, and nothing written to
the output folder. Every bad input goes through ``main`` in this process (fast), and one of each
kind also through a real ``python -m bnfold`` process; those processes are started all at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bnfold.cli import cli, main
from bnfold.testing import parse

RNG_SEED = 0


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


def _bn_params(rng: np.random.Generator, c: int, prefix: str) -> dict[str, np.ndarray]:
    return {
        f"{prefix}_g": rng.uniform(0.5, 2.0, c).astype(np.float32),
        f"{prefix}_b": rng.standard_normal(c).astype(np.float32),
        f"{prefix}_m": rng.standard_normal(c).astype(np.float32),
        f"{prefix}_v": rng.uniform(0.5, 2.0, c).astype(np.float32),
    }


def three_bn_model(c_mid: int = 4) -> onnx.ModelProto:
    """Three BNs, one of each fate: folded backward (bn1), forward (bn2), as Mul+Add (bn3)."""
    rng = np.random.default_rng(RNG_SEED)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,8,8] x) => (float[1,5,8,8] y) {
        c1 = Conv <pads=[1,1,1,1]> (x, W1, B1)
        b1 = BatchNormalization (c1, bn1_g, bn1_b, bn1_m, bn1_v)
        r1 = Relu (b1)
        b2 = BatchNormalization (r1, bn2_g, bn2_b, bn2_m, bn2_v)
        c2 = Conv (b2, W2, B2)
        r2 = Relu (c2)
        b3 = BatchNormalization (r2, bn3_g, bn3_b, bn3_m, bn3_v)
        y = Relu (b3)
    }
    """
    tensors = {
        "W1": rng.standard_normal((c_mid, 3, 3, 3)).astype(np.float32),
        "B1": rng.standard_normal(c_mid).astype(np.float32),
        "W2": rng.standard_normal((5, c_mid, 1, 1)).astype(np.float32),
        "B2": rng.standard_normal(5).astype(np.float32),
        **_bn_params(rng, c_mid, "bn1"),
        **_bn_params(rng, c_mid, "bn2"),
        **_bn_params(rng, 5, "bn3"),
    }
    return parse(text, **tensors)


BN_LABELS = ("BatchNormalization:b1", "BatchNormalization:b2", "BatchNormalization:b3")


def conv_bn_model(
    channels: int = 4,
    dims: str = "1,3,8,8",
    out_dims: str | None = None,
    bn_is_output: bool = False,
) -> onnx.ModelProto:
    """x -> Conv(3x3, pads 1) -> BN -> Relu -> y (or BN -> y)."""
    rng = np.random.default_rng(RNG_SEED + 1)
    c_in = int(dims.split(",")[1])
    out_dims = out_dims or dims.replace(f",{c_in},", f",{channels},", 1)
    tail = (
        "y = BatchNormalization (c, g, b, m, v)"
        if bn_is_output
        else "n = BatchNormalization (c, g, b, m, v)\n        y = Relu (n)"
    )
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[{dims}] x) => (float[{out_dims}] y) {{
        c = Conv <pads=[1,1,1,1]> (x, W, B)
        {tail}
    }}
    """
    return parse(
        text,
        W=rng.standard_normal((channels, c_in, 3, 3)).astype(np.float32),
        B=rng.standard_normal(channels).astype(np.float32),
        g=rng.uniform(0.5, 2.0, channels).astype(np.float32),
        b=rng.standard_normal(channels).astype(np.float32),
        m=rng.standard_normal(channels).astype(np.float32),
        v=rng.uniform(0.5, 2.0, channels).astype(np.float32),
    )


def externalize(model: onnx.ModelProto, location: str, data_path: Path | None) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers point at ``location`` (written to ``data_path``).

    Written by hand: ``onnx.save_model`` itself refuses '..' and absolute locations, and a
    hostile model file does not care.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    blob = b""
    for t in out.graph.initializer:
        raw = onnx.numpy_helper.to_array(t).tobytes()
        offset = len(blob)
        blob += raw
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
            t.ClearField(field)
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (
            ("location", location),
            ("offset", str(offset)),
            ("length", str(len(raw))),
        ):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
    if data_path is not None:
        data_path.write_bytes(blob)
    return out


@pytest.fixture()
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(three_bn_model(), path)
    return path


@pytest.fixture()
def folded_path(model_path: Path) -> Path:
    out = model_path.parent / "folded.onnx"
    result = CliRunner().invoke(cli, ["fold", str(model_path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def invoke(*args: str | Path):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result


def run_bnfold(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "BNFOLD_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "bnfold", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# fold
# --------------------------------------------------------------------------------------------


def test_fold_writes_output_table_and_report(model_path: Path, tmp_path: Path):
    out, report = tmp_path / "out" / "folded.onnx", tmp_path / "out" / "fold.json"
    result = invoke("fold", model_path, "-o", out, "--report", report)
    assert result.exit_code == 0, result.output
    assert out.is_file() and report.is_file()
    for bn in BN_LABELS:
        assert bn in result.output
    assert "folded backward" in result.output and "folded forward" in result.output
    assert "affine" in result.output

    folded = onnx.load(out)
    onnx.checker.check_model(folded, full_check=True)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)

    data = json.loads(report.read_text())
    assert data["counts"] == {"folded_backward": 1, "folded_forward": 1, "affine": 1, "kept": 0}
    assert len(data["batchnorms"]) == 3
    assert sorted(r["node"] for r in data["batchnorms"]) == sorted(BN_LABELS)
    by_node = {r["node"]: r for r in data["batchnorms"]}
    assert by_node["BatchNormalization:b1"]["direction"] == "backward"
    assert by_node["BatchNormalization:b2"]["direction"] == "forward"
    assert by_node["BatchNormalization:b3"]["action"] == "affine"
    assert by_node["BatchNormalization:b3"]["reason"]
    assert data["bn_before"] == 3 and data["bn_after"] == 0
    # nothing but the two outputs in the output folder (no temp files)
    assert sorted(p.name for p in out.parent.iterdir()) == ["fold.json", "folded.onnx"]


def test_fold_is_deterministic(model_path: Path, tmp_path: Path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert invoke("fold", model_path, "-o", a).exit_code == 0
    assert invoke("fold", model_path, "-o", b).exit_code == 0
    assert a.read_bytes() == b.read_bytes()
    # folding the folded model again changes nothing but is still valid and byte-stable
    c, d = tmp_path / "c.onnx", tmp_path / "d.onnx"
    assert invoke("fold", a, "-o", c).exit_code == 0
    assert invoke("fold", a, "-o", d).exit_code == 0
    assert c.read_bytes() == d.read_bytes()


@pytest.mark.parametrize("spelling", ["m.onnx", "./m.onnx", "sub/../m.onnx"])
def test_fold_refuses_to_overwrite_input(
    model_path: Path,
    spelling: str,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
):
    (model_path.parent / "sub").mkdir()
    before = model_path.read_bytes()
    monkeypatch.chdir(model_path.parent)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["fold", "m.onnx", "-o", spelling])
    err = capfd.readouterr().err
    assert exc.value.code == 2, err
    assert len(stderr_lines(err)) == 1 and "overwrite" in err
    assert model_path.read_bytes() == before
    assert sorted(p.name for p in model_path.parent.iterdir()) == ["m.onnx", "sub"]


def test_fold_refuses_to_overwrite_input_subprocess(model_path: Path):
    before = model_path.read_bytes()
    proc = run_bnfold("fold", "m.onnx", "-o", "./m.onnx", cwd=model_path.parent)
    assert proc.returncode == 2, proc.stderr
    assert len(stderr_lines(proc.stderr)) == 1 and "overwrite" in proc.stderr
    assert model_path.read_bytes() == before
    assert [p.name for p in model_path.parent.iterdir()] == ["m.onnx"]


@pytest.mark.parametrize(
    "args",
    [
        ["fold", "m.onnx", "-o", "f.onnx", "--report", "m.onnx"],
        ["fold", "m.onnx", "-o", "f.onnx", "--report", "./f.onnx"],
        ["verify", "m.onnx", "folded.onnx", "--json", "m.onnx"],
        ["verify", "m.onnx", "folded.onnx", "--json", "folded.onnx"],
    ],
    ids=["report-is-input", "report-is-output", "json-is-reference", "json-is-candidate"],
)
def test_side_outputs_never_overwrite_a_model(
    folded_path: Path,
    args: list[str],
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
):
    """``--report`` / ``--json`` naming a model file must not replace it with JSON.

    Was: ``fold --report m.onnx`` overwrote the input model with the report (exit 0), and
    ``--report`` equal to ``-o`` replaced the folded model; fixed in bnfold/cli.py.
    """
    root = folded_path.parent
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    monkeypatch.chdir(root)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capfd.readouterr().err
    assert exc.value.code == 2, err
    assert len(stderr_lines(err)) == 1 and "overwrite" in err
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before


@pytest.mark.parametrize("bn_is_output", [False, True], ids=["bn-then-relu", "bn-is-graph-output"])
@pytest.mark.parametrize("with_conv", [True, False], ids=["conv-bn", "input-bn"])
def test_fold_bn_whose_output_is_the_graph_output(
    tmp_path: Path, bn_is_output: bool, with_conv: bool
):
    """The plainest model there is: a BN that produces the graph output must fold (exit 0).

    Regression: passes/fold_bn.py ``_bypass`` called ``replace_all_uses_with(out, ...)`` on a
    graph output, which onnx_ir >= 0.1.12 refuses (ValueError), so this was exit 3.
    """
    if with_conv:
        model = conv_bn_model(bn_is_output=bn_is_output)
    else:
        rng = np.random.default_rng(3)
        tail = (
            "y = BatchNormalization (x, g, b, m, v)"
            if bn_is_output
            else "n = BatchNormalization (x, g, b, m, v)\n y = Relu (n)"
        )
        model = parse(
            f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,3,4,4] x) => (float[1,3,4,4] y) {{ {tail} }}
        """,
            **{k: rng.uniform(0.5, 2, 3).astype(np.float32) for k in "gbmv"},
        )
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(model, src)
    result = CliRunner().invoke(cli, ["fold", str(src), "-o", str(out)])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert out.is_file()
    folded = onnx.load(out)
    assert [o.name for o in folded.graph.output] == ["y"]
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    assert invoke("verify", src, out).exit_code == 0


def test_fold_output_file_mode_follows_umask(model_path: Path, tmp_path: Path):
    """Outputs get the usual permissions (0o666 & ~umask), not mkstemp's private 0o600.

    Bug: bnfold/atomic.py ``atomic_path`` renames a ``tempfile.mkstemp`` file into place, and
    mkstemp creates it 0o600, so every model and report bnfold writes is unreadable by group
    and others.
    """
    out, report = tmp_path / "f.onnx", tmp_path / "f.json"
    assert invoke("fold", model_path, "-o", out, "--report", report).exit_code == 0
    umask = os.umask(0)
    os.umask(umask)
    for p in (out, report):
        assert oct(p.stat().st_mode & 0o777) == oct(0o666 & ~umask), p.name


# --------------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------------


def test_verify_passes_on_folded_model(model_path: Path, folded_path: Path, tmp_path: Path):
    js = tmp_path / "v.json"
    result = invoke("verify", model_path, folded_path, "--random", "2", "--json", js)
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "FAIL" not in result.output
    data = json.loads(js.read_text())
    assert data["passed"] is True and data["samples"] == 2


def test_verify_fails_on_tampered_weight(model_path: Path, folded_path: Path, tmp_path: Path):
    tampered = onnx.load(folded_path)
    weight = next(t for t in tampered.graph.initializer if len(t.dims) == 4)
    array = onnx.numpy_helper.to_array(weight) * np.float32(1.01)
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    bad = tmp_path / "tampered.onnx"
    onnx.save(tampered, bad)
    proc = run_bnfold("verify", model_path, bad)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_verify_with_inputs_npz(model_path: Path, folded_path: Path, tmp_path: Path):
    """An .npz with 3 samples stacked for a model of batch 1 is run sample by sample."""
    npz = tmp_path / "x.npz"
    np.savez(npz, x=np.random.default_rng(5).standard_normal((3, 3, 8, 8)).astype(np.float32))
    result = invoke("verify", model_path, folded_path, "--inputs", npz)
    assert result.exit_code == 0, result.output
    assert "PASS: 3 sample(s)" in result.output
    npy = tmp_path / "x.npy"
    np.save(npy, np.random.default_rng(6).standard_normal((1, 3, 8, 8)).astype(np.float32))
    result = invoke("verify", model_path, folded_path, "--inputs", npy)
    assert result.exit_code == 0, result.output


NAN_CANDIDATES = {
    # 0 / 0 on every element
    "div-by-zero": ("d = Sub (x1, x1)\n y = Div (d, Z)", {"Z": np.zeros(1, np.float32)}),
    # log of a negative number
    "log-negative": (
        "a = Abs (x1)\n n = Neg (a)\n s = Sub (n, One)\n y = Log (s)",
        {"One": np.ones(1, np.float32)},
    ),
}


@pytest.mark.parametrize("kind", sorted(NAN_CANDIDATES))
def test_verify_fails_on_nan_candidate(model_path: Path, tmp_path: Path, kind: str):
    body, tensors = NAN_CANDIDATES[kind]
    rng = np.random.default_rng(7)
    cand = parse(
        f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,8,8] x) => (float[1,5,8,8] y) {{
        x1 = Conv (x, Wc)
        {body}
    }}
    """,
        Wc=rng.standard_normal((5, 3, 1, 1)).astype(np.float32),
        **tensors,
    )
    path = tmp_path / "nan.onnx"
    onnx.save(cand, path)
    result = invoke("verify", model_path, path)
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "NaN" in result.output


def test_verify_dynamic_dims_with_shape(tmp_path: Path):
    src, out = tmp_path / "dyn.onnx", tmp_path / "dyn_f.onnx"
    onnx.save(conv_bn_model(dims="N,3,H,W", out_dims="N,4,H,W"), src)
    assert invoke("fold", src, "-o", out).exit_code == 0
    result = invoke("verify", src, out, "--shape", "x:2x3x5x7")
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------


def test_inspect_text(model_path: Path):
    result = invoke("inspect", model_path)
    assert result.exit_code == 0, result.output
    assert "input  x: float[1x3x8x8]" in result.output
    assert "output y: float[1x5x8x8]" in result.output
    assert "BatchNormalization 3" in result.output  # op counts
    for bn in BN_LABELS:
        assert bn in result.output
    # inspect only reports: the model is unchanged
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(model_path).graph.node) == 3


def test_inspect_json(model_path: Path):
    result = invoke("inspect", model_path, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["opset"] == 17 and data["ir_version"] == 8
    assert data["inputs"] == [["x", "1x3x8x8", "float"]]
    assert data["outputs"] == [["y", "1x5x8x8", "float"]]
    assert data["ops"]["BatchNormalization"] == 3
    assert len(data["fold"]["batchnorms"]) == 3
    assert data["fold"]["counts"]["kept"] == 0


# --------------------------------------------------------------------------------------------
# bad input: exit 2, one line on stderr, no traceback, nothing written
# --------------------------------------------------------------------------------------------


def _bad_cases(root: Path) -> dict[str, tuple[list[str], str | None]]:
    """name -> (bnfold arguments with {out} for the output folder, text stderr must contain)."""
    inputs = root / "inputs"
    inputs.mkdir()
    good = inputs / "good.onnx"
    onnx.save(conv_bn_model(channels=16), good)
    data = good.read_bytes()
    cases: dict[str, tuple[list[str], str | None]] = {}

    def fold_case(name: str, path: Path, must: str | None = None) -> None:
        cases[name] = (
            ["fold", str(path), "-o", "{out}/folded.onnx", "--report", "{out}/fold.json"],
            must,
        )

    fold_case("missing-file", inputs / "nope.onnx", "no such file")
    (inputs / "adir.onnx").mkdir()
    fold_case("directory", inputs / "adir.onnx", "directory")
    (inputs / "empty.onnx").write_bytes(b"")
    fold_case("empty-file", inputs / "empty.onnx", "empty")
    (inputs / "random.onnx").write_bytes(np.random.default_rng(11).bytes(4096))
    fold_case("random-bytes", inputs / "random.onnx")
    for pct in (10, 50, 90, 99):
        p = inputs / f"trunc{pct}.onnx"
        p.write_bytes(data[: len(data) * pct // 100])
        fold_case(f"truncated-{pct}pct", p)

    old = onnx.parser.parse_model("""
    <ir_version: 3, opset_import: ["" : 6]>
    g (float[1,3,4,4] x) => (float[1,3,4,4] y) { y = Relu (x) }
    """)
    onnx.save(old, inputs / "opset6.onnx")
    fold_case("opset-6", inputs / "opset6.onnx", "opset 6")

    ones = {k: np.ones(3, np.float32) for k in "sbmv"}
    train = parse(
        """
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[2,3,4,4] x) => (float[2,3,4,4] y, float[3] rm, float[3] rv) {
        y, rm, rv = BatchNormalization <training_mode=1> (x, s, b, m, v)
    }
    """,
        **ones,
    )
    onnx.save(train, inputs / "train.onnx")
    fold_case("bn-training-mode", inputs / "train.onnx", "training")

    # int32 BN: onnx.checker accepts it (it checks no types); shape inference refuses it.
    int_bn = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (int32[2,3,4,4] x) => (int32[2,3,4,4] y) { y = BatchNormalization (x, s, b, m, v) }
    """)
    for k in "sbmv":
        int_bn.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(3, np.int32), k))
    onnx.checker.check_model(int_bn)
    onnx.save(int_bn, inputs / "int32.onnx")
    fold_case("bn-int32", inputs / "int32.onnx", "int32")

    small = conv_bn_model()
    ext = inputs / "ext"
    ext.mkdir()
    onnx.save(externalize(small, "../outside.bin", inputs / "outside.bin"), ext / "up.onnx")
    fold_case("external-data-parent", ext / "up.onnx", "outside")
    onnx.save(externalize(small, str(inputs / "abs.bin"), inputs / "abs.bin"), ext / "abs.onnx")
    fold_case("external-data-absolute", ext / "abs.onnx", "outside")
    onnx.save(externalize(small, "gone.bin", None), ext / "gone.onnx")
    fold_case("external-data-missing", ext / "gone.onnx", "missing")
    (ext / "link.bin").symlink_to(inputs / "outside.bin")
    onnx.save(externalize(small, "link.bin", None), ext / "link.onnx")
    fold_case("external-data-symlink-out", ext / "link.onnx", "outside")
    (ext / "short.bin").write_bytes(b"\0" * 16)
    onnx.save(externalize(small, "short.bin", None), ext / "short.onnx")
    fold_case("external-data-too-short", ext / "short.onnx", "too short")

    onnx.save(small, inputs / "static.onnx")
    onnx.save(conv_bn_model(dims="N,3,H,W", out_dims="N,4,H,W"), inputs / "dyn.onnx")
    np.savez(inputs / "x.npz", x=np.zeros((1, 3, 8, 8), np.float32))
    verify = [
        "verify",
        str(inputs / "static.onnx"),
        str(inputs / "static.onnx"),
        "--json",
        "{out}/v.json",
    ]
    cases["verify-random-and-inputs"] = (
        [*verify, "--random", "2", "--inputs", str(inputs / "x.npz")],
        "--inputs",
    )
    cases["verify-bad-shape"] = (
        [
            "verify",
            str(inputs / "dyn.onnx"),
            str(inputs / "dyn.onnx"),
            "--shape",
            "x:1xax3",
            "--json",
            "{out}/v.json",
        ],
        "x:1xax3",
    )
    cases["verify-dynamic-without-shape"] = (
        ["verify", str(inputs / "dyn.onnx"), str(inputs / "dyn.onnx"), "--json", "{out}/v.json"],
        "--shape",
    )
    cases["verify-missing-candidate"] = (
        [*verify[:2], str(inputs / "nope.onnx"), *verify[3:]],
        "no such file",
    )
    cases["unknown-option"] = (["fold", str(good), "-o", "{out}/f.onnx", "--bogus"], "--bogus")
    return cases


BAD_CASE_NAMES = [
    "missing-file",
    "directory",
    "empty-file",
    "random-bytes",
    "truncated-10pct",
    "truncated-50pct",
    "truncated-90pct",
    "truncated-99pct",
    "opset-6",
    "bn-training-mode",
    "bn-int32",
    "external-data-parent",
    "external-data-absolute",
    "external-data-missing",
    "external-data-symlink-out",
    "external-data-too-short",
    "verify-random-and-inputs",
    "verify-bad-shape",
    "verify-dynamic-without-shape",
    "verify-missing-candidate",
    "unknown-option",
]
# Also run as real processes (``python -m bnfold``), started all at once: one of each kind.
SUBPROCESS_CASE_NAMES = [
    "directory",
    "truncated-50pct",
    "bn-training-mode",
    "external-data-parent",
    "verify-bad-shape",
    "verify-random-and-inputs",
]


@pytest.fixture(scope="module")
def bad_cases(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("bad")
    cases = _bad_cases(root)
    assert sorted(cases) == sorted(BAD_CASE_NAMES)
    return root, cases


def _argv(root: Path, name: str, args: list[str]) -> tuple[list[str], Path]:
    out = root / f"out-{name}-{len(list(root.glob(f'out-{name}-*')))}"
    out.mkdir()
    return [a.replace("{out}", str(out)) for a in args], out


def _assert_bad_input(code: int | None, stderr: str, out: Path, must: str | None) -> None:
    lines = stderr_lines(stderr)
    assert code == 2, f"exit {code}: {stderr}"
    assert "Traceback" not in stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    if must is not None:
        assert must.lower() in lines[0].lower(), lines[0]
    assert list(out.iterdir()) == [], "bad input left files in the output folder"


@pytest.mark.parametrize("name", BAD_CASE_NAMES)
def test_bad_input_contract(
    bad_cases, name: str, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    """``bnfold.cli.main`` (what the ``bnfold`` script runs), in this process."""
    root, cases = bad_cases
    args, must = cases[name]
    argv, out = _argv(root, name, args)
    monkeypatch.chdir(root)
    monkeypatch.delenv("BNFOLD_DEBUG", raising=False)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    _assert_bad_input(exc.value.code, capfd.readouterr().err, out, must)


@pytest.fixture(scope="module")
def bad_processes(bad_cases):
    """Start the subprocess cases at once (independent, and each pays for the imports)."""
    root, cases = bad_cases
    env = {k: v for k, v in os.environ.items() if k != "BNFOLD_DEBUG"}
    running = {}
    for name in SUBPROCESS_CASE_NAMES:
        args, must = cases[name]
        argv, out = _argv(root, name, args)
        proc = subprocess.Popen(
            [sys.executable, "-m", "bnfold", *argv],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        running[name] = (proc, out, must)
    yield running
    for proc, _, _ in running.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("name", SUBPROCESS_CASE_NAMES)
def test_bad_input_contract_subprocess(bad_processes, name: str):
    """The same contract on a real ``python -m bnfold`` process."""
    proc, out, must = bad_processes[name]
    _, stderr = proc.communicate(timeout=60)
    _assert_bad_input(proc.returncode, stderr, out, must)


@pytest.mark.parametrize("debug", [False, True], ids=["default", "BNFOLD_DEBUG"])
def test_internal_error_is_exit_3_and_one_line(
    model_path: Path,
    tmp_path: Path,
    debug: bool,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
):
    from bnfold import pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("a bug\nsecond line")

    monkeypatch.setattr(pipeline, "fold", broken)
    if debug:
        monkeypatch.setenv("BNFOLD_DEBUG", "1")
        with pytest.raises(RuntimeError):
            main(["fold", str(model_path), "-o", str(tmp_path / "f.onnx")])
        return
    monkeypatch.delenv("BNFOLD_DEBUG", raising=False)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["fold", str(model_path), "-o", str(tmp_path / "f.onnx")])
    err = capfd.readouterr().err
    assert exc.value.code == 3, err
    lines = stderr_lines(err)
    assert len(lines) == 1 and "internal error" in lines[0] and "BNFOLD_DEBUG" in lines[0]
    assert not (tmp_path / "f.onnx").exists()


# --------------------------------------------------------------------------------------------
# start-up cost and imports
# --------------------------------------------------------------------------------------------


def test_help_lists_the_commands():
    # How fast it starts is a matter of what it imports (test_cli_import_is_light), not of a
    # wall-clock limit that a shared machine breaks.
    proc = run_bnfold("--help")
    assert proc.returncode == 0, proc.stderr
    assert "fold" in proc.stdout and "verify" in proc.stdout and "inspect" in proc.stdout


def test_steps_are_shown_on_a_terminal_only(capsys: pytest.CaptureFixture[str]) -> None:
    from bnfold.cli.progress import StepDisplay

    shown = StepDisplay(enabled=True)
    for step, seconds in [("fold", None), ("fold", 0.5), ("build", None)]:
        shown(step, seconds)
    shown.close()  # build failed: its line ends before the error message
    assert capsys.readouterr().err == (
        "  fold       ...\r  fold          0.5 s\n  build      ... stopped\n"
    )
    hidden = StepDisplay()  # stderr is captured here, not a terminal
    hidden("fold", None)
    hidden("fold", 0.5)
    hidden.close()
    assert capsys.readouterr().err == ""


def test_cli_import_is_light():
    code = (
        "import sys, bnfold.cli\n"
        "heavy = sorted(m for m in sys.modules\n"
        "               if m.split('.')[0] in ('onnxruntime', 'onnx_ir', 'tvm'))\n"
        "print(','.join(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"import bnfold.cli imports {proc.stdout.strip()}"


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and "bnfold" in result.output


# --------------------------------------------------------------------------------------------
# external data
# --------------------------------------------------------------------------------------------


def test_external_data_round_trip(tmp_path: Path):
    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir()
    src = src_dir / "m.onnx"
    onnx.save_model(
        conv_bn_model(channels=16),
        src,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="m.onnx.data",
        size_threshold=0,
    )
    assert (src_dir / "m.onnx.data").is_file()
    out = out_dir / "folded.onnx"
    result = invoke("fold", src, "-o", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out_dir.iterdir()) == ["folded.onnx", "folded.onnx.data"]
    proto = onnx.load(out, load_external_data=False)
    locations = {
        e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"
    }
    assert locations == {"folded.onnx.data"}
    result = invoke("verify", src, out)
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    # byte-identical again (same file name: the model names its data file)
    again = tmp_path / "again" / "folded.onnx"
    assert invoke("fold", src, "-o", again).exit_code == 0
    assert again.read_bytes() == out.read_bytes()
    assert (again.parent / "folded.onnx.data").read_bytes() == (
        out_dir / "folded.onnx.data"
    ).read_bytes()


def test_external_data_with_only_small_tensors(tmp_path: Path):
    """A model whose tensors are all below the external-data threshold still folds.

    Was an internal error: bnfold/ir.py ``save`` renamed a ``.data`` file that
    ``convert_model_to_external_data(size_threshold=1024)`` never wrote (fixed there).
    """
    src = tmp_path / "m.onnx"
    onnx.save_model(
        conv_bn_model(),
        src,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="m.onnx.data",
        size_threshold=0,
    )
    out = tmp_path / "out" / "f.onnx"
    result = invoke("fold", src, "-o", out)
    assert result.exit_code == 0, result.output
    assert invoke("verify", src, out).exit_code == 0
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []
