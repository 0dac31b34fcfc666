"""x86-64 through LLVM, tuned for this machine's CPU unless told otherwise.

``mcpu: "native"`` in TVM 0.27 silently falls back to a generic CPU (its default triple is a
conda one), so the host CPU is asked of LLVM explicitly and checked against LLVM's list.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Any

from bnfold.targets._base import Target

logger = logging.getLogger(__name__)

GENERIC = "x86-64"


@functools.cache
def detect_cpu() -> str:
    """LLVM's name for this machine's CPU (``znver4``, ``skylake-avx512``), or ``x86-64``."""
    from tvm.target import codegen

    try:
        cpu = str(codegen.llvm_get_system_cpu())
        if cpu and cpu != "generic" and codegen.llvm_is_valid_cpu(cpu, "x86_64-linux-gnu"):
            return cpu
    except Exception as e:  # an LLVM without the query: still build, just not tuned
        logger.debug("CPU detection failed: %s", e)
        cpu = "?"
    logger.warning("cannot detect the host CPU (LLVM says %r); using generic %s", cpu, GENERIC)
    return GENERIC


@dataclass(frozen=True)
class X86Target(Target):
    """x86-64 Linux; ``cpu`` empty means this machine's CPU."""

    def resolved(self) -> X86Target:
        return self if self.cpu else dataclasses.replace(self, cpu=detect_cpu())

    def tvm_target(self) -> dict[str, Any]:
        cpu = self.resolved().cpu
        return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": cpu}


X86 = X86Target(
    name="x86",
    summary="x86-64 Linux, LLVM for this machine's CPU (or the one named)",
    device="cpu",
    arch="x86_64",
    cpus=(
        GENERIC,
        "x86-64-v2",
        "x86-64-v3",
        "x86-64-v4",
        "haswell",
        "skylake",
        "skylake-avx512",
        "icelake-server",
        "sapphirerapids",
        "znver2",
        "znver3",
        "znver4",
    ),
    runner="native",
    llvm_triple="x86_64-linux-gnu",
)
