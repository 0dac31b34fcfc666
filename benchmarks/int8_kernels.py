"""Per-layer latency of bnfold's int8 conv kernels (:mod:`bnfold.targets.int8`) vs fp32.

For real MobileNetV2 and ResNet-18 layer shapes (batch 1): the int8 kernels (conv +
requantize, uint8 in and out) against the fp32 conv + bias + relu of the same shape compiled
with bnfold's CPU rules (``targets.schedule.cpu_pipeline``), and onnxruntime's fp32 Conv + Relu,
all at one thread (``--threads``). On a CPU with AVX-512 VNNI the dense convs are timed twice:
the VNNI kernel (``vnni``, the default there) and the AVX2 kernel (``avx2``) for the same
target; elsewhere the ``vnni`` column is empty. Medians of ``--repeat`` timings, all sampled
round-robin (the machine may be shared: all see the same load); the load average is printed.

    python -m benchmarks.int8_kernels [--threads 1] [--repeat 15] [--only mbv2|r18]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np

# name, C, O, H, W, k, stride, pad, groups
LAYERS: list[tuple[str, int, int, int, int, int, int, int, int]] = [
    ("mbv2 conv0 3x3 s2", 3, 32, 224, 224, 3, 2, 1, 1),
    ("mbv2 dw 32 112 s1", 32, 32, 112, 112, 3, 1, 1, 32),
    ("mbv2 pw 32->16 112", 32, 16, 112, 112, 1, 1, 0, 1),
    ("mbv2 pw 16->96 112", 16, 96, 112, 112, 1, 1, 0, 1),
    ("mbv2 dw 96 112 s2", 96, 96, 112, 112, 3, 2, 1, 96),
    ("mbv2 pw 96->24 56", 96, 24, 56, 56, 1, 1, 0, 1),
    ("mbv2 pw 24->144 56", 24, 144, 56, 56, 1, 1, 0, 1),
    ("mbv2 dw 144 56 s1", 144, 144, 56, 56, 3, 1, 1, 144),
    ("mbv2 pw 144->32 28", 144, 32, 28, 28, 1, 1, 0, 1),
    ("mbv2 pw 192->64 14", 192, 64, 14, 14, 1, 1, 0, 1),
    ("mbv2 pw 384->96 14", 384, 96, 14, 14, 1, 1, 0, 1),
    ("mbv2 dw 576 14 s2", 576, 576, 14, 14, 3, 2, 1, 576),
    ("mbv2 pw 960->320 7", 960, 320, 7, 7, 1, 1, 0, 1),
    ("mbv2 pw 320->1280 7", 320, 1280, 7, 7, 1, 1, 0, 1),
    ("r18 conv1 7x7 s2", 3, 64, 224, 224, 7, 2, 3, 1),
    ("r18 3x3 64 56", 64, 64, 56, 56, 3, 1, 1, 1),
    ("r18 3x3 64->128 s2", 64, 128, 56, 56, 3, 2, 1, 1),
    ("r18 3x3 128 28", 128, 128, 28, 28, 3, 1, 1, 1),
    ("r18 1x1 64->128 s2", 64, 128, 56, 56, 1, 2, 0, 1),
    ("r18 3x3 256 14", 256, 256, 14, 14, 3, 1, 1, 1),
    ("r18 3x3 512 7", 512, 512, 7, 7, 3, 1, 1, 1),
]


def _target() -> Any:
    import tvm

    from bnfold.targets.x86 import X86

    return tvm.target.Target(X86.resolved().tvm_target())


def _sample(run: Any, min_s: float = 0.02) -> float:
    """Seconds per call, looping until ``min_s`` has passed."""
    n = 0
    t0 = time.perf_counter()
    while True:
        run()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_s:
            return dt / n


def _medians_ms(runs: list[Any], repeat: int) -> list[float]:
    """Median ms of each runner, sampled round-robin so that all see the same machine load."""
    for run in runs:
        run()
    samples: list[list[float]] = [[] for _ in runs]
    for _ in range(repeat):
        for run, got in zip(runs, samples, strict=True):
            got.append(_sample(run))
    return [float(np.median(got)) * 1e3 for got in samples]


def _vm_runner(mod: Any, target: Any, inputs: list[np.ndarray]) -> Any:
    import tvm
    from tvm import relax

    from bnfold.targets import schedule

    ex = tvm.compile(mod, target=target, relax_pipeline=schedule.cpu_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(a) for a in inputs]
    vm.set_input("main", *args)
    return lambda: vm.invoke_stateful("main")


def int8_runner(layer: tuple, target: Any, rng: np.random.Generator,
                isa: str | None = None) -> Any | None:  # fmt: skip
    """The int8 kernel of one layer in a Relax module (call_tir), or None if it declines.
    ``isa``: the instruction set (see :func:`bnfold.targets.int8.conv2d_int8`)."""
    from tvm import relax

    from bnfold.targets import int8 as int8_kernels

    _, c, o, h, w, k, s, p, g = layer
    x = rng.integers(0, 256, (1, c, h, w)).astype(np.uint8)
    wt = rng.integers(-127, 128, (o, c // g, k, k)).astype(np.int8)
    zp = 0
    bias = rng.integers(-(2**12), 2**12, o).astype(np.int32)
    spec = int8_kernels.QConv(
        zp, wt, bias, (s, s), (p, p, p, p), (1, 1), g,
        rng.integers(2**30, 2**31, o).astype(np.int32), np.full(o, 40, np.int32),
        0, "uint8", (0, 255),
    )  # fmt: skip
    got = int8_kernels.conv2d_int8(x.shape, "uint8", spec, target, isa=isa)
    if got is None:
        return None
    func, consts = got
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType([1, c, h, w], "uint8"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            gv = bb.add_func(func, "conv2d_int8")
            y = bb.emit(relax.call_tir(gv, [xv] + [relax.const(a) for a in consts],
                                       relax.TensorType([1, o, oh, ow], "uint8")))  # fmt: skip
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return _vm_runner(bb.get(), target, [x])


def fp32_runner(layer: tuple, target: Any, rng: np.random.Generator) -> Any:
    """conv2d + bias + relu in fp32 through bnfold's CPU pipeline."""
    from tvm import relax

    _, c, o, h, w, k, s, p, g = layer
    x = rng.standard_normal((1, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((o, c // g, k, k)).astype(np.float32)
    b = rng.standard_normal((1, o, 1, 1)).astype(np.float32)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType([1, c, h, w], "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(xv, relax.const(wt), strides=s, padding=p, groups=g))
            y = bb.emit(relax.op.nn.relu(relax.op.add(y, relax.const(b))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return _vm_runner(bb.get(), target, [x])


def ort_runner(layer: tuple, threads: int, rng: np.random.Generator) -> Any:
    """onnxruntime fp32 Conv + Relu (ORT_ENABLE_ALL)."""
    from onnx import TensorProto, helper, numpy_helper

    from bnfold import onnxrt

    _, c, o, h, w, k, s, p, g = layer
    wt = rng.standard_normal((o, c // g, k, k)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], strides=[s, s], pads=[p] * 4, group=g),
         helper.make_node("Relu", ["c"], ["y"])],
        "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, w])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(wt, "w"), numpy_helper.from_array(b, "b")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # onnxruntime at its best (ORT_ENABLE_ALL) at the same thread count as the kernel.
    sess = onnxrt.session(model.SerializeToString(), optimize=True, threads=threads,
                          log_severity=onnxrt.ERROR)  # fmt: skip
    x = rng.standard_normal((1, c, h, w)).astype(np.float32)
    return lambda: sess.run(None, {"x": x})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--only", default="", help="run layers whose name contains this")
    args = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    from bnfold import runtime
    from bnfold.targets.int8 import avx512_vnni

    runtime.set_threads(args.threads)
    target = _target()
    vnni = avx512_vnni.supports(target)
    print(f"target {target}  threads {args.threads}  vnni {vnni}  "
          f"load {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"{'layer':24s} {'MMAC':>7s} {'vnni ms':>8s} {'avx2 ms':>8s} {'fp32 ms':>8s} "
          f"{'ort32 ms':>8s} {'avx2/vn':>7s} {'i8/fp32':>7s} {'i8/ort':>7s} "
          f"{'i8 GMAC/s':>9s}")  # fmt: skip
    nan = float("nan")
    totals = {"mbv2": [0.0] * 4, "r18": [0.0] * 4}
    for layer in LAYERS:
        name, c, o, h, w, k, s, p, g = layer
        if args.only not in name:
            continue
        rng = np.random.default_rng(0)
        oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        mmac = o * (c // g) * k * k * oh * ow / 1e6
        # Depthwise convs have one kernel (AVX2): it is timed once, in the avx2 column.
        run_v = int8_runner(layer, target, rng, "vnni") if vnni and g == 1 else None
        run_a = int8_runner(layer, target, np.random.default_rng(0), "avx2")
        runs = [r for r in (run_v, run_a) if r is not None]
        runs += [fp32_runner(layer, target, rng), ort_runner(layer, args.threads, rng)]
        got = _medians_ms(runs, args.repeat)
        t32, tort = got[-2:]
        tv = got[0] if run_v is not None else nan
        ta = got[len(runs) - 3] if run_a is not None else nan
        t8 = tv if run_v is not None else ta  # what the compiler uses on this target
        for key, tot in totals.items():
            if name.startswith(key):
                for i, t in enumerate((t8, ta, t32, tort)):
                    tot[i] += t
        print(f"{name:24s} {mmac:7.1f} {tv:8.3f} {ta:8.3f} {t32:8.3f} {tort:8.3f} "
              f"{ta / t8:7.2f} {t8 / t32:7.2f} {t8 / tort:7.2f} {mmac / t8:9.1f}",
              flush=True)  # fmt: skip
    print("totals: int8 = the kernel the compiler picks (vnni where it has one)")
    for key, (t8, ta, t32, tort) in totals.items():
        if t32:
            print(f"{key + ' (these layers)':24s} {'':7s} {t8:8.3f} {ta:8.3f} {t32:8.3f} "
                  f"{tort:8.3f} {ta / t8:7.2f} {t8 / t32:7.2f} {t8 / tort:7.2f}")  # fmt: skip
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
