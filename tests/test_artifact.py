"""``bnfold.artifact``: the compiled folder's manifest, one module that saves, loads and checks it.

``save`` then ``load`` gives the same manifest; ``load`` refuses, with one line naming the
problem (exit 2 through the CLI), every manifest a reader could not use; readers get typed
attributes instead of dict lookups.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from bnfold import artifact
from bnfold.artifact import MANIFEST, Manifest, TensorSpec
from bnfold.errors import EXIT_BAD_INPUT, BnfoldError


def _manifest() -> Manifest:
    return Manifest(
        target={"name": "x86", "spec": "x86:skylake", "device": "cpu", "arch": "x86_64",
                "tvm": {"kind": "llvm", "mcpu": "skylake"}},
        inputs=[{"name": "x", "shape": [1, 3, 8, 8], "dtype": "float32"}],
        outputs=[{"name": "y", "shape": [1, 10], "dtype": "float32"}],
        artifact={"files": {"library": "model.so"}, "sha256": {}, "meta": {}},
        source={"path": "/m.onnx", "sha256": "0" * 64},
        compile={"seconds": 1.0, "int8": {"integer": True}},
        verification={"status": "not verified", "why": "--no-verify"},
        runtime={"threads": 2},
    )  # fmt: skip


def test_save_then_load_is_the_same_manifest(tmp_path: Path) -> None:
    written = _manifest()
    assert artifact.save(written, tmp_path) == tmp_path / MANIFEST
    on_disk = json.loads((tmp_path / MANIFEST).read_text())
    assert on_disk == written.to_dict() and "outdir" not in on_disk
    assert on_disk["format"] == artifact.FORMAT
    loaded = artifact.load(tmp_path)
    assert loaded.to_dict() == written.to_dict() and loaded.outdir == str(tmp_path)


def test_readers_get_attributes(tmp_path: Path) -> None:
    artifact.save(_manifest(), tmp_path)
    m = artifact.load(tmp_path)
    assert (m.spec, m.arch, m.device, m.library, m.threads) == (
        "x86:skylake", "x86_64", "cpu", "model.so", 2)  # fmt: skip
    assert m.tvm_target["mcpu"] == "skylake" and m.files == {"library": "model.so"}
    assert m.input_specs == [TensorSpec("x", (1, 3, 8, 8), "float32")]
    assert m.output_specs == [TensorSpec("y", (1, 10), "float32")]
    assert m.int8 == {"integer": True} and m.verified is None


def test_sections_a_reader_does_not_need_may_be_absent(tmp_path: Path) -> None:
    raw = _manifest().to_dict()
    for key in ("source", "folded", "versions", "fold_report", "compile", "verification"):
        del raw[key]
    raw["runtime"] = None
    (tmp_path / MANIFEST).write_text(json.dumps(raw))
    m = artifact.load(tmp_path)
    assert m.compile == {} and m.int8 == {} and m.threads is None


def _set(path: str, value: Any) -> Any:
    def change(raw: dict[str, Any]) -> Any:
        *parents, last = path.split(".")
        d = raw
        for p in parents:
            d = d[p][0] if isinstance(d[p], list) else d[p]
        d[last] = value
        return raw

    return change


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda raw: {}, "no target with spec, arch and device"),
        (lambda raw: [], "a JSON list, not an object"),
        (lambda raw: None, "a JSON NoneType, not an object"),
        (_set("target.arch", 64), "no target with spec, arch and device"),
        (_set("target.tvm", "llvm"), "target.tvm is not an object"),
        (_set("runtime.threads", 0), "runtime.threads is not a positive integer"),
        (_set("artifact.files", {"fatbin": "x"}), "no artifact library"),
        (_set("artifact.files.library", "../m.so"),
         "an artifact file name is not a plain name in the folder"),
        (_set("inputs", {}), "no inputs list"),
        (_set("outputs.name", 3), "an entry of outputs has no name"),
        (_set("inputs.shape", [1, -3]), "input 'x' has no shape of non-negative integers"),
        (_set("inputs.shape", [True]), "input 'x' has no shape of non-negative integers"),
        (_set("outputs.dtype", "float99"), "output 'y' has an unknown dtype"),
        (_set("compile", []), "compile is not an object"),
        (_set("format", 1), "format is not a string"),
    ],
)  # fmt: skip
def test_a_manifest_a_reader_cannot_use_is_one_line(tmp_path: Path, change: Any, why: str) -> None:
    raw = change(_manifest().to_dict())
    (tmp_path / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(BnfoldError) as e:
        artifact.load(tmp_path)
    assert str(e.value) == f"{tmp_path / MANIFEST}: not a valid `bnfold compile` manifest ({why})"
    assert e.value.exit_code == EXIT_BAD_INPUT
    assert artifact.problem(raw) == why


def test_no_manifest_or_unreadable_json(tmp_path: Path) -> None:
    with pytest.raises(BnfoldError, match=r"holds no manifest\.json: not a `bnfold compile`"):
        artifact.load(tmp_path)
    (tmp_path / MANIFEST).write_text("{")
    with pytest.raises(BnfoldError, match=r"cannot read .*manifest\.json"):
        artifact.load(tmp_path)


def test_check_files_refuses_a_missing_or_changed_library(tmp_path: Path) -> None:
    m = _manifest()
    with pytest.raises(BnfoldError, match=r"model\.so: missing"):
        m.check_files(tmp_path)
    (tmp_path / "model.so").write_bytes(b"library")
    m.check_files(tmp_path)  # no checksum recorded: present is enough
    m.artifact["sha256"] = {"model.so": hashlib.sha256(b"library").hexdigest()}
    m.check_files(tmp_path)
    assert artifact.sha256_file(tmp_path / "model.so") == m.artifact["sha256"]["model.so"]
    (tmp_path / "model.so").write_bytes(b"librar")
    with pytest.raises(BnfoldError, match="does not match the manifest's sha256"):
        m.check_files(tmp_path)


def test_runtime_manifest_still_reads_as_the_json_object(tmp_path: Path) -> None:
    """``bnfold.runtime.load(...).manifest["..."]`` worked on the parsed dict before the manifest
    was typed: it still does, key for key, and unknown keys are KeyErrors."""
    m = _manifest()
    artifact.save(m, tmp_path)
    on_disk = json.loads((tmp_path / artifact.MANIFEST).read_text())
    for key, value in on_disk.items():
        assert m[key] == value and m.get(key) == value
    assert m.get("nope", 7) == 7
    with pytest.raises(KeyError):
        m["outdir"]
