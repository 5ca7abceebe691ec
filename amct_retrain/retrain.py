"""Quantization-aware retraining: the modified model a user trains with Caffe."""
import dataclasses
import logging
import os

import numpy as np
from google.protobuf import text_format

from amct_retrain import config as retrain_config_io
from amct_retrain import kernels, numerics, record
from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.fileio import check_outputs_are_not_inputs, staged_outputs
from amct_retrain.graph import model_io
from amct_retrain.graph import quant_layers as ql
from amct_retrain.graph.fuse import fuse_for_retraining
from amct_retrain.graph.insert import (activation_quantizer_owners, arq_reads_clip_state, has_weights,
                                       insert_quant_layers, weight_channel_axis)
from amct_retrain.graph.netgraph import BlobGraph
from amct_retrain.layer_specs import ACTIVATION_ULQ, WEIGHT_ARQ
from amct_retrain.record import existing_record, skip_fusion_entries

LOG = logging.getLogger(__name__)


def retrain_weights(params: dict[str, list[np.ndarray]], retrain_config, quantizer_owners: dict[str, str],
                    weights_file: str) -> dict[str, list[np.ndarray | model_io.LazyBlob]]:
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
        out[ql.ulq_layer_name(name)] = ACTIVATION_ULQ.ordered({"clip_max": np.array([clip_max or 0.0], np.float32),
                                                               "clip_min": np.array([clip_min or 0.0], np.float32),
                                                               "clip_state": clip_states[name]})
    for name, layer_config in retrain_config.layers.items():
        if not has_weights(layer_config.layer_type):
            continue  # AVE Pooling: nothing to quantize but its input
        weights, *rest = params[name]
        numerics.check_finite(weights, f"{weights_file}: layer '{name}' weights")
        axis = weight_channel_axis(layer_config.layer_type, layer_config.channel_wise)
        scale_w = kernels.arq_scale(weights, axis, layer_config.num_bits_w)
        # Computed as the writer reaches it (twice: the layer's blob and the ARQ's), so that the
        # float and the fake-quant weights of a big net are not in memory together.
        fake_quant = model_io.arq_weight_blob(weights, scale_w, axis, num_bits=layer_config.num_bits_w)
        out[name] = [fake_quant, *rest]
        arq = {"fake_quant_weights": fake_quant, "master_weights": weights, "scale_w": scale_w}
        if arq_reads_clip_state(layer_config.layer_type, layer_config.channel_wise):
            arq["clip_state"] = clip_states[quantizer_owners[name]]  # shared with its ULQ
        out[ql.arq_layer_name(name)] = WEIGHT_ARQ.ordered(arq)
    return out


def _clips_from_calibration(net: caffe_pb2.NetParameter, retrain_config: retrain_config_io.RetrainConfig,
                            records: dict[str, record.SingleLayerRecord],
                            record_file: str) -> retrain_config_io.RetrainConfig:
    """``retrain_config`` with the clips of every layer that has none configured started from the
    record's scale_d / offset_d (a calibration record): clip_min = scale_d * o, clip_max =
    scale_d * (o + 255) with o = -offset_d - 128, the pair whose ULQ grid is the record's (at the
    record's num_bits_d b: o + 2**b - 1 and o = -offset_d - 2**(b-1); the range, whatever b the
    retraining uses).

    A layer whose input is a BatchNorm's or Scale's output is left to IFMR (warning): calibration
    may have folded that BatchNorm into it (BN+Scale+Conv), so its scale_d may be of another tensor."""
    graph = BlobGraph(net)
    input_producer: dict[str, str | None] = {}  # quantized layer -> type of the layer writing its input
    for i, layer in enumerate(net.layer):
        if layer.name in retrain_config.layers:
            writer = graph.reads[i][0].writer
            input_producer.setdefault(layer.name, net.layer[writer].type if writer >= 0 else None)
    layers = dict(retrain_config.layers)
    for name, layer_config in retrain_config.layers.items():
        rec = records.get(name)
        if layer_config.clip_min is not None or rec is None or not (rec.HasField("scale_d")
                                                                    and rec.HasField("offset_d")):
            continue
        if input_producer.get(name) in ("BatchNorm", "Scale"):
            LOG.warning("layer '%s': reads the output of a BatchNorm/Scale that calibration may have folded into "
                        "it; its clips start from IFMR, not from %s", name, record_file)
            continue
        bw = numerics.bit_width(record.bit_widths(rec, f"{record_file}: layer '{name}'")[0])
        o = bw.code_min - rec.offset_d
        layers[name] = dataclasses.replace(layer_config, clip_min=rec.scale_d * o,
                                           clip_max=rec.scale_d * (o + bw.levels))
        LOG.info("layer '%s': clips start from the calibration record (scale_d %r, offset_d %d)",
                 name, rec.scale_d, rec.offset_d)
    return dataclasses.replace(retrain_config, layers=layers)


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

    Starting from calibration: when the existing record file holds ``scale_d`` / ``offset_d`` of a
    layer (the record of post-training calibration), that layer's clips start there instead of
    from IFMR on the first batch: ``clip_min = scale_d * o``, ``clip_max = scale_d * (o + 255)``
    with ``o = -offset_d - 128`` (so the first forward quantizes on the calibrated grid), ready
    flag 1. Clips set in the config take precedence; a layer reading a BatchNorm/Scale output
    starts from IFMR (calibration may have folded that BatchNorm into it). The record's other
    entries, but skip_fusion, are then replaced by the retraining's own.
    """
    check_outputs_are_not_inputs(
        {"model file": model_file, "weights file": weights_file, "config file": config_file},
        {"modified model file": modified_model_file, "modified weights file": modified_weights_file,
         "record file": scale_offset_record_file})
    net = model_io.read_prototxt(model_file)
    retrain_config = retrain_config_io.load_retrain_config(config_file, net)
    if not retrain_config.layers:
        raise retrain_config_io.ConfigError(f"{config_file}: enables no layer of {model_file} (every entry has "
                                            "retrain_enable false, or none is given): nothing to retrain")
    probed = model_io.probe_net(net, model_file)
    shapes = probed.params
    params = model_io.read_caffemodel(weights_file)
    model_io.check_weights_match(model_file, weights_file, shapes, params)
    retrain_config = dataclasses.replace(retrain_config, layers=retrain_config_io.without_shape_broken_layers(
        retrain_config.layers, net, probed.bottoms, model_file))
    if not retrain_config.layers:
        raise retrain_config_io.ConfigError(f"{config_file}: every layer it enables breaks a shape constraint in "
                                            f"{model_file} (see the warnings): nothing to retrain")
    record_file = os.path.abspath(scale_offset_record_file)
    existing = existing_record(record_file)
    skip_fusion = skip_fusion_entries(existing)
    net, params, fused = fuse_for_retraining(net, params, skip_fusion)
    retrain_config = _clips_from_calibration(net, retrain_config, existing, record_file)
    for group in fused:
        LOG.info("fused %s into layer '%s' (%s)", ", ".join(group.removed), group.layer, group.kind)
    fusions = {g.layer: {"kind": g.kind, "removed": list(g.removed)} for g in fused}
    modified = insert_quant_layers(net, retrain_config, {k: v[0] for k, v in shapes.items()}, record_file, fusions)
    owners = activation_quantizer_owners(net, list(retrain_config.layers))
    blobs = retrain_weights(params, retrain_config, owners, weights_file)
    with staged_outputs() as out:
        out.write(modified_model_file, text_format.MessageToString(modified))
        out.write(modified_weights_file, model_io.caffemodel_chunks(modified.name, blobs))
        out.write(record_file, record.format_record(skip_fusion))
    LOG.info("quantization-aware model with %d quantized layers written to %s and %s",
             len(retrain_config.layers), modified_model_file, modified_weights_file)
