"""QDQ ONNX export of a deploy model (contract section 3), run by onnxruntime on the CPU.

Each ``Quant -> Convolution/Deconvolution/InnerProduct -> DeQuant`` triple of the deploy model
becomes (an InnerProduct's input flattened to 2-D first, so that DequantizeLinear feeds Gemm
directly; the weight axis is 1 for a Deconvolution, whose weights are (C_in, C_out, kh, kw))::

    x ---------> QuantizeLinear(scale_d, offset_d: int8) -> DequantizeLinear --+
    int8 weights -> DequantizeLinear(scale_w[c], 0, axis 0 or 1) -------------+-> Conv / ConvTranspose / Gemm -> y
    int32 bias ---> DequantizeLinear(deq[c], 0, axis 0) ----------------------+
    y -> Div(deq[c]) -> Round -> QuantizeLinear(2^N[c], 0: int16, axis 1)
      -> DequantizeLinear(deq[c] * 2^N[c], 0: int16, axis 1)

A quantized AVE Pooling has no weights: the input's QuantizeLinear -> DequantizeLinear feeds an
AveragePool, whose float average of the window is the integer window sum times deq
(``scale_d * 1/n``), and the same Div -> Round -> int16 chain follows;
and every other layer of the TEST phase becomes its float ONNX operator. Data layers become
graph inputs named after their data top (labels are dropped); loss and accuracy layers are
dropped and their first bottom (the logits) becomes a graph output, as does every blob that
no later layer reads.

Factors, from the deploy files alone (they hold ``1/scale_d`` and ``deq[c]``, not scale_d or
scale_w):

* ``scale_d`` = ``float32(1/quant_param.scale)``. The Quant layer (like the fake-quant model
  and the integer executor) makes codes as ``rint(x * quant_param.scale)``, where ONNX's
  QuantizeLinear computes ``rint(x / scale)``; no float32 scale makes the two agree for every
  x (unless quant_param.scale is a power of two). The nearest reciprocal makes them agree
  most often: for uniformly spread activations a code differs about 2.4 times per million
  (the saver's own scale_d, when it is the other float32 inverting to the same multiplier,
  5.5 per million); on the digits demo's real activations, never. The last bits of the
  scale a DequantizeLinear feeds a Conv / Gemm are rounded away with the accumulator (below).
* ``scale_w[c]``: ``float32(deq[c] / scale_d)``, or a float32 within two ulps of it for which
  ``numerics.deq_scales(scale_d, scale_w) == deq``, so that the bias scale is the input scale
  times the weight scale exactly, as QDQ consumers assume (within an ulp where none does).
* the bias scale is ``deq[c]`` itself, the value the integer pipeline uses.
* shift-N: ``Div -> Round`` recovers the int32 accumulator ``rint(y / deq[c])`` that the
  fake-quant model's Requantize layer recovers (``numerics.accumulator_from_output``); the
  int16 QuantizeLinear by ``2^N`` is then ``numerics.requantize`` exactly (a division by a
  power of two, round half to even, saturation to int16) and the DequantizeLinear by
  ``deq * 2^N`` is ``numerics.requantized_output``. Quantizing ``y`` by ``deq * 2^N``
  directly would round ties of ``acc / 2^N`` (every odd accumulator when N = 1) by the float
  sum's noise instead of to even. Because the accumulator is recovered by rounding, the
  weight and bias scales' last bits do not reach the output.
"""
import functools
import logging
import os
import re
import struct
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from caffe.proto import caffe_pb2
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper

from amct_retrain import numerics, saved_models
from amct_retrain.config import QUANTIZABLE_RULES
from amct_retrain.fileio import atomic_write, check_outputs_are_not_inputs
from amct_retrain.graph import model_io
from amct_retrain.graph.caffe_params import conv_geometry, weight_shape_mismatch
from amct_retrain.graph.model_io import ModelError

LOG = logging.getLogger(__name__)

#: The first opset with int16 QuantizeLinear / DequantizeLinear (the shift-N requantisation).
OPSET = 21
#: Opset 21's IR version: onnx 1.23 would stamp IR 14, which onnxruntime 1.31 refuses (it reads up to 13).
IR_VERSION = 10

#: Layers whose tops are the net's inputs: an ``Input`` layer's every top, otherwise the first
#: top only (the others are labels, which the ONNX graph does not have).
DATA_TYPES = frozenset({"Input", "Data", "ImageData", "HDF5Data", "MemoryData", "DummyData", "WindowData"})
#: Training heads, dropped: their first bottom becomes a graph output.
OUTPUT_TYPES = frozenset({"SoftmaxWithLoss", "SigmoidCrossEntropyLoss", "EuclideanLoss", "HingeLoss",
                          "InfogainLoss", "MultinomialLogisticLoss", "ContrastiveLoss", "Accuracy"})

_P = caffe_pb2.PoolingParameter
_E = caffe_pb2.EltwiseParameter


@dataclass(frozen=True)
class _QuantizedLayer:
    """A ``Quant -> layer -> DeQuant`` triple of a deploy model."""
    quant: caffe_pb2.LayerParameter
    layer: caffe_pb2.LayerParameter
    dequant: caffe_pb2.LayerParameter


class _Graph:
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
        self.inputs.append(helper.make_tensor_value_info(blob, TensorProto.FLOAT, list(shape)))
        self._input_names.add(blob)
        self._tensors[blob] = blob
        self._ranks[blob] = len(shape)

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
            raise ModelError(f"{self.where(layer)}: has {n} bottoms, the export supports "
                             f"{least if least == most else f'{least} or more'}")
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
           **attrs) -> str:
        """Append a node; returns its output (a fresh name unless given), of ``rank`` axes if known."""
        out = output or self.fresh(f"{self.scope}/{op_type}")
        if rank is not None:
            self._ranks[out] = rank
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def mark_output(self, tensor: str) -> None:
        if tensor not in self.outputs:
            self.outputs.append(tensor)

    def output_infos(self) -> list[onnx.ValueInfoProto]:
        """The loss layers' logits, then every tensor no layer read, as float outputs."""
        for tensor in self._unread:
            self.mark_output(tensor)
        return [helper.make_tensor_value_info(t, TensorProto.FLOAT, [None] * self._ranks[t]) for t in self.outputs]


# --------------------------------------------------------------------------- phase, plan, inputs


def _meets_rule(rule: caffe_pb2.NetStateRule, state: caffe_pb2.NetState) -> bool:
    """Caffe's ``Net::StateMeetsRule``."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    return set(rule.stage) <= set(state.stage) and not set(rule.not_stage) & set(state.stage)


def test_phase_layers(net: caffe_pb2.NetParameter) -> list[caffe_pb2.LayerParameter]:
    """The layers Caffe builds in the TEST phase (``Net::FilterNet``, the net's level and stages)."""
    state = caffe_pb2.NetState()
    state.CopyFrom(net.state)
    state.phase = caffe_pb2.TEST

    def included(layer: caffe_pb2.LayerParameter) -> bool:
        if layer.include:
            return any(_meets_rule(r, state) for r in layer.include)
        return not any(_meets_rule(r, state) for r in layer.exclude)
    return [layer for layer in net.layer if included(layer)]


def _plan(layers: Sequence[caffe_pb2.LayerParameter], model_file: str) -> list:
    """The TEST-phase layers with each Quant/layer/DeQuant triple grouped; unsupported types raise."""
    units: list = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        if layer.type == "Quant":
            triple = layers[i:i + 3]
            if len(triple) < 3 or triple[1].type not in saved_models.QUANTIZED_TYPES or triple[2].type != "DeQuant":
                raise ModelError(f"{model_file}: Quant layer '{layer.name}' is not followed by a quantized "
                                 f"{'/'.join(saved_models.QUANTIZED_TYPES)} layer and a DeQuant layer")
            saved_models.check_quantized_layer(triple[1], model_file)
            units.append(_check_wiring(_QuantizedLayer(*triple), model_file))
            i += 3
            continue
        if layer.type == "DeQuant":
            raise ModelError(f"{model_file}: DeQuant layer '{layer.name}' does not follow a Quant layer and "
                             "a quantized layer")
        if layer.type not in DATA_TYPES | OUTPUT_TYPES and layer.type not in FLOAT_CONVERTERS:
            raise ModelError(f"{model_file}: layer '{layer.name}' has type '{layer.type}', which the ONNX export "
                             f"does not support (supported: {', '.join(sorted(FLOAT_CONVERTERS))}, "
                             f"Quant/DeQuant around {'/'.join(saved_models.QUANTIZED_TYPES)}, data and loss layers)")
        units.append(layer)
        i += 1
    return units


def _check_wiring(q: _QuantizedLayer, model_file: str) -> _QuantizedLayer:
    """The triple reads and writes as the saver writes it: Quant -> layer -> DeQuant in place."""
    ok = (len(q.quant.bottom) == len(q.quant.top) == len(q.layer.bottom) == len(q.layer.top) == 1
          and q.layer.bottom[0] == q.quant.top[0]
          and list(q.dequant.bottom) == list(q.dequant.top) == [q.layer.top[0]])
    if not ok:
        raise ModelError(f"{model_file}: layer '{q.layer.name}' is not wired as Quant '{q.quant.name}' -> "
                         f"'{q.layer.name}' -> DeQuant '{q.dequant.name}' in place on its top")
    return q


def _unit_tops(unit) -> list[str]:
    if isinstance(unit, _QuantizedLayer):
        return [unit.dequant.top[0]]
    return [] if unit.type in DATA_TYPES | OUTPUT_TYPES else list(unit.top)


def _unit_name(unit) -> str:
    # A triple writes its blob once, as the DeQuant layer.
    return unit.dequant.name if isinstance(unit, _QuantizedLayer) else unit.name


def _input_blobs(net: caffe_pb2.NetParameter, units: Sequence) -> list[str]:
    """Graph inputs: the legacy ``input:`` fields, then the data tops of the data layers."""
    blobs = list(net.input)
    for unit in units:
        if not isinstance(unit, _QuantizedLayer) and unit.type in DATA_TYPES:
            blobs.extend(unit.top if unit.type == "Input" else unit.top[:1])
    return blobs


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
    probe = caffe_pb2.NetParameter()
    probe.CopyFrom(net)
    del probe.layer[:]
    probe.layer.extend(layer for layer in test_phase_layers(net) if layer.type in DATA_TYPES)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "inputs.prototxt")
        with open(path, "w") as f:
            f.write(text_format.MessageToString(probe))
        # The data layers' relative sources resolve against the working directory, as in Caffe.
        shapes = model_io.run_caffe_child(
            _PROBE, [path], "AMCT_SHAPES", f"{model_file}: Caffe cannot set up the TEST-phase data layers "
                                           "(pass input_shapes to export without them)")
    return {k: tuple(v) for k, v in shapes.items()}


def _input_shapes(net: caffe_pb2.NetParameter, inputs: Sequence[str], model_file: str,
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


# --------------------------------------------------------------------------- float layers


Converter = Callable[[_Graph, caffe_pb2.LayerParameter, list[np.ndarray]], None]


def _blob_count(g: _Graph, layer: caffe_pb2.LayerParameter, params: Sequence, expected: int) -> None:
    if len(params) != expected:
        raise ModelError(f"{g.where(layer)}: the weights hold {len(params)} blobs, the layer needs {expected}")


def _check_weight_shape(g: _Graph, layer: caffe_pb2.LayerParameter, shape: Sequence[int]) -> None:
    """The weight blob's shape fits the layer: output channels and, for convolutions, the kernel."""
    wrong = weight_shape_mismatch(layer, shape)
    if wrong is not None:
        raise ModelError(f"{g.where(layer)}: {wrong}")


def _linear_input(g: _Graph, layer: caffe_pb2.LayerParameter, x: str) -> str:
    """``x`` as the layer's operator takes it: an InnerProduct's flattened from axis 1 to 2-D."""
    if layer.type != "InnerProduct" or g.rank(x) == 2:
        return x
    axis = layer.inner_product_param.axis
    if axis % g.rank(x) != 1:
        raise ModelError(f"{g.where(layer)}: axis {axis} is not supported (only axis 1, Caffe's default)")
    return g.op("Flatten", [x], rank=2, axis=1)


def _linear(g: _Graph, layer: caffe_pb2.LayerParameter, x: str, weights: str, bias: str | None,
            out: str) -> None:
    """The Conv / ConvTranspose / Gemm node of a (float or quantized) layer, into ``out``."""
    operands = [_linear_input(g, layer, x), weights] + ([bias] if bias else [])
    if layer.type == "InnerProduct":
        g.op("Gemm", operands, out, transB=0 if layer.inner_product_param.transpose else 1)
        return
    p = layer.convolution_param
    if p.axis != 1 or len(p.kernel_size) > 2 or len(p.stride) > 2 or len(p.pad) > 2 or len(p.dilation) > 2:
        raise ModelError(f"{g.where(layer)}: only 2-D convolution over axis 1 is supported")
    geo = conv_geometry(layer)
    g.op("Conv" if layer.type == "Convolution" else "ConvTranspose", operands, out,
         kernel_shape=list(geo.kernel), strides=list(geo.stride), dilations=list(geo.dilation),
         pads=[geo.pad[0], geo.pad[1], geo.pad[0], geo.pad[1]], group=geo.group)


def _output_rank(g: _Graph, layer: caffe_pb2.LayerParameter, x: str) -> int:
    return 2 if layer.type == "InnerProduct" else g.rank(x)


def _bias_term(layer: caffe_pb2.LayerParameter) -> bool:
    p = layer.inner_product_param if layer.type == "InnerProduct" else layer.convolution_param
    return p.bias_term


def _float_linear(g: _Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    _blob_count(g, layer, params, 1 + _bias_term(layer))
    _check_weight_shape(g, layer, params[0].shape)
    x = g.bottoms(layer)[0]
    bias = g.const("bias", params[1].reshape(-1)) if len(params) > 1 else None
    _linear(g, layer, x, g.const("weights", params[0]), bias, g.top(layer, _output_rank(g, layer, x)))


def _same_rank(op_type: str, **attrs) -> Converter:
    """A one-input layer that keeps its input's shape."""
    def convert(g: _Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
        x = g.bottoms(layer)[0]
        g.op(op_type, [x], g.top(layer, g.rank(x)), **attrs)
    return convert


def _relu(g: _Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    slope = layer.relu_param.negative_slope
    x = g.bottoms(layer)[0]
    out = g.top(layer, g.rank(x))
    if slope:
        g.op("LeakyRelu", [x], out, alpha=float(slope))
    else:
        g.op("Relu", [x], out)


def _softmax(g: _Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    # Opset 13+ Softmax normalises over the one axis, as Caffe does.
    _same_rank("Softmax", axis=layer.softmax_param.axis)(g, layer, params)


def _pool_pair(p: caffe_pb2.PoolingParameter, single: str, h: str, w: str) -> list[int]:
    """Caffe's pooling geometry: explicit _h/_w win over the one value for both."""
    if p.HasField(h) or p.HasField(w):
        return [getattr(p, h), getattr(p, w)]
    return [getattr(p, single)] * 2


def _pooling(g: _Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    p = layer.pooling_param
    if p.pool not in (_P.MAX, _P.AVE):
        raise ModelError(f"{g.where(layer)}: pool method {_P.PoolMethod.Name(p.pool)} is not supported (MAX, AVE)")
    _pool_node(g, layer, g.bottoms(layer)[0], g.top(layer, 4))


def _pool_node(g: _Graph, layer: caffe_pb2.LayerParameter, x: str, out: str) -> None:
    """The pooling node of a (float or quantized) Pooling layer, from ``x`` into ``out``."""
    p = layer.pooling_param
    if p.global_pooling:
        g.op("GlobalMaxPool" if p.pool == _P.MAX else "GlobalAveragePool", [x], out)
        return
    kernel = _pool_pair(p, "kernel_size", "kernel_h", "kernel_w")
    pad = _pool_pair(p, "pad", "pad_h", "pad_w")
    # With ceil_mode, onnxruntime drops a last window that starts in the right padding, as
    # Caffe does; and Caffe's AVE divisor, the window clipped to the padded input, is
    # onnxruntime's count_include_pad. (Caffe keeps a window starting past an unpadded input,
    # kernel < stride: an empty window, -FLT_MAX or a negative divisor; ONNX drops it.)
    attrs = {"kernel_shape": kernel, "strides": _pool_pair(p, "stride", "stride_h", "stride_w"),
             "pads": pad + pad, "ceil_mode": int(p.ceil_mode)}
    if p.pool == _P.AVE:
        g.op("AveragePool", [x], out, count_include_pad=1, **attrs)
    else:
        g.op("MaxPool", [x], out, **attrs)


def _eltwise(g: _Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    p = layer.eltwise_param
    xs = g.bottoms(layer, 2, None)
    out = g.top(layer, g.rank(xs[0]))
    if p.operation == _E.SUM:
        if p.coeff and len(p.coeff) != len(xs):
            raise ModelError(f"{g.where(layer)}: {len(p.coeff)} coeff values for {len(xs)} bottoms")
        coeffs = list(p.coeff) or [1.0] * len(xs)
        terms = [x if c == 1 else g.op("Mul", [x, g.const("coeff", np.float32(c))]) for x, c in zip(xs, coeffs)]
        g.op("Sum", terms, out)
    elif p.operation == _E.MAX:
        g.op("Max", xs, out)
    else:  # PROD: Mul is binary in ONNX
        g.op("Mul", [functools.reduce(lambda a, b: g.op("Mul", [a, b]), xs[:-1]), xs[-1]], out)


def _concat(g: _Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    p = layer.concat_param
    xs = g.bottoms(layer, 1, None)
    axis = p.concat_dim if p.HasField("concat_dim") else p.axis  # concat_dim: the deprecated spelling
    g.op("Concat", xs, g.top(layer, g.rank(xs[0])), axis=axis)


def _reshape_to(g: _Graph, layer: caffe_pb2.LayerParameter, x: str, shape: list[int]) -> None:
    # ONNX Reshape's 0 copies the input's dimension at the same index and -1 is inferred: Caffe's rules.
    g.op("Reshape", [x, g.const("shape", np.array(shape, np.int64))], g.top(layer, len(shape)))


def _flatten(g: _Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    p = layer.flatten_param
    x = g.bottoms(layer)[0]
    rank = g.rank(x)
    if p.end_axis % rank != rank - 1:
        raise ModelError(f"{g.where(layer)}: end_axis {p.end_axis} is not supported (only the last axis)")
    _reshape_to(g, layer, x, [0] * (p.axis % rank) + [-1])


def _reshape(g: _Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    p = layer.reshape_param
    x = g.bottoms(layer)[0]
    rank = g.rank(x)
    start = p.axis if p.axis >= 0 else rank + p.axis + 1  # Caffe's ReshapeLayer
    if not 0 <= start <= rank or (p.num_axes != -1 and start + p.num_axes != rank):
        raise ModelError(f"{g.where(layer)}: axis {p.axis} / num_axes {p.num_axes} are not supported "
                         "(the reshaped axes must run to the last one)")
    _reshape_to(g, layer, x, [0] * start + list(p.shape.dim))


def _batch_norm(g: _Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    p = layer.batch_norm_param
    if p.HasField("use_global_stats") and not p.use_global_stats:
        raise ModelError(f"{g.where(layer)}: use_global_stats false normalises by the batch's own statistics; "
                         "an inference graph needs the stored ones")
    _blob_count(g, layer, params, 3)
    mean, var, factor = params
    # Caffe stores running sums and their weight (0 means no statistics yet: zeros).
    f = float(factor.reshape(-1)[0])
    scale = np.float32(0 if f == 0 else 1 / f)
    x = g.bottoms(layer)[0]
    channels = mean.size
    g.op("BatchNormalization",
         [x, g.const("gamma", np.ones(channels, np.float32)), g.const("beta", np.zeros(channels, np.float32)),
          g.const("mean", mean.reshape(-1) * scale), g.const("var", var.reshape(-1) * scale)],
         g.top(layer, g.rank(x)), epsilon=float(p.eps))


def _scale(g: _Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    p = layer.scale_param
    _blob_count(g, layer, params, 1 + p.bias_term)
    x = g.bottoms(layer)[0]  # a second bottom (learned scale from another blob) is not supported
    rank = g.rank(x)
    trailing = rank - p.axis % rank - params[0].ndim
    if trailing < 0:
        raise ModelError(f"{g.where(layer)}: scale blob of shape {params[0].shape} does not fit a "
                         f"{rank}-axis input from axis {p.axis}")
    # Caffe's scale covers axes axis .. axis+num_axes-1; ONNX broadcasting aligns trailing axes.
    shape = params[0].shape + (1,) * trailing
    out = g.top(layer, rank)
    scaled = g.op("Mul", [x, g.const("scale", params[0].reshape(shape))], None if p.bias_term else out)
    if p.bias_term:
        g.op("Add", [scaled, g.const("bias", params[1].reshape(shape))], out)


FLOAT_CONVERTERS: dict[str, Converter] = {
    "Convolution": _float_linear, "Deconvolution": _float_linear, "InnerProduct": _float_linear,
    "ReLU": _relu, "Sigmoid": _same_rank("Sigmoid"), "TanH": _same_rank("Tanh"),
    "Dropout": _same_rank("Identity"),  # identity at inference
    "Softmax": _softmax, "Pooling": _pooling, "Eltwise": _eltwise, "Concat": _concat,
    "Flatten": _flatten, "Reshape": _reshape, "BatchNorm": _batch_norm, "Scale": _scale,
}


# --------------------------------------------------------------------------- quantized layers


def recover_scales(quant_scale: float, deq: np.ndarray) -> tuple[np.float32, np.ndarray]:
    """``(scale_d, scale_w)`` of a quantized layer for its QuantizeLinear / weight DequantizeLinear.

    Args:
        quant_scale: the Quant layer's ``quant_param.scale``, float32(1/scale_d), the multiplier
            the codes are made with.
        deq: float32 (C,) unpacked deq_scale, float32(scale_d * scale_w[c]).

    Returns:
        scale_d (np.float32): the float32 nearest 1/quant_scale, the divisor whose quotients
        round like the products with quant_scale most often;
        scale_w (float32 (C,)): ``deq / scale_d``, or the float32 within two ulps of it for
        which ``numerics.deq_scales(scale_d, scale_w) == deq`` where there is one.
    """
    scale_d = np.float32(numerics.quant_multiplier(quant_scale))  # float32(1/x), rounded once, either way
    scale_w = (deq / scale_d).astype(np.float32)
    matched = numerics.deq_scales(scale_d, scale_w) == deq
    up = down = scale_w
    for _ in range(2):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(0))
        for candidate in (up, down):
            hit = ~matched & (numerics.deq_scales(scale_d, candidate) == deq)
            scale_w = np.where(hit, candidate, scale_w)
            matched |= hit
    return scale_d, scale_w


def _per_channel_or_scalar(values: np.ndarray) -> np.ndarray:
    """One value when all channels share it (a per-tensor scale), else the vector."""
    return values[:1].reshape(()) if np.all(values == values[0]) else values


def _quantized(g: _Graph, q: _QuantizedLayer, deploy: Mapping[str, list[caffe_pb2.BlobProto]],
               weights_file: str) -> None:
    """The QDQ form of a Quant -> layer -> DeQuant triple (see the module docstring)."""
    layer = q.layer
    rule = QUANTIZABLE_RULES[layer.type]
    ints = saved_models.integer_params(deploy, layer.name, q.dequant.name, weights_file, rule.has_weights)
    # The output channels' weight axis: 0, or 1 for a Deconvolution (group 1, checked in _plan).
    axis = rule.channel_axis
    # An AVE Pooling has no weights: one deq per channel, the strict shape inference checks the count.
    channels = ints.deq.size
    if rule.has_weights:
        _blob_count(g, layer, deploy[layer.name], 1 + _bias_term(layer))
        _check_weight_shape(g, layer, ints.weights.shape)
        channels = ints.weights.shape[axis]
        if ints.deq.size != channels:
            raise ModelError(f"{weights_file}: DeQuant layer '{q.dequant.name}' holds {ints.deq.size} deq_scale "
                             f"values for the {channels} output channels of '{layer.name}'")
    quant_scale = q.quant.quant_param.scale
    if not (np.isfinite(quant_scale) and quant_scale > 0) or len(q.quant.quant_param.offset) != 1:
        raise ModelError(f"{g.where(q.quant)}: quant_param needs a positive finite scale and a one-byte offset, "
                         f"got scale {quant_scale!r}, offset {q.quant.quant_param.offset!r}")
    scale_d, scale_w = recover_scales(quant_scale, ints.deq)
    inexact = int(np.count_nonzero(numerics.deq_scales(scale_d, scale_w) != ints.deq))
    if inexact:
        LOG.debug("layer '%s': for %d channel(s) no float32 scale_w gives deq exactly: their bias scale is "
                  "the input scale times the weight scale within an ulp", layer.name, inexact)
    offset_d = struct.unpack("b", q.quant.quant_param.offset)[0]

    g.scope = q.quant.name
    # Flatten (InnerProduct) before the Quant: QDQ consumers fuse DequantizeLinear -> Gemm.
    x = _linear_input(g, layer, g.read(q.quant.bottom[0], q.quant))
    rank = g.rank(x)
    s, zp = g.const("scale", scale_d), g.const("zero_point", np.int8(offset_d))
    x = g.op("DequantizeLinear", [g.op("QuantizeLinear", [x, s, zp]), s, zp], rank=rank)

    g.scope = layer.name
    y = g.fresh(f"{layer.name}/float_accumulator")
    if rule.has_weights:
        w_scale = _per_channel_or_scalar(scale_w)
        weights = g.op("DequantizeLinear", [g.const("weights_int8", ints.weights), g.const("weight_scale", w_scale),
                                            g.const("weight_zero_point", np.zeros_like(w_scale, np.int8))], axis=axis)
        bias = None
        if len(deploy[layer.name]) > 1:
            bias = g.op("DequantizeLinear", [g.const("bias_int32", ints.bias.astype(np.int32)),
                                             g.const("bias_scale", ints.deq),
                                             g.const("bias_zero_point", np.zeros(channels, np.int32))], axis=0)
        _linear(g, layer, x, weights, bias, y)
    else:
        # The float average of the window's dequantized codes is acc * scale_d / n = acc * deq, so
        # the Div -> Round below recovers the integer window sum, as for a convolution.
        _pool_node(g, layer, x, y)

    g.scope = q.dequant.name
    out_rank = _output_rank(g, layer, x)
    # Div -> Round: the int32 accumulator, as numerics.accumulator_from_output recovers it.
    deq_b = ints.deq.reshape((channels,) + (1,) * (out_rank - 2))
    acc = g.op("Round", [g.op("Div", [y, g.const("deq", deq_b)])])
    # 2^N and deq * 2^N are exact in float32 (powers of two), as in numerics.requantized_output.
    step = np.ldexp(np.float32(1), ints.shift_bit.astype(np.int32)).astype(np.float32)
    zero16 = g.const("zero_point_int16", np.zeros(channels, np.int16))
    shifted = g.op("QuantizeLinear", [acc, g.const("shift_scale", step), zero16], axis=1)
    g.op("DequantizeLinear", [shifted, g.const("requant_scale", ints.deq * step), zero16],
         g.write(q.dequant.top[0], q.dequant.name, out_rank), axis=1)


# --------------------------------------------------------------------------- export


def export_onnx(deploy_model_file: str | os.PathLike, deploy_weights_file: str | os.PathLike,
                onnx_file: str | os.PathLike, input_shapes: Mapping[str, Sequence[int]] | None = None) -> None:
    """Write the deploy model (``*_deploy_model.prototxt`` + ``*_deploy_weights.caffemodel``) as a
    QDQ ONNX model (opset 21) that onnxruntime runs on the CPU; see the module docstring for
    the operators and factors.

    Args:
        deploy_model_file: the deploy prototxt (Quant / DeQuant around quantized layers).
        deploy_weights_file: its caffemodel (int8 weights, int32 bias, packed deq_scale).
        onnx_file: output path, replaced atomically.
        input_shapes: graph input name (a data layer's data top or a legacy input) -> shape,
            e.g. ``{"data": (1, 3, 224, 224)}`` (NCHW, fixed); default: the shapes Caffe gives the
            TEST-phase data layers (asked in a child process).

    Raises:
        ModelError (a ValueError): an unsupported layer type or parameter, or blobs that
        contradict the model; the message names the file and the layer.
    """
    model_file, weights_file = os.fspath(deploy_model_file), os.fspath(deploy_weights_file)
    check_outputs_are_not_inputs({"deploy model file": model_file, "deploy weights file": weights_file},
                                 {"ONNX file": onnx_file})
    net = model_io.read_prototxt(model_file)
    units = _plan(test_phase_layers(net), model_file)
    deploy = saved_models.read_deploy_blobs(weights_file)
    inputs = _input_blobs(net, units)
    shapes = _input_shapes(net, inputs, model_file, input_shapes)

    final_writers = {top: _unit_name(u) for u in units for top in _unit_tops(u)}
    blob_names = set(inputs) | set(final_writers)
    g = _Graph(model_file, blob_names, final_writers)
    for name in net.input:
        g.add_input(name, shapes[name])
    for unit in units:
        if isinstance(unit, _QuantizedLayer):
            _quantized(g, unit, deploy, weights_file)
        elif unit.type in DATA_TYPES:
            for name in unit.top if unit.type == "Input" else unit.top[:1]:
                g.add_input(name, shapes[name])
        elif unit.type in OUTPUT_TYPES:
            g.mark_output(g.read(unit.bottom[0], unit))
        else:
            g.scope = unit.name
            params = [model_io.blob_to_array(b, weights_file, unit.name) for b in deploy.get(unit.name, [])]
            FLOAT_CONVERTERS[unit.type](g, unit, params)

    graph = helper.make_graph(g.nodes, net.name or "caffe_net", g.inputs, g.output_infos(), g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="amct_retrain", doc_string=f"QDQ export of {os.path.basename(model_file)}")
    try:
        # Strict inference also catches weights that contradict the inputs' channels.
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        # The first error names the node (``<layer>/...``); the rest follow from it.
        # Node names start with the layer's name ("fc/float_accumulator").
        node = re.search(r"node name: ([^/\s)]+)/", str(err))
        layer = f" at layer '{node.group(1)}'" if node else ""
        raise ModelError(f"{model_file} / {weights_file}: the ONNX graph does not check{layer} (weights that do not "
                         f"fit the model?): {str(err).splitlines()[0]}") from None
    atomic_write(onnx_file, model.SerializeToString())
    LOG.info("exported %s (%d quantized layers, %d nodes) to %s", model_file,
             sum(isinstance(u, _QuantizedLayer) for u in units), len(g.nodes), os.fspath(onnx_file))
