"""``bnfold.metrics`` (one comparison for verify, compile, per-layer and the int8 report) and
``bnfold.onnxrt`` (every onnxruntime session with the project's settings).

The metrics are checked on small arrays whose answer is known; verify's table and the int8
report give the same numbers for the same outputs, because both call the same functions.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import onnx
import pytest

from bnfold import check, metrics, onnxrt
from bnfold.errors import BnfoldError
from bnfold.testing import parse

RNG = np.random.default_rng(0)
X = RNG.standard_normal((4, 10))


@pytest.mark.parametrize(
    ("a", "b", "want"),
    [
        (X, 3.0 * X, 1.0),
        (X, -X, -1.0),
        (np.zeros(5), np.zeros(5), 1.0),
        (np.zeros(5), np.ones(5), 0.0),
        (np.array([1.0, 0.0]), np.array([0.0, 1.0]), 0.0),
        (np.array([1e300, 1e300]), np.array([1e300, 1e300]), 1.0),  # no overflow
    ],
)
def test_cosine(a: np.ndarray, b: np.ndarray, want: float) -> None:
    assert metrics.cosine(a, b) == pytest.approx(want, abs=1e-12)


def test_cosines_are_per_sample() -> None:
    b = X.copy()
    b[1] *= -1
    b[2] = 0
    got = metrics.cosines(X, b)
    assert got == pytest.approx([1.0, -1.0, 0.0, 1.0])
    assert metrics.cosines(np.zeros((2, 3)), np.zeros((2, 3))) == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize(
    ("signal", "noise", "want"),
    [(10.0, 1.0, 10.0), (1.0, 1.0, 0.0), (1.0, 0.0, math.inf), (0.0, 1.0, -math.inf)],
)
def test_sqnr_db(signal: float, noise: float, want: float) -> None:
    assert metrics.sqnr_db(signal, noise) == want


@pytest.mark.parametrize(
    ("shape", "top1", "top5"),
    [((6, 10), 1.0, 1.0), ((6, 3), 1.0, None), ((6, 1), None, None), ((6, 2, 5), None, None)],
)
def test_top_agreement_applies_to_classifier_shapes(
    shape: tuple[int, ...], top1: float | None, top5: float | None
) -> None:
    a = RNG.standard_normal(shape)
    assert metrics.top_agreement(a, a) == (top1, top5)


def test_top_agreement_counts_samples() -> None:
    ref = np.eye(6)[:4] + 0.01  # sample i: class i on top
    got = ref.copy()
    got[0] = [0.0, 0.5, 0.4, 0.3, 0.2, 0.1]  # class 0 out of the top 5: top-1 and top-5 miss
    got[1] = [0.9, 0.8, 0.0, 0.0, 0.0, 0.0]  # class 1 second: top-1 misses, top-5 holds
    assert metrics.top_agreement(ref, got) == (0.5, 0.75)


def test_measure_gate_and_relative_error() -> None:
    ref = np.array([[1000.0, 0.0, -2.0]])
    got = ref + np.array([[0.1, 0.5, 0.0]])
    m = metrics.measure("y", ref, got, atol=0.0, rtol=5e-4)
    assert (m.max_abs, m.max_ref) == (pytest.approx(0.5), 1000.0)
    # The zero element's error counts against the floor 1e-3 x max|ref| = 1, not 0.
    assert m.max_rel == pytest.approx(0.5)
    assert m.passed and m.finite and m.top1 == 1.0 and m.top5 is None
    assert not metrics.measure("y", ref, got, atol=0.0, rtol=4e-4).passed


def test_measure_refuses_what_it_cannot_compare() -> None:
    nan = metrics.measure("y", np.array([1.0, np.nan]), np.ones(2), 1.0, 1.0)
    assert not nan.finite and not nan.passed and math.isnan(nan.max_abs)
    empty = metrics.measure("y", np.zeros((0, 3)), np.zeros((0, 3)), 0.0, 0.0)
    assert empty.passed
    with pytest.raises(BnfoldError, match="output 'y': shapes differ"):
        metrics.measure("y", np.zeros(3), np.zeros(4), 0.0, 0.0)
    with pytest.raises(BnfoldError, match="is a list, not a tensor"):
        metrics.measure("y", [1.0], np.zeros(1), 0.0, 0.0)  # type: ignore[arg-type]


def test_verify_and_the_int8_report_measure_alike() -> None:
    """The same arrays through verify's comparison and the int8 report's functions."""
    ref = RNG.standard_normal((8, 10)).astype(np.float32)
    got = (ref + 0.3 * RNG.standard_normal((8, 10))).astype(np.float32)
    verified = check.compare_outputs({"y": ref}, {"y": got}, 0.0, 1e-4).outputs[0]
    assert (verified.top1, verified.top5) == metrics.top_agreement(ref, got)
    one = metrics.cosines(ref[:1], got[:1])[0]
    assert one == pytest.approx(
        metrics.cosine(ref[0].astype(np.float64), got[0].astype(np.float64)), abs=1e-12
    )


# --------------------------------------------------------------------------------------------
# onnxruntime sessions


def _model() -> bytes:
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3] x) => (float[1,3] y) { y = Relu (x) }"""
    return parse(text).SerializeToString()


@pytest.mark.parametrize(("optimize", "threads"), [(False, None), (True, 2)])
def test_session_settings(optimize: bool, threads: int | None) -> None:
    import onnxruntime as ort

    sess = onnxrt.session(_model(), optimize=optimize, threads=threads)
    options = sess.get_session_options()
    level = ort.GraphOptimizationLevel
    assert options.graph_optimization_level == (
        level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    )
    assert options.log_severity_level == onnxrt.FATAL
    assert sess.get_providers() == ["CPUExecutionProvider"]
    if threads:
        assert options.intra_op_num_threads == threads and options.inter_op_num_threads == 1
    x = np.array([[-1.0, 0.0, 2.0]], np.float32)
    np.testing.assert_array_equal(onnxrt.run(sess, {"x": x})["y"], np.maximum(x, 0))


def test_session_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(BnfoldError, match=r"^onnxruntime cannot run the model: ") as e:
        onnxrt.session(b"not a model")
    assert "\n" not in str(e.value)
    sess = onnxrt.session(_model())
    with pytest.raises(BnfoldError, match=r"^onnxruntime cannot run the model: "):
        onnxrt.run(sess, {"x": np.zeros((2, 2), np.float32)})
    path = tmp_path / "m.onnx"
    onnx.save(onnx.load_model_from_string(_model()), path)
    assert onnxrt.run(onnxrt.session(path), {"x": np.ones((1, 3), np.float32)})["y"].shape == (1, 3)


# --------------------------------------------------------------------------------------------
# no import cycle through the core modules


def _imports(path: Path) -> set[str]:
    """bnfold modules ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bnfold"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("bnfold"))
    return found


def test_core_modules_import_no_cycle() -> None:
    """bnfold's top-level modules (check, per_layer, metrics, ...) form no import cycle, not
    even through imports inside functions (check -> per_layer -> check was one)."""
    root = Path(check.__file__).parent
    core = {f"bnfold.{p.stem}": p for p in root.glob("*.py") if p.stem != "__init__"}
    graph = {m: _imports(p) & set(core) for m, p in core.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph[start] - seen:
            seen.add(nxt)
            if nxt == goal or reaches(nxt, goal, seen):
                return True
        return False

    cycles = sorted(m for m in core if reaches(m, m, set()))
    assert cycles == [], cycles
    assert "bnfold.check" not in graph["bnfold.per_layer"]
