"""Compilation targets, one per file; the registry below is the only way they are found.

``--target`` takes ``NAME`` or ``NAME:CPU`` (``arm64:cortex-a72``, ``cuda:sm_90``, ``x86:znver3``);
:func:`get` parses it.
"""

from __future__ import annotations

from bnfold.errors import BnfoldError
from bnfold.targets._base import Capability, Target, host_arch
from bnfold.targets.arm64 import ARM64, ARMV7
from bnfold.targets.cuda import CUDA
from bnfold.targets.x86 import X86

TARGETS: dict[str, Target] = {
    "x86": X86,
    "arm64": ARM64,
    "armv7": ARMV7,
    "cuda": CUDA,
}


def get(spec: str) -> Target:
    """The target for ``NAME`` or ``NAME:CPU``; raises :class:`BnfoldError` if unknown."""
    name, _, cpu = spec.partition(":")
    if name not in TARGETS:
        raise BnfoldError(f"unknown target '{name}' (known: {', '.join(TARGETS)})")
    target = TARGETS[name]
    return target.with_cpu(cpu) if cpu else target


__all__ = ["TARGETS", "Capability", "Target", "get", "host_arch"]
