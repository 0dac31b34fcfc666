"""Loading and saving ONNX models: the only place that turns bytes into an IR and back.

``load`` reads a model defensively (size, protobuf, external-data locations, opset, checker,
shape inference, BatchNormalization preconditions) and raises :class:`BnfoldError` with one
line naming the problem. ``save`` writes deterministically (the same model gives the same
bytes) and atomically (temp file, then rename).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from bnfold.atomic import write_bytes
from bnfold.errors import BnfoldError

logger = logging.getLogger(__name__)

MIN_OPSET = 7
# Element types bnfold can fold (BN is only defined for floats); anything else is refused early.
FOLDABLE_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)
_BN_DTYPES = (*FOLDABLE_DTYPES, ir.DataType.BFLOAT16)
# Models above this many bytes of tensors are saved with external data (protobuf's hard 2 GiB
# limit leaves room for the graph itself).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
_EXTERNAL_FLAG = "bnfold.external_data"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].strip()


def default_opset(model: ir.Model | onnx.ModelProto) -> int:
    """The model's version of the default ONNX domain (0 if it imports none)."""
    if isinstance(model, onnx.ModelProto):
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                return int(o.version)
        return 0
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))


def _check_external_data(proto: onnx.ModelProto, base_dir: Path) -> int:
    """Refuse external-data locations outside the model's folder; return the bytes referenced.

    A model is untrusted input: a location such as ``../../etc/passwd`` or an absolute path (or a
    symlink pointing out) would make bnfold read, and later copy, files it has no business with.
    """
    total = 0
    base = base_dir.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not location:
            raise BnfoldError(f"tensor '{tensor.name}' uses external data but names no location")
        if os.path.isabs(location) or ".." in Path(location).parts:
            raise BnfoldError(
                f"tensor '{tensor.name}': external data location '{location}' is outside the "
                "model's folder (absolute or '..' paths are refused)"
            )
        data_path = (base / location).resolve()
        if base not in data_path.parents:
            raise BnfoldError(
                f"tensor '{tensor.name}': external data '{location}' resolves outside the "
                "model's folder (symlink out?)"
            )
        if not data_path.is_file():
            raise BnfoldError(f"tensor '{tensor.name}': external data file '{location}' is missing")
        offset = int(info.get("offset", 0) or 0)
        length = info.get("length")
        size = data_path.stat().st_size
        if length is not None:
            end = offset + int(length)
            if end > size:
                raise BnfoldError(
                    f"tensor '{tensor.name}': external data file '{location}' is too short "
                    f"({size} bytes, needs {end})"
                )
            total += int(length)
    return total


def load_proto(
    path: str | os.PathLike[str],
    *,
    max_size_bytes: int | None = None,
    check: bool = True,
    infer_shapes: bool = True,
) -> onnx.ModelProto:
    """Read and validate an ONNX file (with its external data); raise BnfoldError if unusable."""
    p = Path(path)
    if not p.exists():
        raise BnfoldError(f"{p}: no such file")
    if not p.is_file():
        raise BnfoldError(f"{p}: not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise BnfoldError(f"{p}: empty file, not an ONNX model")
    if max_size_bytes is not None and size > max_size_bytes:
        raise BnfoldError(f"{p}: {size} bytes is over the size limit of {max_size_bytes} bytes")
    try:
        proto = onnx.load_model(str(p), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, RuntimeError or ValueError
        raise BnfoldError(f"{p}: not a valid ONNX protobuf ({_first_line(e)})") from None
    if not proto.HasField("graph") or proto.ir_version == 0:
        raise BnfoldError(f"{p}: not an ONNX model (no graph or IR version)")
    external = _check_external_data(proto, p.parent)
    if max_size_bytes is not None and size + external > max_size_bytes:
        raise BnfoldError(
            f"{p}: {size + external} bytes with external data is over the size limit of "
            f"{max_size_bytes} bytes"
        )
    tensors = onnx.external_data_helper._get_all_tensors(proto)
    if any(map(onnx.external_data_helper.uses_external_data, tensors)):  # "length" is optional
        try:
            onnx.load_external_data_for_model(proto, str(p.parent))
        except Exception as e:
            raise BnfoldError(f"{p}: cannot read external data ({_first_line(e)})") from None
        proto.metadata_props.add(key=_EXTERNAL_FLAG, value="1")
    opset = default_opset(proto)
    if opset == 0:
        raise BnfoldError(f"{p}: the model imports no default ONNX opset")
    if opset < MIN_OPSET:
        raise BnfoldError(f"{p}: opset {opset} is not supported (bnfold needs opset {MIN_OPSET}+)")
    if check:
        try:
            onnx.checker.check_model(proto)
        except Exception as e:
            raise BnfoldError(f"{p}: invalid ONNX model: {_first_line(e)}") from None
    if infer_shapes and proto.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        try:
            proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
        except Exception as e:
            raise BnfoldError(f"{p}: shape inference failed: {_first_line(e)}") from None
    return proto


def from_proto(proto: onnx.ModelProto, *, source: str = "<model>") -> ir.Model:
    """Convert a validated proto into the IR and check bnfold's own preconditions."""
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:
        raise BnfoldError(f"{source}: cannot read the model graph: {_first_line(e)}") from None
    if model.metadata_props.pop(_EXTERNAL_FLAG, None) is not None:
        model.meta[_EXTERNAL_FLAG] = True
    _check_batchnorms(model, source)
    return model


def _check_batchnorms(model: ir.Model, source: str) -> None:
    """Refuse models whose BatchNormalization cannot mean inference (training mode, dtype)."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        label = node.name or (node.outputs[0].name if node.outputs else "?")
        if node.attributes.get_int("training_mode", 0) != 0:
            raise BnfoldError(
                f"{source}: BatchNormalization '{label}' is in training mode (training_mode=1); "
                "export the model in eval mode"
            )
        x = node.inputs[0] if node.inputs else None
        dtype = x.dtype if x is not None else None
        if dtype is not None and dtype not in _BN_DTYPES:
            raise BnfoldError(
                f"{source}: BatchNormalization '{label}' has unsupported dtype {dtype.name}"
            )


def load(
    path: str | os.PathLike[str],
    *,
    max_size_bytes: int | None = None,
    check: bool = True,
) -> ir.Model:
    """Load an ONNX model for bnfold.

    Reads ``path`` (and its external data, refusing locations outside the model's folder),
    runs ``onnx.checker`` and shape inference (dynamic dimensions are kept), and checks that every
    BatchNormalization is in inference mode with a float dtype.

    Raises:
        BnfoldError: with a one-line message naming the problem.
    """
    proto = load_proto(path, max_size_bytes=max_size_bytes, check=check)
    return from_proto(proto, source=str(path))


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize the IR into an ``onnx.ModelProto`` (tensors inline)."""
    return ir.serde.serialize_model(model)


def to_bytes(model: ir.Model | onnx.ModelProto) -> bytes:
    """Serialize deterministically: the same model always gives the same bytes."""
    proto = model if isinstance(model, onnx.ModelProto) else to_proto(model)
    return proto.SerializeToString(deterministic=True)


def _tensor_bytes(model: ir.Model) -> int:
    return sum(
        v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None
    )


def save(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
) -> None:
    """Save ``model`` to ``path`` atomically and deterministically.

    Args:
        model: The model.
        path: The ``.onnx`` file to write.
        external_data: Write tensors to ``<name>.data`` beside the model. ``None`` (default)
            keeps the format the model was loaded in, and switches to external data when the
            tensors would not fit in one protobuf.
    """
    target = Path(path)
    if external_data is None:
        external_data = bool(model.meta.get(_EXTERNAL_FLAG)) or (
            _tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
        )
    proto = to_proto(model)
    if not external_data:
        write_bytes(target, to_bytes(proto))
        return
    # External data: write both files into a temp folder beside the target, then rename the
    # data first and the model last, so a visible model file always has its complete data.
    target.parent.mkdir(parents=True, exist_ok=True)
    data_name = target.name + ".data"
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        onnx.external_data_helper.convert_model_to_external_data(
            proto, all_tensors_to_one_file=True, location=data_name, size_threshold=1024
        )
        onnx.external_data_helper.write_external_data_tensors(proto, str(tmp_dir))
        (tmp_dir / target.name).write_bytes(proto.SerializeToString(deterministic=True))
        old_data = target.parent / data_name
        backup = tmp_dir / (data_name + ".old")
        if old_data.exists():
            # Keep the previous data file until the new model is in place: if the model rename
            # fails, the old model gets its own data back instead of the new one.
            os.replace(old_data, backup)
        try:
            if (tmp_dir / data_name).exists():  # absent when every tensor is under the threshold
                os.replace(tmp_dir / data_name, old_data)
            os.replace(tmp_dir / target.name, target)
        except BaseException:
            if backup.exists():
                os.replace(backup, old_data)
            raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
