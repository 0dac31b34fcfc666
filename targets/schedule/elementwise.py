"""The elementwise rule: a function of injective blocks only (pad, add, clip, reshape, ...).

Every producer is inlined into the last block, whose innermost loop is vectorized (a
divisor-sized piece of it) and whose outer loops run, fused, in parallel
(:func:`~bnfold.targets.schedule._common.parallel_vectorize`). Declines a function with a
reduction, and one whose producers cannot all be inlined.
"""

from __future__ import annotations

from typing import Any

from bnfold.targets.schedule._common import (
    Found,
    Rule,
    blocks,
    is_reduction,
    parallel_vectorize,
    vector_lanes,
)


class Elementwise(Rule):
    """Injective-only functions: inline, parallelize, vectorize."""

    name = "bnfold_elementwise"

    def decide(self, sch: Any) -> list[Any] | None:
        """The function's blocks, if there are some and none is a reduction."""
        found = blocks(sch)
        if not found or any(is_reduction(sch, b) for b in found):
            return None
        return found

    def rewrite(self, sch: Any, plan: list[Any], target: Any) -> Found:
        for b in plan[:-1]:
            try:
                sch.compute_inline(b)
            except Exception:
                return None
        parallel_vectorize(sch, blocks(sch)[-1], vector_lanes(target))
        return sch, "elementwise"
