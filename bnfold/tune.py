"""MetaSchedule tuning on top of bnfold's CPU schedules: ``bnfold tune`` and ``compile --db``.

``tune_model`` folds, freezes and imports the model exactly as :func:`bnfold.lower.compile_model`
does, runs the CPU pipeline up to operator fusion (:func:`bnfold.targets._schedule.fused_passes`)
and tunes some of the fused PrimFuncs it leaves with MetaSchedule, recording into a database
folder. A short tune's records are often slower than bnfold's rule schedules (MobileNetV2, 100
trials over all 33 functions: 11.3 ms with bnfold's rules, 38.3 ms with every record applied), so
a record is used only where it is measured to be faster:

1. Baseline: every function is scheduled with bnfold's rules (TVM's default loops where the rules
   decline: "unscheduled"), built and timed in this process.
2. Plan: trials go where they can pay. Functions are ranked by their *headroom*, weight x (time -
   FLOPs / R), where R is the best FLOP rate any of the model's functions reaches with bnfold's
   rules: a function already as efficient as the best one has none, a slow depthwise conv,
   an unscheduled function (default loops) or a memory-bound one has most of its time.
   ``trials / trials_per_task`` functions are tuned from the top of that ranking, so each gets
   enough trials for a real evolutionary search (32 by default; a handful of trials per
   function finds nothing better than bnfold's rules).
3. Search: MetaSchedule on those functions, measuring with the thread count of the decision.
4. Choose: for every function with records (this run's or earlier ones), the best ``TOP_K``
   records and bnfold's schedule are built and timed again, interleaved, in this process, with
   ``threads`` threads (the same method and threads for both). A record is chosen only if its
   median is at least ``MARGIN`` below bnfold's; a function bnfold's rules decline takes its best
   record unless that is measurably (``MARGIN``) slower than TVM's default loops (a tiny
   reduction's record can be: a parallel loop costs more than the whole function). The
   decisions go to ``DIR/bnfold_choice.json`` (merged with those of other models tuned into the
   same folder).

``compile --db DIR`` applies only the chosen records (:func:`chosen_database`, an in-memory
database of them); every other function keeps bnfold's rules. A folder without a choice file (not
made by ``bnfold tune``) has all its records applied, with a warning;
``bnfold tune MODEL --trials 0 --db DIR`` makes the choice for an existing folder.

MetaSchedule needs ``psutil``, ``cloudpickle`` and ``xgboost-cpu`` (not declared by apache-tvm);
its default builder imports ``tvm.s_tir.tensor_intrin`` in every worker (slower than its 30 s
timeout on a small machine), so the builder here skips that (see the TVM notes), and its
``TuneContext`` imports it too (26 s), so only the host CPU's intrinsics are imported for it
(:func:`_host_tensor_intrinsics`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from bnfold.errors import BnfoldError
from bnfold.targets import Target

logger = logging.getLogger(__name__)

REQUIRED = ("psutil", "cloudpickle", "xgboost")
BUILD_TIMEOUT_S = 120
# The decisions of `bnfold tune`, in the database folder.
CHOICE_FILE = "bnfold_choice.json"
CHOICE_FORMAT = "bnfold.tune_choice/1"
# Default trials per tuned function: one evolutionary search round of a useful size.
TRIALS_PER_TASK = 32
# A record replaces bnfold's schedule only if it is at least this much faster (relative).
MARGIN = 0.03
# Records per function re-timed against bnfold's schedule (best by MetaSchedule's measurement).
TOP_K = 3
# Interleaved timing rounds per candidate, and each round's minimum length.
ROUNDS = 5
MIN_REPEAT_MS = 20


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
    import onnx
    import tvm

    from bnfold import ir, lower, pipeline
    from bnfold.targets._schedule import fused_passes

    folded, _ = pipeline.fold(ir.load(model_path))
    source = onnx.load(str(model_path), load_external_data=False)
    concrete = lower.resolve_shapes(source, shapes)
    mod = lower.import_relax(lower.freeze(folded, concrete), concrete)
    spec = {**target.tvm_target(), "num-cores": num_cores or os.cpu_count() or 1}
    host = target.tvm_host()
    tgt = tvm.target.Target(spec, host=host) if host else tvm.target.Target(spec)
    with tgt:
        mod = tvm.transform.Sequential(fused_passes(tgt))(mod)
    return mod, tgt


@dataclasses.dataclass
class Function:
    """One fused function (a MetaSchedule workload) and what ``bnfold tune`` decided for it.

    ``rule`` is bnfold's rule and kind (``bnfold_conv:depthwise``) or ``unscheduled``;
    ``bnfold_ms`` its time with that schedule (the default loops when unscheduled); ``tuned_ms``
    the best record's time, timed the same way (None: no record); ``search_ms`` that record's
    time in MetaSchedule's own measurement; ``record`` its key (:func:`record_key`); ``chosen``
    ``tuned`` or ``bnfold``; ``weight`` how many times the model calls it per inference.
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
    tuned_now: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The entry of the choice file."""
        d = dataclasses.asdict(self)
        d.pop("shash")
        d.pop("tuned_now")
        return d


def record_key(record: Any) -> str:
    """A stable key of a tuning record: sha256 of its trace (instructions and decisions)."""
    import hashlib

    trace = record.as_json()[0]
    return hashlib.sha256(json.dumps(trace, sort_keys=True).encode()).hexdigest()[:20]


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


def _args(func: Any) -> list[Any]:
    """Random float (zero integer) arguments for a PrimFunc on the CPU, seeded."""
    import numpy as np
    import tvm
    from tvm.s_tir import meta_schedule as ms

    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    args = []
    for info in ms.arg_info.ArgInfo.from_prim_func(func):
        shape, dtype = [int(s) for s in info.shape], str(info.dtype)
        a = rng.standard_normal(shape).astype(dtype) if "float" in dtype else np.zeros(shape, dtype)
        args.append(tvm.runtime.tensor(a, dev))
    return args


def _time_ms(libs: Sequence[Any], args: Sequence[Any], rounds: int = ROUNDS) -> list[float]:
    """Median ms per call of each built function, timed in interleaved rounds (after one
    untimed round), in this process with its current thread count."""
    import tvm

    dev = tvm.cpu()
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


def _baseline(task: Any, target: Any, threads: int) -> tuple[Function, Any]:
    """bnfold's schedule of a task's function, built and timed: (the Function, the library)."""
    import tvm_ffi
    from tvm.s_tir.analysis import estimate_tir_flops

    from bnfold.targets._schedule import schedule_function

    workload = task.dispatched[0]
    sch, match = schedule_function(workload["main"], target, task.task_name)
    lib = _build(sch.mod if sch is not None else workload, target)
    (bnfold_ms,) = _time_ms([lib], _args(workload["main"]), rounds=3)
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
    )
    return fn, lib


def _round(ms: float) -> float:
    """6 significant digits (a reshape takes 1e-5 ms)."""
    return float(f"{ms:.6g}")


def _choose(fn: Function, task: Any, bnfold_lib: Any, db: Any, target: Any) -> None:
    """Time the best records of ``task`` against bnfold's schedule and set ``fn``'s choice."""
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
    times = _time_ms([bnfold_lib, *libs], _args(workload["main"]))
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


def read_choice(database: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The choice file of a database folder (None if there is none).

    Raises:
        BnfoldError: The file exists but is not a choice file.
    """
    path = Path(database) / CHOICE_FILE
    if not path.is_file():
        return None
    try:
        choice = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BnfoldError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
    if not isinstance(choice, dict) or choice.get("format") != CHOICE_FORMAT:
        raise BnfoldError(f"{path}: not a {CHOICE_FORMAT} file")
    return choice


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
    tasks: Sequence[Any], target: Any, work_dir: Path, trials: int, per_task: int, seed: int
) -> None:
    """MetaSchedule on ``tasks`` into ``work_dir`` (measured with this process's
    ``TVM_NUM_THREADS``, which its worker processes inherit)."""
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
    ms.tune.tune_tasks(
        tasks=contexts, task_weights=weights, work_dir=str(work_dir), max_trials_global=trials,
        max_trials_per_task=per_task, num_trials_per_iter=min(64, max(2, per_task)),
        builder=ms.builder.LocalBuilder(f_build=_fast_build, timeout_sec=BUILD_TIMEOUT_S),
    )  # fmt: skip


@contextlib.contextmanager
def _measuring_threads(threads: int) -> Iterator[int]:
    """Measure with ``threads`` threads inside the block: this process's TVM thread pool (which
    keeps that count afterwards, as :func:`bnfold.runtime.load` leaves it) and
    ``TVM_NUM_THREADS``, which MetaSchedule's runner processes inherit (restored afterwards)."""
    from bnfold.runtime import set_threads

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
) -> dict[str, Any]:
    """Tune ``model_path``'s heaviest fused functions into ``database`` and choose, per function,
    between the best record and bnfold's rules (see the module docstring).

    Args:
        model_path: The ONNX model (folded here as ``compile`` folds it).
        target: A CPU target spec or :class:`~bnfold.targets.Target` that runs on this machine.
        database: MetaSchedule work folder (created; existing records are kept and extended, and
            take part in the choice). The choice goes to ``database/bnfold_choice.json``.
        trials: Total measured trials (0: no search, only the choice among existing records).
        shapes: Concrete shapes of dynamic inputs.
        trials_per_task: Trials per tuned function (default 32, or ``trials`` if fewer); the
            number of functions tuned is ``trials // trials_per_task``.
        threads: Threads everything is measured with (default: this machine's cores, as
            ``bnfold compile``); compile with the same ``--threads``.
        seed: MetaSchedule's random seed.

    Returns:
        A summary: tasks, tuned (functions searched now), trials, trials_per_task, threads,
        target, seconds, database, choice_file and ``functions`` (one dict per function).

    Raises:
        BnfoldError: Not a CPU target, MetaSchedule's packages missing, bad arguments.
    """
    from bnfold import atomic
    from bnfold import targets as targets_

    tgt = (targets_.get(target) if isinstance(target, str) else target).resolved()
    if tgt.device != "cpu":
        raise BnfoldError(f"bnfold tune tunes CPU targets only, not {tgt.spec}")
    if tgt.arch != targets_.host_arch():
        raise BnfoldError(f"tuning measures on this machine: {tgt.spec} code cannot run here")
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
    from tvm.s_tir import meta_schedule as ms

    start = time.perf_counter()
    # Before any parallel TVM code here: this process's pool, and MetaSchedule's workers.
    with _measuring_threads(threads or os.cpu_count() or 1) as threads:
        mod, tvm_tgt = fused_module(model_path, tgt, shapes, num_cores=threads)
        tasks = [
            t
            for t in ms.relax_integration.extract_tasks(mod, tvm_tgt)
            if not t.dispatched[0]["main"].attrs.get("tirx.is_scheduled", False)
        ]
        measured = [_baseline(t, tvm_tgt, threads) for t in tasks]
        functions = [fn for fn, _ in measured]
        logger.info("bnfold's schedules timed for %d functions of %s in %.1f s", len(tasks),
                    Path(model_path).name, time.perf_counter() - start)  # fmt: skip

        selected, per_task = plan(functions, trials, trials_per_task)
        by_name = {t.task_name: t for t in tasks}
        work_dir.mkdir(parents=True, exist_ok=True)
        if selected:
            logger.info("tuning %d of %d functions, %d trials each: %s", len(selected), len(tasks),
                        per_task, ", ".join(f.function for f in selected))  # fmt: skip
            for fn in selected:
                fn.tuned_now = True
            _search([by_name[f.function] for f in selected], tvm_tgt, work_dir, trials, per_task,
                    seed)  # fmt: skip

        t_choose = time.perf_counter()
        db = ms.database.JSONDatabase(work_dir=str(work_dir))
        for task, (fn, lib) in zip(tasks, measured, strict=True):
            _choose(fn, task, lib, db, tvm_tgt)
        logger.info("records timed against bnfold's schedules in %.1f s",
                    time.perf_counter() - t_choose)  # fmt: skip

    workloads = dict(previous["workloads"]) if previous else {}
    workloads.update({fn.shash: fn.to_dict() for fn in functions})
    choice_file = work_dir / CHOICE_FILE
    atomic.write_json(choice_file, {"format": CHOICE_FORMAT, "workloads": workloads})
    return {
        "database": str(work_dir),
        "choice_file": str(choice_file),
        "tasks": len(tasks),
        "tuned": len(selected),
        "trials": trials,
        "trials_per_task": per_task,
        "threads": threads,
        "target": tgt.spec,
        "seconds": round(time.perf_counter() - start, 1),
        "functions": [
            {"shash": fn.shash, "tuned_now": fn.tuned_now, **fn.to_dict()} for fn in functions
        ],
    }


def table(functions: Sequence[Mapping[str, Any]]) -> str:
    """The per-function table of a :func:`tune_model` summary, heaviest first, with a total."""
    rows = sorted(functions, key=lambda f: -f["weight"] * f["bnfold_ms"])
    width = max([len("function"), *(len(f["function"]) for f in rows)])
    rule_w = max([len("bnfold rule"), *(len(f["rule"]) for f in rows)])
    lines = [f"{'function':<{width}}  {'calls':>5}  {'bnfold rule':<{rule_w}}  {'bnfold ms':>9}  "
             f"{'tuned ms':>9}  chosen"]  # fmt: skip
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


def chosen_database(database: str | os.PathLike[str]) -> Any:
    """The MetaSchedule database ``compile --db`` applies: an in-memory one holding only the
    records ``bnfold tune`` chose (``bnfold_choice.json``); every record of the folder when it
    has no choice file (with a warning)."""
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    choice = read_choice(database)
    source = ms.database.JSONDatabase(work_dir=str(database))
    if choice is None:
        logger.warning("%s has no %s: every record in it replaces bnfold's schedule, even where "
                       "it is slower (`bnfold tune MODEL --trials 0 --db %s` chooses)", database,
                       CHOICE_FILE, database)  # fmt: skip
        return source
    wanted = {
        (shash, entry.get("record"))
        for shash, entry in choice["workloads"].items()
        if entry.get("chosen") == "tuned" and entry.get("record")
    }
    chosen = ms.database.MemoryDatabase()
    shashes = {s for s, _ in wanted}
    found: set[tuple[str, str]] = set()
    for rec in source.get_all_tuning_records():
        mod = rec.workload.mod
        shash = str(tvm_ffi.structural_hash(mod))
        if shash not in shashes:
            continue
        key = (shash, record_key(rec))
        if key not in wanted or key in found:
            continue
        found.add(key)
        workload = chosen.commit_workload(mod)
        chosen.commit_tuning_record(
            ms.database.TuningRecord(rec.trace, workload, rec.run_secs, rec.target, rec.args_info)
        )
    if len(found) < len(wanted):
        logger.warning("%s: %d chosen record(s) are missing from the database; those functions "
                       "keep bnfold's rules", database, len(wanted) - len(found))  # fmt: skip
    logger.info("%s: applying %d tuned record(s) chosen by bnfold tune; the other functions keep "
                "bnfold's rules", database, len(found))  # fmt: skip
    return chosen
