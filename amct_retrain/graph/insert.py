"""Graph pass: wrap every configured layer with the fake-quant retraining layers.

Layers that read the same version of the same blob (same phase rules) share one
ActivationULQ, as the original toolkit does, so they share scale_d: it sits before the first
of them, followed by every sharer's WeightARQ (in place on the shared quantized blob, so no
layer reads it before a later in-place write); each quantized layer keeps its own ShiftNSearch.
"""
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.errors import ConfigError
from amct_retrain.graph import quant_layers as ql
from amct_retrain.graph.model_io import ModelError
from amct_retrain.graph.netgraph import BlobGraph, phase_key, rebuilt, runs_in_phase, with_phase_rules_of
from amct_retrain.layer_types import QUANTIZABLE_RULES


def quantized_input_blob(layer: str) -> str:
    """The blob holding the fake-quantized input of the layers whose quantizer ``layer`` owns."""
    return f"{layer}_input_q"


def weight_channel_axis(layer_type: str, channel_wise: bool) -> int | None:
    """Axis of per-channel weight scales, or None for one scale per tensor."""
    return QUANTIZABLE_RULES[layer_type].channel_axis if channel_wise else None


def has_weights(layer_type: str) -> bool:
    """Whether a quantized layer of ``layer_type`` has weights (and so a WeightARQ)."""
    return QUANTIZABLE_RULES[layer_type].has_weights


def fixed_weight_scale(layer: caffe_pb2.LayerParameter) -> np.ndarray | None:
    """The fixed scale_w of a quantized layer without weights (AVE Pooling: [float32(1/n)], n the
    window size), None for a layer with weights (its scale_w is ARQ of its weights)."""
    fixed = QUANTIZABLE_RULES[layer.type].fixed_scale_w
    return None if fixed is None else fixed(layer)


def arq_reads_clip_state(layer_type: str, channel_wise: bool) -> bool:
    """Whether the WeightARQ of a layer shares its activation quantizer's clip state: a per-channel
    layer whose output may be 1 x 1 (a "global conv", where all channels use the largest deq, so its
    weights must train on that unified scale; ``QuantRule.global_conv``)."""
    return QUANTIZABLE_RULES[layer_type].global_conv and channel_wise


def activation_quantizer_owners(net: caffe_pb2.NetParameter, quantized: Sequence[str]) -> dict[str, str]:
    """For each quantized layer, the quantized layer that owns its ActivationULQ: the first
    quantized layer reading the same version of the same blob under the same phase rules.
    An in-place layer (ReLU) writing a blob starts a new version of it."""
    graph = BlobGraph(net)
    owner_of_input: dict[tuple, str] = {}
    owners: dict[str, str] = {}
    for i, layer in enumerate(net.layer):
        if layer.name in quantized:
            owners[layer.name] = owner_of_input.setdefault((graph.reads[i][0], phase_key(layer)), layer.name)
    return owners


def check_quantizable(layer: caffe_pb2.LayerParameter) -> None:
    if len(layer.bottom) != 1 or len(layer.top) != 1:
        raise ModelError(f"layer '{layer.name}': a quantized layer needs exactly one bottom and one top")
    if layer.param and layer.param[0].name:
        raise ModelError(f"layer '{layer.name}': shares its weights (param name '{layer.param[0].name}'); "
                         "shared weights cannot be quantized: add the layer to skip_layers")


def insert_quant_layers(net: caffe_pb2.NetParameter, retrain_config,
                        weight_shapes: Mapping[str, Sequence[int]],
                        record_file: str, fused: Mapping[str, dict] | None = None) -> caffe_pb2.NetParameter:
    """A copy of ``net`` with every layer of ``retrain_config.layers`` quantization-aware.

    Each ActivationULQ goes right before the first layer it serves, so it reads its input
    after any in-place layer (ReLU) that ran before, exactly as that layer did. The layer's
    own weight lr/decay multipliers move to its master weights. ``fused``: layer name ->
    {"kind", "removed"} of the BatchNorm fusion it went through, carried to the saver. With a
    ``log_dir`` in the config, a TestOutputLog (:func:`with_test_output_log`) goes last.
    """
    configs = retrain_config.layers
    owners = activation_quantizer_owners(net, list(configs))
    by_name = {layer.name: layer for layer in net.layer}
    log = {"log_dir": retrain_config.log_dir} if retrain_config.log_dir else {}

    def quantization_aware(layer: caffe_pb2.LayerParameter) -> Iterator[caffe_pb2.LayerParameter]:
        name = layer.name
        if name not in configs:
            yield layer
            return
        check_quantizable(layer)
        owner = owners[name]
        quantized_input = quantized_input_blob(owner)
        if configs[owner].num_bits_d != configs[name].num_bits_d:
            raise ConfigError(f"layer '{name}': reads blob '{layer.bottom[0]}' as layer '{owner}' does and shares "
                              f"its activation quantizer, so its activation num_bits ({configs[name].num_bits_d}) "
                              f"must be '{owner}''s ({configs[owner].num_bits_d})")
        if owner == name:
            c = configs[name]
            yield from with_phase_rules_of(layer, ql.ulq_layer(
                ql.ulq_layer_name(name), layer.bottom[0], quantized_input, c.clip_min, c.clip_max,
                c.fixed_min, batch_num=retrain_config.batch_num, num_bits_d=c.num_bits_d, **log))
            for sharer in (n for n, o in owners.items() if o == name and has_weights(configs[n].layer_type)):
                shared = by_name[sharer]
                spec = shared.param[0] if shared.param else caffe_pb2.ParamSpec()
                global_conv = ({"activation_quantizer": ql.ulq_layer_name(name),
                                "conv": QUANTIZABLE_RULES[shared.type].geometry(shared)}
                               if arq_reads_clip_state(shared.type, configs[sharer].channel_wise) else {})
                yield from with_phase_rules_of(shared, ql.arq_layer(
                    ql.arq_layer_name(sharer), quantized_input, weight_shapes[sharer], _axis(configs[sharer]),
                    spec.lr_mult, spec.decay_mult, **log, **global_conv, num_bits_w=configs[sharer].num_bits_w,
                    num_bits_d=c.num_bits_d))
        quantized = caffe_pb2.LayerParameter()
        quantized.CopyFrom(layer)
        quantized.bottom[0] = quantized_input
        fixed_scale = fixed_weight_scale(layer)
        if fixed_scale is None:
            ql.share_fake_quant_weights(quantized, ql.arq_layer_name(name))
            weights = {"arq_name": ql.arq_layer_name(name), "weight_shape": weight_shapes[name]}
        else:  # no weights: no WeightARQ, and the shift-N search uses the fixed scale_w
            weights = {"arq_name": None, "weight_shape": None, "scale_w": fixed_scale.tolist()}
        yield quantized
        yield from with_phase_rules_of(layer, ql.shift_n_layer(
            ql.shift_n_layer_name(name), layer.top[0], name, ql.ulq_layer_name(owner), channel_axis=_axis(configs[name]),
            record_file=record_file, batch_num=retrain_config.batch_num, **log,
            fused=(fused or {}).get(name), **weights, num_bits_d=configs[owner].num_bits_d,
            num_bits_w=configs[name].num_bits_w))

    out = rebuilt(net, (new for layer in net.layer for new in quantization_aware(layer)))
    return with_test_output_log(out, retrain_config.log_dir) if retrain_config.log_dir else out


def _loss_weight(layer: caffe_pb2.LayerParameter, top: int) -> float:
    """The loss weight Caffe gives top ``top`` of ``layer``: its ``loss_weight`` if set, else 1 for
    the first top of a loss layer (``*Loss``), else 0."""
    if layer.loss_weight:
        return float(layer.loss_weight[top]) if top < len(layer.loss_weight) else 0.0
    return 1.0 if top == 0 and layer.type.endswith("Loss") else 0.0


def test_net_outputs(net: caffe_pb2.NetParameter) -> dict[str, float]:
    """The output blobs of ``net``'s TEST net (blobs written and never read after, as Caffe finds
    them), sorted by name as Caffe lists them, each with its loss weight."""
    available = dict.fromkeys(net.input, 0.0)
    for layer in net.layer:
        if not runs_in_phase(layer, caffe_pb2.TEST):
            continue
        for bottom in layer.bottom:
            available.pop(bottom, None)
        for i, top in enumerate(layer.top):
            available[top] = _loss_weight(layer, i)
    return dict(sorted(available.items()))


def with_test_output_log(net: caffe_pb2.NetParameter, log_dir: str) -> caffe_pb2.NetParameter:
    """A copy of ``net`` with a TEST-only TestOutputLog in place on its TEST outputs, so that
    plain ``caffe train`` logs their means over each TEST pass to TensorBoard in ``log_dir``."""
    outputs = test_net_outputs(net)
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    if outputs:
        out.layer.append(ql.test_output_log_layer(ql.TEST_OUTPUT_LOG_NAME, outputs, log_dir))
    return out


def _axis(layer_config) -> int | None:
    return weight_channel_axis(layer_config.layer_type, layer_config.channel_wise)
