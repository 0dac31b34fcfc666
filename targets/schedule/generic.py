"""The fallback CPU rule: whatever no specific rule takes still runs parallel and vectorized.

A fused PrimFunc that no rule in :mod:`bnfold.targets.schedule` takes would keep TVM's default
loops: one thread, scalar, 20-40x slower than a scheduled loop nest (float pools, global
average pools, Resize, softmax, ...). This rule works block by block on the function's root
blocks, in order:

- a spatial block feeding only spatial blocks is inlined into its consumers;
- a spatial block that stays (the output, or a padded copy read by a reduction): its
  innermost loop vectorized (a divisor-sized piece), the others fused and run in parallel
  (:func:`~bnfold.targets.schedule._common.parallel_vectorize`);
- a reduction block whose loops are its spatial iterators then its reduction ones (TVM's
  order), either
  * *spatial lanes*: the output's last index is the innermost spatial iterator and the reads
    are not a sliding window (a reduction over a trailing axis kept, a matmul with an unusual
    layout): that loop is split, its inner piece moved inside the reduction loops and
    vectorized: each lane accumulates one output, in order, exactly as before; or
  * *reduction lanes* (``rfactor``): the innermost reduction loop reads contiguous memory (a
    global average pool: ``n, c | y, x``): the reduction loops are fused and split by the
    vector width, and the inner piece factored out into a partial result per lane
    (vectorized), summed afterwards. This changes the summation order (``w`` partial sums),
    the same reassociation a vectorized library reduction makes. Measured, 1 thread: a
    96 x 56 x 56 global average pool 0.51 -> 0.10 ms;
  * else (pooling windows): the loop order stays (vectorized window lanes and padded copies
    split into border and interior measured slower than TVM's loops for float pools, 1
    thread: 3x3/2 max pool 64 x 112 x 112 2.1 vs 1.0 ms), only run in parallel.

  The spatial loops outside run fused, in parallel, when the block does enough work.

Every step is a TVM schedule primitive, which checks its own legality; a block whose step is
refused keeps what it had (the schedule is copied before each block), so the rule never makes
a function wrong, only less fast. It declines, with its reason, only a function with no blocks
or with symbolic loop extents, or one where no block could be improved.
"""

from __future__ import annotations

import logging
from typing import Any

from bnfold.targets.schedule._common import (
    MIN_TASK,
    Declined,
    Found,
    Rule,
    blocks,
    extent,
    is_reduction,
    parallel_vectorize,
    row_tile,
    vector_lanes,
)

logger = logging.getLogger(__name__)


class Generic(Rule):
    """The fallback: every root block inlined, or parallel and vectorized where legal."""

    name = "bnfold_generic"

    def decide(self, sch: Any) -> list[Any] | Declined:
        """The function's blocks, or why the rule cannot take it (no blocks, symbolic loop
        extents)."""
        found = blocks(sch)
        if not found:
            return Declined("no blocks")
        for b in found:
            if any(extent(sch, lp) is None for lp in sch.get_loops(b)):
                return Declined("symbolic loop extents")
        return found

    def rewrite(self, sch: Any, plan: list[Any], target: Any) -> Found:
        """Each block in turn on a copy of the schedule, kept if its step worked: the schedule
        and its kind (``generic``), or the reason it declined."""
        lanes = vector_lanes(target)
        names = [sch.get(b).name_hint for b in plan]
        done = 0
        for i, name in enumerate(names):
            last = i == len(names) - 1
            trial = sch.copy()
            try:
                if _step(trial, trial.get_sblock(name), last, lanes):
                    sch = trial
                    done += 1
            except Exception as e:  # a primitive refused: this block keeps what it had
                logger.debug("generic rule, block %s: %s", name, str(e).splitlines()[0] if e else e)
        if not done:
            return Declined("no block could be parallelized or vectorized")
        return sch, "generic"


def _step(sch: Any, block: Any, last: bool, lanes: int) -> bool:
    """Schedule one root block (see the module docstring); False if nothing was done."""
    if is_reduction(sch, block):
        return _reduction(sch, block, lanes)
    if not last and not _feeds_reduction(sch, block):
        sch.compute_inline(block)
        return True
    parallel_vectorize(sch, block, lanes)
    return True


def _feeds_reduction(sch: Any, block: Any) -> bool:
    return any(is_reduction(sch, c) for c in sch.get_consumers(block))


def _reduction(sch: Any, block: Any, lanes: int) -> bool:
    """A reduction block: spatial lanes, else reduction lanes (rfactor), spatial loops in
    parallel. False if its loops are not ``spatial..., reduction...``."""
    stmt = sch.get(block)
    kinds = [int(iv.iter_type) != 0 for iv in stmt.iter_vars]  # True: reduction
    loops = sch.get_loops(block)
    n_spatial = kinds.index(True)
    if len(loops) != len(kinds) or any(not k for k in kinds[n_spatial:]):
        return False
    spatial, reduction = loops[:n_spatial], loops[n_spatial:]
    extents = [extent(sch, lp) or 1 for lp in loops]
    work = 1
    for e in extents:
        work *= e
    write = stmt.writes[0].region
    inner_var = stmt.iter_vars[n_spatial - 1].var if n_spatial else None
    vec = row_tile(extents[n_spatial - 1], lanes) if n_spatial else 1
    windowed = _windowed(stmt, n_spatial)
    if inner_var is not None and write[-1].min.same_as(inner_var) and vec >= 4 and not windowed:
        # Spatial lanes: each lane one output, accumulated in the original order.
        *outer, last = spatial
        xo, xi = sch.split(last, factors=[None, vec])
        sch.reorder(*outer, xo, *reduction, xi)
        sch.vectorize(xi)
        par = [*outer, xo]
        _parallel(sch, par, work)
        sch.decompose_reduction(block, reduction[0])
        return True
    red_ext = 1
    for e in extents[n_spatial:]:
        red_ext *= e
    if red_ext >= 4 * lanes and red_ext % lanes == 0 and _contiguous_reads(stmt, n_spatial):
        fused = sch.fuse(*reduction) if len(reduction) > 1 else reduction[0]
        _, ri = sch.split(fused, factors=[None, lanes])
        rf = sch.rfactor(ri, factor_axis=len(stmt.writes[0].region))
        # The factored block: spatial..., ri (now spatial) with the reduction outside it.
        rf_loops = sch.get_loops(rf)
        ro_rf, ri_rf = rf_loops[-2], rf_loops[-1]
        if extent(sch, ri_rf) == lanes:
            sch.vectorize(ri_rf)
        _parallel(sch, rf_loops[: len(rf_loops) - 2], work)
        sch.decompose_reduction(rf, ro_rf)
        if spatial and n_spatial:
            # The final block sums ``lanes`` partials per output: parallel over outputs.
            loops_final = sch.get_loops(block)[:n_spatial]
            if work // red_ext >= 2 * MIN_TASK:
                fused_final = sch.fuse(*loops_final) if len(loops_final) > 1 else loops_final[0]
                sch.parallel(fused_final)
        return True
    if len(spatial) < 2:
        return False
    # The innermost spatial loop keeps its own index: fused in, every output would pay the
    # integer divisions that recover it (3x3/2 max pool: 1.4 -> 14.8 ms).
    _parallel(sch, spatial[:-1], work)
    return True


def _windowed(stmt: Any, n_spatial: int) -> bool:
    """Whether the block reads a sliding window (an index mixing a spatial and a reduction
    iterator: pooling). Measured, 1 thread: vectorized window lanes were slower than TVM's
    scalar loops for float pools (3x3/2 max pool 64 x 112 x 112: 6.4 vs 1.1 ms; 3x3/1 average
    pool 192 x 35 x 35: 1.95 vs 1.37), as :mod:`bnfold.targets.schedule.pool` found for
    other variants: those keep their loop order and only run in parallel."""
    from tvm.tirx.analysis import undefined_vars

    spatial = [iv.var for iv in stmt.iter_vars[:n_spatial]]
    reduction = [iv.var for iv in stmt.iter_vars[n_spatial:]]

    def uses(seen: list[Any], group: list[Any]) -> bool:
        return any(v.same_as(g) for v in seen for g in group)

    for region in stmt.reads:
        for rng in region.region:
            seen = list(undefined_vars(rng.min))
            if uses(seen, spatial) and uses(seen, reduction):
                return True
    return False


def _contiguous_reads(stmt: Any, n_spatial: int) -> bool:
    """Whether every read's last index is the innermost reduction iterator (plus a constant),
    so that consecutive reduction steps read consecutive elements."""
    from tvm.sym.pattern import detect_linear_equation

    r_var = stmt.iter_vars[-1].var
    others = [iv.var for iv in stmt.iter_vars if not iv.var.same_as(r_var)]
    for region in stmt.reads:
        if region.source.same_as(stmt.writes[0].source):
            continue
        coef = detect_linear_equation(region.region[-1].min, [r_var, *others])
        if len(coef) < 1 or not hasattr(coef[0], "value") or int(coef[0].value) != 1:
            return False
    return True


def _parallel(sch: Any, loops: list[Any], work: int) -> None:
    """Fuse ``loops`` (outermost first) and run them in parallel if there is enough work."""
    if loops and work >= 2 * MIN_TASK:
        sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])
