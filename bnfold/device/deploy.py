"""Deploy a ``bnfold compile`` folder to a device over TVM RPC, check it there and time it.

:func:`deploy` uploads the artifact (``model.so``) to a TVM RPC server (directly, or through a
tracker by key), loads it on the device in the Relax VM on ``remote.cpu()``, runs it on the given
inputs (or random ones with the manifest's shapes), downloads the outputs and compares them with
onnxruntime on this host running the *unfolded* original (the manifest records its path and
sha256; when that file is gone or changed, ``model.folded.onnx`` from the folder is the
reference and the result says so). Then it times ``main`` on the device with TVM's
``time_evaluator``. :func:`serve` starts a TVM RPC server in this process.

TVM RPC has no authentication: anyone who can reach a server can upload and run any code on it.
Serve on loopback, or on an isolated network, behind a tracker whose key only your clients know.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import statistics
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bnfold import artifact, check
from bnfold.artifact import Manifest, sha256_file
from bnfold.deadline import deadline
from bnfold.errors import BnfoldError
from bnfold.lower import int8 as lower_int8
from bnfold.lower.compiler import FOLDED
from bnfold.rpc import connect

logger = logging.getLogger(__name__)

DEFAULT_ATOL = 0.0
DEFAULT_RTOL = 1e-4
# Seconds one RPC call (connect, upload, load, a run, the timing) may take before deploy gives up.
DEFAULT_TIMEOUT_S = 300.0


@dataclasses.dataclass
class DeployResult:
    """What :func:`deploy` measured."""

    target: str
    device: str
    reference: str
    reference_note: str
    inputs: str
    passed: bool
    worst_ratio: float
    table: str
    latency_ms: dict[str, float]
    upload_s: float
    load_s: float
    run_s: float  # the check run(s): every input slice once
    metrics: dict[str, Any]
    samples: int = 1  # input slices of the compiled shapes that were run and checked
    # int8 artifacts: the layer-by-layer check (the gate), run on the device too.
    layerwise: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


def reference_model(outdir: Path, manifest: Manifest) -> tuple[Path, str]:
    """The model to compare with: the unfolded original recorded in the manifest when it is
    there unchanged, else ``model.folded.onnx`` (with a note saying why)."""
    source = manifest.source
    path = Path(source.get("path", ""))
    if not path.is_absolute() and not path.is_file():
        path = outdir / path.name
    if source.get("path") and path.is_file():
        if sha256_file(path) == source.get("sha256"):
            return path, ""
        note = f"the original {path} changed since compile (sha256 differs)"
    else:
        note = f"the original {source.get('path', '?')} is not available"
    folded = outdir / manifest.folded.get("file", FOLDED)
    if not folded.is_file():
        raise BnfoldError(f"{outdir}: neither the original model nor {folded.name} is available")
    return folded, f"{note}: compared against {folded.name} (the folded model) instead"


def _feeds(
    manifest: Manifest, inputs: str | os.PathLike[str] | Mapping[str, np.ndarray] | None
) -> tuple[list[dict[str, np.ndarray]], str]:
    """The inputs as slices of the compiled shapes (an ``.npz`` may stack N x the compiled batch
    along axis 0, as ``bnfold compile --inputs`` accepts: then N slices), and where they came
    from."""
    specs = manifest.input_specs
    if inputs is None:
        rng = np.random.default_rng(0)
        feeds = {}
        for s in specs:
            dtype = np.dtype(s.dtype)
            if dtype.kind == "f":
                feeds[s.name] = rng.standard_normal(s.shape).astype(dtype)
            else:
                feeds[s.name] = rng.integers(0, 4, s.shape).astype(dtype)
        return [feeds], "random (seed 0)"
    if isinstance(inputs, Mapping):
        feeds, how = dict(inputs), "given"
    else:
        path = Path(inputs)
        if not path.is_file():
            raise BnfoldError(f"{path}: no such inputs file")
        try:
            with np.load(path, allow_pickle=False) as data:
                feeds = {k: data[k] for k in data.files}
        except Exception as e:
            raise BnfoldError(f"{path}: cannot read inputs ({str(e).splitlines()[0]})") from None
        how = str(path)
    stacks = set()
    for s in specs:
        a = feeds.get(s.name)
        if a is None:
            raise BnfoldError(f"inputs have no array '{s.name}' (have {sorted(feeds)})")
        want = list(s.shape)
        # N x the compiled batch along axis 0 (same N for every input) runs in N slices.
        stacked = list(a.shape) == want or (
            a.ndim == len(want) > 0 and want[0] > 0 and list(a.shape[1:]) == want[1:]
            and a.shape[0] % want[0] == 0 and a.shape[0] > 0)  # fmt: skip
        if not stacked or a.dtype != np.dtype(s.dtype):
            raise BnfoldError(f"input '{s.name}' is {a.dtype}{list(a.shape)}, the artifact "
                              f"was compiled for {s.dtype}{want}")  # fmt: skip
        stacks.add(a.shape[0] // want[0] if want and want[0] > 0 else 1)
    if len(stacks) != 1:
        raise BnfoldError(f"the inputs stack different numbers of samples ({sorted(stacks)})")
    (n,) = stacks
    if n == 1:
        return [{s.name: np.ascontiguousarray(feeds[s.name]) for s in specs}], how
    slices = []
    for i in range(n):
        part = {}
        for s in specs:
            b = s.shape[0]
            part[s.name] = np.ascontiguousarray(feeds[s.name][i * b : (i + 1) * b])
        slices.append(part)
    return slices, how


def _flatten(value: Any) -> list[Any]:
    if hasattr(value, "numpy"):
        return [value]
    return [t for item in value for t in _flatten(item)]


def _run(vm: Any, args: list[Any]) -> list[np.ndarray]:
    """``vm["main"](*args)`` as numpy arrays. Through the stateful interface: a tuple result
    of a remote VM comes back as an opaque handle, its fields only one by one."""
    vm.set_input("main", *args)
    vm.invoke_stateful("main")
    return [t.numpy() for t in _flatten(vm.get_outputs("main"))]


def latency_stats(seconds: list[float]) -> dict[str, float]:
    """p50 / p90 / min / max / mean in ms of per-run times given in seconds."""
    ms = sorted(s * 1e3 for s in seconds)
    return {
        "p50": statistics.median(ms),
        "p90": float(np.percentile(ms, 90)),
        "min": ms[0],
        "max": ms[-1],
        "mean": statistics.fmean(ms),
        "samples": len(ms),
    }


def deploy(
    outdir: str | os.PathLike[str],
    rpc: str | None = None,
    *,
    key: str | None = None,
    tracker: str | None = None,
    inputs: str | os.PathLike[str] | Mapping[str, np.ndarray] | None = None,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    warmup: int = 3,
    repeat: int = 20,
    number: int = 1,
    session_timeout: float = 0,
    max_lsb: int = 1,
    timeout: float | None = DEFAULT_TIMEOUT_S,
) -> DeployResult:
    """Upload, load, run, check and time the artifact in ``outdir`` on an RPC device.

    Args:
        outdir: A ``bnfold compile`` output folder.
        rpc: ``HOST:PORT`` of a TVM RPC server (ignored when ``tracker`` is given).
        key: The device key (tracker), or the server's key for a direct connection.
        tracker: ``HOST:PORT`` of a TVM RPC tracker.
        inputs: ``.npz`` path or dict of arrays (the compiled shapes, or N x the compiled batch
            stacked along axis 0: run and checked in N slices); random when None.
        atol: Absolute tolerance of the gate (:func:`bnfold.check.compare_outputs`).
        rtol: Tolerance relative to max|reference|.
        warmup: Untimed runs before timing.
        repeat: Timed measurements (each the mean of ``number`` runs) for p50/p90/min.
        number: Runs per measurement.
        session_timeout: Seconds after which the server may end the session (0: never).
        max_lsb: int8 artifacts (compiled from a QDQ model in integer arithmetic): the gate is
            compile's layer-by-layer check, run on the device with its ``layerwise`` build:
            every quantized tensor within ``max_lsb`` steps of onnxruntime's on the same layer
            inputs (the end-to-end comparison is reported, not gated, as in ``compile``).
        timeout: Seconds each RPC call may take (connect, upload, load, each run, the warm-up,
            the timing); a server that stops answering is a BnfoldError, not a hang. None: no
            limit.

    Raises:
        BnfoldError: Bad folder or inputs, server unreachable, artifact cannot load there.
    """
    import tvm

    out = Path(outdir)
    manifest = artifact.load(out)
    if manifest.device != "cpu":
        raise BnfoldError(f"{out} is a {manifest.device} build: deploy runs CPU "
                          "artifacts (remote.cpu())")  # fmt: skip
    library = out / manifest.library
    if not library.is_file():
        raise BnfoldError(f"{library}: missing")
    slices, how = _feeds(manifest, inputs)
    ref_path, note = reference_model(out, manifest)
    if note:
        logger.info("%s", note)  # printed as a note with the result; not an error line

    where = f"the RPC {'tracker ' + tracker if tracker else 'server ' + str(rpc)}"
    with deadline(timeout, f"connecting to {where}"):
        remote = connect(rpc, key=key, tracker=tracker, session_timeout=session_timeout)
    with _rpc_failures(f"running {library.name} on the RPC device"):
        t0 = time.perf_counter()
        remote_name = f"bnfold-{os.getpid()}-{int(time.time() * 1e3)}-{library.name}"
        with deadline(timeout, f"uploading {library.name} to {where}"):
            remote.upload(str(library), remote_name)
        t1 = time.perf_counter()
        with deadline(timeout, f"loading {library.name} on {where}"):
            dev = remote.cpu()
            lib = remote.load_module(remote_name)
            vm = tvm.relax.VirtualMachine(lib, dev)
        t2 = time.perf_counter()
        runs = []
        for feeds in slices:
            with deadline(timeout, f"running {library.name} on {where}"):
                args = [tvm.runtime.tensor(feeds[s.name], dev) for s in manifest.input_specs]
                runs.append(_run(vm, args))
        t3 = time.perf_counter()
        with deadline(timeout, f"sending the inputs to {where}"):
            args = [tvm.runtime.tensor(slices[0][s.name], dev) for s in manifest.input_specs]
    names = [o.name for o in manifest.output_specs]
    if len(runs[0]) != len(names):
        raise BnfoldError(f"the device returned {len(runs[0])} outputs, expected {len(names)}")
    got = {n: np.concatenate([r[i] for r in runs], axis=0) if len(runs) > 1 else runs[0][i]
           for i, n in enumerate(names)}  # fmt: skip
    refs = [check.run_onnxruntime(ref_path, feeds) for feeds in slices]
    ref = {k: np.concatenate([r[k] for r in refs], axis=0) if len(refs) > 1 else refs[0][k]
           for k in refs[0]}  # fmt: skip
    int8 = manifest.int8
    layerwise = None
    if int8.get("layerwise"):
        with deadline(timeout, f"running the layer-by-layer build on {where}"):
            layerwise = _layerwise_on_device(remote, out / int8["layerwise"], ref_path,
                                             slices[0], max_lsb)  # fmt: skip
        atol, rtol = float("inf"), 0.0  # end to end is reported, not gated (see max_lsb)
    result = check.compare_outputs(ref, got, atol, rtol)
    result.samples = len(slices)

    # The server can die or stop answering here too: one line (exit 2), never a traceback.
    with _rpc_failures(f"timing {library.name} on the RPC device"):
        with deadline(timeout, f"warming up {library.name} on {where}"):
            for _ in range(max(warmup - 1, 0)):  # the time_evaluator does one untimed run more
                vm["main"](*args)
        with deadline(timeout, f"timing {library.name} on {where}"):
            timer = vm.time_evaluator("main", dev, number=number, repeat=repeat)
            latency = latency_stats(list(timer(*args).results))
    with_remove = getattr(remote, "remove", None)
    if with_remove is not None:
        try:
            with deadline(timeout, f"removing {remote_name} on {where}"):
                with_remove(remote_name)
        except Exception:  # the server may keep its temp folder; not worth failing over
            logger.debug("could not remove %s on the device", remote_name)
    # End the RPC session now: a server serves one session at a time, and the VM's stateful
    # calls leave a reference cycle that would keep this one open until the next gc run, so a
    # second deploy from this process would wait forever.
    del remote, vm, lib, args, timer, with_remove
    gc.collect()
    logger.info("deploy %s: %s, p50 %.3f ms", manifest.spec,
                "PASS" if result.passed else "FAIL", latency["p50"])  # fmt: skip
    return DeployResult(
        target=manifest.spec,
        # str(dev) of a remote device is garbled in TVM 0.27 ("remote[0.0078125]:cpu").
        device=f"cpu(0) at {f'tracker {tracker}, key {key!r}' if tracker else rpc}",
        reference=str(ref_path),
        reference_note=note,
        inputs=how,
        passed=result.passed if layerwise is None else layerwise["status"] == "passed",
        worst_ratio=result.worst_ratio,
        table=result.table(),
        latency_ms=latency,
        upload_s=round(t1 - t0, 3),
        load_s=round(t2 - t1, 3),
        run_s=round(t3 - t2, 3),
        metrics=result.to_dict(),
        samples=len(slices),
        layerwise=layerwise,
    )


@contextlib.contextmanager
def _rpc_failures(what: str) -> Iterator[None]:
    """Turn what TVM raises when the device fails or goes away into one BnfoldError line."""
    try:
        yield
    except BnfoldError:
        raise
    except Exception as e:  # TVMError/RuntimeError/OSError with long text
        msg = str(e).strip().splitlines()
        raise BnfoldError(f"{what} failed: {msg[-1] if msg else repr(e)}") from None


def _layerwise_on_device(
    remote: Any, lw_dir: Path, reference: Path, sample: dict[str, np.ndarray], max_lsb: int
) -> dict[str, Any]:
    """Run an int8 artifact's layer-by-layer build on the device with onnxruntime's layer
    inputs (computed here on ``sample``), and compare: :func:`bnfold.lower.int8.layerwise_record`.
    """
    import onnx
    import tvm

    lw = artifact.load(lw_dir)
    library = lw_dir / lw.library
    if not library.is_file():
        raise BnfoldError(f"{library}: missing (the int8 layer-by-layer build)")
    values, cut_feeds = lower_int8.layer_inputs(onnx.load(str(reference)), sample)
    feeds = {**sample, **cut_feeds}
    try:
        name = f"bnfold-{os.getpid()}-{int(time.time() * 1e3)}-layerwise-{library.name}"
        remote.upload(str(library), name)
        dev = remote.cpu()
        vm = tvm.relax.VirtualMachine(remote.load_module(name), dev)
        args = [tvm.runtime.tensor(feeds[s.name], dev) for s in lw.input_specs]
        outs = _run(vm, args)
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise BnfoldError(f"running the layer-by-layer build on the RPC device failed: "
                          f"{msg[-1] if msg else repr(e)}") from None  # fmt: skip
    got = dict(zip([o.name for o in lw.output_specs], outs, strict=True))
    return lower_int8.layerwise_record(values, got, max_lsb)
