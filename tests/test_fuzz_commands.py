"""Fuzzing the commands after ``fold``: ``quantize``, ``compile --no-verify`` and ``run``.

The same corpus as ``tests/test_fuzz.py`` (a seed model with one or two mutations), through the
same in-process harness and the same contract: exit 0 with complete outputs, or exit 2 with one
line and nothing left in the output folder (which also holds the temp folder a transaction
builds beside OUTDIR); never exit 3, a traceback, a warning or a hang. The budgets are sized
for CI: ``compile`` costs a TVM build per case that gets that far.

``run`` gets compiled folders with a mutated manifest or library instead (``RUN_MUTATIONS``).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from bnfold.testing import parse
from tests.fuzz import corpus, harness

FAMILIES = ("structure", "tensors", "values", "attributes", "types", "versions", "bytes",
            "external")  # fmt: skip
QUANTIZE_CASES_PER_FAMILY = 5
COMPILE_CASES_PER_FAMILY = 2
RUN_CASES = 40
TIMEOUT_S = 10.0
COMPILE_TIMEOUT_S = 120.0  # a TVM build on a loaded 2-core machine


def _failures(outcomes: list[harness.Outcome]) -> str:
    bad = [o.describe() for o in outcomes if not o.ok]
    return f"{len(bad)} of {len(outcomes)} cases break the contract:\n" + "\n".join(bad[:20])


def _calib(case: corpus.Case, root: Path) -> Path:
    """Calibration samples for the case's *seed* model (a mutated model may not match them:
    then exit 2 is the right answer)."""
    seed = corpus.seed_model(case.name.split("/")[1])
    feeds = harness._feeds(seed) or {}
    path = root / "calib.npz"
    np.savez(path, **{k: np.concatenate([v] * 4) if v.ndim else v for k, v in feeds.items()})
    return path


def _case_outcome(argv: list[str], name: str, out_dir: Path, timeout: float,
                  expect: tuple[str, ...]) -> harness.Outcome:  # fmt: skip
    code, stderr, seconds, hung = harness.run_main(argv, timeout)
    outcome = harness.Outcome(name, argv, code, stderr, seconds, hung)
    # quantize's own warning about the result (int8 outputs with NaN/Inf, from a model whose
    # float outputs already are) is allowed on exit 0; nothing else is.
    said = stderr if code != 0 else "".join(
        line + "\n" for line in stderr.splitlines()
        if not line.startswith("WARNING bnfold.quant.report: ")
    )  # fmt: skip
    outcome.problems = harness.contract(code, said, hung, out_dir)
    if code == 0 and not outcome.problems:
        missing = [n for n in expect if not (out_dir / "o" / n).is_file()]
        left = sorted(p.name for p in out_dir.iterdir() if p.name != "o")
        if missing or left:
            outcome.problems.append(f"exit 0 but missing {missing}, beside OUTDIR {left}")
    return outcome


@pytest.mark.parametrize("family", FAMILIES)
def test_fuzz_quantize(family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BNFOLD_DEBUG", raising=False)
    outcomes = []
    for i, case in enumerate(corpus.corpus({family: QUANTIZE_CASES_PER_FAMILY})):
        root = tmp_path / str(i)
        model = case.materialize(root)
        out_dir = root / "out"
        out_dir.mkdir()
        # The accuracy gate off, as compile runs with --no-verify: the fuzz checks how inputs
        # are handled, and a hostile model's int8 outputs are garbage by design (exit 1).
        argv = ["quantize", str(model), "-o", str(out_dir / "o"), "--calib",
                str(_calib(case, root)), "--eval-fraction", "0.5", "--min-cosine", "0"]  # fmt: skip
        outcomes.append(_case_outcome(argv, case.name, out_dir, TIMEOUT_S,
                                      ("model.int8.onnx", "quant_report.json", "sqnr.png")))
    assert all(o.ok for o in outcomes), _failures(outcomes)


@pytest.mark.parametrize("family", FAMILIES)
def test_fuzz_compile(family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tvm")
    monkeypatch.delenv("BNFOLD_DEBUG", raising=False)
    outcomes = []
    for i, case in enumerate(corpus.corpus({family: COMPILE_CASES_PER_FAMILY})):
        root = tmp_path / str(i)
        model = case.materialize(root)
        out_dir = root / "out"
        out_dir.mkdir()
        argv = ["compile", str(model), "-o", str(out_dir / "o"), "--no-verify"]
        outcomes.append(_case_outcome(argv, case.name, out_dir, COMPILE_TIMEOUT_S,
                                      ("model.so", "manifest.json", "model.folded.onnx")))
    assert all(o.ok for o in outcomes), _failures(outcomes)


def _drop(d: dict, rng: random.Random) -> None:
    if d:
        del d[rng.choice(sorted(d))]


def _retype(d: dict, rng: random.Random) -> None:
    if d:
        d[rng.choice(sorted(d))] = rng.choice([None, 0, -1, "x", [], {}, 1e300, True])


def _tensor_spec(m: dict, rng: random.Random) -> None:
    spec = rng.choice(m["inputs"] + m["outputs"])
    key = rng.choice(["shape", "dtype", "name"])
    spec[key] = rng.choice([
        [-1, 3, 8, 8], [10**6, 10**6, 3, 8], [], [1.5], "1x3", None, "float128", "complex64",
        "int8", "a\nb\x1b[2J", 7,
    ])  # fmt: skip


RUN_MUTATIONS = {
    "drop-top-key": lambda m, rng: _drop(m, rng),
    "retype-top-key": lambda m, rng: _retype(m, rng),
    "drop-target-key": lambda m, rng: _drop(m["target"], rng),
    "retype-target-key": lambda m, rng: _retype(m["target"], rng),
    "drop-artifact-key": lambda m, rng: _drop(m["artifact"], rng),
    "library-name": lambda m, rng: m["artifact"]["files"].update(
        library=rng.choice(["../m.onnx", "/etc/passwd", "", "missing.so", "manifest.json"])),
    "tensor-spec": _tensor_spec,
    "threads": lambda m, rng: m.setdefault("runtime", {}).update(
        threads=rng.choice([0, -2, "4", 2.5, None, 10**9])),
    "whole": lambda m, rng: rng.choice([{}, [], None, "x", 3]),
}
LIBRARY_MUTATIONS = ("truncate", "garbage", "empty", "folder", "fifo")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("tvm")
    from bnfold.lower import compiler as lower

    root = tmp_path_factory.mktemp("fuzz-run")
    model = root / "m.onnx"
    onnx.save(parse("""<ir_version: 7, opset_import: ["" : 13]>
        g (float[1,3,4,4] x) => (float[1,3,4,4] y) { y = Relu (x) }"""), model)
    lower.compile_model(model, "x86", root / "out", verify=False)
    return root / "out"


def test_fuzz_run(compiled: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.delenv("BNFOLD_DEBUG", raising=False)
    names = sorted(RUN_MUTATIONS) + list(LIBRARY_MUTATIONS)
    outcomes = []
    for i in range(RUN_CASES):
        rng = random.Random(f"run:{i}")
        kind = names[i % len(names)]
        folder = tmp_path / f"{i}-{kind}"
        shutil.copytree(compiled, folder)
        library = folder / "model.so"
        if kind in RUN_MUTATIONS:
            manifest = json.loads((folder / "manifest.json").read_text())
            mutated = RUN_MUTATIONS[kind](manifest, rng)
            text = json.dumps(manifest if mutated is None else mutated)
            (folder / "manifest.json").write_text(text)
        elif kind == "truncate":
            library.write_bytes(library.read_bytes()[: rng.randrange(1, 20000)])
        elif kind == "garbage":
            library.write_bytes(rng.randbytes(rng.randrange(1, 20000)))
        elif kind == "empty":
            library.write_bytes(b"")
        elif kind == "folder":
            library.unlink()
            library.mkdir()
        else:
            library.unlink()
            os.mkfifo(library)
        out_dir = tmp_path / f"{i}-out"
        out_dir.mkdir()
        argv = ["run", str(folder), "-o", str(out_dir / "y.npz")]
        code, stderr, seconds, hung = harness.run_main(argv, TIMEOUT_S)
        outcome = harness.Outcome(f"run/{kind}/{i}", argv, code, stderr, seconds, hung)
        outcome.problems = harness.contract(code, stderr, hung, out_dir)
        outcomes.append(outcome)
    assert all(o.ok for o in outcomes), _failures(outcomes)
