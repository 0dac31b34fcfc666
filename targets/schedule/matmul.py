"""The matmul rule: a fused matmul / dense whose output columns are contiguous in the weight.

Takes one reduction block (``matmul``) first in the function, spatial iterators then one
reduction iterator, whose last spatial iterator ``j`` is the last index of exactly one operand,
the weight (``B[k, j]``), or its column within a panel (``Wp[j // P, k, j % P]``, packed by
:func:`bnfold.targets.schedule.rewrites.packed_matmul_weights`); the epilogue blocks after it
are elementwise on its output. Each output is still accumulated over ``k`` in order.

- Several rows that share the weight (a Linear on NHWC data, ConvNeXt's MLPs:
  ``[1, 56, 56, 96] x [96, 384]``, kind ``gemm``): a tile of ``mi`` rows x ``jv`` column
  vectors (:func:`gemm_tile`), ``mi * jv`` accumulators in registers, each row's element
  broadcast against ``jv`` weight vectors per reduction step. Tiles of a column panel run
  consecutively, so the panel of weights stays in cache while the rows stream by.
- One row (batch-1 dense, GEMV, kind ``dense``), or columns that are not whole vectors: tiles of
  columns vectorized, the reduction outside, tiles in parallel (:func:`_gemv`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bnfold.targets.schedule._common import (
    Found,
    Rule,
    accumulate,
    blocks,
    divisor_at_most,
    extent,
    inline_epilogue,
    is_reduction,
    shape,
    single_reduction,
    vector_lanes,
)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What :meth:`Matmul.decide` found: the reduction block, the blocks after it (the
    epilogue), whether the rows share the weight, and the panel width of a packed weight (None:
    not packed)."""

    red: Any
    after: list[Any]
    shared: bool
    panel: int | None


class Matmul(Rule):
    """Dense layers: a register tile of rows x column vectors (``gemm``), or tiles of columns
    for one row (``dense``)."""

    name = "bnfold_matmul"

    def rewrite(self, sch: Any, plan: _Plan, target: Any) -> Found:
        lanes = vector_lanes(target)
        red = plan.red
        epilogue = inline_epilogue(sch, plan.after)
        *spatial, j, k = sch.get_loops(red)
        ej = extent(sch, j)
        rows = [extent(sch, lp) for lp in spatial]
        if ej is None or any(e is None for e in rows):
            return None
        tile = gemm_tile(rows[-1] if plan.shared and rows else 1, ej, lanes)  # type: ignore[arg-type]
        if plan.panel is not None and (tile is None or tile[1] != plan.panel):
            return None  # packed for another tile: cannot happen unless the two rules disagree
        if tile is None:
            return _gemv(sch, red, epilogue, ej, lanes)
        mi_n, ji_n = tile
        *outer, row = spatial
        ro, ri = sch.split(row, factors=[None, mi_n])
        jo, ji = sch.split(j, factors=[None, ji_n])
        sch.reorder(jo, *outer, ro, k, ri, ji)
        acc = accumulate(sch, red, epilogue, ro)
        # The tile's store (and epilogue): rows unrolled, columns in whole vectors.
        *tile_rows, cols = sch.get_loops(acc)[len(outer) + 2 :]
        c_o, c_i = sch.split(cols, factors=[None, lanes])
        for lp in (*tile_rows, c_o):
            sch.unroll(lp)
        sch.vectorize(c_i)
        j_o, j_i = sch.split(ji, factors=[None, lanes])
        sch.unroll(ri)
        sch.unroll(j_o)
        sch.vectorize(j_i)
        sch.parallel(sch.fuse(jo, *outer, ro))
        sch.decompose_reduction(red, k)
        return sch, "gemm"

    def decide(self, sch: Any) -> _Plan | None:
        """The matmul's plan, or None if the function is not one this rule takes."""
        from tvm.tirx.analysis import undefined_vars

        found = blocks(sch)
        red = single_reduction(sch, found, "matmul")
        if red is None:
            return None
        stmt = sch.get(red)
        kinds = [int(iv.iter_type) for iv in stmt.iter_vars]
        if len(kinds) < 3 or kinds[-1] == 0 or any(k != 0 for k in kinds[:-1]):
            return None
        # The last spatial iterator must be the last index of the weight (contiguous columns),
        # or its column within a panel (``Wp[j // P, k, j % P]``).
        j_var = stmt.iter_vars[-2].var
        weights = [
            r for r in stmt.reads if any(v.same_as(j_var) for v in undefined_vars(r.region[-1].min))
        ]
        if len(weights) != 1:
            return None
        after = found[found.index(red) + 1 :]
        if any(is_reduction(sch, b) for b in after) or found.index(red) != 0:
            return None
        if any(shape(sch.get(b).writes[0]) != shape(stmt.writes[0]) for b in after):
            return None
        # Rows: the spatial iterators the weight does not depend on, all of them outer to j.
        used = [v for rng in weights[0].region for v in undefined_vars(rng.min)]
        row_vars = [iv.var for iv in stmt.iter_vars[:-2]]
        shared = not any(v.same_as(r) for v in used for r in row_vars)
        if not shared and len(kinds) > 4:
            return None
        packed = not weights[0].region[-1].min.same_as(j_var)
        return _Plan(red, after, shared, shape(weights[0])[-1] if packed else None)


def gemm_tile(rows: int, cols: int, lanes: int) -> tuple[int, int] | None:
    """Rows x columns of a matmul's register tile, or None for a single row or columns that
    are not whole vectors (then :func:`_gemv`). ``rows`` is the innermost row extent (the
    tile's rows divide it, so no row test is needed). Per reduction step a tile of ``mi`` rows
    x ``jv`` vectors does ``mi * jv`` multiply-adds for ``jv`` vector loads and ``mi``
    broadcasts: the tile with the most multiply-adds per load whose accumulators fit the
    vector registers with a few to spare (AVX-512: 32, AVX2: 16)."""
    if rows < 2 or cols % lanes:
        return None
    best: tuple[float, int, int] | None = None
    for jv in (4, 3, 2, 1):
        if (cols // lanes) % jv:
            continue
        budget = _avx512_accumulators(jv) if lanes >= 16 else 12
        mi = divisor_at_most(rows, budget // jv)
        score = mi * jv / (mi + jv)
        if best is None or score > best[0]:
            best = (score, mi, jv)
    if best is None or best[1] < 2:
        return None
    return best[1], best[2] * lanes


def _avx512_accumulators(vectors: int) -> int:
    """Accumulator registers a tile may use on AVX-512 (32 vector registers) when each
    reduction step loads ``vectors`` operand vectors and one broadcast: the rest, less one
    spare. One more and LLVM spills accumulators inside the reduction loop (measured: a
    4 x 7 tile of 28 ran 20% slower than 1 x 14)."""
    return 32 - vectors - 1 - 1


def _gemv(sch: Any, red: Any, epilogue: Any, ej: int, lanes: int) -> Found:
    """One row per tile: tiles of columns vectorized, the reduction outside, in parallel."""
    *spatial, j, k = sch.get_loops(red)
    half = max(4, lanes // 2)
    ji_n = max((m for m in range(half, 4 * lanes + 1, half) if ej % m == 0), default=0)
    if not ji_n:
        # No whole-vector divisor (10 classes): one odd-sized vector if the row is short, else
        # the largest divisor that still fills a few lanes.
        ji_n = ej if ej <= 2 * lanes else divisor_at_most(ej, 2 * lanes)
        if ji_n < 2:
            return None
    jo, ji = sch.split(j, factors=[None, ji_n])
    sch.reorder(*spatial, jo, k, ji)
    acc = accumulate(sch, red, epilogue, jo)
    sch.vectorize(sch.get_loops(acc)[-1])
    sch.vectorize(ji)
    sch.parallel(sch.fuse(*spatial, jo))
    sch.decompose_reduction(red, k)
    return sch, "dense"
