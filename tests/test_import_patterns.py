"""Import what exporters write: constant-only subgraphs fold before TVM sees the graph, zero
Pads fold into their Conv/pool, and an op TVM cannot import is one line on stderr.

The torch models are the point here (the exporters' own patterns), so they are exported in the
test, by the TorchScript exporter (at opset 10, where Pad's amounts are an attribute, and at
17, where they are computed by a ``ConstantOfShape`` chain) and by the dynamo exporter.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

from bnfold import const_fold, pipeline, runtime
from bnfold import ir as bir
from bnfold.check import run_onnxruntime
from bnfold.lower import compiler as lower
from bnfold.testing import parse

pytest.importorskip("tvm")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.tvm

RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)


def _text(opset: int, body: str, out: str = "float[1,4,?,?] y") -> str:
    return f"""<ir_version: 8, opset_import: ["" : {opset}]>
    g (float[1,3,8,8] x) => ({out}) {{
        {body}
    }}"""


# Constant-only subgraphs computing operands that TVM's importer needs as constants, and the
# ops left after freezing.
CONSTANT_SUBGRAPHS = {
    # torch's F.pad at opset >= 11 (TorchScript exporter), written out.
    "torch_pad_chain": (13, """
        n = Constant <value = int64[1] {4}> ()
        given = Constant <value = int64[4] {0, 1, 0, 1}> ()
        zeros = ConstantOfShape <value = int64[1] {0}> (n)
        all = Concat <axis = 0> (given, zeros)
        pairs_shape = Constant <value = int64[2] {-1, 2}> ()
        pairs = Reshape (all, pairs_shape)
        st = Constant <value = int64[1] {-1}> ()
        en = Constant <value = int64[1] {-9223372036854775807}> ()
        ax = Constant <value = int64[1] {0}> ()
        sp = Constant <value = int64[1] {-1}> ()
        rev = Slice (pairs, st, en, ax, sp)
        t = Transpose <perm = [1, 0]> (rev)
        flat_shape = Constant <value = int64[1] {-1}> ()
        flat = Reshape (t, flat_shape)
        pads = Cast <to = 7> (flat)
        p = Pad (x, pads)
        y = Conv <strides = [2, 2]> (p, W)
    """, ["Conv"]),
    # A node with two outputs: onnxscript skips it, onnxruntime folds it.
    "split_pads": (13, """
        c = Constant <value = int64[8] {0, 0, 1, 0, 0, 0, 2, 1}> ()
        a, b = Split <axis = 0> (c)
        pads = Concat <axis = 0> (a, b)
        p = Pad <mode = "reflect"> (x, pads)
        y = Conv (p, W)
    """, ["Pad", "Conv"]),
    "resize_scales": (13, """
        one = Constant <value = float[2] {1, 1}> ()
        two = Constant <value = float[2] {2, 2}> ()
        scales = Concat <axis = 0> (one, two)
        r = Resize <mode = "nearest"> (x, , scales)
        y = Conv (r, W)
    """, ["Resize", "Conv"]),
    "slice_starts_opset10": (10, """
        a = Constant <value = int64[2] {1, 0}> ()
        b = Constant <value = int64[2] {0, 1}> ()
        starts = Add (a, b)
        ends = Constant <value = int64[2] {8, 8}> ()
        axes = Constant <value = int64[2] {2, 3}> ()
        s = Slice (x, starts, ends, axes)
        y = Conv (s, W)
    """, ["Slice", "Conv"]),
    # Opset 7: Pad's amounts are an attribute (folds into the Conv); a Reshape target from a
    # Concat of initializers (Constant holds only floats before opset 9).
    "reshape_and_pad_opset7": (7, """
        p = Pad <pads = [0, 0, 1, 1, 0, 0, 1, 1]> (x)
        c = Conv (p, W)
        shape = Concat <axis = 0> (head, tail)
        y = Reshape (c, shape)
    """, ["Conv", "Reshape"]),
    "expand_shape_opset9": (9, """
        n = Constant <value = int64[1] {4}> ()
        ones = ConstantOfShape <value = int64[1] {1}> (n)
        k = Constant <value = int64[4] {1, 4, 6, 6}> ()
        shape = Mul (ones, k)
        c = Conv (x, W)
        m = ReduceMean <axes = [2]> (c)
        y = Expand (m, shape)
    """, ["Conv", "ReduceMean", "Expand"]),
}  # fmt: skip


@pytest.mark.parametrize("case", CONSTANT_SUBGRAPHS)
def test_constant_subgraphs_fold_and_compile(case: str, tmp_path: Path) -> None:
    opset, body, left = CONSTANT_SUBGRAPHS[case]
    model = parse(_text(opset, body), W=W, head=np.asarray([1, 4], np.int64),
                  tail=np.asarray([-1], np.int64))  # fmt: skip
    frozen = lower.freeze(bir.from_proto(model), {"x": (1, 3, 8, 8)})
    assert [n.op_type for n in frozen.graph.node] == left
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    m = lower.compile_model(path, "x86", tmp_path / "out", {"x": (1, 3, 8, 8)})
    assert m.verified is True, m.verification.get("table")
    assert m.verification["worst_abs_over_max_ref"] <= 1e-4


@pytest.mark.parametrize(("dims", "kept"), [([1, 4, 8, 8], False), ([1, 4, 64, 64], True)])
def test_constant_of_shape_folds_only_when_small(dims: list[int], kept: bool) -> None:
    """A small ConstantOfShape is an operand (folded); a large one is data (kept: folding it
    would only grow the model)."""
    body = f"""
        shape = Constant <value = int64[4] {{{", ".join(map(str, dims))}}}> ()
        z = ConstantOfShape <value = float[1] {{0.5}}> (shape)
        y = Add (x, z)"""
    text = _text(13, body, "float[1,4,?,?] y").replace("float[1,3,8,8] x", f"float{dims} x")
    model = bir.from_proto(parse(text))
    const_fold.fold_constants(model)
    assert ("ConstantOfShape" in [n.op_type for n in model.graph]) is kept
    proto = bir.to_proto(model)
    x = RNG.standard_normal(dims).astype(np.float32)
    np.testing.assert_array_equal(run_onnxruntime(proto, {"x": x})["y"], x + np.float32(0.5))


# --- Models exported by torch ---------------------------------------------------------------

EXPORTS = {"torchscript_opset10": 10, "torchscript_opset17": 17, "dynamo": None}


@pytest.fixture(scope="module")
def padded_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One conv net with every kind of F.pad, exported each way (seeded)."""
    torch = pytest.importorskip("torch")
    from torch import nn
    from torch.nn import functional as F

    def pad_same(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
        """TF-"same" padding computed from the input's size, as TF-ported nets do it (with a
        static input the sizes trace to constants: the same pad chain as F.pad)."""
        amounts = []
        for size in (x.size(-1), x.size(-2)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            amounts += [total // 2, total - total // 2]
        return F.pad(x, amounts)

    class Padded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, stride=2)
            self.a, self.b, self.c = (nn.Conv2d(8, 8, 3) for _ in range(3))
            self.dw = nn.Conv2d(8, 8, 5, stride=2, groups=8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.stem(F.pad(x, (0, 1, 0, 1))))  # TF-"same" stem: asymmetric
            x = F.max_pool2d(F.pad(x, (1, 0, 1, 0)), 3, stride=2)  # zero pad of a Relu
            x = self.a(F.pad(x, (1, 2, 0, 1), mode="reflect"))
            x = self.b(F.pad(x, (1, 1, 1, 1), mode="replicate"))
            x = self.c(F.pad(x, (1, 1, 1, 1), value=0.5))
            return self.dw(pad_same(x, 5, 2))

    torch.manual_seed(0)
    net = Padded().eval()
    x = torch.randn(1, 3, 32, 32)
    folder = tmp_path_factory.mktemp("torch")
    paths = {}
    for name, opset in EXPORTS.items():
        paths[name] = folder / f"{name}.onnx"
        kw = {"dynamo": True} if opset is None else {"dynamo": False, "opset_version": opset}
        with warnings.catch_warnings():  # the exporters' deprecation and folding notes
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (x,), str(paths[name]), **kw)
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("exporter", EXPORTS)
def test_torch_padded_model_compiles_and_verifies(
    padded_exports: dict[str, Path], exporter: str, tmp_path: Path
) -> None:
    path = padded_exports[exporter]
    source = onnx.load(str(path))
    name = source.graph.input[0].name
    shapes = {name: (1, 3, 32, 32)}
    frozen = lower.freeze(pipeline.fold(path)[0], shapes)
    # The three zero pads are gone (into the stem Conv, the MaxPool and the depthwise Conv);
    # reflect, replicate and the 0.5 pad stay, with constant amounts.
    pads = [n for n in frozen.graph.node if n.op_type == "Pad"]
    assert len(pads) == 3
    assert {n.op_type for n in frozen.graph.node} == {"Conv", "Relu", "MaxPool", "Pad"}
    m = lower.compile_model(path, "x86", tmp_path, shapes)
    assert m.verified is True, m.verification.get("table")
    assert m.verification["worst_abs_over_max_ref"] <= 1e-4
    x = RNG.standard_normal((1, 3, 32, 32)).astype(np.float32)
    ref = next(iter(run_onnxruntime(path, {name: x}).values()))
    got = next(iter(runtime.load(tmp_path)(x).values()))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# --- What TVM cannot import: one line --------------------------------------------------------

UNIMPORTABLE = {
    # An op the importer does not implement.
    "Celu": _text(17, "y = Celu (x)", "float[1,3,8,8] y"),
    # Pads that are a graph input: TVM's converter fails inside the op (and its C++ logger
    # warns when the aborted import's BlockBuilder is destroyed).
    "Pad": """<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,8,8] x, int64[8] p) => (float[1,3,?,?] y) {
        y = Pad (x, p)
    }""",
}


@pytest.mark.parametrize("op", UNIMPORTABLE)
def test_unimportable_op_is_one_stderr_line(op: str, tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(onnx.parser.parse_model(UNIMPORTABLE[op]), path)
    # A fresh process: TVM's C++ logger writes to file descriptor 2, which only a subprocess
    # sees as the user would.
    proc = subprocess.run(
        [sys.executable, "-m", "bnfold", "compile", str(path), "-o", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: TVM cannot import the model") and op in lines[0]
