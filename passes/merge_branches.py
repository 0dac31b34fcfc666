"""merge_branches: an Add of parallel convolutions of one tensor becomes one convolution.

Structural re-parameterization (RepVGG, ACNet, Diverse Branch Block, MobileOne at inference):
after fold_bn, a block computes

    y = sum_i Conv_i(x) + sum_j (s_j * x + t_j)   [+ x]

where every ``Conv_i`` reads the same ``x`` with the same strides, dilations and groups, and the
identity branches are ``x`` itself or a per-channel affine map of it (a lone BN that fold_bn
turned into Mul+Add, or the BN itself). A convolution is linear in its weight, so the sum is one
convolution whose kernel is the sum of the branches' kernels, once they are laid on one grid:

- **Windows.** Along a spatial axis, output ``o`` of branch ``i`` reads input positions
  ``o*stride + a_i + d*k`` for ``k < K_i``, with ``a_i = -pad_begin_i`` (``d`` = dilation). The
  merged kernel spans ``[min a_i, max b_i]`` (``b_i = a_i + d*(K_i - 1)``), so it has
  ``K = (max b_i - min a_i)/d + 1`` taps and ``pad_begin = -min a_i``; branch ``i``'s kernel
  sits at tap offset ``(a_i - min a_i)/d`` (must be an integer: declined otherwise), the other
  taps are zero. A 1x1 with pad 0 lands in the centre of a 3x3 with pad 1; a 1x1 with pad 1
  does not overlay a 3x3 with pad 1 at all.
- **Output size.** Each branch has ``floor((L - 1 + pad_end_i - b_i)/stride) + 1`` outputs; the
  merge needs ``pad_end_i - b_i`` equal for every branch (then every branch has the same size at
  any ``L``) and sets ``pad_end = pad_end_i - b_i + max b``. Zero padding added beyond a branch's
  own only meets that branch's zero taps, so the sum is unchanged.
- **Identity** ``s * x + t`` (``s = 1, t = 0`` for ``x`` itself) is a kernel with one tap at
  window offset 0: ``W[m, m mod C/g, centre] = s[m]``, bias ``t``. It needs ``M == C`` output and
  input channels (then output channel ``m`` of a grouped conv reads input channel ``m`` at local
  index ``m mod C/g``, for any group count) and stride 1.
- Weights and biases are summed in float64 and cast back with fold_bn's overflow checks.

**Sequences** ``Conv1x1(x) -> ConvKxK`` (nothing in between) are merged first, so that such a
branch (Diverse Branch Block's 1x1-KxK) joins the sum as one KxK conv::

    W[o, c, k] = sum_m W2[o, m, k] W1[m, c],    b[o] = b2[o] + sum_{m, k} W2[o, m, k] b1[m]

exact when the 1x1 has stride 1, no padding and group 1, the KxK has group 1, and the KxK pads
nothing or the 1x1 adds no bias (the KxK pads the 1x1's output with zeros, where a merged conv
would see ``b1``). Declined also when the merged conv costs more multiply-adds than the two
(``O C K > M C + O M K``: a 1x1 that narrows the channels is cheaper kept).

Preconditions (each one that fails is a decline with its reason): at least two branches of one
tensor ``x``, one of them a Conv with constant weight (and bias); every branch's output (and every
inner Add's) feeds only the sum; equal strides, dilations, groups, kernel rank and channel
counts; explicit pads (``auto_pad`` NOTSET or VALID); windows that align as above. Terms of the
sum that are not branches of ``x`` stay: they are added to the merged conv's output. The merged
conv takes the place of the branch conv with the largest kernel; graph outputs keep their names.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from bnfold.passes._util import (
    BnfoldPassResult,
    Declined,
    Namer,
    Record,
    const_array,
    is_onnx_op,
    label,
    note_changed,
    np_dtype,
    set_constant_input,
    single_use,
)

# fold_bn's per-channel maps, weight shape checks, checked cast (overflow, float16 range,
# headroom: merged weights meet the same bar as folded ones) and output-name-keeping replace.
from bnfold.passes.fold_bn import Affine, _check_shapes, affine_of
from bnfold.passes.fold_bn import _cast as cast_checked_folded
from bnfold.passes.fold_bn import _replace_value as replace_value

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Branch:
    """One term of the sum, read from ``source``.

    A conv branch has ``conv`` (and its float64 ``weight``/``bias``); an identity branch has
    ``affine`` (fold_bn's per-channel map of ``x``) or None for ``x`` itself. ``nodes`` compute
    the term and go away after the merge.
    """

    source: ir.Value
    nodes: list[ir.Node]
    conv: ir.Node | None = None
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    affine: Affine | None = None

    def describe(self) -> str:
        if self.conv is not None:
            return "conv " + "x".join(map(str, self.weight.shape[2:]))
        if self.affine is None:
            return "identity"
        return "identity (" + "+".join(n.op_type for n in self.nodes) + ")"


def _flatten(add: ir.Node) -> tuple[list[ir.Node], list[ir.Value]]:
    """The Adds of a sum tree rooted at ``add`` and its terms (Adds of two non-constant values
    whose output feeds only the next Add are part of the tree)."""
    adds, terms = [add], []
    stack = list(reversed(add.inputs))
    while stack:
        v = stack.pop()
        p = v.producer()
        if (
            p is not None
            and is_onnx_op(p, "Add")
            and single_use(v)
            and all(i is not None and const_array(i) is None for i in p.inputs)
        ):
            adds.append(p)
            stack += reversed(p.inputs)
        else:
            terms.append(v)
    return adds, terms


def _conv_branch(v: ir.Value) -> Branch | None:
    p = v.producer()
    if p is None or not is_onnx_op(p, "Conv") or len(p.inputs) < 2:
        return None
    w = const_array(p.inputs[1])
    b_value = p.inputs[2] if len(p.inputs) > 2 else None
    b = const_array(b_value)
    if w is None or (b_value is not None and b is None) or p.inputs[0] is None:
        return None
    try:
        _check_shapes(p, w, b)
    except Declined:
        return None  # a weight the op cannot have: onnxruntime refuses the model anyway
    return Branch(
        p.inputs[0],
        [p],
        conv=p,
        weight=np.asarray(w, np.float64),
        bias=None if b is None else np.asarray(b, np.float64),
    )


def _affine_branch(v: ir.Value) -> Branch | None:
    """``v`` as ``s * x + t`` of some ``x`` through one or two per-channel affine nodes."""
    p = v.producer()
    if p is None:
        return None
    try:
        aff = affine_of(p)
    except Declined:
        return None
    nodes = [p]
    inner = aff.x.producer()
    if inner is not None and single_use(aff.x):
        # Mul(s) -> Add(t), as fold_bn writes a lone BN: compose into one map.
        try:
            first = affine_of(inner)
        except Declined:
            first = None
        if first is not None and (None in (first.axis, aff.axis) or first.axis == aff.axis):
            nodes.insert(0, inner)
            aff = dataclasses.replace(
                aff,
                x=first.x,
                scale=first.scale * aff.scale,
                shift=first.shift * aff.scale + aff.shift,
                axis=aff.axis if aff.axis is not None else first.axis,
                ndim=max(aff.ndim, first.ndim),
            )
    return Branch(aff.x, nodes, affine=aff)


def _branches(terms: list[ir.Value]) -> tuple[ir.Value | None, list[Branch], list[ir.Value]]:
    """Pick the tensor that most terms are branches of (a conv input); return it, its branches
    and the other terms."""
    convs = [_conv_branch(t) for t in terms]
    best: tuple[ir.Value | None, list[Branch], list[ir.Value]] = (None, [], terms)
    for x in dict.fromkeys(b.source for b in convs if b is not None):
        branches, others = [], []
        for t, conv in zip(terms, convs, strict=True):
            if conv is not None and conv.source is x:
                branches.append(conv)
            elif t is x:
                branches.append(Branch(x, []))
            else:
                found = _affine_branch(t)
                if found is not None and found.source is x:
                    branches.append(found)
                else:
                    others.append(t)
        if len(branches) > len(best[1]):
            best = (x, branches, others)
    return best


def _ints(node: ir.Node, name: str, default: list[int]) -> list[int]:
    return list(node.attributes.get_ints(name, default))


def _geometry(convs: list[ir.Node], spatial: int) -> tuple[list[int], list[int], int]:
    """Strides, dilations and group shared by ``convs``; declines any mismatch or auto_pad SAME."""
    first = convs[0]
    strides = _ints(first, "strides", [1] * spatial)
    dilations = _ints(first, "dilations", [1] * spatial)
    group = first.attributes.get_int("group", 1)
    for c in convs:
        pads = _pads(c, spatial)
        if len(pads) != 2 * spatial or any(p < 0 for p in pads):
            raise Declined(f"{label(c)} pads {pads} do not fit {spatial} spatial axes")
        if c.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise Declined(f"{label(c)} uses auto_pad SAME (pads depend on the input size)")
        if _ints(c, "strides", [1] * spatial) != strides:
            raise Declined(f"strides differ ({label(c)})")
        if _ints(c, "dilations", [1] * spatial) != dilations:
            raise Declined(f"dilations differ ({label(c)})")
        if c.attributes.get_int("group", 1) != group:
            raise Declined(f"groups differ ({label(c)})")
    if len(strides) != spatial or len(dilations) != spatial or min(strides + dilations) < 1:
        raise Declined(f"strides {strides} / dilations {dilations} do not fit the kernel")
    return strides, dilations, group


def _pads(c: ir.Node, spatial: int) -> list[int]:
    if c.attributes.get_string("auto_pad", "NOTSET") == "VALID":
        return [0] * (2 * spatial)
    return _ints(c, "pads", [0] * (2 * spatial))


@dataclasses.dataclass
class Merge:
    """The merged conv: where it goes and what it holds (computed before the graph changes)."""

    main: ir.Node
    weight: np.ndarray
    bias: np.ndarray | None
    kernel: list[int]
    pads: list[int]


def plan(branches: list[Branch], x: ir.Value) -> Merge:
    """Check the branches against the module's preconditions and compute the merged conv."""
    convs = [b for b in branches if b.conv is not None]
    if len({b.weight.ndim for b in convs}) > 1:
        raise Declined("branch convs differ in kernel rank")
    spatial = convs[0].weight.ndim - 2
    strides, dilations, group = _geometry([b.conv for b in convs], spatial)
    shapes = {b.weight.shape[:2] for b in convs}
    if len(shapes) > 1:
        raise Declined(f"branch convs differ in channels: weights {sorted(shapes)}")
    dtypes = {b.conv.outputs[0].dtype for b in convs}
    if len(dtypes) > 1 or np_dtype(next(iter(dtypes))) is None:
        raise Declined("branch dtypes differ or cannot be merged")
    m, c_per_g = convs[0].weight.shape[:2]
    c_in = c_per_g * group
    windows = []  # per branch: (a, b, pad_end) per axis, in input positions
    for b in branches:
        if b.conv is None:
            if any(s != 1 for s in strides):
                raise Declined("identity branch with a strided conv")
            if m != c_in:
                raise Declined(f"identity branch but the convs map {c_in} channels to {m}")
            windows.append([(0, 0, 0)] * spatial)
            continue
        pads = _pads(b.conv, spatial)
        k = b.weight.shape[2:]
        windows.append(
            [
                (-pads[d], -pads[d] + dilations[d] * (k[d] - 1), pads[spatial + d])
                for d in range(spatial)
            ]
        )
    start = [min(w[d][0] for w in windows) for d in range(spatial)]
    end = [max(w[d][1] for w in windows) for d in range(spatial)]
    for d in range(spatial):
        if len({w[d][2] - w[d][1] for w in windows}) > 1:
            raise Declined(f"branch windows do not align on spatial axis {d} (output sizes differ)")
        if any((w[d][0] - start[d]) % dilations[d] for w in windows):
            raise Declined(f"branch offsets on axis {d} are not multiples of the dilation")
    kernel = [(end[d] - start[d]) // dilations[d] + 1 for d in range(spatial)]
    pad_end = [windows[0][d][2] - windows[0][d][1] + end[d] for d in range(spatial)]
    weight = np.zeros((m, c_per_g, *kernel))
    bias = np.zeros(m)
    has_bias = False
    for b, win in zip(branches, windows, strict=True):
        off = [(win[d][0] - start[d]) // dilations[d] for d in range(spatial)]
        if b.conv is not None:
            region = tuple(slice(o, o + k) for o, k in zip(off, b.weight.shape[2:], strict=True))
            weight[(slice(None), slice(None), *region)] += b.weight
            if b.bias is not None:
                bias += b.bias
                has_bias = True
            continue
        s, t = np.ones(m), np.zeros(m)
        if b.affine is not None:
            s, t = b.affine.channels(len(x.shape) if x.shape is not None else None, 1, m)
        idx = np.arange(m)
        weight[(idx, idx % c_per_g, *off)] += s
        if np.any(t):
            bias += t
            has_bias = True
    main = max(convs, key=lambda b: int(np.prod(b.weight.shape[2:]))).conv
    dt = main.outputs[0]
    return Merge(
        main,
        cast_checked_folded(weight, dt, "merged weight"),
        cast_checked_folded(bias, dt, "merged bias") if has_bias else None,
        kernel,
        [-a for a in start] + pad_end,
    )


def _rewrite(
    graph: ir.Graph, namer: Namer, root: ir.Node, adds: list[ir.Node], branches: list[Branch],
    others: list[ir.Value], merge: Merge,
) -> None:  # fmt: skip
    """Put ``merge`` into its main conv, sum it with the other terms, drop the rest."""
    main = merge.main
    name = label(main)
    set_constant_input(graph, namer, main, 1, merge.weight, f"{name}_W")
    if merge.bias is not None:
        set_constant_input(graph, namer, main, 2, merge.bias, f"{name}_B")
    elif len(main.inputs) > 2:
        main.resize_inputs(2)
    main.attributes["kernel_shape"] = ir.AttrInt64s("kernel_shape", merge.kernel)
    main.attributes["pads"] = ir.AttrInt64s("pads", merge.pads)
    main.attributes.pop("auto_pad", None)
    dead = {n for b in branches for n in b.nodes if n is not main} | set(adds)
    acc = main.outputs[0]
    note_changed(graph, acc.name)  # until it replaces the sum below
    for other in others[:-1]:
        out = ir.Value(name=namer(f"{name}_sum"), shape=root.outputs[0].shape,
                       type=root.outputs[0].type)  # fmt: skip
        graph.insert_before(root, ir.Node("", "Add", [acc, other], outputs=[out],
                                          name=namer(f"{name}_sum")))  # fmt: skip
        acc = out
    if others:
        # The root Add stays, now summing the merged conv with the last term that is not a
        # branch of x.
        dead.discard(root)
        root.replace_input_with(0, acc)
        root.replace_input_with(1, others[-1])
    else:
        replace_value(graph, root.outputs[0], acc, namer)
    for node in reversed(list(graph)):
        if node in dead:
            graph.remove(node, safe=True)


def _sequence(second: ir.Node) -> tuple[Branch, Branch] | None:
    """``second`` as the KxK of a Conv1x1 -> ConvKxK pair, or None when it is not one."""
    x = second.inputs[0] if second.inputs else None
    first = x.producer() if x is not None else None
    if first is None or not is_onnx_op(first, "Conv"):
        return None
    b1, b2 = _conv_branch(x), _conv_branch(second.outputs[0])
    if b1 is None or b2 is None or b1.weight.ndim != b2.weight.ndim:
        return None
    if any(d != 1 for d in b1.weight.shape[2:]) or not single_use(x):
        return None  # not a 1x1, or a branch point (a residual input, say): not a sequence
    return b1, b2


def plan_sequence(b1: Branch, b2: Branch) -> tuple[np.ndarray, np.ndarray | None]:
    """Check a Conv1x1 -> ConvKxK pair (module docstring) and compute the merged weight/bias."""
    first, second = b1.conv, b2.conv
    spatial = b1.weight.ndim - 2
    if first.attributes.get_int("group", 1) != 1 or second.attributes.get_int("group", 1) != 1:
        raise Declined("a grouped conv in the sequence")
    if any(v != 1 for v in _ints(first, "strides", [1] * spatial)) or any(_pads(first, spatial)):
        raise Declined(f"the 1x1 conv {label(first)} strides or pads")
    if first.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise Declined(f"the 1x1 conv {label(first)} uses auto_pad SAME")
    pads_second = second.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID")
    if b1.bias is not None and np.any(b1.bias) and (pads_second or any(_pads(second, spatial))):
        raise Declined("padding: the KxK conv pads the 1x1 conv's output and the 1x1 has a bias")
    m, c = b1.weight.shape[:2]
    o, k = b2.weight.shape[0], int(np.prod(b2.weight.shape[2:]))
    if o * c * k > m * c + o * m * k:
        raise Declined(
            f"the merged conv would cost {o * c * k} MACs per pixel, the two {m * c + o * m * k}"
        )
    if b2.weight.shape[1] != m or np_dtype(second.outputs[0].dtype) is None:
        raise Declined("channel counts or dtype do not fit")
    w1 = b1.weight.reshape(m, c)
    weight = np.einsum("om...,mc->oc...", b2.weight, w1)
    bias = b2.bias
    if b1.bias is not None:
        shift = b2.weight.sum(axis=tuple(range(2, b2.weight.ndim))) @ b1.bias
        bias = shift if bias is None else bias + shift
    dt = second.outputs[0]
    return (
        cast_checked_folded(weight, dt, "merged weight"),
        None if bias is None else cast_checked_folded(bias, dt, "merged bias"),
    )


class MergeBranches(ir.passes.InPlacePass):
    """Merge an Add of parallel convs (and identity branches) of one tensor into one Conv, and
    Conv1x1 -> ConvKxK sequences into one ConvKxK.

    Every merged sum is in the result's ``changed`` (``merged``, ``into`` the conv that holds
    it, ``detail`` the branches); a sum of two or more branches of one tensor that cannot merge
    is in ``declined`` with the reason.
    """

    def call(self, model: ir.Model) -> BnfoldPassResult:
        graph = model.graph
        namer = Namer(graph)
        result = BnfoldPassResult(model, False)
        labels = {n: label(n) for n in graph}
        for node in list(graph):
            pair = _sequence(node) if is_onnx_op(node, "Conv") else None
            if pair is None:
                continue
            b1, b2 = pair
            detail = f"{b1.describe()} -> {b2.describe()}"
            try:
                weight, bias = plan_sequence(b1, b2)
            except Declined as e:
                result.declined.append(
                    Record(labels[node], "Conv", "kept", reason=str(e), detail=detail)
                )
                continue
            name = label(node)
            set_constant_input(graph, namer, node, 1, weight, f"{name}_W")
            if bias is not None:
                set_constant_input(graph, namer, node, 2, bias, f"{name}_B")
            node.replace_input_with(0, b1.source)
            graph.remove(b1.conv, safe=True)
            kernel = "x".join(map(str, weight.shape[2:]))
            result.changed.append(
                Record(labels[node], "Conv", "merged", into=[labels[node]],
                       detail=f"{detail} -> {kernel}")
            )  # fmt: skip
            result.modified = True
        sequences = len(result.changed), len(result.declined)
        # Last Add first: the root of a sum tree takes its inner Adds with it.
        for node in reversed(list(graph)):
            if node.graph is None or not is_onnx_op(node, "Add") or len(node.inputs) != 2:
                continue
            if any(v is None or const_array(v) is not None for v in node.inputs):
                continue
            adds, terms = _flatten(node)
            x, branches, others = _branches(terms)
            if x is None or len(branches) < 2:
                continue
            detail = " + ".join(b.describe() for b in branches)
            try:
                for b in branches:
                    # Its nodes go away: the term may feed nothing but the sum.
                    if b.nodes and not single_use(b.nodes[-1].outputs[0]):
                        raise Declined(f"{label(b.nodes[-1])} output has other consumers")
                merge = plan(branches, x)
            except Declined as e:
                result.declined.append(
                    Record(labels[node], "Add", "kept", reason=str(e), detail=detail)
                )
                continue
            _rewrite(graph, namer, node, adds, branches, others, merge)
            into = labels.get(merge.main) or label(merge.main)
            kernel = "x".join(map(str, merge.kernel))
            result.changed.append(
                Record(labels[node], "Add", "merged", into=[into], detail=f"{detail} -> {kernel}")
            )
            result.modified = True
            logger.debug("merged %s (%s) into %s", labels[node], detail, into)
        # Sums were found last-first; reported in graph order, after the sequences.
        for records, n in zip((result.changed, result.declined), sequences, strict=True):
            records[n:] = records[n:][::-1]
        return result
