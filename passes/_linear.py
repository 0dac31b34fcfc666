"""Weight and bias arithmetic for folding a per-channel affine map into a linear op.

All functions take and return float64 numpy arrays; callers cast back to the model dtype. A
per-channel affine map is ``y = s * x + t`` along one channel axis, with ``s`` and ``t`` of shape
``(C,)``.

Backward (affine after the op, on its *output* channels)::

    s * (W x + b) + t  ==  (s W) x + (s b + t)

Forward (affine before the op, on its *input* channels)::

    W (s x + t) + b  ==  (W s) x + (W t + b)

The forward identity holds for a convolution only where every input the kernel sees is real
data: zero padding added after the affine map would have been ``t`` before it. Callers check that.
"""

from __future__ import annotations

import numpy as np


def conv_scale_out(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Conv weight (M, C/g, k...): scale output channel ``m`` by ``s[m]``."""
    return w * s.reshape((-1,) + (1,) * (w.ndim - 1))


def conv_transpose_scale_out(w: np.ndarray, s: np.ndarray, group: int) -> np.ndarray:
    """ConvTranspose weight (C_in, M/g, k...): scale output channel ``m`` by ``s[m]``.

    Output channel ``m`` of group ``g`` is column ``m - g * M/g`` of the rows of group ``g``,
    so the scale is laid out as (g, M/g) against the weight viewed as (g, C_in/g, M/g, k...).
    """
    c_in, m_per_g = w.shape[0], w.shape[1]
    kernel = w.shape[2:]
    wg = w.reshape((group, c_in // group, m_per_g, *kernel))
    sg = s.reshape((group, 1, m_per_g) + (1,) * len(kernel))
    return (wg * sg).reshape(w.shape)


def gemm_b_scale_out(b: np.ndarray, s: np.ndarray, trans_b: bool) -> np.ndarray:
    """Gemm/MatMul weight: scale output column n by s[n] (B is (K,N), or (N,K) if transB)."""
    return b * (s[:, None] if trans_b else s[None, :])


def bias_after(bias: np.ndarray | None, s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """New bias ``s * b + t`` (``b`` broadcasts against ``s``; no bias means ``b = 0``)."""
    if bias is None:
        return np.array(t, dtype=np.float64)
    return s * bias + t


def conv_input_channel_map(w_shape: tuple[int, ...], group: int, v: np.ndarray) -> np.ndarray:
    """Lay out an input-channel vector ``v`` (C,) against a conv weight (M, C/g, k...).

    Output channel ``o`` belongs to group ``o // (M/g)`` and reads input channels
    ``g * C/g .. (g+1) * C/g - 1``; the result has shape (M, C/g, 1, ...) and broadcasts
    against the weight.
    """
    m, c_per_g = w_shape[0], w_shape[1]
    m_per_g = m // group
    groups_of_o = np.arange(m) // m_per_g
    per_o = v.reshape(group, c_per_g)[groups_of_o]  # (M, C/g)
    return per_o.reshape((m, c_per_g) + (1,) * (len(w_shape) - 2))


def conv_fold_input(
    w: np.ndarray, bias: np.ndarray | None, s: np.ndarray, t: np.ndarray, group: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Conv weight/bias after folding ``s * x + t`` on its input channels (no padding case)."""
    w_new = w * conv_input_channel_map(w.shape, group, s)
    if not np.any(t):
        return w_new, bias
    shift = (w * conv_input_channel_map(w.shape, group, t)).sum(axis=tuple(range(1, w.ndim)))
    return w_new, shift if bias is None else bias + shift


def matrix_fold_input(
    b: np.ndarray, s: np.ndarray, t: np.ndarray, trans_b: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Gemm/MatMul weight after folding ``s * x + t`` on the contraction axis K.

    Returns the new weight and the output shift ``t @ B`` of shape (N,).
    """
    b_kn = b.T if trans_b else b
    b_new_kn = b_kn * s[:, None]
    shift = t @ b_kn
    return (b_new_kn.T if trans_b else b_new_kn), shift
