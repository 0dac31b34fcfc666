"""Lower a folded ONNX model through TVM (Relax) to a deployable artifact, and verify it.

``compile_model`` is one straight list of named steps, each timed:

1. fold: :func:`bnfold.pipeline.fold` (BN folding), saved as ``model.folded.onnx``;
2. freeze: give every input its concrete shape and fold the shape arithmetic that depends on it
   (``Shape -> Cast -> Slice -> Concat -> Reshape`` chains, which TVM's importer cannot take)
   and every small value computed from constants only (torch's ``ConstantOfShape -> ... -> Pad``
   amounts), fold the zero Pads that then have constant amounts into their Conv/pool, and turn
   every ``Constant`` node into an initializer (the importer reads only ``value``);
3. import: ``tvm.relax.frontend.onnx.from_onnx`` with the weights bound as constants;
4. build: ``tvm.compile`` for the target (CUDA: dlight's default GPU schedules);
5. export: the target writes its files (``model.so``; CUDA adds ``model.fatbin``);
   a QDQ model in integer arithmetic also gets ``layerwise/``, the build cut at every quantized
   tensor (:func:`build_layerwise`);
6. verify: the artifact against onnxruntime running the ORIGINAL, unfolded model with every
   optimization off, with :func:`bnfold.check.verify`'s metrics and gate; skipped with a
   reason where this machine cannot run the target.

Steps 1-3 (and, for a QDQ model in integer arithmetic, the int8 rewrite) are :func:`to_relax`,
which ``bnfold tune`` shares, so that it tunes the functions compile builds.

``manifest.json`` records inputs, outputs, target, versions, hashes, the fold report, the
compile time and the verification. Each step is timed by :class:`bnfold.steps.Steps`, which also
tells the CLI's live display (``progress``) when a step starts and ends.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import resource
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import bnfold
from bnfold import artifact, check, ir, pipeline, runtime
from bnfold import targets as targets_
from bnfold.artifact import MANIFEST, Manifest, sha256_file
from bnfold.errors import BnfoldError, CheckFailed
from bnfold.lower import int8 as lower_int8
from bnfold.outputs import remove_tree
from bnfold.passes.drop_implied_activations import DropImpliedActivations
from bnfold.steps import Observer, Steps
from bnfold.targets import Target, host_arch
from bnfold.targets import schedule as cpu_schedule
from bnfold.targets.schedule import cpu_pipeline

logger = logging.getLogger(__name__)

LAYERWISE = "layerwise"
FOLDED = "model.folded.onnx"
# The gate of the issue: max abs error <= 1e-4 x max|reference| (per output).
DEFAULT_ATOL = 0.0
DEFAULT_RTOL = 1e-4


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    """Versions of everything that shapes the artifact."""
    return {
        "bnfold": bnfold.__version__,
        "apache-tvm": _version("apache-tvm"),
        "apache-tvm-ffi": _version("apache-tvm-ffi"),
        "onnx": _version("onnx"),
        "onnx-ir": _version("onnx-ir"),
        "onnxscript": _version("onnxscript"),
        "onnxruntime": _version("onnxruntime"),
    }


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resolve_shapes(
    proto: onnx.ModelProto,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    feeds: Mapping[str, np.ndarray] | None = None,
) -> dict[str, tuple[int, ...]]:
    """The concrete input shapes to compile for.

    ``shapes`` (``--shape``) wins; otherwise an input's dynamic dimensions come from ``feeds``
    (``--inputs``), and a dynamic batch alone defaults to 1 (see :func:`bnfold.check.input_shapes`).
    """
    given = dict(shapes or {})
    for vi in check.graph_inputs(proto):
        dims = vi.type.tensor_type.shape.dim
        dynamic = [not (d.HasField("dim_value") and d.dim_value > 0) for d in dims]
        if vi.name in given or feeds is None or vi.name not in feeds or not any(dynamic):
            continue
        shape = tuple(int(d) for d in feeds[vi.name].shape)
        # A stack of samples along a dynamic batch dimension is verified one sample at a time:
        # edge models run at batch 1 unless --shape says otherwise.
        given[vi.name] = (1, *shape[1:]) if dynamic[0] and shape else shape
    return check.input_shapes(proto, given)


def freeze(model: Any, shapes: Mapping[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of ``model`` (an onnx_ir Model) with static input shapes, ready for TVM's importer.

    Shape-dependent and constant-only subgraphs are folded to constants
    (:func:`bnfold.const_fold.fold_constants`), all ``Constant`` nodes become initializers, and
    zero Pads whose amounts only then became constant fold into their Conv/pool
    (:class:`bnfold.passes.fold_pad.FoldPad`).
    """
    import onnx_ir as ir

    from bnfold import const_fold
    from bnfold.passes.fold_pad import FoldPad

    frozen = ir.from_proto(ir.to_proto(model))
    for value in frozen.graph.inputs:
        if value.name in shapes:
            value.shape = ir.Shape(list(shapes[value.name]))
    # Also folds what depends only on constants (torch's pad amounts): TVM needs those as
    # constants, and onnxscript's defaults keep every ConstantOfShape (see bnfold.const_fold).
    const_fold.fold_constants(frozen)
    # Pads whose amounts were computed in the graph are constants only now.
    FoldPad()(frozen)
    return ir.to_proto(frozen)


def _tensor_specs(ty: Any) -> list[dict[str, Any]]:
    """(shape, dtype) of each tensor in a Relax return type, flattened."""
    fields = getattr(ty, "fields", None)
    if fields is not None:
        return [s for f in fields for s in _tensor_specs(f)]
    values = getattr(ty.shape, "values", None)
    if values is None:
        raise BnfoldError("an output has no static shape after import (dynamic output shape)")
    return [{"shape": [int(v) for v in values], "dtype": str(ty.dtype)}]


def import_relax(proto: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> Any:
    """Import a frozen ONNX model into a Relax IRModule with the weights bound as constants.

    What TVM prints meanwhile (its importer's notes, warnings, its C++ logger) is logged at
    DEBUG level; a failure is one BnfoldError line that names the op where TVM says which.
    """
    import gc
    import re

    import tvm.relax.frontend.onnx as relax_onnx

    from bnfold.captured_output import captured

    error = None
    with captured() as out:
        try:
            mod = relax_onnx.from_onnx(proto, shape_dict=dict(shapes), keep_params_in_input=False)
        except Exception as e:
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            error = f"{type(e).__name__}: {first}"
        # An aborted import's BlockBuilder warns (on fd 2) when it is destroyed: let that
        # happen here, now that the exception and its frames are gone.
        gc.collect()
    for line in out.lines():
        logger.debug("tvm import: %s", line)
    if error is not None:
        op = re.search(r"Error converting operator (\S+),", out.text)
        where = f"{op.group(1)}: " if op and op.group(1) not in error else ""
        raise BnfoldError(f"TVM cannot import the model: {where}{error}")
    return mod


def tvm_target(target: Target) -> Any:
    """The ``tvm.target.Target`` (with its host, where it has one) for ``target``."""
    import tvm

    host = target.tvm_host()
    return (
        tvm.target.Target(target.tvm_target(), host=host)
        if host
        else tvm.target.Target(target.tvm_target())
    )


def build(mod: Any, target: Target, schedule: bool = True, database: str | None = None) -> Any:
    """``tvm.compile`` for ``target``; returns a ``tvm.relax.VMExecutable``.

    CPU targets get bnfold's tuning-free schedules (:mod:`bnfold.targets.schedule`) unless
    ``schedule`` is False, and the tuned schedules of a MetaSchedule ``database`` folder
    (``bnfold tune``) where it has them; CUDA gets TVM's default pipeline (dlight's GPU rules).
    """
    import tvm

    tgt = tvm_target(target)
    if target.device == "cpu" and schedule:
        return tvm.compile(mod, target=tgt, relax_pipeline=cpu_pipeline(tgt, database))
    return tvm.compile(mod, target=tgt)


def default_threads(target: Target) -> int | None:
    """The runtime threads a target gets by default: this machine's cores for a target that runs
    natively here (x86 on x86), None (all of the device's cores, decided where it runs) otherwise.
    """
    if target.device == "cpu" and target.arch == host_arch():
        return os.cpu_count() or 1
    return None


def _target_info(target: Target) -> dict[str, Any]:
    return {
        "name": target.name,
        "spec": target.spec,
        "device": target.device,
        "arch": target.arch,
        "tvm": target.tvm_target(),
        "host": target.tvm_host(),
        "cross_compiler": target.cross_compiler,
    }


def _per_batch(model: Any) -> Any:
    """``model.run``, but feeds stacked along the batch axis (N x the compiled batch) run in
    slices of the compiled batch and the outputs are concatenated."""

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = {s.name: s.shape[0] if s.shape else 0 for s in model.inputs}
        shapes = {s.name: s.shape for s in model.inputs}
        ratios = set()
        for name, a in feeds.items():
            want = shapes.get(name)
            if not want or not batch[name] or a.ndim != len(want) or a.shape[1:] != want[1:]:
                return model.run(feeds)
            if a.shape[0] % batch[name]:
                return model.run(feeds)
            ratios.add(a.shape[0] // batch[name])
        if len(ratios) != 1 or ratios == {1}:
            return model.run(feeds)
        (n,) = ratios
        parts = [
            model.run({k: v[i * batch[k] : (i + 1) * batch[k]] for k, v in feeds.items()})
            for i in range(n)
        ]
        return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}

    return run


def verify_artifact(
    outdir: str | os.PathLike[str],
    reference: str | os.PathLike[str] | onnx.ModelProto,
    feeds: Mapping[str, np.ndarray] | None,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    random: int = 1,
) -> dict[str, Any]:
    """Run the artifact in ``outdir`` and the reference model (onnxruntime, optimizations off)
    on ``feeds`` (or ``random`` random sets of ``shapes``) and compare; returns the record for
    the manifest (``status`` passed/failed, the metrics of :func:`bnfold.check.verify`)."""
    model = runtime.load(outdir)
    start = time.perf_counter()
    result = check.verify(
        reference, _per_batch(model), inputs=dict(feeds) if feeds is not None else None,
        random=random, shapes=shapes, atol=atol, rtol=rtol,
    )  # fmt: skip
    logger.info("verify %s:\n%s", model.target, result.table())
    return {
        "status": "passed" if result.passed else "failed",
        "inputs": "given" if feeds is not None else f"random x{random} (seed 0)",
        "worst_abs_over_max_ref": result.worst_ratio,
        "seconds": round(time.perf_counter() - start, 3),
        "result": result.to_dict(),
        "table": result.table(),
    }


def _as_proto(model: str | os.PathLike[str] | onnx.ModelProto) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))


def build_layerwise(
    outdir: Path,
    reference: str | os.PathLike[str] | onnx.ModelProto,
    shapes: Mapping[str, tuple[int, ...]],
    target: Target,
) -> Path:
    """Build ``OUTDIR/layerwise``: the QDQ model cut at every quantized tensor
    (:func:`bnfold.lower.int8.cut_at_quantized`), compiled like the model, so that each layer
    can be run on onnxruntime's inputs (by ``compile``'s verification and by ``deploy``)."""
    import shutil
    import tempfile

    source = _as_proto(reference)
    probe = check.random_inputs(source, check.input_shapes(source, shapes), 0)
    values, _ = lower_int8.layer_inputs(source, probe)  # only the tensors' shapes are used
    cut, cut_feeds = lower_int8.cut_at_quantized(source, values)
    final = outdir / LAYERWISE
    work = Path(tempfile.mkdtemp(prefix=".layerwise-", dir=outdir))
    try:
        cut_path = work / "cut.onnx"
        cut_path.write_bytes(cut.SerializeToString())
        cut_shapes = {**dict(shapes), **{k: tuple(v.shape) for k, v in cut_feeds.items()}}
        compile_model(cut_path, target, work / "out", cut_shapes, verify=False, fold=False,
                      layerwise=False)  # fmt: skip
        (work / "out" / "cut.onnx").write_bytes(cut.SerializeToString())
        if final.exists():
            shutil.rmtree(final)
        os.replace(work / "out", final)
    finally:
        remove_tree(work)
    return final


def verify_int8_artifact(
    outdir: str | os.PathLike[str],
    reference: str | os.PathLike[str] | onnx.ModelProto,
    feeds: Mapping[str, np.ndarray] | None,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    max_lsb: int = 1,
    random: int = 1,
) -> dict[str, Any]:
    """Verify an int8 artifact against onnxruntime running the same QDQ model (optimizations
    off), in two ways:

    * layer by layer (the gate): onnxruntime computes every quantized tensor; the cut build
      ``OUTDIR/layerwise`` (:func:`build_layerwise`) is fed onnxruntime's inputs of each layer,
      and every layer's output must be within ``max_lsb`` quantization steps of onnxruntime's.
      Whole-model outputs cannot be held to 1 LSB: a 1-step rounding difference in one layer
      moves the next layers' inputs, and deep int8 networks amplify that (MobileNetV2: tens of
      steps by the last block, for TVM's float fake-quant build as much as for integer code);
    * end to end (reported): the artifact's outputs vs onnxruntime's on the whole model
      (cosine, top-1 agreement, max abs error).
    """
    source = _as_proto(reference)
    if feeds is None:
        concrete = check.input_shapes(source, shapes)
        sample = check.random_inputs(source, concrete, 0)
    else:
        sample = {k: v[:1] if v.ndim and v.shape[0] > 1 else v for k, v in feeds.items()}
    start = time.perf_counter()
    values, cut_feeds = lower_int8.layer_inputs(source, sample)
    got = runtime.load(Path(outdir) / LAYERWISE).run({**sample, **cut_feeds})
    record = lower_int8.layerwise_record(values, got, max_lsb)
    end_to_end = verify_artifact(
        outdir, reference, sample, shapes, atol=float("inf"), rtol=0.0, random=random
    )
    return {
        **record,
        "inputs": "given (first sample)" if feeds is not None else "random (seed 0)",
        "end_to_end": {k: end_to_end[k] for k in ("result", "table")},
        "worst_abs_over_max_ref": end_to_end["worst_abs_over_max_ref"],
        "seconds": round(time.perf_counter() - start, 3),
    }


def compile_model(
    model_path: str | os.PathLike[str],
    target: str | Target,
    outdir: str | os.PathLike[str],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    verify: bool = True,
    *,
    inputs: str | os.PathLike[str] | Mapping[str, np.ndarray] | None = None,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    random: int = 1,
    fold: bool = True,
    schedule: bool = True,
    threads: int | None = None,
    database: str | os.PathLike[str] | None = None,
    integer: bool = True,
    max_lsb: int = 1,
    layerwise: bool = True,
    progress: Observer | None = None,
) -> Manifest:
    """Fold, import, build, export and (by default) verify ``model_path`` for ``target``.

    Args:
        model_path: The ONNX model.
        target: A target spec (``"arm64:cortex-a72"``) or a :class:`~bnfold.targets.Target`.
        outdir: Folder for ``model.so`` (and friends), ``model.folded.onnx``, ``manifest.json``.
        shapes: Concrete shapes for dynamic inputs, e.g. ``{"x": (1, 3, 48, 320)}``.
        verify: Compare the artifact with the unfolded model in onnxruntime where it can run.
        inputs: ``.npz`` path or dict of arrays used for verification (and for the shapes of
            dynamic inputs); random inputs when None.
        atol: Absolute tolerance of the verification gate.
        rtol: Tolerance relative to max|reference| of the gate.
        random: Number of random input sets when ``inputs`` is None.
        fold: Run the fold pipeline (False: compile the model as given, for comparisons).
        schedule: Apply bnfold's CPU schedules (False: TVM's unscheduled default loops).
        threads: Threads the runtime uses (stored in the manifest, honoured by
            :func:`bnfold.runtime.load`); None: the device's cores (``os.cpu_count()`` for a
            native target, all of the device's cores otherwise).
        database: A MetaSchedule folder from ``bnfold tune`` whose records to reuse (CPU).
        integer: For a QDQ (int8) model on a CPU target, compute the quantized conv/matmul
            groups in integer arithmetic (:mod:`bnfold.lower.int8`); False: TVM's float
            fake-quantization.
        max_lsb: The gate of a QDQ model's verification: every quantized tensor within this
            many quantization steps of onnxruntime's, layer by layer
            (:func:`verify_int8_artifact`).
        layerwise: For a QDQ model in integer arithmetic, also build ``OUTDIR/layerwise``
            (:func:`build_layerwise`), which that verification and ``bnfold deploy`` run.
        progress: Told when each step starts and ends (:class:`bnfold.steps.Steps`).

    Raises:
        BnfoldError: Bad input (model, shapes, target that cannot build here).
        CheckFailed: The artifact failed verification (the manifest is written first).
    """
    model_path, out = Path(model_path), Path(outdir)
    tgt = _check_request(model_path, target, threads, database)
    out.mkdir(parents=True, exist_ok=True)
    steps = Steps(progress)

    front = to_relax(model_path, tgt, steps, shapes=shapes, inputs=inputs, fold=fold,
                     integer=integer, folded_path=out / FOLDED)  # fmt: skip
    source, feeds, concrete, plan = front.source, front.feeds, front.shapes, front.int8
    outputs, fold_report = front.outputs, front.fold_report
    with steps("build"), cpu_schedule.recording() as matches:
        executable = build(front.mod, tgt, schedule, None if database is None else str(database))
    with steps("export"):
        exported = tgt.export(executable, out)
    if plan.integer and layerwise:
        with steps("layerwise"):
            build_layerwise(out, source.proto, concrete, tgt)
            plan.info = {**(plan.info or {}), "layerwise": LAYERWISE}

    manifest = Manifest(
        outdir=str(out),
        target=_target_info(tgt),
        inputs=_input_specs(source.proto, concrete),
        outputs=outputs,
        artifact={
            "files": {role: p.name for role, p in exported.files.items()},
            "sha256": {p.name: sha256_file(p) for p in exported.files.values()},
            "meta": exported.meta,
        },
        source={"path": str(model_path), "sha256": source.sha256},
        folded={"file": FOLDED, "sha256": sha256_file(out / FOLDED)},
        versions=versions(),
        fold_report=fold_report,
        compile={
            "seconds": steps.total(),
            "schedules": "bnfold cpu" if schedule and tgt.device == "cpu" else "tvm default",
            "schedule_rules": cpu_schedule.summarize(matches),
            "tuning_database": None if database is None else str(database),
            "steps": steps.seconds,
            "peak_rss_mb": round(_peak_rss_mb(), 1),
            "shapes": {n: list(s) for n, s in concrete.items()},
            **({"int8": plan.info} if plan.info is not None else {}),
        },
        verification={"status": "not verified", "why": "--no-verify"},
        runtime={"threads": default_threads(tgt) if threads is None else threads},
    )
    logger.info("compiled %s for %s in %.1f s (peak RSS %.0f MB)", model_path.name, tgt.spec,
                manifest.compile["seconds"], manifest.compile["peak_rss_mb"])  # fmt: skip
    # The manifest is written before verification too: `bnfold run` needs it, and a failed or
    # interrupted verification must still leave a usable, honest folder.
    runnable = tgt.can_run()
    if verify and not runnable:
        manifest.verification = {"status": "not verified", "why": runnable.why}
    artifact.save(manifest, out)
    if verify and runnable:
        with steps("verify"):
            manifest.verification = _verify(
                out, source.proto, feeds, concrete, int8=plan.integer and layerwise,
                atol=atol, rtol=rtol, max_lsb=max_lsb, random=random,
            )  # fmt: skip
        if runnable.why:
            manifest.verification["how"] = runnable.why
        artifact.save(manifest, out)
        _gate(manifest, tgt, out, atol=atol, rtol=rtol, max_lsb=max_lsb)
    return manifest


@dataclasses.dataclass
class Front:
    """What :func:`to_relax` made: the Relax module and how it came about, with the one read
    of the model file (``source``) and the verification inputs read against it."""

    source: ir.Source
    feeds: dict[str, np.ndarray] | None
    mod: Any
    shapes: dict[str, tuple[int, ...]]
    fold_report: dict[str, Any]
    outputs: list[dict[str, Any]]
    int8: _Int8Plan


def to_relax(
    model_path: str | os.PathLike[str],
    tgt: Target,
    steps: Steps,
    *,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    inputs: str | os.PathLike[str] | Mapping[str, np.ndarray] | None = None,
    fold: bool = True,
    integer: bool = True,
    folded_path: Path | None = None,
) -> Front:
    """The front half of a compile, shared by :func:`compile_model` and ``bnfold tune``: read
    the model file (once), fold (saved to ``folded_path`` if given), freeze the shapes, import
    into Relax and, for a QDQ model in integer arithmetic, the int8 rewrite, so that tuning
    sees the functions compile builds. ``steps`` times "fold", "freeze" and "import"."""
    with steps("fold"):
        # The one read of the model file: the fold, the manifest's hash and the verification's
        # reference all come from it (the fold changes the IR, never ``source.proto``).
        source = ir.read_source(model_path)
        folded, fold_report = _fold(source, fold)
        if folded_path is not None:
            ir.save(folded, folded_path)
    with steps("freeze"):
        feeds = _feeds(inputs, source.proto)
        concrete = resolve_shapes(source.proto, shapes, feeds)
        frozen = freeze(folded, concrete)
        plan = _int8_plan(frozen, tgt, integer)
        frozen, dropped = _drop_implied(frozen) if plan.integer else (frozen, 0)
    with steps("import"):
        mod = import_relax(frozen, concrete)
        outputs = _outputs(mod, frozen)
        if plan.integer:
            mod, records = lower_int8.rewrite(mod, tvm_target(tgt))
            plan.info = lower_int8.summarize(records, dropped)
    return Front(source, feeds, mod, concrete, fold_report, outputs, plan)


def _check_request(
    model_path: Path,
    target: str | Target,
    threads: int | None,
    database: str | os.PathLike[str] | None,
) -> Target:
    """The resolved target, after the checks that need no work (bad input: BnfoldError)."""
    tgt = (targets_.get(target) if isinstance(target, str) else target).resolved()
    buildable = tgt.can_build()
    if not buildable:
        raise BnfoldError(f"cannot build for {tgt.spec} here: {buildable.why}")
    if buildable.why:
        logger.warning("%s: %s", tgt.spec, buildable.why)
    if not model_path.is_file():
        raise BnfoldError(f"{model_path}: no such model file")
    if threads is not None and threads < 1:
        raise BnfoldError(f"threads must be >= 1, got {threads}")
    if database is not None and not (Path(database) / "database_workload.json").is_file():
        raise BnfoldError(f"{database}: not a tuning database (run `bnfold tune --db` first)")
    return tgt


def _fold(source: ir.Source, fold: bool) -> tuple[Any, dict[str, Any]]:
    """The folded IR model and its report (``fold=False``: the model as given)."""
    loaded = ir.from_proto(source.proto, source=str(source.path))
    if not fold:
        return loaded, {"skipped": "compiled without folding"}
    folded, report = pipeline.fold(loaded)
    return folded, report.to_dict()


def _feeds(
    inputs: str | os.PathLike[str] | Mapping[str, np.ndarray] | None, proto: onnx.ModelProto
) -> dict[str, np.ndarray] | None:
    if inputs is None:
        return None
    return dict(inputs) if isinstance(inputs, Mapping) else check.load_inputs(inputs, proto)


@dataclasses.dataclass
class _Int8Plan:
    """How a QDQ model's quantized groups are lowered; ``info`` goes to ``compile.int8``."""

    integer: bool
    info: dict[str, Any] | None = None


def _int8_plan(frozen: onnx.ModelProto, tgt: Target, integer: bool) -> _Int8Plan:
    qdq = lower_int8.is_qdq(frozen)
    if qdq and integer and tgt.device == "cpu":
        return _Int8Plan(True)
    if qdq:
        why = "--no-integer" if not integer else f"integer kernels are CPU-only ({tgt.device})"
        return _Int8Plan(False, {"integer": False, "why": why})
    return _Int8Plan(False)


def _drop_implied(frozen: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``frozen`` without the activations its quantizes imply (exact; see
    :mod:`bnfold.passes.drop_implied_activations`), and how many went."""
    model = ir.from_proto(frozen, source="<frozen>")
    result = DropImpliedActivations()(model)
    return ir.to_proto(model), len(getattr(result, "changed", []))


def _outputs(mod: Any, frozen: onnx.ModelProto) -> list[dict[str, Any]]:
    """Name, shape and dtype of each model output, from TVM's module."""
    specs = _tensor_specs(mod["main"].ret_ty)
    names = [o.name for o in frozen.graph.output]
    if len(specs) != len(names):
        raise BnfoldError(
            f"TVM's module returns {len(specs)} tensors for {len(names)} model outputs"
        )
    return [{"name": n, **spec} for n, spec in zip(names, specs, strict=True)]


def _input_specs(
    proto: onnx.ModelProto, concrete: Mapping[str, tuple[int, ...]]
) -> list[dict[str, Any]]:
    dtypes = {vi.name: onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
              for vi in check.graph_inputs(proto)}  # fmt: skip
    return [
        {"name": n, "shape": list(s), "dtype": np.dtype(dtypes[n]).name}
        for n, s in concrete.items()
    ]


def _verify(
    out: Path,
    reference: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray] | None,
    concrete: Mapping[str, tuple[int, ...]],
    *,
    int8: bool,
    atol: float,
    rtol: float,
    max_lsb: int,
    random: int,
) -> dict[str, Any]:
    if int8:
        return verify_int8_artifact(out, reference, feeds, concrete, max_lsb=max_lsb,
                                    random=random)  # fmt: skip
    return verify_artifact(out, reference, feeds, concrete, atol=atol, rtol=rtol, random=random)


def _gate(
    manifest: Manifest, tgt: Target, out: Path, *, atol: float, rtol: float, max_lsb: int
) -> None:
    """Raise :class:`CheckFailed` when the verification failed (the manifest says how)."""
    v = manifest.verification
    if v["status"] != "passed" and "max_lsb" in v:
        raise CheckFailed(
            f"{tgt.spec} int8 artifact differs from onnxruntime by up to {v['max_lsb']} "
            f"quantization steps in {v['worst']} (gate {max_lsb}); see {out / MANIFEST}"
        )
    if v["status"] != "passed":
        raise CheckFailed(
            f"{tgt.spec} artifact differs from the unfolded model: worst max_abs/max|ref| "
            f"= {v['worst_abs_over_max_ref']:.3g} (gate {atol:g} + {rtol:g} x max|ref|); "
            f"see {out / MANIFEST}"
        )
