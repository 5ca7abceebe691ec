"""Quantization-aware retraining: the modified model a user trains with Caffe."""
import logging
import os

import numpy as np
from google.protobuf import text_format

from amct_retrain import config as retrain_config_io
from amct_retrain import numerics, record
from amct_retrain.fileio import staged_outputs
from amct_retrain.graph import model_io
from amct_retrain.graph import quant_layers as ql
from amct_retrain.graph.fuse import fuse_for_retraining
from amct_retrain.graph.insert import (activation_quantizer_owners, arq_reads_clip_state, insert_quant_layers,
                                       weight_channel_axis)

LOG = logging.getLogger("amct_retrain")


def _check_outputs_are_not_inputs(inputs: dict[str, str], outputs: dict[str, str]) -> None:
    for out_role, out_path in outputs.items():
        for in_role, in_path in inputs.items():
            if os.path.exists(out_path) and os.path.exists(in_path) and os.path.samefile(out_path, in_path):
                raise ValueError(f"{out_role} '{out_path}' is the {in_role}: inputs are never overwritten")


def retrain_weights(params: dict[str, list[np.ndarray]], retrain_config, quantizer_owners: dict[str, str],
                    model_file: str) -> dict[str, list[np.ndarray]]:
    """The modified model's blobs: the float ones, plus for each quantized layer its ULQ clips
    and clip state (configured, or 0 with the ready flag off to ask for IFMR) and its ARQ blobs (the
    fake-quant weights, the float weights as the master weights and, for a per-channel
    Convolution, its ULQ's clip state, which the ARQ shares)."""
    out = dict(params)
    clip_states = {}
    for name, layer_config in retrain_config.layers.items():
        if quantizer_owners[name] != name:
            continue  # its activation quantizer belongs to the first layer reading the same blob
        clip_min, clip_max = layer_config.clip_min, layer_config.clip_max
        clip_states[name] = np.array((1.0, clip_min, clip_max) if clip_min is not None else (0.0, 0.0, 0.0),
                                     np.float32)
        out[ql.ulq_layer_name(name)] = [np.array([clip_max or 0.0], np.float32),
                                        np.array([clip_min or 0.0], np.float32), clip_states[name]]
    for name, layer_config in retrain_config.layers.items():
        weights, *rest = params[name]
        numerics.check_finite(weights, f"{model_file}: layer '{name}' weights")
        axis = weight_channel_axis(layer_config.layer_type, layer_config.channel_wise)
        fake_quant = numerics.arq_fake_quantize(weights, numerics.arq_scale(weights, axis), axis)
        out[name] = [fake_quant, *rest]
        out[ql.arq_layer_name(name)] = [fake_quant, weights]
        if arq_reads_clip_state(layer_config.layer_type, layer_config.channel_wise):
            out[ql.arq_layer_name(name)].append(clip_states[quantizer_owners[name]])  # shared with its ULQ
    return out


def _skip_fusion_records(record_file: str) -> dict[str, record.SingleLayerRecord]:
    """The ``skip_fusion`` entries of an existing record file: kept, and honoured."""
    if not os.path.exists(record_file):
        return {}
    return {name: record.SingleLayerRecord(skip_fusion=True)
            for name, rec in record.read_record(record_file).items() if rec.skip_fusion}


def create_quant_retrain_model(model_file: str, weights_file: str, config_file: str,
                               modified_model_file: str, modified_weights_file: str,
                               scale_offset_record_file: str) -> None:
    """Write the quantization-aware model that Caffe retrains.

    Reads the float net (one prototxt with TRAIN and TEST phases, data layers included),
    its caffemodel and the retrain config; folds Conv/Deconv + BatchNorm (+ Scale) with the
    BatchNorm statistics frozen (layers named with ``skip_fusion`` in an existing record file are
    left alone); inserts ActivationULQ / WeightARQ / ShiftNSearch
    around every configured layer; writes the new prototxt, its caffemodel (master weights =
    the float weights) and the record file (empty but for skip_fusion entries), all or nothing. The inputs are not modified.
    """
    _check_outputs_are_not_inputs(
        {"model file": model_file, "weights file": weights_file, "config file": config_file},
        {"modified model file": modified_model_file, "modified weights file": modified_weights_file,
         "record file": scale_offset_record_file})
    net = model_io.read_prototxt(model_file)
    retrain_config = retrain_config_io.load_retrain_config(config_file, net)
    shapes = model_io.probe_param_shapes(model_file)
    params = model_io.read_caffemodel(weights_file)
    model_io.check_weights_match(model_file, weights_file, shapes, params)
    record_file = os.path.abspath(scale_offset_record_file)
    skip_fusion = _skip_fusion_records(record_file)
    net, params, fused = fuse_for_retraining(net, params, skip_fusion)
    for group in fused:
        LOG.info("fused %s into layer '%s' (%s)", ", ".join(group.removed), group.layer, group.kind)
    fusions = {g.layer: {"kind": g.kind, "removed": list(g.removed)} for g in fused}
    modified = insert_quant_layers(net, retrain_config, {k: v[0] for k, v in shapes.items()}, record_file, fusions)
    owners = activation_quantizer_owners(net, list(retrain_config.layers))
    blobs = retrain_weights(params, retrain_config, owners, model_file)
    with staged_outputs() as out:
        out.write(modified_model_file, text_format.MessageToString(modified))
        out.write(modified_weights_file, model_io.caffemodel_chunks(modified.name, blobs))
        out.write(record_file, record.format_record(skip_fusion))
    LOG.info("quantization-aware model with %d quantized layers written to %s and %s",
             len(retrain_config.layers), modified_model_file, modified_weights_file)
