"""Loading and saving ONNX models: the only place that turns bytes into an IR and back.

``load`` reads a model defensively (size, protobuf, external-data locations, opset, checker,
shape inference, BatchNormalization preconditions) and raises :class:`BnfoldError` with one
line naming the problem. ``save`` writes deterministically (the same model gives the same
bytes) and atomically (temp file, then rename).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import Message

from bnfold.atomic import write_bytes
from bnfold.errors import BnfoldError
from bnfold.outputs import check_destination, remove_tree, signals_deferred

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


# Bits per element of each tensor element type (sub-byte types are packed); types not listed
# (UNDEFINED, STRING, the float6 types) are left to onnx.checker.
_ELEMENT_BITS = {
    **dict.fromkeys((2, 3, 9, 17, 18, 19, 20, 24), 8),  # (u)int8, bool, float8 kinds
    **dict.fromkeys((4, 5, 10, 16), 16),  # (u)int16, float16, bfloat16
    **dict.fromkeys((1, 6, 12), 32),  # float, int32, uint32
    **dict.fromkeys((7, 11, 13, 14), 64),  # int64, double, uint64, complex64
    15: 128,  # complex128
    **dict.fromkeys((21, 22, 23), 4),  # (u)int4, float4e2m1
    **dict.fromkeys((25, 26), 2),  # (u)int2
}
# How many values of the typed (non-raw) fields one element takes, when not one.
_VALUES_PER_ELEMENT = {14: 2, 15: 2}
_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")


def _check_strings(message: Message, path: Path) -> None:
    """Refuse text fields that are not UTF-8 (protobuf hands them over as bytes, unchecked).

    onnx.checker accepts them, but the folded model could not be written: onnx_ir refuses to
    serialize them (a flipped byte in ``producer_version`` was an internal error).
    """
    for field, value in message.ListFields():
        values = value if field.is_repeated else [value]
        if field.type == field.TYPE_MESSAGE:
            for v in values:
                _check_strings(v, path)
        elif field.type == field.TYPE_STRING and any(isinstance(v, bytes) for v in values):
            bad = next(v for v in values if isinstance(v, bytes))
            raise BnfoldError(f"{path}: {field.full_name} is not valid UTF-8 ({bad[:40]!r})")


def _int_entry(tensor: onnx.TensorProto, key: str, value: str) -> int:
    """An external-data ``offset``/``length``: a non-negative decimal integer, or BnfoldError."""
    if not value.isdigit() or not value.isascii():
        raise BnfoldError(
            f"tensor '{tensor.name}': external data {key} '{value}' is not a non-negative integer"
        )
    return int(value)


def _external_bytes(tensor: onnx.TensorProto, base: Path) -> int:
    """Check one external tensor's reference; return the bytes it would read.

    A model is untrusted input: a location such as ``../../etc/passwd`` or an absolute path (or a
    symlink pointing out) would make bnfold read, and later copy, files it has no business with.
    """
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    if not location:
        raise BnfoldError(f"tensor '{tensor.name}' uses external data but names no location")
    if "\0" in location:
        raise BnfoldError(f"tensor '{tensor.name}': external data location contains a NUL byte")
    if os.path.isabs(location) or ".." in Path(location).parts:
        raise BnfoldError(
            f"tensor '{tensor.name}': external data location '{location}' is outside the "
            "model's folder (absolute or '..' paths are refused)"
        )
    try:
        data_path = (base / location).resolve()
        inside = base in data_path.parents
        size = data_path.stat().st_size if inside and data_path.is_file() else -1
    except OSError as e:  # a name too long, a symlink loop...
        raise BnfoldError(
            f"tensor '{tensor.name}': external data '{location}' cannot be read ({e.strerror})"
        ) from None
    if not inside:
        raise BnfoldError(
            f"tensor '{tensor.name}': external data '{location}' resolves outside the "
            "model's folder (symlink out?)"
        )
    if size < 0:  # missing, or a folder, FIFO or device (reading a FIFO would block forever)
        raise BnfoldError(
            f"tensor '{tensor.name}': external data file '{location}' is missing or not a "
            "regular file"
        )
    offset = _int_entry(tensor, "offset", info["offset"]) if "offset" in info else 0
    length = _int_entry(tensor, "length", info["length"]) if "length" in info else None
    end = offset + (length or 0)
    if offset > size or end > size:
        raise BnfoldError(
            f"tensor '{tensor.name}': external data file '{location}' is too short "
            f"({size} bytes, needs {max(offset, end)})"
        )
    # Without a length onnx reads from the offset to the end of the file.
    return length if length is not None else size - offset


def _check_tensor_data(tensor: onnx.TensorProto, available: int | None) -> None:
    """Refuse a tensor whose data does not match its dims (``available``: external bytes).

    Neither onnx.checker nor shape inference compares the data with the dims; onnxruntime
    refuses such a model, and bnfold would otherwise pass the mismatch through to its output.
    """
    if any(d < 0 for d in tensor.dims):
        raise BnfoldError(f"tensor '{tensor.name}' has a negative dimension {list(tensor.dims)}")
    bits = _ELEMENT_BITS.get(tensor.data_type)
    if bits is None:
        return
    count = math.prod(tensor.dims)
    need = (count * bits + 7) // 8
    if available is None and tensor.HasField("raw_data"):
        available = len(tensor.raw_data)
    if available is not None:
        if available != need:
            raise BnfoldError(
                f"tensor '{tensor.name}' has {available} bytes of data; its dims "
                f"{list(tensor.dims)} need {need}"
            )
        return
    values = sum(len(getattr(tensor, f)) for f in _TYPED_FIELDS)
    # Packed sub-byte types hold 8 // bits elements per int32 value.
    want = need if bits < 8 else count * _VALUES_PER_ELEMENT.get(tensor.data_type, 1)
    if values != want:
        raise BnfoldError(
            f"tensor '{tensor.name}' has {values} values; its dims {list(tensor.dims)} need {want}"
        )


def _check_tensors(proto: onnx.ModelProto, base_dir: Path) -> int:
    """Check every tensor's data against its dims and every external reference; return the
    bytes of external data the model references."""
    total = 0
    base = base_dir.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        available = None
        if onnx.external_data_helper.uses_external_data(tensor):
            available = _external_bytes(tensor, base)
            total += available
        _check_tensor_data(tensor, available)
    return total


@dataclasses.dataclass(frozen=True)
class Source:
    """A model file read once: the validated proto and the sha256 of the bytes that were read.

    A command that needs the model more than once (fold it, hash it, run it as the reference)
    takes everything from this, so that the file is read once and a file replaced mid-command
    cannot make the manifest describe one model and the artifact another.
    """

    path: Path
    proto: onnx.ModelProto
    sha256: str


def _read_bytes(path: Path) -> bytes:
    """The one read of a model file's bytes (its external data is read separately)."""
    return path.read_bytes()


def load_proto(
    path: str | os.PathLike[str],
    *,
    max_size_bytes: int | None = None,
    check: bool = True,
    infer_shapes: bool = True,
) -> onnx.ModelProto:
    """Read and validate an ONNX file (with its external data); raise BnfoldError if unusable."""
    return read_source(
        path, max_size_bytes=max_size_bytes, check=check, infer_shapes=infer_shapes
    ).proto


def read_source(
    path: str | os.PathLike[str],
    *,
    max_size_bytes: int | None = None,
    check: bool = True,
    infer_shapes: bool = True,
) -> Source:
    """Read an ONNX file once and validate it (with its external data); see :class:`Source`.

    Raises:
        BnfoldError: The file is missing, too large, not ONNX, or fails a check.
    """
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
    data = _read_bytes(p)
    digest = hashlib.sha256(data).hexdigest()
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf raises DecodeError, RuntimeError or ValueError
        raise BnfoldError(f"{p}: not a valid ONNX protobuf ({_first_line(e)})") from None
    del data  # a large model's bytes are not kept beside its proto
    if not proto.HasField("graph") or proto.ir_version == 0:
        raise BnfoldError(f"{p}: not an ONNX model (no graph or IR version)")
    _check_strings(proto, p)
    external = _check_tensors(proto, p.parent)
    if max_size_bytes is not None and size + external > max_size_bytes:
        raise BnfoldError(
            f"{p}: {size + external} bytes with external data is over the size limit of "
            f"{max_size_bytes} bytes"
        )
    external_tensors = [
        t
        for t in onnx.external_data_helper._get_all_tensors(proto)
        if onnx.external_data_helper.uses_external_data(t)
    ]
    # Checker and shape inference run before the (large) external data is read: on the data
    # they cost a full copy each (a 1 GB model peaked at 5 GB and took 20 s to load). Small
    # tensors are read first, so that shape inference still sees Reshape shapes and the like.
    _read_external(p, [t for t in external_tensors if _data_bytes(t) <= _SMALL_TENSOR_BYTES])
    opset = default_opset(proto)
    if opset == 0:
        raise BnfoldError(f"{p}: the model imports no default ONNX opset")
    if opset < MIN_OPSET:
        raise BnfoldError(f"{p}: opset {opset} is not supported (bnfold needs opset {MIN_OPSET}+)")
    if check:
        try:
            # With external data, the checker reads the file itself (it then knows the folder
            # that the data locations are relative to).
            onnx.checker.check_model(str(p) if external_tensors else proto)
        except Exception as e:
            raise BnfoldError(f"{p}: invalid ONNX model: {_first_line(e)}") from None
    if infer_shapes and proto.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        try:
            proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
        except Exception as e:
            raise BnfoldError(f"{p}: shape inference failed: {_first_line(e)}") from None
    if external_tensors:
        _read_external(p, None, proto)
        proto.metadata_props.add(key=_EXTERNAL_FLAG, value="1")
    return Source(p, proto, digest)


_SMALL_TENSOR_BYTES = 64 * 1024


def _data_bytes(tensor: onnx.TensorProto) -> int:
    bits = _ELEMENT_BITS.get(tensor.data_type, 64)
    return (math.prod(tensor.dims) * bits + 7) // 8


def _read_external(
    path: Path, tensors: list[onnx.TensorProto] | None, proto: onnx.ModelProto | None = None
) -> None:
    """Read the external data of ``tensors`` (or of every tensor of ``proto``) into them."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if proto is not None:
                onnx.load_external_data_for_model(proto, str(path.parent))
            for t in tensors or []:
                onnx.external_data_helper.load_external_data_for_tensor(t, str(path.parent))
        for w in caught:  # e.g. unknown external-data keys: not worth a line on stderr
            logger.info("%s: %s", path, w.message)
    except Exception as e:
        raise BnfoldError(f"{path}: cannot read external data ({_first_line(e)})") from None
    # What was read is checked again: the reference was checked before, as bnfold reads it,
    # and this guards against onnx reading it differently.
    read = tensors if proto is None else onnx.external_data_helper._get_all_tensors(proto)
    for t in read or []:
        _check_tensor_data(t, None)


def from_proto(proto: onnx.ModelProto, *, source: str = "<model>") -> ir.Model:
    """Convert a validated proto into the IR and check bnfold's own preconditions."""
    inputs = {vi.name: vi.type for vi in proto.graph.input}
    for vi in [*proto.graph.output, *proto.graph.value_info]:
        # The IR has one value per name: a second, different declaration of a graph input (an
        # output passing the input through, or a value_info) would silently change the input's
        # declared type or shape in the folded model.
        if vi.name in inputs and vi.HasField("type") and vi.type != inputs[vi.name]:
            raise BnfoldError(
                f"{source}: graph input '{vi.name}' is declared again with another type or shape"
            )
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:
        raise BnfoldError(f"{source}: cannot read the model graph: {_first_line(e)}") from None
    if model.metadata_props.pop(_EXTERNAL_FLAG, None) is not None:
        model.meta[_EXTERNAL_FLAG] = True
    _check_batchnorms(model, source)
    return model


def _check_batchnorms(model: ir.Model, source: str) -> None:
    """Refuse models whose BatchNormalization cannot mean inference (training mode, dtype).

    Every BN counts: the main graph, its subgraphs, and the model-local functions. Training mode
    has two spellings: ``training_mode=1`` (opset 14+), and outputs 1..4 (running mean/var and
    saved mean/var), which ONNX defines only in training mode; that is what torch writes for a
    model left in ``train()`` at opsets 7-13. Such a BN normalizes with the batch statistics,
    so folding its running statistics would change the results.
    """
    graphs = [model.graph, *model.functions.values()]
    for node in (n for g in graphs for n in ir.traversal.RecursiveGraphIterator(g)):
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        label = node.name or (node.outputs[0].name if node.outputs else "?")
        if node.attributes.get_int("training_mode", 0) != 0:
            raise BnfoldError(
                f"{source}: BatchNormalization '{label}' is in training mode (training_mode=1); "
                "export the model in eval mode"
            )
        extra = [v.name for v in node.outputs[1:] if v is not None and v.name]
        if extra:
            raise BnfoldError(
                f"{source}: BatchNormalization '{label}' is in training mode (it has the "
                f"training-only outputs {extra}); export the model in eval mode"
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
    proto = ir.serde.serialize_model(model)
    for function in proto.functions:
        # onnx_ir leaves an empty domain unset; onnx.checker requires the field to be present
        # (a model-local function in the default domain would otherwise fail after folding).
        function.domain = function.domain
    return proto


def check_model(model: ir.Model) -> None:
    """Run ``onnx.checker`` on the model's structure (raises what the checker raises).

    Tensors over 1 MiB are checked without their data: the checker's copy of a 1 GB model would
    cost 2 GB more at peak, and the data of a tensor is not what it checks (an empty first
    dimension keeps it valid without a value field).
    """
    proto = to_proto(model)
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.dims and tensor.HasField("raw_data") and len(tensor.raw_data) > 1 << 20:
            tensor.ClearField("raw_data")
            tensor.dims[0] = 0
    onnx.checker.check_model(proto)


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
    data_name = target.name + ".data"
    for written in (target, target.parent / data_name):
        check_destination(written)  # a folder named like the data file is not bnfold's
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir: Path | None = None
    try:
        with signals_deferred():  # an interrupt lands once the folder's name is known
            tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        # What convert_model_to_external_data does, without its check that `data_name` does
        # not exist relative to the *working directory* (a second fold from the folder that
        # holds the first output's data file failed with FileExistsError).
        for tensor in onnx.external_data_helper._get_initializer_tensors(proto):
            if tensor.HasField("raw_data") and sys.getsizeof(tensor.raw_data) >= 1024:
                onnx.external_data_helper.set_external_data(tensor, data_name)
        onnx.external_data_helper.write_external_data_tensors(proto, str(tmp_dir))
        (tmp_dir / target.name).write_bytes(proto.SerializeToString(deterministic=True))
        umask = os.umask(0)
        os.umask(umask)
        for written in (tmp_dir / data_name, tmp_dir / target.name):
            if written.exists():
                # onnx creates the data file 0600; outputs get the mode open() would give. And
                # both are on disk before they are renamed, as write_bytes does for one file.
                os.chmod(written, 0o666 & ~umask)
                with open(written, "rb+") as f:
                    os.fsync(f.fileno())
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
        if tmp_dir is not None:
            remove_tree(tmp_dir)
