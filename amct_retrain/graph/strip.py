"""Graph pass: the float net back out of a retrained (quantization-aware) net."""
from dataclasses import dataclass

from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.graph import quant_layers as ql
from amct_retrain.graph.model_io import ModelError
from amct_retrain.graph.netgraph import rebuilt
from amct_retrain.layer_specs import ACTIVATION_ULQ, SHIFT_N_SEARCH, TEST_OUTPUT_LOG, WEIGHT_ARQ
from amct_retrain.numerics import DEFAULT_BITS

RETRAIN_SPECS = (ACTIVATION_ULQ, WEIGHT_ARQ, SHIFT_N_SEARCH, TEST_OUTPUT_LOG)


@dataclass(frozen=True)
class QuantizedLayer:
    """One layer the retrained net quantizes, as its retraining layers describe it."""
    name: str
    ulq_name: str           # its ActivationULQ, possibly shared with other quantized layers
    input_blob: str         # the float blob its ActivationULQ read
    channel_axis: int | None
    fixed_min: bool
    record_file: str
    batch_num: int
    fused: dict | None = None  # {"kind", "removed"}: the BatchNorm/Scale folded into it
    fixed_scale_w: tuple[float, ...] | None = None  # a layer without weights (AVE Pooling): its scale_w
    num_bits_d: int = DEFAULT_BITS  # the bit widths of its activations and weights
    num_bits_w: int = DEFAULT_BITS

    @property
    def has_weights(self) -> bool:
        """False for a layer without weights: it has no WeightARQ and no master weights."""
        return self.fixed_scale_w is None


def find_quantized_layers(net: caffe_pb2.NetParameter, model_file: str) -> dict[str, QuantizedLayer]:
    """The quantized layers of a retrained net, in net order, from their ShiftNSearch layers."""
    by_name = {layer.name: layer for layer in net.layer}
    found: dict[str, QuantizedLayer] = {}
    for layer in net.layer:
        if not SHIFT_N_SEARCH.is_layer(layer):
            continue
        p = SHIFT_N_SEARCH.parse(layer.python_param.param_str)
        name = p["quantized_layer"]
        ulq = by_name.get(p["activation_quantizer"])
        fixed_scale_w = p.get("scale_w")
        needs_arq = fixed_scale_w is None
        if ulq is None or name not in by_name or (needs_arq and ql.arq_layer_name(name) not in by_name):
            raise ModelError(f"{model_file}: layer '{name}' lacks its ActivationULQ / WeightARQ / "
                             "quantized layer: not a model made by create_quant_retrain_model")
        fixed_min = ACTIVATION_ULQ.parse(ulq.python_param.param_str)["fixed_min"]
        found[name] = QuantizedLayer(name, ulq.name, ulq.bottom[0], p["channel_axis"], fixed_min,
                                     p["record_file"], p["batch_num"], p.get("fused"),
                                     None if needs_arq else tuple(fixed_scale_w), p["num_bits_d"], p["num_bits_w"])
    if not found:
        raise ModelError(f"{model_file}: has no quantized layers: not a model made by create_quant_retrain_model")
    return found


def strip_quant_layers(net: caffe_pb2.NetParameter,
                       quantized: dict[str, QuantizedLayer]) -> caffe_pb2.NetParameter:
    """``net`` without its retraining layers: each quantized layer reads its float input
    again and owns its weights, with the master weights' lr/decay multipliers."""
    by_name = {layer.name: layer for layer in net.layer}

    def restored(layer: caffe_pb2.LayerParameter) -> caffe_pb2.LayerParameter:
        if layer.name not in quantized:
            return layer
        float_layer = caffe_pb2.LayerParameter()
        float_layer.CopyFrom(layer)
        float_layer.bottom[0] = quantized[layer.name].input_blob
        if quantized[layer.name].has_weights:
            master_spec = by_name[ql.arq_layer_name(layer.name)].param[WEIGHT_ARQ.blob("master_weights")]
            float_layer.param[0].CopyFrom(caffe_pb2.ParamSpec(lr_mult=master_spec.lr_mult,
                                                              decay_mult=master_spec.decay_mult))
        return float_layer
    return rebuilt(net, (restored(layer) for layer in net.layer
                         if not any(spec.is_layer(layer) for spec in RETRAIN_SPECS)))
