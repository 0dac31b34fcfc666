"""MetaSchedule tuning on top of bnfold's CPU schedules: ``bnfold tune`` and ``compile --db``.

``tune_model`` folds, freezes and imports the model exactly as
:func:`bnfold.lower.compiler.compile_model` does, runs the CPU pipeline up to operator fusion
(:func:`bnfold.targets.schedule.fused_passes`) and tunes some of the fused PrimFuncs it leaves with
MetaSchedule, recording into a database folder. A short tune's records are often slower than
bnfold's rule schedules (MobileNetV2, 100 trials over all 33 functions: 11.3 ms with bnfold's rules,
38.3 ms with every record applied), so a record is used only where it is measured to be faster:

1. Baseline: every function is scheduled with bnfold's rules (TVM's default loops where the rules
   decline: "unscheduled"), built and timed (in this process, or on the device: below).
2. Plan: trials go where they can pay. Functions are ranked by their *headroom*, weight x (time -
   FLOPs / R), where R is the best FLOP rate any of the model's functions reaches with bnfold's
   rules: a function already as efficient as the best one has none, a slow depthwise conv,
   an unscheduled function (default loops) or a memory-bound one has most of its time.
   ``trials / trials_per_task`` functions are tuned from the top of that ranking, so each gets
   enough trials for a real evolutionary search (32 by default; a handful of trials per
   function finds nothing better than bnfold's rules).
3. Search: MetaSchedule on those functions, measuring with the thread count of the decision.
4. Choose: for every function with records (this run's or earlier ones), the best ``TOP_K``
   records and bnfold's schedule are built and timed again, interleaved, where the baseline
   was, with ``threads`` threads (the same method and threads for both). A record is chosen
   only if its median is at least ``MARGIN`` below bnfold's; a function bnfold's rules decline
   takes its best record unless that is measurably (``MARGIN``) slower than TVM's default
   loops (a tiny reduction's record can be: a parallel loop costs more than the whole
   function). The decisions go to ``DIR/bnfold_choice.json`` (merged with those of other
   models tuned into the same folder).

Where: by default everything is measured in this process (and MetaSchedule's local runner), so
the target must run here. With ``tracker`` and ``key`` (:class:`MeasureOn`) every measurement
runs on a device taken from a TVM RPC tracker instead: bnfold's schedules and the records are
exported (with the target's cross compiler), uploaded and timed there with ``time_evaluator``,
one RPC session per function, and the search uses MetaSchedule's ``RPCRunner`` (its builder
exports ``.so`` files the device loads without a compiler). The device's thread pool is set to
``threads`` in every session (``runtime.config_threadpool``, which can only lower the pool's
size: a device whose pool is smaller is measured with fewer threads, with a warning); the
default is the device's own default pool, what an artifact compiled without ``--threads`` uses
there. The choice file records where its times were measured (``measured_on``).

``compile --db DIR`` applies only the chosen records (an in-memory database of them:
:func:`bnfold.targets.schedule.tuning_db.chosen_database`); every other function keeps bnfold's
rules. A folder without a choice file (not made by ``bnfold tune``) has all its records applied,
with a warning; ``bnfold tune MODEL --trials 0 --db DIR`` makes the choice for an existing folder.

MetaSchedule needs ``psutil``, ``cloudpickle`` and ``xgboost-cpu`` (not declared by apache-tvm);
its default builder imports ``tvm.s_tir.tensor_intrin`` in every worker (slower than its 30 s
timeout on a small machine), so the builder here skips that (see the TVM notes), and its
``TuneContext`` imports it too (26 s), so only the host CPU's intrinsics are imported for it
(:func:`_host_tensor_intrinsics`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import importlib.util
import logging
import math
import os
import statistics
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from bnfold import atomic
from bnfold import targets as targets_
from bnfold.errors import BnfoldError
from bnfold.lower import compiler as lower
from bnfold.rpc import connect, parse_addr, tracker_servers
from bnfold.runtime import set_threads
from bnfold.steps import Observer, Steps
from bnfold.targets import Target
from bnfold.targets.schedule import fused_passes, schedule_function
from bnfold.targets.schedule.tuning_db import CHOICE_FILE, CHOICE_FORMAT, read_choice, record_key

logger = logging.getLogger(__name__)

REQUIRED = ("psutil", "cloudpickle", "xgboost")
BUILD_TIMEOUT_S = 120
# Default trials per tuned function: one evolutionary search round of a useful size.
TRIALS_PER_TASK = 32
# A record replaces bnfold's schedule only if it is at least this much faster (relative).
MARGIN = 0.03
# Records per function re-timed against bnfold's schedule (best by MetaSchedule's measurement).
TOP_K = 3
# Interleaved timing rounds per candidate, and each round's minimum length.
ROUNDS = 5
MIN_REPEAT_MS = 20
# Seconds an RPC session may last (one function's timing, or one MetaSchedule measurement).
SESSION_TIMEOUT_S = 60
LOCAL = "local"


def missing_packages() -> list[str]:
    """The Python packages MetaSchedule needs that are not installed here."""
    return [m for m in REQUIRED if importlib.util.find_spec(m) is None]


def _fast_build(mod: Any, target: Any, _params: Any) -> Any:
    """MetaSchedule's build without ``import tvm.s_tir.tensor_intrin`` (35 s per worker)."""
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def fused_module(
    model_path: str | os.PathLike[str],
    target: Target,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    num_cores: int | None = None,
) -> tuple[Any, Any]:
    """(the Relax module after the CPU pipeline's fusion passes, its ``tvm.target.Target``).

    ``num_cores`` (default: this machine's) sizes MetaSchedule's parallel loops.
    """
    import tvm

    # Compile's own front half (one read of the file; a QDQ model's int8 rewrite included), so
    # the functions tuned are the ones compile builds.
    mod = lower.to_relax(model_path, target, Steps(), shapes=shapes).mod
    spec = {**target.tvm_target(), "num-cores": num_cores or os.cpu_count() or 1}
    host = target.tvm_host()
    tgt = tvm.target.Target(spec, host=host) if host else tvm.target.Target(spec)
    with tgt:
        mod = tvm.transform.Sequential(fused_passes(tgt))(mod)
    return mod, tgt


@dataclasses.dataclass(frozen=True)
class MeasureOn:
    """Where ``bnfold tune`` measures: this process (no ``tracker``), or a device taken from the
    TVM RPC tracker ``tracker`` (``HOST:PORT``) under ``key``, each session ending after
    ``session_timeout`` seconds; ``cross_compiler`` links what is uploaded (None: ``g++``)."""

    tracker: str | None = None
    key: str | None = None
    session_timeout: float = SESSION_TIMEOUT_S
    cross_compiler: str | None = None

    @property
    def remote(self) -> bool:
        """Whether measurements run on an RPC device."""
        return self.tracker is not None

    def describe(self) -> str:
        """``local`` or ``tracker HOST:PORT key KEY`` (the choice file's ``measured_on``)."""
        return f"tracker {self.tracker} key {self.key}" if self.remote else LOCAL

    def check(self) -> None:
        """Raise :class:`BnfoldError` on an incomplete or bad tracker setting (before any work)."""
        if self.key and not self.tracker:
            raise BnfoldError("--key needs --tracker HOST:PORT (the tracker to take a device from)")
        if not self.remote:
            return
        if not self.key:
            raise BnfoldError("--tracker needs --key (the device kind the servers registered)")
        parse_addr(self.tracker or "")
        if self.session_timeout <= 0:
            raise BnfoldError(f"session timeout must be > 0 s, got {self.session_timeout:g}")


def _export(lib: Any, path: Path, cross_compiler: str | None) -> None:
    """Link a built function into a shared library the device loads without a compiler."""
    fcompile = None
    if cross_compiler:
        from tvm.support import cc

        fcompile = cc.cross_compiler(cross_compiler)
    lib.export_library(str(path), fcompile=fcompile)


def _export_artifact(lib: Any, cross_compiler: str | None = None) -> str:
    """MetaSchedule builder's ``f_export`` for an RPC device: a ``.so`` (its default is a tar of
    object files, which the device would have to link itself) in a new temp folder."""
    path = Path(tempfile.mkdtemp(prefix="bnfold-ms-")) / "tvm_tmp_mod.so"
    _export(lib, path, cross_compiler)
    return str(path)


def _configure_threads(session: Any, threads: int) -> int:
    """Set the device's thread pool (of the RPC server's session thread, which runs every call
    of the session) to ``threads``; returns the count it uses (fewer if its pool is smaller)."""
    session.get_function("runtime.config_threadpool")(1, threads)
    return int(session.get_function("runtime.NumThreads")())


def _runner_session(rpc_config: Any, threads: int) -> Any:
    """MetaSchedule ``RPCRunner``'s ``f_create_session``: its default session, with the thread
    count of the decision (runs in the runner's worker process)."""
    session = rpc_config.connect_server()
    _configure_threads(session, threads)
    return session


def _random_fill(tensor: Any) -> None:
    """Fill a (remote) tensor with random data made here: float normal, integer zero."""
    import numpy as np

    shape, dtype = tuple(int(d) for d in tensor.shape), str(tensor.dtype)
    rng = np.random.default_rng(0)
    a = rng.standard_normal(shape).astype(dtype) if "float" in dtype else np.zeros(shape, dtype)
    tensor.copyfrom(a)


def _alloc_arguments(session: Any, device: Any, args_info: Any, alloc_repeat: int) -> Any:
    """MetaSchedule ``RPCRunner``'s ``f_alloc_argument``: its default fills the arguments with
    the device's ``tvm.contrib.random.random_fill_for_measure``, which a TVM runtime built
    without ``USE_RANDOM`` lacks (the aarch64 wheel): there they are filled from here."""
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

    try:
        fill = session.get_function("tvm.contrib.random.random_fill_for_measure")
    except Exception:  # TVM raises AttributeError or RuntimeError for a missing function
        fill = _random_fill
    return alloc_argument_common(fill, device, args_info, alloc_repeat)


@contextlib.contextmanager
def _session(where: MeasureOn) -> Iterator[Any]:
    """An RPC session on a device from ``where``'s tracker, ended on leaving the block (a server
    serves one session at a time: a session still open would starve MetaSchedule's runner)."""
    remote = connect(tracker=where.tracker, key=where.key, session_timeout=where.session_timeout)
    try:
        yield remote
    finally:
        del remote
        gc.collect()


def _one_line(e: BaseException) -> str:
    """The last line of an exception's text (TVM's RPC errors carry a remote traceback)."""
    lines = str(e).strip().splitlines()
    return lines[-1] if lines else repr(e)


def _device_threads(where: MeasureOn, threads: int | None) -> int:
    """The thread count to measure with on ``where``'s device: ``threads`` as far as its pool
    allows (default: its default pool, what an artifact without ``--threads`` gets there).
    Also checks, with one-line errors, that the tracker has a server under the key (a request
    for a key no server registered waits forever) and that the device can be measured."""
    servers = tracker_servers(where.tracker or "", where.key or "")
    if not servers:
        raise BnfoldError(f"tracker {where.tracker} has no server registered under key "
                          f"'{where.key}'")  # fmt: skip
    try:
        with _session(where) as remote:
            default = int(remote.get_function("runtime.NumThreads")())
            got = _configure_threads(remote, threads or default)
    except BnfoldError:
        raise
    except Exception as e:
        raise BnfoldError(f"the device of tracker {where.tracker} key '{where.key}' cannot be "
                          f"measured: {_one_line(e)}") from None  # fmt: skip
    if threads and got != threads:
        logger.warning("the device's thread pool has %d threads: measuring with %d, not %d",
                       got, got, threads)  # fmt: skip
    logger.info("measuring on %s (%d server(s)) with %d thread(s)", where.describe(), servers,
                got)  # fmt: skip
    return got


@dataclasses.dataclass
class Function:
    """One fused function (a MetaSchedule workload) and what ``bnfold tune`` decided for it.

    ``rule`` is bnfold's rule and kind (``bnfold_conv:depthwise``) or ``unscheduled``;
    ``bnfold_ms`` its time with that schedule (the default loops when unscheduled); ``tuned_ms``
    the best record's time, timed the same way (None: no record); ``search_ms`` that record's
    time in MetaSchedule's own measurement; ``record`` its key (:func:`record_key`); ``chosen``
    ``tuned`` or ``bnfold``; ``weight`` how many times the model calls it per inference;
    ``measured_on`` where its times were taken (:meth:`MeasureOn.describe`).
    """

    function: str
    shash: str
    weight: int
    rule: str
    bnfold_ms: float
    flops: float = 0.0
    tuned_ms: float | None = None
    search_ms: float | None = None
    records: int = 0
    record: str | None = None
    chosen: str = "bnfold"
    threads: int = 1
    measured_on: str = LOCAL
    tuned_now: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The entry of the choice file."""
        d = dataclasses.asdict(self)
        d.pop("shash")
        d.pop("tuned_now")
        return d


def plan(
    functions: Sequence[Function], trials: int, trials_per_task: int | None = None
) -> tuple[list[Function], int]:
    """The functions to tune, best first, and the trials each gets (see the module docstring).

    Ranked by headroom ``weight x (bnfold_ms - flops / best rate)``; ``trials // trials_per_task``
    of them (at least one, at most all) are taken, and the trials are spread over those.
    """
    if trials < 1 or not functions:
        return [], 0
    rates = [f.flops / f.bnfold_ms for f in functions if f.flops > 0 and f.bnfold_ms > 0]
    roof = max(rates, default=0.0)

    def headroom(f: Function) -> float:
        ideal = f.flops / roof if roof > 0 else 0.0
        return f.weight * max(0.0, f.bnfold_ms - ideal)

    ranked = sorted(functions, key=lambda f: (-headroom(f), -f.weight * f.bnfold_ms, f.function))
    per = trials_per_task or min(trials, TRIALS_PER_TASK)
    count = max(1, min(len(ranked), trials // per))
    return ranked[:count], trials_per_task or math.ceil(trials / count)


def _args(func: Any, dev: Any) -> list[Any]:
    """Random float (zero integer) arguments for a PrimFunc on ``dev`` (a CPU), seeded."""
    import numpy as np
    import tvm
    from tvm.s_tir import meta_schedule as ms

    rng = np.random.default_rng(0)
    args = []
    for info in ms.arg_info.ArgInfo.from_prim_func(func):
        shape, dtype = [int(s) for s in info.shape], str(info.dtype)
        a = rng.standard_normal(shape).astype(dtype) if "float" in dtype else np.zeros(shape, dtype)
        args.append(tvm.runtime.tensor(a, dev))
    return args


def _time_ms(
    libs: Sequence[Any], args: Sequence[Any], dev: Any, rounds: int = ROUNDS
) -> list[float]:
    """Median ms per call of each built function (loaded on ``dev``, here or on an RPC device),
    timed in interleaved rounds (after one untimed round) with the device's current threads."""
    evaluators = [
        lib.time_evaluator(lib.entry_name, dev, number=1, repeat=1, min_repeat_ms=MIN_REPEAT_MS)
        for lib in libs
    ]
    samples: list[list[float]] = [[] for _ in libs]
    for r in range(rounds + 1):
        for i, ev in enumerate(evaluators):
            ms_ = float(ev(*args).mean) * 1e3
            if r:
                samples[i].append(ms_)
    return [statistics.median(s) for s in samples]


def _build(mod: Any, target: Any) -> Any:
    import tvm

    return tvm.tirx.build(mod, target=target)


def _measure(
    libs: Sequence[Any],
    func: Any,
    where: MeasureOn,
    threads: int,
    what: str,
    rounds: int = ROUNDS,
) -> list[float]:
    """Median ms per call of each built library of the PrimFunc ``func`` (:func:`_time_ms`):
    in this process (with its thread pool as :func:`_measuring_threads` set it), or uploaded to
    a device from ``where``'s tracker in one session with ``threads`` threads.

    Raises:
        BnfoldError: The device cannot be reached, or cannot load or run the libraries.
    """
    import tvm

    if not where.remote:
        dev = tvm.cpu()
        return _time_ms(libs, _args(func, dev), dev, rounds)
    try:
        with tempfile.TemporaryDirectory(prefix="bnfold-tune-") as tmp, _session(where) as remote:
            _configure_threads(remote, threads)
            loaded = []
            for i, lib in enumerate(libs):
                path = Path(tmp) / f"bnfold-tune-{os.getpid()}-{i}.so"
                _export(lib, path, where.cross_compiler)
                remote.upload(str(path), path.name)
                loaded.append(remote.load_module(path.name))
            dev = remote.cpu()
            return _time_ms(loaded, _args(func, dev), dev, rounds)
    except BnfoldError:
        raise
    except Exception as e:  # TVM's RPC errors carry the remote traceback: its last line
        raise BnfoldError(f"timing {what} on {where.describe()} failed: {_one_line(e)}") from None


def _baseline(task: Any, target: Any, threads: int, where: MeasureOn) -> tuple[Function, Any]:
    """bnfold's schedule of a task's function, built and timed on ``where``: (the Function, the
    library)."""
    import tvm_ffi
    from tvm.s_tir.analysis import estimate_tir_flops

    workload = task.dispatched[0]
    sch, match = schedule_function(workload["main"], target, task.task_name)
    lib = _build(sch.mod if sch is not None else workload, target)
    (bnfold_ms,) = _measure([lib], workload["main"], where, threads, task.task_name, rounds=3)
    try:
        flops = float(estimate_tir_flops(workload))
    except Exception:  # an unusual function: no FLOP estimate, ranked by time alone
        flops = 0.0
    fn = Function(
        function=task.task_name,
        shash=str(tvm_ffi.structural_hash(workload)),
        weight=int(task.weight),
        rule=f"{match.rule}:{match.kind}" if match.rule else "unscheduled",
        bnfold_ms=_round(bnfold_ms),
        flops=flops,
        threads=threads,
        measured_on=where.describe(),
    )
    return fn, lib


def _round(ms: float) -> float:
    """6 significant digits (a reshape takes 1e-5 ms)."""
    return float(f"{ms:.6g}")


def _choose(
    fn: Function, task: Any, bnfold_lib: Any, db: Any, target: Any, where: MeasureOn
) -> None:
    """Time the best records of ``task`` against bnfold's schedule on ``where`` and set ``fn``'s
    choice."""
    workload = task.dispatched[0]
    if not db.has_workload(workload):
        return
    records = list(db.get_top_k(db.commit_workload(workload), TOP_K))
    fn.records = len(db.get_top_k(db.commit_workload(workload), 1 << 30))
    libs, kept = [], []
    for rec in records:
        try:
            libs.append(_build(rec.as_measure_candidate().sch.mod, target))
            kept.append(rec)
        except Exception as e:  # a record that no longer builds: skip it
            logger.debug("%s: a record does not build: %s", fn.function, str(e).splitlines()[0])
    if not kept:
        return
    times = _measure([bnfold_lib, *libs], workload["main"], where, fn.threads, fn.function)
    best = min(range(len(kept)), key=lambda i: times[i + 1])
    fn.bnfold_ms = _round(times[0])
    fn.tuned_ms = _round(times[best + 1])
    secs = [float(s) for s in kept[best].run_secs or []]
    fn.search_ms = _round(statistics.mean(secs) * 1e3) if secs else None
    fn.record = record_key(kept[best])
    fn.chosen = decide(fn.rule, fn.bnfold_ms, fn.tuned_ms)


def decide(rule: str, bnfold_ms: float, tuned_ms: float | None) -> str:
    """``tuned`` or ``bnfold`` for a function: a record must be ``MARGIN`` faster than bnfold's
    rule schedule; where the rules decline (``unscheduled``: TVM's default loops) it is taken
    unless it is ``MARGIN`` slower than those loops."""
    if tuned_ms is None:
        return "bnfold"
    if rule == "unscheduled":
        return "bnfold" if tuned_ms > (1 + MARGIN) * bnfold_ms else "tuned"
    return "tuned" if tuned_ms < (1 - MARGIN) * bnfold_ms else "bnfold"


def _quiet_metaschedule() -> None:
    """MetaSchedule logs every trial to stdout unless its logger has a level: keep its console
    output to warnings (its log files in DIR/logs keep everything) unless bnfold debugs."""
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    if ms_logger.level == logging.NOTSET and not logger.isEnabledFor(logging.DEBUG):
        ms_logger.setLevel(logging.WARNING)


def _host_tensor_intrinsics(arch: str) -> None:
    """Register only this CPU's tensor intrinsics before MetaSchedule's ``TuneContext`` imports
    ``tvm.s_tir.tensor_intrin``, which registers every target's (26 s here, 17 s of it CUDA's).

    The package is put in ``sys.modules`` without running its ``__init__`` (which imports all of
    its submodules); its submodules still import normally (dlight imports ``.cuda`` itself).
    MetaSchedule's CPU rules use only the host's: ``x86`` (VNNI / AVX-512 dot products) or
    ``arm_cpu``.
    """
    import importlib
    import importlib.util
    import sys

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    try:
        importlib.import_module(f"{name}.{'arm_cpu' if arch == 'aarch64' else 'x86'}")
    except Exception:  # not as expected: let MetaSchedule import the whole package
        del sys.modules[name]
        raise


def _search(
    tasks: Sequence[Any],
    target: Any,
    work_dir: Path,
    trials: int,
    per_task: int,
    seed: int,
    where: MeasureOn,
    threads: int,
) -> None:
    """MetaSchedule on ``tasks`` into ``work_dir``: measured by its local runner with this
    process's ``TVM_NUM_THREADS`` (which its worker processes inherit), or by its ``RPCRunner``
    on devices from ``where``'s tracker with ``threads`` threads."""
    from tvm.s_tir import meta_schedule as ms

    _quiet_metaschedule()
    try:
        _host_tensor_intrinsics(str(target.attrs.get("mtriple", "")).split("-")[0])
    except Exception as e:
        logger.debug("importing the host's tensor intrinsics alone failed: %s", e)
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        list(tasks), str(work_dir), seed=seed
    )
    if not contexts:
        return
    runner: Any
    if where.remote:
        host, port = parse_addr(where.tracker or "")
        # The export (and the session's thread count) run in MetaSchedule's worker processes:
        # module-level functions, which they import by name.
        builder = ms.builder.LocalBuilder(
            f_build=_fast_build, timeout_sec=BUILD_TIMEOUT_S,
            f_export=functools.partial(_export_artifact, cross_compiler=where.cross_compiler),
        )  # fmt: skip
        runner = ms.runner.RPCRunner(
            rpc_config=ms.runner.RPCConfig(
                tracker_host=host, tracker_port=port, tracker_key=where.key,
                session_timeout_sec=math.ceil(where.session_timeout),
            ),
            f_create_session=functools.partial(_runner_session, threads=threads),
            f_alloc_argument=_alloc_arguments,
            # One measurement per device registered under the key at a time.
            max_workers=max(1, tracker_servers(where.tracker or "", where.key or "")),
        )  # fmt: skip
    else:
        builder = ms.builder.LocalBuilder(f_build=_fast_build, timeout_sec=BUILD_TIMEOUT_S)
        runner = ms.runner.LocalRunner()  # what tune_tasks makes of runner="local"
    try:
        ms.tune.tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=str(work_dir),
            max_trials_global=trials, max_trials_per_task=per_task,
            num_trials_per_iter=min(64, max(2, per_task)), builder=builder, runner=runner,
        )  # fmt: skip
    finally:
        # Its worker processes would outlive this one (orphaned, holding its stdout open).
        runner.pool.shutdown()


@contextlib.contextmanager
def _measuring_threads(threads: int) -> Iterator[int]:
    """Measure with ``threads`` threads inside the block: this process's TVM thread pool (which
    keeps that count afterwards, as :func:`bnfold.runtime.load` leaves it) and
    ``TVM_NUM_THREADS``, which MetaSchedule's runner processes inherit (restored afterwards)."""
    before = os.environ.get("TVM_NUM_THREADS")
    try:
        yield set_threads(threads)
    finally:
        if before is None:
            os.environ.pop("TVM_NUM_THREADS", None)
        else:
            os.environ["TVM_NUM_THREADS"] = before


def tune_model(
    model_path: str | os.PathLike[str],
    target: str | Target,
    database: str | os.PathLike[str],
    trials: int,
    *,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    trials_per_task: int | None = None,
    threads: int | None = None,
    seed: int = 0,
    tracker: str | None = None,
    key: str | None = None,
    session_timeout: float = SESSION_TIMEOUT_S,
    progress: Observer | None = None,
) -> dict[str, Any]:
    """Tune ``model_path``'s heaviest fused functions into ``database`` and choose, per function,
    between the best record and bnfold's rules (see the module docstring).

    Args:
        model_path: The ONNX model (folded here as ``compile`` folds it).
        target: A CPU target spec or :class:`~bnfold.targets.Target` that runs on this machine
            (with ``tracker``: any CPU target this machine can build, for the device's CPU).
        database: MetaSchedule work folder (created; existing records are kept and extended, and
            take part in the choice). The choice goes to ``database/bnfold_choice.json``.
        trials: Total measured trials (0: no search, only the choice among existing records).
        shapes: Concrete shapes of dynamic inputs.
        trials_per_task: Trials per tuned function (default 32, or ``trials`` if fewer); the
            number of functions tuned is ``trials // trials_per_task``.
        threads: Threads everything is measured with (default: this machine's cores, as
            ``bnfold compile``; with ``tracker``, the device's default thread pool); compile
            with the same ``--threads``.
        seed: MetaSchedule's random seed.
        tracker: ``HOST:PORT`` of a TVM RPC tracker: measure everything (bnfold's schedules,
            the search, the choice) on a device it hands out under ``key`` (None: here).
        key: The device key servers registered with the tracker under.
        session_timeout: Seconds one RPC session may last (one function's timing, one
            MetaSchedule measurement).
        progress: Told when each step (import, baseline, search, choose) starts and ends.

    Returns:
        A summary: tasks, tuned (functions searched now), trials, trials_per_task, threads,
        target, measured_on, seconds, database, choice_file and ``functions`` (one dict per
        function).

    Raises:
        BnfoldError: Not a CPU target, MetaSchedule's packages missing, bad arguments, the
            tracker or its device unusable.
    """
    tgt = (targets_.get(target) if isinstance(target, str) else target).resolved()
    if tgt.device != "cpu":
        raise BnfoldError(f"bnfold tune tunes CPU targets only, not {tgt.spec}")
    where = MeasureOn(tracker, key, session_timeout, tgt.cross_compiler)
    where.check()
    if where.remote:
        buildable = tgt.can_build()
        if not buildable:
            raise BnfoldError(f"cannot build for {tgt.spec} here: {buildable.why}")
    elif tgt.arch != targets_.host_arch():
        raise BnfoldError(f"tuning measures on this machine: {tgt.spec} code cannot run here "
                          "(measure on a device: --tracker HOST:PORT --key KEY)")  # fmt: skip
    if trials < 0:
        raise BnfoldError(f"trials must be >= 0, got {trials}")
    if trials_per_task is not None and trials_per_task < 1:
        raise BnfoldError(f"trials per task must be >= 1, got {trials_per_task}")
    if threads is not None and threads < 1:
        raise BnfoldError(f"threads must be >= 1, got {threads}")
    missing = missing_packages()
    if missing:
        raise BnfoldError(f"MetaSchedule needs {', '.join(missing)}: pip install psutil "
                          "cloudpickle xgboost-cpu")  # fmt: skip
    work_dir = Path(database)
    if work_dir.exists() and not work_dir.is_dir():
        raise BnfoldError(f"{work_dir}: exists and is not a folder")
    previous = read_choice(work_dir) if work_dir.is_dir() else None
    if previous and previous.get("measured_on", LOCAL) != where.describe():
        logger.warning("%s: its earlier choices were measured on %s, these on %s", work_dir,
                       previous.get("measured_on", LOCAL), where.describe())  # fmt: skip
    from tvm.s_tir import meta_schedule as ms

    steps = Steps(progress, digits=1)
    # Before any parallel TVM code here: this process's pool, and MetaSchedule's workers. On
    # an RPC device the count is set in each of its sessions instead.
    measuring = (
        contextlib.nullcontext(_device_threads(where, threads)) if where.remote
        else _measuring_threads(threads or os.cpu_count() or 1)
    )  # fmt: skip
    with measuring as threads:
        with steps("import"):
            mod, tvm_tgt = fused_module(model_path, tgt, shapes, num_cores=threads)
            tasks = [
                t
                for t in ms.relax_integration.extract_tasks(mod, tvm_tgt)
                if not t.dispatched[0]["main"].attrs.get("tirx.is_scheduled", False)
            ]
        with steps("baseline"):
            measured = [_baseline(t, tvm_tgt, threads, where) for t in tasks]
        functions = [fn for fn, _ in measured]
        logger.info("bnfold's schedules timed for %d functions of %s", len(tasks),
                    Path(model_path).name)  # fmt: skip

        selected, per_task = plan(functions, trials, trials_per_task)
        by_name = {t.task_name: t for t in tasks}
        work_dir.mkdir(parents=True, exist_ok=True)
        if selected:
            logger.info("tuning %d of %d functions, %d trials each: %s", len(selected), len(tasks),
                        per_task, ", ".join(f.function for f in selected))  # fmt: skip
            for fn in selected:
                fn.tuned_now = True
            with steps("search"):
                _search([by_name[f.function] for f in selected], tvm_tgt, work_dir, trials,
                        per_task, seed, where, threads)  # fmt: skip

        with steps("choose"):
            db = ms.database.JSONDatabase(work_dir=str(work_dir))
            for task, (fn, lib) in zip(tasks, measured, strict=True):
                _choose(fn, task, lib, db, tvm_tgt, where)

    workloads = dict(previous["workloads"]) if previous else {}
    workloads.update({fn.shash: fn.to_dict() for fn in functions})
    choice_file = work_dir / CHOICE_FILE
    atomic.write_json(choice_file, {"format": CHOICE_FORMAT, "measured_on": where.describe(),
                                    "workloads": workloads})  # fmt: skip
    return {
        "database": str(work_dir),
        "choice_file": str(choice_file),
        "tasks": len(tasks),
        "tuned": len(selected),
        "trials": trials,
        "trials_per_task": per_task,
        "threads": threads,
        "target": tgt.spec,
        "measured_on": where.describe(),
        "seconds": steps.total(),
        "functions": [
            {"shash": fn.shash, "tuned_now": fn.tuned_now, **fn.to_dict()} for fn in functions
        ],
    }


def table(functions: Sequence[Mapping[str, Any]], measured_on: str | None = None) -> str:
    """The per-function table of a :func:`tune_model` summary, heaviest first, with a total;
    headed by where the times were measured when ``measured_on`` is given."""
    rows = sorted(functions, key=lambda f: -f["weight"] * f["bnfold_ms"])
    width = max([len("function"), *(len(f["function"]) for f in rows)])
    rule_w = max([len("bnfold rule"), *(len(f["rule"]) for f in rows)])
    lines = [f"times measured on: {measured_on}"] if measured_on else []
    lines.append(f"{'function':<{width}}  {'calls':>5}  {'bnfold rule':<{rule_w}}  "
                 f"{'bnfold ms':>9}  {'tuned ms':>9}  chosen")  # fmt: skip
    for f in rows:
        tuned = f"{f['tuned_ms']:9.4f}" if f["tuned_ms"] is not None else f"{'-':>9}"
        mark = " (searched now)" if f.get("tuned_now") else ""
        lines.append(f"{f['function']:<{width}}  {f['weight']:>5}  {f['rule']:<{rule_w}}  "
                     f"{f['bnfold_ms']:9.4f}  {tuned}  {f['chosen']}{mark}")  # fmt: skip
    bnfold_total = sum(f["weight"] * f["bnfold_ms"] for f in rows)
    chosen_total = sum(
        f["weight"] * (f["tuned_ms"] if f["chosen"] == "tuned" else f["bnfold_ms"]) for f in rows
    )
    n_tuned = sum(1 for f in rows if f["chosen"] == "tuned")
    n_records = sum(1 for f in rows if f["tuned_ms"] is not None)
    lines.append(f"{n_tuned} of {len(rows)} functions take a tuned record ({n_records} have "
                 f"records); sum of calls x time: bnfold {bnfold_total:.3f} ms, with the "
                 f"choice {chosen_total:.3f} ms")  # fmt: skip
    return "\n".join(lines)
