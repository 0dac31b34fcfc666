"""Seed models and mutators: the fuzz corpus for bnfold's input handling.

A *case* is a small folder of files (the model ``in/m.onnx``, maybe its external data, maybe a
file or a symlink outside ``in/``) made by applying one mutator to one seed model. Every case is
a pure function of ``(family, seed, index)``: :func:`make_case` draws all its randomness from a
``random.Random`` seeded with that string, so the corpus is the same on every run and machine.

Families (``FAMILIES``) group the mutators by what they break: raw bytes (truncation, bit flips,
splices), graph structure (dropped/duplicated/reordered nodes, cycles, dangling names), tensors
(wrong sizes and dtypes, huge dims, NaN/Inf values), attributes, BatchNormalization parameters
and attributes, opset and IR versions, value types and shapes, and external data (locations,
offsets, lengths, missing, short, symlinked or non-regular data files).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper

from bnfold.testing import parse

MODEL = "in/m.onnx"
DATA = "in/m.onnx.data"
OUTSIDE = "outside.bin"  # beside in/: what a '../' location would read if it were allowed

SPECIAL_FLOATS = (
    float("nan"),
    float("inf"),
    float("-inf"),
    0.0,
    -0.0,
    -1.0,
    1e-45,  # float32 denormal
    1e-40,
    6e-8,  # float16 denormal
    3e38,
    1e30,
    7e4,  # over float16 max
)
SPECIAL_INTS = (-(2**63), -(2**31), -2, -1, 0, 1, 2, 3, 7, 2**31 - 1, 2**31, 2**40, 2**63 - 1)
HUGE_DIMS = (2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1)
OP_TYPES = (
    *("Relu", "Foo", "BatchNormalization", "Conv", "Gemm", "MatMul", "Add", "Mul", "Div"),
    *("Identity", "If", "Loop", "Constant", "ConvTranspose", "Sub", ""),
)
ATTRIBUTE_NAMES = (
    *("group", "pads", "strides", "kernel_shape", "dilations", "auto_pad", "epsilon"),
    *("transA", "transB", "alpha", "beta", "training_mode", "spatial", "bogus"),
)


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """One fuzz input: files (relative path -> bytes), symlinks, folders, FIFOs; and options."""

    name: str
    files: dict[str, bytes]
    links: dict[str, str] = dataclasses.field(default_factory=dict)
    dirs: tuple[str, ...] = ()
    fifos: tuple[str, ...] = ()
    options: tuple[str, ...] = ()

    def materialize(self, root: Path) -> Path:
        """Write the case under ``root`` (created); return the model path."""
        (root / "in").mkdir(parents=True, exist_ok=True)
        for rel, data in self.files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        for rel in self.dirs:
            (root / rel).mkdir(parents=True, exist_ok=True)
        for rel in self.fifos:
            os.mkfifo(root / rel)
        for rel, target in self.links.items():
            # "{root}" lets a case point a link at an absolute path inside its own folder.
            (root / rel).symlink_to(target.replace("{root}", str(root)))
        return root / MODEL


def _bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


# --------------------------------------------------------------------------------------------
# seeds
# --------------------------------------------------------------------------------------------


def _bn(rng: np.random.Generator, c: int, prefix: str, dtype: type = np.float32) -> dict:
    return {
        f"{prefix}_g": rng.uniform(0.5, 2.0, c).astype(dtype),
        f"{prefix}_b": rng.standard_normal(c).astype(dtype),
        f"{prefix}_m": rng.standard_normal(c).astype(dtype),
        f"{prefix}_v": rng.uniform(0.5, 2.0, c).astype(dtype),
    }


def _bn_call(x: str, y: str, p: str, attrs: str = "") -> str:
    return f"{y} = BatchNormalization{attrs} ({x}, {p}_g, {p}_b, {p}_m, {p}_v)"


def seed_conv_bn(dtype: str = "float", opset: int = 17) -> onnx.ModelProto:
    """x -> Conv(3x3, pads 1) -> BN -> Relu -> y: folds backward."""
    npdt = {"float": np.float32, "float16": np.float16, "double": np.float64}[dtype]
    rng = np.random.default_rng(1)
    spatial = "<spatial=1>" if opset < 9 else ""
    return parse(
        f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    g ({dtype}[1,3,6,6] x) => ({dtype}[1,4,6,6] y) {{
        c = Conv <pads=[1,1,1,1]> (x, W, B)
        {_bn_call("c", "n", "bn", spatial)}
        y = Relu (n)
    }}
    """,
        W=rng.standard_normal((4, 3, 3, 3)).astype(npdt),
        B=rng.standard_normal(4).astype(npdt),
        **_bn(rng, 4, "bn", npdt),
    )


def seed_three_bn() -> onnx.ModelProto:
    """Three BNs: folded backward, forward (into a 1x1 Conv), and as Mul+Add."""
    rng = np.random.default_rng(2)
    return parse(
        f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,6,6] x) => (float[1,5,6,6] y) {{
        c1 = Conv <pads=[1,1,1,1]> (x, W1, B1)
        {_bn_call("c1", "b1", "bn1")}
        r1 = Relu (b1)
        {_bn_call("r1", "b2", "bn2")}
        c2 = Conv (b2, W2, B2)
        r2 = Relu (c2)
        {_bn_call("r2", "b3", "bn3")}
        y = Relu (b3)
    }}
    """,
        W1=rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        B1=rng.standard_normal(4).astype(np.float32),
        W2=rng.standard_normal((5, 4, 1, 1)).astype(np.float32),
        B2=rng.standard_normal(5).astype(np.float32),
        **_bn(rng, 4, "bn1"),
        **_bn(rng, 4, "bn2"),
        **_bn(rng, 5, "bn3"),
    )


def seed_conv_transpose_bn() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    return parse(
        f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4,4,4] x) => (float[1,6,9,9] y) {{
        c = ConvTranspose <group=2, strides=[2,2]> (x, W, B)
        {_bn_call("c", "y", "bn")}
    }}
    """,
        W=rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        B=rng.standard_normal(6).astype(np.float32),
        **_bn(rng, 6, "bn"),
    )


def seed_gemm_bn() -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    return parse(
        f"""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[2,8] x) => (float[2,6] y) {{
        c = Gemm <transB=1, alpha=0.5> (x, W, C)
        {_bn_call("c", "n", "bn")}
        y = Relu (n)
    }}
    """,
        W=rng.standard_normal((6, 8)).astype(np.float32),
        C=rng.standard_normal(6).astype(np.float32),
        **_bn(rng, 6, "bn"),
    )


def seed_matmul_add_bn() -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    return parse(
        f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[3,8] x) => (float[3,6] y) {{
        m = MatMul (x, W)
        a = Add (m, Bias)
        {_bn_call("a", "y", "bn")}
    }}
    """,
        W=rng.standard_normal((8, 6)).astype(np.float32),
        Bias=rng.standard_normal(6).astype(np.float32),
        **_bn(rng, 6, "bn"),
    )


def seed_affine_chain() -> onnx.ModelProto:
    """Conv -> Mul(const) -> Add(const) -> Conv -> Div(const): what some exporters leave."""
    rng = np.random.default_rng(6)
    return parse(
        """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
        c = Conv <pads=[1,1,1,1]> (x, W, B)
        m = Mul (c, S)
        a = Add (m, T)
        c2 = Conv (a, W2)
        y = Div (c2, D)
    }
    """,
        W=rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        B=rng.standard_normal(4).astype(np.float32),
        S=rng.uniform(0.5, 2, (1, 4, 1, 1)).astype(np.float32),
        T=rng.standard_normal((1, 4, 1, 1)).astype(np.float32),
        W2=rng.standard_normal((4, 4, 1, 1)).astype(np.float32),
        D=rng.uniform(0.5, 2, (1, 4, 1, 1)).astype(np.float32),
    )


def seed_constant_weights() -> onnx.ModelProto:
    """Weights in Constant nodes (paddle2onnx style), lifted to initializers by bnfold."""
    model = seed_conv_bn()
    graph = model.graph
    consts = [
        onnx.helper.make_node("Constant", [], [t.name], value=t, name=f"const_{t.name}")
        for t in graph.initializer
    ]
    nodes = consts + list(graph.node)
    del graph.initializer[:]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def seed_ir3_inputs() -> onnx.ModelProto:
    """IR 3 / opset 8: initializers also listed as graph inputs (constants by that spec)."""
    rng = np.random.default_rng(8)
    return parse(
        """
    <ir_version: 3, opset_import: ["" : 8]>
    g (float[1,3,6,6] x, float[4,3,3,3] W, float[4] bn_g, float[4] bn_b, float[4] bn_m,
       float[4] bn_v) => (float[1,4,6,6] y) {
        c = Conv <pads=[1,1,1,1]> (x, W)
        y = BatchNormalization (c, bn_g, bn_b, bn_m, bn_v)
    }
    """,
        W=rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        **_bn(rng, 4, "bn"),
    )


def seed_dynamic() -> onnx.ModelProto:
    rng = np.random.default_rng(9)
    return parse(
        f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3,H,W] x) => (float[N,4,H,W] y) {{
        c = Conv <pads=[1,1,1,1]> (x, Wt, B)
        {_bn_call("c", "y", "bn")}
    }}
    """,
        Wt=rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        B=rng.standard_normal(4).astype(np.float32),
        **_bn(rng, 4, "bn"),
    )


def seed_subgraph_if() -> onnx.ModelProto:
    """A BN inside an If branch (left alone) and one in the main graph (folded)."""
    rng = np.random.default_rng(10)
    tensors = {
        "W": rng.standard_normal((4, 3, 1, 1)).astype(np.float32),
        **_bn(rng, 4, "bn"),
        **_bn(rng, 4, "sb"),
    }
    return parse(
        f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,4,4] x, bool cond) => (float[1,4,4,4] y) {{
        c = Conv (x, W)
        {_bn_call("c", "n", "bn")}
        y = If (cond) <
            then_branch = t () => (float[1,4,4,4] ty) {{ {_bn_call("n", "ty", "sb")} }},
            else_branch = e () => (float[1,4,4,4] ey) {{ ey = Relu (n) }}
        >
    }}
    """,
        **tensors,
    )


def seed_shared_weight() -> onnx.ModelProto:
    """Two Conv -> BN branches sharing one weight (it must be copied, not changed under one)."""
    rng = np.random.default_rng(11)
    return parse(
        f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,5,5] x) => (float[1,4,5,5] y) {{
        c1 = Conv <pads=[1,1,1,1]> (x, W)
        c2 = Conv <pads=[1,1,1,1]> (x, W)
        {_bn_call("c1", "n1", "p")}
        {_bn_call("c2", "n2", "q")}
        y = Add (n1, n2)
    }}
    """,
        W=rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        **_bn(rng, 4, "p"),
        **_bn(rng, 4, "q"),
    )


def seed_bn_output() -> onnx.ModelProto:
    """A lone BN on a graph input that is also the graph output (becomes Mul+Add)."""
    rng = np.random.default_rng(12)
    return parse(
        f"""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[2,3,4] x) => (float[2,3,4] y) {{ {_bn_call("x", "y", "bn", "<epsilon=0.001>")} }}
    """,
        **_bn(rng, 3, "bn"),
    )


SEEDS: dict[str, Callable[[], onnx.ModelProto]] = {
    "conv_bn": seed_conv_bn,
    "conv_bn_fp16": lambda: seed_conv_bn("float16"),
    "conv_bn_fp64": lambda: seed_conv_bn("double"),
    "conv_bn_opset7": lambda: seed_conv_bn(opset=7),
    "three_bn": seed_three_bn,
    "conv_transpose_bn": seed_conv_transpose_bn,
    "gemm_bn": seed_gemm_bn,
    "matmul_add_bn": seed_matmul_add_bn,
    "affine_chain": seed_affine_chain,
    "constant_weights": seed_constant_weights,
    "ir3_inputs": seed_ir3_inputs,
    "dynamic": seed_dynamic,
    "subgraph_if": seed_subgraph_if,
    "shared_weight": seed_shared_weight,
    "bn_output": seed_bn_output,
}

# The suite's corpus uses these only: a real model added with add_file_seed must not change it.
SYNTHETIC = tuple(sorted(SEEDS))
_SEED_CACHE: dict[str, onnx.ModelProto] = {}


def seed_model(name: str) -> onnx.ModelProto:
    """A fresh copy of seed ``name`` (built once per process)."""
    if name not in _SEED_CACHE:
        _SEED_CACHE[name] = SEEDS[name]()
    out = onnx.ModelProto()
    out.CopyFrom(_SEED_CACHE[name])
    return out


def add_file_seed(name: str, path: Path) -> None:
    """Use the ONNX file at ``path`` (a real model) as seed ``name``."""
    proto = onnx.load(str(path))
    SEEDS[name] = lambda: proto


# --------------------------------------------------------------------------------------------
# helpers for proto mutators
# --------------------------------------------------------------------------------------------


def _all_graphs(model: onnx.ModelProto) -> list[onnx.GraphProto]:
    out = []

    def walk(g: onnx.GraphProto) -> None:
        out.append(g)
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                for sub in a.graphs:
                    walk(sub)

    walk(model.graph)
    return out


def _graph(model: onnx.ModelProto, rng: random.Random) -> onnx.GraphProto:
    """The main graph mostly; sometimes a subgraph."""
    graphs = _all_graphs(model)
    return graphs[0] if len(graphs) == 1 or rng.random() < 0.7 else rng.choice(graphs[1:])


def _nodes(model: onnx.ModelProto, rng: random.Random) -> tuple[onnx.GraphProto, int]:
    g = _graph(model, rng)
    if not g.node:
        g = model.graph
    return g, rng.randrange(len(g.node)) if g.node else -1


def _tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    found = list(model.graph.initializer)
    for g in _all_graphs(model):
        for n in g.node:
            found.extend(a.t for a in n.attribute if a.type == onnx.AttributeProto.TENSOR)
    return found


def _bn_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for g in _all_graphs(model) for n in g.node if n.op_type == "BatchNormalization"]


def _names(model: onnx.ModelProto) -> list[str]:
    g = model.graph
    names = [i.name for i in g.input] + [t.name for t in g.initializer]
    names += [o for n in g.node for o in n.output]
    return names or ["x"]


def _set_attr(node: onnx.NodeProto, attr: onnx.AttributeProto) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == attr.name:
            node.attribute[i].CopyFrom(attr)
            return
    node.attribute.append(attr)


def _set_tensor_values(t: onnx.TensorProto, values: np.ndarray) -> None:
    new = onnx.numpy_helper.from_array(values.astype(values.dtype), t.name)
    t.CopyFrom(new)


def _init_by_name(model: onnx.ModelProto, name: str) -> onnx.TensorProto | None:
    for t in _tensors(model):
        if t.name == name:
            return t
    for g in _all_graphs(model):  # a Constant node's value has the node's output name
        for n in g.node:
            if n.op_type == "Constant" and n.output and n.output[0] == name:
                for a in n.attribute:
                    if a.name == "value":
                        return a.t
    return None


# --------------------------------------------------------------------------------------------
# proto mutators: (model, rng) -> None, in place
# --------------------------------------------------------------------------------------------

ProtoMutator = Callable[[onnx.ModelProto, random.Random], None]


def drop_node(m: onnx.ModelProto, rng: random.Random) -> None:
    g, i = _nodes(m, rng)
    if i >= 0:
        del g.node[i]


def duplicate_node(m: onnx.ModelProto, rng: random.Random) -> None:
    g, i = _nodes(m, rng)
    if i < 0:
        return
    dup = copy.deepcopy(g.node[i])
    if rng.random() < 0.5:  # renamed outputs: a valid model with a dead node
        for k, o in enumerate(dup.output):
            dup.output[k] = f"{o}_dup"
        dup.name = f"{dup.name}_dup" if dup.name else ""
    g.node.insert(i + 1, dup)


def reorder_nodes(m: onnx.ModelProto, rng: random.Random) -> None:
    g, _ = _nodes(m, rng)
    nodes = list(g.node)
    if rng.random() < 0.5:
        rng.shuffle(nodes)
    else:
        nodes.reverse()
    del g.node[:]
    g.node.extend(nodes)


def make_cycle(m: onnx.ModelProto, rng: random.Random) -> None:
    g, i = _nodes(m, rng)
    if i < 0 or not g.node[i].input:
        return
    j = rng.randrange(i, len(g.node))  # a later node, or the node itself
    src = g.node[j]
    if src.output:
        g.node[i].input[rng.randrange(len(g.node[i].input))] = rng.choice(list(src.output))


def dangling_input(m: onnx.ModelProto, rng: random.Random) -> None:
    g, i = _nodes(m, rng)
    if i >= 0 and g.node[i].input:
        k = rng.randrange(len(g.node[i].input))
        g.node[i].input[k] = rng.choice(["nope", "", g.node[i].input[k] + "_", "x "])


def dangling_output(m: onnx.ModelProto, rng: random.Random) -> None:
    outs = m.graph.output
    if outs:
        outs[rng.randrange(len(outs))].name = rng.choice(["nope", "", "x"])


def rename_value(m: onnx.ModelProto, rng: random.Random) -> None:
    """Give a node output the name of another value (breaks single assignment)."""
    g, i = _nodes(m, rng)
    if i >= 0 and g.node[i].output:
        g.node[i].output[0] = rng.choice(_names(m))


def change_op(m: onnx.ModelProto, rng: random.Random) -> None:
    g, i = _nodes(m, rng)
    if i < 0:
        return
    node = g.node[i]
    if rng.random() < 0.7:
        node.op_type = rng.choice(OP_TYPES)
    else:
        node.domain = rng.choice(["com.microsoft", "bogus", "ai.onnx.ml", "ai.onnx", " "])


def change_arity(m: onnx.ModelProto, rng: random.Random) -> None:
    g, i = _nodes(m, rng)
    if i < 0:
        return
    node = g.node[i]
    choice = rng.randrange(4)
    if choice == 0 and node.input:
        del node.input[rng.randrange(len(node.input))]
    elif choice == 1:
        node.input.append(rng.choice(_names(m)))
    elif choice == 2 and node.output:
        del node.output[rng.randrange(len(node.output))]
    else:
        node.output.append(f"extra_{rng.randrange(100)}")


def drop_graph_io(m: onnx.ModelProto, rng: random.Random) -> None:
    g = m.graph
    kind = rng.randrange(4)
    if kind == 0 and g.input:
        del g.input[rng.randrange(len(g.input))]
    elif kind == 1 and g.output:
        del g.output[rng.randrange(len(g.output))]
    elif kind == 2:
        del g.output[:]
    else:
        extra = copy.deepcopy(g.input[0]) if g.input else onnx.ValueInfoProto(name="x")
        extra.name = rng.choice(_names(m))  # an input that shadows a node output or weight
        g.input.append(extra)


def initializer_list(m: onnx.ModelProto, rng: random.Random) -> None:
    g = m.graph
    if not g.initializer:
        return
    i = rng.randrange(len(g.initializer))
    kind = rng.randrange(3)
    if kind == 0:
        del g.initializer[i]
    elif kind == 1:
        g.initializer.append(copy.deepcopy(g.initializer[i]))  # duplicate name
    else:
        g.initializer[i].name = rng.choice(["nope", "", *_names(m)])


def tensor_size(m: onnx.ModelProto, rng: random.Random) -> None:
    """Data that does not match the dims: short/long raw_data, changed or extra dims."""
    tensors = _tensors(m)
    if not tensors:
        return
    t = rng.choice(tensors)
    kind = rng.randrange(6)
    if kind == 0 and t.raw_data:
        t.raw_data = t.raw_data[: rng.randrange(len(t.raw_data))]
    elif kind == 1:
        t.raw_data = t.raw_data + bytes(rng.choice([1, 2, 4, 8, 64]))
    elif kind == 2 and t.dims:
        k = rng.randrange(len(t.dims))
        t.dims[k] = max(0, t.dims[k] + rng.choice([-1, 1, 2]))
    elif kind == 3:
        t.dims.append(rng.choice([1, 2, 3]))
    elif kind == 4 and t.dims:
        del t.dims[rng.randrange(len(t.dims))]
    else:
        arr = onnx.numpy_helper.to_array(t)
        t.ClearField("raw_data")
        t.float_data.extend(arr.astype(np.float32).ravel().tolist()[: max(0, arr.size - 1)])


def tensor_dims_extreme(m: onnx.ModelProto, rng: random.Random) -> None:
    tensors = _tensors(m)
    if not tensors:
        return
    t = rng.choice(tensors)
    if not t.dims:
        t.dims.append(1)
    k = rng.randrange(len(t.dims))
    t.dims[k] = rng.choice([*HUGE_DIMS, -1, -(2**40), 0])


def tensor_dtype(m: onnx.ModelProto, rng: random.Random) -> None:
    tensors = _tensors(m)
    if not tensors:
        return
    t = rng.choice(tensors)
    t.data_type = rng.choice([*range(0, 27), 99, -1])
    if rng.random() < 0.3:  # move the bytes into a typed field of another kind
        raw = t.raw_data
        t.ClearField("raw_data")
        field = rng.choice(["int32_data", "int64_data", "float_data", "double_data"])
        count = len(raw) // 4
        getattr(t, field).extend([rng.randrange(256) for _ in range(count)])


def tensor_values(m: onnx.ModelProto, rng: random.Random) -> None:
    """NaN, Inf, zeros, denormals or huge values in a weight (the model may stay valid)."""
    floats = [t for t in _tensors(m) if t.data_type in (1, 10, 11)]
    if not floats:
        return
    t = rng.choice(floats)
    arr = onnx.numpy_helper.to_array(t).copy()
    if arr.size == 0:
        return
    flat = arr.reshape(-1)
    value = rng.choice(SPECIAL_FLOATS)
    with np.errstate(over="ignore"):
        if rng.random() < 0.5:
            flat[rng.randrange(flat.size)] = value
        else:
            flat[:] = value
    _set_tensor_values(t, arr)


def tensor_location(m: onnx.ModelProto, rng: random.Random) -> None:
    """A tensor that claims external data without a usable reference."""
    tensors = _tensors(m)
    if not tensors:
        return
    t = rng.choice(tensors)
    t.data_location = onnx.TensorProto.EXTERNAL
    if rng.random() < 0.5:
        t.ClearField("raw_data")
    if rng.random() < 0.5:
        e = t.external_data.add()
        e.key, e.value = rng.choice(
            [("location", "/etc/passwd"), ("location", "../x"), ("offset", "1"), ("bogus", "1")]
        )


def attribute(m: onnx.ModelProto, rng: random.Random) -> None:
    """Change, retype, drop or add a node attribute."""
    g, i = _nodes(m, rng)
    if i < 0:
        return
    node = g.node[i]
    kind = rng.randrange(5)
    if kind == 0 or not node.attribute:
        name = rng.choice(ATTRIBUTE_NAMES)
        value = rng.choice(
            [
                rng.choice(SPECIAL_INTS),
                [rng.choice(SPECIAL_INTS) for _ in range(rng.randrange(1, 6))],
                rng.choice(SPECIAL_FLOATS),
                rng.choice(["NOTSET", "SAME_UPPER", "VALID", "bogus", ""]),
            ]
        )
        _set_attr(node, onnx.helper.make_attribute(name, value))
        return
    a = node.attribute[rng.randrange(len(node.attribute))]
    if kind == 1:
        node.attribute.remove(a)
    elif kind == 2 and a.type == onnx.AttributeProto.INT:
        a.i = rng.choice(SPECIAL_INTS)
    elif kind == 2 and a.type == onnx.AttributeProto.INTS and a.ints:
        a.ints[rng.randrange(len(a.ints))] = rng.choice(SPECIAL_INTS)
    elif kind == 2 and a.type == onnx.AttributeProto.FLOAT:
        a.f = rng.choice(SPECIAL_FLOATS)
    elif kind == 3:  # wrong attribute type under the right name
        _set_attr(node, onnx.helper.make_attribute(a.name, rng.choice([1.5, "s", [1, 2], 3])))
    else:
        a.type = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14])


def bn_attribute(m: onnx.ModelProto, rng: random.Random) -> None:
    bns = _bn_nodes(m)
    if not bns:
        return attribute(m, rng)
    node = rng.choice(bns)
    name = rng.choice(["epsilon", "epsilon", "momentum", "training_mode", "spatial"])
    if name in ("epsilon", "momentum"):
        value: object = rng.choice([*SPECIAL_FLOATS, 1e-5])
    else:
        value = rng.choice([0, 1, 2, -1])
    _set_attr(node, onnx.helper.make_attribute(name, value))


def bn_params(m: onnx.ModelProto, rng: random.Random) -> None:
    """Numerically adversarial BN statistics: var 0 with eps 0, negative var, NaN/Inf, gamma 0,
    huge scales, denormals; or a parameter of the wrong length or rank."""
    bns = _bn_nodes(m)
    if not bns:
        return tensor_values(m, rng)
    node = rng.choice(bns)
    which = rng.randrange(1, min(5, len(node.input)))
    t = _init_by_name(m, node.input[which])
    if t is None:
        return
    arr = onnx.numpy_helper.to_array(t).copy()
    kind = rng.randrange(5)
    with np.errstate(over="ignore"):
        if kind == 0 and arr.size:
            arr.reshape(-1)[rng.randrange(arr.size)] = rng.choice(SPECIAL_FLOATS)
        elif kind == 1:
            arr[...] = rng.choice(SPECIAL_FLOATS)
        elif kind == 2:  # var = 0 and epsilon = 0
            var = _init_by_name(m, node.input[4]) if len(node.input) > 4 else None
            if var is not None:
                zeros = np.zeros_like(onnx.numpy_helper.to_array(var))
                _set_tensor_values(var, zeros)
            _set_attr(node, onnx.helper.make_attribute("epsilon", 0.0))
            return
        elif kind == 3:
            arr = np.concatenate([arr, arr[:1]]) if rng.random() < 0.5 else arr[:-1]
        else:
            arr = arr.reshape((1, -1)) if rng.random() < 0.5 else arr * arr.dtype.type(1e30)
    _set_tensor_values(t, np.asarray(arr))


def value_types(m: onnx.ModelProto, rng: random.Random) -> None:
    """Graph input/output/value_info types and shapes: wrong dtype, huge or bad dims."""
    g = m.graph
    pool = list(g.input) + list(g.output) + list(g.value_info)
    if not pool:
        return
    vi = rng.choice(pool)
    tt = vi.type.tensor_type
    kind = rng.randrange(4)
    if kind == 0:
        tt.elem_type = rng.choice([*range(0, 27), 99])
    elif kind == 1 and tt.shape.dim:
        d = tt.shape.dim[rng.randrange(len(tt.shape.dim))]
        d.dim_value = rng.choice([*HUGE_DIMS, -1, 0, 1, 5])
    elif kind == 2:
        tt.shape.dim.add().dim_value = rng.choice([1, 2, 2**40])
    elif tt.shape.dim:
        tt.shape.dim[rng.randrange(len(tt.shape.dim))].dim_param = rng.choice(["N", "", "x y"])


def opset(m: onnx.ModelProto, rng: random.Random) -> None:
    kind = rng.randrange(4)
    default = [o for o in m.opset_import if o.domain in ("", "ai.onnx")]
    if kind == 0 and default:
        default[0].version = rng.choice([0, 1, 5, 6, 7, 8, 9, 12, 19, 22, 23, 24, 25, 26, 999])
    elif kind == 1:
        for o in default:
            m.opset_import.remove(o)
    elif kind == 2:
        extra = m.opset_import.add()
        extra.domain, extra.version = rng.choice([("", 6), ("", 23), ("ai.onnx", 13), ("x", 1)])
    else:
        m.ir_version = rng.choice([0, 1, 2, 3, 4, 7, 10, 11, 12, 13, 99, 2**40])


def metadata(m: onnx.ModelProto, rng: random.Random) -> None:
    """Metadata that bnfold might read: its own internal flag, odd producer strings."""
    p = m.metadata_props.add()
    p.key, p.value = rng.choice(
        [("bnfold.external_data", "1"), ("bnfold.external_data", "0"), ("", ""), ("k", "\x00")]
    )
    m.producer_name = rng.choice(["", "pytorch", "x" * 1000, "\u202e"])


def model_functions(m: onnx.ModelProto, rng: random.Random) -> None:
    """A model-local function, called or not, possibly wrong."""
    f = m.functions.add()
    f.name, f.domain = "F", rng.choice(["local", ""])
    f.input.append("a")
    f.output.append("b")
    f.node.add().CopyFrom(onnx.helper.make_node(rng.choice(["Relu", "Foo", "F"]), ["a"], ["b"]))
    f.opset_import.add().CopyFrom(onnx.helper.make_opsetid("", 17))
    if rng.random() < 0.5 and m.graph.node:
        m.graph.node[0].op_type, m.graph.node[0].domain = "F", f.domain
        if f.domain:
            m.opset_import.add().CopyFrom(onnx.helper.make_opsetid(f.domain, 1))


PROTO_FAMILIES: dict[str, tuple[ProtoMutator, ...]] = {
    "structure": (
        drop_node,
        duplicate_node,
        reorder_nodes,
        make_cycle,
        dangling_input,
        dangling_output,
        rename_value,
        change_op,
        change_arity,
        drop_graph_io,
    ),
    "tensors": (initializer_list, tensor_size, tensor_dims_extreme, tensor_dtype, tensor_location),
    "values": (tensor_values, bn_params),
    "attributes": (attribute, bn_attribute),
    "types": (value_types,),
    "versions": (opset, metadata, model_functions),
}


# --------------------------------------------------------------------------------------------
# byte mutators: (bytes, rng) -> bytes
# --------------------------------------------------------------------------------------------


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """Truncate, flip bits, overwrite, insert, delete, duplicate, zero or splice bytes."""
    buf = bytearray(data)
    n = len(buf)
    kind = rng.randrange(8)
    if kind == 0:
        return bytes(buf[: rng.randrange(n)])
    if kind == 1:
        for _ in range(rng.choice([1, 1, 2, 4, 16])):
            pos = rng.randrange(n)
            buf[pos] ^= 1 << rng.randrange(8)
    elif kind == 2:
        for _ in range(rng.choice([1, 2, 8])):
            buf[rng.randrange(n)] = rng.choice([0x00, 0xFF, 0x7F, 0x80, rng.randrange(256)])
    elif kind == 3:
        pos = rng.randrange(n + 1)
        buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.choice([1, 4, 16])))
    elif kind == 4:
        a = rng.randrange(n)
        del buf[a : a + rng.choice([1, 4, 64, 1024])]
    elif kind == 5:
        a = rng.randrange(n)
        span = buf[a : a + rng.choice([2, 16, 256])]
        buf[a:a] = span
    elif kind == 6:
        a = rng.randrange(n)
        fill = rng.choice([0x00, 0xFF])
        length = min(n - a, rng.choice([4, 32, 512]))
        buf[a : a + length] = bytes([fill]) * length
    else:  # splice: the head of this model and the tail of another
        other = _bytes(seed_model(rng.choice(SYNTHETIC)))
        return bytes(buf[: rng.randrange(n)]) + other[rng.randrange(len(other)) :]
    return bytes(buf)


# --------------------------------------------------------------------------------------------
# external data
# --------------------------------------------------------------------------------------------


def externalize(model: onnx.ModelProto, location: str = "m.onnx.data") -> tuple[bytes, bytes]:
    """Move every initializer into one blob (location/offset/length); return (model, blob).

    Written by hand: ``onnx.save_model`` refuses '..' and absolute locations, which is exactly
    what a hostile model file is free to contain.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    blob = bytearray()
    for t in out.graph.initializer:
        raw = onnx.numpy_helper.to_array(t).tobytes()
        offset = len(blob)
        blob += raw
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
            t.ClearField(field)
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", offset), ("length", len(raw))):
            e = t.external_data.add()
            e.key, e.value = key, str(value)
    return _bytes(out), bytes(blob)


def _entry(t: onnx.TensorProto, key: str) -> onnx.StringStringEntryProto | None:
    return next((e for e in t.external_data if e.key == key), None)


def external_case(name: str, model: onnx.ModelProto, rng: random.Random) -> Case:
    """A model with external data, broken in one way (or, for a few, not at all)."""
    data_model, blob = externalize(model)
    proto = onnx.load_model_from_string(data_model)
    files = {DATA: blob, OUTSIDE: blob}
    case = Case(name, files)
    ext = [t for t in proto.graph.initializer if t.external_data]
    t = rng.choice(ext) if ext else None
    kind = rng.randrange(10)
    if t is None or kind == 0:
        pass  # valid
    elif kind == 1:
        loc = _entry(t, "location")
        assert loc is not None
        loc.value = rng.choice(
            [
                "../outside.bin",
                "sub/../../outside.bin",
                "{root}/outside.bin",
                "/etc/passwd",
                "/dev/zero",
                "",
                "a\x00b",
                "x" * 300,
                ".",
                "m.onnx",  # the model file itself: inside the folder, garbage weights
                "missing.bin",
                "sub",
                "./m.onnx.data",
                "link.bin",
                "dirlink/m.onnx.data",
                "fifo",
                "~/x",
                "C:\\x",
                "sub//../m.onnx.data",
            ]
        )
        loc.value = loc.value.replace("{root}", "/nonexistent-bnfold-root")
        if "link.bin" in loc.value:
            case.links["in/link.bin"] = "../outside.bin"
        if "dirlink" in loc.value:
            case.links["in/dirlink"] = "{root}"  # a folder link pointing out of in/
        if loc.value == "sub":
            case.dirs = ("in/sub",)
        if loc.value == "fifo":
            case.fifos = ("in/fifo",)
    elif kind == 2:
        off = _entry(t, "offset")
        assert off is not None
        off.value = rng.choice(["abc", "-1", "1e3", "", "99999999999", "0x10", " 4", "4.0"])
    elif kind == 3:
        length = _entry(t, "length")
        assert length is not None
        length.value = rng.choice(["abc", "-4", "0", "99999999999", "1", "", str(2**64)])
    elif kind == 4:
        files[DATA] = blob[: rng.randrange(max(1, len(blob)))]
    elif kind == 5:
        del files[DATA]
        choice = rng.randrange(3)
        if choice == 0:
            case.dirs = (DATA,)
        elif choice == 1:
            case.fifos = (DATA,)
        else:
            case.links[DATA] = "../outside.bin"  # data file itself a symlink out
    elif kind == 6:
        e = t.external_data.add()
        e.key, e.value = rng.choice([("checksum", "bogus"), ("bogus", "1"), ("location", "x")])
    elif kind == 7:  # inconsistent: external entries but DEFAULT location, or data also inline
        if rng.random() < 0.5:
            t.data_location = onnx.TensorProto.DEFAULT
        else:
            t.raw_data = b"\0" * 8
    elif kind == 8:
        for key in ("offset", "length"):
            entry = _entry(t, key)
            if entry is not None and rng.random() < 0.7:
                t.external_data.remove(entry)
    else:
        files[DATA] = bytes(rng.randrange(256) for _ in range(len(blob)))  # garbage weights
    files[MODEL] = _bytes(proto)
    return case


# --------------------------------------------------------------------------------------------
# the corpus
# --------------------------------------------------------------------------------------------

FAMILIES = (*PROTO_FAMILIES, "bytes", "external")
# CLI options drawn for a case; --max-size only with a limit some cases are over.
OPTION_SETS: tuple[tuple[str, ...], ...] = (
    (),
    (),
    (),
    ("--no-forward",),
    ("--no-affine",),
    ("--external-data",),
    ("--max-size", "1K"),
    ("--max-size", "1M"),
)


def make_case(family: str, seed: str, index: int) -> Case:
    """Case ``index`` of ``family`` on seed model ``seed`` (deterministic)."""
    rng = random.Random(f"{family}:{seed}:{index}")
    name = f"{family}/{seed}/{index}"
    model = seed_model(seed)
    options = rng.choice(OPTION_SETS)
    if family == "external":
        case = external_case(name, model, rng)
        case.options = options
        return case
    if family == "bytes":
        data = mutate_bytes(_bytes(model), rng)
    else:
        mutators = PROTO_FAMILIES[family]
        for _ in range(1 if rng.random() < 0.8 else 2):
            try:
                rng.choice(mutators)(model, rng)
            except Exception:  # a second mutator may not apply after the first
                continue
        data = _bytes(model)
    return Case(name, {MODEL: data}, options=options)


def corpus(per_family: dict[str, int], seeds: list[str] | None = None) -> list[Case]:
    """``per_family[f]`` cases of each family, cycling over ``seeds`` (default: the synthetic)."""
    names = seeds or list(SYNTHETIC)
    return [
        make_case(family, names[i % len(names)], i)
        for family, count in per_family.items()
        for i in range(count)
    ]
