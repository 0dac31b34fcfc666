"""What the CPU schedule rules share: the rule base class, loop and block queries, and the
schedule steps more than one rule takes (parallel + vectorized loops, register accumulation).

A rule (:class:`Rule`) has dlight's shape (``tvm.s_tir.dlight``'s ``ScheduleRule``): ``apply(func,
target, tunable)`` returns a ``tvm.s_tir.Schedule`` or None (declined), so a rule can be handed
to ``dlight.ApplyDefaultSchedule``. bnfold's own pass (:func:`bnfold.targets.schedule.apply_rules`)
calls :meth:`Rule.attempt` instead, which also says what the rule saw (a kind: ``conv3x3``,
``dense``) or, for the rules that give one, why it declined (a :class:`Declined` string). A
schedule primitive that refuses (raises) is a decline: the function keeps TVM's default loops.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

logger = logging.getLogger(__name__)

# A parallel task should have at least this many innermost iterations, so that the thread
# pool's per-task cost stays small.
MIN_TASK = 512


class Declined(str):
    """Why a rule did not take a function (the rule returns it instead of a schedule)."""


# What :meth:`Rule.schedule` returns: (schedule, kind), a decline with its reason, or None (a
# decline without one).
Found = tuple[Any, str] | Declined | None


class Rule:
    """A CPU schedule rule: :meth:`decide` whether it takes a PrimFunc (and how), then
    :meth:`rewrite` its schedule. ``name`` is the rule's name in the manifest's
    ``compile.schedule_rules`` (``bnfold_conv:conv3x3``)."""

    name: ClassVar[str]

    def decide(self, sch: Any) -> Any:
        """What the rule would do with the function of ``sch`` (not changed here): a plan for
        :meth:`rewrite`, or a decline: None, or a :class:`Declined` reason."""
        raise NotImplementedError

    def rewrite(self, sch: Any, plan: Any, target: Any) -> Found:
        """Schedule ``sch`` by ``plan`` for ``target``: (schedule, kind), or a decline."""
        raise NotImplementedError

    def schedule(self, func: Any, target: Any) -> Found:
        """``func`` scheduled for ``target`` and the kind of operator it is, or a decline."""
        from tvm import s_tir

        sch = s_tir.Schedule(func)
        plan = self.decide(sch)
        if plan is None or isinstance(plan, Declined):
            return plan
        return self.rewrite(sch, plan, target)

    def attempt(self, func: Any, target: Any) -> Found:
        """:meth:`schedule`, a refused schedule primitive counted as a decline (None)."""
        try:
            return self.schedule(func, target)
        except Exception as e:  # a schedule primitive refused: keep the default loops
            logger.debug("%s declined: %s", self.name, str(e).splitlines()[0] if str(e) else e)
            return None

    def apply(self, func: Any, target: Any, _tunable: bool) -> Any:
        """dlight's ``ScheduleRule.apply``: the schedule, or None when the rule declines."""
        found = self.attempt(func, target)
        return None if found is None or isinstance(found, str) else found[0]


def divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is <= ``limit`` (at least 1)."""
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


def extent(sch: Any, loop: Any) -> int | None:
    """A loop's extent, None if it is not a constant."""
    from tvm import tirx

    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def blocks(sch: Any) -> list[Any]:
    """The blocks under the function's root block, in order (none without a root)."""
    root = sch.get_sblock("root") if _has_root(sch) else None
    return list(sch.get_child_blocks(root)) if root is not None else []


def _has_root(sch: Any) -> bool:
    try:
        sch.get_sblock("root")
    except Exception:
        return False
    return True


def is_reduction(sch: Any, block: Any) -> bool:
    """Whether the block has a non-spatial iterator."""
    return any(int(iv.iter_type) != 0 for iv in sch.get(block).iter_vars)


def single_reduction(sch: Any, blocks_: list[Any], name: str) -> Any:
    """The function's only reduction block, if its name contains ``name``; else None."""
    reductions = [b for b in blocks_ if is_reduction(sch, b)]
    if len(reductions) != 1 or name not in sch.get(reductions[0]).name_hint:
        return None
    return reductions[0]


def shape(region: Any) -> list[int]:
    """The static shape of the buffer a block read / write region is on."""
    return [int(d) for d in region.source.shape]


def vector_lanes(target: Any) -> int:
    """fp32 lanes of the target's widest vector register.

    On x86 the width comes from the CPU's features: TVM 0.27's ``llvm_get_vector_width``
    answers 512 for every x86-64 CPU (``x86-64``, ``haswell``, ``znver3`` included), and rules
    sized for 32 AVX-512 registers spill on AVX2's 16 (1 thread, Zen 3, 1x1 128 -> 512 on
    28 x 28: 27.7 ms as 16 lanes, 20x onnxruntime)."""
    from tvm.target import codegen

    try:
        if "x86" in str(target.attrs.get("mtriple") or "x86_64"):
            for feature, bits in (("avx512f", 512), ("avx", 256), ("sse2", 128)):
                if codegen.target_has_features(feature, target):
                    return bits // 32
        bits = int(codegen.llvm_get_vector_width(target))
    except Exception:
        bits = 128
    return max(4, bits // 32)


def row_tile(width: int, lanes: int) -> int:
    """Output columns per tile: a divisor of the row (a tail would need a predicate, which
    kills vectorization), whole vectors if possible, else at most one vector: LLVM handles a
    <14 x float> well but a <28 x float> badly (measured: 2.3 vs 16.7 ms)."""
    for cand in (lanes, lanes // 2):
        if cand >= 4 and width % cand == 0:
            return cand
    best = divisor_at_most(width, lanes)
    return width if best < 4 and width <= 2 * lanes else best


def parallel_vectorize(sch: Any, block: Any, lanes: int) -> None:
    """Vectorize a spatial block's innermost loop (a divisor-sized piece of it), and run its
    outer loops, fused, in parallel. The innermost loop keeps its own index (fusing it with the
    outer ones would put div/mod in every lane's address and defeat vectorization)."""
    loops = sch.get_loops(block)
    extents = [extent(sch, lp) for lp in loops]
    if not loops or any(e is None for e in extents):
        return
    *outer, last = loops
    vec = divisor_at_most(extents[-1], lanes)  # type: ignore[arg-type]
    if vec >= 4:
        _, inner = sch.split(last, factors=[None, vec])
        sch.vectorize(inner)
    total = 1
    for e in extents:
        total *= e  # type: ignore[operator]
    if outer and total >= 2 * MIN_TASK:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def inline_epilogue(sch: Any, after: list[Any]) -> Any:
    """Inline every block after a reduction into the last one: the epilogue a tile is stored
    through (None: no block after)."""
    for b in after[:-1]:
        sch.compute_inline(b)
    return after[-1] if after else None


def accumulate(sch: Any, block: Any, epilogue: Any, loop: Any) -> Any:
    """Accumulate ``block``'s tile in a local buffer (registers after LLVM's SROA), stored at
    ``loop`` through the epilogue (if any), so the full-size result is never written; returns
    the block that stores the tile."""
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, loop)
    if epilogue is None:
        return acc
    sch.reverse_compute_at(epilogue, loop)
    sch.compute_inline(acc)
    return epilogue
