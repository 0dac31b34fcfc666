"""bnfold's int8 kernels: int8 x int8 -> int32 convs with a fixed-point requantize epilogue,
as scheduled TVM PrimFuncs, one module per instruction set.

=================  ============================================================================
``spec``           :class:`QConv` (the frozen conv spec every kernel takes), the geometry, the
                   register tile, the compile-time requantize constants; the math
``reference``      the numpy references the tests compare every kernel with
``skeleton``       the tiled loop all conv kernels share (tiles over output rows, columns and
                   channel blocks; accumulator init; requantize and store), parameterized by
                   the instruction set's multiply-accumulate step
``avx2``           x86 AVX2 ``vpmaddwd`` (dense: channel pairs or tap pairs; depthwise)
``avx512_vnni``    x86 AVX-512 VNNI ``vpdpbusd`` (dense: channel quads; depthwise: AVX2's)
``neon``           aarch64 NEON ``smull``/``smlal``/``sadalp`` (dense), ``smlal`` (depthwise)
``sdot``           aarch64 ARMv8.2-A ``sdot`` (dense; depthwise: NEON's)
``ops``            the x86 max pool, quantized add and float-output dense layer
=================  ============================================================================

:func:`conv2d_int8` picks the instruction set from the target's features through
:data:`DISPATCH` (the first predicate that holds, in priority order) and its kernel from the
conv's shape (:func:`bnfold.targets.int8.spec.geometry`).

Unsupported (:func:`conv2d_int8` returns None, the caller falls back to generic Relax ops):
grouped convs other than depthwise, a depthwise conv with a channel multiplier; x86 without
AVX2, other targets; on aarch64 without the dot product, dense convs whose weight holds -128.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from bnfold.targets.int8 import avx2, avx512_vnni, neon, sdot
from bnfold.targets.int8.ops import add_int8, dense_int8_float, max_pool2d_int8
from bnfold.targets.int8.reference import (
    reference_add_int8,
    reference_conv2d_int8,
    reference_dense_int8_float,
    reference_max_pool2d_int8,
)
from bnfold.targets.int8.skeleton import Isa, Kernel
from bnfold.targets.int8.spec import DTYPES, QAdd, QConv, Tile, geometry

__all__ = [
    "DISPATCH",
    "DTYPES",
    "ISAS",
    "Isa",
    "QAdd",
    "QConv",
    "Tile",
    "add_int8",
    "choose_isa",
    "conv2d_int8",
    "dense_int8_float",
    "max_pool2d_int8",
    "reference_add_int8",
    "reference_conv2d_int8",
    "reference_dense_int8_float",
    "reference_max_pool2d_int8",
]

logger = logging.getLogger(__name__)

# The instruction set of a target: the first whose predicate holds, in priority order.
DISPATCH: tuple[tuple[Callable[[Any], bool], Isa], ...] = (
    (avx512_vnni.supports, avx512_vnni.ISA),
    (avx2.supports, avx2.ISA),
    (sdot.supports, sdot.ISA),
    (neon.supports, neon.ISA),
)

# conv2d_int8's ``isa=`` overrides (benchmarks, tests), by name: every instruction set, and the
# VNNI kernel with a forced layout.
_NAMED = (avx2.ISA, avx512_vnni.ISA, avx512_vnni.ISA_256, avx512_vnni.ISA_512,
          avx512_vnni.ISA_OC, neon.ISA, sdot.ISA)  # fmt: skip
ISAS: dict[str, Isa] = {isa.name: isa for isa in _NAMED}


def choose_isa(target: Any) -> Isa | None:
    """The instruction set :data:`DISPATCH` picks for ``target``, or None (no int8 kernels)."""
    for applies, isa in DISPATCH:
        if applies(target):
            return isa
    return None


def conv2d_int8(
    x_shape: tuple[int, int, int, int],
    x_dtype: str,
    q: QConv,
    target: Any,
    tile: Tile | None = None,
    isa: str | None = None,
) -> Kernel | None:
    """A scheduled PrimFunc ``(x, *constants, out)`` of conv ``q`` on an ``x_shape`` input and
    the constant arrays it takes after x, or None when the case is not accelerated (see the
    module docstring).

    ``tile`` overrides the register tile, ``isa`` the instruction set (a key of
    :data:`ISAS`: ``"avx2"`` on a VNNI target, ``"vnni256"``, ``"vnni512"``, ``"vnnioc"``
    for a VNNI layout; benchmarks, tests)."""
    chosen = choose_isa(target)
    if chosen is None:
        logger.debug("int8 conv: no int8 kernel for target %s", target)
        return None
    geo = geometry(x_shape, x_dtype, q)
    if geo is None:
        return None
    kernels = ISAS[isa] if isa is not None else chosen
    if geo.depthwise:
        return kernels.depthwise(geo, x_dtype, q, tile)
    return kernels.dense(geo, x_dtype, q, tile)
