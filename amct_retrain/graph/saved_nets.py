"""Graph passes from the float net to the saved fake-quant and deploy nets."""
import struct
from collections.abc import Mapping

from amct_retrain import numerics
from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.graph import quant_layers as ql
from amct_retrain.graph.netgraph import rebuilt, with_phase_rules_of


def quant_layer_names(layer: str) -> dict[str, str]:
    """Names of the layers the saved models add around quantized ``layer``."""
    return {"fake_quant": f"{layer}_fake_quant", "requantize": f"{layer}_requantize",
            "quant": f"{layer}_quant_layer", "dequant": f"{layer}_dequant_layer"}


def _copy_with_input(layer: caffe_pb2.LayerParameter, bottom: str) -> caffe_pb2.LayerParameter:
    out = caffe_pb2.LayerParameter()
    out.CopyFrom(layer)
    out.bottom[0] = bottom
    return out


def _rewrite(net: caffe_pb2.NetParameter, quantized: Mapping, block) -> caffe_pb2.NetParameter:
    return rebuilt(net, (new for layer in net.layer
                         for new in (block(layer, quantized[layer.name]) if layer.name in quantized else [layer])))


def fake_quant_net(float_net: caffe_pb2.NetParameter, factors: Mapping) -> caffe_pb2.NetParameter:
    """Each quantized layer between a fixed FakeQuantActivation and an in-place Requantize
    (``factors``: layer name -> LayerFactors); everything else as in ``float_net``."""
    def block(layer, f):
        names = quant_layer_names(layer.name)
        quantized_input = f"{layer.name}_input_fake_quant"
        return with_phase_rules_of(
            layer,
            ql.fake_quant_activation_layer(names["fake_quant"], layer.bottom[0], quantized_input,
                                           f.scale_d, f.offset_d, f.num_bits_d),
            _copy_with_input(layer, quantized_input),
            ql.requantize_layer(names["requantize"], layer.top[0], f.deq.tolist(), f.shift_bit.tolist()))
    return _rewrite(float_net, factors, block)


def deploy_net(float_net: caffe_pb2.NetParameter, factors: Mapping) -> caffe_pb2.NetParameter:
    """Each quantized layer between a ``Quant`` layer (scale 1/scale_d, offset_d as one int8
    byte) and an in-place ``DeQuant`` layer (its blob 0 holds the packed deq_scale). A layer of
    fewer bits holds its codes in the same int8 fields; its bit widths are in the quant info file."""
    def block(layer, f):
        names = quant_layer_names(layer.name)
        int8_input = f"{layer.name}_input_int8"
        quant = caffe_pb2.LayerParameter(name=names["quant"], type="Quant",
                                         bottom=[layer.bottom[0]], top=[int8_input])
        quant.quant_param.scale = float(numerics.quant_multiplier(f.scale_d))
        quant.quant_param.offset = struct.pack("b", f.offset_d)
        dequant = caffe_pb2.LayerParameter(name=names["dequant"], type="DeQuant",
                                           bottom=[layer.top[0]], top=[layer.top[0]])
        dequant.dequant_param.SetInParent()
        integer_layer = _copy_with_input(layer, int8_input)
        del integer_layer.param[:]  # nothing trains in a deploy model
        return with_phase_rules_of(layer, quant, integer_layer, dequant)
    return _rewrite(float_net, factors, block)
