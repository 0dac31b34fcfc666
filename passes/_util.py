"""Helpers shared by bnfold's passes: constants, naming, and what a pass reports."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import onnx_ir as ir

ONNX_DOMAINS = ("", "ai.onnx")
FP16_MAX = float(np.finfo(np.float16).max)
_NP_DTYPES = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.DOUBLE: np.float64,
}


@dataclasses.dataclass
class Record:
    """One thing a pass did or declined to do, for the fold report.

    Attributes:
        node: The node's label (its name, or ``op:first-output`` when unnamed).
        op: Its op type.
        action: What happened: ``folded``, ``affine`` (rewritten as Mul+Add), ``kept``,
            ``lifted``, ``removed``...
        direction: ``backward`` (into the producer) or ``forward`` (into the consumers).
        into: Labels of the nodes that absorbed it.
        reason: Why it was not folded (declines, and BNs that became Mul+Add).
        detail: What was merged, for passes that merge several nodes (merge_branches).
    """

    node: str
    op: str
    action: str
    direction: str | None = None
    into: list[str] = dataclasses.field(default_factory=list)
    reason: str | None = None
    detail: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class BnfoldPassResult(ir.passes.PassResult):
    """A PassResult that also says what the pass changed and what it declined, and why."""

    changed: list[Record] = dataclasses.field(default_factory=list)
    declined: list[Record] = dataclasses.field(default_factory=list)


class Declined(Exception):
    """Raised inside a pass's "does it apply" step; the message is the reason for the report."""


def is_onnx_op(node: ir.Node, *op_types: str) -> bool:
    return node.domain in ONNX_DOMAINS and node.op_type in op_types


def label(node: ir.Node) -> str:
    """A stable, readable name for a node (exporters often leave node names empty)."""
    if node.name:
        return node.name
    first = node.outputs[0].name if node.outputs else "?"
    return f"{node.op_type}:{first}"


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant contents, or None if it is not a plain initializer.

    Graph inputs are never constant: a user may feed them at run time.
    """
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    if not value.is_initializer():
        return None
    try:
        return value.const_value.numpy()
    except Exception:
        return None


def np_dtype(dtype: ir.DataType | None) -> type[np.floating] | None:
    """numpy dtype for a foldable element type, else None."""
    return _NP_DTYPES.get(dtype) if dtype is not None else None


def cast_checked(array: np.ndarray, dtype: ir.DataType, what: str) -> np.ndarray:
    """Cast float64 results to the model dtype, refusing values that become Inf/NaN."""
    npdt = np_dtype(dtype)
    if npdt is None:
        raise Declined(f"dtype {dtype.name if dtype else '?'} cannot be folded")
    if not np.all(np.isfinite(array)):
        raise Declined(f"folded {what} would not be finite")
    if npdt is np.float16 and np.max(np.abs(array), initial=0.0) > FP16_MAX:
        raise Declined(f"folded {what} would overflow float16")
    return array.astype(npdt)


def single_use(value: ir.Value) -> bool:
    """True when one node consumes ``value`` and it is not a graph output."""
    return len(value.uses()) == 1 and not value.is_graph_output()


class Namer:
    """Hands out node and value names that do not clash with any in the graph (deterministic)."""

    def __init__(self, graph: ir.Graph) -> None:
        self._taken: set[str] = set()
        for node in ir.traversal.RecursiveGraphIterator(graph):
            if node.name:
                self._taken.add(node.name)
            self._taken.update(v.name for v in node.outputs if v.name)
            self._taken.update(v.name for v in node.inputs if v is not None and v.name)
        self._taken.update(v.name for v in graph.inputs if v.name)
        self._taken.update(graph.initializers.keys())

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self._taken:
            name = f"{base}_{i}"
            i += 1
        self._taken.add(name)
        return name


def new_initializer(graph: ir.Graph, namer: Namer, base: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer named after ``base``."""
    name = namer(base)
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def set_constant_input(
    graph: ir.Graph, namer: Namer, node: ir.Node, index: int, array: np.ndarray, base: str
) -> None:
    """Make input ``index`` of ``node`` the constant ``array``.

    The old initializer is rewritten in place only when this node is its single user and its
    shape stays the same; otherwise a new initializer is made, so a weight shared with another
    node is never changed under it. (Unused ones are dropped by cleanup.)
    """
    old = node.inputs[index] if index < len(node.inputs) else None
    if (
        old is not None
        and old.is_initializer()
        and not old.is_graph_input()
        and not old.is_graph_output()
        and len(old.uses()) == 1
        and old.const_value is not None
        and tuple(old.const_value.shape) == array.shape
    ):
        old.const_value = ir.tensor(array, name=old.name)
        return
    value = new_initializer(graph, namer, base, array)
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)


# Which original tensor each rewritten tensor now computes, for `bnfold verify --per-layer`:
# candidate name -> reference name, or None where a tensor keeps its name but not its meaning
# (a conv whose weights absorbed a BN that now lives under another name).
TENSOR_MAP = "bnfold.tensor_map"


def tensor_map(graph: ir.Graph) -> dict[str, str | None]:
    """The graph's tensor map (kept in ``graph.meta`` while passes run)."""
    return graph.meta.setdefault(TENSOR_MAP, {})


def note_replaced(graph: ir.Graph, old: str, new: str) -> None:
    """``new`` now computes what ``old`` computed (``old`` is gone)."""
    m = tensor_map(graph)
    m[new] = m.pop(old, old)


def note_changed(graph: ir.Graph, name: str) -> None:
    """``name`` keeps its name but computes something the original model has no tensor for."""
    tensor_map(graph)[name] = None


def parse_tensor_map(text: str) -> dict[str, str | None]:
    """A saved tensor map (``bnfold.tensor_map`` metadata); malformed text or entries, which
    only a hand-edited model has, are dropped: names then pair as they are."""
    try:
        saved = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(saved, dict):
        return {}
    return {k: v for k, v in saved.items() if isinstance(v, str | None)}


def read_tensor_map(model: ir.Model) -> dict[str, str | None]:
    """The graph's tensor map, seeded from the model's metadata when an earlier run wrote it
    there (a folded model read back from its file): later rewrites then extend its chains."""
    m = tensor_map(model.graph)
    if not m and TENSOR_MAP in model.metadata_props:
        m.update(parse_tensor_map(model.metadata_props[TENSOR_MAP]))
    return m


def write_tensor_map(model: ir.Model) -> None:
    """Save the graph's tensor map in the model's metadata (``bnfold.tensor_map``), where
    ``bnfold verify --per-layer`` reads it."""
    tmap = {k: v for k, v in tensor_map(model.graph).items() if k != v}
    if tmap:
        model.metadata_props[TENSOR_MAP] = json.dumps(tmap, sort_keys=True)
