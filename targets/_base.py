"""The Target type: what TVM compiles for, how the artifact is linked, and how it is run.

A target is a frozen dataclass; the registry in ``bnfold.targets`` maps a name to one default
instance, and ``with_cpu`` derives a variant (``arm64:cortex-a72``, ``cuda:sm_90``). Nothing here
imports tvm at module level: ``bnfold targets`` and the CLI must start fast, and the checks that
need tvm (``can_build``) only look for it.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib.util
import logging
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bnfold.atomic import atomic_path
from bnfold.errors import BnfoldError

logger = logging.getLogger(__name__)

# How an artifact is run on this machine: in this process ("native"), through the aarch64
# runner under qemu-user ("qemu"), or on a CUDA GPU in this process ("gpu").
Runner = Literal["native", "qemu", "gpu", "none"]

LIBRARY = "model.so"


@dataclass(frozen=True)
class Exported:
    """What ``Target.export`` wrote: role -> file (``"library"`` is what the runtime loads),
    and facts the runtime needs later (kept in the manifest)."""

    files: dict[str, Path]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Capability:
    """Whether something is possible here, and if not (or only with a caveat), why."""

    ok: bool
    why: str = ""

    def __bool__(self) -> bool:
        return self.ok


def host_arch() -> str:
    """This machine's architecture in GNU spelling (``x86_64``, ``aarch64``)."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def tvm_installed() -> Capability:
    """Whether apache-tvm (and onnxscript, which lowering uses to freeze shapes) can be imported;
    checked without importing them: tvm takes seconds."""
    for module, dist in (("tvm", "apache-tvm"), ("onnxscript", "onnxscript")):
        if importlib.util.find_spec(module) is None:
            return Capability(False, f"{dist} is not installed; pip install 'bnfold[tvm]'")
    return Capability(True)


@dataclass(frozen=True)
class Target(abc.ABC):
    """A compilation target.

    Attributes:
        name: Registry key, e.g. ``"arm64"``.
        summary: One line for ``bnfold targets``.
        device: TVM device the Relax VM runs on: ``"cpu"`` or ``"cuda"``.
        arch: GNU architecture the artifact's host code runs on (``x86_64``, ``aarch64``).
        cpu: LLVM ``mcpu`` for CPU targets, CUDA ``arch`` for GPU targets; ``""`` means the
            target's default (for x86: detect this machine's CPU at build time).
        cpus: Known values for ``cpu``, shown by ``bnfold targets`` and accepted by ``with_cpu``.
        cross_compiler: The C++ compiler that links the exported library (None: TVM's default,
            the host ``g++``).
        runner: How the artifact runs when the machine can run it (see :data:`Runner`).
        debian_packages: What ``make cross-tools`` installs for this target.
        llvm_triple: The LLVM triple (CPU targets), to accept any CPU LLVM knows for it.
    """

    name: str
    summary: str
    device: Literal["cpu", "cuda"]
    arch: str
    cpu: str = ""
    cpus: tuple[str, ...] = ()
    cross_compiler: str | None = None
    runner: Runner = "native"
    debian_packages: tuple[str, ...] = ()
    llvm_triple: str | None = None

    @property
    def spec(self) -> str:
        """``name`` or ``name:cpu``: the string ``--target`` accepts."""
        return f"{self.name}:{self.cpu}" if self.cpu else self.name

    def with_cpu(self, cpu: str) -> Target:
        """This target with ``cpu`` set: one of :attr:`cpus`, or any CPU LLVM knows for
        :attr:`llvm_triple` (``x86:alderlake``, ``arm64:cortex-a78``)."""
        if cpu not in self.cpus and not self._llvm_knows(cpu):
            known = ", ".join(self.cpus) or "none"
            raise BnfoldError(f"target '{self.name}' has no cpu/arch '{cpu}' (known: {known})")
        return dataclasses.replace(self, cpu=cpu)

    def _llvm_knows(self, cpu: str) -> bool:
        if not self.llvm_triple or not cpu or not tvm_installed():
            return False
        from tvm.target import codegen

        try:
            return bool(codegen.llvm_is_valid_cpu(cpu, self.llvm_triple))
        except Exception:
            return False

    def resolved(self) -> Target:
        """This target with defaults that depend on the machine filled in (x86: the host CPU)."""
        return self

    @abc.abstractmethod
    def tvm_target(self) -> dict[str, Any]:
        """The TVM target as a dict (TVM 0.27 rejects the old target strings)."""

    def tvm_host(self) -> dict[str, Any] | None:
        """The host target for device code, or None when the target is its own host."""
        return None

    def can_build(self) -> Capability:
        """Whether this machine can build (compile and link) for the target."""
        ok = tvm_installed()
        if not ok:
            return ok
        if self.cross_compiler and shutil.which(self.cross_compiler) is None:
            return Capability(False, f"{self.cross_compiler} not found; run `make cross-tools`")
        return Capability(True)

    def can_run(self) -> Capability:
        """Whether this machine can run the target's artifacts, and how."""
        if self.arch != host_arch():
            return Capability(False, f"artifacts are {self.arch}, this machine is {host_arch()}")
        return tvm_installed()

    def export(self, executable: Any, outdir: Path) -> Exported:
        """Write the deployable files for ``executable`` (a ``tvm.relax.VMExecutable``).

        Each file is written to a temp name and renamed.
        """
        fcompile = None
        if self.cross_compiler:
            from tvm.support import cc

            fcompile = cc.cross_compiler(self.cross_compiler)
        path = outdir / LIBRARY
        # TVM picks the link step from the suffix, so the temp name must end in .so too.
        with atomic_path(path, suffix=".so") as tmp:
            executable.export_library(str(tmp), fcompile=fcompile)
        return Exported({"library": path})
