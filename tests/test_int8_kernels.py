"""The int8 conv kernels of :mod:`bnfold.targets.int8` (AVX2, AVX-512 VNNI, NEON, sdot):
built into a Relax module the way ``bnfold.lower.int8`` calls them (``relax.call_tir`` with the
constants as ``relax.const``), run on x86 (AVX2, AVX-512 VNNI where this CPU has it) and, under
qemu, on aarch64 (baseline NEON, and ``sdot`` for a CPU with the dot product), and compared
bit-exactly with :func:`reference_conv2d_int8`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bnfold.targets import int8 as K
from bnfold.targets.int8 import avx512_vnni, sdot, spec
from bnfold.targets.x86 import detect_cpu

tvm = pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

X86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}  # AVX2, FMA
ZNVER4 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"}  # + AVX-512 VNNI


def _host_has_vnni() -> bool:
    """Whether this machine can run AVX-512 VNNI code."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f" {f}" in flags for f in ("avx512_vnni", "avx512bw", "avx512vl"))


def _vnni_host_target() -> Any:
    """A VNNI target whose code runs here: this CPU's own. (Code built for znver4 may use
    instructions that another VNNI CPU lacks: on an Ice Lake it died of SIGILL.)"""
    if not _host_has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI (+BW, VL)")
    return tvm.target.Target(dict(ZNVER4, mcpu=detect_cpu()))


def _module(func: Any, consts: list[np.ndarray], x: np.ndarray, out_shape: tuple[int, ...],
            out_dtype: str) -> Any:  # fmt: skip
    """A Relax module whose main is ``call_tir(func, [x, *relax.const(consts)])``."""
    from tvm import relax

    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(list(x.shape), str(x.dtype)))
    with bb.function("main", [xv]):
        with bb.dataflow():
            gv = bb.add_func(func, "conv2d_int8")
            args = [xv] + [relax.const(a) for a in consts]
            y = bb.emit(relax.call_tir(gv, args, relax.TensorType(list(out_shape), out_dtype)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _run(func: Any, consts: list[np.ndarray], x: np.ndarray, out_shape: tuple[int, ...],
         out_dtype: str, target: Any) -> np.ndarray:  # fmt: skip
    """Compile ``func`` inside a Relax module with bnfold's CPU pipeline and run it on x."""
    from tvm import relax

    from bnfold.targets import schedule

    mod = _module(func, consts, x, out_shape, out_dtype)
    ex = tvm.compile(mod, target=target, relax_pipeline=schedule.cpu_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def _case(c: int, o: int, hw: tuple[int, int], k: int, s: int, pad: int, groups: int = 1,
          x_dtype: str = "uint8", out_dtype: str = "uint8", shifts: tuple[int, int] = (36, 44),
          clamp: tuple[int, int] | None = None, dilation: int = 1, n: int = 1,
          seed: int = 0) -> dict[str, Any]:  # fmt: skip
    rng = np.random.default_rng(seed)
    lo, hi = K.DTYPES[x_dtype]
    x = rng.integers(lo, hi + 1, (n, c, *hw)).astype(x_dtype)
    w = rng.integers(-127, 128, (o, c // groups, k, k)).astype(np.int8)
    zp = int(rng.integers(lo, hi + 1))
    bias = rng.integers(-(2**14), 2**14, o) - zp * w.astype(np.int64).sum(axis=(1, 2, 3))
    qlo, qhi = K.DTYPES[out_dtype]
    return {
        "x": x,
        "x_zero_point": zp,
        "weight": w,
        "bias": bias.astype(np.int32),
        "strides": (s, s),
        "padding": (pad, pad, pad, pad),
        "dilation": (dilation, dilation),
        "groups": groups,
        "multiplier": rng.integers(2**30, 2**31, o).astype(np.int32),
        "shift": rng.integers(shifts[0], shifts[1] + 1, o).astype(np.int32),
        "out_zero_point": int(rng.integers(qlo, qhi + 1)),
        "out_dtype": out_dtype,
        "clamp": clamp or (qlo, qhi),
    }


CASES = {
    "1x1": dict(c=64, o=48, hw=(14, 14), k=1, s=1, pad=0),
    "1x1 odd C/O 7x7 int8": dict(
        c=17, o=13, hw=(7, 7), k=1, s=1, pad=0, x_dtype="int8", out_dtype="int8"
    ),
    "1x1 stride 2": dict(c=32, o=24, hw=(13, 13), k=1, s=2, pad=0),
    "3x3 s1 p1": dict(c=16, o=24, hw=(14, 14), k=3, s=1, pad=1),
    "3x3 s1 p1 7x7 odd C": dict(c=33, o=40, hw=(7, 7), k=3, s=1, pad=1, out_dtype="int8"),
    "3x3 s2 p1 int8": dict(c=15, o=9, hw=(9, 11), k=3, s=2, pad=1, x_dtype="int8"),
    "7x7 s2 p3 C=3": dict(c=3, o=16, hw=(20, 20), k=7, s=2, pad=3),
    "3x3 s1 C=3 int8, O=10": dict(c=3, o=10, hw=(13, 10), k=3, s=1, pad=1, x_dtype="int8"),
    "5x5 s2 C=1": dict(c=1, o=8, hw=(15, 17), k=5, s=2, pad=2, out_dtype="int8"),
    "shift > 31, relu6 clamp": dict(
        c=24, o=16, hw=(10, 10), k=3, s=1, pad=1, shifts=(30, 62), clamp=(7, 200)
    ),
    "small shift": dict(c=8, o=8, hw=(6, 6), k=1, s=1, pad=0, shifts=(1, 12)),
    "depthwise 3x3 s1": dict(c=32, o=32, hw=(28, 28), k=3, s=1, pad=1, groups=32),
    "depthwise 3x3 s2 int8 odd": dict(
        c=13, o=13, hw=(9, 11), k=3, s=2, pad=1, groups=13, x_dtype="int8", out_dtype="int8"
    ),
    "depthwise 3x3 s1 7x7": dict(
        c=24, o=24, hw=(7, 7), k=3, s=1, pad=1, groups=24, shifts=(20, 62), clamp=(0, 6)
    ),
    "depthwise 5x5 s2": dict(c=8, o=8, hw=(10, 10), k=5, s=2, pad=2, groups=8),
    "depthwise 3x3 dilation 2": dict(
        c=16, o=16, hw=(12, 13), k=3, s=1, pad=2, groups=16, dilation=2, x_dtype="int8"
    ),
    "3x3 dilation 2 s2": dict(c=8, o=16, hw=(11, 11), k=3, s=2, pad=2, dilation=2),
    "batch 2 3x3": dict(c=16, o=16, hw=(9, 9), k=3, s=1, pad=1, n=2),
    "batch 2 1x1": dict(c=6, o=10, hw=(5, 7), k=1, s=1, pad=0, n=2),
    "batch 2 depthwise": dict(c=8, o=8, hw=(9, 9), k=3, s=2, pad=1, groups=8, n=2),
    # VNNI: output channels on the lanes (rows of 7 / 14 / 28 columns), (channel, kx) quads.
    "3x3 s1 p1 14x14 O=40": dict(c=20, o=40, hw=(14, 14), k=3, s=1, pad=1),
    "3x3 s2 p1 int8 O=48 7 cols": dict(
        c=24,
        o=48,
        hw=(14, 13),
        k=3,
        s=2,
        pad=1,
        x_dtype="int8",
        out_dtype="int8",
        shifts=(20, 62),
        clamp=(-100, 90),
    ),
    "7x7 s2 p3 C=3 int8 O=40": dict(c=3, o=40, hw=(26, 22), k=7, s=2, pad=3, x_dtype="int8"),
    "5x5 s1 C=2 batch 2": dict(c=2, o=12, hw=(9, 13), k=5, s=1, pad=2, n=2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_conv_is_bit_exact(name: str) -> None:
    args = _case(**CASES[name])
    x = args.pop("x")
    ref = K.reference_conv2d_int8(x, K.QConv(**args))
    target = tvm.target.Target(X86)
    got = K.conv2d_int8(x.shape, str(x.dtype), K.QConv(**args), target=target)
    assert got is not None, "the kernel declined a supported case"
    func, consts = got
    assert all(a.dtype == np.int32 for a in consts)  # relax.const narrows int64 arrays
    y = _run(func, consts, x, ref.shape, args["out_dtype"], target)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    np.testing.assert_array_equal(y, ref)


VNNI_CASES = ["1x1", "1x1 odd C/O 7x7 int8", "1x1 stride 2", "3x3 s1 p1", "3x3 s1 p1 7x7 odd C",
              "3x3 s2 p1 int8", "7x7 s2 p3 C=3", "3x3 s1 C=3 int8, O=10", "5x5 s2 C=1",
              "shift > 31, relu6 clamp", "small shift", "3x3 dilation 2 s2", "batch 2 3x3",
              "batch 2 1x1", "3x3 s1 p1 14x14 O=40", "3x3 s2 p1 int8 O=48 7 cols",
              "7x7 s2 p3 C=3 int8 O=40", "5x5 s1 C=2 batch 2"]  # fmt: skip


@pytest.mark.skipif(not _host_has_vnni(), reason="this CPU has no AVX-512 VNNI (+BW, VL)")
@pytest.mark.parametrize("isa", ["vnni", "vnni256", "vnni512", "vnnioc"])
@pytest.mark.parametrize("name", VNNI_CASES)
def test_vnni_conv_is_bit_exact(name: str, isa: str) -> None:
    args = _case(**CASES[name])
    x = args.pop("x")
    ref = K.reference_conv2d_int8(x, K.QConv(**args))
    target = _vnni_host_target()
    got = K.conv2d_int8(x.shape, str(x.dtype), K.QConv(**args), target=target,
                        isa=None if isa == "vnni" else isa)  # fmt: skip
    assert got is not None
    func, consts = got
    # The default on a VNNI target is the VNNI kernel.
    assert "vpdpbusd" in func.script() and "pmadd.wd" not in func.script()
    assert all(a.dtype == np.int32 for a in consts)
    y = _run(func, consts, x, ref.shape, args["out_dtype"], target)
    np.testing.assert_array_equal(y, ref)


def test_vnni_is_chosen_by_the_target() -> None:
    # Building (not running) needs no VNNI on this machine: the choice follows the target.
    args = _case(c=8, o=8, hw=(6, 6), k=3, s=1, pad=1)
    x = args.pop("x")
    cpus = [("znver4", True), ("icelake-server", True), ("sapphirerapids", True),
            ("znver3", False), ("haswell", False), ("skylake-avx512", False)]  # fmt: skip
    for cpu, vnni in cpus:
        target = tvm.target.Target(dict(ZNVER4, mcpu=cpu))
        assert avx512_vnni.supports(target) == vnni, cpu
        func, _ = K.conv2d_int8(x.shape, "uint8", K.QConv(**args), target=target)
        assert ("vpdpbusd" in func.script()) == vnni, cpu
    func, _ = K.conv2d_int8(x.shape, "uint8", K.QConv(**args), target=tvm.target.Target(ZNVER4),
                            isa="avx2")  # fmt: skip
    assert "vpdpbusd" not in func.script()
    arm = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    assert not avx512_vnni.supports(arm)


def test_dispatch_picks_the_instruction_set_from_the_target_features() -> None:
    # The first predicate of DISPATCH that holds, in priority order; None: no int8 kernels.
    expected = [(ZNVER4, "vnni"), ({**ZNVER4, "mcpu": "sapphirerapids"}, "vnni"), (X86, "avx2"),
                ({**ZNVER4, "mcpu": "skylake-avx512"}, "avx2"),
                ({**ZNVER4, "mcpu": "x86-64"}, None)]  # fmt: skip
    for target, name in expected:
        isa = K.choose_isa(tvm.target.Target(target))
        assert (isa and isa.name) == name, target
    assert K.choose_isa(_arm("cortex-a76")).name == "sdot"
    assert K.choose_isa(_arm("generic")).name == "neon"
    assert K.choose_isa(tvm.target.Target({"kind": "cuda", "arch": "sm_80"})) is None
    # Every instruction set can be forced by name (benchmarks compare them on one target).
    assert set(K.ISAS) == {"avx2", "vnni", "vnni256", "vnni512", "vnnioc", "neon", "sdot"}


def test_requantize_saturates_and_rounds_like_the_reference() -> None:
    # Accumulators far outside the output range and exact .5 ties.
    for m, s, zp, q in [(2**30, 31, 0, (0, 255)), (2**31 - 1, 62, -3, (-128, 127)),
                        (1518500250, 40, 128, (0, 255)), (2**30, 1, 0, (-128, 127))]:  # fmt: skip
        lo, hi = spec.acc_bounds(m, s, zp, *q)
        for a in (spec.INT32_MIN, lo - 1, lo, lo + 1, hi - 1, hi, hi + 1, spec.INT32_MAX):
            if not spec.INT32_MIN <= a <= spec.INT32_MAX:
                continue
            exact = min(max(spec.requant(a, m, s, zp), q[0]), q[1])
            clamped = min(max(spec.requant(min(max(a, lo), hi), m, s, zp), q[0]), q[1])
            assert exact == clamped


def test_unsupported_cases_return_none() -> None:
    target = tvm.target.Target(X86)
    args = _case(c=8, o=8, hw=(6, 6), k=3, s=1, pad=1)
    x = args.pop("x")
    grouped = dict(args, groups=2, weight=args["weight"][:, :4])
    assert K.conv2d_int8(x.shape, "uint8", K.QConv(**grouped), target=target) is None
    arm = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    multiplier = dict(args, groups=4, weight=np.repeat(args["weight"][:4, :1], 2, axis=0))
    # 2 per channel:
    assert K.conv2d_int8(x.shape, "uint8", K.QConv(**multiplier), target=target) is None
    assert K.conv2d_int8(x.shape, "uint8", K.QConv(**multiplier), target=arm) is None
    w128 = args["weight"].copy()
    w128[0, 0, 0, 0] = -128  # the NEON int16 pair sums need |w| <= 127
    q128 = K.QConv(**dict(args, weight=w128))
    assert K.conv2d_int8(x.shape, "uint8", q128, target=arm) is None
    assert K.conv2d_int8(x.shape, "uint8", q128, target=tvm.target.Target(X86))
    sse = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"})
    assert K.conv2d_int8(x.shape, "uint8", K.QConv(**args), target=sse) is None


def _run_many(func: Any, consts: list[np.ndarray], xs: list[np.ndarray],
              out_shape: tuple[int, ...], out_dtype: str, target: Any) -> np.ndarray:  # fmt: skip
    """Like :func:`_run` for a PrimFunc with several tensor inputs ``xs`` before the constants;
    the call's result feeds one more op, so that it is not the function's output binding (the
    bindings Relax's reshape detection looks at)."""
    from tvm import relax

    from bnfold.targets import schedule

    bb = relax.BlockBuilder()
    params = [relax.Var(f"x{i}", relax.TensorType(list(x.shape), str(x.dtype)))
              for i, x in enumerate(xs)]  # fmt: skip
    with bb.function("main", params):
        with bb.dataflow():
            gv = bb.add_func(func, "kernel")
            args = [*params, *[relax.const(a) for a in consts]]
            y = bb.emit(relax.call_tir(gv, args, relax.TensorType(list(out_shape), out_dtype)))
            out = bb.emit_output(relax.op.reshape(y, out_shape))
        bb.emit_func_output(out)
    ex = tvm.compile(bb.get(), target=target, relax_pipeline=schedule.cpu_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(x) for x in xs]).numpy()


POOL_CASES = {
    "resnet 3x3/2 pad 1": ((1, 8, 112, 112), "uint8", (3, 3), (2, 2), (1, 1, 1, 1)),
    "odd 3x3/2 int8": ((1, 5, 13, 11), "int8", (3, 3), (2, 2), (1, 1, 1, 1)),
    "2x3 strides 1x2 asymmetric pad, batch 2": (
        (2, 3, 9, 40), "int8", (2, 3), (1, 2), (0, 1, 1, 2)
    ),
    "2x2/2 no pad, narrow rows": ((1, 4, 7, 7), "uint8", (2, 2), (2, 2), (0, 0, 0, 0)),
    "3x3/1 pad 1": ((1, 3, 20, 33), "uint8", (3, 3), (1, 1), (1, 1, 1, 1)),
}


@pytest.mark.parametrize("name", list(POOL_CASES))
def test_max_pool_is_bit_exact(name: str) -> None:
    shape, dtype, pool, strides, padding = POOL_CASES[name]
    rng = np.random.default_rng(list(POOL_CASES).index(name))
    lo, hi = K.DTYPES[dtype]
    x = rng.integers(lo, hi + 1, shape).astype(dtype)
    ref = K.reference_max_pool2d_int8(x, pool, strides, padding)
    target = tvm.target.Target(X86)
    func = K.max_pool2d_int8(shape, dtype, pool, strides, padding, target)
    assert func is not None
    np.testing.assert_array_equal(_run_many(func, [], [x], ref.shape, dtype, target), ref)
    # The reference is Relax's own max_pool2d (padding top, left, bottom, right).
    from tvm import relax

    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(list(shape), dtype))
    with bb.function("main", [xv]):
        y = bb.emit(relax.op.nn.max_pool2d(xv, pool, strides, padding))
        bb.emit_func_output(y)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=target), tvm.cpu())
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), ref)


def test_max_pool_declines_what_it_does_not_handle() -> None:
    target = tvm.target.Target(X86)
    assert K.max_pool2d_int8((1, 2, 9, 9), "uint8", (3, 3), (3, 3), (1, 1, 1, 1), target) is None
    assert K.max_pool2d_int8((1, 2, 9, 9), "uint8", (2, 2), (2, 2), (2, 2, 2, 2), target) is None
    assert K.max_pool2d_int8((1, 2, 9, 9), "float32", (2, 2), (2, 2), (0,) * 4, target) is None
    sse = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"})
    assert K.max_pool2d_int8((1, 2, 9, 9), "uint8", (2, 2), (2, 2), (0,) * 4, sse) is None


ADD_CASES = {
    "resnet 64x56x56 uint8": ((1, 64, 56, 56), ("uint8", "uint8", "uint8"), (0, 255)),
    "odd size int8 + uint8 -> int8, relu": ((1, 5, 3, 7), ("int8", "uint8", "int8"), (-3, 127)),
    "fewer than 16 elements": ((2, 5), ("int8", "int8", "uint8"), (0, 255)),
}


@pytest.mark.parametrize("name", list(ADD_CASES))
def test_add_matches_the_float_reference(name: str) -> None:
    shape, (da, db, dy), clamp = ADD_CASES[name]
    rng = np.random.default_rng(list(ADD_CASES).index(name))
    a = rng.integers(*K.DTYPES[da], shape, endpoint=True).astype(da)
    b = rng.integers(*K.DTYPES[db], shape, endpoint=True).astype(db)
    q = K.QAdd(da, 0.0344, int(rng.integers(*K.DTYPES[da])), db, 0.0107,
               int(rng.integers(*K.DTYPES[db])), 0.0229, int(rng.integers(*K.DTYPES[dy])), dy,
               clamp)  # fmt: skip
    ref = K.reference_add_int8(a, b, q)
    target = tvm.target.Target(X86)
    func = K.add_int8(shape, q, target)
    got = _run_many(func, [], [a, b], shape, dy, target)
    diff = np.abs(got.astype(np.int64) - ref.astype(np.int64))
    # Equal but where an FMA moved a value across a rounding tie (1 LSB, rare).
    assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3
    assert got.min() >= clamp[0] and got.max() <= clamp[1]


@pytest.mark.skipif(not _host_has_vnni(), reason="this CPU has no AVX-512 VNNI (+BW, VL)")
@pytest.mark.parametrize(("n", "i", "o", "dtype", "zp"),
                         [(1, 512, 1000, "uint8", 3), (2, 37, 70, "int8", -5),
                          (1, 1280, 1000, "int8", 0), (3, 8, 16, "uint8", 255)])  # fmt: skip
def test_dense_float_output_is_bit_exact(n: int, i: int, o: int, dtype: str, zp: int) -> None:
    rng = np.random.default_rng(i)
    x = rng.integers(*K.DTYPES[dtype], (n, i), endpoint=True).astype(dtype)
    w = rng.integers(-128, 128, (o, i)).astype(np.int8)
    scale = rng.uniform(1e-4, 1e-2, o).astype(np.float32)
    bias = rng.normal(size=o).astype(np.float32)
    ref = K.reference_dense_int8_float(x, zp, w, scale, bias)
    target = _vnni_host_target()
    func, consts = K.dense_int8_float((n, i), dtype, zp, w, scale, bias, target)
    got = _run_many(func, consts, [x], (n, o), "float32", target)
    np.testing.assert_array_equal(got, ref)
    # Without VNNI there is no dense kernel (Relax's integer matmul instead).
    assert K.dense_int8_float((n, i), dtype, zp, w, scale, bias, tvm.target.Target(X86)) is None


ARM_CASES = ["1x1", "1x1 odd C/O 7x7 int8", "3x3 s1 p1 7x7 odd C", "3x3 s2 p1 int8",
             "shift > 31, relu6 clamp", "batch 2 1x1", "depthwise 3x3 s1 7x7",
             "depthwise 3x3 s2 int8 odd", "depthwise 5x5 s2"]  # fmt: skip


@pytest.mark.qemu
def test_neon_conv_is_bit_exact_under_qemu(tmp_path: Path) -> None:
    from bnfold import runtime
    from bnfold.targets import get, schedule

    arm64 = get("arm64")
    if not arm64.can_run():
        pytest.skip(arm64.can_run().why)
    target = tvm.target.Target(arm64.tvm_target())
    runner = runtime.aarch64_runner()
    env = {**os.environ, "LD_LIBRARY_PATH": str(runner / "lib")}
    for name in ARM_CASES:
        args = _case(**CASES[name])
        x = args.pop("x")
        ref = K.reference_conv2d_int8(x, K.QConv(**args))
        got = K.conv2d_int8(x.shape, str(x.dtype), K.QConv(**args), target=target)
        assert got is not None, name
        func, consts = got
        mod = _module(func, consts, x, ref.shape, args["out_dtype"])
        ex = tvm.compile(mod, target=target, relax_pipeline=schedule.cpu_pipeline(target))
        lib = tmp_path / "conv.so"
        ex.export_library(str(lib), fcompile=tvm.support.cc.cross_compiler(arm64.cross_compiler))
        runtime.write_tensors(tmp_path / "in.bnt", [x])
        subprocess.run([runtime.QEMU, "-L", runtime.AARCH64_SYSROOT, str(runner / "runner"),
                        str(lib), str(tmp_path / "in.bnt"), str(tmp_path / "out.bnt")],
                       check=True, env=env, timeout=300)  # fmt: skip
        (y,) = runtime.read_tensors(tmp_path / "out.bnt")
        np.testing.assert_array_equal(y, ref, err_msg=name)


def _arm(cpu: str, *mattr: str) -> Any:
    return tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": cpu,
                              "mattr": ["+neon", *mattr]})  # fmt: skip


def test_supports_dotprod_follows_the_cpu() -> None:
    cpus = [("cortex-a55", True), ("cortex-a76", True), ("neoverse-n1", True),
            ("generic", False), ("cortex-a53", False), ("cortex-a72", False)]  # fmt: skip
    args = _case(c=8, o=8, hw=(6, 6), k=3, s=1, pad=1)
    x = args.pop("x")
    for cpu, dot in cpus:
        assert sdot.supports(_arm(cpu)) == dot, cpu
        func, _ = K.conv2d_int8(x.shape, "uint8", K.QConv(**args), target=_arm(cpu))
        assert ("neon.sdot" in func.script()) == dot, cpu
    assert sdot.supports(_arm("generic", "+dotprod"))
    assert not sdot.supports(tvm.target.Target(ZNVER4))
    # sdot multiplies int8 x int8 into int32: a weight of -128 needs no fallback.
    w128 = args["weight"].copy()
    w128[0, 0, 0, 0] = -128
    with128 = dict(args, weight=w128)
    assert K.conv2d_int8(x.shape, "uint8", K.QConv(**with128), target=_arm("cortex-a76"))
    assert K.conv2d_int8(x.shape, "uint8", K.QConv(**with128), target=_arm("generic")) is None


def test_sdot_tile_fits_the_register_file() -> None:
    for o, oh, ow, kw in [(64, 56, 56, 3), (256, 1, 784, 1), (10, 13, 10, 3), (512, 7, 7, 3),
                          (8, 1, 1, 1), (1000, 1, 1, 1)]:  # fmt: skip
        t = sdot.choose_tile(o, oh, ow, kw)
        acc = t.obn * t.yt * t.xv
        assert t.obn % 4 == 0 and acc <= 24 and acc + t.yt * t.xv + t.obn // 4 + 1 <= 32
        assert t.yt <= oh and (t.xv - 1) * 4 < ow


def _multi_module(built: list[tuple[Any, list[np.ndarray], np.ndarray, tuple[int, ...], str]]
                  ) -> Any:  # fmt: skip
    """A Relax module whose main takes one input per ``(func, consts, x, out_shape,
    out_dtype)`` and returns the tuple of their ``call_tir`` results (one build, one qemu run)."""
    from tvm import relax

    bb = relax.BlockBuilder()
    xs = [relax.Var(f"x{i}", relax.TensorType(list(b[2].shape), str(b[2].dtype)))
          for i, b in enumerate(built)]  # fmt: skip
    with bb.function("main", xs):
        with bb.dataflow():
            ys = []
            for i, (func, consts, _, out_shape, out_dtype) in enumerate(built):
                gv = bb.add_func(func.with_attr("global_symbol", f"conv_{i}"), f"conv_{i}")
                args = [xs[i]] + [relax.const(a) for a in consts]
                out_type = relax.TensorType(list(out_shape), out_dtype)
                ys.append(bb.emit(relax.call_tir(gv, args, out_type)))
            out = bb.emit_output(relax.Tuple(ys))
        bb.emit_func_output(out)
    return bb.get()


def _assembly(ex: Any) -> str:
    """The target assembly of the kernels of a compiled Relax executable."""
    return "\n".join(m.inspect_source("s") for m in ex.mod.imports if m.kind == "llvm")


SDOT_CASES = ["1x1", "1x1 odd C/O 7x7 int8", "1x1 stride 2", "3x3 s1 p1", "3x3 s1 p1 7x7 odd C",
              "3x3 s2 p1 int8", "7x7 s2 p3 C=3", "3x3 s1 C=3 int8, O=10", "5x5 s2 C=1",
              "shift > 31, relu6 clamp", "small shift", "3x3 dilation 2 s2", "batch 2 3x3",
              "batch 2 1x1", "3x3 s2 p1 int8 O=48 7 cols", "7x7 s2 p3 C=3 int8 O=40",
              "5x5 s1 C=2 batch 2"]  # fmt: skip


def _sdot_cases() -> list[tuple[str, dict[str, Any]]]:
    """SDOT_CASES with a fifth of every weight at -128, plus two cases at the extremes (every
    activation and weight at its bound: the largest products, the shifted bias)."""
    cases = []
    for i, name in enumerate(SDOT_CASES):
        args = _case(**CASES[name], seed=i)
        args["weight"].reshape(-1)[i % 5 :: 5] = -128
        cases.append((name, args))
    rng = np.random.default_rng(99)
    for x_dtype in ("uint8", "int8"):
        args = _case(c=36, o=20, hw=(9, 10), k=3, s=1, pad=1, x_dtype=x_dtype, shifts=(40, 48))
        lo, hi = K.DTYPES[x_dtype]
        args["x"] = rng.choice(np.array([lo, hi], dtype=x_dtype), args["x"].shape)
        args["weight"] = rng.choice(np.array([-128, 127], dtype=np.int8), args["weight"].shape)
        cases.append((f"extremes {x_dtype}", args))
    return cases


@pytest.mark.qemu
def test_sdot_conv_is_bit_exact_under_qemu(tmp_path: Path) -> None:
    from bnfold import runtime
    from bnfold.targets import get, schedule

    arm64 = get("arm64:cortex-a76")  # ARMv8.2-A: the dot product
    if not arm64.can_run():
        pytest.skip(arm64.can_run().why)
    target = tvm.target.Target(arm64.tvm_target())
    built, refs, names = [], [], []
    for name, args in _sdot_cases():
        x = args.pop("x")
        refs.append(K.reference_conv2d_int8(x, K.QConv(**args)))
        got = K.conv2d_int8(x.shape, str(x.dtype), K.QConv(**args), target=target)
        assert got is not None, name
        func, consts = got
        assert "neon.sdot" in func.script(), name
        built.append((func, consts, x, refs[-1].shape, args["out_dtype"]))
        names.append(name)
    mod = _multi_module(built)
    ex = tvm.compile(mod, target=target, relax_pipeline=schedule.cpu_pipeline(target))
    asm = _assembly(ex)
    # The lane-indexed form: one weight register serves 4 output channels.
    assert "sdot\tv" in asm and ".4b[" in asm
    lib = tmp_path / "conv.so"
    ex.export_library(str(lib), fcompile=tvm.support.cc.cross_compiler(arm64.cross_compiler))
    runtime.write_tensors(tmp_path / "in.bnt", [b[2] for b in built])
    runner = runtime.aarch64_runner()
    env = {**os.environ, "LD_LIBRARY_PATH": str(runner / "lib")}
    # qemu's default CPU model ("max") has the dot product.
    subprocess.run([runtime.QEMU, "-L", runtime.AARCH64_SYSROOT, str(runner / "runner"),
                    str(lib), str(tmp_path / "in.bnt"), str(tmp_path / "out.bnt")],
                   check=True, env=env, timeout=300)  # fmt: skip
    ys = runtime.read_tensors(tmp_path / "out.bnt")
    assert len(ys) == len(refs)
    for name, y, ref in zip(names, ys, refs, strict=True):
        np.testing.assert_array_equal(y, ref, err_msg=name)


def test_baseline_neon_assembly_has_no_sdot() -> None:
    # Building (not running) for a generic ARMv8.0-A core: sdot would be an illegal instruction.
    from bnfold.targets import schedule

    target = _arm("generic")
    args = _case(**CASES["3x3 s1 p1"])
    x = args.pop("x")
    ref_shape = K.reference_conv2d_int8(x, K.QConv(**args)).shape
    func, consts = K.conv2d_int8(x.shape, "uint8", K.QConv(**args), target=target)
    mod = _module(func, consts, x, ref_shape, args["out_dtype"])
    ex = tvm.compile(mod, target=target, relax_pipeline=schedule.cpu_pipeline(target))
    asm = _assembly(ex)
    assert "smlal" in asm and "sdot" not in asm
