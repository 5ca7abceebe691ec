"""Graph pass: wrap every configured layer with the fake-quant retraining layers."""
from collections.abc import Mapping, Sequence

from caffe.proto import caffe_pb2

from amct_retrain.config import QUANTIZABLE_RULES
from amct_retrain.graph import quant_layers as ql
from amct_retrain.graph.model_io import ModelError

def quantized_input_blob(layer: str) -> str:
    """The blob holding ``layer``'s fake-quantized input."""
    return f"{layer}_input_q"


def weight_channel_axis(layer_type: str, channel_wise: bool) -> int | None:
    """Axis of per-channel weight scales, or None for one scale per tensor."""
    return QUANTIZABLE_RULES[layer_type].channel_axis if channel_wise else None


def _with_phase_rules(inserted: caffe_pb2.LayerParameter, layer: caffe_pb2.LayerParameter):
    inserted.include.extend(layer.include)
    inserted.exclude.extend(layer.exclude)
    return inserted


def quantize_layer_block(layer: caffe_pb2.LayerParameter, layer_config, weight_shape: Sequence[int],
                         record_file: str, batch_num: int,
                         log_dir: str | None = None) -> list[caffe_pb2.LayerParameter]:
    """[ActivationULQ, WeightARQ, the layer reading the quantized input, ShiftNSearch].

    The layer's own weight lr/decay multipliers move to the master weights; its weight
    param becomes the ARQ layer's fake-quant blob.
    """
    if len(layer.bottom) != 1 or len(layer.top) != 1:
        raise ModelError(f"layer '{layer.name}': a quantized layer needs exactly one bottom and one top")
    if layer.param and layer.param[0].name:
        raise ModelError(f"layer '{layer.name}': shares its weights (param name '{layer.param[0].name}'); "
                         "shared weights cannot be quantized: add the layer to skip_layers")
    name, axis = layer.name, weight_channel_axis(layer_config.layer_type, layer_config.channel_wise)
    ulq_name, arq_name = ql.ulq_layer_name(name), ql.arq_layer_name(name)
    weight_spec = layer.param[0] if layer.param else caffe_pb2.ParamSpec()
    quantized = caffe_pb2.LayerParameter()
    quantized.CopyFrom(layer)
    quantized.bottom[0] = quantized_input_blob(name)
    ql.share_fake_quant_weights(quantized, arq_name)
    extra = {"log_dir": log_dir} if log_dir else {}
    block = [
        ql.ulq_layer(ulq_name, layer.bottom[0], quantized.bottom[0], layer_config.clip_min,
                     layer_config.clip_max, layer_config.fixed_min, **extra),
        ql.arq_layer(arq_name, quantized.bottom[0], weight_shape, axis,
                     weight_spec.lr_mult, weight_spec.decay_mult, **extra),
        quantized,
        ql.shift_n_layer(ql.shift_n_layer_name(name), layer.top[0], name, ulq_name, arq_name,
                         weight_shape, axis, record_file, batch_num, **extra),
    ]
    return [_with_phase_rules(inserted, layer) for inserted in block]


def insert_quant_layers(net: caffe_pb2.NetParameter, retrain_config,
                        weight_shapes: Mapping[str, Sequence[int]],
                        record_file: str) -> caffe_pb2.NetParameter:
    """A copy of ``net`` with every layer of ``retrain_config.layers`` quantization-aware.

    Each block goes where the layer was, so the ULQ layer reads its input after any
    in-place layer (ReLU) that ran before, exactly as the layer itself did.
    """
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    for layer in net.layer:
        layer_config = retrain_config.layers.get(layer.name)
        if layer_config is None:
            out.layer.add().CopyFrom(layer)
        else:
            out.layer.extend(quantize_layer_block(layer, layer_config, weight_shapes[layer.name], record_file,
                                                  retrain_config.batch_num, retrain_config.log_dir))
    return out
