"""Fuzzing bnfold's input handling: 1,250 mutated ONNX files, and hand-written hostile inputs.

Every corpus case (``tests/fuzz/corpus.py``: a seed model with one or two mutations) goes
through ``bnfold fold IN -o OUT --report R`` in this process (``tests/fuzz/harness.py``); the
contract is exit 0 with a valid output equivalent to the input, or exit 2 with one line and no
file left behind; never another exit code, a traceback, a warning on stderr or a hang (10 s per
case). Every fourth case also goes through ``bnfold inspect``, every 25th foldable one through
``bnfold verify``. The corpus is deterministic (seeded per case); the long run with fresh cases
is ``python -m tests.fuzz.fuzz_load`` (docs/hardening.md).

The hand-written cases below cover what the corpus reaches only by chance: external data
(locations out of the folder, symlinks, missing and short files, bad offsets and lengths) and
``--max-size`` (refused before the model or its external data is read).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import click
import onnx
import pytest
from click.testing import CliRunner

from bnfold import ir as bir
from bnfold.cli import cli
from bnfold.cli.types import SizeType
from bnfold.errors import BnfoldError
from tests.fuzz import corpus, harness

CASES_PER_FAMILY = {
    "structure": 200,
    "tensors": 150,
    "values": 200,
    "attributes": 150,
    "types": 100,
    "versions": 100,
    "bytes": 200,
    "external": 150,
}
TIMEOUT_S = 10.0


def test_corpus_size() -> None:
    assert set(CASES_PER_FAMILY) == set(corpus.FAMILIES)
    assert sum(CASES_PER_FAMILY.values()) >= 1000


def test_corpus_is_deterministic() -> None:
    for family in corpus.FAMILIES:
        a = corpus.make_case(family, "three_bn", 7)
        b = corpus.make_case(family, "three_bn", 7)
        assert a == b, family


def _failures(outcomes: list[harness.Outcome]) -> str:
    bad = [o.describe() for o in outcomes if not o.ok]
    return f"{len(bad)} of {len(outcomes)} cases break the contract:\n" + "\n".join(bad[:20])


@pytest.mark.parametrize("family", list(CASES_PER_FAMILY))
def test_fuzz_corpus(family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each case of ``family``: fold (every case), inspect (1 in 4), verify (1 in 25 that fold)."""
    monkeypatch.delenv("BNFOLD_DEBUG", raising=False)
    cases = corpus.corpus({family: CASES_PER_FAMILY[family]})
    outcomes = []
    folded = 0
    for i, case in enumerate(cases):
        root = tmp_path / str(i)
        outcome = harness.fold_case(case, root, TIMEOUT_S)
        outcomes.append(outcome)
        folded += outcome.code == 0
        if i % 4 == 0:
            outcomes.append(harness.inspect_case(case, root, TIMEOUT_S))
        if outcome.code == 0 and outcome.ok and folded % 25 == 1:
            outcomes.append(_verify(case, root))
    assert len(cases) == CASES_PER_FAMILY[family]
    assert all(o.ok for o in outcomes), _failures(outcomes)


def _verify(case: corpus.Case, root: Path) -> harness.Outcome:
    """``verify IN OUT --json J``: 0 (PASS), 1 (FAIL, e.g. NaN in both) or 2 with one line."""
    out_dir = root / "verify-out"
    out_dir.mkdir()
    argv = ["verify", str(root / corpus.MODEL), str(root / "out" / "folded.onnx")]
    argv += ["--json", str(out_dir / "v.json")]
    code, stderr, seconds, hung = harness.run_main(argv, TIMEOUT_S)
    outcome = harness.Outcome(case.name, argv, code, stderr, seconds, hung)
    if code == 1:  # a check that failed is a result, not an error: one table, no stderr
        outcome.problems = harness.contract(0, stderr, hung, out_dir)
    else:
        outcome.problems = harness.contract(code, stderr, hung, out_dir)
    if code in (0, 1) and not (out_dir / "v.json").is_file():
        outcome.problems.append("verify wrote no --json")
    return outcome


@pytest.mark.models
def test_fuzz_real_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutations of a real exported model (PP-OCR cls: Constant-node weights, 35 BNs)."""
    path = Path(os.environ.get("BNFOLD_MODELS", ".cache/models")) / "ppocr_cls.onnx"
    if not path.is_file():
        pytest.skip("real models not fetched (run `make models`)")
    monkeypatch.delenv("BNFOLD_DEBUG", raising=False)
    corpus.add_file_seed("ppocr_cls", path)
    families = {"bytes": 40, "structure": 40, "values": 40, "tensors": 20, "attributes": 20}
    outcomes = [
        harness.fold_case(case, tmp_path / str(i), TIMEOUT_S * 3)
        for i, case in enumerate(corpus.corpus(families, seeds=["ppocr_cls"]))
    ]
    assert all(o.ok for o in outcomes), _failures(outcomes)


# --------------------------------------------------------------------------------------------
# hand-written hostile inputs: external data
# --------------------------------------------------------------------------------------------


def _external(tmp_path: Path, location: str, data: bytes | None = None) -> Path:
    """in/m.onnx whose tensors all point at ``location`` (the real blob is also outside)."""
    model, blob = corpus.externalize(corpus.seed_model("conv_bn"), location)
    (tmp_path / "in").mkdir(exist_ok=True)
    (tmp_path / "outside.bin").write_bytes(blob)
    if data is not None:
        (tmp_path / "in" / location).write_bytes(data)
    path = tmp_path / "in" / "m.onnx"
    path.write_bytes(model)
    return path


def _fold_refused(path: Path, tmp_path: Path, must: str, *options: str) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    argv = ["fold", str(path), "-o", str(out_dir / "f.onnx"), *options]
    code, stderr, _, hung = harness.run_main(argv, TIMEOUT_S)
    assert code == 2 and not hung, stderr
    assert harness.contract(code, stderr, hung, out_dir) == [], stderr
    assert must in stderr, stderr


@pytest.mark.parametrize(
    ("location", "must"),
    [
        ("../outside.bin", "outside the model's folder"),
        ("sub/../../outside.bin", "outside the model's folder"),
        ("{abs}", "outside the model's folder"),
        ("/dev/zero", "outside the model's folder"),
        ("link.bin", "resolves outside"),
        ("dirlink/outside.bin", "resolves outside"),
        ("missing.bin", "missing or not a regular file"),
        ("sub", "missing or not a regular file"),
        ("fifo", "missing or not a regular file"),
        ("a\0b", "NUL"),
        ("x" * 300, "cannot be read"),
    ],
    ids=[
        "parent",
        "parent-inside-path",
        "absolute",
        "device",
        "symlink-out",
        "symlinked-folder-out",
        "missing",
        "folder",
        "fifo",
        "nul-byte",
        "name-too-long",
    ],
)
def test_external_data_location_refused(tmp_path: Path, location: str, must: str) -> None:
    location = location.replace("{abs}", str(tmp_path / "outside.bin"))
    path = _external(tmp_path, location)
    (tmp_path / "in" / "link.bin").symlink_to(tmp_path / "outside.bin")
    (tmp_path / "in" / "dirlink").symlink_to(tmp_path)
    (tmp_path / "in" / "sub").mkdir()
    os.mkfifo(tmp_path / "in" / "fifo")  # reading it would block forever
    _fold_refused(path, tmp_path, must)


def _set_entry(path: Path, tensor: str, key: str, value: str | None) -> None:
    proto = onnx.load(str(path), load_external_data=False)
    t = next(t for t in proto.graph.initializer if t.name == tensor)
    for e in list(t.external_data):
        if e.key == key:
            t.external_data.remove(e)
    if value is not None:
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    path.write_bytes(proto.SerializeToString())


@pytest.mark.parametrize(
    ("key", "value", "must"),
    [
        ("offset", "abc", "offset 'abc' is not a non-negative integer"),
        ("offset", "-4", "offset '-4' is not a non-negative integer"),
        ("offset", "99999999", "too short"),
        ("length", "1e3", "length '1e3' is not a non-negative integer"),
        ("length", "99999999", "too short"),
        ("length", "4", "has 4 bytes of data; its dims [4, 3, 3, 3] need 432"),
        ("length", "0", "has 0 bytes of data; its dims [4, 3, 3, 3] need 432"),
        ("length", None, "its dims [4, 3, 3, 3] need 432"),  # no length: read to the end
    ],
    ids=[
        "offset-text",
        "offset-negative",
        "offset-past-end",
        "length-text",
        "length-past-end",
        "length-short",
        "length-zero",
        "length-missing",
    ],
)
def test_external_data_offset_length_refused(
    tmp_path: Path, key: str, value: str | None, must: str
) -> None:
    """Was exit 3 for a non-numeric offset (``int()`` ValueError), exit 0 with a wrong-sized
    weight in the output for a missing length (onnx reads to the end of the file), and exit 3
    for a zero length (onnx reads nothing; found by the long fuzz run)."""
    path = _external(tmp_path, "m.onnx.data")
    (tmp_path / "in" / "m.onnx.data").write_bytes((tmp_path / "outside.bin").read_bytes())
    _set_entry(path, "W", key, value)
    _fold_refused(path, tmp_path, must)


def test_external_data_short_file_refused(tmp_path: Path) -> None:
    blob = corpus.externalize(corpus.seed_model("conv_bn"), "d.bin")[1]
    path = _external(tmp_path, "d.bin", blob[:-1])
    _fold_refused(path, tmp_path, "is too short")


def test_external_data_inside_folder_folds(tmp_path: Path) -> None:
    """The control: the same model with its data beside it (in a subfolder, too) folds."""
    blob = corpus.externalize(corpus.seed_model("conv_bn"), "w/d.bin")[1]
    (tmp_path / "in" / "w").mkdir(parents=True)
    path = _external(tmp_path, "w/d.bin", blob)
    out = tmp_path / "out" / "f.onnx"
    code, stderr, _, _ = harness.run_main(["fold", str(path), "-o", str(out)], TIMEOUT_S)
    assert code == 0, stderr
    assert harness.check_output(path, out) == []


def test_tensor_data_size_mismatch_refused(tmp_path: Path) -> None:
    """Inline data that does not match the dims: onnx.checker accepts it, onnxruntime does not.

    Was exit 0, passing the broken tensor through to the output.
    """
    model = corpus.seed_model("conv_bn")
    w = next(t for t in model.graph.initializer if t.name == "B")
    w.raw_data = w.raw_data + b"\0\0\0\0"
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    _fold_refused(path, tmp_path, "tensor 'B' has 20 bytes of data; its dims [4] need 16")


@pytest.mark.parametrize("field", ["producer_version", "node_name", "metadata"])
def test_text_that_is_not_utf8_is_refused(tmp_path: Path, field: str) -> None:
    """protobuf hands over a text field with invalid UTF-8 as bytes, and onnx.checker passes it.

    Was exit 3 (onnx_ir cannot serialize it); found by the long fuzz run on MobileNetV2 (a
    flipped byte in ``producer_version``).
    """
    model = corpus.seed_model("conv_bn")
    model.producer_version = "2.13.0"
    model.graph.node[0].name = "conv_0"
    model.metadata_props.add(key="k", value="value")
    old = {"producer_version": b"2.13.0", "node_name": b"conv_0", "metadata": b"value"}[field]
    data = model.SerializeToString()
    assert data.count(old) == 1
    path = tmp_path / "m.onnx"
    path.write_bytes(data.replace(old, old[:1] + b"\xe8" + old[2:]))
    _fold_refused(path, tmp_path, "is not valid UTF-8")


def test_unknown_external_data_key_is_not_a_stderr_line(tmp_path: Path) -> None:
    """onnx warns about unknown external-data keys; bnfold logs it (``-v``) instead."""
    path = _external(tmp_path, "m.onnx.data")
    (tmp_path / "in" / "m.onnx.data").write_bytes((tmp_path / "outside.bin").read_bytes())
    _set_entry(path, "W", "bogus", "1")
    out = tmp_path / "out" / "f.onnx"
    code, stderr, _, _ = harness.run_main(["fold", str(path), "-o", str(out)], TIMEOUT_S)
    assert code == 0 and stderr == "", stderr


# --------------------------------------------------------------------------------------------
# --max-size
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("500M", 500 * 2**20),
        ("2G", 2 * 2**30),
        ("1048576", 2**20),
        ("1.5K", 1536),
        ("10KB", 10_000),
        ("3MiB", 3 * 2**20),
        ("7b", 7),
        (" 4 k ", 4096),
    ],
)
def test_size_type_parses(text: str, size: int) -> None:
    assert SizeType().convert(text, None, None) == size


@pytest.mark.parametrize("text", ["0", "abc", "5X", "-1", "1.5.2M", ""])
def test_size_type_refuses(tmp_path: Path, text: str) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(corpus.seed_model("conv_bn"), path)
    _fold_refused(path, tmp_path, "--max-size", "--max-size", text)


@pytest.mark.parametrize("command", ["fold", "inspect", "verify"])
def test_max_size_refuses_large_model(tmp_path: Path, command: str) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(corpus.seed_model("three_bn"), path)
    size = path.stat().st_size
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = {
        "fold": ["fold", str(path), "-o", str(out_dir / "f.onnx")],
        "inspect": ["inspect", str(path)],
        "verify": ["verify", str(path), str(path), "--json", str(out_dir / "v.json")],
    }[command]
    code, stderr, _, hung = harness.run_main([*args, "--max-size", str(size - 1)], TIMEOUT_S)
    assert code == 2 and harness.contract(code, stderr, hung, out_dir) == [], stderr
    assert f"over the size limit of {size - 1} bytes" in stderr
    code, stderr, _, _ = harness.run_main([*args, "--max-size", str(size)], TIMEOUT_S)
    assert code == 0, stderr


def test_max_size_counts_external_data_before_reading_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limit covers the external data, checked from the file sizes before any is read."""
    blob = corpus.externalize(corpus.seed_model("conv_bn"), "m.onnx.data")[1]
    path = _external(tmp_path, "m.onnx.data", blob)
    limit = path.stat().st_size + len(blob) - 1

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("external data was read before the size check")

    monkeypatch.setattr(onnx, "load_external_data_for_model", no_reading)
    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_model", no_reading)
    with pytest.raises(BnfoldError, match="with external data is over the size limit"):
        bir.load(path, max_size_bytes=limit)
    monkeypatch.undo()
    bir.load(path, max_size_bytes=limit + 1)


def test_max_size_counts_external_data_without_length(tmp_path: Path) -> None:
    """A tensor without ``length`` reads to the end of its file: that is what counts.

    Was: only ``length`` fields were summed, so such a tensor passed any limit.
    """
    blob = corpus.externalize(corpus.seed_model("conv_bn"), "m.onnx.data")[1]
    path = _external(tmp_path, "m.onnx.data", blob)
    w = onnx.numpy_helper.to_array(corpus.seed_model("conv_bn").graph.initializer[0])
    (tmp_path / "in" / "w.bin").write_bytes(w.tobytes())  # W alone, no offset, no length
    _set_entry(path, "W", "location", "w.bin")
    _set_entry(path, "W", "offset", None)
    _set_entry(path, "W", "length", None)
    limit = path.stat().st_size + len(blob) - 1
    with pytest.raises(BnfoldError, match="size limit"):
        bir.load(path, max_size_bytes=limit)
    bir.load(path, max_size_bytes=limit + 1)


@pytest.mark.parametrize("command", ["fold", "inspect", "verify"])
def test_help_lists_max_size(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0 and "--max-size" in result.output


# --------------------------------------------------------------------------------------------
# output paths and the file system
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["output", "report"])
def test_unwritable_output_is_refused_before_the_work(tmp_path: Path, which: str) -> None:
    """An output under a regular file: exit 2 before anything is written.

    Was exit 3 ("internal error ... report it", a FileExistsError); with ``--report`` there,
    the model was written first and left behind.
    """
    src = tmp_path / "m.onnx"
    onnx.save(corpus.seed_model("three_bn"), src)
    (tmp_path / "afile").write_text("x")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out, report = out_dir / "f.onnx", out_dir / "r.json"
    if which == "output":
        out = tmp_path / "afile" / "f.onnx"
    else:
        report = tmp_path / "afile" / "r.json"
    argv = ["fold", str(src), "-o", str(out), "--report", str(report)]
    code, stderr, _, hung = harness.run_main(argv, TIMEOUT_S)
    assert harness.contract(code, stderr, hung, out_dir) == [] and code == 2, stderr
    assert "is not a directory" in stderr


def test_full_disk_is_bad_input_not_a_bug(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC (or EACCES, EROFS...) while writing: exit 2 naming the file, no temp file left."""
    src = tmp_path / "m.onnx"
    onnx.save(corpus.seed_model("conv_bn"), src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def full(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(os, "replace", full)
    argv = ["fold", str(src), "-o", str(out_dir / "f.onnx")]
    code, stderr, _, hung = harness.run_main(argv, TIMEOUT_S)
    monkeypatch.undo()
    assert harness.contract(code, stderr, hung, out_dir) == [] and code == 2, stderr
    assert "No space left on device" in stderr


def test_click_exception_is_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """click's own exceptions default to exit 1, which here means "a check failed"."""
    from bnfold import pipeline

    def raises(*args: object, **kwargs: object) -> None:
        raise click.FileError("x.onnx", "cannot open")

    monkeypatch.setattr(pipeline, "fold", raises)
    src = tmp_path / "m.onnx"
    onnx.save(corpus.seed_model("conv_bn"), src)
    code, stderr, _, _ = harness.run_main(["fold", str(src), "-o", str(tmp_path / "f.onnx")])
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
