"""Integer compute for QDQ models in TVM: ``DQ -> conv2d/matmul (-> bias) (-> act) -> Q`` groups
become int8 x int8 -> int32 convolutions / matmuls with a fixed-point requantize.

TVM 0.27's ONNX importer turns ``QuantizeLinear`` / ``DequantizeLinear`` into ``R.quantize`` /
``R.dequantize`` around *float* operators, so an imported QDQ model is smaller but not faster.
:func:`rewrite` finds, in the imported Relax module, every group::

    q = quantize(act(conv2d(dequantize(x_q, s_x, z_x), dequantize(W_q, s_w, 0)) + b), s_y, z_y)

(``conv2d`` may be ``matmul`` with a ``permute_dims``-ed weight; the bias and ``act`` are
optional; ``act`` is ``relu``) with constant ``W_q`` (int8, zero point 0, scale per output
channel or per tensor), scalar ``s_x, z_x, s_y, z_y``, and replaces it by integer arithmetic:

    acc[o]  = b'[o] + sum x_q * W_q           (int32; the input padded with z_x)
    b'[o]   = round(b[o] / (s_x s_w[o])) - z_x sum W_q[o]
    y_q     = clip((acc * m[o] + 2^(k[o]-1)) >> k[o] + z_y, lo, hi)

where ``m[o] 2^-k[o]`` is ``M[o] = s_x s_w[o] / s_y`` with a 31-bit mantissa
``m in [2^30, 2^31)`` (gemmlowp / TFLite style), and ``[lo, hi]`` is the output type's range
narrowed by the activation: ``relu`` -> ``lo = max(lo, z_y)``. Padding with ``z_x`` (the real
zero) and subtracting ``z_x sum W_q`` is exact: padded positions add ``z_x W - z_x W = 0``.

The result equals the float computation onnxruntime does on the QDQ model up to float rounding
(``round(v)`` of a value that float rounding moved across a .5 boundary), i.e. within 1 LSB.

An activation that the output's quantization already implies (``Relu`` before a ``Q`` whose
``z_y`` is the type's minimum, ``Clip(a, b)`` whose range contains the quantized range) is
dropped from the ONNX model first (the pass
:class:`~bnfold.passes.drop_implied_activations.DropImpliedActivations`): exact, since ``Q`` is
monotone and saturates, and it keeps the Relax pattern a plain ``quantize(conv + bias)``.

Each pattern is one rule in :mod:`bnfold.lower.int8_rules` (pattern, check, emit; applied in
order by :func:`rewrite`); the fixed-point arithmetic is :mod:`bnfold.lower.fixed_point`.

Convolutions use the target's int8 kernel (:mod:`bnfold.targets.int8`) where it has one, else
Relax's ``conv2d(out_dtype="int32")`` scheduled by bnfold's CPU rules. A group that does not
match stays float (dequantize -> float op -> quantize) and is reported with the reason.

Three more patterns, where the target has the kernel (x86):

* ``quantize(act(dequantize(a) + dequantize(b)))`` (a residual connection, same shapes): one
  8-bit kernel computing onnxruntime's float32 formula
  ``clip(round((float(a - z_a) s_a + float(b - z_b) s_b) / s_y) + z_y, lo, hi)``;
* ``quantize(max_pool2d(dequantize(x)))`` with the same scale and zero point (a pass-through):
  the 8-bit max-pool kernel on ``x`` (other pass-through ops are Relax ops on ``x``);
* ``matmul(dequantize(x_q), dequantize(W_q)) (+ b)`` whose float result is not quantized again
  (a classifier's last Gemm, :func:`_float_output_roots`): the integer matmul with the float
  epilogue ``float(sum (x_q - z_x) W_q) s_x s_w[o] + b[o]`` (AVX-512 VNNI kernel, else Relax
  integer ops), as onnxruntime's QGemm with a float output; recorded as ``float_output``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from bnfold import check
from bnfold.lower import int8_rules as rules
from bnfold.lower.int8_rules import op_name

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Int8Record:
    """What happened to one quantize group (or, ``float_output``, one matmul with a float
    result): ``op`` (conv2d/matmul), ``how`` (``kernel``: the target's int8 kernel; ``relax``:
    Relax integer ops), or ``reason`` why it stayed float."""

    output: str
    op: str
    how: str | None = None
    reason: str | None = None
    float_output: bool | None = None  # a matmul with a float result (``f0``...), not a quantize

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def rewrite(
    mod: Any, target: Any | None = None, select: Callable[[str], bool] | None = None
) -> tuple[Any, list[Int8Record]]:
    """``mod`` with every matching quantize group in integer arithmetic (see the module
    docstring), dead float code removed; and a record per ``quantize`` considered.

    At each ``quantize`` call the rules of :data:`~bnfold.lower.int8_rules.QUANTIZE_RULES` are
    tried in order, at each matmul with a float result those of ``FLOAT_OUTPUT_RULES``; the
    first that matches emits, else the site stays float with the first rule's reason.

    ``target``: a ``tvm.target.Target`` whose int8 kernels to use (None: Relax ops only).
    ``select``: which groups (by record name, ``q0``, ``q1``, ... in program order; ``f0``...
    for float outputs) to rewrite; the others stay float (for bisecting a mismatch).
    """
    from tvm import relax

    records: list[Int8Record] = []
    float_records: list[Int8Record] = []

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def __init__(self, mod: Any) -> None:
            super().__init__(mod)
            self.mod_ = mod
            self.ctx = rules.Context(self.builder_, self.value, target)

        def transform(self) -> Any:
            for gv, func in self.mod_.functions_items():
                if isinstance(func, relax.Function):
                    self.float_roots = _float_output_roots(func)
                    self.builder_.update_func(gv, self.visit_expr(func))
            return self.builder_.get()

        def value(self, expr: Any) -> Any:
            if isinstance(expr, relax.Var):
                bound = self.lookup_binding(expr)
                return bound if bound is not None else expr
            return expr

        def visit_call_(self, call: Any) -> Any:
            root = any(call.same_as(c) for c in self.float_roots)
            call = self.visit_expr_post_order(call)
            if root:
                name = f"f{len(float_records)}"
                if select is not None and not select(name):
                    float_records.append(Int8Record(name, "-", reason="not selected",
                                                    float_output=True))  # fmt: skip
                    return call
                site = rules.FloatSite(name, call)
                return self.apply(rules.FLOAT_OUTPUT_RULES, site, call, float_records, True)
            if op_name(call) != "relax.quantize":
                return call
            name = f"q{len(records)}"
            if select is not None and not select(name):
                records.append(Int8Record(name, "-", reason="not selected"))
                return call
            site = rules.quantize_site(self.ctx, call, name)
            if isinstance(site, rules.Decline):
                records.append(Int8Record(name, site.op, reason=site.reason))
                return call
            return self.apply(rules.QUANTIZE_RULES, site, call, records, None)

        def apply(
            self, table: tuple[rules.Rule, ...], site: Any, call: Any,
            out: list[Int8Record], float_output: bool | None,
        ) -> Any:  # fmt: skip
            """The first match's emitted expression, recorded; else ``call``, declined."""
            first: rules.Decline | None = None
            for rule in table:
                m = rule.match(self.ctx, site)
                if m is None:
                    continue
                if isinstance(m, rules.Decline):
                    first = first or m
                    continue
                y = rule.emit(self.ctx, site, m)
                out.append(Int8Record(site.name, m.op, how=m.how, float_output=float_output))
                return y
            first = first or rules.Decline("-", "no rule matches")
            out.append(Int8Record(site.name, first.op, reason=first.reason,
                                  float_output=float_output))  # fmt: skip
            return call

    new = relax.transform.DeadCodeElimination()(_Rewriter(mod).transform())
    done = sum(r.how is not None for r in records)
    logger.info("int8: %d of %d quantize groups in integer arithmetic", done, len(records))
    return new, records + float_records


# Readers after which a conv2d/matmul result may still become a quantize group's input (an
# alias ``v = w`` is not followed: counted as one).
_QUANTIZE_PATH_OPS = (
    "relax.quantize", "relax.nn.relu", "relax.max", "relax.min", "relax.call_tir", "relax.add",
    "relax.stack", "relax.broadcast_to", "alias",
)  # fmt: skip


def _float_output_roots(func: Any) -> list[Any]:
    """The calls ``matmul(...)`` / ``add(matmul(...), b)`` of ``func`` whose result no
    quantize group can take in: no reader is a quantize, an activation or an add (a bias
    add is itself the root). Rewriting one of them as a float-output integer matmul cannot take
    a matmul away from a quantize group that :func:`rewrite` would have made integer."""
    from tvm import relax

    bindings: dict[Any, Any] = {}
    readers: dict[Any, list[str]] = {}

    def read(expr: Any, by: str) -> None:
        if isinstance(expr, relax.Var):
            readers.setdefault(expr, []).append(by)
        elif isinstance(expr, relax.Tuple):
            for f in expr.fields:
                read(f, by)

    body = func.body
    for block in body.blocks:
        for b in block.bindings:
            if not isinstance(b, relax.VarBinding):
                continue
            bindings[b.var] = b.value
            if isinstance(b.value, relax.Call):
                by = op_name(b.value) or "call"
                for a in b.value.args:
                    read(a, by)
            else:
                read(b.value, "alias")
    read(body.body, "output")
    roots = []
    for var, value in bindings.items():
        op = op_name(value)
        if op not in ("relax.matmul", "relax.add"):
            continue
        if any(r in _QUANTIZE_PATH_OPS for r in readers.get(var, [])):
            continue
        if op == "relax.add" and not any(
            isinstance(a, relax.Var) and op_name(bindings.get(a)) == "relax.matmul"
            for a in value.args
        ):
            continue
        roots.append(value)
    return roots


def summarize(records: list[Int8Record], dropped: int = 0) -> dict[str, Any]:
    """The manifest's ``compile.int8`` record: how many quantize groups became integer code
    (with the target's kernels or Relax ops), and why the others stayed float; and how many
    matmuls with a float result (``float_output`` records) became integer matmuls."""
    quantize = [r for r in records if not r.float_output]
    reasons: dict[str, int] = {}
    for r in quantize:
        if r.how is None and r.reason:
            reasons[r.reason] = reasons.get(r.reason, 0) + 1
    return {
        "integer": True,
        "quantize_groups": len(quantize),
        "integer_groups": sum(r.how is not None for r in quantize),
        "kernel_groups": sum(r.how == "kernel" for r in quantize),
        "float_output_matmuls": sum(r.how is not None for r in records if r.float_output),
        "activations_dropped": dropped,
        "float_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "groups": [r.to_dict() for r in records],
    }


# --------------------------------------------------------------------------------------------
# Layer-by-layer check against onnxruntime


def is_qdq(model: onnx.ModelProto) -> bool:
    """Whether ``model`` holds ``QuantizeLinear`` nodes (a QDQ model)."""
    return any(n.op_type == "QuantizeLinear" and n.domain in ("", "ai.onnx")
               for n in model.graph.node)  # fmt: skip


def quantized_tensors(model: onnx.ModelProto) -> dict[str, int]:
    """``{name: ONNX element type}`` of every ``QuantizeLinear`` output (the activations that
    exist as 8-bit tensors in an integer runtime)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    types: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type != "QuantizeLinear":
            continue
        zp = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        dtype = numpy_helper.to_array(zp).dtype if zp is not None else np.dtype(np.uint8)
        types[n.output[0]] = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    return types


def with_quantized_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are its own plus every quantized tensor."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for name, elem in quantized_tensors(model).items():
        if name not in have:
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return out


def cut_at_quantized(
    model: onnx.ModelProto, values: dict[str, np.ndarray]
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Every layer on its own: a copy of ``model`` in which each reader of a quantized tensor
    reads a new graph input (``bnfold_cut_<k>``) instead, and whose outputs are the quantized
    tensors; and the feeds for those inputs (``values``: the quantized tensors as onnxruntime
    computed them). Run on those feeds, each layer sees exactly onnxruntime's input, so its
    output can be compared bit for bit: a 1-LSB difference in one layer cannot compound.
    """
    out = with_quantized_outputs(model)
    g = out.graph
    types = quantized_tensors(model)
    feeds: dict[str, np.ndarray] = {}
    cuts: dict[str, str] = {}
    for node in g.node:
        if node.op_type == "QuantizeLinear":
            continue
        for i, name in enumerate(node.input):
            if name in types and name in values:
                # Plain names: TVM's importer renames (and warns about) ones like "/a/b".
                cut = cuts.setdefault(name, f"bnfold_cut_{len(cuts)}")
                if cut not in feeds:
                    feeds[cut] = values[name]
                    g.input.append(onnx.helper.make_tensor_value_info(
                        cut, types[name], list(values[name].shape)))  # fmt: skip
                node.input[i] = cut
    del g.output[:]
    for name, elem in types.items():
        shape = list(values[name].shape) if name in values else None
        g.output.append(onnx.helper.make_tensor_value_info(name, elem, shape))
    return out, feeds


def lsb_diffs(
    reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]
) -> dict[str, dict[str, float]]:
    """Per quantized tensor: ``max_lsb`` (max |difference| in quantization steps) and
    ``off`` (the fraction of elements that differ at all)."""
    result: dict[str, dict[str, float]] = {}
    for name, ref in reference.items():
        got = candidate[name]
        diff = np.abs(ref.astype(np.int64) - got.astype(np.int64))
        result[name] = {"max_lsb": int(diff.max(initial=0)), "off": float(np.mean(diff > 0))}
    return result


def layer_inputs(
    model: onnx.ModelProto, sample: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """onnxruntime's quantized tensors of ``model`` on ``sample`` (optimizations off), and the
    feeds of the cut model (:func:`cut_at_quantized`) that give each layer those inputs."""
    names = list(quantized_tensors(model))
    ran = check.run_onnxruntime(with_quantized_outputs(model), sample)
    values = {k: ran[k] for k in names}
    return values, cut_at_quantized(model, values)[1]


def layerwise_record(
    values: dict[str, np.ndarray], got: dict[str, np.ndarray], max_lsb: int
) -> dict[str, Any]:
    """The layer-by-layer gate: every quantized tensor in ``got`` within ``max_lsb``
    quantization steps of onnxruntime's ``values``."""
    diffs = lsb_diffs(values, {k: got[k] for k in values})
    worst = max(diffs, key=lambda k: (diffs[k]["max_lsb"], diffs[k]["off"]))
    return {
        "status": "passed" if diffs[worst]["max_lsb"] <= max_lsb else "failed",
        "gate": f"every quantized tensor within {max_lsb} LSB of onnxruntime, layer by layer",
        "max_lsb": diffs[worst]["max_lsb"],
        "worst": worst,
        "tensors": len(diffs),
        "tensors_off_by_one": sum(d["max_lsb"] == 1 for d in diffs.values()),
        "max_off_fraction": max(d["off"] for d in diffs.values()),
        "layers": diffs,
    }
