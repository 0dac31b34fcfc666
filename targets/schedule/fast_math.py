"""Sigmoid and erf as vector arithmetic: ``sigmoid(x) = 1 / (1 + fast_exp(-x))``, ``fast_erf``.

TVM lowers ``sigmoid`` to LLVM's ``exp`` intrinsic and ``erf`` to a call, which x86 has no
vector instruction for: LLVM calls libm's ``expf`` / ``erff`` once per lane, and every call
clobbers the vector registers that hold a conv tile's accumulators. A depthwise 3x3 conv with a
SiLU epilogue (``x * sigmoid(x)``, EfficientNet, MixNet) spent 9 ms of its 9.1 ms there
(96 x 56 x 56, 1 thread); GELU (``x / 2 * (1 + erf(x / sqrt 2))``, ConvNeXt's MLPs) the same.

- ``topi.fast_exp`` is exp in vector arithmetic: range reduction ``x = n ln2 + r``
  (``|r| <= ln2 / 2``), a degree-7 polynomial for ``exp(r)`` and ``2^n`` built in the exponent
  bits, with ``x`` clamped to ``[-88.38, 88.38]``. Its relative error is ~1e-7 (float32
  rounding), so the sigmoid stays within a few float32 ulps of ``1 / (1 + exp(-x))``: below
  ``exp(-88)`` the clamp keeps ``sigmoid(x)`` at ~6e-39 instead of an underflowing 0, an
  absolute difference below float32's smallest normal.
- ``topi.fast_erf`` is Eigen's float erf: ``x`` clamped to ``[-4, 4]`` (``1 - erf(4)`` is
  1.5e-8, below float32's resolution at 1), then a rational function (degree-13 odd numerator,
  degree-6 even denominator) with an absolute error of a few 1e-7.

The rewrite is a Relax pass (before legalization), so the function is fused and scheduled like
any elementwise epilogue.
"""

from __future__ import annotations

from typing import Any

from bnfold.targets.schedule.rewrites import call_rewrite


def _fast_sigmoid(x: Any) -> Any:
    from tvm import te, topi

    neg = te.compute(x.shape, lambda *i: -x(*i), name="neg", tag="elemwise")
    e = topi.fast_exp(neg)
    one = te.const(1.0, x.dtype)
    return te.compute(x.shape, lambda *i: one / (one + e(*i)), name="sigmoid", tag="elemwise")


def _fast_erf(x: Any) -> Any:
    from tvm import topi

    return topi.fast_erf(x)


# Relax op -> (TE compute, name of the PrimFunc it becomes).
_FAST: dict[str, tuple[Any, str]] = {
    "relax.sigmoid": (_fast_sigmoid, "fast_sigmoid"),
    "relax.erf": (_fast_erf, "fast_erf"),
}


def fast_sigmoid() -> Any:
    """A Relax pass: every float32 ``relax.sigmoid`` becomes :func:`_fast_sigmoid` (a
    ``call_tir`` of ``1 / (1 + fast_exp(-x))``), every float32 ``relax.erf`` ``fast_erf``."""
    import tvm

    def wanted(call: Any) -> bool:
        return (
            isinstance(call.op, tvm.ir.Op)
            and call.op.name in _FAST
            and getattr(call.ty, "dtype", "") == "float32"
        )

    def rewrite(bb: Any, call: Any) -> Any:
        compute, name = _FAST[call.op.name]
        return bb.call_te(compute, call.args[0], primfunc_name_hint=name)

    return call_rewrite("bnfold.FastMath", wanted, rewrite)
