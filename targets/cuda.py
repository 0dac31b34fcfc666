"""CUDA through TVM's CUDA codegen, with GPU schedules from dlight's default rules.

Builds without a GPU: the exported library carries the CUDA C source, and when ``nvcc`` is
present the source is also compiled ahead of time to ``model.fatbin`` (SASS for ``arch`` plus
PTX for newer GPUs), so the GPU machine needs neither nvcc nor NVRTC.
:func:`bnfold.runtime.load` hands the fatbin to TVM when the library is loaded.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnfold.atomic import atomic_path
from bnfold.errors import BnfoldError
from bnfold.targets._base import LIBRARY, Capability, Exported, Target, host_arch, tvm_installed

logger = logging.getLogger(__name__)

FATBIN = "model.fatbin"
NVCC_TIMEOUT_S = 600


def cuda_source(executable: Any) -> str | None:
    """The CUDA C source held by an executable's device module, or None if it has none."""
    stack = [executable.mod]
    while stack:
        mod = stack.pop()
        if mod.kind == "cuda":
            return str(mod.inspect_source("cuda"))
        stack.extend(mod.imports)
    return None


def nvcc_fatbin(source: str, arch: str, out: Path) -> None:
    """Compile CUDA ``source`` to a fatbin with SASS for ``arch`` and PTX for newer GPUs."""
    num = arch.removeprefix("sm_")
    with tempfile.TemporaryDirectory(prefix="bnfold-nvcc-") as tmp:
        cu = Path(tmp) / "model.cu"
        cu.write_text(source)
        cmd = [
            "nvcc", "--fatbin", "-O3",
            "-gencode", f"arch=compute_{num},code=[sm_{num},compute_{num}]",
            # The same relaxations TVM's own nvcc call uses, minus --use_fast_math: the
            # artifact is verified against onnxruntime, so keep IEEE division and sqrt.
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "--expt-relaxed-constexpr", "-o", str(out), str(cu),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=NVCC_TIMEOUT_S)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise BnfoldError(f"nvcc failed for {arch}: {' | '.join(tail)}")


@dataclass(frozen=True)
class CudaTarget(Target):
    """NVIDIA GPU; ``cpu`` is the CUDA arch (``sm_80``); the host side is generic x86-64."""

    def tvm_target(self) -> dict[str, Any]:
        # What the nvidia/* tags set; without them TVM warns and guesses per kernel.
        return {
            "kind": "cuda",
            "arch": self.cpu or "sm_80",
            "max_num_threads": 1024,
            "max_threads_per_block": 1024,
            "thread_warp_size": 32,
            "max_shared_memory_per_block": 49152,
            "registers_per_block": 65536,
        }

    def tvm_host(self) -> dict[str, Any]:
        # Generic: GPU servers' CPUs differ from the build machine's.
        return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"}

    def can_build(self) -> Capability:
        ok = tvm_installed()
        if ok and shutil.which("nvcc") is None:
            return Capability(True, "nvcc not found: CUDA source only, compiled at load time")
        return ok

    def can_run(self) -> Capability:
        if host_arch() != self.arch:
            return Capability(False, f"artifacts are {self.arch}, this machine is {host_arch()}")
        ok = tvm_installed()
        if not ok:
            return ok
        import tvm

        if not tvm.runtime.enabled("cuda"):
            return Capability(False, "no CUDA driver here: libcuda.so.1 not found")
        if not tvm.cuda(0).exist:
            return Capability(False, "no CUDA GPU found")
        return Capability(True)

    def export(self, executable: Any, outdir: Path) -> Exported:
        exported = super().export(executable, outdir)
        source = cuda_source(executable)
        if source is None:  # no kernel at all (a model of only reshapes): nothing to compile
            return exported
        # The runtime recognises the source TVM hands to its compile callback by this hash.
        meta = {"cuda_source_sha256": hashlib.sha256(source.encode()).hexdigest()}
        if shutil.which("nvcc") is None:
            logger.warning("nvcc not found: %s holds CUDA source only", LIBRARY)
            return Exported(exported.files, meta)
        path = outdir / FATBIN
        with atomic_path(path, suffix=".fatbin") as tmp:
            nvcc_fatbin(source, self.cpu or "sm_80", tmp)
        return Exported({**exported.files, "fatbin": path}, meta)


CUDA = CudaTarget(
    name="cuda",
    summary="NVIDIA GPU (CUDA), x86-64 host; ahead-of-time fatbin when nvcc is present",
    device="cuda",
    arch="x86_64",
    cpu="sm_80",
    cpus=("sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_90a", "sm_100", "sm_120"),
    runner="gpu",
)
