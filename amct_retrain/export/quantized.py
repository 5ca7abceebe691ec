"""A deploy model's quantized triples as both ONNX exports read them: the checked integers of
each ``Quant -> layer -> DeQuant`` triple, and the scales QuantizeLinear / DequantizeLinear need."""
import struct
from collections.abc import Mapping

import numpy as np

from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain import numerics, saved_models
from amct_retrain.export import float_layers as fl
from amct_retrain.export.graph import Graph, QuantizedLayer, blob_count
from amct_retrain.graph.model_io import ModelError
from amct_retrain.layer_types import QUANTIZABLE_RULES


def recover_scales(quant_scale: float, deq: np.ndarray) -> tuple[np.float32, np.ndarray]:
    """``(scale_d, scale_w)`` of a quantized layer for QuantizeLinear / weight DequantizeLinear.

    Args:
        quant_scale: the Quant layer's ``quant_param.scale``, float32(1/scale_d), the multiplier
            the codes are made with.
        deq: float32 (C,) unpacked deq_scale, float32(scale_d * scale_w[c]).

    Returns:
        scale_d (np.float32): the float32 nearest 1/quant_scale;
        scale_w (float32 (C,)): ``deq / scale_d``, or the float32 within two ulps of it for
        which ``numerics.deq_scales(scale_d, scale_w) == deq`` where there is one, so that the
        bias scale is the input scale times the weight scale, as QDQ consumers assume.
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


def quantized_params(g: Graph, q: QuantizedLayer, deploy: Mapping[str, list[caffe_pb2.BlobProto]],
                     weights_file: str) -> tuple[saved_models.IntegerParams, float, int]:
    """The checked integers of a triple, its Quant multiplier and its int8 offset."""
    layer = q.layer
    rule = QUANTIZABLE_RULES[layer.type]
    ints = saved_models.integer_params(deploy, layer.name, q.dequant.name, weights_file, rule.has_weights)
    if rule.has_weights:
        blob_count(g, layer, deploy[layer.name], 1 + fl.bias_term(layer))
        fl.check_weight_shape(g, layer, ints.weights.shape)
        channels = ints.weights.shape[rule.channel_axis]
        if ints.deq.size != channels:
            raise ModelError(f"{weights_file}: DeQuant layer '{q.dequant.name}' holds {ints.deq.size} deq_scale "
                             f"values for the {channels} output channels of '{layer.name}'")
    quant_scale = q.quant.quant_param.scale
    if not (np.isfinite(quant_scale) and quant_scale > 0) or len(q.quant.quant_param.offset) != 1:
        raise ModelError(f"{g.where(q.quant)}: quant_param needs a positive finite scale and a one-byte offset, "
                         f"got scale {quant_scale!r}, offset {q.quant.quant_param.offset!r}")
    return ints, quant_scale, struct.unpack("b", q.quant.quant_param.offset)[0]
