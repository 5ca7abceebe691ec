"""What both ONNX exports share: the graph under construction, the TEST-phase layer plan
(Quant -> layer -> DeQuant triples grouped), and the graph inputs with a symbolic batch axis."""
import os
import tempfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper

from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain import saved_models
from amct_retrain.graph import model_io
from amct_retrain.graph.model_io import ModelError
from amct_retrain.graph.netgraph import phase_layers, rebuilt

#: The first opset with int16 QuantizeLinear / DequantizeLinear (the shift-N requantisation).
OPSET = 21
#: Opset 21's IR version: onnx 1.23 would stamp IR 14, which onnxruntime 1.31 refuses (it reads up to 13).
IR_VERSION = 10
#: The name of every graph input's first (batch) axis, left symbolic.
BATCH_AXIS = "batch"

#: Layers whose tops are the net's inputs: an ``Input`` layer's every top, otherwise the first
#: top only (the others are labels, which the ONNX graph does not have).
DATA_TYPES = frozenset({"Input", "Data", "ImageData", "HDF5Data", "MemoryData", "DummyData", "WindowData"})
#: Training heads, dropped: their first bottom becomes a graph output.
OUTPUT_TYPES = frozenset({"SoftmaxWithLoss", "SigmoidCrossEntropyLoss", "EuclideanLoss", "HingeLoss",
                          "InfogainLoss", "MultinomialLogisticLoss", "ContrastiveLoss", "Accuracy"})


@dataclass(frozen=True)
class QuantizedLayer:
    """A ``Quant -> layer -> DeQuant`` triple of a deploy model."""
    quant: caffe_pb2.LayerParameter
    layer: caffe_pb2.LayerParameter
    dequant: caffe_pb2.LayerParameter


class Graph:
    """The ONNX graph under construction, with Caffe's blob names mapped onto SSA tensor names.

    A Caffe blob may be rewritten in place (ReLU, DeQuant); ONNX tensors are written once.
    The last write of a blob takes the blob's own name (so graph outputs are named like the
    Caffe blobs), earlier writes get ``<blob>/<layer>``; graph inputs keep their data top's name.
    """

    def __init__(self, model_file: str, blob_names: set[str], final_writers: Mapping[str, str]) -> None:
        self.model_file = model_file
        self.scope = ""  # the layer being converted: prefix of its intermediate tensors
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[str] = []
        self._final_writers = final_writers
        self._used = set(blob_names)  # reserved: generated names never take a Caffe blob's name
        self._input_names: set[str] = set()
        self._tensors: dict[str, str] = {}  # Caffe blob -> its current tensor
        self._ranks: dict[str, int] = {}  # tensor -> number of axes
        self._unread: dict[str, None] = {}  # tensors written and not yet read, in order (graph outputs)

    def where(self, layer: caffe_pb2.LayerParameter) -> str:
        return f"{self.model_file}: layer '{layer.name}' ({layer.type})"

    def fresh(self, hint: str) -> str:
        """A tensor name not used yet, ``hint`` if possible."""
        name, n = hint, 1
        while name in self._used:
            n += 1
            name = f"{hint}_{n}"
        self._used.add(name)
        return name

    def add_input(self, blob: str, shape: Sequence[int]) -> None:
        """A float graph input; its first axis is the symbolic batch axis."""
        dims = [BATCH_AXIS, *shape[1:]]
        self.inputs.append(helper.make_tensor_value_info(blob, TensorProto.FLOAT, dims))
        self._input_names.add(blob)
        self._tensors[blob] = blob
        self._ranks[blob] = len(shape)

    def is_input(self, tensor: str) -> bool:
        """Whether ``tensor`` is a graph input."""
        return tensor in self._input_names

    def read(self, blob: str, layer: caffe_pb2.LayerParameter) -> str:
        """The tensor that holds ``blob`` now."""
        if blob not in self._tensors:
            raise ModelError(f"{self.where(layer)}: reads blob '{blob}', which no earlier layer of the TEST "
                             "phase produces (data layers' labels are not part of the ONNX graph)")
        tensor = self._tensors[blob]
        self._unread.pop(tensor, None)
        return tensor

    def bottoms(self, layer: caffe_pb2.LayerParameter, least: int = 1, most: int | None = 1) -> list[str]:
        """The tensors of ``layer``'s bottoms, of which there must be ``least`` to ``most`` (None: any)."""
        n = len(layer.bottom)
        if n < least or (most is not None and n > most):
            wanted = least if least == most else f"{least} or more" if most is None else f"{least} to {most}"
            raise ModelError(f"{self.where(layer)}: has {n} bottoms, the export supports {wanted}")
        return [self.read(b, layer) for b in layer.bottom]

    def write(self, blob: str, writer: str, rank: int) -> str:
        """A new tensor for ``blob`` written by layer ``writer``; read the bottoms first."""
        final = self._final_writers.get(blob) == writer and blob not in self._input_names
        tensor = blob if final else self.fresh(f"{blob}/{writer}")
        self._tensors[blob] = tensor
        self._ranks[tensor] = rank
        self._unread[tensor] = None
        return tensor

    def top(self, layer: caffe_pb2.LayerParameter, rank: int) -> str:
        if len(layer.top) != 1:
            raise ModelError(f"{self.where(layer)}: has {len(layer.top)} tops, the export supports 1")
        return self.write(layer.top[0], layer.name, rank)

    def rank(self, tensor: str) -> int:
        return self._ranks[tensor]

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.fresh(f"{self.scope}/{hint}")
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], output: str | None = None, rank: int | None = None,
           outputs: Sequence[str] | None = None, **attrs) -> str:
        """Append a node; returns its (first) output, a fresh name unless given, of ``rank`` axes if
        known. ``outputs`` names every output of a node with more than one."""
        outs = list(outputs) if outputs else [output or self.fresh(f"{self.scope}/{op_type}")]
        if rank is not None:
            self._ranks[outs[0]] = rank
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=outs[0], **attrs))
        return outs[0]

    def mark_output(self, tensor: str) -> None:
        if tensor not in self.outputs:
            self.outputs.append(tensor)

    def output_infos(self) -> list[onnx.ValueInfoProto]:
        """The loss layers' logits, then every tensor no layer read, as float outputs."""
        for tensor in self._unread:
            self.mark_output(tensor)
        return [helper.make_tensor_value_info(t, TensorProto.FLOAT, [None] * self._ranks[t]) for t in self.outputs]


# --------------------------------------------------------------------------- phase, plan, inputs


def test_phase_layers(net: caffe_pb2.NetParameter) -> list[caffe_pb2.LayerParameter]:
    """The layers Caffe builds from the deploy model's file in the TEST phase: its ``state``'s
    level and stages are known (``caffe.Net(file, caffe.TEST)``)."""
    return phase_layers(net, caffe_pb2.TEST, net.state)


def plan(layers: Sequence[caffe_pb2.LayerParameter], model_file: str, float_types: Collection[str]) -> list:
    """The TEST-phase layers with each Quant/layer/DeQuant triple grouped; a type that is neither
    in ``float_types`` (the types the export converts) nor a data or loss layer raises."""
    units: list = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        if layer.type == "Quant":
            units.append(_check_wiring(QuantizedLayer(*saved_models.quantized_triple(layers, i, model_file)),
                                       model_file))
            i += 3
            continue
        if layer.type == "DeQuant":
            raise ModelError(f"{model_file}: DeQuant layer '{layer.name}' does not follow a Quant layer and "
                             "a quantized layer")
        if layer.type not in DATA_TYPES | OUTPUT_TYPES and layer.type not in float_types:
            raise ModelError(f"{model_file}: layer '{layer.name}' has type '{layer.type}', which the ONNX export "
                             f"does not support (supported: {', '.join(sorted(float_types))}, "
                             f"Quant/DeQuant around {'/'.join(saved_models.QUANTIZED_TYPES)}, data and loss layers)")
        units.append(layer)
        i += 1
    return units


def _check_wiring(q: QuantizedLayer, model_file: str) -> QuantizedLayer:
    """The triple reads and writes as the saver writes it: Quant -> layer -> DeQuant in place."""
    ok = (len(q.quant.bottom) == len(q.quant.top) == len(q.layer.bottom) == len(q.layer.top) == 1
          and q.layer.bottom[0] == q.quant.top[0]
          and list(q.dequant.bottom) == list(q.dequant.top) == [q.layer.top[0]])
    if not ok:
        raise ModelError(f"{model_file}: layer '{q.layer.name}' is not wired as Quant '{q.quant.name}' -> "
                         f"'{q.layer.name}' -> DeQuant '{q.dequant.name}' in place on its top")
    return q


def unit_tops(unit) -> list[str]:
    if isinstance(unit, QuantizedLayer):
        return [unit.dequant.top[0]]
    return [] if unit.type in DATA_TYPES | OUTPUT_TYPES else list(unit.top)


def unit_name(unit) -> str:
    # A triple writes its blob once, as the DeQuant layer.
    return unit.dequant.name if isinstance(unit, QuantizedLayer) else unit.name


def input_blobs(net: caffe_pb2.NetParameter, units: Sequence) -> list[str]:
    """Graph inputs: the legacy ``input:`` fields, then the data tops of the data layers."""
    blobs = list(net.input)
    for unit in units:
        if not isinstance(unit, QuantizedLayer) and unit.type in DATA_TYPES:
            blobs.extend(data_tops(unit))
    return blobs


def data_tops(layer: caffe_pb2.LayerParameter) -> list[str]:
    return list(layer.top if layer.type == "Input" else layer.top[:1])


_PROBE = """
import json, sys, caffe
caffe.set_mode_cpu()
net = caffe.Net(sys.argv[1], caffe.TEST)
print("AMCT_SHAPES " + json.dumps({name: list(blob.data.shape) for name, blob in net.blobs.items()}))
"""


def probe_input_shapes(net: caffe_pb2.NetParameter, model_file: str) -> dict[str, tuple[int, ...]]:
    """The TEST-phase top shapes of ``net``'s data layers (and legacy inputs), asked of Caffe.

    Only the data layers are built (a deploy model's Quant/DeQuant layers have no Caffe
    implementation), in a child process, so that a data layer Caffe cannot set up (a missing
    source file) is a ModelError instead of an abort of this interpreter.
    """
    probe = rebuilt(net, (layer for layer in test_phase_layers(net) if layer.type in DATA_TYPES))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "inputs.prototxt")
        with open(path, "w") as f:
            f.write(text_format.MessageToString(probe))
        # The data layers' relative sources resolve against the working directory, as in Caffe.
        shapes = model_io.run_caffe_child(
            _PROBE, [path], "AMCT_SHAPES", f"{model_file}: Caffe cannot set up the TEST-phase data layers "
                                           "(pass input_shapes to export without them)")
    return {k: tuple(v) for k, v in shapes.items()}


def resolve_input_shapes(net: caffe_pb2.NetParameter, inputs: Sequence[str], model_file: str,
                 given: Mapping[str, Sequence[int]] | None) -> dict[str, tuple[int, ...]]:
    """Each graph input's shape: from ``given`` (exactly the inputs' names) or from Caffe."""
    if not inputs:
        raise ModelError(f"{model_file}: the TEST phase has no data layer and no input: nothing to feed")
    if given is None:
        shapes = probe_input_shapes(net, model_file)
        return {name: shapes[name] for name in inputs}
    missing, unknown = set(inputs) - set(given), set(given) - set(inputs)
    if missing or unknown:
        raise ModelError(f"{model_file}: input_shapes must name exactly the net's inputs {list(inputs)}; "
                         f"missing {sorted(missing)}, unknown {sorted(unknown)}")
    out = {}
    for name in inputs:
        shape = tuple(given[name])
        if not shape or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
            raise ModelError(f"input_shapes['{name}'] must be positive integers, got {given[name]!r}")
        out[name] = tuple(int(d) for d in shape)
    return out


def blob_count(g: Graph, layer: caffe_pb2.LayerParameter, params: Sequence, expected: int) -> None:
    if len(params) != expected:
        raise ModelError(f"{g.where(layer)}: the weights hold {len(params)} blobs, the layer needs {expected}")
