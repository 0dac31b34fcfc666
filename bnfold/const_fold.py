"""Fold everything that depends only on constants, before TVM's importer sees the graph.

TVM's Relax importer needs some inputs to be constants: Pad's ``pads``, Reshape's and Expand's
shape, Resize's scales and sizes, Slice's starts/ends/axes/steps, Tile's repeats, ... Exporters
often compute them with small subgraphs of constants; torch's TorchScript exporter writes
``F.pad`` as ``ConstantOfShape -> Concat -> Reshape -> Slice -> Transpose -> Reshape -> Cast ->
Pad``. Two well-kept evaluators fold them here, nothing home-made:

1. onnxscript's constant folder (``onnxscript.optimizer.fold_constants``, with ONNX shape
   inference, so shape arithmetic on frozen input shapes folds too). By default it keeps every
   ``ConstantOfShape`` ("to avoid increasing model size"), and so everything downstream of one,
   which is why torch's pad amounts survived it: here a ``ConstantOfShape`` of at most
   :data:`SMALL` elements is folded. It keeps Quantize/DequantizeLinear (the int8 lowering
   reads them), and it skips nodes with several outputs (``Split``).
2. onnxruntime, for what the first leaves: the *constant cone* (nodes whose inputs are all
   constants of at most :data:`SMALL` elements, or outputs of such nodes, and whose outputs
   have a static shape of at most :data:`SMALL` elements; Quantize/Dequantize, random and
   control-flow nodes excluded) is run once as a model of its own, with graph optimizations
   off, and each cone value that the rest of the graph reads becomes an initializer.

Larger constant results stay computed in the graph: they are data (a zero tensor, a transposed
weight), which TVM handles, not the shape-like operands that it needs as constants.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass

from bnfold.captured_output import captured
from bnfold.passes._util import ONNX_DOMAINS, is_onnx_op

logger = logging.getLogger(__name__)

# Shape-like operands have a handful of elements; onnxscript's own input limit is this size.
SMALL = 8192
KEPT_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
RANDOM_OPS = ("RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike",
              "Multinomial", "Bernoulli")  # fmt: skip
_FOLDER_LOGGER = "onnxscript.optimizer"


def _small_constant_of_shape(node: ir.Node) -> bool | None:
    """onnxscript's ``should_fold``: True for a ConstantOfShape of at most SMALL elements,
    None (the folder's default rules) for every other node."""
    if not is_onnx_op(node, "ConstantOfShape") or not node.inputs or node.inputs[0] is None:
        return None
    shape = node.inputs[0].const_value
    if shape is None:
        return None
    return math.prod(int(d) for d in shape.numpy().reshape(-1)) <= SMALL or None


@contextmanager
def _folder_quiet() -> Iterator[None]:
    """onnxscript's folder warns (on the root handler: stderr) about what it skips; that is
    not the user's problem, so its records go to DEBUG level unless bnfold logs at DEBUG."""
    folder = logging.getLogger(_FOLDER_LOGGER)
    before = folder.level
    if not logger.isEnabledFor(logging.DEBUG):
        folder.setLevel(logging.ERROR)
    try:
        yield
    finally:
        folder.setLevel(before)


def _constant(value: ir.Value | None, cone: set[ir.Value]) -> bool:
    if value is None or value in cone:
        return True
    if value.is_graph_input() or not value.is_initializer() or value.const_value is None:
        return False
    return value.const_value.size <= SMALL


def _in_cone(node: ir.Node, cone: set[ir.Value]) -> bool:
    if node.domain not in ONNX_DOMAINS or node.op_type in (*KEPT_OPS, *RANDOM_OPS):
        return False
    graph_attrs = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
    if any(a.type in graph_attrs for a in node.attributes.values()):
        return False
    # Outputs of a known, small size only: evaluating a large constant (a zero tensor of
    # gigabytes) would cost its memory for a value that is then left in the graph anyway.
    for v in node.outputs:
        if v.shape is None or not v.shape.is_static() or math.prod(v.shape.numpy()) > SMALL:
            return False
    return all(_constant(v, cone) for v in node.inputs)


def fold_cone_with_onnxruntime(model: ir.Model) -> int:
    """Evaluate the main graph's constant cone in onnxruntime (see the module docstring) and
    replace the values the rest of the graph reads by initializers; returns how many.

    Where onnxruntime cannot run the cone, nothing changes (TVM's importer then names the op).
    """
    from bnfold import check
    from bnfold.errors import BnfoldError

    graph = model.graph
    cone: set[ir.Value] = set()
    nodes: list[ir.Node] = []
    for node in graph:
        if _in_cone(node, cone):
            nodes.append(node)
            cone.update(node.outputs)
    # The values the rest of the graph reads; graph outputs keep their producer (a model's
    # output stays an output of a node).
    wanted = [
        v for v in cone
        if not v.is_graph_output() and any(u.node not in nodes for u in v.uses())
    ]  # fmt: skip
    if not wanted:
        return 0
    wanted.sort(key=lambda v: v.name or "")
    inits = {v.name: v for n in nodes for v in n.inputs if v is not None and v not in cone}
    proto = onnx.helper.make_model(
        onnx.helper.make_graph(
            [ir.serde.serialize_node(n) for n in nodes],
            "constant_cone",
            [],
            [onnx.helper.make_empty_tensor_value_info(v.name) for v in wanted],
            [ir.serde.serialize_tensor(v.const_value) for v in inits.values()],
        ),
        opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()],
        ir_version=model.ir_version,
    )
    for t, name in zip(proto.graph.initializer, inits, strict=True):
        t.name = name
    # A cone that onnxruntime refuses makes it log on file descriptor 2: that goes to DEBUG.
    with captured() as out:
        try:
            results = check.run_onnxruntime(proto, {})
        except BnfoldError as e:
            results = None
            logger.debug("constant cone of %d nodes not folded: %s", len(nodes), e)
    for line in out.lines():
        logger.debug("onnxruntime: %s", line)
    if results is None:
        return 0
    for v in wanted:
        array = results[v.name]
        const = ir.Value(
            name=v.name, shape=ir.Shape(array.shape),
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            const_value=ir.tensor(array, name=v.name),
        )  # fmt: skip
        v.name = None  # the initializer takes over the name the consumers know it by
        ir.convenience.replace_all_uses_with(v, const)
        graph.register_initializer(const)
    logger.debug("onnxruntime folded %d values of a %d-node constant cone", len(wanted), len(nodes))
    return len(wanted)


def fold_constants(model: ir.Model) -> int:
    """Fold, in place, every small value of ``model`` that depends only on constants (and on
    the static input shapes it has); Constant nodes become initializers. Returns the number of
    values onnxruntime folded after onnxscript (0 when onnxscript folded everything)."""
    from onnxscript import optimizer

    with _folder_quiet():
        optimizer.fold_constants(
            model, onnx_shape_inference=True, should_fold=_small_constant_of_shape
        )
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    folded = fold_cone_with_onnxruntime(model)
    RemoveUnusedNodesPass()(model)
    return folded
