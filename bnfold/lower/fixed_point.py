"""The fixed-point arithmetic of bnfold's integer code: requantize multipliers and clamp bounds.

A quantized layer's int32 accumulator ``acc`` becomes its 8-bit output as

    y_q = clip((acc * m + 2^(k-1)) >> k + z_y, lo, hi)

where ``m 2^-k`` approximates the real multiplier ``M = s_x s_w / s_y`` with a 31-bit
mantissa ``m in [2^30, 2^31)`` (gemmlowp / TFLite style; relative error < 2^-30), and
``[lo, hi]`` is the output type's range narrowed by the activations before the quantize
(``Q`` is monotone, so ``Q(max(v, c)) == max(Q(v), Q(c))``). Pure numpy; the Relax rewrite
(:mod:`bnfold.lower.int8_rules`) and the kernels' numpy references both use it.
"""

from __future__ import annotations

import numpy as np

INT_RANGES = {"uint8": (0, 255), "int8": (-128, 127)}
MAX_SHIFT = 62


def requant_params(scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-point ``(multiplier, shift)`` with ``scale ~ multiplier * 2^-shift``,
    ``multiplier in [2^30, 2^31)``, ``1 <= shift <= 62`` (per element of ``scale``).

    A scale too small for 62 bits of shift maps everything to 0 (multiplier 0).

    Raises:
        ValueError: A scale that is not finite, negative, or too large (>= 2^30) for the form.
    """
    scale = np.asarray(scale, dtype=np.float64).reshape(-1)
    if np.any(~np.isfinite(scale)) or np.any(scale < 0):
        raise ValueError("requantize scales must be finite and >= 0")
    mant, exp = np.frexp(scale)  # scale = mant * 2^exp, mant in [0.5, 1)
    mult = np.round(mant * 2.0**31).astype(np.int64)
    carry = mult == 2**31  # mant rounded up to 1.0
    mult[carry] //= 2
    exp = exp + carry
    shift = 31 - exp.astype(np.int64)
    too_small = (shift > MAX_SHIFT) | (scale == 0)
    mult[too_small], shift[too_small] = 0, 1
    if np.any(shift < 1):
        raise ValueError(f"requantize scale {scale.max():g} is too large (>= 2^30)")
    return mult.astype(np.int32), shift.astype(np.int32)


def requantize_reference(
    acc: np.ndarray, multiplier: np.ndarray, shift: np.ndarray, zero_point: int,
    clamp: tuple[int, int], dtype: str, axis: int = 1,
) -> np.ndarray:  # fmt: skip
    """numpy: ``clip((acc * m + 2^(k-1)) >> k + z, lo, hi)``, per channel along ``axis``."""
    shape = [1] * acc.ndim
    shape[axis] = -1
    m = multiplier.astype(np.int64).reshape(shape)
    k = shift.astype(np.int64).reshape(shape)
    v = (acc.astype(np.int64) * m + (np.int64(1) << (k - 1))) >> k
    return np.clip(v + zero_point, clamp[0], clamp[1]).astype(dtype)


def clamp_bounds(
    acts: list[tuple[str, np.ndarray]],
    n_out: int,
    s_y: float,
    z_y: int,
    dtype: str,
    conv: bool,
) -> tuple[np.ndarray, np.ndarray] | str:
    """Per-channel ``(lo, hi)`` int64 bounds of the quantized output: the activations
    ``acts`` (``("max"|"min", bound)``, innermost first) moved into the quantized domain, then
    the type's saturation; or the reason there are none (a bound that varies over positions,
    or does not broadcast to the ``n_out`` output channels)."""
    lo = np.full(n_out, -np.inf)
    hi = np.full(n_out, np.inf)
    shape = (1, n_out, 1, 1) if conv else (1, n_out)
    for kind, c in acts:
        try:
            per = np.broadcast_to(c.reshape(c.shape if c.ndim else (1,)), shape)
        except ValueError:
            return "activation bound does not broadcast to the output channels"
        flat = per.reshape(-1, n_out) if not conv else per.reshape(n_out, -1).T
        if np.any(flat != flat[:1]):
            return "activation bound varies over positions, not only channels"
        qc = np.round(flat[0] / s_y) + z_y
        if kind == "max":
            lo, hi = np.maximum(lo, qc), np.maximum(hi, qc)
        else:
            lo, hi = np.minimum(lo, qc), np.minimum(hi, qc)
    qmin, qmax = INT_RANGES[dtype]
    return np.clip(lo, qmin, qmax).astype(np.int64), np.clip(hi, qmin, qmax).astype(np.int64)
