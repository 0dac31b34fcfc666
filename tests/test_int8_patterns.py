"""int8 on graphs written the way other tools write them (issue 14).

onnxruntime's basic optimizations hand over a model with BatchNormalization already folded into
the convs (so a channel that BN switched off, gamma ~ 0, is a conv channel with ~0 weights and a
non-zero bias: a constant), ReLU6 as ``Clip`` with its bounds as shared initializers; other
exporters write ReLU6 as ``Min``/``Max`` and ReLU as ``Max(x, 0)``. Each test quantizes such a
model with the defaults and asserts the int8 model stays close to fp32 on held-out samples.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from bnfold.quant.quantize import quantize
from bnfold.quant.report import evaluate
from bnfold.testing import parse

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'

# One activation, written as different tools write it: ``{x}`` in, ``{y}`` out.
ACTIVATIONS = {
    "clip-inputs": "{y} = Clip ({x}, zero, six)",  # bounds shared by every Clip (ORT)
    "relu": "{y} = Relu ({x})",
    "max0": "{y} = Max ({x}, zero)",
    "max-min": "{y}_m = Max ({x}, zero)\n        {y} = Min ({y}_m, six)",
    "min-max-const-first": "{y}_m = Min (six, {x})\n        {y} = Max (zero, {y}_m)",
}


def folded_cnn(act: str, dead: bool, seed: int = 0) -> onnx.ModelProto:
    """Conv -> act -> depthwise Conv -> act -> 1x1 Conv -> GAP -> Gemm, BN already folded.

    With ``dead``, channel 2 of the first conv is switched off (weights 1e-8 of the others,
    bias 2): what folding a BN with gamma ~ 0 leaves.
    """
    rng = np.random.default_rng(seed)
    a1 = ACTIVATIONS[act].format(x="c1", y="r1")
    a2 = ACTIVATIONS[act].format(x="c2", y="r2")
    text = f"""{HEADER}
    g (float[N,3,16,16] x) => (float[N,10] logits) {{
        c1 = Conv <pads=[1,1,1,1]> (x, W1, B1)
        {a1}
        c2 = Conv <group=8, pads=[1,1,1,1]> (r1, W2, B2)
        {a2}
        c3 = Conv (r2, W3, B3)
        gp = GlobalAveragePool (c3)
        f = Flatten (gp)
        logits = Gemm <transB=1> (f, Wf, Bf)
    }}"""
    w1 = rng.standard_normal((8, 3, 3, 3)) * 0.3
    b1 = rng.normal(0.5, 0.5, 8)
    if dead:
        w1[2] *= 1e-8
        b1[2] = 2.0
    tensors = {
        "W1": w1,
        "B1": b1,
        # depthwise channel ranges over 2.5 decades: what CLE is for
        "W2": rng.standard_normal((8, 1, 3, 3)) * 10.0 ** rng.uniform(-1.5, 1, (8, 1, 1, 1)),
        "B2": rng.normal(0.5, 0.5, 8),
        "W3": rng.standard_normal((16, 8, 1, 1)) * 0.3,
        "B3": rng.normal(0, 0.3, 16),
        "Wf": rng.standard_normal((10, 16)),
        "Bf": rng.standard_normal(10),
        "zero": np.array(0.0),
        "six": np.array(6.0),
    }
    return parse(text, **{k: np.asarray(v, np.float32) for k, v in tensors.items()})


def _samples(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_dead_channel_does_not_collapse_equalized_activations(act: str) -> None:
    """A switched-off channel (~0 weights, bias 2) in an equalized pair: CLE must leave it
    alone. Equalizing it gave it ``s`` up to 1e6 (its constant then filled the activation's
    range), or, under a Clip, shrank every live channel below it; either way the live channels
    quantized to 0 (top-1 agreement 0 on MobileNetV2 so treated)."""
    model = folded_cnn(act, dead=True)
    int8, report = quantize(model, _samples(32, 1))
    assert report.equalization, "the pair was not equalized: the test tests nothing"
    acc = evaluate(model, int8, report, _samples(16, 2))
    assert acc.cosine > 0.99, acc.table()
    assert min(r["sqnr_db"] for r in acc.layers) > 15.0, acc.table()


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_every_spelling_of_an_activation_is_fused(act: str) -> None:
    """Whatever the operand order, a bounded activation right after an int8 conv is fused:
    the conv's pre-activation output is never quantized (it would spend the int8 grid on
    values the activation throws away), only the activation's output."""
    model = folded_cnn(act, dead=False)
    int8, report = quantize(model, _samples(32, 1), cle=False)
    acts = [r for r in report.layers if r["op"] in ("Relu", "Clip", "Min", "Max")]
    assert acts and all(r["status"] == "fused" for r in acts), acts
    quantized = {t["name"] for t in report.tensors}
    assert not {"c1", "c2"} & quantized and {"r1", "r2"} <= quantized
    acc = evaluate(model, int8, report, _samples(16, 2))
    assert acc.cosine > 0.99, acc.table()


def test_paddle_conv_bias_reshaped_constant() -> None:
    """Paddle exports a conv's bias as ``Reshape(B, shape) -> Add`` after a bias-free conv
    (PP-OCR's SE blocks): the Reshape reads only a constant, so it stays float (no calibrator
    gives an initializer a range; quantizing it failed with "the calibrator gave no range")
    and the Add still runs in int8 with the reshaped bias quantized as its second input."""
    rng = np.random.default_rng(0)
    text = f"""{HEADER}
    g (float[N,3,16,16] x) => (float[N,10] logits) {{
        c = Conv <pads=[1,1,1,1]> (x, W)
        b = Reshape (Bc, shape)
        cb = Add (c, b)
        r = Relu (cb)
        gp = GlobalAveragePool (r)
        f = Flatten (gp)
        logits = Gemm <transB=1> (f, Wf, Bf)
    }}"""
    tensors = {"W": rng.normal(0, 0.3, (8, 3, 3, 3)), "Bc": rng.normal(0.5, 0.3, 8),
               "Wf": rng.normal(0, 1, (10, 8)), "Bf": np.zeros(10)}  # fmt: skip
    arrays = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    model = parse(text, shape=np.array([1, 8, 1, 1], np.int64), **arrays)
    int8, report = quantize(model, _samples(32, 1))
    status = {r["op"]: (r["status"], r.get("reason")) for r in report.layers}
    assert status["Reshape"] == ("float", "reads only constants")
    assert status["Add"][0] == "int8" and status["Conv"][0] == "int8"
    assert "Bc" not in {t["name"] for t in report.tensors}
    acc = evaluate(model, int8, report, _samples(16, 2))
    assert acc.cosine > 0.99, acc.table()
