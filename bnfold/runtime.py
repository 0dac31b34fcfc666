"""Load and run what ``bnfold compile`` wrote: ``load(OUTDIR)`` returns a numpy-in, numpy-out model.

This module needs only the TVM runtime and numpy (no onnx, no onnxruntime). How the artifact
runs depends on its target and on this machine:

- native (x86 on x86, arm64 on aarch64, cuda with a GPU): in this process, via the Relax VM;
- arm64 on x86: a small C++ runner (``targets/runner/runner.cc``), cross-compiled once against
  the aarch64 TVM runtime from PyPI and cached, run under ``qemu-aarch64-static``. Tensors go
  through files in a small binary format (see :func:`write_tensors`).
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import hashlib
import importlib.metadata
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import bnfold.targets
from bnfold import artifact
from bnfold.artifact import Manifest, TensorSpec
from bnfold.errors import BnfoldError
from bnfold.targets import host_arch
from bnfold.targets.x86 import detect_cpu

logger = logging.getLogger(__name__)

QEMU = "qemu-aarch64-static"
AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"
RUNNER_TIMEOUT_S = 3600

# --- tensor files for the runner -------------------------------------------------------------
# "BNT1", u32 count; per tensor: u8 DLPack type code, u8 bits, u16 lanes, u32 ndim,
# i64 shape[ndim], u64 nbytes, raw little-endian data.
_DL_CODE = {"i": 0, "u": 1, "f": 2, "b": 1}
_NP_KIND = {0: "i", 1: "u", 2: "f"}


def _contiguous(a: np.ndarray) -> np.ndarray:
    # Not np.ascontiguousarray: it turns 0-d arrays into 1-d ones.
    a = np.asarray(a)
    return a if a.flags.c_contiguous else a.copy(order="C")


def write_tensors(path: str | os.PathLike[str], arrays: Sequence[np.ndarray]) -> None:
    """Write ``arrays`` in the runner's tensor-file format."""
    with open(path, "wb") as f:
        f.write(b"BNT1" + struct.pack("<I", len(arrays)))
        for a in arrays:
            a = _contiguous(a)
            if a.dtype.kind not in _DL_CODE or a.dtype.byteorder == ">":
                raise BnfoldError(f"cannot pass a {a.dtype} tensor to the runner")
            bits = 1 if a.dtype.kind == "b" else a.dtype.itemsize * 8
            f.write(struct.pack("<BBHI", _DL_CODE[a.dtype.kind], bits, 1, a.ndim))
            f.write(struct.pack(f"<{a.ndim}q", *a.shape))
            f.write(struct.pack("<Q", a.nbytes))
            f.write(a.tobytes())


def read_tensors(path: str | os.PathLike[str]) -> list[np.ndarray]:
    """Read a tensor file written by the runner (or by :func:`write_tensors`)."""
    data = Path(path).read_bytes()
    if data[:4] != b"BNT1":
        raise BnfoldError(f"{path} is not a tensor file")
    (count,) = struct.unpack_from("<I", data, 4)
    pos, out = 8, []
    for _ in range(count):
        code, bits, _lanes, ndim = struct.unpack_from("<BBHI", data, pos)
        pos += 8
        shape = struct.unpack_from(f"<{ndim}q", data, pos)
        pos += 8 * ndim
        (nbytes,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        dtype = np.dtype(bool) if bits == 1 else np.dtype(f"<{_NP_KIND[code]}{bits // 8}")
        out.append(np.frombuffer(data, dtype, count=int(np.prod(shape)), offset=pos).reshape(shape))
        pos += nbytes
    return out


# --- the aarch64 runner, built once and cached -----------------------------------------------


def cache_dir() -> Path:
    """Where bnfold caches what it builds: ``$BNFOLD_CACHE``, else ``~/.cache/bnfold``."""
    env = os.environ.get("BNFOLD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "bnfold"


def _runner_source() -> Path:
    return Path(bnfold.targets.__file__).parent / "runner" / "runner.cc"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock across processes (two test workers must not build the runner twice)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: list[str], what: str, timeout: float = 600, **kwargs: Any) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise BnfoldError(f"{what} failed (exit {proc.returncode}): {' | '.join(tail)}")


def aarch64_runner() -> Path:
    """The cached aarch64 runner folder (``runner`` + ``lib/``), built on first use.

    The first call downloads the aarch64 ``apache-tvm`` and ``apache-tvm-ffi`` wheels of the
    installed versions (about 100 MB, with pip), keeps their two runtime libraries and the
    ``tvm/ffi`` headers, and cross-compiles the runner: under a minute. Later calls return the
    cached folder at once.
    """
    source = _runner_source()
    versions = (
        importlib.metadata.version("apache-tvm"),
        importlib.metadata.version("apache-tvm-ffi"),
    )
    key = hashlib.sha256(source.read_bytes() + repr(versions).encode()).hexdigest()[:12]
    root = cache_dir() / "aarch64-runner"
    final = root / f"tvm-{versions[0]}-{key}"
    if (final / "runner").is_file():
        return final
    compiler = "aarch64-linux-gnu-g++"
    if shutil.which(compiler) is None:
        raise BnfoldError(f"{compiler} not found; run `make cross-tools`")
    with _locked(root / ".lock"):
        if (final / "runner").is_file():
            return final
        logger.info("building the aarch64 runner into %s (once)", final)
        with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as tmp:
            work = Path(tmp)
            _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                  "--only-binary=:all:", "--platform", "manylinux_2_28_aarch64",
                  "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}",
                  f"apache-tvm=={versions[0]}", f"apache-tvm-ffi=={versions[1]}",
                  "-d", str(work / "wheels")], "pip download of aarch64 TVM wheels")  # fmt: skip
            out = work / "out"
            (out / "lib").mkdir(parents=True)
            for wheel in (work / "wheels").glob("*.whl"):
                with zipfile.ZipFile(wheel) as z:
                    for name in z.namelist():
                        if name in ("tvm/lib/libtvm_runtime.so", "tvm_ffi/lib/libtvm_ffi.so"):
                            (out / "lib" / Path(name).name).write_bytes(z.read(name))
                        elif name.startswith("tvm_ffi/include/"):
                            z.extract(name, work)
            if len(list((out / "lib").iterdir())) != 2:
                raise BnfoldError("the aarch64 TVM wheels lack libtvm_runtime.so/libtvm_ffi.so")
            _run([compiler, "-std=c++17", "-O2", f"-I{work / 'tvm_ffi' / 'include'}", str(source),
                  "-o", str(out / "runner"), f"-L{out / 'lib'}", "-ltvm_runtime", "-ltvm_ffi",
                  "-Wl,-rpath,$ORIGIN/lib"], "cross-compiling the aarch64 runner")  # fmt: skip
            shutil.rmtree(final, ignore_errors=True)
            os.replace(out, final)
    return final


# --- loaded models ---------------------------------------------------------------------------


class CompiledModel(abc.ABC):
    """A compiled model: call it with numpy arrays, get a dict of output name -> numpy array.

    ``model(x)`` takes inputs in manifest order, ``model(x=...)`` by name, and so does
    ``model.run({"x": x})``.
    """

    def __init__(self, outdir: Path, manifest: Manifest) -> None:
        self.outdir = outdir
        self.manifest = manifest
        self.target: str = manifest.spec
        # CPU threads it runs with (None: the runtime's default).
        self.threads: int | None = None
        self.inputs: list[TensorSpec] = manifest.input_specs
        self.outputs: list[TensorSpec] = manifest.output_specs

    def __call__(self, *args: np.ndarray, **kwargs: np.ndarray) -> dict[str, np.ndarray]:
        if args and kwargs:
            raise BnfoldError("pass inputs either in order or by name, not both")
        if args:
            if len(args) != len(self.inputs):
                raise BnfoldError(f"expected {len(self.inputs)} inputs, got {len(args)}")
            kwargs = {s.name: a for s, a in zip(self.inputs, args, strict=True)}
        return self.run(kwargs)

    def _arrays(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        missing = [s.name for s in self.inputs if s.name not in inputs]
        extra = sorted(set(inputs) - {s.name for s in self.inputs})
        if missing or extra:
            raise BnfoldError(f"inputs do not match the model: missing {missing}, unknown {extra}")
        arrays = []
        for spec in self.inputs:
            a = np.asarray(inputs[spec.name])
            if tuple(a.shape) != spec.shape or a.dtype != np.dtype(spec.dtype):
                raise BnfoldError(
                    f"input '{spec.name}' is {a.dtype}{list(a.shape)}, the model was compiled "
                    f"for {spec.dtype}{list(spec.shape)}"
                )
            arrays.append(_contiguous(a))
        return arrays

    def _named(self, results: list[np.ndarray]) -> dict[str, np.ndarray]:
        if len(results) != len(self.outputs):
            raise BnfoldError(
                f"the artifact returned {len(results)} outputs, expected {len(self.outputs)}"
            )
        return {s.name: r for s, r in zip(self.outputs, results, strict=True)}

    @abc.abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; ``inputs`` maps every input name to an array of the compiled shape/dtype."""


def set_threads(threads: int | None) -> int:
    """Make TVM's CPU thread pool (of the calling thread) use ``threads`` threads; returns the
    number it uses. None: TVM's default.

    The pool's size is fixed when it starts, from ``TVM_NUM_THREADS`` (default: half the logical
    CPUs on x86, counting hyper-threads); ``runtime.config_threadpool`` can then only lower the
    count in use. So the variable is set first (it counts if no TVM parallel code has run yet in
    this process), then the pool is configured; a smaller count than asked is logged.
    """
    import tvm
    import tvm_ffi

    if threads is None:
        return int(tvm.runtime.num_threads())
    if threads < 1:
        raise BnfoldError(f"threads must be >= 1, got {threads}")
    os.environ["TVM_NUM_THREADS"] = str(threads)
    # Mode 1 (big cores: all of them on a homogeneous CPU), then the count.
    tvm_ffi.get_global_func("runtime.config_threadpool")(1, threads)
    got = int(tvm.runtime.num_threads())
    if got != threads:
        logger.warning("TVM's thread pool uses %d threads, not %d: it was started earlier in "
                       "this process with fewer (set TVM_NUM_THREADS before the first run)",
                       got, threads)  # fmt: skip
    return got


class VMModel(CompiledModel):
    """Runs in this process on the CPU or a CUDA GPU through the Relax VM."""

    def __init__(
        self,
        outdir: Path,
        manifest: Manifest,
        device_id: int = 0,
        threads: int | None = None,
    ) -> None:
        super().__init__(outdir, manifest)
        import tvm

        if manifest.device == "cuda":
            if not tvm.runtime.enabled("cuda") or not tvm.cuda(device_id).exist:
                raise BnfoldError(f"{outdir} is a CUDA build ({self.target}) and this machine "
                                  f"has no usable CUDA GPU/driver")  # fmt: skip
            _register_fatbin(outdir, manifest)
            self.device = tvm.cuda(device_id)
        else:
            self.device = tvm.cpu(device_id)
            self.threads = set_threads(threads)
        # Only CPU models (with a count asked for) re-apply it before each run.
        self._threads_asked = threads if self.device.dlpack_device_type() == 1 else None
        _warn_if_foreign_cpu(manifest)
        lib = tvm.runtime.load_module(str(outdir / manifest.library))
        self.vm = tvm.relax.VirtualMachine(lib, self.device)
        self._main = self.vm["main"]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tvm

        # The pool is shared by every model in this thread: take back this model's count if
        # another model (or thread) changed it since.
        if self._threads_asked is not None and tvm.runtime.num_threads() != self.threads:
            set_threads(self.threads)
        args = [tvm.runtime.tensor(a, self.device) for a in self._arrays(inputs)]
        return self._named([t.numpy() for t in _flatten(self._main(*args))])


def _warn_if_foreign_cpu(manifest: Manifest) -> None:
    """Code tuned for another x86 CPU may use instructions this one lacks (AVX-512 on an AVX2
    machine): the process would die of SIGILL, so say so first."""
    cpu = manifest.tvm_target.get("mcpu", "")
    if manifest.arch != "x86_64" or cpu in ("", "x86-64"):
        return

    here = detect_cpu()
    if cpu != here:
        logger.warning("%s was compiled for %s, this CPU is %s: if it lacks an instruction set "
                       "the code uses, the process will stop with an illegal instruction",
                       manifest.spec, cpu, here)  # fmt: skip


def _flatten(value: Any) -> list[Any]:
    if hasattr(value, "numpy"):
        return [value]
    return [t for item in value for t in _flatten(item)]


_FATBINS: dict[str, bytes] = {}


def _register_fatbin(outdir: Path, manifest: Manifest) -> None:
    """Let TVM take the ahead-of-time fatbin instead of compiling the CUDA source at load time.

    TVM compiles a library's CUDA source through the ``tvm_callback_cuda_compile`` global
    (nvrtc or nvcc) when it loads it; this wraps that callback to answer with ``model.fatbin``
    for the exact source it was built from (matched by sha256), and to defer otherwise.
    """
    files, meta = manifest.files, manifest.artifact.get("meta") or {}
    if "fatbin" not in files or "cuda_source_sha256" not in meta:
        return
    import tvm_ffi
    from tvm.support import nvcc

    _FATBINS[meta["cuda_source_sha256"]] = (outdir / files["fatbin"]).read_bytes()

    def compile_cuda(code: str) -> bytes:
        key = hashlib.sha256(str(code).encode()).hexdigest()
        return _FATBINS[key] if key in _FATBINS else nvcc.tvm_callback_cuda_compile(code)

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)


class QemuModel(CompiledModel):
    """Runs an aarch64 artifact on another machine through the cached runner under qemu-user."""

    def __init__(self, outdir: Path, manifest: Manifest, threads: int | None = None) -> None:
        super().__init__(outdir, manifest)
        self.threads = threads
        if shutil.which(QEMU) is None:
            raise BnfoldError(f"{QEMU} not found; run `make cross-tools`")
        self.runner = aarch64_runner()
        self.library = (outdir / manifest.library).resolve()

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = self._arrays(inputs)
        with tempfile.TemporaryDirectory(prefix="bnfold-qemu-") as tmp:
            src, dst = Path(tmp) / "in.bnt", Path(tmp) / "out.bnt"
            write_tensors(src, arrays)
            env = {**os.environ, "LD_LIBRARY_PATH": str(self.runner / "lib")}
            if self.threads is not None:
                env["TVM_NUM_THREADS"] = str(self.threads)
            cmd = [QEMU, "-L", AARCH64_SYSROOT, str(self.runner / "runner"), str(self.library),
                   str(src), str(dst)]  # fmt: skip
            _run(cmd, f"running {self.library.name} under {QEMU}", RUNNER_TIMEOUT_S, env=env)
            return self._named([a.copy() for a in read_tensors(dst)])


def load(
    outdir: str | os.PathLike[str], *, device_id: int = 0, threads: int | None = None
) -> CompiledModel:
    """Load a ``bnfold compile`` output folder and return a callable model.

    Args:
        outdir: The folder holding ``manifest.json`` and the artifact.
        device_id: The GPU to use for CUDA artifacts.
        threads: CPU threads to run with; None: the manifest's ``runtime.threads`` (set by
            ``bnfold compile --threads``), else TVM's default. TVM's thread pool is per
            process (and calling thread): the last model loaded sets it.

    Raises:
        BnfoldError: If the folder is not a compile output, or this machine cannot run it.
    """
    outdir = Path(outdir)
    manifest = artifact.load(outdir)
    manifest.check_files(outdir)
    if threads is None:
        threads = manifest.threads
    arch = manifest.arch
    if arch == host_arch():
        return VMModel(outdir, manifest, device_id, threads)
    if arch == "aarch64":
        return QemuModel(outdir, manifest, threads)
    raise BnfoldError(
        f"{outdir} holds {arch} code ({manifest.spec}), "
        f"which cannot run on this {host_arch()} machine"
    )
