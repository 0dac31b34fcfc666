"""``bnfold verify --per-layer``: the folded model's tensors are paired with the original tensors
they compute (by the tensor map bnfold fold writes), an exact fold passes at every layer, and a
corrupted weight is named as the first layer past the gate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import bnfold
from bnfold import check
from bnfold import ir as bir
from bnfold.cli import cli
from bnfold.testing import bn_stats, count_ops, parse

RNG = np.random.default_rng(3)


def stats(c: int, prefix: str) -> dict[str, np.ndarray]:
    return bn_stats(RNG, c, prefix)


def bn(x: str, y: str, p: str) -> str:
    return f"{y} = BatchNormalization ({x}, {p}_s, {p}_b, {p}_m, {p}_v)"


def w(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def model() -> onnx.ModelProto:
    """Every rewrite that renames or redefines a tensor: Conv->BN (backward), Concat->BN
    (through), a RepVGG sum (merge), a lone BN (Mul+Add), MatMul->BN (a new bias Add)."""
    text = f"""<ir_version: 8, opset_import: ["" : 13]>
    g (float[1,3,8,8] x) => (float[1,5] y) {{
        c1 = Conv <pads=[1,1,1,1]> (x, W1)
        {bn("c1", "n1", "b1")}
        r1 = Relu (n1)
        k3 = Conv <pads=[1,1,1,1]> (r1, W3)
        {bn("k3", "n3", "b3")}
        k1 = Conv (r1, Wk1)
        {bn("k1", "nk1", "bk1")}
        {bn("r1", "ni", "bi")}
        s1 = Add (n3, nk1)
        s = Add (s1, ni)
        r2 = Relu (s)
        a = Conv (r2, Wa)
        b = Conv (r2, Wb, Bb)
        cat = Concat <axis=1> (a, b)
        {bn("cat", "nc", "bc")}
        r3 = Relu (nc)
        p = GlobalAveragePool (r3)
        f = Flatten (p)
        m = MatMul (f, Wm)
        {bn("m", "y", "bm")}
    }}"""
    return parse(
        text, W1=w(4, 3, 3, 3), W3=w(4, 4, 3, 3), Wk1=w(4, 4, 1, 1), Wa=w(2, 4, 1, 1),
        Wb=w(3, 4, 1, 1), Bb=w(3), Wm=w(5, 5), **stats(4, "b1"), **stats(4, "b3"),
        **stats(4, "bk1"), **stats(4, "bi"), **stats(5, "bc"), **stats(5, "bm"),
    )  # fmt: skip


def folded_pair(tmp_path: Path) -> tuple[Path, Path, onnx.ModelProto]:
    original = tmp_path / "m.onnx"
    onnx.save(model(), original)
    folded, report = bnfold.fold(original)
    assert report.counts()["folded_backward"] == 5 and len(report.merges) == 1
    proto = bir.to_proto(folded)
    out = tmp_path / "m.folded.onnx"
    onnx.save(proto, out)
    return original, out, proto


def test_exact_fold_passes_at_every_layer(tmp_path: Path) -> None:
    original, folded, _ = folded_pair(tmp_path)
    result = check.verify(original, folded, random=2, per_layer=True)
    layers = {la.candidate: la.reference for la in result.layers.layers}
    # Folded conv outputs stand for the BNs' outputs, the merged conv for the sum, the Concat
    # for the BN after it; convs that took a slice of that BN compute nothing the original has.
    assert layers["c1"] == "n1" and layers["cat"] == "nc" and layers["k3"] == "s"
    assert "a" not in layers and "b" not in layers
    assert {"r1", "r2", "r3", "f"} <= set(layers)
    assert result.passed and result.layers.first_failure is None, result.table()


def test_corrupted_weight_is_named_first(tmp_path: Path) -> None:
    original, _, proto = folded_pair(tmp_path)
    merged = next(n for n in proto.graph.node if n.output[0] == "k3")
    init = next(i for i in proto.graph.initializer if i.name == merged.input[1])
    arr = onnx.numpy_helper.to_array(init).copy()
    arr[1, 2, 1, 1] += 0.5  # one weight of the merged RepVGG conv
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, bad)
    result = check.verify(original, bad, per_layer=True)
    first = result.layers.first_failure
    assert not result.passed and first is not None and first.candidate == "k3"
    names = [la.candidate for la in result.layers.layers]
    assert all(la.metrics.passed for la in result.layers.layers[: names.index("k3")])
    png = tmp_path / "layers.png"
    args = ["verify", "--per-layer", "--plot", str(png), str(original), str(bad)]
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == 1 and "first past the gate: k3 (Conv)" in out.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def residual_cnn() -> onnx.ModelProto:
    """Conv-BN-Relu -> depthwise Conv-BN-Relu -> Conv-BN (+ residual) -> GAP -> Gemm: quantize
    folds every BN and equalizes the c2 -> c3 pair (c1's output also feeds the residual)."""
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,8,8] x) => (float[1,10] p) {{
        c1 = Conv <pads=[1,1,1,1]> (x, W1)
        {bn("c1", "b1", "n1")}
        r1 = Relu (b1)
        c2 = Conv <group=8, pads=[1,1,1,1]> (r1, W2)
        {bn("c2", "b2", "n2")}
        r2 = Relu (b2)
        c3 = Conv (r2, W3)
        {bn("c3", "b3", "n3")}
        s = Add (b3, r1)
        gp = GlobalAveragePool (s)
        f = Flatten (gp)
        p = Gemm <transB=1> (f, Wf, Bf)
    }}"""
    return parse(text, W1=w(8, 3, 3, 3), W2=w(8, 1, 3, 3), W3=w(8, 8, 1, 1), Wf=w(10, 8),
                 Bf=w(10), **stats(8, "n1"), **stats(8, "n2"), **stats(8, "n3"))  # fmt: skip


def quantized_pair(tmp_path: Path) -> tuple[Path, onnx.ModelProto, Path]:
    """The float model, its QDQ model, and the calibration samples as an .npz: compared on
    them, no activation leaves its calibrated range (a random input may, and is then clipped,
    which no per-layer gate should be tuned to)."""
    from bnfold.quant.quantize import quantize

    original = tmp_path / "m.onnx"
    onnx.save(residual_cnn(), original)
    x = np.random.default_rng(5).standard_normal((16, 1, 3, 8, 8)).astype(np.float32)
    qdq, _ = quantize(original, [{"x": s} for s in x])
    np.savez(tmp_path / "calib.npz", x=x[:, 0])
    return original, qdq, tmp_path / "calib.npz"


# An int8 gate: each layer within 5% of its largest float value (int8 steps are 1/255 of the
# range, and errors add up along the layers).
GATE = {"atol": 0.0, "rtol": 0.05}


def test_qdq_model_against_its_float_original(tmp_path: Path) -> None:
    """The QDQ model from quantize keeps the tensor map of its fold: folded convs stand for the
    BNs' outputs; the equalized conv and activation (scaled per channel) are left out; Q/DQ
    outputs have no float counterpart. At an int8 gate every layer passes."""
    original, qdq, calib = quantized_pair(tmp_path)
    assert count_ops(qdq, "QuantizeLinear") > 0 and count_ops(qdq, "BatchNormalization") == 0
    cand = tmp_path / "m.int8.onnx"
    onnx.save(qdq, cand)
    result = check.verify(original, cand, inputs=calib, per_layer=True, **GATE)
    layers = {la.candidate: la.reference for la in result.layers.layers}
    assert layers == {"c1": "b1", "r1": "r1", "c3": "b3", "s": "s", "gp": "gp", "f": "f",
                      "p": "p"}, layers  # fmt: skip
    assert result.passed and result.layers.first_failure is None, result.table()
    args = ["--inputs", calib, "--atol", "0", "--rtol", "0.05", "--per-layer", original, cand]
    out = CliRunner().invoke(cli, ["verify", *map(str, args)])
    assert out.exit_code == 0, out.output
    assert "c1=b1" in out.output and "7 layers compared; all within the gate" in out.output


@pytest.mark.parametrize(("weight", "layer"), [("W1", "c1"), ("W3", "c3")])
def test_corrupted_int8_weight_is_named_first(tmp_path: Path, weight: str, layer: str) -> None:
    """One int8 weight of a QDQ model pushed to the far end of its range: verify --per-layer
    names that conv first, every layer before it within the gate."""
    original, qdq, calib = quantized_pair(tmp_path)
    init = next(i for i in qdq.graph.initializer if i.name == f"{weight}_quantized")
    q = onnx.numpy_helper.to_array(init).copy()
    assert q.dtype == np.int8
    i = np.unravel_index(np.argmin(np.abs(q.astype(np.int32))), q.shape)
    q[i] = 127  # a weight near 0 becomes that channel's largest
    init.CopyFrom(onnx.numpy_helper.from_array(q, init.name))
    bad = tmp_path / "bad.int8.onnx"
    onnx.save(qdq, bad)
    result = check.verify(original, bad, inputs=calib, per_layer=True, **GATE)
    names = [la.candidate for la in result.layers.layers]
    first = result.layers.first_failure
    assert first is not None and first.candidate == layer, result.table()
    assert all(la.metrics.passed for la in result.layers.layers[: names.index(layer)])
    args = ["--inputs", calib, "--atol", "0", "--rtol", "0.05", "--per-layer", original, bad]
    out = CliRunner().invoke(cli, ["verify", *map(str, args)])
    # The layers are a diagnosis, not the gate: the exit code is the outputs' verdict (one
    # wrong weight in c1 is diluted below the gate by the end of this small network).
    assert out.exit_code == (0 if result.passed else 1), out.output
    assert f"first past the gate: {layer} (Conv)" in out.output, out.output


@pytest.mark.parametrize("saved", ["{not json", "[1, 2]", '{"c1": 3, "k3": "s"}'])
def test_malformed_tensor_map_pairs_by_name(tmp_path: Path, saved: str) -> None:
    """A hand-edited bnfold.tensor_map is no crash: bad entries drop, names pair as they are."""
    original, _, proto = folded_pair(tmp_path)
    next(p for p in proto.metadata_props if p.key == "bnfold.tensor_map").value = saved
    edited = tmp_path / "edited.onnx"
    onnx.save(proto, edited)
    out = CliRunner().invoke(cli, ["verify", "--per-layer", str(original), str(edited)])
    assert out.exit_code == 0 and "layers compared" in out.output, out.output
    assert ("k3=s" in out.output) == ("k3" in saved)
