"""Numerically adversarial BatchNormalization: each case is folded exactly or declined with a
reason, and bnfold never puts a NaN/Inf into the output model that the input did not have.

Each case sets BN statistics or epsilon (one channel, or all) to something hostile and runs
``bnfold fold`` on two models: ``Conv -> BN -> Relu`` (a BN that folds backward into the Conv
when it can) and a lone ``BN`` on a graph input (it becomes ``Mul + Add`` when it can). The
expected outcome of each case is in ``CASES``; docs/hardening.md has the same table.

"folded exactly" means the fold happened and ``bnfold verify`` (onnxruntime, optimizations off)
passes at the default gate (``1e-6 + 1e-5 x max|ref|``; float16 ``1e-3 + 4e-3 x max|ref|``).
"declined" means the BN is kept as it is, and the report gives the reason. A case whose original
model itself computes NaN/Inf is FAIL in ``verify`` (exit 1), whatever the candidate computes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

import bnfold
import bnfold.ir
from bnfold import check
from bnfold.cli import main
from bnfold.testing import parse

NAN, INF = float("nan"), float("inf")
F32_DENORMAL = 1e-45
F16_DENORMAL = 6e-8


@dataclasses.dataclass(frozen=True)
class Case:
    """BN parameters to override, what ``fold`` must do, and whether the original is finite."""

    overrides: dict[str, float | list[float]]
    epsilon: float = 1e-5
    dtype: str = "float"
    backward: str = "folded"  # conv -> BN: "folded", "affine" (declined, Mul+Add) or "kept"
    lone: str = "affine"  # lone BN: "affine" or "kept"
    reason: str = ""  # in the report's reason when the hostile value stopped the fold


KEPT = dict(backward="kept", lone="kept")
CASES: dict[str, Case] = {
    "var=0, eps=0 (one channel)": Case(
        {"var": [0.0, 1.0, 1.0, 1.0]}, 0.0, reason="var + epsilon <= 0", **KEPT
    ),
    "var=0, eps=1e-5 (all channels)": Case({"var": 0.0}),
    "var<0, var+eps<0": Case({"var": [1.0, -1.0, 1.0, 1.0]}, reason="var + epsilon <= 0", **KEPT),
    "var<0, var+eps>0": Case({"var": [1.0, -1e-6, 1.0, 1.0]}, 1e-5),
    "eps<0, var+eps<=0": Case({"var": 0.5}, -0.5, reason="var + epsilon <= 0", **KEPT),
    "NaN gamma": Case({"gamma": [1.0, NAN, 1.0, 1.0]}, reason="not finite", **KEPT),
    "NaN beta": Case({"beta": [NAN, 0.0, 0.0, 0.0]}, reason="not finite", **KEPT),
    "NaN mean": Case({"mean": NAN}, reason="not finite", **KEPT),
    "NaN var": Case({"var": [1.0, 1.0, 1.0, NAN]}, reason="not finite", **KEPT),
    "NaN epsilon": Case({}, NAN, reason="not finite", **KEPT),
    "+Inf gamma": Case({"gamma": [INF, 1.0, 1.0, 1.0]}, reason="not finite", **KEPT),
    "-Inf beta": Case({"beta": [0.0, -INF, 0.0, 0.0]}, reason="not finite", **KEPT),
    "+Inf mean": Case({"mean": [0.0, 0.0, INF, 0.0]}, reason="not finite", **KEPT),
    # s = gamma / sqrt(inf) = 0 is the limit, but the original computes (x - mean) * 0 = NaN
    # only where x is infinite; bnfold refuses rather than guess.
    "+Inf var": Case({"var": [1.0, INF, 1.0, 1.0]}, reason="not finite", **KEPT),
    "+Inf epsilon": Case({}, INF, reason="not finite", **KEPT),
    "gamma=0": Case({"gamma": 0.0}),
    "gamma=-0.0": Case({"gamma": -0.0}),
    "huge var (1e38)": Case({"var": 1e38}),
    "denormal var, eps=0": Case({"var": F32_DENORMAL}, 0.0),
    "denormal gamma": Case({"gamma": F32_DENORMAL}),
    "denormal mean and beta": Case({"mean": F32_DENORMAL, "beta": -F32_DENORMAL}),
    # s = 3e39: not a float32 at all.
    "float32 scale overflow (gamma=3e38, var=0.01)": Case(
        {"gamma": 3e38, "var": 0.01}, reason="overflow float32", **KEPT
    ),
    # s = 1e35 is a float32, but a weight that large leaves no room for the Conv's sum.
    "float32 scale near max (gamma=1e35)": Case(
        {"gamma": 1e35, "var": 1.0},
        reason="within 2**16 of the float32 maximum",
        backward="kept",
        lone="kept",
    ),
    # float16: s = 6e4 fits, s * W does not (|W| up to ~2): backward declined, Mul+Add fits.
    "float16 folded weight overflow (gamma=6e4)": Case(
        {"gamma": 6e4, "var": 1.0}, 0.0, "float16", backward="affine", reason="overflow float16"
    ),
    # float16: s = 1e4 / sqrt(1e-6) = 1e7 fits nowhere: kept.
    "float16 scale overflow (var=1e-6, eps=0)": Case(
        {"gamma": 1e4, "var": 1e-6},
        0.0,
        "float16",
        backward="kept",
        lone="kept",
        reason="overflow float16",
    ),
    "float16 denormal var, eps=0": Case({"gamma": 0.5, "var": F16_DENORMAL}, 0.0, "float16"),
    "float16 denormal gamma": Case({"gamma": F16_DENORMAL}, 1e-3, "float16"),
}
NP = {"float": np.float32, "float16": np.float16}


def _params(case: Case) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    npdt = NP[case.dtype]
    params = {
        "gamma": rng.uniform(0.5, 2.0, 4),
        "beta": rng.standard_normal(4),
        "mean": rng.standard_normal(4) * 0.1,
        "var": rng.uniform(0.5, 2.0, 4),
    }
    with np.errstate(over="ignore"):
        for name, value in case.overrides.items():
            params[name] = np.broadcast_to(np.asarray(value, np.float64), (4,)).copy()
        return {k: v.astype(npdt) for k, v in params.items()}


def _model(case: Case, topology: str) -> onnx.ModelProto:
    dt = case.dtype
    eps = repr(case.epsilon) if math.isfinite(case.epsilon) else None
    attrs = f"<epsilon={eps}>" if eps is not None else ""
    bn = f"BatchNormalization{attrs} (c, gamma, beta, mean, var)"
    tensors = _params(case)
    if topology == "conv-bn":
        rng = np.random.default_rng(1)
        tensors["W"] = rng.standard_normal((4, 3, 3, 3)).astype(NP[dt])
        body = f"c = Conv <pads=[1,1,1,1]> (x, W)\n n = {bn}\n y = Relu (n)"
        sig = f"({dt}[1,3,6,6] x) => ({dt}[1,4,6,6] y)"
    else:
        body = f"c = Identity (x)\n y = {bn}"
        sig = f"({dt}[2,4,5,5] x) => ({dt}[2,4,5,5] y)"
    model = parse(f'<ir_version: 8, opset_import: ["" : 15]>\ng {sig} {{\n {body}\n}}', **tensors)
    if eps is None:  # the parser has no spelling for NaN/Inf: set the attribute directly
        node = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
        node.attribute.append(onnx.helper.make_attribute("epsilon", case.epsilon))
    return model


def _nonfinite(model: onnx.ModelProto) -> int:
    return sum(
        int(np.count_nonzero(~np.isfinite(onnx.numpy_helper.to_array(t))))
        for t in model.graph.initializer
    )


def _fold(model: onnx.ModelProto, tmp_path: Path, capfd: pytest.CaptureFixture[str]):
    src, out, rep = tmp_path / "m.onnx", tmp_path / "f.onnx", tmp_path / "f.json"
    onnx.save(model, src)
    capfd.readouterr()
    try:
        main(["fold", str(src), "-o", str(out), "--report", str(rep)])
        code = 0
    except SystemExit as e:
        code = e.code
    err = capfd.readouterr().err
    assert code == 0, err
    assert err == "", err
    (record,) = json.loads(rep.read_text())["batchnorms"]
    return src, out, record


@pytest.mark.parametrize("topology", ["conv-bn", "lone-bn"])
@pytest.mark.parametrize("name", list(CASES))
def test_adversarial_bn(
    name: str, topology: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    case = CASES[name]
    model = _model(case, topology)
    src, out, record = _fold(model, tmp_path, capfd)
    expected = case.backward if topology == "conv-bn" else case.lone
    folded = onnx.load(out)
    onnx.checker.check_model(folded, full_check=True)
    bns = [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    if expected == "folded":
        assert record["action"] == "folded" and record["direction"] == "backward", record
    else:
        assert record["action"] == expected, record
    if expected == "kept" or (expected == "affine" and topology == "conv-bn"):
        assert case.reason in record["reason"], record
    assert len(bns) == (1 if expected == "kept" else 0)
    # never a NaN/Inf that the input did not have
    assert _nonfinite(folded) <= _nonfinite(model)
    if expected == "kept":  # kept as it was, parameters and all
        original = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
        assert bns[0].attribute == original.attribute
    # verify: PASS exactly when the original computes finite outputs (then the fold is exact);
    # FAIL (NaN/Inf) when it does not, whatever the folded model computes.
    feeds = check.random_inputs(model, check.input_shapes(model))
    finite = all(np.all(np.isfinite(v)) for v in check.run_onnxruntime(model, feeds).values())
    tol = dict(rtol=4e-3, atol=1e-3) if case.dtype == "float16" else {}
    result = check.verify(src, out, inputs=feeds, **tol)
    assert result.passed == finite, result.table()
    if not finite:
        assert "FAIL (NaN/Inf)" in result.table()


def test_verify_cli_fails_on_nan_outputs_of_both_models(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """NaN in both the reference's and the candidate's outputs is FAIL (exit 1), not a match;
    and the ``--json`` file stays strict JSON (``null``, not ``NaN``)."""
    src, out, _ = _fold(_model(CASES["NaN mean"], "conv-bn"), tmp_path, capfd)
    js = tmp_path / "v.json"
    with pytest.raises(SystemExit) as exc:
        main(["verify", str(src), str(out), "--json", str(js)])
    captured = capfd.readouterr()
    assert exc.value.code == 1, captured.err
    assert "FAIL (NaN/Inf)" in captured.out and captured.err == ""

    def refuse(token: str) -> None:
        raise AssertionError(f"{token} in the --json file")

    data = json.loads(js.read_text(), parse_constant=refuse)
    assert data["passed"] is False
    assert data["outputs"][0]["finite"] is False and data["outputs"][0]["max_abs"] is None


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_verify_fails_on_nonfinite_input(tmp_path: Path, value: float) -> None:
    """NaN/Inf fed in (``--inputs``) reaches the outputs of both models: FAIL."""
    src = tmp_path / "m.onnx"
    onnx.save(_model(Case({}), "lone-bn"), src)
    x = np.random.default_rng(2).standard_normal((2, 4, 5, 5)).astype(np.float32)
    x[0, 1, 2, 3] = value
    result = check.verify(src, src, inputs={"x": x})
    assert not result.passed and "FAIL (NaN/Inf)" in result.table()


def test_verify_fails_when_only_the_candidate_is_nonfinite(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(_model(Case({}), "conv-bn"), good)
    onnx.save(_model(CASES["+Inf gamma"], "conv-bn"), bad)
    result = check.verify(good, bad, random=1)
    assert not result.passed and "FAIL (NaN/Inf)" in result.table()
    result = check.verify(bad, good, random=1)  # and the other way round
    assert not result.passed


def test_verify_outputs_near_the_float64_max(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Outputs of +-1e308: FAIL with finite metrics, and no numpy warnings on stderr.

    Was: "RuntimeWarning: overflow encountered in dot" (six lines on stderr) and cosine NaN.
    """
    paths = []
    for sign in (1, -1):
        model = parse(
            '<ir_version: 8, opset_import: ["" : 17]>\n'
            "g (double[2,3] x) => (double[2,3] y) { y = Mul (x, S) }",
            S=np.full((1, 3), sign * 1e308),
        )
        paths.append(tmp_path / f"m{sign}.onnx")
        onnx.save(model, paths[-1])
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as exc:
        warnings.simplefilter("always")  # (pytest would otherwise keep them off stderr)
        main(["verify", str(paths[0]), str(paths[1])])
    captured = capfd.readouterr()
    assert exc.value.code == 1 and captured.err == "", captured.err
    assert [str(w.message) for w in caught] == []
    assert "-1.000000000" in captured.out and "FAIL" in captured.out


PARTIAL_FOLD_MODELS = {
    # MatMul -> Add(bias) -> BN, a bias of 3e38: s * bias overflows float32 (found by the long
    # fuzz run: 44152263839716 of family "values" on matmul_add_bn).
    "matmul-add-bias-3e38": (
        "float",
        "m = MatMul (x, W)\n a = Add (m, Bias)\n y = BatchNormalization (a, g, b, mu, v)",
        {"Bias": [0.1, -0.2, 0.3, 3e38]},
    ),
    "matmul-add-bias-float16": (
        "float16",
        "m = MatMul (x, W)\n a = Add (m, Bias)\n y = BatchNormalization (a, g, b, mu, v)",
        {"Bias": [0.1, -0.2, 0.3, 6e4], "g": [1.0, 1.0, 1.0, 1.5]},
    ),
    # Gemm with beta = 0 and a C: the shift t = beta - s * mean overflows; beta must stay 0.
    "gemm-beta0-shift-overflow": (
        "float",
        "c = Gemm <beta=0.0> (x, W, Bias)\n y = BatchNormalization (c, g, b, mu, v)",
        {"mu": [0.0, 0.0, 0.0, -3e38], "g": [1.0, 1.0, 1.0, 2.0]},
    ),
}


@pytest.mark.parametrize("name", list(PARTIAL_FOLD_MODELS))
def test_declined_fold_leaves_the_graph_untouched(name: str) -> None:
    """A fold declined part-way (the bias overflows after the weight was done) changes nothing.

    Was: passes/fold_bn.py ``_fold_backward`` wrote the scaled MatMul weight (or Gemm's
    ``beta = 1``) before casting the bias; the cast declined, the BN then became Mul+Add on top
    of the scaled weight, and every channel came out wrong (exit 0, max err 1.6 of 4.6).
    """
    dtype, body, overrides = PARTIAL_FOLD_MODELS[name]
    npdt = NP[dtype]
    rng = np.random.default_rng(3)
    tensors = {
        "W": rng.standard_normal((5, 4)).astype(npdt),
        "Bias": rng.standard_normal(4).astype(npdt),
        "g": rng.uniform(0.5, 2.0, 4).astype(npdt),
        "b": rng.standard_normal(4).astype(npdt),
        "mu": rng.standard_normal(4).astype(npdt),
        "v": rng.uniform(0.5, 2.0, 4).astype(npdt),
    }
    with np.errstate(over="ignore"):
        tensors.update({k: np.asarray(v).astype(npdt) for k, v in overrides.items()})
    model = parse(
        f'<ir_version: 8, opset_import: ["" : 15]>\n'
        f"g ({dtype}[3,5] x) => ({dtype}[3,4] y) {{\n {body}\n}}",
        **tensors,
    )
    folded, report = bnfold.fold(model)
    (record,) = report.batchnorms
    assert record.action in ("affine", "kept"), record  # kept when the shift overflows too
    assert "backward: folded bias would overflow" in (record.reason or ""), record
    x = rng.standard_normal((3, 5)).astype(npdt)
    (ref,) = check.run_onnxruntime(model, {"x": x}).values()
    (got,) = check.run_onnxruntime(bnfold.ir.to_proto(folded), {"x": x}).values()
    finite = np.isfinite(ref)
    assert finite.sum() >= 9  # three of the four channels
    tol = 4e-3 if dtype == "float16" else 1e-5
    np.testing.assert_allclose(got[finite], ref[finite], rtol=tol, atol=tol)
