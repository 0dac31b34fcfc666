"""Sigmoid as vector arithmetic: ``sigmoid(x) = 1 / (1 + fast_exp(-x))``.

TVM lowers ``sigmoid`` to LLVM's ``exp`` intrinsic, which x86 has no vector instruction for:
LLVM calls libm's ``expf`` once per lane, and every call clobbers the vector registers that
hold a conv tile's accumulators. A depthwise 3x3 conv with a SiLU epilogue (``x * sigmoid(x)``,
EfficientNet, MixNet) spent 9 ms of its 9.1 ms there (96 x 56 x 56, 1 thread).
``topi.fast_exp`` is exp in vector arithmetic: range reduction ``x = n ln2 + r``
(``|r| <= ln2 / 2``), a degree-7 polynomial for ``exp(r)`` and ``2^n`` built in the exponent
bits, with ``x`` clamped to ``[-88.38, 88.38]``. Its relative error is ~1e-7 (float32
rounding), so the sigmoid stays within a few float32 ulps of ``1 / (1 + exp(-x))``: below
``exp(-88)`` the clamp keeps ``sigmoid(x)`` at ~6e-39 instead of an underflowing 0, an
absolute difference below float32's smallest normal.

The rewrite is a Relax pass (before legalization), so the sigmoid is fused and scheduled like
any elementwise epilogue.
"""

from __future__ import annotations

from typing import Any


def _fast_sigmoid(x: Any) -> Any:
    from tvm import te, topi

    neg = te.compute(x.shape, lambda *i: -x(*i), name="neg", tag="elemwise")
    e = topi.fast_exp(neg)
    one = te.const(1.0, x.dtype)
    return te.compute(x.shape, lambda *i: one / (one + e(*i)), name="sigmoid", tag="elemwise")


def fast_sigmoid() -> Any:
    """A Relax pass: every float32 ``relax.sigmoid`` becomes :func:`_fast_sigmoid` (a
    ``call_tir`` of ``1 / (1 + fast_exp(-x))``)."""
    import tvm

    from bnfold.targets._schedule import _call_rewrite

    def wanted(call: Any) -> bool:
        return (
            isinstance(call.op, tvm.ir.Op)
            and call.op.name == "relax.sigmoid"
            and getattr(call.ty, "dtype", "") == "float32"
        )

    def rewrite(bb: Any, call: Any) -> Any:
        return bb.call_te(_fast_sigmoid, call.args[0], primfunc_name_hint="fast_sigmoid")

    return _call_rewrite("bnfold.FastSigmoid", wanted, rewrite)
