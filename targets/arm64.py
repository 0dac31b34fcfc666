"""aarch64 Linux with NEON, cross-linked with Debian's ``g++-aarch64-linux-gnu``.

On an x86 machine the artifacts run under qemu-user through a small C++ runner
(``targets/runner/runner.cc``) linked against the aarch64 TVM runtime; see
:mod:`bnfold.runtime`. Emulated runs prove the artifact loads and computes the right numbers;
their timings say nothing about real ARM speed.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any

from bnfold.targets._base import Capability, Target, host_arch

GENERIC = "generic"
QEMU = "qemu-aarch64-static"


@dataclass(frozen=True)
class Arm64Target(Target):
    """aarch64 Linux; ``cpu`` picks the LLVM scheduling model (``generic`` runs on any ARMv8-A)."""

    def tvm_target(self) -> dict[str, Any]:
        return {
            "kind": "llvm",
            "mtriple": "aarch64-linux-gnu",
            "mcpu": self.cpu or GENERIC,
            "mattr": ["+neon"],
        }

    def can_run(self) -> Capability:
        if host_arch() == "aarch64":
            return super().can_run()
        if shutil.which(QEMU) is None:
            return Capability(False, f"{QEMU} not found; run `make cross-tools`")
        built = self.can_build()
        if not built:
            return Capability(False, f"the qemu runner cannot be built: {built.why}")
        return Capability(True, f"emulated with {QEMU}")


ARM64 = Arm64Target(
    name="arm64",
    summary="aarch64 Linux with NEON (Raspberry Pi 3/4/5, Jetson, Graviton)",
    device="cpu",
    arch="aarch64",
    cpus=(GENERIC, "cortex-a53", "cortex-a55", "cortex-a72", "cortex-a76", "neoverse-n1"),
    cross_compiler="aarch64-linux-gnu-g++",
    runner="qemu",
    debian_packages=("g++-aarch64-linux-gnu", "qemu-user-static"),
    llvm_triple="aarch64-linux-gnu",
)


@dataclass(frozen=True)
class Armv7Target(Target):
    """32-bit ARMv7-A Linux, hard-float ABI with NEON. Builds only: no armv7 TVM runtime wheel."""

    def tvm_target(self) -> dict[str, Any]:
        return {
            "kind": "llvm",
            "mtriple": "armv7a-linux-gnueabihf",
            "mcpu": self.cpu or "cortex-a7",
            "mattr": ["+neon"],
            # Without the hard-float ABI the link against the system libraries fails.
            "mfloat-abi": "hard",
        }

    def can_run(self) -> Capability:
        if host_arch() == "armv7l":
            return super().can_run()
        return Capability(False, "no armv7 TVM runtime is published to run it under qemu")


ARMV7 = Armv7Target(
    name="armv7",
    summary="32-bit ARMv7-A Linux, hard-float, NEON (build only here)",
    device="cpu",
    arch="armv7l",
    cpus=("cortex-a7", "cortex-a9", "cortex-a53", "cortex-a72"),
    cross_compiler="arm-linux-gnueabihf-g++",
    runner="none",
    debian_packages=("g++-arm-linux-gnueabihf",),
    llvm_triple="armv7a-linux-gnueabihf",
)
