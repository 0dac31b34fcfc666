"""The pool rule: an 8-bit windowed pool (``max_pool2d`` of an int8 model).

One reduction block over the window (``n, c, y, x | window rows, columns``) writing 8-bit
integers, after an optional padded copy and with no epilogue: the padded rows are made per
output row, where they are read, and rows run in parallel. Measured on a 64 x 112 x 112 3x3/2
max pool (1 thread): uint8 0.33 -> 0.10 ms. Float pools are left to the generic rule
(:mod:`bnfold.targets.schedule.generic`): TVM's loop order was faster for them (0.18 ms against
0.25-0.42 for every variant tried: vectorized rows, unrolled window, parallel rows).
"""

from __future__ import annotations

from typing import Any

from bnfold.targets.schedule._common import Found, Rule, blocks, single_reduction


class Pool(Rule):
    """8-bit windowed pools: padded rows made where they are read, rows in parallel."""

    name = "bnfold_pool"

    def rewrite(self, sch: Any, plan: tuple[Any, list[Any]], target: Any) -> Found:
        pool, before = plan
        n, c, y, _, _, _ = sch.get_loops(pool)
        outer = sch.fuse(n, c, y)
        for b in reversed(before):
            sch.compute_at(b, outer)
        sch.parallel(outer)
        return sch, "pool"

    def decide(self, sch: Any) -> tuple[Any, list[Any]] | None:
        """The pool block and its producers, or None if this is not an 8-bit windowed pool."""
        found = blocks(sch)
        pool = single_reduction(sch, found, "pool")
        if pool is None:
            return None
        kinds = [int(iv.iter_type) for iv in sch.get(pool).iter_vars]
        if kinds != [0, 0, 0, 0, 2, 2]:  # n, c, y, x spatial | window rows, columns
            return None
        if str(sch.get(pool).writes[0].source.dtype) not in ("uint8", "int8"):
            return None
        before, after = found[: found.index(pool)], found[found.index(pool) + 1 :]
        if after:
            return None
        return pool, before
