"""Integer compute for QDQ models (bnfold.lower.int8): the Relax rewrite, the fixed-point
requantize, activation dropping, the layer-by-layer check, and ``compile --int8``.

Small fp32 models are written as onnx.parser text, quantized by bnfold (per-channel or
per-tensor, uint8 or int8 activations, with and without CLE), compiled for x86, and every
quantized tensor is compared with onnxruntime's on the same layer inputs (<= 1 LSB).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from click.testing import CliRunner

from bnfold.check import run_onnxruntime
from bnfold.cli import cli
from bnfold.errors import CheckFailed
from bnfold.lower import compiler as lower
from bnfold.lower import fixed_point
from bnfold.lower import int8 as lower_int8
from bnfold.quant.quantize import quantize

pytest.importorskip("tvm")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.tvm


def _vals(rng: np.random.Generator, *shape: int, scale: float = 0.3) -> str:
    return ", ".join(f"{v:.5f}" for v in rng.normal(0, scale, shape).ravel())


def _conv_model(
    rng: np.random.Generator, *, c: int = 4, o: int = 8, k: int = 3, stride: int = 1,
    pad: int = 1, groups: int = 1, bias: bool = True, act: str = "Relu", hw: int = 12,
) -> onnx.ModelProto:  # fmt: skip
    """x -> Conv -> act -> Conv 1x1 -> Relu -> MaxPool -> GlobalAveragePool -> Flatten ->
    MatMul + bias -> Relu -> Gemm: conv groups with every activation kind, a matmul group,
    integer pass-through ops (MaxPool, Flatten), a float output."""
    ci = c // groups
    out_hw = (hw + 2 * pad - k) // stride + 1
    del out_hw
    b = f", float[{o}] b1 = {{{_vals(rng, o)}}}" if bias else ""
    bias_in = ", b1" if bias else ""
    acts = {
        "Relu": "a = Relu (c1)",
        "Clip": "a = Clip (c1, lo, hi)",
        "none": "a = Identity (c1)",
    }
    text = f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1,{c},{hw},{hw}] x) => (float[1,5] y) <
        float[{o},{ci},{k},{k}] w1 = {{{_vals(rng, o, ci, k, k)}}}{b},
        float[16,{o},1,1] w2 = {{{_vals(rng, 16, o, 1, 1)}}}, float[16] b2 = {{{_vals(rng, 16)}}},
        float[16,12] f1 = {{{_vals(rng, 16, 12)}}}, float[12] fb1 = {{{_vals(rng, 12)}}},
        float[5,12] f2 = {{{_vals(rng, 5, 12)}}}, float lo = {{0.0}}, float hi = {{1.5}}
    > {{
        c1 = Conv <pads = [{pad}, {pad}, {pad}, {pad}], strides = [{stride}, {stride}],
                   group = {groups}> (x, w1{bias_in})
        {acts[act]}
        c2 = Conv (a, w2, b2)
        r2 = Relu (c2)
        mp = MaxPool <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]> (r2)
        p = GlobalAveragePool (mp)
        f = Flatten (p)
        m = MatMul (f, f1)
        mb = Add (m, fb1)
        r3 = Relu (mb)
        y = Gemm <transB = 1> (r3, f2)
    }}
    """
    model = onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text))
    onnx.checker.check_model(model)
    return model


def _calib(rng: np.random.Generator, model: onnx.ModelProto, n: int = 12) -> list[dict]:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return [{"x": rng.normal(0, 1, shape).astype(np.float32)} for _ in range(n)]


def _integer_ops(info: dict) -> dict[str, int]:
    """``{op: count}`` of the quantize groups that became integer code."""
    ops: dict[str, int] = {}
    for g in info["groups"]:
        if g.get("how") and not g.get("float_output"):
            ops[g["op"]] = ops.get(g["op"], 0) + 1
    return ops


CASES = {
    "conv3x3-relu": {},
    "conv3x3-stride2-nobias": {"stride": 2, "bias": False},
    "conv-clip": {"act": "Clip"},
    "conv-noact": {"act": "none"},
    "depthwise": {"c": 8, "o": 8, "groups": 8},
    "conv1x1-odd-channels": {"c": 5, "o": 7, "k": 1, "pad": 0, "hw": 7},
    "conv5x5-pad2": {"k": 5, "pad": 2, "hw": 9},
}


_QUANT_OPTS = {
    "per-channel-uint8": {"per_channel": True, "activation_type": "uint8", "cle": True},
    "per-tensor-int8-nocle": {"per_channel": False, "activation_type": "int8", "cle": False},
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("quant", list(_QUANT_OPTS), ids=lambda q: q)
def test_integer_layers_match_onnxruntime(case: str, quant: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(sorted(CASES).index(case))
    model = _conv_model(rng, **CASES[case])
    int8, _ = quantize(model, _calib(rng, model), **_QUANT_OPTS[quant])
    path = tmp_path / "m.int8.onnx"
    onnx.save(int8, str(path))
    m = lower.compile_model(path, "x86", tmp_path / "out", fold=False)
    info, v = m.compile["int8"], m.verification
    # Two convs and the MatMul + bias (its output is quantized for the next Gemm) are
    # integer; the last Gemm feeds the float graph output: an integer matmul with a float
    # result. MaxPool (bnfold's 8-bit kernel) and Flatten run on the 8-bit tensor.
    assert _integer_ops(info) == {"conv2d": 2, "matmul": 1, "max_pool2d": 1, "reshape": 1}
    assert info["float_output_matmuls"] == 1
    assert [g["how"] for g in info["groups"] if g["op"] == "max_pool2d"] == ["kernel"]
    assert v["status"] == "passed" and v["max_lsb"] <= 1, v
    assert v["tensors"] == len(lower_int8.quantized_tensors(int8))
    # End to end the artifact still computes the model (small models: few compounding flips).
    assert v["end_to_end"]["result"]["outputs"][0]["cosine"] > 0.99


@pytest.mark.qemu
@pytest.mark.parametrize("cpu", ["generic", "cortex-a76"])  # NEON smull pairs / sdot
@pytest.mark.parametrize("quant", list(_QUANT_OPTS), ids=lambda q: q)
def test_integer_layers_match_onnxruntime_on_arm64(cpu: str, quant: str, tmp_path: Path) -> None:
    from bnfold.targets import get

    target = get(f"arm64:{cpu}")
    if not target.can_run():
        pytest.skip(target.can_run().why)
    rng = np.random.default_rng(11)
    model = _conv_model(rng, c=6, o=12, stride=2, hw=13)
    int8, _ = quantize(model, _calib(rng, model), **_QUANT_OPTS[quant])
    path = tmp_path / "m.int8.onnx"
    onnx.save(int8, str(path))
    m = lower.compile_model(path, target, tmp_path / "out", fold=False)
    info, v = m.compile["int8"], m.verification
    assert info["kernel_groups"] == 2  # both convs on bnfold's NEON kernels
    assert v["status"] == "passed" and v["max_lsb"] <= 1, v
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump:  # the dot product only where the CPU has it
        code = subprocess.run([objdump, "-d", str(tmp_path / "out" / "model.so")],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert ("sdot\t" in code) == (cpu == "cortex-a76")


def test_relax_fallback_without_kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the target has no int8 kernel, Relax integer ops (scheduled by bnfold's rules)
    compute the same thing: the convs, the max pool on the 8-bit tensor, and the last Gemm as
    an integer matmul with a float epilogue."""
    from bnfold.targets import int8 as int8_kernels

    for kernel in ("conv2d_int8", "max_pool2d_int8", "add_int8", "dense_int8_float"):
        monkeypatch.setattr(int8_kernels, kernel, lambda *a, **k: None)
    rng = np.random.default_rng(7)
    model = _conv_model(rng, act="Clip")
    int8, _ = quantize(model, _calib(rng, model))
    path = tmp_path / "m.int8.onnx"
    onnx.save(int8, str(path))
    m = lower.compile_model(path, "x86", tmp_path / "out", fold=False)
    info = m.compile["int8"]
    assert info["kernel_groups"] == 0
    assert _integer_ops(info)["conv2d"] == 2
    assert info["float_output_matmuls"] == 1
    assert m.compile["schedule_rules"].get("bnfold_pool:pool") == 1  # the uint8 MaxPool
    assert m.verification["status"] == "passed" and m.verification["max_lsb"] <= 1
    assert m.verification["end_to_end"]["result"]["outputs"][0]["cosine"] > 0.99


def _residual_model(rng: np.random.Generator, relu: bool) -> onnx.ModelProto:
    """x -> Conv -> Relu -> a; Relu(Conv(a)) -> b; Add(a, b) (-> Relu) -> MaxPool (odd size,
    so the pool's window overhangs) -> GlobalAveragePool -> Flatten -> Gemm (float output): a
    residual connection of two quantized tensors, then a classifier. (The Relu on the branch
    keeps the sum a residual: Add(a, Conv(a)) would merge into one conv, merge_branches.)"""
    after = "r = Relu (s)" if relu else "r = Identity (s)"
    text = f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1,3,11,11] x) => (float[1,7] y) <
        float[6,3,3,3] w1 = {{{_vals(rng, 6, 3, 3, 3)}}}, float[6] b1 = {{{_vals(rng, 6)}}},
        float[6,6,3,3] w2 = {{{_vals(rng, 6, 6, 3, 3)}}}, float[6] b2 = {{{_vals(rng, 6)}}},
        float[7,6] f = {{{_vals(rng, 7, 6)}}}, float[7] fb = {{{_vals(rng, 7)}}}
    > {{
        c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        a = Relu (c1)
        c2 = Conv <pads = [1, 1, 1, 1]> (a, w2, b2)
        b = Relu (c2)
        s = Add (a, b)
        {after}
        mp = MaxPool <kernel_shape = [3, 3], strides = [2, 2], pads = [0, 0, 1, 1]> (r)
        p = GlobalAveragePool (mp)
        fl = Flatten (p)
        y = Gemm <transB = 1> (fl, f, fb)
    }}
    """
    model = onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text))
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "relax"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("quant", list(_QUANT_OPTS), ids=lambda q: q)
def test_residual_add_pool_and_float_gemm_match_onnxruntime(
    quant: str, relu: bool, kernels: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The quantized residual Add (bnfold's add kernel; else it stays float), the 8-bit max
    pool and the float-output Gemm (an integer matmul with a float epilogue): every quantized
    tensor within 1 LSB of onnxruntime layer by layer, and the float output equal to
    onnxruntime's up to float rounding."""
    from bnfold import runtime
    from bnfold.targets import int8 as int8_kernels

    if not kernels:
        for kernel in ("conv2d_int8", "max_pool2d_int8", "add_int8", "dense_int8_float"):
            monkeypatch.setattr(int8_kernels, kernel, lambda *a, **k: None)
    rng = np.random.default_rng(21 + relu)
    model = _residual_model(rng, relu)
    int8, _ = quantize(model, _calib(rng, model), **_QUANT_OPTS[quant])
    path = tmp_path / "m.int8.onnx"
    onnx.save(int8, str(path))
    m = lower.compile_model(path, "x86", tmp_path / "out", fold=False)
    info, v = m.compile["int8"], m.verification
    how = {g["op"]: g.get("how") for g in info["groups"]}
    assert how.get("add") == ("kernel" if kernels else None)  # else it stays float
    assert how["max_pool2d"] == ("kernel" if kernels else "relax")
    assert info["float_output_matmuls"] == 1
    assert v["status"] == "passed" and v["max_lsb"] <= 1, v
    # The Gemm: onnxruntime computes it in float on the dequantized values; fed the same
    # 8-bit input (a cut at the flattened tensor), the outputs agree to float rounding. A
    # wrong zero point or scale would be off by far more.
    art = runtime.load(tmp_path / "out")
    for feeds in _calib(rng, model, 3):
        ref = run_onnxruntime(int8, feeds)["y"]
        got = art.run(feeds)["y"]
        assert np.max(np.abs(got - ref)) <= 1e-3 * np.max(np.abs(ref)) + 1e-6, (got, ref)


def test_float_gemm_is_exact_on_the_same_input(tmp_path: Path) -> None:
    """The float-output Gemm alone (``x -> Q -> DQ -> Gemm(DQ(W)) + b``): bnfold's integer
    matmul against onnxruntime's float one on identical 8-bit inputs, to float32 rounding;
    and the comparison catches an integer matmul that misses the input's zero point."""
    from bnfold import runtime

    rng = np.random.default_rng(30)
    text = f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1,40] x) => (float[1,70] y) <
        float[70,40] f = {{{_vals(rng, 70, 40)}}}, float[70] fb = {{{_vals(rng, 70)}}}
    > {{
        y = Gemm <transB = 1> (x, f, fb)
    }}
    """
    model = onnx.parser.parse_model(text)
    calib = [{"x": rng.uniform(-1, 3, (1, 40)).astype(np.float32)} for _ in range(8)]
    int8, _ = quantize(model, calib, activation_type="uint8")
    path = tmp_path / "m.int8.onnx"
    onnx.save(int8, str(path))
    m = lower.compile_model(path, "x86", tmp_path / "out", fold=False, verify=False)
    assert m.compile["int8"]["float_output_matmuls"] == 1
    art = runtime.load(tmp_path / "out")
    q = next(n for n in int8.graph.node if n.op_type == "QuantizeLinear")
    zp = next(i for i in int8.graph.initializer if i.name == q.input[2])
    assert onnx.numpy_helper.to_array(zp).item() != 0  # the zero point matters here
    for feeds in calib:
        ref = run_onnxruntime(int8, feeds)["y"]
        got = art.run(feeds)["y"]
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.max(np.abs(ref)))


def test_layerwise_gate_catches_a_wrong_requantize(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 3% error in the requantize multiplier must fail the 1-LSB gate (exit code 1)."""
    real = fixed_point.requant_params

    def skewed(scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return real(np.asarray(scale) * 1.03)

    monkeypatch.setattr(fixed_point, "requant_params", skewed)
    rng = np.random.default_rng(3)
    model = _conv_model(rng)
    int8, _ = quantize(model, _calib(rng, model))
    path = tmp_path / "m.int8.onnx"
    onnx.save(int8, str(path))
    with pytest.raises(CheckFailed, match="quantization steps"):
        lower.compile_model(path, "x86", tmp_path / "out", fold=False)
    manifest = json.loads((tmp_path / "out" / lower.MANIFEST).read_text())
    assert manifest["verification"]["status"] == "failed"
    assert manifest["verification"]["max_lsb"] > 1


def test_float_fake_quant_when_integer_is_off(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    model = _conv_model(rng)
    int8, _ = quantize(model, _calib(rng, model))
    path = tmp_path / "m.int8.onnx"
    onnx.save(int8, str(path))
    m = lower.compile_model(path, "x86", tmp_path / "out", fold=False, integer=False,
                            rtol=0.05)  # fmt: skip
    assert m.compile["int8"] == {"integer": False, "why": "--no-integer"}
    assert m.verification["status"] == "passed"


@pytest.mark.parametrize("seed", range(4))
def test_requant_params_are_a_31_bit_fixed_point(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.uniform(np.log(1e-9), np.log(0.9), 64))
    mult, shift = fixed_point.requant_params(scale)
    assert np.all((mult >= 2**30) & (mult < 2**31)) and np.all(shift >= 1)
    approx = mult.astype(np.float64) * 2.0 ** (-shift.astype(np.float64))
    assert np.max(np.abs(approx / scale - 1)) < 2**-30
    acc = rng.integers(-(2**20), 2**20, (1, 64, 3, 3)).astype(np.int32)
    got = fixed_point.requantize_reference(acc, mult, shift, 3, (0, 255), "uint8")
    exact = np.clip(np.floor(acc * scale.reshape(1, -1, 1, 1) + 0.5) + 3, 0, 255)
    assert np.max(np.abs(got.astype(np.int64) - exact)) <= 1


def test_requant_params_edge_cases() -> None:
    mult, shift = fixed_point.requant_params(np.array([0.0, 1e-30, 0.5, 0.75]))
    assert list(mult[:2]) == [0, 0] and list(shift[:2]) == [1, 1]
    assert list(mult[2:]) == [2**30, 3 * 2**29] and list(shift[2:]) == [31, 31]
    with pytest.raises(ValueError, match="too large"):
        fixed_point.requant_params(np.array([2.0**31]))
    with pytest.raises(ValueError, match="finite"):
        fixed_point.requant_params(np.array([np.nan]))


def test_drop_implied_activations_is_exact() -> None:
    rng = np.random.default_rng(5)
    model = _conv_model(rng, act="Clip")
    int8, _ = quantize(model, _calib(rng, model))
    dropped, n = lower._drop_implied(int8)  # what compile runs on a QDQ model
    assert n >= 2  # the Relus after Conv 2 and MatMul, at least
    onnx.checker.check_model(dropped)
    before = [n.op_type for n in int8.graph.node].count("Relu")
    assert [n.op_type for n in dropped.graph.node].count("Relu") < before
    exposed_a = lower_int8.with_quantized_outputs(int8)
    exposed_b = lower_int8.with_quantized_outputs(dropped)
    for feeds in _calib(rng, model, 4):
        feeds = {"x": feeds["x"] * 3}  # beyond the calibrated range: saturation matters
        a, b = run_onnxruntime(exposed_a, feeds), run_onnxruntime(exposed_b, feeds)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_compile_int8_cli(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    model = _conv_model(rng)
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.concatenate([f["x"] for f in _calib(rng, model, 16)]))
    out = tmp_path / "out"
    res = CliRunner().invoke(
        cli, ["compile", str(src), "--int8", "--calib", str(calib), "-o", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "in integer arithmetic" in res.output and "PASS: every quantized tensor" in res.output
    for name in ("model.int8.onnx", "quant_report.json", "sqnr.png", "model.so"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / lower.MANIFEST).read_text())
    assert _integer_ops(manifest["compile"]["int8"])["matmul"] == 1
    assert manifest["source"]["path"].endswith("model.int8.onnx")
    assert not list(out.glob(".layerwise-*"))  # no scratch folder left behind
    # The layer-by-layer build that verification ran (and deploy runs on the device).
    lw = json.loads((out / lower.LAYERWISE / lower.MANIFEST).read_text())
    assert len(lw["outputs"]) == manifest["verification"]["tensors"]
    assert manifest["compile"]["int8"]["layerwise"] == lower.LAYERWISE


def test_compile_calib_without_int8_is_a_usage_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["compile", "m.onnx", "--calib", "c.npz", "-o", str(tmp_path)])
    assert res.exit_code == 2 and "--int8" in res.output


def test_tune_sees_the_functions_compile_builds(tmp_path: Path) -> None:
    """``bnfold tune`` imports a QDQ model through compile's own front half (one read of the
    file, the int8 rewrite included): the module it tunes calls bnfold's integer kernels, which
    it leaves alone (already scheduled), not TVM's float fake-quantization."""
    import tvm

    from bnfold.lower import tune
    from bnfold.targets import get

    rng = np.random.default_rng(7)
    model = _conv_model(rng)
    int8, _ = quantize(model, _calib(rng, model), **_QUANT_OPTS["per-channel-uint8"])
    path = tmp_path / "m.int8.onnx"
    onnx.save(int8, str(path))
    mod, _ = tune.fused_module(path, get("x86").resolved())
    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    kernels = [n for n, f in funcs.items() if f.attrs and f.attrs.get("tirx.is_scheduled", False)]
    assert any(n.startswith("int8_conv2d") for n in kernels), sorted(funcs)
    manifest = lower.compile_model(path, "x86", tmp_path / "out", fold=False, verify=False)
    assert _integer_ops(manifest.compile["int8"])["conv2d"] == 2
