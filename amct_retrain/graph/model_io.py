"""Reading and writing Caffe models in Python, validated before Caffe's C++ sees them.

Caffe's CHECKs abort the whole process on a bad prototxt or a mismatching caffemodel, so the
toolkit asks Caffe about a model in a child process (`probe_param_shapes`) and parses
caffemodels with protobuf here: a user gets an exception naming the file and the layer.
"""
import json
import logging
import math
import mmap
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import DecodeError

from amct_retrain import numerics
from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.fileio import parse_text_proto, read_text_file
from amct_retrain.graph.netgraph import runs_in_phase, uses_stages_or_levels
from amct_retrain.layer_types import QUANTIZABLE_RULES, WEIGHT_LAYER_TYPES, weight_shape_mismatch
from amct_retrain.errors import ModelError  # noqa: F401 (re-exported)

LOG = logging.getLogger(__name__)


def read_prototxt(model_file: str | os.PathLike) -> caffe_pb2.NetParameter:
    """Parse a Caffe prototxt into a ``NetParameter`` without going through Caffe's C++.

    A net written with V1 ``layers { }`` blocks is upgraded with Caffe's own
    ``upgrade_net_proto_text`` tool (in a child process) and then parsed. Raises
    :class:`ModelError` for a missing file or a parse error (``FILE:LINE:COL: message``).
    """
    path = os.fspath(model_file)
    net = caffe_pb2.NetParameter()
    try:
        parse_text_proto(path, read_text_file(path, "model file", ModelError), net, ModelError)
    except ModelError as err:
        if "round_mode" in str(err):  # written for upstream Caffe, whose field this fork renamed
            raise ModelError(f"{err}. This Caffe's PoolingParameter has 'ceil_mode: true|false' (field 13) "
                             "where upstream Caffe has 'round_mode: CEIL|FLOOR': write 'ceil_mode: false' for "
                             "FLOOR (or drop the field for CEIL)") from None
        raise
    if len(net.layers):
        net = _upgraded(path)
    check_net_structure(net, path)
    return net


def check_net_structure(net: caffe_pb2.NetParameter, path: str) -> None:
    """Refuse a net with no layers, and two layers of one name that may run in the same phase
    (Caffe would build both, and weights, the record and the quantizers all go by layer name).
    One name under disjoint phase rules (a TRAIN and a TEST data layer) is fine; so are layers
    whose rules use stages or levels, which the toolkit cannot decide."""
    if not net.layer:
        raise ModelError(f"{path}: the net has no layers (an empty prototxt?)")
    first: dict[str, int] = {}
    for index, layer in enumerate(net.layer):
        if not layer.name:
            continue
        if layer.name not in first:
            first[layer.name] = index
            continue
        other = net.layer[first[layer.name]]
        if uses_stages_or_levels(layer) or uses_stages_or_levels(other):
            continue
        for phase in (caffe_pb2.TRAIN, caffe_pb2.TEST):
            if runs_in_phase(layer, phase) and runs_in_phase(other, phase):
                raise ModelError(f"{path}: layer '{layer.name}' ({layer.type}, layer #{index + 1}) has the name of "
                                 f"layer #{first[layer.name] + 1} ({other.type}), and both run in the "
                                 f"{caffe_pb2.Phase.Name(phase)} phase: layer names must be unique (weights, "
                                 "quantizers and the record go by name); rename one")


def caffe_tool(name: str) -> str:
    """Path of one of the built Caffe's command-line tools (``upgrade_net_proto_text``, ...)."""
    from amct_retrain import caffe_build  # the tools sit in the build tree beside pycaffe

    root = caffe_build.caffe_root()
    path = caffe_build.caffe_tool(root, name)
    if path is None:
        raise ModelError(f"the Caffe at {root} has no command-line tool '{name}' in build/tools: build its tools "
                         "(make all)")
    return path


def _upgraded(path: str) -> caffe_pb2.NetParameter:
    """A V1 net upgraded by Caffe's upgrade_net_proto_text (the routines Caffe itself uses)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "upgraded.prototxt")
        run = subprocess.run([caffe_tool("upgrade_net_proto_text"), path, out], capture_output=True, text=True,
                             env=dict(os.environ, GLOG_minloglevel="1"))
        if run.returncode or not os.path.exists(out):
            reason = (run.stderr.strip().splitlines() or ["no output"])[-1]
            raise ModelError(f"{path}: Caffe could not upgrade this V1 net: {reason}")
        net = caffe_pb2.NetParameter()
        parse_text_proto(out, read_text_file(out, "upgraded model", ModelError), net, ModelError)
    LOG.info("%s: V1 layer definitions upgraded with Caffe's upgrade_net_proto_text", path)
    return net


class CaffemodelParams(Mapping):
    """Layer name -> float32 arrays in blob order, converted from the parsed caffemodel on
    first access (a retrained model holds two copies of every quantized weight, and a saver
    needs one)."""

    def __init__(self, net: caffe_pb2.NetParameter, source: str) -> None:
        self._source = source
        self._layers = {}
        for layer in list(net.layer) + list(net.layers):  # `layers`: V1 definitions
            if layer.blobs and layer.name not in self._layers:
                self._layers[layer.name] = layer
        self._arrays: dict[str, list[np.ndarray]] = {}

    def __getitem__(self, name: str) -> list[np.ndarray]:
        if name not in self._arrays:
            layer = self._layers[name]
            self._arrays[name] = [blob_to_array(b, self._source, name) for b in layer.blobs]
        return self._arrays[name]

    def __contains__(self, name: object) -> bool:
        return name in self._layers  # without converting the layer's blobs

    def __iter__(self):
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)


def read_caffemodel(weights_file: str | os.PathLike) -> Mapping[str, list[np.ndarray]]:
    """The blobs of every layer of a caffemodel: layer name -> float32 arrays in blob order
    (read-only views of the memory-mapped file for the common packed-float files: a saver
    touches only the pages of the blobs it uses, a third of a retrained caffemodel)."""
    try:
        with open(weights_file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except OSError as err:
        raise ModelError(f"{weights_file}: cannot read the weights file: {err.strerror}") from None
    fast = _packed_float_params(data)
    if fast is not None:
        return fast
    return CaffemodelParams(parse_caffemodel(bytes(data), os.fspath(weights_file)), os.fspath(weights_file))


def parse_caffemodel(data: bytes, weights_file: str) -> caffe_pb2.NetParameter:
    """The NetParameter of a caffemodel's bytes; bytes that are none raise :class:`ModelError`
    naming the file."""
    try:
        return caffe_pb2.NetParameter.FromString(data)
    except (DecodeError, RecursionError, ValueError) as err:
        raise ModelError(f"{weights_file}: not a caffemodel (binary NetParameter): {err}") from None


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes, start: int, end: int):
    """(field number, wire type, value start, value end) of each field in buf[start:end];
    for a varint the value itself stands in the start slot. Raises on other wire types."""
    pos = start
    while pos < end:
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
            yield number, wire, value, pos
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            yield number, wire, pos, pos + length
            pos += length
        else:
            raise ValueError(f"wire type {wire}")


def _packed_float_params(buf: bytes) -> dict[str, list[np.ndarray]] | None:
    """The caffemodel's blobs straight from its bytes (views, no copy), for the files Caffe and
    this toolkit write: layer { name, blobs { shape, packed data } }. None for anything else
    (V1 layers, legacy 4-D dims, double or integer data, corrupt bytes): protobuf reads those.

    Protobuf's parser plus the conversion to numpy takes about a second for the 300 MB a
    retrained ResNet-50 holds; this walks a few thousand fields.
    """
    params: dict[str, list[np.ndarray]] = {}
    try:
        for number, wire, start, end in _fields(buf, 0, len(buf)):
            if number == 2:  # V1 `layers`
                return None
            if number != 100 or wire != 2:
                continue
            name, blobs = None, []
            for lnum, lwire, lstart, lend in _fields(buf, start, end):
                if lnum == 1 and lwire == 2:
                    name = buf[lstart:lend].decode()
                elif lnum == 7 and lwire == 2:
                    shape, values = None, None
                    for bnum, bwire, bstart, bend in _fields(buf, lstart, lend):
                        if bnum == 7 and bwire == 2:
                            dims, pos = [], bstart
                            for dnum, dwire, dstart, dend in _fields(buf, bstart, bend):
                                if dnum != 1 or dwire != 2:
                                    return None
                                pos = dstart
                                while pos < dend:
                                    dim, pos = _read_varint(buf, pos)
                                    dims.append(dim)
                            shape = tuple(dims)
                        elif bnum == 5 and bwire == 2 and (bend - bstart) % 4 == 0:
                            values = np.frombuffer(buf, "<f4", (bend - bstart) // 4, bstart)
                        else:
                            return None
                    if shape is None or values is None or values.size != math.prod(shape):
                        return None
                    blobs.append(values.reshape(shape))
            if name is not None and blobs and name not in params:
                params[name] = blobs
    except (ValueError, IndexError, UnicodeDecodeError):
        return None
    return params


def blob_to_array(blob: caffe_pb2.BlobProto, source: str | os.PathLike = "", layer: str = "") -> np.ndarray:
    """A float BlobProto as a float32 array of its shape (legacy num/channels/height/width too)."""
    if blob.HasField("shape"):
        shape = tuple(blob.shape.dim)
    else:
        legacy = (blob.num, blob.channels, blob.height, blob.width)
        shape = tuple(legacy[next((i for i, d in enumerate(legacy) if d != 1), 3):]) if any(legacy) else ()
    values = np.array(blob.data if blob.data else blob.double_data, dtype=np.float32)
    if values.size != math.prod(shape):
        raise ModelError(f"{source}: layer '{layer}': blob holds {values.size} values for shape {shape}")
    return values.reshape(shape)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def length_delimited_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


@dataclass(frozen=True)
class LazyBlob:
    """A float32 or int8 blob of ``shape`` whose values the caffemodel writer asks of ``rows(start,
    stop)`` (the blob's rows start..stop of axis 0) a few MB at a time as it writes them: a VGG-16's
    fake-quant or int8 weights are then never in memory beside its float weights."""

    shape: tuple[int, ...]
    dtype: type
    rows: Callable[[int, int], np.ndarray]


_LAZY_CHUNK_BYTES = 8 << 20


def arq_weight_blob(weights: np.ndarray, scale_w: np.ndarray, channel_axis: int | None,
                    codes: bool = False, num_bits: int = numerics.DEFAULT_BITS) -> LazyBlob:
    """ARQ of float ``weights`` with ``scale_w`` on ``channel_axis`` at ``num_bits`` as a :class:`LazyBlob`:
    the fake-quant float32 weights, or with ``codes`` the int8 codes (numerics' definitions)."""
    from amct_retrain import kernels  # numba loads only where weights are written, not on every prototxt read

    def rows(start: int, stop: int) -> np.ndarray:
        scale = scale_w[start:stop] if channel_axis == 0 else scale_w  # per output channel: the rows' own
        if codes:
            return numerics.arq_quantize(weights[start:stop], scale, channel_axis, num_bits)
        return kernels.arq_fake_quantize(weights[start:stop], scale, channel_axis, num_bits)

    if weights.ndim == 0:
        raise ValueError("arq_weight_blob: weights need at least one axis")
    return LazyBlob(tuple(weights.shape), np.int8 if codes else np.float32, rows)


def _blob_data_field(array: np.ndarray | LazyBlob) -> tuple[int, int]:
    """(BlobProto field number, bytes) of the values: packed float ``data`` = 5, ``int8_data`` = 10."""
    count = math.prod(array.shape)
    return (10, count) if np.dtype(array.dtype) == np.int8 else (5, 4 * count)


def _float_blob_chunks(array: np.ndarray | LazyBlob) -> list[bytes | memoryview | LazyBlob]:
    # BlobProto: shape (field 7: BlobShape.dim, field 1, packed) and packed float data (field 5)
    # or int8_data (field 10); the data goes out as a view of the array, never copied into a bytes
    # object, or computed as it goes out (LazyBlob).
    if not isinstance(array, LazyBlob):
        array = np.ascontiguousarray(array, dtype="<f4")
    field, nbytes = _blob_data_field(array)
    header = length_delimited_field(7, length_delimited_field(1, b"".join(_varint(d) for d in array.shape)))
    data = array if isinstance(array, LazyBlob) else memoryview(array).cast("B")
    return [header, _varint(field << 3 | 2) + _varint(nbytes), data]


def _chunk_size(chunk: bytes | memoryview | LazyBlob) -> int:
    return _blob_data_field(chunk)[1] if isinstance(chunk, LazyBlob) else len(chunk)


def _materialized(chunks: list[bytes | memoryview | LazyBlob]) -> Iterator[bytes | memoryview]:
    for chunk in chunks:
        if not isinstance(chunk, LazyBlob):
            yield chunk
            continue
        n_rows = chunk.shape[0]
        row_bytes = _blob_data_field(chunk)[1] // max(n_rows, 1)
        step = max(1, _LAZY_CHUNK_BYTES // max(row_bytes, 1))
        for start in range(0, n_rows, step):
            stop = min(start + step, n_rows)
            values = np.ascontiguousarray(chunk.rows(start, stop), dtype=np.dtype(chunk.dtype).newbyteorder("<"))
            if values.shape != (stop - start, *chunk.shape[1:]):
                raise AssertionError(f"rows {start}..{stop} of a lazy blob of shape {chunk.shape}: got {values.shape}")
            yield memoryview(values).cast("B")


def _float_blob_bytes(array: np.ndarray) -> bytes:
    return b"".join(_float_blob_chunks(array))


def array_to_blob(array: np.ndarray) -> caffe_pb2.BlobProto:
    """A float32 BlobProto of ``array``'s shape and values."""
    return caffe_pb2.BlobProto.FromString(_float_blob_bytes(array))


def integer_blob(array: np.ndarray) -> caffe_pb2.BlobProto:
    """A deploy blob: int8 in ``int8_data`` (bytes), int32 in ``int32_data``, uint64 in
    ``uint64_data`` (contract section 3), with ``array``'s shape."""
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(array.shape)
    if array.dtype == np.int8:
        blob.int8_data = array.tobytes()
    elif array.dtype == np.int32:
        blob.int32_data.extend(array.ravel().tolist())
    elif array.dtype == np.uint64:
        blob.uint64_data.extend(array.ravel().tolist())
    else:
        raise TypeError(f"no deploy blob field for dtype {array.dtype}")
    return blob


def caffemodel_chunks(name: str, params: Mapping[str, list[np.ndarray | LazyBlob]]) -> Iterator[bytes | memoryview]:
    """A caffemodel (binary NetParameter) holding ``params`` (layer name -> blobs), as chunks to
    write one after the other: float arrays (and :class:`LazyBlob`, computed as they are reached)
    become float blobs, int8 / int32 / uint64 arrays deploy blobs.

    Encoded field by field (NetParameter.name = 1, .layer = 100; LayerParameter.name = 1,
    .blobs = 7) with the weights as views of the arrays: building protobuf messages and
    serializing them copies a ResNet-50's 100 MB three times.
    """
    yield length_delimited_field(1, name.encode())
    for layer_name, blobs in params.items():
        layer: list[bytes | memoryview | LazyBlob] = [length_delimited_field(1, layer_name.encode())]
        for array in blobs:
            if isinstance(array, LazyBlob) or np.issubdtype(array.dtype, np.floating):
                blob = _float_blob_chunks(array)
            else:
                blob = [integer_blob(array).SerializeToString()]
            layer += [_varint(7 << 3 | 2) + _varint(sum(map(_chunk_size, blob))), *blob]
        yield _varint(100 << 3 | 2) + _varint(sum(map(_chunk_size, layer)))
        yield from _materialized(layer)


def caffemodel_bytes(name: str, params: Mapping[str, list[np.ndarray | LazyBlob]]) -> bytes:
    """:func:`caffemodel_chunks` joined into one bytes object."""
    return b"".join(caffemodel_chunks(name, params))


# The child loads pycaffe's extension module alone (a third of the time `import caffe` takes);
# a net's Python layers import the caffe package on top of it, with caffe.io (scikit-image and
# scipy: most of that time, and no layer's set-up uses it) loaded only if something reads it.
_CHILD_PREAMBLE = """
import importlib, importlib.util, json, sys, types
class _OnFirstUse(types.ModuleType):
    def __getattr__(self, name):
        del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), name)
sys.modules["caffe.io"] = _OnFirstUse("caffe.io")
spec = importlib.util.spec_from_file_location("caffe._caffe", sys.argv[1])
_caffe = importlib.util.module_from_spec(spec)
sys.modules["caffe._caffe"] = _caffe
spec.loader.exec_module(_caffe)
_caffe.set_mode_cpu()
PHASES = {"TRAIN": 0, "TEST": 1}
"""

_PROBE = _CHILD_PREAMBLE + """
shapes, bottoms = {}, {}
for phase in sys.argv[3:]:
    print("AMCT_PHASE " + phase, file=sys.stderr, flush=True)
    try:
        built = _caffe.Net(sys.argv[2], PHASES[phase])
    except Exception as err:  # a Python layer refused its setup
        print("AMCT_ERROR " + json.dumps(str(err)), flush=True)
        sys.exit(1)
    names, blobs = list(built._layer_names), list(built._blobs)
    for i, layer in enumerate(built.layers):
        if len(layer.blobs):
            shapes.setdefault(names[i], [list(b.data.shape) for b in layer.blobs])
        bottoms.setdefault(names[i], [list(blobs[j].data.shape) for j in built._bottom_ids(i)])
    del built, blobs  # before the next phase's net: one net's weights in memory at a time, not two
print("AMCT_PROBE " + json.dumps({"params": shapes, "bottoms": bottoms}))
"""

# Builds the nets of the files given, the first 1, 2, ... layers of a net, until Caffe aborts: the
# last count printed is the number of layers that build, so the next layer is the one it refused.
_PREFIXES = _CHILD_PREAMBLE + """
for count, path in enumerate(sys.argv[3:], 1):
    try:
        _caffe.Net(path, PHASES[sys.argv[2]])
    except Exception:
        break
    print("AMCT_BUILT " + str(count), flush=True)
"""

# What some of Caffe's CHECKs mean for the user: (a piece of the message, the layer types it is
# said for, or () for any, the hint); a quantizable type's own hints (QuantRule.check_hints) first.
_CHECK_HINTS = (
    ("channels_ % group_", (), "convolution_param.group must divide the input channels"),
    ("num_output_ % group_", (), "convolution_param.group must divide num_output"),
    ("exceeds INT_MAX", (), "a blob of this layer would hold more than 2^31-1 values: num_output or a shape too large"),
    ("shape[i] >= 0", ("Input", "DummyData"), "a negative dimension in the layer's shape fields"),
    ("shape[i] >= 0", (), "a negative dimension: a shape field, or a window larger than its input"),
)


def _caffe_extension() -> str:
    import caffe._caffe  # the same build as this process's pycaffe

    return caffe._caffe.__file__


def _fatal_message(stderr: str) -> tuple[str | None, str]:
    """(the phase being built, Caffe's fatal message or the last line) of a child's log."""
    phase, fatal, last = None, None, "no output"
    for line in stderr.splitlines():
        if line.startswith("AMCT_PHASE "):
            phase = line.split()[1]
        elif line[:1] in "FE" and line[1:5].isdigit() and "] " in line and fatal is None:
            fatal = line.split("] ", 1)[1].strip()
        elif line.strip():
            last = line.strip()
    return phase, fatal or last


def _culprit(net: caffe_pb2.NetParameter, phase: str, fatal: str, net_file: str) -> caffe_pb2.LayerParameter | None:
    """The layer Caffe could not set up in ``phase``: named by the message, else the layer after
    the longest prefix of the net that builds (asked of another child)."""
    if "Unknown layer type: " in fatal:
        layer_type = fatal.split("Unknown layer type: ", 1)[1].split(" (known types", 1)[0].strip()
        return next((layer for layer in net.layer if layer.type == layer_type), None)
    prefixes = []
    for count in range(1, len(net.layer) + 1):
        prefix = caffe_pb2.NetParameter()
        prefix.CopyFrom(net)
        del prefix.layer[count:]
        prefixes.append(f"{net_file}.{count}")
        with open(prefixes[-1], "w", encoding="utf-8") as f:
            f.write(text_format.MessageToString(prefix))
    run = subprocess.run([sys.executable, "-c", _PREFIXES, _caffe_extension(), phase, *prefixes],
                         capture_output=True, text=True, env=dict(os.environ, GLOG_minloglevel="2"))
    built = [int(line.split()[1]) for line in run.stdout.splitlines() if line.startswith("AMCT_BUILT ")]
    count = built[-1] if built else 0
    return net.layer[count] if count < len(net.layer) else None


def _describe_failure(net: caffe_pb2.NetParameter | None, phase: str | None, fatal: str, net_file: str) -> str:
    if "Unknown layer type: " in fatal:
        layer_type = fatal.split("Unknown layer type: ", 1)[1].split(" (known types", 1)[0].strip()
        message = f"unknown layer type '{layer_type}' (not a layer type of this Caffe build)"
    else:
        message = fatal
    culprit = [f"{phase} phase"] if phase else []
    layer = _culprit(net, phase, fatal, net_file) if net is not None and phase else None
    rule = QUANTIZABLE_RULES.get(layer.type) if layer is not None else None
    hints = [(piece, (), h) for piece, h in (rule.check_hints if rule else ())] + list(_CHECK_HINTS)
    hint = next((h for piece, types, h in hints
                 if piece in fatal and (not types or (layer is not None and layer.type in types))), None)
    message += f" ({hint})" if hint else ""
    if layer is not None and f"'{layer.name}'" not in fatal:
        culprit.append(f"layer '{layer.name}' ({layer.type})")
    return f"{', '.join(culprit)}: {message}" if culprit else message


def run_caffe_child(script: str, args: list[str], marker: str, failure: str,
                    net: caffe_pb2.NetParameter | None = None) -> object:
    """Run ``script`` (Python that builds Caffe nets) in a child process and return the JSON it
    prints after ``marker``. If Caffe aborts the child (a CHECK failed), raise ModelError
    ``failure: <Caffe's fatal message>`` instead of losing this interpreter; with ``net`` (the net
    in the file ``args[1]``, which the child builds in the phases ``args[2:]``), the message also
    names the phase and the layer Caffe could not set up. A child that prints ``AMCT_ERROR <JSON
    message>`` (a toolkit layer refused its setup) raises that message.
    """
    run = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                         env=dict(os.environ, GLOG_minloglevel="2"))
    for line in run.stdout.splitlines():
        if line.startswith(marker + " "):
            return json.loads(line[len(marker) + 1:])
        if line.startswith("AMCT_ERROR "):
            raise ModelError(json.loads(line[len("AMCT_ERROR "):]))
    phase, fatal = _fatal_message(run.stderr)
    raise ModelError(f"{failure}: {_describe_failure(net, phase, fatal, args[1] if net is not None else '')}")


def probe_param_shapes(model_file: str | os.PathLike) -> dict[str, list[tuple[int, ...]]]:
    """The parameter blob shapes Caffe gives each layer of ``model_file`` (TRAIN and TEST nets).

    Runs in a child process, so a model that trips one of Caffe's CHECKs becomes a
    ModelError carrying Caffe's own message instead of killing this interpreter.
    """
    return probe_shapes(model_file).params


@dataclass(frozen=True)
class ProbedShapes:
    """What Caffe says about a model's shapes: layer -> its parameter blob shapes, and layer ->
    the shapes of its bottom blobs (the first phase, TRAIN then TEST, that builds the layer)."""
    params: dict[str, list[tuple[int, ...]]]
    bottoms: dict[str, list[tuple[int, ...]]]


def probe_shapes(model_file: str | os.PathLike) -> ProbedShapes:
    """:func:`probe_param_shapes` and the layers' input shapes, from one child process (the
    input shapes decide whether an AVE Pooling's windows tile its input)."""
    return probe_net(read_prototxt(model_file), os.fspath(model_file))


_FILLERS = ("weight_filler", "bias_filler", "filler")
_SOURCE_FIELDS = ("source", "mean_file")
_probe_cache: dict[tuple, ProbedShapes] = {}
_PROBE_CACHE_SIZE = 16


def _shapes_only(net: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    # Without fillers (constant 0) Caffe does not spend seconds drawing random weights.
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    for layer in out.layer:
        for _, value in layer.ListFields():
            if hasattr(value, "DESCRIPTOR"):  # a (non-repeated) sub-message such as convolution_param
                for filler in _FILLERS:
                    if filler in value.DESCRIPTOR.fields_by_name:
                        value.ClearField(filler)
    return out


def _data_stamps(net: caffe_pb2.NetParameter) -> tuple:
    """(path, size, mtime) of the data sources and mean files the net names: a probe of the same
    text with other data (an LMDB rewritten at another image size) is not the same probe."""
    stamps = []
    for layer in net.layer:
        for _, value in layer.ListFields():
            if not hasattr(value, "DESCRIPTOR"):
                continue
            for field in _SOURCE_FIELDS:
                path = getattr(value, field, "") if field in value.DESCRIPTOR.fields_by_name else ""
                if path:
                    targets = [path] + ([os.path.join(path, "data.mdb")] if os.path.isdir(path) else [])
                    for target in targets:
                        try:
                            st = os.stat(target)
                            stamps.append((target, st.st_size, st.st_mtime_ns))
                        except OSError:
                            stamps.append((target, None, None))
    return tuple(stamps)


def probe_net(net: caffe_pb2.NetParameter, source: str, phases: tuple[str, ...] = ("TRAIN", "TEST")) -> ProbedShapes:
    """:func:`probe_shapes` of a parsed net (``source`` names it in errors): Caffe builds its
    TRAIN and TEST nets in a child process. This validates the net as Caffe would (a dangling
    bottom, an unknown layer type, a top written twice, a failed CHECK: a :class:`ModelError`
    naming the file, the phase and the layer) and gives its shapes. The net goes to the child in
    a temporary folder that is removed whatever the child does; the answer is remembered for the
    same net text and the same data files, in this process. ``phases``: the nets built, in turn."""
    shaped = _shapes_only(net)
    text = text_format.MessageToString(shaped)
    key = (text, _data_stamps(net), phases)
    if key in _probe_cache:
        return _probe_cache[key]
    with tempfile.TemporaryDirectory(prefix="amct_probe_") as tmp:
        path = os.path.join(tmp, "net.prototxt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        probed = run_caffe_child(_PROBE, [_caffe_extension(), path, *phases], "AMCT_PROBE",
                                 f"{source}: Caffe cannot build this net", shaped)
    result = ProbedShapes(*({k: [tuple(s) for s in v] for k, v in probed[key_].items()}
                            for key_ in ("params", "bottoms")))
    if len(_probe_cache) >= _PROBE_CACHE_SIZE:
        _probe_cache.pop(next(iter(_probe_cache)))
    _probe_cache[key] = result
    return result


def check_params_fit_layers(net: caffe_pb2.NetParameter, params: Mapping[str, list[np.ndarray]],
                            weights_file: str | os.PathLike, model_file: str | os.PathLike) -> None:
    """The weights of each (De)Convolution / InnerProduct of ``net`` that ``params`` holds fit the
    layer as the prototxt defines it (output channels, kernel, bias), checked without Caffe:
    weights of another model would give a model Caffe cannot load."""
    for layer in net.layer:
        if layer.type not in WEIGHT_LAYER_TYPES or layer.name not in params:
            continue
        p = QUANTIZABLE_RULES[layer.type].weight_param(layer)
        if len(getattr(p, "kernel_size", ())) > 2:
            continue  # an N-D convolution (an inner product has no kernel): not checked here
        blobs = params[layer.name]
        where = f"{weights_file}: layer '{layer.name}' ({layer.type})"
        if len(blobs) != 1 + bool(p.bias_term):
            raise ModelError(f"{where}: {len(blobs)} blobs, {model_file} defines the layer with "
                             f"{1 + bool(p.bias_term)} (bias_term {str(p.bias_term).lower()}): weights of another model?")
        wrong = weight_shape_mismatch(layer, blobs[0].shape)
        if wrong is not None:
            raise ModelError(f"{where}: {wrong} in {model_file}: weights of another model?")
        if p.bias_term and tuple(blobs[1].shape) != (p.num_output,):
            raise ModelError(f"{where}: bias of shape {tuple(blobs[1].shape)}, {model_file} needs ({p.num_output},): "
                             "weights of another model?")


def check_weights_match(model_file: str | os.PathLike, weights_file: str | os.PathLike,
                        shapes: dict[str, list[tuple[int, ...]]],
                        params: dict[str, list[np.ndarray]]) -> None:
    """Every layer with parameters in the model has them in the weights, of the same shapes."""
    for layer, expected in shapes.items():
        if layer not in params:
            raise ModelError(f"{weights_file}: has no weights for layer '{layer}' of {model_file}")
        got = [a.shape for a in params[layer]]
        if len(got) != len(expected):
            raise ModelError(f"{weights_file}: layer '{layer}' has {len(got)} blobs, "
                             f"{model_file} expects {len(expected)}")
        for i, (g, e) in enumerate(zip(got, expected)):
            if tuple(g) != tuple(e):
                raise ModelError(f"{weights_file}: layer '{layer}' blob {i} has shape {tuple(g)}, "
                                 f"{model_file} expects {tuple(e)}")
