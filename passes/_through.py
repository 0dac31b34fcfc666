"""Rules for moving a per-channel affine map backward through channel-preserving ops.

fold_bn folds ``y = s * x + t`` (per channel ``c`` of axis 1) into the linear op that produces
``x``. When ``x`` comes from one of the ops below instead, the map can move to the op's inputs
first, exactly, and then fold into *their* producers:

- ``Concat`` on the channel axis: channel ``c`` of the output is channel ``c - o_i`` of input
  ``i`` (``o_i`` = channels of the inputs before it), so the map on the output is, per input, the
  slice ``s[o_i : o_i + C_i]``, ``t[o_i : o_i + C_i]``::

      s * concat(x_1, ..., x_n) + t  ==  concat(s_1 * x_1 + t_1, ..., s_n * x_n + t_n)

  A concat on any other axis mixes nothing per channel but puts several channels' maps on one
  slice; it is declined.
- ``MaxPool``, when every ``s > 0``: a positive scale and a shift are monotonic, so they commute
  with taking the maximum over any window (padding included: max pooling pads with -inf, which
  the map leaves at -inf)::

      max_k (s * x_k + t)  ==  s * max_k x_k + t        (s > 0)

  A negative scale turns the max into a min; a zero scale is declined with it (the rule is kept
  to the case the proof needs). The ``Indices`` output must be unused.
- ``AveragePool`` / ``GlobalAveragePool``: an average of ``s * x_k + t`` over ``n`` elements is
  ``s * avg(x) + t`` whenever ``n`` counts only real elements. Declined when padding (explicit,
  ``auto_pad`` SAME, or a ``ceil_mode`` window past the edge) is counted
  (``count_include_pad=1``): a padded zero stands where ``t`` would have been.
- ``Resize`` / ``Upsample`` in ``nearest`` mode: every output element is a copy of one input
  element of the same channel, so any per-channel map commutes with it. Declined: other modes
  (they mix neighbours: still exact for an affine map only when the weights sum to one, which
  ``cubic`` does not guarantee at borders), ``tf_crop_and_resize`` (its extrapolation value is
  not mapped), and a resize that changes the channel axis.

Every op here must feed only the map (its output single-use), otherwise moving the map would
change what its other consumers see. ``split`` returns, per input of the op, the value and the
slice of ``(s, t)`` that now applies to it; it changes nothing in the graph.

**Forward**, the same identities read the other way move a map from an op's input to its output
(``op(s * x + t) == s * op(x) + t``), so fold_bn's forward fold walks through the one-input ops
above (``FORWARD_OPS``: the pools and nearest resizes, with the same preconditions) to the
Conv / Gemm / MatMul behind them. A ``Concat`` is not walked forward: the map would cover only
one input's slice of its output. Forward only, a ``Flatten`` or ``Reshape`` that turns
``(N, C, d_1..d_k)`` into ``(N, C * D)``, ``D = d_1 * ... * d_k``, keeps the row-major order, so
channel ``c`` becomes the features ``c * D .. (c + 1) * D - 1``::

    flatten(s * x + t)  ==  s' * flatten(x) + t',    s' = repeat(s, D),  t' = repeat(t, D)

a per-feature map on axis 1 of the rank-2 result, which folds into a Gemm / MatMul reading it
(``flatten_map``). Preconditions: the input's ``C, d_1..d_k`` are known numbers; ``Flatten`` has
``axis == 1``; a ``Reshape``'s target is a constant of two entries that keeps the batch axis
(``0``, ``-1`` with the features given, or the input's own static batch size) and resolves its
second entry to ``C * D`` (``allowzero=1`` with a ``0`` in the target is declined). Any other
target moves channels across rows or reorders them, and is declined with the target in the
reason.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bnfold.passes._util import Declined, const_array, is_onnx_op

_Part = tuple[ir.Value, np.ndarray, np.ndarray]  # an input of the op and its slice (s, t)
THROUGH_OPS = ("Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "Resize", "Upsample")
FORWARD_OPS = THROUGH_OPS[1:]  # the one-input ops: a map on a Concat's input is not per channel
FLATTEN_OPS = ("Flatten", "Reshape")


def _channels(value: ir.Value) -> int:
    dim = value.shape[1] if value.shape is not None and len(value.shape) > 1 else None
    if not isinstance(dim, int):
        raise Declined(f"channel count of {value.name} is unknown")
    return dim


def _split_concat(node: ir.Node, s: np.ndarray, t: np.ndarray, rank: int) -> list[_Part]:
    axis = node.attributes.get_int("axis", 1)
    if (axis if axis >= 0 else axis + rank) != 1:
        raise Declined(f"Concat on axis {axis}, not the channel axis 1")
    parts, offset = [], 0
    for value in node.inputs:
        if value is None:
            raise Declined("Concat has an empty input")
        count = _channels(value)
        parts.append((value, s[offset : offset + count], t[offset : offset + count]))
        offset += count
    if offset != s.shape[0]:
        raise Declined(f"Concat inputs have {offset} channels, the map {s.shape[0]}")
    return parts


def _split_maxpool(node: ir.Node, s: np.ndarray, t: np.ndarray, rank: int) -> list[_Part]:
    if (
        len(node.outputs) > 1
        and node.outputs[1] is not None
        and (node.outputs[1].uses() or node.outputs[1].is_graph_output())
    ):
        raise Declined("MaxPool Indices output is used")
    if not np.all(s > 0):
        raise Declined("MaxPool: a scale is not positive (max does not commute with it)")
    return [(node.inputs[0], s, t)]


def _split_resize(node: ir.Node, s: np.ndarray, t: np.ndarray, rank: int) -> list[_Part]:
    mode = node.attributes.get_string("mode", "nearest")
    if mode != "nearest":
        raise Declined(f"{node.op_type} mode {mode!r} is not nearest")
    ctm = node.attributes.get_string("coordinate_transformation_mode", "half_pixel")
    if ctm == "tf_crop_and_resize":
        raise Declined(f"{node.op_type} tf_crop_and_resize extrapolates a constant")
    x, y = node.inputs[0], node.outputs[0]
    if x is None or _channels(x) != _channels(y):
        raise Declined(f"{node.op_type} changes the channel count")
    return [(x, s, t)]


def _split_avgpool(node: ir.Node, s: np.ndarray, t: np.ndarray, rank: int) -> list[_Part]:
    if node.op_type == "AveragePool" and node.attributes.get_int("count_include_pad", 0):
        padded = (
            any(node.attributes.get_ints("pads", []))
            or node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID")
            or node.attributes.get_int("ceil_mode", 0)
        )
        if padded and np.any(t):
            raise Declined("AveragePool counts padding (count_include_pad=1) and the shift != 0")
    return [(node.inputs[0], s, t)]


_RULES = {
    "Concat": _split_concat,
    "MaxPool": _split_maxpool,
    "AveragePool": _split_avgpool,
    "GlobalAveragePool": _split_avgpool,
    "Resize": _split_resize,
    "Upsample": _split_resize,
}


def split(node: ir.Node, s: np.ndarray, t: np.ndarray, rank: int) -> list[_Part]:
    """The map ``(s, t)`` on channel axis 1 of ``node``'s output, moved onto its inputs.

    Returns ``(input value, scale, shift)`` per data input of ``node``; raises Declined with the
    reason when the map does not commute with ``node``.
    """
    if not is_onnx_op(node, *THROUGH_OPS):
        raise Declined(f"{node.op_type} is not an op a map moves through")
    return _RULES[node.op_type](node, s, t, rank)


def _static_dims(value: ir.Value, what: str) -> tuple[int, ...]:
    """``value``'s shape, every axis after the batch axis a known number."""
    dims = tuple(value.shape) if value.shape is not None else None
    if dims is None or len(dims) < 2 or not all(isinstance(d, int) for d in dims[1:]):
        raise Declined(f"{what} input shape is not (N, C, ...) with C and the rest known")
    return dims


def _reshape_keeps_rows(node: ir.Node, dims: tuple[int, ...], features: int) -> None:
    """Decline unless ``node`` (a Reshape of a ``dims`` value) gives ``(N, features)``."""
    target = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if target is None:
        raise Declined("Reshape target shape is not a constant")
    target = [int(d) for d in np.asarray(target).reshape(-1)]
    if node.attributes.get_int("allowzero", 0) and 0 in target:
        raise Declined(f"Reshape target {target} has a 0 with allowzero=1")
    if len(target) != 2:
        raise Declined(f"Reshape target {target} is not (batch, C*H*W)")
    head, tail = target
    # The second entry as a number: 0 copies the input's channel count, -1 is inferred.
    second = {0: dims[1], -1: features}.get(tail, tail)
    keeps_batch = head == 0 or (head == -1 and tail != -1) or (head > 0 and head == dims[0])
    if not keeps_batch or second != features:
        raise Declined(
            f"Reshape target {target} does not keep the batch axis and flatten C*H*W={features} "
            "in order"
        )


def flatten_map(node: ir.Node, s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel map ``(s, t)`` on ``node``'s input as a per-feature map on its output.

    ``node`` is a Flatten or Reshape (see the module docstring); raises Declined with the reason
    when it does not keep the batch axis and the channel-major feature order.
    """
    if not is_onnx_op(node, *FLATTEN_OPS):
        raise Declined(f"{node.op_type} is not Flatten/Reshape")
    dims = _static_dims(node.inputs[0], node.op_type)
    if dims[1] != s.shape[0]:
        raise Declined(f"{node.op_type} input has {dims[1]} channels, the map {s.shape[0]}")
    per_channel = int(np.prod(dims[2:], dtype=np.int64))
    if node.op_type == "Flatten":
        axis = node.attributes.get_int("axis", 1)
        if (axis if axis >= 0 else axis + len(dims)) != 1:
            raise Declined(f"Flatten axis {axis} is not 1 (the batch axis would not be kept)")
    else:
        _reshape_keeps_rows(node, dims, dims[1] * per_channel)
    return np.repeat(s, per_channel), np.repeat(t, per_channel)
