"""bnfold's CPU schedule rules over shapes: each rule on the shapes it must take, checked
against onnxruntime (optimizations off) and against the rule's own record of what it matched.

Several independent ops share one model (one input and one output each), so that one compile
covers many shapes: TVM compiles each branch into its own PrimFunc.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import runtime
from bnfold.check import run_onnxruntime
from bnfold.lower import compiler as lower
from bnfold.targets import schedule
from bnfold.targets.schedule import rewrites
from bnfold.targets.schedule._common import vector_lanes
from bnfold.targets.schedule.conv import Conv

pytest.importorskip("tvm")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.tvm

RTOL = 1e-4


@dataclass
class Op:
    """One branch: ``op_type`` on an input of ``shape`` with weights ``inits`` (name suffix ->
    array) and ``attrs``; ``relu`` adds a fused epilogue; ``kind`` is the rule's expected
    ``rule:kind`` (None: no rule must be asserted)."""

    op_type: str
    shape: tuple[int, ...]
    inits: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, object] = field(default_factory=dict)
    relu: bool = False
    kind: str | None = None


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _model(ops: list[Op]) -> onnx.ModelProto:
    """A model with one independent branch per op; output shapes from ONNX shape inference."""
    nodes, inputs, outputs, inits = [], [], [], []
    for i, op in enumerate(ops):
        x, y = f"x{i}", f"y{i}"
        inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, list(op.shape)))
        names = [x]
        for suffix, arr in op.inits.items():
            inits.append(numpy_helper.from_array(arr, f"{suffix}{i}"))
            names.append(f"{suffix}{i}")
        out = f"t{i}" if op.relu else y
        nodes.append(helper.make_node(op.op_type, names, [out], name=f"n{i}", **op.attrs))
        if op.relu:
            nodes.append(helper.make_node("Relu", [out], [y], name=f"r{i}"))
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "ops", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def _conv(rng: np.random.Generator, shape: tuple[int, ...], out_c: int, k: tuple[int, int],
          kind: str, *, stride: int = 1, pad: int = 0, group: int = 1, dilation: int = 1,
          bias: bool = True, relu: bool = True) -> Op:  # fmt: skip
    inits = {"w": _w(rng, out_c, shape[1] // group, *k)}
    if bias:
        inits["b"] = _w(rng, out_c)
    attrs = {"strides": [stride] * 2, "pads": [pad] * 4, "group": group,
             "dilations": [dilation] * 2, "kernel_shape": list(k)}  # fmt: skip
    return Op("Conv", shape, inits, attrs, relu, f"bnfold_conv:{kind}")


def _conv_ops(rng: np.random.Generator) -> list[Op]:
    return [
        _conv(rng, (1, 8, 7, 9), 16, (3, 3), "conv3x3", pad=1),
        _conv(rng, (1, 8, 9, 7), 12, (3, 3), "conv3x3", stride=2, pad=1),
        _conv(rng, (1, 4, 11, 9), 8, (3, 3), "conv3x3", dilation=2, bias=False),
        _conv(rng, (1, 6, 10, 10), 8, (3, 3), "conv3x3", stride=2, relu=False),
        _conv(rng, (1, 8, 7, 9), 8, (3, 3), "conv3x3", pad=1, group=2),
        _conv(rng, (1, 16, 7, 9), 16, (3, 3), "depthwise", pad=1, group=16),
        _conv(rng, (1, 16, 9, 11), 16, (3, 3), "depthwise", stride=2, pad=1, group=16),
        _conv(rng, (1, 24, 12, 10), 24, (3, 3), "depthwise", stride=2, pad=1, group=24),
        _conv(rng, (1, 8, 11, 10), 12, (3, 3), "conv3x3", stride=2, pad=1, bias=False),
        _conv(rng, (1, 8, 12, 13), 8, (3, 3), "depthwise", stride=3, pad=1, group=8),
        _conv(rng, (1, 8, 13, 13), 8, (3, 3), "depthwise", pad=2, group=8, dilation=2),
        _conv(rng, (1, 16, 7, 9), 24, (1, 1), "conv1x1"),
        _conv(rng, (1, 16, 8, 8), 8, (1, 1), "conv1x1", stride=2, bias=False),
        _conv(rng, (1, 24, 14, 14), 32, (1, 1), "conv1x1", relu=False),
        _conv(rng, (1, 3, 13, 11), 8, (5, 5), "conv5x5", stride=2, pad=2),
        _conv(rng, (1, 3, 16, 16), 8, (7, 7), "conv7x7", stride=2, pad=3),
        # Dilation beyond the map: the taps that only read padding are dropped.
        _conv(rng, (1, 8, 5, 16), 16, (3, 3), "conv1x3", pad=6, dilation=6),
        _conv(rng, (1, 8, 6, 6), 16, (3, 3), "conv1x1", pad=8, dilation=8, relu=False),
    ]


def _dense_ops(rng: np.random.Generator) -> list[Op]:
    return [
        Op(
            "Gemm",
            (1, 64),
            {"w": _w(rng, 10, 64), "b": _w(rng, 10)},
            {"transB": 1},
            kind="bnfold_matmul:dense",
        ),
        Op(
            "Gemm",
            (1, 48),
            {"w": _w(rng, 48, 32), "b": _w(rng, 32)},
            relu=True,
            kind="bnfold_matmul:dense",
        ),
        Op("MatMul", (1, 40), {"w": _w(rng, 40, 24)}, kind="bnfold_matmul:dense"),
        # Columns that are not whole vectors (12: AVX2 and AVX-512): one row per tile.
        Op("MatMul", (2, 16), {"w": _w(rng, 16, 12)}, kind="bnfold_matmul:dense"),
        # A Linear on NHWC rows (ConvNeXt): rows x column vectors, packed weights.
        Op("MatMul", (1, 4, 6, 32), {"w": _w(rng, 32, 48)}, relu=True, kind="bnfold_matmul:gemm"),
        Op("MatMul", (1, 2, 8, 24), {"w": _w(rng, 24, 64)}, kind="bnfold_matmul:gemm"),
    ]


def _pool_ops(_rng: np.random.Generator) -> list[Op]:
    # Float pools take the generic rule (the pool rule takes 8-bit ones, see
    # test_lower_int8).
    return [
        Op(
            "MaxPool",
            (1, 8, 9, 7),
            attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
            kind="bnfold_generic:generic",
        ),
        Op(
            "AveragePool",
            (1, 4, 8, 10),
            attrs={"kernel_shape": [2, 2], "strides": [2, 2]},
            kind="bnfold_generic:generic",
        ),
        Op("GlobalAveragePool", (1, 16, 7, 9), kind="bnfold_generic:generic"),
        Op(
            "Add",
            (1, 8, 7, 9),
            {"c": _w(np.random.default_rng(5), 1, 8, 1, 1)},
            kind="bnfold_elementwise:elementwise",
        ),
    ]


def _compile_and_compare(
    ops: list[Op], target: str, tmp_path: Path, rng: np.random.Generator
) -> list[schedule.Match]:
    model = _model(ops)
    path = tmp_path / "ops.onnx"
    onnx.save(model, path)
    shapes = {f"x{i}": op.shape for i, op in enumerate(ops)}
    with schedule.recording() as matches:
        lower.compile_model(path, target, tmp_path / target, shapes, verify=False, fold=False)
    feeds = {f"x{i}": _w(rng, *op.shape) for i, op in enumerate(ops)}
    got = runtime.load(tmp_path / target).run(feeds)
    ref = run_onnxruntime(model, feeds)
    for name, want in ref.items():
        np.testing.assert_allclose(got[name], want, rtol=RTOL,
                                   atol=RTOL * float(np.abs(want).max()), err_msg=name)  # fmt: skip
    return list(matches)


def _assert_rules(ops: list[Op], matches: list[schedule.Match]) -> None:
    """Every expected ``rule:kind`` was matched as often as the ops that expect it (identical
    PrimFuncs would be shared, so each op here has its own shape)."""
    want = collections.Counter(op.kind for op in ops if op.kind)
    # "conv3x3 (channel lanes)" is a conv3x3 tiled the other way (see the test below).
    got = collections.Counter(f"{m.rule}:{m.kind.split(' (')[0]}" for m in matches if m.rule)
    for kind, n in want.items():
        assert got[kind] >= n, f"{kind}: {got[kind]} matched, {n} expected; all: {matches}"


@pytest.mark.parametrize("family", [_conv_ops, _dense_ops, _pool_ops], ids=lambda f: f.__name__)
def test_rules_on_x86_match_onnxruntime(family: object, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ops = family(rng)  # type: ignore[operator]
    matches = _compile_and_compare(ops, "x86", tmp_path, rng)
    _assert_rules(ops, matches)


CHANNEL_LANES = """
<ir_version: 8, opset_import: ["" : 17]>
narrow (float[1, 24, 7, 7] x, float[1, 32, 7, 7] r, float[1, 16, 14, 12] z)
    => (float[1, 32, 7, 7] y, float[1, 32, 7, 6] u, float[1, 48, 14, 12] v) {
    c = Conv <kernel_shape = [1, 1]> (x, w1, b1)
    s = Add (c, r)
    y = Relu (s)
    u = Conv <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]> (z, w2)
    d = Conv <kernel_shape = [3, 3], pads = [2, 2, 2, 2], dilations = [2, 2]> (z, w3, b3)
    v = Clip (d, lo, hi)
}
"""


def test_narrow_maps_put_output_channels_on_the_lanes(tmp_path: Path) -> None:
    """Rows narrower than a vector (7, 6, 12 columns) whose output channels fill vectors take
    the channel-lanes tiling (packed weights, made at compile time), with residual-add, clip and
    no-bias epilogues, stride and dilation; the results match onnxruntime."""
    import tvm

    from bnfold.targets import get

    rng = np.random.default_rng(3)
    model = onnx.parser.parse_model(CHANNEL_LANES)
    for name, shape in (("w1", (32, 24, 1, 1)), ("b1", (32,)), ("w2", (32, 16, 3, 3)),
                        ("w3", (48, 16, 3, 3)), ("b3", (48,))):  # fmt: skip
        model.graph.initializer.append(numpy_helper.from_array(_w(rng, *shape), name))
    for name, value in (("lo", 0.0), ("hi", 6.0)):
        model.graph.initializer.append(numpy_helper.from_array(np.float32(value), name))
    onnx.checker.check_model(model, full_check=True)
    target = tvm.target.Target(get("x86").tvm_target())
    lanes = vector_lanes(target)
    path = tmp_path / "narrow.onnx"
    onnx.save(model, path)
    with schedule.recording() as matches:
        lower.compile_model(path, "x86", tmp_path / "out", verify=False, fold=False)
    kinds = sorted(m.kind for m in matches if m.rule == "bnfold_conv")
    feeds = {"x": _w(rng, 1, 24, 7, 7), "r": _w(rng, 1, 32, 7, 7), "z": _w(rng, 1, 16, 14, 12)}
    got = runtime.load(tmp_path / "out").run(feeds)
    for name, want in run_onnxruntime(model, feeds).items():
        np.testing.assert_allclose(got[name], want, rtol=RTOL,
                                   atol=RTOL * float(np.abs(want).max()), err_msg=name)  # fmt: skip
    # 48 channels are 3 AVX-512 vectors; 12 columns are a vector and a half on AVX2, where the
    # row tile would be half a vector (4 of 8 lanes).
    assert lanes in (8, 16)
    want = ["conv1x1 (channel lanes)", "conv3x3 (channel lanes)", "conv3x3 (channel lanes)"]
    assert kinds == sorted(want), kinds


@pytest.mark.parametrize(
    ("cpu", "lanes"),
    [("x86-64", 4), ("haswell", 8), ("znver3", 8), ("icelake-server", 16), ("znver4", 16)],
)
def test_vector_lanes_follow_the_cpu_features(cpu: str, lanes: int) -> None:
    """TVM 0.27's ``llvm_get_vector_width`` answers 512 for every x86-64 CPU; the rules size
    their tiles by the CPU's own vectors (AVX2: 8 fp32 lanes, AVX-512: 16)."""
    import tvm

    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": cpu})
    assert vector_lanes(target) == lanes


PIXEL_TILES = """
<ir_version: 8, opset_import: ["" : 17]>
pixels (float[1, 16, 12, 14] x, float[1, 24, 12, 14] r, float[1, 8, 10, 12] z)
    => (float[1, 24, 12, 14] y, float[1, 16, 12, 14] u, float[1, 16, 10, 12] v) {
    c = Conv <kernel_shape = [1, 1]> (x, w1, b1)
    s = Add (c, r)
    y = Relu (s)
    u = Conv <kernel_shape = [1, 1]> (x, w2)
    v = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (z, w3, b3)
}
"""


def test_avx2_1x1_convs_tile_pixels_and_part_vector_rows_take_channel_lanes(
    tmp_path: Path,
) -> None:
    """On AVX2 (8 lanes) a 1x1 stride-1 conv is a GEMM over its flattened pixels: 12 x 14 =
    168 pixels are 21 whole vectors although a 14-column row is not (residual-add epilogue, and
    none); a 3x3 conv on 12-column rows (a row tile of half a vector) puts its output channels on
    the lanes instead. The results match onnxruntime."""
    rng = np.random.default_rng(4)
    model = onnx.parser.parse_model(PIXEL_TILES)
    for name, shape in (("w1", (24, 16, 1, 1)), ("b1", (24,)), ("w2", (16, 16, 1, 1)),
                        ("w3", (16, 8, 3, 3)), ("b3", (16,))):  # fmt: skip
        model.graph.initializer.append(numpy_helper.from_array(_w(rng, *shape), name))
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "pixels.onnx"
    onnx.save(model, path)
    with schedule.recording() as matches:
        lower.compile_model(path, "x86:haswell", tmp_path / "out", verify=False, fold=False)
    kinds = sorted(m.kind for m in matches if m.rule == "bnfold_conv")
    feeds = {"x": _w(rng, 1, 16, 12, 14), "r": _w(rng, 1, 24, 12, 14), "z": _w(rng, 1, 8, 10, 12)}
    got = runtime.load(tmp_path / "out").run(feeds)
    for name, want in run_onnxruntime(model, feeds).items():
        np.testing.assert_allclose(got[name], want, rtol=RTOL,
                                   atol=RTOL * float(np.abs(want).max()), err_msg=name)  # fmt: skip
    want = ["conv1x1 (pixel tiles)", "conv1x1 (pixel tiles)", "conv3x3 (channel lanes)"]
    assert kinds == sorted(want), kinds


def test_strided_convs_read_a_phase_split_copy() -> None:
    """A stride-s conv whose padded width divides by s stores its padded input as s phases
    (5-D copy), so its taps read contiguous vectors; an odd padded width keeps the 4-D copy."""
    import tvm

    from bnfold.targets import get

    rng = np.random.default_rng(4)
    ops = [
        _conv(rng, (1, 24, 12, 10), 24, (3, 3), "depthwise", stride=2, pad=1, group=24),
        _conv(rng, (1, 16, 9, 11), 16, (3, 3), "depthwise", stride=2, pad=1, group=16),
    ]
    mod = lower.import_relax(_model(ops), {"x0": (1, 24, 12, 10), "x1": (1, 16, 9, 11)})
    target = tvm.target.Target(get("x86").tvm_target())
    with target:
        mod = tvm.transform.Sequential(schedule.fused_passes(target))(mod)
    pads = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and "conv2d" in gv.name_hint:
            sch, match = schedule.schedule_function(func, target, gv.name_hint)
            assert match.rule == "bnfold_conv", match
            text = sch.mod["main"].script()
            width = 12 if "T.int64(24)" in text else 13
            pads[width] = text.count("T.int64(2), T.int64(6))") > 0
    assert pads == {12: True, 13: False}


def _transposed(rng: np.random.Generator, shape: tuple[int, ...], out_c: int,
                k: tuple[int, int], stride: tuple[int, int], group: int = 1) -> Op:  # fmt: skip
    inits = {"w": _w(rng, shape[1], out_c // group, *k), "b": _w(rng, out_c)}
    attrs = {"kernel_shape": list(k), "strides": list(stride), "group": group}
    return Op("ConvTranspose", shape, inits, attrs, relu=True)


@pytest.mark.parametrize("target", ["x86", pytest.param("arm64", marks=pytest.mark.qemu)])
def test_transposed_convs_with_kernel_equal_to_stride_become_1x1_convs(
    target: str, tmp_path: Path
) -> None:
    """ConvTranspose with kernel == stride (PP-OCR det's 2x2/2) runs as a 1x1 conv + depth to
    space; the others keep TVM's lowering. All match onnxruntime."""
    from bnfold.targets import get

    if not get(target).can_run():
        pytest.skip(get(target).can_run().why)
    rng = np.random.default_rng(6)
    ops = [
        _transposed(rng, (1, 24, 10, 12), 24, (2, 2), (2, 2)),  # taken
        _transposed(rng, (1, 8, 5, 7), 1, (2, 2), (2, 2)),  # taken: one output channel
        _transposed(rng, (1, 6, 4, 5), 5, (3, 2), (3, 2)),  # taken: 3x2 / 3x2
        _transposed(rng, (1, 4, 5, 5), 6, (3, 3), (2, 2)),  # overlapping taps: TVM's lowering
        _transposed(rng, (1, 4, 6, 6), 4, (2, 2), (2, 2), group=2),  # grouped: TVM's
    ]
    matches = _compile_and_compare(ops, target, tmp_path, rng)
    transposed = sorted(m.function for m in matches if "conv2d_transpose" in m.function)
    assert len(transposed) == 2, transposed


@pytest.mark.parametrize(
    ("axis", "live"),
    [
        ((14, 14, 3, 36, 36, 36, 1), (1, 1, 0, 0)),  # DeepLabV3's ASPP: the centre tap only
        ((14, 14, 3, 24, 24, 24, 1), (1, 1, 0, 0)),
        ((2, 2, 5, 4, 4, 2, 1), (2, 2, 0, 0)),  # 5 taps, dilation 2, on 2 pixels
        ((6, 3, 3, 3, 0, 3, 1), (1, 2, 0, 0)),  # padding on one side only
        ((14, 14, 3, 12, 12, 12, 1), None),  # every tap reads some input
        ((14, 14, 3, 1, 1, 1, 1), None),
        ((7, 4, 3, 4, 4, 4, 2), None),  # strided: every tap reaches the map somewhere
    ],
)
def test_dead_taps_along_an_axis(axis: tuple[int, ...], live: tuple[int, ...] | None) -> None:
    """(size, outputs, taps, pad, pad at the end, dilation, stride) -> the live taps and the
    padding that keeps the outputs, or None when nothing can be dropped."""
    assert rewrites._live_taps(*axis) == live


@pytest.mark.parametrize(
    ("axis", "bands"),
    [
        # 14 outputs, 3 taps at dilation 12 (DeepLabV3): 2 outputs read taps 1-2, 10 only the
        # centre, 2 taps 0-1.
        ((14, 14, 3, 12, 12, 1), [(0, 2, 1, 2), (2, 12, 1, 1), (12, 14, 0, 1)]),
        ((5, 5, 3, 1, 1, 1), [(0, 1, 1, 2), (1, 4, 0, 2), (4, 5, 0, 1)]),  # a plain 3x3 pad 1
        ((4, 6, 3, 3, 1, 1), None),  # output 0 reads only padding
    ],
)
def test_tap_bands_along_an_axis(axis: tuple[int, ...], bands: list[object] | None) -> None:
    """(size, outputs, taps, pad, dilation, stride) -> runs of outputs reading the same taps."""
    assert rewrites._tap_bands(*axis) == bands


def test_mostly_padded_convs_run_as_bands(tmp_path: Path) -> None:
    """A 3x3 conv at dilation 5 on 7 x 7 (27% of its products read input) runs as 3 x 3
    bands without padding (the inner one a 1x1 conv, the corners 2x2); a 3x3 conv with
    padding 1 stays one conv. Both match onnxruntime."""
    rng = np.random.default_rng(8)
    ops = [
        _conv(rng, (1, 8, 7, 7), 16, (3, 3), "conv1x1", pad=5, dilation=5),
        _conv(rng, (1, 8, 7, 9), 16, (3, 3), "conv3x3", pad=1),
    ]
    matches = _compile_and_compare(ops, "x86", tmp_path, rng)
    kinds = {m.kind.split(" (")[0] for m in matches if m.rule == "bnfold_conv"}
    assert kinds == {"conv1x1", "conv1x2", "conv2x1", "conv2x2", "conv3x3"}, matches


def test_channel_lanes_only_where_they_fit() -> None:
    """The weight packing is made only for dense NCHW convs with constant weights, output
    channels a multiple of the vector and rows narrower than it: that conv becomes a call of
    a packed-weight conv, the others stay Relax convs with their OIHW weights."""
    import tvm
    from tvm import relax

    from bnfold.targets import get

    target = tvm.target.Target(get("x86").tvm_target())
    lanes = vector_lanes(target)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 7, 7), "float32"))

    def w(o: int, i: int) -> relax.Constant:
        return relax.const(np.ones((o, i, 1, 1), np.float32))

    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.conv2d(x, w(2 * lanes, 16)))  # taken
            b = bb.emit(relax.op.nn.conv2d(x, w(lanes + 2, 16)))  # channels not half vectors
            c = bb.emit(relax.op.nn.conv2d(x, w(16, 1), groups=16))  # depthwise
            out = bb.emit_output(relax.Tuple([a, b, c]))
        bb.emit_func_output(out)
    with target:
        mod = rewrites.channels_last_weights(target)(bb.get())
    layouts = [str(call.attrs.kernel_layout) for call in _conv_calls(mod["main"])]
    assert layouts == ["OIHW", "OIHW"]
    packed = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert packed == ["conv2d_packed"]


def _conv_calls(func: object) -> list[object]:
    from tvm import relax

    calls: list[object] = []
    relax.analysis.post_order_visit(
        func,
        lambda e: (
            calls.append(e)
            if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.nn.conv2d"
            else None
        ),
    )
    return calls


def test_conv_rule_records_every_conv_it_takes(tmp_path: Path) -> None:
    """The manifest's summary counts what the recording saw."""
    rng = np.random.default_rng(1)
    # 16 columns: whole vectors on AVX2 and AVX-512 (a 9-column row takes channel lanes).
    ops = [_conv(rng, (1, 8, 7, 16), 12, (3, 3), "conv3x3", pad=1)]
    path = tmp_path / "one.onnx"
    onnx.save(_model(ops), path)
    m = lower.compile_model(path, "x86", tmp_path / "out", verify=False, fold=False)
    assert m.compile["schedule_rules"].get("bnfold_conv:conv3x3") == 1
    assert "unscheduled" not in m.compile["schedule_rules"]


def test_rules_decline_what_they_cannot_take() -> None:
    """Each rule returns None (declines) on a function of another kind."""
    import tvm
    from tvm import relax

    from bnfold.targets import get

    rng = np.random.default_rng(2)
    model = _model([_conv(rng, (1, 8, 7, 9), 16, (3, 3), "conv3x3", pad=1),
                    *_dense_ops(rng)[:1], *_pool_ops(rng)[:1]])  # fmt: skip
    mod = lower.import_relax(model, {"x0": (1, 8, 7, 9), "x1": (1, 64), "x2": (1, 8, 9, 7)})
    target = tvm.target.Target(get("x86").tvm_target())
    with target:
        mod = tvm.transform.Sequential([
            relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
            relax.transform.FuseOps(), relax.transform.FuseTIR(),
        ])(mod)  # fmt: skip
    funcs = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    kinds = {name: schedule.schedule_function(f, target, name)[1] for name, f in funcs.items()}
    assert {m.rule for m in kinds.values()} >= {"bnfold_conv", "bnfold_matmul"}
    for name, m in kinds.items():
        if "pool" in name:
            assert m.rule == "bnfold_generic"  # float pools: no specific rule
        if "conv2d" not in name:
            assert Conv().apply(funcs[name], target, False) is None


@pytest.mark.qemu
def test_rules_on_arm64_match_onnxruntime_under_qemu(tmp_path: Path) -> None:
    from bnfold.targets import get

    if not get("arm64").can_run():
        pytest.skip(get("arm64").can_run().why)
    rng = np.random.default_rng(0)
    ops = _conv_ops(rng)[::2] + _dense_ops(rng)[:2]
    matches = _compile_and_compare(ops, "arm64", tmp_path, rng)
    _assert_rules(ops, matches)
