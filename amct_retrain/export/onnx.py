"""ONNX export of a deploy model (contract section 3), run by onnxruntime on the CPU.

Two forms (``export_onnx(..., mode=...)``):

* ``"exact"``: the deploy model's integer arithmetic, bit for bit the fake-quant model and the
  integer executor (``numerics``) on every input. Each ``Quant -> Convolution/Deconvolution/
  InnerProduct/Pooling -> DeQuant`` triple becomes::

      x -> Mul(quant_param.scale) -> Round -> Clip(-128 - offset_d, 127 - offset_d)
        -> Add(offset_d) -> Cast(int8)                                  the Quant layer's codes
        -> ConvInteger / MatMulInteger (int8 weights, zero point offset_d) -> Add(int32 bias)
        -> Cast(double) -> Mul(2^-N[c]) -> Round -> Clip(int16) -> Cast(int32) -> Cast(float)
        -> Mul(deq[c] * 2^N[c])                                         the DeQuant layer

  The Quant layer multiplies by ``float32(1/scale_d)`` where ONNX's QuantizeLinear divides by
  a scale; no float32 scale makes the two round alike for every input, so the codes are made
  as the target makes them. ONNX's Round rounds half to even, as ``numerics`` does
  (``np.rint``). The accumulators are exact int32 sums (ConvInteger pads with the zero
  point: the real value 0, as Caffe pads); the shift by 2^N is exact in double, as in
  ``numerics.requantize``, and ``deq * 2^N`` is exact in float32, as in
  ``numerics.requantized_output``. A Deconvolution (group 1, dilation 1) is a ConvInteger
  of its flipped kernel over the codes spread ``stride`` apart (a ConvTranspose by a 1x1
  one, exact) and padded by ``kernel - 1 - pad``; an AVE Pooling's window sums are a
  depthwise ConvInteger by ones (its 1/n is in deq). A layer of ``num_bits_d`` b < 8 (from the
  quant info file, as for the integer executor) clips its codes to ``[-2**(b-1), 2**(b-1) - 1]``
  and keeps them in int8, as the deploy model does: ConvInteger / MatMulInteger take no int4.
* ``"standard"`` (:mod:`amct_retrain.export.standard`): the QuantizeLinear/DequantizeLinear
  pattern onnxruntime fuses into integer kernels, for speed, within a step of the exact one.

Every other layer of the TEST phase becomes its float ONNX operator
(:mod:`amct_retrain.export.float_layers`). Data layers become graph inputs named after their
data top, with a symbolic batch axis (labels are dropped); loss and accuracy layers are dropped
and their first bottom (the logits) becomes a graph output, as does every blob that no later
layer reads.
"""
import functools
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain import numerics, saved_models
from amct_retrain.export import float_layers as fl
from amct_retrain.export.graph import (DATA_TYPES, IR_VERSION, OPSET, OUTPUT_TYPES, Graph, QuantizedLayer,
                                       data_tops, input_blobs, plan, resolve_input_shapes, test_phase_layers,
                                       unit_name, unit_tops)
from amct_retrain.export.quantized import quantized_params
from amct_retrain.export.standard import Standard
from amct_retrain.fileio import atomic_write, check_outputs_are_not_inputs
from amct_retrain.graph import model_io
from amct_retrain.graph.model_io import ModelError

LOG = logging.getLogger(__name__)

MODES = ("standard", "exact")


def _channel_const(g: Graph, hint: str, values: np.ndarray, rank: int) -> str:
    """A per-channel vector laid along axis 1 of a ``rank``-axis tensor."""
    return g.const(hint, values.reshape((values.size,) + (1,) * (rank - 2)))


def _codes(g: Graph, x: str, quant_scale: float, offset: int, num_bits: int = numerics.DEFAULT_BITS) -> str:
    """The Quant layer's float codes ``k = clip(rint(x * quant_scale), -128 - o, 127 - o)`` (the
    ``num_bits`` range; ``numerics.quant_layer_forward`` minus the offset)."""
    k = g.op("Round", [g.op("Mul", [x, g.const("quant_scale", np.float32(quant_scale))])])
    code_min, code_max = numerics.code_bounds(numerics.bit_width(num_bits), offset)
    return g.op("Clip", [k, g.const("code_min", code_min), g.const("code_max", code_max)], rank=g.rank(x))


def _exact_quantized(g: Graph, q: QuantizedLayer, deploy: Mapping[str, list[caffe_pb2.BlobProto]],
                     weights_file: str, num_bits_d: Mapping[str, int]) -> None:
    """The integer form of a Quant -> layer -> DeQuant triple (see the module docstring);
    ``num_bits_d``: quantized layer -> its codes' bit width (8 where absent)."""
    layer = q.layer
    ints, quant_scale, offset = quantized_params(g, q, deploy, weights_file)
    channels = ints.deq.size
    g.scope = q.quant.name
    x = fl.linear_input(g, layer, g.read(q.quant.bottom[0], q.quant))
    k = _codes(g, x, quant_scale, offset, num_bits_d.get(layer.name, numerics.DEFAULT_BITS))
    zero_point = g.const("zero_point", np.int8(offset))

    g.scope = layer.name
    acc = fl.EXACT_ACCUMULATORS[layer.type](g, layer, k, offset, zero_point, ints.weights, channels)
    rank = fl.output_rank(g, layer, x)
    if len(deploy.get(layer.name, [])) > 1:
        acc = g.op("Add", [acc, _channel_const(g, "bias_int32", ints.bias.astype(np.int32), rank)])

    g.scope = q.dequant.name
    # The shift-N requantisation of numerics.requantize / requantized_output.
    shift = ints.shift_bit.astype(np.int32)
    t = g.op("Round", [g.op("Mul", [g.op("Cast", [acc], to=TensorProto.DOUBLE),
                                    _channel_const(g, "inverse_shift", np.ldexp(1.0, -shift), rank)])])
    t = g.op("Clip", [t, g.const("int16_min", np.float64(numerics.INT16_MIN)),
                      g.const("int16_max", np.float64(numerics.INT16_MAX))])
    t = g.op("Cast", [g.op("Cast", [t], to=TensorProto.INT32)], to=TensorProto.FLOAT)  # -0 becomes 0
    step = np.ldexp(ints.deq, shift).astype(np.float32)
    g.op("Mul", [t, _channel_const(g, "output_step", step, rank)], g.write(q.dequant.top[0], q.dequant.name, rank))


# --------------------------------------------------------------------------- export


QuantizedConverter = Callable[[Graph, QuantizedLayer, Mapping[str, list[caffe_pb2.BlobProto]], str], None]


def export_onnx(deploy_model_file: str | os.PathLike, deploy_weights_file: str | os.PathLike,
                onnx_file: str | os.PathLike, input_shapes: Mapping[str, Sequence[int]] | None = None,
                mode: str = "standard", quant_info_file: str | os.PathLike | None = None) -> None:
    """Write the deploy model (``*_deploy_model.prototxt`` + ``*_deploy_weights.caffemodel``) as an
    opset-21 ONNX model that onnxruntime runs on the CPU, with a symbolic batch axis.

    Args:
        deploy_model_file: the deploy prototxt (Quant / DeQuant around quantized layers).
        deploy_weights_file: its caffemodel (int8 weights, int32 bias, packed deq_scale).
        onnx_file: output path, replaced atomically.
        input_shapes: graph input name (a data layer's data top or a legacy input) -> shape,
            e.g. ``{"data": (1, 3, 224, 224)}`` (NCHW; the first axis stays symbolic in the
            graph); default: the shapes Caffe gives the TEST-phase data layers (asked in a
            child process).
        mode: ``"standard"`` (default): QuantizeLinear/DequantizeLinear that onnxruntime fuses
            into integer kernels (uint8 activations, per-channel int8 weights), within about a
            step of the deploy model's output; ``"exact"``: the deploy model's integer
            arithmetic bit for bit (see the module docstring).
        quant_info_file: the saver's quant info file, for the bit widths of the Quant layers'
            codes (``"exact"``); default: the one beside the deploy model, if any (else 8 bits).

    Raises:
        ModelError (a ValueError): an unsupported layer type or parameter, or blobs that
        contradict the model; the message names the file and the layer.
    """
    if mode not in MODES:
        raise ModelError(f"export_onnx: mode must be one of {MODES}, got {mode!r}")
    model_file, weights_file = os.fspath(deploy_model_file), os.fspath(deploy_weights_file)
    check_outputs_are_not_inputs({"deploy model file": model_file, "deploy weights file": weights_file},
                                 {"ONNX file": onnx_file})
    net = model_io.read_prototxt(model_file)
    units = plan(test_phase_layers(net), model_file, fl.FLOAT_CONVERTERS)
    deploy = saved_models.read_deploy_blobs(weights_file)
    inputs = input_blobs(net, units)
    shapes = resolve_input_shapes(net, inputs, model_file, input_shapes)

    final_writers = {top: unit_name(u) for u in units for top in unit_tops(u)}
    g = Graph(model_file, set(inputs) | set(final_writers), final_writers)
    finish: Callable[[Graph], None] | None = None  # the standard form's pass over the whole graph
    bits = saved_models.activation_bit_widths(model_file, quant_info_file and os.fspath(quant_info_file))
    if mode == "exact":
        convert_quantized: QuantizedConverter = functools.partial(_exact_quantized, num_bits_d=bits)
    else:
        low = sorted(name for name, b in bits.items() if b < numerics.DEFAULT_BITS)
        if low:  # its 8-bit QuantizeLinear would not clip the codes to the layer's width
            raise ModelError(f"{model_file}: layer '{low[0]}' quantizes its input to {bits[low[0]]} bits (quant info "
                             f"file beside the deploy model); mode='standard' exports 8-bit activations only: "
                             f"use mode='exact' (CLI: --mode exact)")
        standard = Standard()
        convert_quantized, finish = standard.convert, standard.finish
    for name in net.input:
        g.add_input(name, shapes[name])
    for unit in units:
        if isinstance(unit, QuantizedLayer):
            convert_quantized(g, unit, deploy, weights_file)
        elif unit.type in DATA_TYPES:
            for name in data_tops(unit):
                g.add_input(name, shapes[name])
        elif unit.type in OUTPUT_TYPES:
            g.mark_output(g.read(unit.bottom[0], unit))
        else:
            g.scope = unit.name
            params = [model_io.blob_to_array(b, weights_file, unit.name) for b in deploy.get(unit.name, [])]
            fl.FLOAT_CONVERTERS[unit.type](g, unit, params)
    if finish is not None:
        finish(g)

    graph = helper.make_graph(g.nodes, net.name or "caffe_net", g.inputs, g.output_infos(), g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="amct_retrain",
                              doc_string=f"{mode} export of {os.path.basename(model_file)}")
    try:
        # Strict inference also catches weights that contradict the inputs' channels.
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        # The first error names the node (``<layer>/...``); the rest follow from it.
        # Node names are the layer's name or start with it ("fc", "fc/Gemm"); layer names may hold "/".
        node = re.search(r"node name: ([^\s)]+)", str(err))
        owners = [layer.name for layer in net.layer
                  if node and (node.group(1) == layer.name or node.group(1).startswith(layer.name + "/"))]
        at = f" at layer '{max(owners, key=len)}'" if owners else ""
        raise ModelError(f"{model_file} / {weights_file}: the ONNX graph does not check{at} (weights that do not "
                         f"fit the model?): {str(err).splitlines()[0]}") from None
    atomic_write(onnx_file, model.SerializeToString())
    LOG.info("exported %s (%s, %d quantized layers, %d nodes) to %s", model_file, mode,
             sum(isinstance(u, QuantizedLayer) for u in units), len(g.nodes), os.fspath(onnx_file))
