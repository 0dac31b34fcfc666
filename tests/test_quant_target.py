"""``--target-agreement`` / ``--target-cosine`` (issue 14): keep the most damaged layers in
float until the held-out target is met, and say which were kept.

Top-1 agreement is the argmax over the class axis of the first output that has one: ``(N, C)``
per sample, ``(N, T, C)`` per sample and step, ``(N, C, H, W)`` per sample and pixel. A model
whose outputs have no class axis (a single-channel heat map) is rejected with one line before
anything is quantized. The figures are checked against onnxruntime on the held-out file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from bnfold.quant.report import class_axis
from bnfold.testing import parse
from tests.test_int8_gate import run_cli

# Head after the two convs: a classifier, a per-pixel class map, a one-channel heat map.
HEADS = {
    "logits": (
        "float[N,10] y",
        """gp = GlobalAveragePool (c2)
        f = Flatten (gp)
        y = Gemm <transB=1> (f, Wf, Bf)""",
    ),
    "map": ("float[N,4,8,8] y", "y = Conv (c2, Wf, Bf)"),
    "heat": ("float[N,1,8,8] y", "y = Conv (c2, Wf, Bf)"),
}
HEAD_WEIGHTS = {"logits": (10, 8), "map": (4, 8, 1, 1), "heat": (1, 8, 1, 1)}


def _model(head: str, starved: bool = True) -> onnx.ModelProto:
    """Conv -> Conv -> head. ``starved``: channel 0 of the first conv is a constant 1e4 that
    the second conv ignores; it fills that activation's int8 range, so the channels that
    matter quantize to 0 and int8 is garbage until that layer stays float."""
    rng = np.random.default_rng(0)
    out, body = HEADS[head]
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3,8,8] x) => ({out}) {{
        c1 = Conv <pads=[1,1,1,1]> (x, W1, B1)
        c2 = Conv (c1, W2, B2)
        {body}
    }}"""
    w1, b1, w2 = (
        rng.normal(0, 0.3, (8, 3, 3, 3)),
        rng.normal(0, 0.3, 8),
        rng.normal(0, 0.3, (8, 8, 1, 1)),
    )
    if starved:
        w1[0], b1[0], w2[:, 0] = 0.0, 1e4, 0.0
    wf = rng.normal(0, 1, HEAD_WEIGHTS[head])
    tensors = {"W1": w1, "B1": b1, "W2": w2, "B2": rng.normal(0, 0.3, 8), "Wf": wf,
               "Bf": np.zeros(wf.shape[0])}  # fmt: skip
    return parse(text, **{k: np.asarray(v, np.float32) for k, v in tensors.items()})


def _files(tmp_path: Path, head: str) -> tuple[Path, Path, Path]:
    """The model, 24 calibration samples, 24 other held-out samples."""
    model, calib, held = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "h.npz"
    onnx.save(_model(head), model)
    rng = np.random.default_rng(1)
    for path in (calib, held):  # per-sample channel offsets: the class varies with the sample
        x = rng.normal(0, 1, (24, 3, 8, 8)) + rng.normal(0, 2, (24, 3, 1, 1))
        np.savez(path, x=x.astype(np.float32))
    return model, calib, held


def _agreement(model: Path, int8: Path, held: Path) -> float:
    """Top-1 agreement over axis 1 (per sample or per pixel), computed here in onnxruntime."""
    import onnxruntime as ort

    x = np.load(held)["x"]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    runs = [ort.InferenceSession(str(m), opts, providers=["CPUExecutionProvider"]) for m in
            (model, int8)]  # fmt: skip
    a, b = (r.run(None, {"x": x})[0] for r in runs)
    return float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))


@pytest.mark.parametrize(
    ("shape", "axis"),
    [((5, 10), 1), ((5, 2), 1), ((5, 25, 97), 2), ((5, 4, 8, 8), 1), (("N", 4, 8, 8), 1),
     ((5, 4, 2, 8, 8), 1), ((5, 1), None), ((5, 25, 1), None), ((5, 1, 8, 8), None), ((5,), None)],
)  # fmt: skip
def test_class_axis(shape: tuple, axis: int | None) -> None:
    assert class_axis(shape) == axis


@pytest.mark.parametrize("head", ["logits", "map"])
def test_target_agreement_is_met_and_the_float_layers_reported(
    head: str, tmp_path: Path, capsys
) -> None:
    model, calib, held = _files(tmp_path, head)
    out = tmp_path / "q"
    base = ("quantize", str(model), "--calib", str(calib), "--eval", str(held), "--min-cosine", "0")
    # All in int8: far from the target (the starved layer).
    code, _, err = run_cli(capsys, *base, "-o", str(tmp_path / "plain"))
    assert code == 0, err
    plain = json.loads((tmp_path / "plain" / "quant_report.json").read_text())
    assert plain["accuracy"]["top1"] < 0.9 and plain["target"] is None

    code, stdout, err = run_cli(capsys, *base, "-o", str(out), "--target-agreement", "0.95")
    assert code == 0, err
    report = json.loads((out / "quant_report.json").read_text())
    target = report["target"]
    assert target["agreement"] == 0.95 and "cosine" not in target
    assert target["met"] and report["accuracy"]["top1"] >= 0.95
    assert target["rounds"][0]["agreement"] == pytest.approx(plain["accuracy"]["top1"])
    # What was kept float is what the report's layer table says is float, and is named.
    assert target["float_nodes"]
    floats = {r["node"] for r in report["layers"] if r["status"] == "float"}
    assert set(target["float_nodes"]) <= floats
    assert 0 < target["float_mac_share"] <= 1
    line = next(s for s in stdout.splitlines() if s.startswith("target "))
    assert line.startswith(f"target top-1 agreement 0.95 met with {len(target['float_nodes'])}")
    assert all(n in line for n in target["float_nodes"])
    # The figure is the model's: onnxruntime on the held-out file agrees.
    assert _agreement(model, out / "model.int8.onnx", held) == pytest.approx(
        report["accuracy"]["top1"]
    )


def test_both_targets_must_be_met(tmp_path: Path, capsys) -> None:
    model, calib, held = _files(tmp_path, "logits")
    out = tmp_path / "q"
    code, stdout, err = run_cli(capsys, "quantize", str(model), "--calib", str(calib), "--eval",
                                str(held), "-o", str(out), "--target-agreement", "0.9",
                                "--target-cosine", "0.999")  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "quant_report.json").read_text())
    t = report["target"]
    assert t["met"] == (report["accuracy"]["top1"] >= 0.9 and report["accuracy"]["cosine"] >= 0.999)
    assert t["met"], t["rounds"]
    assert "target cosine 0.999, top-1 agreement 0.9 met" in stdout


def test_target_agreement_rejects_a_heat_map(tmp_path: Path, capsys) -> None:
    """(N, 1, H, W) has no class to agree on: one line, exit 2, before quantizing."""
    model, calib, _ = _files(tmp_path, "heat")
    out = tmp_path / "q"
    code, _, err = run_cli(capsys, "quantize", str(model), "--calib", str(calib), "-o", str(out),
                           "--target-agreement", "0.9")  # fmt: skip
    assert code == 2, err
    assert err.strip().splitlines() == [err.strip()]
    assert "--target-agreement needs an output with a class axis" in err
    assert "y (?, 1, 8, 8)" in err and "use --target-cosine" in err
    assert not (out / "model.int8.onnx").exists()
    # The cosine target works on it.
    code, _, err = run_cli(capsys, "quantize", str(model), "--calib", str(calib), "-o", str(out),
                           "--target-cosine", "0.99")  # fmt: skip
    assert code == 0, err


def test_compile_int8_takes_the_target(tmp_path: Path, capsys) -> None:
    pytest.importorskip("tvm")
    model, calib, held = _files(tmp_path, "logits")
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "compile", str(model), "--int8", "--calib", str(calib),
                                "--eval", str(held), "--target-agreement", "0.95", "-o",
                                str(out))  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "quant_report.json").read_text())
    assert report["target"]["met"] and report["target"]["float_nodes"]
    assert "target top-1 agreement 0.95 met" in stdout
    assert (out / "model.int8.onnx").is_file() and (out / "model.so").is_file()


@pytest.mark.parametrize(
    ("nodes", "share"),
    [([], 0.0), (["Conv:c1"], 13824), (["Conv:c2"], 4096), (["Conv:y"], 80),
     (["Conv:c1", "Conv:c2", "Conv:y"], 1.0)],
)  # fmt: skip
def test_mac_share(nodes: list[str], share: float) -> None:
    """Conv 3->8 3x3 on 8x8: 8*8*8*27 MACs; Conv 8->8 1x1: 8*8*8*8; Gemm 8->10: 80."""
    from bnfold.quant.target import mac_share

    model = _model("logits", starved=False)
    for i, node in enumerate(model.graph.node):
        node.name = ["Conv:c1", "Conv:c2", "", "", "Conv:y"][i]
    total = 13824 + 4096 + 80
    assert mac_share(model, nodes) == pytest.approx(share / total if share > 1 else share)


def test_mac_share_skips_unknown_ranks() -> None:
    """A MatMul whose operand's rank shape inference cannot know (reshaped to a computed
    shape, as attention blocks do) is left out, not a crash."""
    from bnfold.quant.target import mac_share

    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,8] x, int64[K] s) => (float[N,4] y) {
        y = MatMul (x, W)
        r = Reshape (x, s)
        z = MatMul (x, r)
    }"""
    model = parse(text, W=np.ones((8, 4), np.float32))
    model.graph.node[0].name, model.graph.node[2].name = "a", "b"
    assert mac_share(model, ["a"]) == 1.0 and mac_share(model, ["b"]) == 0.0


def _two_paths(starved: str) -> onnx.ModelProto:
    """Conv-Relu r1 -> Conv-Relu r2 -> Conv c3, plus a side branch Conv-Relu rd -> Conv dd
    (weights 1e-4) added to c3, then a classifier. ``starved`` (r1 or r2) and the side branch's
    ``rd`` each carry a constant 1e4 channel that the next conv ignores, so both quantize their
    useful channels to 0 (their SQNR stays high: the constant channel is most of the signal),
    but only ``starved`` matters to the output. The Relus keep the fold from merging convs."""
    rng = np.random.default_rng(0)
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3,8,8] x) => (float[N,10] y) {
        c1 = Conv <pads=[1,1,1,1]> (x, W1, B1)
        r1 = Relu (c1)
        c2 = Conv (r1, W2, B2)
        r2 = Relu (c2)
        c3 = Conv (r2, W3, B3)
        d = Conv (x, Wd, Bd)
        rd = Relu (d)
        dd = Conv (rd, Wdd, Bdd)
        s = Add (c3, dd)
        gp = GlobalAveragePool (s)
        f = Flatten (gp)
        y = Gemm <transB=1> (f, Wf, Bf)
    }"""
    t = {"W1": rng.normal(0, 0.3, (8, 3, 3, 3)), "W2": rng.normal(0, 0.3, (8, 8, 1, 1)),
         "W3": rng.normal(0, 0.3, (8, 8, 1, 1)), "Wd": rng.normal(0, 0.3, (8, 3, 1, 1)),
         "Wdd": rng.normal(0, 1e-4, (8, 8, 1, 1)), "Wf": rng.normal(0, 1, (10, 8)),
         **{b: rng.normal(0, 0.3, 8) for b in ("B1", "B2", "B3", "Bd", "Bdd")},
         "Bf": np.zeros(10)}  # fmt: skip
    following = {"r1": "W2", "r2": "W3", "rd": "Wdd"}
    for layer in (starved, "rd"):
        w, b = f"W{layer[1:]}", f"B{layer[1:]}"
        t[w][0], t[b][0], t[following[layer]][:, 0] = 0.0, 1e4, 0.0
    return parse(text, **{k: np.asarray(v, np.float32) for k, v in t.items()})


def _feeds(seed: int, n: int = 24) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, 3, 8, 8)) + rng.normal(0, 2, (n, 3, 1, 1))
    return [{"x": x[i : i + 1].astype(np.float32)} for i in range(n)]


@pytest.mark.parametrize("starved", ["r1", "r2"])
def test_sensitivity_ranks_the_layer_that_matters_first(starved: str, tmp_path: Path) -> None:
    """The ranking is measured at the output: the starved layer on the main path comes first,
    although its SQNR is higher than other tensors' (the noise it adds is downstream of it),
    and the side branch, as starved but scaled by 1e-4, comes nowhere near."""
    from bnfold.quant.quantize import quantize
    from bnfold.quant.report import evaluate
    from bnfold.quant.target import Probe, sensitivity

    path = tmp_path / "m.onnx"
    onnx.save(_two_paths(starved), path)
    cal = _feeds(1)
    int8, report = quantize(path, cal)
    acc = evaluate(path, int8, report, [{"x": np.concatenate([f["x"] for f in _feeds(2)])}])
    sqnr = {r["tensor"]: r["sqnr_db"] for r in acc.layers}
    assert acc.top1 < 0.9 and sqnr[starved] > min(sqnr.values()) + 10
    sens = sensitivity(Probe(path, cal, {"agreement": 0.95}), int8, report)
    assert max(sens, key=sens.get) == starved
    assert sens[starved] > 100 * max(abs(sens["rd"]), 1e-12)


@pytest.mark.parametrize("starved", ["r1", "r2"])
def test_target_keeps_only_the_layer_that_matters(starved: str, tmp_path: Path) -> None:
    """--target-agreement 0.95 takes the starved tensor out of int8 first (its producer and
    its reader stay float), and nothing of the side branch; the held-out agreement, recomputed
    in onnxruntime, meets it."""
    import onnxruntime as ort

    from bnfold.quant.quantize import quantize
    from bnfold.quant.report import evaluate
    from bnfold.quant.target import reach

    path = tmp_path / "m.onnx"
    onnx.save(_two_paths(starved), path)
    cal = _feeds(1)
    x = np.concatenate([f["x"] for f in _feeds(2, 40)])
    held = [{"x": x}]
    int8, report = quantize(path, cal)
    first = (int8, report, evaluate(path, int8, report, held))
    assert first[2].top1 < 0.9
    int8, report, acc = reach(path, cal, held, {"agreement": 0.95}, first)
    t = report.target
    assert t["met"] and t["float_tensors"][0] == starved, t["rounds"]
    assert not any("d" in n.split(":")[-1] for n in t["float_nodes"]), t["float_nodes"]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a, b = (ort.InferenceSession(m, opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            for m in (str(path), int8.SerializeToString()))  # fmt: skip
    assert float(np.mean(a.argmax(1) == b.argmax(1))) == pytest.approx(acc.top1)
    assert acc.top1 >= 0.95


def test_bypass_of_a_conv_that_bias_correction_gave_a_bias(tmp_path: Path) -> None:
    """A conv written without a bias gets one from bias correction; computing it as if kept
    float takes its float weight from the twin and keeps that bias, and runs."""
    from bnfold.quant.quantize import Runner, quantize
    from bnfold.quant.target import bypass

    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3,8,8] x) => (float[N,4,8,8] y) {
        c = Conv <pads=[1,1,1,1]> (x, W1)
        r = Relu (c)
        y = Conv (r, W2)
    }"""
    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(0, 0.3, (8, 3, 3, 3)), rng.normal(0, 0.3, (4, 8, 1, 1))
    path = tmp_path / "m.onnx"
    onnx.save(parse(text, W1=w1.astype(np.float32), W2=w2.astype(np.float32)), path)
    feeds = _feeds(1)
    int8, report = quantize(path, feeds)
    # Both convs now have the bias that bias correction added; the twin's have none.
    assert all(len(n.input) == 3 for n in int8.graph.node if n.op_type == "Conv")
    r = next(t for t in report.tensors if t["name"] == "r")
    out = bypass(int8, report.float_model, [r])
    x = np.concatenate([f["x"] for f in feeds])
    ref = Runner(onnx.load(path), ["y"])({"x": x})["y"]
    errs = [np.abs(Runner(m, ["y"])({"x": x})["y"] - ref).max() for m in (int8, out)]
    assert errs[1] < errs[0]
