"""bnfold.ir: loading (with the normalizing passes that follow it), saving, external data.

Constant nodes and Identity chains are normalized into initializers by the first passes of the
pipeline (``lift_constants``, ``remove_identity``), so the tests load with ``bnfold.ir.load`` and
fold with ``bnfold.fold`` and check that the BN folded through them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

import bnfold
from bnfold import ir as bir
from bnfold.check import run_onnxruntime
from bnfold.errors import BnfoldError
from bnfold.testing import count_ops, outputs_close, parse


def _floats(a: np.ndarray) -> str:
    return ", ".join(repr(float(v)) for v in np.asarray(a, np.float32).ravel())


def _bn(rng: np.random.Generator, c: int) -> dict[str, np.ndarray]:
    return {
        "gamma": rng.uniform(0.5, 2.0, c).astype(np.float32),
        "beta": rng.standard_normal(c).astype(np.float32),
        "mean": rng.standard_normal(c).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, c).astype(np.float32),
    }


def conv_bn(
    channels: int = 4, dims: str = "1,3,6,6", out_dims: str | None = None, seed: int = 0
) -> onnx.ModelProto:
    """x -> Conv(3x3, pads 1, bias) -> BN -> Relu -> y."""
    rng = np.random.default_rng(seed)
    out_dims = out_dims or dims.replace(",3,", f",{channels},", 1)
    return parse(
        f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[{dims}] x) => (float[{out_dims}] y) {{
        c = Conv <pads=[1,1,1,1]> (x, W, B)
        n = BatchNormalization (c, gamma, beta, mean, var)
        y = Relu (n)
    }}
    """,
        W=rng.standard_normal((channels, 3, 3, 3)).astype(np.float32),
        B=rng.standard_normal(channels).astype(np.float32),
        **_bn(rng, channels),
    )


def feeds(shape=(1, 3, 6, 6), seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def initializers(path: Path) -> dict[str, np.ndarray]:
    proto = onnx.load(path)  # with its external data
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


# --------------------------------------------------------------------------------------------
# normalization: Constant nodes, Identity chains, IR 3 weight inputs
# --------------------------------------------------------------------------------------------


def test_constants_and_identity_chains_become_initializers(tmp_path: Path):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    bn = _bn(rng, 4)
    model = parse(
        f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,6,6] x) => (float[1,4,6,6] y) {{
        Wc = Constant <value = float[4,3,1,1] {{{_floats(w)}}}> ()
        W1 = Identity (Wc)
        W2 = Identity (W1)
        Bc = Constant <value_floats = [{_floats(b)}]> ()
        g1 = Constant <value = float[4] {{{_floats(bn["gamma"])}}}> ()
        gamma = Identity (g1)
        c = Conv (x, W2, Bc)
        n = BatchNormalization (c, gamma, beta, mean, var)
        y = Relu (n)
    }}
    """,
        beta=bn["beta"],
        mean=bn["mean"],
        var=bn["var"],
    )
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    folded, report = bnfold.fold(bir.load(path))
    assert count_ops(folded, "Constant") == 0
    assert count_ops(folded, "Identity") == 0
    assert count_ops(folded, "BatchNormalization") == 0
    assert [n.op_type for n in folded.graph] == ["Conv", "Relu"]
    assert report.counts()["folded_backward"] == 1, report.table()
    conv = next(iter(folded.graph))
    assert all(v is not None and v.is_initializer() for v in conv.inputs[1:])
    outputs_close(model, folded, feeds())


def test_identity_producing_a_graph_output_stays():
    rng = np.random.default_rng(3)
    model = parse(
        """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,6,6] x) => (float[1,4,6,6] y, float[1,4,6,6] z) {
        c = Conv (x, W)
        n = BatchNormalization (c, gamma, beta, mean, var)
        y = Relu (n)
        z = Identity (y)
    }
    """,
        W=rng.standard_normal((4, 3, 1, 1)).astype(np.float32),
        **_bn(rng, 4),
    )
    folded, report = bnfold.fold(model)
    assert [v.name for v in folded.graph.outputs] == ["y", "z"]
    assert count_ops(folded, "Identity") == 1
    assert report.counts()["folded_backward"] == 1
    outputs_close(model, folded, feeds())


def test_ir3_initializers_listed_as_inputs_fold(tmp_path: Path):
    rng = np.random.default_rng(4)
    tensors = {
        "W": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "B": rng.standard_normal(4).astype(np.float32),
        **_bn(rng, 4),
    }
    model = parse(
        """
    <ir_version: 3, opset_import: ["" : 8]>
    g (float[1,3,6,6] x, float[4,3,3,3] W, float[4] B, float[4] gamma, float[4] beta,
       float[4] mean, float[4] var) => (float[1,4,6,6] y) {
        c = Conv <pads=[1,1,1,1]> (x, W, B)
        n = BatchNormalization (c, gamma, beta, mean, var)
        y = Relu (n)
    }
    """,
        **tensors,
    )
    path = tmp_path / "ir3.onnx"
    onnx.save(model, path)
    folded, report = bnfold.fold(bir.load(path))
    assert report.counts()["folded_backward"] == 1, report.table()
    assert count_ops(folded, "BatchNormalization") == 0
    assert [v.name for v in folded.graph.inputs] == ["x"]
    assert folded.ir_version >= 4
    out = tmp_path / "ir3.folded.onnx"
    bir.save(folded, out)
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["x"]
    outputs_close(model, proto, feeds())


@pytest.mark.parametrize("overridable", ["W", "gamma"])
def test_ir4_initializer_that_is_an_input_is_not_a_constant(tmp_path: Path, overridable: str):
    """From IR 4 on, an initializer listed as a graph input is a default the user may override."""
    rng = np.random.default_rng(5)
    tensors = {
        "W": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "B": rng.standard_normal(4).astype(np.float32),
        **_bn(rng, 4),
    }
    shape = "4,3,3,3" if overridable == "W" else "4"
    model = parse(
        f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,6,6] x, float[{shape}] {overridable}) => (float[1,4,6,6] y) {{
        c = Conv <pads=[1,1,1,1]> (x, W, B)
        n = BatchNormalization (c, gamma, beta, mean, var)
        y = Relu (n)
    }}
    """,
        **tensors,
    )
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    folded, report = bnfold.fold(bir.load(path))
    (rec,) = report.batchnorms
    assert rec.action != "folded", report.table()
    assert rec.reason and "constant" in rec.reason, rec.reason
    assert [v.name for v in folded.graph.inputs] == ["x", overridable]
    assert folded.graph.initializers[overridable].is_graph_input()
    # the folded model still honours an overriding value
    override = {overridable: (tensors[overridable] * 1.5 + 0.25).astype(np.float32)}
    outputs_close(model, folded, {**feeds(), **override})
    outputs_close(model, folded, feeds())


# --------------------------------------------------------------------------------------------
# load preconditions
# --------------------------------------------------------------------------------------------


def test_from_proto_refuses_integer_batchnorm():
    """bnfold's own dtype check (shape inference would catch it first through ``load``)."""
    proto = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (int32[2,3,4,4] x) => (int32[2,3,4,4] y) { y = BatchNormalization (x, s, b, m, v) }
    """)
    for k in "sbmv":
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(3, np.int32), k))
    with pytest.raises(BnfoldError, match="unsupported dtype INT32"):
        bir.from_proto(proto)


def test_from_proto_refuses_training_mode():
    proto = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[2,3,4,4] x) => (float[2,3,4,4] y) {
        y = BatchNormalization <training_mode=1> (x, s, b, m, v)
    }
    """)
    for k in "sbmv":
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(3, np.float32), k))
    with pytest.raises(BnfoldError, match="training mode"):
        bir.from_proto(proto)


def test_load_size_limit(tmp_path: Path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn(), path)
    with pytest.raises(BnfoldError, match="size limit"):
        bir.load(path, max_size_bytes=100)
    bir.load(path, max_size_bytes=path.stat().st_size)


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------


def test_dynamic_dims_are_kept_on_save(tmp_path: Path):
    src = tmp_path / "dyn.onnx"
    onnx.save(conv_bn(dims="N,3,H,W", out_dims="N,4,H,W"), src)
    folded, _ = bnfold.fold(bir.load(src))
    out = tmp_path / "dyn.folded.onnx"
    bir.save(folded, out)
    proto = onnx.load(out)

    def dims(vi: onnx.ValueInfoProto) -> list[str | int]:
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    assert [dims(i) for i in proto.graph.input] == [["N", 3, "H", "W"]]
    assert [dims(o) for o in proto.graph.output] == [["N", 4, "H", "W"]]
    # and it runs at shapes the original was never exported with
    outputs_close(onnx.load(src), proto, feeds((2, 3, 5, 7)))


def test_save_is_deterministic(tmp_path: Path):
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn(), src)
    bir.save(bnfold.fold(bir.load(src))[0], tmp_path / "a.onnx")
    bir.save(bnfold.fold(bir.load(src))[0], tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_save_external_data_round_trip(tmp_path: Path):
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn(channels=16), src)
    model = bir.load(src)
    target = tmp_path / "out" / "x.onnx"
    bir.save(model, target, external_data=True)
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.onnx", "x.onnx.data"]
    raw = onnx.load(target, load_external_data=False)
    external = [
        t.name for t in raw.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    assert "W" in external  # 16x3x3x3 floats: over the 1 KiB threshold
    assert {
        e.value for t in raw.graph.initializer for e in t.external_data if e.key == "location"
    } == {"x.onnx.data"}
    before, after = initializers(src), initializers(target)
    assert sorted(before) == sorted(after)
    for name, array in before.items():
        np.testing.assert_array_equal(after[name], array, err_msg=name)
    # loading it back keeps the external format on the next save (external_data=None)
    reloaded = bir.load(target)
    again = tmp_path / "again" / "x.onnx"
    bir.save(reloaded, again)
    assert (again.parent / "x.onnx.data").is_file()
    assert again.read_bytes() == target.read_bytes()
    assert (again.parent / "x.onnx.data").read_bytes() == (
        target.parent / "x.onnx.data"
    ).read_bytes()


def test_save_external_data_when_every_tensor_is_small(tmp_path: Path):
    """All tensors under the threshold: no data file to move, and no crash.

    Was FileNotFoundError (exit 3): bnfold/ir.py ``save`` renamed a data file never written.
    """
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn(channels=2), src)
    target = tmp_path / "out" / "x.onnx"
    bir.save(bir.load(src), target, external_data=True)
    assert [p.name for p in target.parent.iterdir() if p.name != "x.onnx.data"] == ["x.onnx"]
    before, after = initializers(src), initializers(target)
    for name, array in before.items():
        np.testing.assert_array_equal(after[name], array, err_msg=name)


def test_load_external_data_without_length(tmp_path: Path):
    """``length`` (and ``offset``) are optional in external_data; one file per tensor here.

    Was refused as "invalid ONNX model ... not regular file": bnfold/ir.py ``load_proto`` only
    loaded external data when the sum of the ``length`` fields was non-zero (fixed there).
    """
    model = conv_bn()
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    for i, t in enumerate(proto.graph.initializer):
        (tmp_path / f"t{i}.bin").write_bytes(onnx.numpy_helper.to_array(t).tobytes())
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        entry = t.external_data.add()
        entry.key, entry.value = "location", f"t{i}.bin"
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    folded, report = bnfold.fold(bir.load(path))
    assert report.counts()["folded_backward"] == 1
    outputs_close(model, folded, feeds())


@pytest.mark.parametrize("external_data", [False, True], ids=["inline", "external"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_save_is_atomic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, external_data: bool, existing: bool
):
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn(channels=16), src)
    model = bir.load(src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "x.onnx"
    if existing:
        target.write_bytes(b"old model")
    calls = []

    def failing_replace(a, b):
        calls.append((a, b))
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        bir.save(model, target, external_data=external_data)
    monkeypatch.undo()
    assert calls, "save did not go through os.replace"
    left = sorted(p.name for p in out_dir.iterdir())
    if existing:
        assert left == ["x.onnx"]
        assert target.read_bytes() == b"old model"
    else:
        assert left == [], f"save left {left} behind"


def test_failed_external_save_leaves_the_old_model_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Overwriting an external-data model: if the last rename fails, the old model still works.

    Bug: bnfold/ir.py ``save`` renames the new ``x.onnx.data`` over the old one *before* it
    renames the model, so when that last step fails (or the process is killed between the two)
    the old ``x.onnx`` is left reading the new data at its old offsets.
    """
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn(channels=16), src)
    target = tmp_path / "out" / "x.onnx"
    bir.save(bir.load(src), target, external_data=True)
    old = initializers(target)
    folded, _ = bnfold.fold(bir.load(src))  # other tensors, other layout
    real_replace = os.replace

    def replace(a, b):
        if Path(b) == target:
            raise OSError("killed before the model was renamed (simulated)")
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        bir.save(folded, target, external_data=True)
    monkeypatch.undo()
    now = initializers(target)
    assert sorted(now) == sorted(old)
    for name, array in old.items():
        np.testing.assert_array_equal(now[name], array, err_msg=name)


def test_folded_model_runs_in_onnxruntime_after_reload(tmp_path: Path):
    src = tmp_path / "m.onnx"
    model = conv_bn()
    onnx.save(model, src)
    out = tmp_path / "f.onnx"
    bir.save(bnfold.fold(bir.load(src))[0], out)
    (ref,) = run_onnxruntime(model, feeds()).values()
    (got,) = run_onnxruntime(out, feeds()).values()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
