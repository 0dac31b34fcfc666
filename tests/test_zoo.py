"""The architecture zoo (``make zoo``; ``benchmarks/zoo.py``): every CNN compiles and is exact.

Specification, per exported file ``<arch>.<style>.onnx``:

* ``bnfold compile --target x86`` succeeds, and the artifact matches the UNFOLDED model in
  onnxruntime (graph optimizations off) within max abs <= 1e-4 x max|ref| on a seeded random
  input (compile's own verification gate, asserted here from the manifest);
* the fold report is exact: one record per BatchNormalization of the source, each folded (into
  nodes that exist in the folded model), rewritten as Mul+Add or kept with its reason, and the
  folded model holds exactly the kept ones.

Which files run: plain ``pytest`` (and ``make test``, which builds them with ``make zoo-ci``)
collects the representative third ``benchmarks.zoo.CI``; ``pytest -m zoo`` collects every file
the zoo's index lists (``make zoo`` builds them all). The tests skip when the zoo is absent, and
fail when ``BNFOLD_ZOO`` is set (``make test`` built it) but a file is missing. A compile that
fails today for a known reason is an xfail naming that reason (not strict: it passes once fixed);
any other failure fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest

from benchmarks import zoo
from bnfold.errors import BnfoldError
from bnfold.lower import compiler as lower

ZOO = Path(os.environ.get("BNFOLD_ZOO", ".cache/zoo"))
GATE = 1e-4  # max abs <= GATE x max|ref|

pytestmark = [pytest.mark.zoo, pytest.mark.tvm, pytest.mark.slow]

# (arch, style) -> (text of the error compile raises today, why). Fixes land in parallel; each
# entry turns into a pass (xfail is not strict) and can then be deleted.
_PAD_SUBGRAPH = (
    "Dynamic pads are not supported yet",
    "Pad amounts from a constant subgraph (F.pad) do not import into TVM yet (issue 13 item 2)",
)
# The dynamo exporter writes TF-"same" padding into the Conv's pads: no Pad, it compiles.
# (The Pad-subgraph entries for efficientnet_b0_tfsame ts/ts_bn were deleted once bnfold's
# constant folding took the subgraph: they compile and verify now, and must keep doing so.)
KNOWN_FAILURES: dict[tuple[str, str], tuple[str, str]] = {}


def _wants_full_zoo(config: pytest.Config) -> bool:
    """``pytest -m zoo`` (or any marker expression naming zoo) asks for the whole zoo."""
    return "zoo" in (config.option.markexpr or "")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "entry" not in metafunc.fixturenames:
        return
    if _wants_full_zoo(metafunc.config):
        models = zoo.read_index(ZOO)["models"]
        keys = sorted(models) or [f"{a}.{s}" for a, s in zoo.CI]
    else:
        keys = [f"{a}.{s}" for a, s in zoo.CI]
    metafunc.parametrize("entry", keys)


def _need(key: str) -> tuple[Path, dict]:
    """The zoo file of ``key`` and its index entry; skip (or fail under ``make test``)."""
    built_by_make = bool(os.environ.get("BNFOLD_ZOO"))
    entry = zoo.read_index(ZOO)["models"].get(key)
    if entry is None:
        if built_by_make:
            pytest.fail(f"{key} is not in {ZOO / zoo.INDEX}; run `make zoo-ci` (or `make zoo`)")
        pytest.skip(f"zoo not built ({ZOO}); run `make zoo-ci` or `make zoo`")
    if entry["status"] != "ok":
        # The exporter's failure, recorded by the builder: no file to compile.
        msg = f"torch could not export {key}: {entry['reason']}"
        if tuple(key.rsplit(".", 1)) in zoo.CI:
            pytest.fail(msg)  # the CI third must stay exportable
        pytest.skip(msg)
    path = ZOO / entry["file"]
    if not path.is_file():
        if built_by_make:
            pytest.fail(f"{path} missing; run `make zoo-ci` (or `make zoo`)")
        pytest.skip(f"{path} missing; run `make zoo`")
    return path, entry


def _label(node: onnx.NodeProto) -> str:
    """The fold report's label of a node: its name, or ``op:first-output`` when unnamed."""
    return node.name or f"{node.op_type}:{node.output[0]}"


def _bn_names(proto: onnx.ModelProto) -> list[str]:
    return [_label(n) for n in proto.graph.node if n.op_type == "BatchNormalization"]


def test_zoo_model_compiles_verifies_and_folds_exactly(entry: str, tmp_path: Path) -> None:
    path, info = _need(entry)
    arch, style = entry.rsplit(".", 1)
    try:
        manifest = lower.compile_model(path, "x86", tmp_path / "out", rtol=GATE, atol=0.0)
    except BnfoldError as exc:
        known = KNOWN_FAILURES.get((arch, style))
        if known is not None and known[0] in str(exc):
            pytest.xfail(f"{known[1]}: {known[0]}")
        raise

    v = manifest.verification
    assert v["status"] == "passed", v.get("table")
    assert v["worst_abs_over_max_ref"] <= GATE

    source = onnx.load(str(path), load_external_data=False)
    folded = onnx.load(str(tmp_path / "out" / lower.FOLDED), load_external_data=False)
    report = manifest.fold_report
    source_bns = _bn_names(source)
    assert report["bn_before"] == len(source_bns) == info["bn_count"]
    assert sorted(r["node"] for r in report["batchnorms"]) == sorted(source_bns)
    counts = report["counts"]
    assert sum(counts.values()) == len(source_bns)
    assert report["bn_after"] == len(_bn_names(folded)) == counts["kept"]
    folded_nodes = {_label(n) for n in folded.graph.node}
    for r in report["batchnorms"]:
        if r["action"] == "folded":
            assert r["into"] and set(r["into"]) <= folded_nodes, r
        else:
            assert r["reason"], r
