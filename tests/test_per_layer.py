"""``bnfold verify --per-layer``: the folded model's tensors are paired with the original tensors
they compute (by the tensor map bnfold fold writes), an exact fold passes at every layer, and a
corrupted weight is named as the first layer past the gate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner

import bnfold
from bnfold import check
from bnfold import ir as bir
from bnfold.cli import cli
from bnfold.testing import bn_stats, parse

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
