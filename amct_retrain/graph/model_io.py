"""Reading and writing Caffe models in Python, validated before Caffe's C++ sees them.

Caffe's CHECKs abort the whole process on a bad prototxt or a mismatching caffemodel, so the
toolkit asks Caffe about a model in a child process (`probe_param_shapes`) and parses
caffemodels with protobuf here: a user gets an exception naming the file and the layer.
"""
import json
import logging
import mmap
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from caffe.proto import caffe_pb2
from google.protobuf.message import DecodeError

from amct_retrain.fileio import parse_text_proto, read_text_file
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
    return net


def caffe_tool(name: str) -> str:
    """Path of one of the built Caffe's command-line tools (``upgrade_net_proto_text``, ...)."""
    import caffe  # the tools sit in the build tree beside pycaffe

    build = os.path.join(os.path.dirname(caffe.__file__), "..", "..", ".temp_release", "tools")
    return os.path.normpath(os.path.join(build, f"{name}.bin"))


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
    try:
        net = caffe_pb2.NetParameter.FromString(bytes(data))
    except DecodeError as err:
        raise ModelError(f"{weights_file}: not a caffemodel (binary NetParameter): {err}") from None
    return CaffemodelParams(net, os.fspath(weights_file))


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
                    if shape is None or values is None or values.size != int(np.prod(shape)):
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
    if values.size != int(np.prod(shape)):
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


def _float_blob_chunks(array: np.ndarray) -> list[bytes | memoryview]:
    # BlobProto: shape (field 7: BlobShape.dim, field 1, packed) and packed float data (field 5);
    # the data goes out as a view of the array, never copied into a bytes object.
    a = np.ascontiguousarray(array, dtype="<f4")
    shape = length_delimited_field(7, length_delimited_field(1, b"".join(_varint(d) for d in a.shape)))
    return [shape, _varint(5 << 3 | 2) + _varint(a.nbytes), memoryview(a).cast("B")]


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


def caffemodel_chunks(name: str, params: Mapping[str, list[np.ndarray]]) -> list[bytes | memoryview]:
    """A caffemodel (binary NetParameter) holding ``params`` (layer name -> blobs), as chunks to
    write one after the other: float arrays become float blobs, int8 / int32 / uint64 arrays
    deploy blobs.

    Encoded field by field (NetParameter.name = 1, .layer = 100; LayerParameter.name = 1,
    .blobs = 7) with the weights as views of the arrays: building protobuf messages and
    serializing them copies a ResNet-50's 100 MB three times.
    """
    chunks: list[bytes | memoryview] = [length_delimited_field(1, name.encode())]
    for layer_name, blobs in params.items():
        layer = [length_delimited_field(1, layer_name.encode())]
        for array in blobs:
            if np.issubdtype(array.dtype, np.floating):
                blob = _float_blob_chunks(array)
            else:
                blob = [integer_blob(array).SerializeToString()]
            layer += [_varint(7 << 3 | 2) + _varint(sum(len(c) for c in blob)), *blob]
        chunks += [_varint(100 << 3 | 2) + _varint(sum(len(c) for c in layer)), *layer]
    return chunks


def caffemodel_bytes(name: str, params: Mapping[str, list[np.ndarray]]) -> bytes:
    """:func:`caffemodel_chunks` joined into one bytes object."""
    return b"".join(caffemodel_chunks(name, params))


_PROBE = """
import json, os, sys, tempfile
import caffe
from caffe.proto import caffe_pb2
from google.protobuf import text_format
caffe.set_mode_cpu()
# Shapes only: without fillers (constant 0) Caffe does not spend seconds drawing random weights.
net = text_format.Parse(open(sys.argv[1]).read(), caffe_pb2.NetParameter())
for layer in net.layer:
    for field, value in layer.ListFields():
        if hasattr(value, "DESCRIPTOR"):  # a (non-repeated) sub-message such as convolution_param
            for filler in ("weight_filler", "bias_filler", "filler"):
                if filler in value.DESCRIPTOR.fields_by_name:
                    value.ClearField(filler)
with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as f:
    f.write(text_format.MessageToString(net))
shapes, bottoms = {}, {}
try:
    for phase in (caffe.TRAIN, caffe.TEST):
        built = caffe.Net(f.name, phase)
        for name, blobs in built.params.items():
            shapes.setdefault(name, [list(b.data.shape) for b in blobs])
        for name, names in built.bottom_names.items():
            bottoms.setdefault(name, [list(built.blobs[b].data.shape) for b in names])
finally:
    os.unlink(f.name)
print("AMCT_PROBE " + json.dumps({"params": shapes, "bottoms": bottoms}))
"""


def run_caffe_child(script: str, args: list[str], marker: str, failure: str) -> object:
    """Run ``script`` (Python that builds Caffe nets) in a child process and return the JSON it
    prints after ``marker``. If Caffe aborts the child (a CHECK failed), raise ModelError
    ``failure: <Caffe's fatal message>`` instead of losing this interpreter.
    """
    run = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                         env=dict(os.environ, GLOG_minloglevel="2"))
    for line in run.stdout.splitlines():
        if line.startswith(marker + " "):
            return json.loads(line[len(marker) + 1:])
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    fatal = [ln.split("] ", 1)[-1] for ln in lines if ln.startswith(("F", "E")) and "] " in ln]
    raise ModelError(f"{failure}: {(fatal or lines[-1:] or ['no output'])[0]}")


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
    probed = run_caffe_child(_PROBE, [os.fspath(model_file)], "AMCT_PROBE",
                             f"{model_file}: Caffe cannot build this net")
    return ProbedShapes(*({k: [tuple(s) for s in v] for k, v in probed[key].items()} for key in ("params", "bottoms")))


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
