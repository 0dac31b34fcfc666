"""The x86 int8 kernels other than the conv (the callers are in :mod:`bnfold.lower.int8`): an
8-bit max pool (:func:`max_pool2d_int8`, AVX2), the add of two quantized tensors
(:func:`add_int8`, a residual connection, AVX2) and a dense layer with a float output
(:func:`dense_int8_float`, a classifier's last Gemm, AVX-512 VNNI). Their numpy references
are in :mod:`bnfold.targets.int8.reference`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bnfold.targets.int8 import avx2, avx512_vnni, skeleton
from bnfold.targets.int8.spec import DTYPES, QAdd

# --------------------------------------------------------------------------------------------
# Max pool


POOL_LANES = 16  # uint8 / int8 lanes of an xmm register: a row of the pool in few vectors


def max_pool2d_int8(
    x_shape: tuple[int, int, int, int],
    dtype: str,
    pool: tuple[int, int],
    strides: tuple[int, int],
    padding: tuple[int, int, int, int],
    target: Any,
) -> Any | None:
    """A scheduled PrimFunc ``(x, out)``: the 8-bit max pool of
    :func:`~bnfold.targets.int8.reference.reference_max_pool2d_int8` (NCHW, dilation 1, floor
    mode), or None where there is none (not x86 with AVX2, strides other than 1 and 2, windows
    larger than their stride allows the row buffer below to hold).

    Max pooling commutes with the (increasing) dequantize, so it runs on the quantized tensor
    itself, exactly. Per output row (rows in parallel chunks):

    1. the rows' maximum over the window rows inside the input, as bytes in a row buffer whose
       ``pl`` first and last bytes are the type's minimum (the identity of ``max``; the column
       padding), one contiguous vector of 16 bytes at a time (the last one moved back to end at
       the row's end: overlapping, never past it);
    2. 16 outputs at a time: the maximum over ``kx`` of the buffer's bytes ``x*sw + kx``; for
       stride 2 one contiguous 32-byte load whose even bytes a shuffle picks (``vpshufb`` /
       ``vpermb``), not 16 scalar loads. The last vector is again moved back to end at the row's
       end; rows narrower than 16 outputs use one vector of exactly their width.

    TVM's own max pool (a scalar loop over the window, the padded copy per element) took
    0.245 ms for ResNet-18's 64 x 112 x 112 3x3/2 pool on one Zen 4 core; this takes 0.065 ms
    (32- and 64-byte vectors: 0.17 and 0.20 ms, their stride-2 shuffles cost more).
    """
    from tvm.script import tirx as T

    n, c, h, w = (int(d) for d in x_shape)
    kh, kw = (int(k) for k in pool)
    sh, sw = (int(s) for s in strides)
    pt, pl, pb, pr = (int(p) for p in padding)
    if dtype not in DTYPES or not avx2.supports(target):
        return None
    if sh not in (1, 2) or sw not in (1, 2) or min(pt, pl, pb, pr) < 0:
        return None
    if pt >= kh or pb >= kh or pl >= kw or pr >= kw:  # a window wholly in the padding
        return None
    oh = (h + pt + pb - kh) // sh + 1
    ow = (w + pl + pr - kw) // sw + 1
    if oh < 1 or ow < 1:
        return None
    N, C, H, W, KH, KW, SH, SW, PT, PL = n, c, h, w, kh, kw, sh, sw, pt, pl
    OH, OW = oh, ow
    LO = DTYPES[dtype][0]
    # Input row vectors: 16 bytes, or the whole row if narrower (one odd-sized vector).
    IV = min(POOL_LANES, W)
    NIV = -(-W // IV)
    OV = min(POOL_LANES, OW)
    NOV = -(-OW // OV)
    # The row buffer: the padded row; after it, what the last output vector's loads read
    # beyond the row (the type's minimum too), in whole vectors.
    TAIL = -(-(SW * OV + KW) // POOL_LANES) * POOL_LANES
    RB = PL + W + TAIL
    NR = N * C * OH  # output rows
    CH = skeleton.chunks(NR)
    x_shape_ = (N, C, H, W)
    out_shape = (N, C, OH, OW)
    EVEN = [SW * i for i in range(OV)]

    def window(rows: Any, at: Any) -> Any:
        """``OV`` values ``rows[at + x*SW]``, x = 0..OV-1 (one contiguous load)."""
        if SW == 1:
            return rows[T.ramp(at, 1, OV)]
        return T.Shuffle([rows[T.ramp(at, 1, SW * OV)]], EVEN)

    def window_max(rows: Any, at: Any) -> Any:
        """The maximum over the window's columns of ``OV`` outputs starting at ``at``."""
        m = window(rows, at)
        for kx in range(1, KW):
            m = T.max(m, window(rows, at + kx))
        return m

    lo = T.broadcast(T.cast(LO, dtype), POOL_LANES)

    @T.prim_func
    def max_pool(x: T.Buffer(x_shape_, dtype), out: T.Buffer(out_shape, dtype)):
        T.func_attr({"global_symbol": "max_pool2d_int8", "tirx.noalias": True})
        xf = T.decl_buffer((N * C * H * W,), dtype, data=x.data)
        of = T.decl_buffer((N * C * OH * OW,), dtype, data=out.data)
        # One row buffer per chunk (a local buffer in a parallel loop would be allocated per
        # iteration, see bnfold.targets.int8.skeleton).
        rows = T.alloc_buffer((CH * RB,), dtype)
        for chunk in T.parallel(CH):
            rb = T.Bind(chunk * RB)
            # The column padding: written once, the rows only overwrite [PL, PL + W).
            for q in range(PL):
                rows[rb + q] = T.cast(LO, dtype)
            for v in range(TAIL // POOL_LANES):
                rows[T.ramp(rb + PL + W + v * POOL_LANES, 1, POOL_LANES)] = lo
            for r in range(chunk * NR // CH, (chunk + 1) * NR // CH):
                nc = T.Bind(r // OH)
                y = T.Bind(r % OH)
                # The window's first row inside the input (every window has one: pt, pb < kh),
                # copied; then the maximum with each row inside (itself again: max is
                # idempotent).
                first = T.Bind((nc * H + T.max(y * SH - PT, 0)) * W)
                for v in range(NIV):
                    j = T.Bind(T.min(v * IV, W - IV))
                    rows[T.ramp(rb + PL + j, 1, IV)] = xf[T.ramp(first + j, 1, IV)]
                for ky in T.unroll(KH):
                    row = T.Bind(y * SH + ky - PT)
                    if row >= 0 and row < H:
                        for v in range(NIV):
                            j = T.Bind(T.min(v * IV, W - IV))
                            rows[T.ramp(rb + PL + j, 1, IV)] = T.max(
                                rows[T.ramp(rb + PL + j, 1, IV)],
                                xf[T.ramp((nc * H + row) * W + j, 1, IV)],
                            )
                for v in range(NOV):
                    x0 = T.Bind(T.min(v * OV, OW - OV))
                    of[T.ramp((nc * OH + y) * OW + x0, 1, OV)] = window_max(rows, rb + x0 * SW)

    return skeleton.finish(skeleton.in_root_block(max_pool))


# --------------------------------------------------------------------------------------------
# Dense layer with a float output (a classifier's last Gemm)


DENSE_OCJ = 4  # zmm accumulators per tile of the dense kernel: 64 outputs, 4 independent chains


def dense_int8_float(
    x_shape: tuple[int, int],
    x_dtype: str,
    x_zero_point: int,
    weight: np.ndarray,
    scale: np.ndarray,
    bias: np.ndarray,
    target: Any,
) -> tuple[Any, list[np.ndarray]] | None:
    """A scheduled PrimFunc ``(x, wq, ep, out)`` and its constants ``[wq, ep]`` for the dense
    layer of :func:`~bnfold.targets.int8.reference.reference_dense_int8_float` (``x`` (N, NI)
    8-bit, ``weight`` (NO, NI) int8, ``out`` (N, NO) float32), or None where there is none (not
    AVX-512 VNNI; an accumulator that could leave int32).

    AVX-512 VNNI, output channels on the lanes: the weight is packed at compile time as
    ``wq[ob, q, j]`` = the int32 word of ``weight[16 ob + j, 4q .. 4q+3]``; each step
    broadcasts one word of 4 input bytes and ``vpdpbusd`` adds its 4 products to 16 outputs, for
    ``DENSE_OCJ`` vectors (64 outputs) per tile. int8 inputs are shifted to uint8 (``x ^ 0x80 =
    x + 128``) as ``vpdpbusd`` wants; the accumulator starts at ``-(z_x + 128 shifted) sum_i
    W[o, i]``, which takes both the shift and the zero point out, so it ends at the exact
    ``sum (x - z_x) W``. Then ``float32(acc) * scale[o] + bias[o]``.

    TVM's Relax matmul (uint8 x int8 -> int32 then the float epilogue, bnfold's dense schedule)
    took 0.159 ms for ResNet-18's 512 -> 1000 layer on one Zen 4 core (the float matmul on the
    dequantized weight 0.18 ms); this takes 0.007 ms alone, 0.024 ms inside the model (where
    the 512 KB weight comes from L3).
    """
    from tvm.script import tirx as T

    if x_dtype not in DTYPES or weight.dtype != np.int8 or weight.ndim != 2:
        return None
    if not avx512_vnni.supports(target):
        return None
    N, NI = (int(d) for d in x_shape)
    NO = int(weight.shape[0])
    if int(weight.shape[1]) != NI:
        return None
    SHIFTED = x_dtype == "int8"
    init = -(int(x_zero_point) + 128 * SHIFTED) * weight.astype(np.int64).sum(axis=1)
    # |acc| <= NI * 255 * 128 at every step (the products of uint8 and int8 bytes) plus init.
    if np.any(np.abs(init) + NI * 255 * 128 >= 2**31):
        return None
    VL, OCJ = 16, DENSE_OCJ
    OBN = VL * OCJ
    OB = -(-NO // OBN)
    IQ = -(-NI // 4)
    wpad = np.zeros((OB * OBN, 4 * IQ), dtype=np.int8)
    wpad[:NO, :NI] = weight
    words = np.ascontiguousarray(wpad.reshape(OB * OBN, IQ, 4)).view(np.int32)[..., 0]
    wq = np.ascontiguousarray(words.reshape(OB, OBN, IQ).transpose(0, 2, 1))  # (OB, IQ, OBN)
    ep = np.zeros((3, OB * OBN), dtype=np.float32)
    ep[0, :NO] = init.astype(np.int32).view(np.float32)  # the int32 start, stored bitwise
    ep[1, :NO] = scale
    ep[2, :NO] = bias
    NT = N * OB
    XB = N * 4 * IQ
    FLIP = 0x80 if SHIFTED else 0
    BYTES = f"int8x{4 * VL}"
    INTRIN = avx512_vnni.VPDPBUSD[VL]

    @T.prim_func
    def dense(
        x: T.Buffer((N, NI), x_dtype),
        wq_: T.Buffer((OB, IQ, OBN), "int32"),
        ep_: T.Buffer((3, OB * OBN), "float32"),
        out: T.Buffer((N, NO), "float32"),
    ):
        T.func_attr({"global_symbol": "dense_int8_float", "tirx.noalias": True})
        xf = T.decl_buffer((N * NI,), x_dtype, data=x.data)
        of = T.decl_buffer((N * NO,), "float32", data=out.data)
        # The input as uint8 quads, zero bytes after NI (their weight bytes are zero too).
        xb = T.alloc_buffer((XB,), "uint8")
        xw = T.decl_buffer((N * IQ,), "int32", data=xb.data)
        for i in range(N * 4 * IQ):
            if i % (4 * IQ) < NI:
                xb[i] = T.cast(xf[i // (4 * IQ) * NI + i % (4 * IQ)], "uint8") ^ T.uint8(FLIP)
            else:
                xb[i] = T.uint8(0)
        for chunk in T.parallel(skeleton.chunks(NT)):
            acc = T.alloc_buffer((OBN,), "int32", scope="local")
            res = T.alloc_buffer((OBN,), "float32", scope="local")
            for t in range(chunk * NT // skeleton.chunks(NT),
                           (chunk + 1) * NT // skeleton.chunks(NT)):  # fmt: skip
                nn = T.Bind(t // OB)
                ob = T.Bind(t % OB)
                for j in T.unroll(OCJ):
                    acc[T.ramp(j * VL, 1, VL)] = T.reinterpret(
                        f"int32x{VL}", ep_[0, T.ramp(ob * OBN + j * VL, 1, VL)]
                    )
                for q in range(IQ):
                    for j in T.unroll(OCJ):
                        acc[T.ramp(j * VL, 1, VL)] = T.call_llvm_pure_intrin(
                            f"int32x{VL}", INTRIN, acc[T.ramp(j * VL, 1, VL)],
                            T.reinterpret(BYTES, T.broadcast(xw[nn * IQ + q], VL)),
                            T.reinterpret(BYTES, wq_[ob, q, T.ramp(j * VL, 1, VL)]),
                        )  # fmt: skip
                for j in T.unroll(OCJ):
                    o0 = T.Bind(ob * OBN + j * VL)
                    res[T.ramp(j * VL, 1, VL)] = (
                        T.cast(acc[T.ramp(j * VL, 1, VL)], f"float32x{VL}")
                        * ep_[1, T.ramp(o0, 1, VL)]
                        + ep_[2, T.ramp(o0, 1, VL)]
                    )
                    if o0 + VL <= NO:
                        of[T.ramp(nn * NO + o0, 1, VL)] = res[T.ramp(j * VL, 1, VL)]
                    else:
                        for lane in range(VL):
                            if o0 + lane < NO:
                                of[nn * NO + o0 + lane] = res[j * VL + lane]

    return skeleton.finish(dense), [wq, ep]


# --------------------------------------------------------------------------------------------
# Add of two quantized tensors (a residual connection)


ADD_LANES = 16  # float32 lanes of a zmm register (two ymm halves on AVX2)


def add_int8(shape: tuple[int, ...], q: QAdd, target: Any) -> Any | None:
    """A scheduled PrimFunc ``(a, b, out)`` for
    :func:`~bnfold.targets.int8.reference.reference_add_int8` on two 8-bit tensors of the same
    ``shape`` (no broadcasting), or None where there is none (not x86 with AVX2).

    The same float32 arithmetic as onnxruntime's ``DequantizeLinear -> Add -> QuantizeLinear``
    (the division by ``s_y`` kept: a reciprocal multiply would move more values across a
    rounding tie), on 16 lanes over the flat tensor, elements in parallel chunks; the last
    vector moved back to end at the tensor's end (overlapping, never past it). LLVM may
    contract the products and the sum into one FMA (one rounding fewer than onnxruntime):
    a rounding tie can then flip, 1 LSB at most.

    TVM's fused float function (the same formula, 14-lane vectors along 56-column rows) took
    0.053 ms for ResNet-18's 64 x 56 x 56 residual add on one Zen 4 core; this takes 0.036 ms
    (32 or 64 lanes: the same; a reciprocal multiply instead of the division: 0.033 ms).
    """
    from tvm.script import tirx as T

    a_dtype, b_dtype, out_dtype = q.a_dtype, q.b_dtype, q.out_dtype
    if a_dtype not in DTYPES or b_dtype not in DTYPES or out_dtype not in DTYPES:
        return None
    if not avx2.supports(target):
        return None
    TOTAL = int(np.prod(shape))
    VL = min(ADD_LANES, TOTAL)
    NV = -(-TOTAL // VL)
    CH = skeleton.chunks(max(1, NV // 64))  # chunks of >= 64 vectors: the task overhead stays small
    ZA, ZB, ZY = int(q.a_zero_point), int(q.b_zero_point), int(q.y_zero_point)
    SA, SB, SY = (float(np.float32(v)) for v in (q.a_scale, q.b_scale, q.y_scale))
    LO, HI = float(q.clamp[0]), float(q.clamp[1])
    fv = f"float32x{VL}"

    def dq(buf: Any, at: Any, zp: int, s: float) -> Any:
        v = T.cast(T.cast(buf[T.ramp(at, 1, VL)], f"int32x{VL}") - T.broadcast(zp, VL), fv)
        return v * T.broadcast(T.float32(s), VL)

    @T.prim_func
    def add(
        a: T.Buffer(shape, a_dtype), b: T.Buffer(shape, b_dtype), out: T.Buffer(shape, out_dtype)
    ):
        T.func_attr({"global_symbol": "add_int8", "tirx.noalias": True})
        af = T.decl_buffer((TOTAL,), a_dtype, data=a.data)
        bf = T.decl_buffer((TOTAL,), b_dtype, data=b.data)
        of = T.decl_buffer((TOTAL,), out_dtype, data=out.data)
        for chunk in T.parallel(CH):
            for v in range(chunk * NV // CH, (chunk + 1) * NV // CH):
                at = T.Bind(T.min(v * VL, TOTAL - VL))
                q = T.round((dq(af, at, ZA, SA) + dq(bf, at, ZB, SB)) / T.broadcast(
                    T.float32(SY), VL)) + T.broadcast(T.float32(ZY), VL)  # fmt: skip
                of[T.ramp(at, 1, VL)] = T.cast(
                    T.max(T.min(q, T.broadcast(T.float32(HI), VL)),
                          T.broadcast(T.float32(LO), VL)),
                    f"{out_dtype}x{VL}",
                )  # fmt: skip

    return skeleton.finish(add)
