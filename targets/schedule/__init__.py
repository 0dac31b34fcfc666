"""Tuning-free CPU schedules for TVM's Relax CPU pipeline: parallel, vectorized, register-tiled.

TVM 0.27's default CPU pipeline schedules nothing: every fused operator is a plain,
single-threaded loop nest (MobileNetV2 ~25x slower than onnxruntime here). TOPI's x86 schedules
are gone and MetaSchedule needs minutes per model, so bnfold applies its own rules right after
operator fusion, in the spirit of the old ``topi/x86/conv2d_avx_*`` schedules, written with
``tvm.s_tir.Schedule``. One rule per file, each a class in dlight's shape
(:class:`~bnfold.targets.schedule._common.Rule`), tried in the order of :data:`RULES`:

- :mod:`~bnfold.targets.schedule.conv`: a fused NCHW conv2d (any group count, depthwise
  included) and its elementwise epilogue, as a register tile of output channels x columns (or
  channels on the lanes for narrow rows), tiles in parallel;
- :mod:`~bnfold.targets.schedule.matmul`: dense layers whose output columns are contiguous in
  the weight: a register tile of rows x column vectors (``gemm``), or column tiles for one
  row (``dense``);
- :mod:`~bnfold.targets.schedule.pool`: 8-bit max pooling (int8 models): padded rows made where
  they are read, rows in parallel;
- :mod:`~bnfold.targets.schedule.elementwise`: injective-only functions: producers inlined, the
  innermost loop vectorized, the outer ones run in parallel;
- :mod:`~bnfold.targets.schedule.generic`, tried last: whatever the others leave (float pools,
  global pools, reductions, softmax) gets parallel outer loops and a vectorized inner one
  where legal, so no function keeps TVM's plain loop nest.

Before fusion, Relax rewrites (:mod:`~bnfold.targets.schedule.rewrites`) give the rules
better-shaped work (a transposed conv as a 1x1 conv, dead kernel taps dropped, mostly-padding
convs banded, weights packed into the panels the conv and matmul rules tile), and ``sigmoid`` /
``erf`` become vector arithmetic (:mod:`~bnfold.targets.schedule.fast_math`): SiLU /
squeeze-excite epilogues stay in registers. :func:`cpu_pipeline` applies the tuned records
``bnfold tune`` chose (:mod:`~bnfold.targets.schedule.tuning_db`) before the rules.

A rule that cannot apply declines (the function keeps TVM's default loops), so an unusual
operator costs speed, never correctness; ``bnfold compile`` verifies the result anyway.
Measured on a 2-core Zen 4 (1 thread): MobileNetV2 184 -> ~11.5 ms, ResNet-18 1870 -> ~43 ms.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

from bnfold.targets.schedule._common import Rule
from bnfold.targets.schedule.conv import Conv
from bnfold.targets.schedule.elementwise import Elementwise
from bnfold.targets.schedule.fast_math import fast_sigmoid
from bnfold.targets.schedule.generic import Generic
from bnfold.targets.schedule.matmul import Matmul
from bnfold.targets.schedule.pool import Pool
from bnfold.targets.schedule.rewrites import (
    channels_last_weights,
    dead_taps_trimmed,
    packed_matmul_weights,
    padded_taps_banded,
    transposed_conv_as_conv,
)
from bnfold.targets.schedule.tuning_db import chosen_database

logger = logging.getLogger(__name__)

# The rules in the order :func:`schedule_function` tries them; the generic fallback last.
RULES: tuple[Rule, ...] = (Conv(), Matmul(), Pool(), Elementwise(), Generic())


@dataclasses.dataclass(frozen=True)
class Match:
    """What happened to one PrimFunc: the rule that scheduled it (None: every rule declined,
    TVM's default loops stay) and the kind of operator it saw (``conv3x3``, ``depthwise``,
    ``conv1x1``, ``dense``, ``elementwise``, ``generic``); when declined, the last rule's
    reason (or ``""``)."""

    function: str
    rule: str | None
    kind: str


_RECORDS: list[list[Match]] = []


@contextlib.contextmanager
def recording() -> Iterator[list[Match]]:
    """Collect a :class:`Match` for every PrimFunc the CPU rules see inside the block."""
    record: list[Match] = []
    _RECORDS.append(record)
    try:
        yield record
    finally:
        _RECORDS.remove(record)


def summarize(matches: list[Match]) -> dict[str, int]:
    """``{"bnfold_conv:conv3x3": 7, ..., "unscheduled": 1}``: PrimFuncs per rule and kind."""
    counts = collections.Counter(f"{m.rule}:{m.kind}" if m.rule else "unscheduled" for m in matches)
    return dict(sorted(counts.items()))


def schedule_function(func: Any, target: Any, name: str = "") -> tuple[Any, Match]:
    """The first rule that takes ``func``: its schedule (None if all decline) and the match."""
    reason = ""
    for rule in RULES:
        found = rule.attempt(func, target)
        if isinstance(found, str):
            reason = f"{rule.name}: {found}"
        elif found is not None:
            return found[0], Match(name, rule.name, found[1])
    return None, Match(name, None, reason)


def apply_rules() -> Any:
    """A module pass: bnfold's rules on every PrimFunc not scheduled yet (as
    ``dlight.ApplyDefaultSchedule`` would), which also reports what it did with each PrimFunc to
    every :func:`recording` block."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="bnfold.ApplyCpuRules")
    def _apply(mod: Any, _ctx: Any) -> Any:
        updated = {}
        for g_var, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if "tirx.is_scheduled" in func.attrs and int(func.attrs["tirx.is_scheduled"]) == 1:
                # Scheduled before the rules: a tuned schedule from a MetaSchedule database.
                for record in _RECORDS:
                    record.append(Match(g_var.name_hint, "tuned", "database"))
                continue
            target = func.attrs.get("target") or tvm.target.Target.current(allow_none=False)
            sch, match = schedule_function(func, target, g_var.name_hint)
            for record in _RECORDS:
                record.append(match)
            logger.debug("%s: %s %s", match.function, match.rule or "unscheduled", match.kind)
            if sch is not None:
                updated[g_var] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        for g_var, func in updated.items():
            mod[g_var] = func
        return mod

    return _apply


def fused_passes(target: Any) -> list[Any]:
    """The CPU pipeline up to operator fusion: the PrimFuncs bnfold's rules (and MetaSchedule,
    :mod:`bnfold.lower.tune`) schedule are the ones these passes leave."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    return [
        transposed_conv_as_conv(),
        dead_taps_trimmed(),
        padded_taps_banded(),
        fast_sigmoid(),
        channels_last_weights(target),
        packed_matmul_weights(target),
        *cpu.library_dispatch_passes(target),
        *cpu.legalize_passes(target),
    ]


def cpu_pipeline(target: Any, database: str | None = None) -> Any:
    """Relax's CPU pipeline with bnfold's rules (:func:`apply_rules`) after operator fusion.

    ``database``: a MetaSchedule work folder (``bnfold tune --db``); the functions for which
    ``bnfold tune`` chose a record (:func:`~bnfold.targets.schedule.tuning_db.chosen_database`)
    take the tuned schedule, bnfold's rules schedule the others.
    """
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        tuned: Any = contextlib.nullcontext()
        if database is not None:
            tuned = chosen_database(database)
        with target, tuned:
            # The database pass takes the target when it is made, and the database (the one
            # entered above) when it runs.
            apply_db = [] if database is None else [tvm.relax.transform.MetaScheduleApplyDatabase()]
            seq = tvm.transform.Sequential(
                fused_passes(target)
                + apply_db
                + [apply_rules()]
                + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline
