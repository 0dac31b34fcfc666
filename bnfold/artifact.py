"""The manifest of a compiled folder: :class:`Manifest`, :func:`load` and :func:`save`.

``bnfold compile`` writes ``OUTDIR/manifest.json`` beside the library; ``bnfold run``,
``deploy``, ``bench`` and :func:`bnfold.runtime.load` read it. This module is the one place that
knows its file name and its shape:

* :func:`save` writes it (indented, key-sorted JSON, atomically);
* :func:`load` reads it and checks, once, every field a reader relies on (target spec, arch
  and device; the artifact's files as plain names in the folder; the inputs' and outputs'
  names, shapes and dtypes; the thread count). The manifest is a file the user hands over: a
  hand-edited or foreign one is one line (:class:`~bnfold.errors.BnfoldError`, exit 2), never
  a KeyError later;
* readers use attributes (``manifest.spec``, ``manifest.input_specs``, ``manifest.library``).

It needs only numpy (it is part of what :mod:`bnfold.runtime` loads on a device).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from bnfold import atomic
from bnfold.errors import BnfoldError

MANIFEST = "manifest.json"
FORMAT = "bnfold.compiled/1"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the manifest records it."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclasses.dataclass
class Manifest:
    """What ``bnfold compile`` wrote and how it went; ``OUTDIR/manifest.json`` on disk.

    The fields are the JSON object's keys (``outdir``, where it was written or read, is not
    saved: the folder can move). The sections stay JSON objects (their keys are documented
    where they are made, in :mod:`bnfold.lower.compiler`); the properties are the values that
    :func:`load` checks.
    """

    target: dict[str, Any]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    artifact: dict[str, Any]
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    folded: dict[str, Any] = dataclasses.field(default_factory=dict)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    fold_report: dict[str, Any] = dataclasses.field(default_factory=dict)
    compile: dict[str, Any] = dataclasses.field(default_factory=dict)
    verification: dict[str, Any] = dataclasses.field(default_factory=dict)
    runtime: dict[str, Any] = dataclasses.field(default_factory=dict)
    format: str = FORMAT
    outdir: str = ""

    @property
    def spec(self) -> str:
        """The target as given to compile, e.g. ``arm64:cortex-a72``."""
        return str(self.target["spec"])

    @property
    def arch(self) -> str:
        """The code's architecture (``x86_64``, ``aarch64``)."""
        return str(self.target["arch"])

    @property
    def device(self) -> str:
        """``cpu`` or ``cuda``."""
        return str(self.target["device"])

    @property
    def tvm_target(self) -> dict[str, Any]:
        """TVM's target dict (``mcpu``, ``mtriple``, ...); empty when not recorded."""
        return dict(self.target.get("tvm") or {})

    @property
    def files(self) -> dict[str, str]:
        """Role -> file name in the folder (``library``; CUDA adds ``fatbin``)."""
        return dict(self.artifact["files"])

    @property
    def library(self) -> str:
        """The library's file name in the folder."""
        return str(self.artifact["files"]["library"])

    @property
    def threads(self) -> int | None:
        """The CPU threads compile chose (``--threads``); None: all of the device's cores."""
        return (self.runtime or {}).get("threads")

    @property
    def input_specs(self) -> list[TensorSpec]:
        """The inputs, in the order the library takes them."""
        return [_spec(t) for t in self.inputs]

    @property
    def output_specs(self) -> list[TensorSpec]:
        """The outputs, in the order the library returns them."""
        return [_spec(t) for t in self.outputs]

    @property
    def int8(self) -> dict[str, Any]:
        """``compile.int8`` (how the quantized groups were lowered); empty for a float model."""
        return dict((self.compile or {}).get("int8") or {})

    @property
    def verified(self) -> bool | None:
        """True/False after a verification, None when it was skipped."""
        status = self.verification.get("status")
        return None if status == "not verified" else status == "passed"

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (without ``outdir``)."""
        d = dataclasses.asdict(self)
        d.pop("outdir")
        return d

    def __getitem__(self, key: str) -> Any:
        """The JSON object's ``key`` (``manifest["compile"]``), as when
        ``bnfold.runtime.load(...).manifest`` was the parsed dict: that public API is unchanged."""
        if key == "outdir" or key not in _SAVED:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        """``self[key]``, or ``default`` for a key the JSON object does not have."""
        try:
            return self[key]
        except KeyError:
            return default

    def check_files(self, outdir: str | os.PathLike[str]) -> None:
        """Refuse an artifact file that is missing or differs from the recorded sha256.

        Loading a truncated shared library can kill the process with SIGBUS (no message at
        all); a checksum mismatch is found before the library is mapped.
        """
        sums = self.artifact.get("sha256") or {}
        for name in self.files.values():
            path = Path(outdir) / name
            if not path.is_file():
                raise BnfoldError(f"{path}: missing; the folder is not a complete compile output")
            want = sums.get(name) if isinstance(sums, dict) else None
            if want is not None and sha256_file(path) != want:
                raise BnfoldError(
                    f"{path}: does not match the manifest's sha256 (truncated or modified)"
                )


_SAVED = frozenset(f.name for f in dataclasses.fields(Manifest)) - {"outdir"}


def _spec(t: dict[str, Any]) -> TensorSpec:
    return TensorSpec(t["name"], tuple(t["shape"]), t["dtype"])


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(manifest: Manifest, outdir: str | os.PathLike[str]) -> Path:
    """Write ``outdir/manifest.json`` atomically; returns its path."""
    path = Path(outdir) / MANIFEST
    atomic.write_json(path, manifest.to_dict())
    return path


def load(outdir: str | os.PathLike[str]) -> Manifest:
    """The manifest of a compiled folder, checked (see the module doc).

    Raises:
        BnfoldError: No manifest, an unreadable one, or one a reader could not use.
    """
    path = Path(outdir) / MANIFEST
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise BnfoldError(f"{outdir} holds no {MANIFEST}: not a `bnfold compile` output") from None
    except (OSError, ValueError) as e:
        raise BnfoldError(f"cannot read {path}: {e}") from None
    why = problem(raw)
    if why:
        raise BnfoldError(f"{path}: not a valid `bnfold compile` manifest ({why})")
    fields = {f.name for f in dataclasses.fields(Manifest)} - {"outdir"}
    # Sections a reader does not rely on may be absent (or null) in a foreign manifest.
    known = {k: v for k, v in raw.items() if k in fields and v is not None}
    return Manifest(**known, outdir=str(outdir))


def problem(manifest: Any) -> str:
    """What makes the JSON value ``manifest`` unusable for loading and running ('' if
    nothing)."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    target = manifest.get("target")
    if not isinstance(target, dict) or not all(
        isinstance(target.get(k), str) for k in ("spec", "arch", "device")
    ):
        return "no target with spec, arch and device"
    if not isinstance(target.get("tvm", {}), dict):
        return "target.tvm is not an object"
    runtime = manifest.get("runtime") or {}
    threads = runtime.get("threads") if isinstance(runtime, dict) else "?"
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        return "runtime.threads is not a positive integer"
    files = (manifest.get("artifact") or {}).get("files") if isinstance(
        manifest.get("artifact"), dict) else None  # fmt: skip
    if not isinstance(files, dict) or not isinstance(files.get("library"), str):
        return "no artifact library"
    if any(not isinstance(f, str) or Path(f).name != f for f in files.values()):
        return "an artifact file name is not a plain name in the folder"
    for key in ("inputs", "outputs"):
        specs = manifest.get(key)
        if not isinstance(specs, list):
            return f"no {key} list"
        for spec in specs:
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                return f"an entry of {key} has no name"
            shape = spec.get("shape")
            if not isinstance(shape, list) or any(
                not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape
            ):
                return f"{key[:-1]} '{spec['name']}' has no shape of non-negative integers"
            try:
                np.dtype(spec.get("dtype"))
            except TypeError:
                return f"{key[:-1]} '{spec['name']}' has an unknown dtype"
    for key in ("source", "folded", "versions", "fold_report", "compile", "verification"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            return f"{key} is not an object"
    if not isinstance(manifest.get("format", FORMAT), str):
        return "format is not a string"
    return ""
