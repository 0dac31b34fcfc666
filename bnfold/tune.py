"""MetaSchedule tuning on top of bnfold's CPU schedules: ``bnfold tune`` and ``compile --db``.

``tune_model`` folds, freezes and imports the model exactly as :func:`bnfold.lower.compile_model`
does, runs the CPU pipeline up to operator fusion (:func:`bnfold.targets._schedule.fused_passes`)
and tunes the fused PrimFuncs it leaves with MetaSchedule, recording into a database folder.
``compile --db DIR`` then takes each function's best record (functions without one keep bnfold's
rules), because the same passes produce structurally identical functions.

MetaSchedule needs ``psutil``, ``cloudpickle`` and ``xgboost-cpu`` (not declared by apache-tvm);
its default builder imports ``tvm.s_tir.tensor_intrin`` in every worker (slower than its 30 s
timeout on a small machine), so the builder here skips that (see the TVM notes).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bnfold.errors import BnfoldError
from bnfold.targets import Target

logger = logging.getLogger(__name__)

REQUIRED = ("psutil", "cloudpickle", "xgboost")
BUILD_TIMEOUT_S = 120


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
) -> tuple[Any, Any]:
    """(the Relax module after the CPU pipeline's fusion passes, its ``tvm.target.Target``)."""
    import onnx
    import tvm

    from bnfold import ir, lower, pipeline
    from bnfold.targets._schedule import fused_passes

    folded, _ = pipeline.fold(ir.load(model_path))
    source = onnx.load(str(model_path), load_external_data=False)
    concrete = lower.resolve_shapes(source, shapes)
    mod = lower.import_relax(lower.freeze(folded, concrete), concrete)
    # MetaSchedule sizes its parallel loops from the target's core count.
    spec = {**target.tvm_target(), "num-cores": os.cpu_count() or 1}
    host = target.tvm_host()
    tgt = tvm.target.Target(spec, host=host) if host else tvm.target.Target(spec)
    with tgt:
        mod = tvm.transform.Sequential(fused_passes(tgt))(mod)
    return mod, tgt


def tune_model(
    model_path: str | os.PathLike[str],
    target: str | Target,
    database: str | os.PathLike[str],
    trials: int,
    *,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    trials_per_task: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Tune ``model_path``'s fused functions for a CPU ``target`` into the ``database`` folder.

    Args:
        model_path: The ONNX model (folded here as ``compile`` folds it).
        target: A CPU target spec or :class:`~bnfold.targets.Target`.
        database: MetaSchedule work folder (created; existing records are kept and extended).
        trials: Total measured trials (``max_trials_global``).
        shapes: Concrete shapes of dynamic inputs.
        trials_per_task: Trials per function (default: ``trials`` spread over the functions,
            at least 1 each, so that none stays untuned by accident).
        seed: MetaSchedule's random seed.

    Returns:
        A summary: tasks, trials, seconds, database folder.

    Raises:
        BnfoldError: Not a CPU target, MetaSchedule's packages missing, bad arguments.
    """
    from bnfold import targets as targets_

    tgt = (targets_.get(target) if isinstance(target, str) else target).resolved()
    if tgt.device != "cpu":
        raise BnfoldError(f"bnfold tune tunes CPU targets only, not {tgt.spec}")
    if tgt.arch != targets_.host_arch():
        raise BnfoldError(f"tuning measures on this machine: {tgt.spec} code cannot run here")
    if trials < 1:
        raise BnfoldError(f"trials must be >= 1, got {trials}")
    missing = missing_packages()
    if missing:
        raise BnfoldError(f"MetaSchedule needs {', '.join(missing)}: pip install psutil "
                          "cloudpickle xgboost-cpu")  # fmt: skip
    from tvm.s_tir import meta_schedule as ms

    start = time.perf_counter()
    mod, tvm_tgt = fused_module(model_path, tgt, shapes)
    tasks = ms.relax_integration.extract_tasks(mod, tvm_tgt)
    per_task = trials_per_task or max(1, trials // max(1, len(tasks)))
    work_dir = Path(database)
    work_dir.mkdir(parents=True, exist_ok=True)
    logger.info("tuning %d functions of %s, %d trials (%d per function)", len(tasks),
                Path(model_path).name, trials, per_task)  # fmt: skip
    ms.relax_integration.tune_relax(
        mod, {}, tvm_tgt, str(work_dir), max_trials_global=trials,
        max_trials_per_task=per_task, num_trials_per_iter=min(64, max(2, per_task)),
        builder=ms.builder.LocalBuilder(f_build=_fast_build, timeout_sec=BUILD_TIMEOUT_S),
        seed=seed,
    )  # fmt: skip
    return {
        "database": str(work_dir),
        "tasks": len(tasks),
        "trials": trials,
        "trials_per_task": per_task,
        "target": tgt.spec,
        "seconds": round(time.perf_counter() - start, 1),
    }
