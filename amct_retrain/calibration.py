"""Post-training calibration (PTQ) and conversion: the calibration half of the contract's API.

    amct.create_quant_config("config.json", "float.prototxt", "float.caffemodel", batch_num=2)
    graph = amct.init("config.json", "float.prototxt", "float.caffemodel", "record.txt")
    amct.quantize_model(graph, "calibration.prototxt", "calibration.caffemodel")
    net = caffe.Net("calibration.prototxt", caffe.TEST, weights="calibration.caffemodel")
    for _ in range(2):
        net.forward()          # the observers write the record after the 2nd pass
    amct.save_model(graph, "Both", "./result/model")

    amct.convert_model("float.prototxt", "float.caffemodel", "record.txt", "./result/model")

Flow: ``quantize_model`` folds every BatchNorm (+ Scale) it can (Conv+BN+Scale, Deconv+BN+Scale,
FC+BN+Scale, BN+Scale+Conv; ``skip_fusion`` entries of the record opt layers out), writes each
quantized layer's ARQ weight scales into the record and the calibration model: the fused float net
with in-place observers (``graph/calibrate.py``, ``layers/calibration.py``) that, over ``batch_num``
TEST forward passes, write scale_d / offset_d (IFMR) and shift_bit. ``save_model`` and
``convert_model`` both export the fused float model with the record's factors through the one
exporter, :func:`amct_retrain.saver.write_quantized_models`, after the same validation; so
``convert_model`` with a calibration's record writes ``save_model``'s files byte for byte.

The record names every quantizable layer of the fused model that runs in the TEST phase: with its
factors (quantized) or as an entry without factors (kept in float: a skipped layer). A record
missing such a layer, naming a layer the fused model lacks (a BatchNorm that fusion removed
included), or with factors that do not fit the layer is an error naming the layer.

Beside the record, ``<record>.forward_passes.json`` counts the TEST passes each layer's
calibration saw, so that ``save_model`` can say how many ran when too few did.
"""
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from google.protobuf import text_format

from amct_retrain import numerics, record
from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.config import (QUANTIZABLE_RULES, CalibrationConfig, ConfigError, LayerCalibrationConfig,
                                 create_quant_config, layers_by_name, load_calibration_config, quantizable_layers,
                                 shape_constraint_broken, without_shape_broken_layers)
from amct_retrain.errors import ArgumentError
from amct_retrain.fileio import check_outputs_are_not_inputs, staged_outputs
from amct_retrain.graph import model_io
from amct_retrain.graph import quant_layers as ql
from amct_retrain.graph.calibrate import insert_calibration_layers
from amct_retrain.graph.fuse import FusedGroup, fuse_batchnorm
from amct_retrain.graph.insert import (activation_quantizer_owners, check_quantizable, fixed_weight_scale,
                                       weight_channel_axis)
from amct_retrain.graph.model_io import ModelError
from amct_retrain.graph.netgraph import runs_in_phase
from amct_retrain.record import (existing_record, forward_passes_file, forward_passes_text, read_forward_passes,
                                 skip_fusion_entries)
from amct_retrain.saved_models import output_files
from amct_retrain.saver import ExportLayer, LayerFactors, check_save_path, check_save_type, write_quantized_models

__all__ = ["create_quant_config", "init", "quantize_model", "save_model", "convert_model", "CalibrationGraph",
           "forward_passes_file", "read_forward_passes"]

LOG = logging.getLogger(__name__)
FACTOR_FIELDS = ("scale_d", "offset_d", "scale_w", "offset_w", "shift_bit")
NOT_FLOAT_TYPES = ("Quant", "DeQuant", "AntiQuant")


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class FusedModel:
    """A float model after calibration's BatchNorm fusions: the model calibrated and exported."""
    net: caffe_pb2.NetParameter
    params: dict[str, list[np.ndarray]]
    groups: tuple[FusedGroup, ...]

    @property
    def fused_layers(self) -> dict[str, dict]:
        """Layer -> {"kind", "removed"} of each fusion, for the quant info file."""
        return {g.layer: {"kind": g.kind, "removed": list(g.removed)} for g in self.groups}


@dataclass(frozen=True)
class Calibrated:
    """What quantize_model set up: the fused model and its calibrated layers (name -> config)."""
    fused: FusedModel
    layers: dict[str, LayerCalibrationConfig]


@dataclass
class CalibrationGraph:
    """The model :func:`init` parsed, for :func:`quantize_model` and :func:`save_model`.

    ``record_file`` is absolute (the observers write it whatever the working directory);
    ``skip_fusion``: the layers the record opts out of fusion; ``calibrated`` is set by
    quantize_model.
    """
    config_file: str
    model_file: str
    weights_file: str
    record_file: str
    net: caffe_pb2.NetParameter
    params: Mapping[str, list[np.ndarray]]
    config: CalibrationConfig
    skip_fusion: frozenset[str]
    calibrated: Calibrated | None = None
    bottom_shapes: Mapping[str, list[tuple[int, ...]]] = field(default_factory=dict)  # layer -> its input shapes


def _read_float_model(model_file: str, weights_file: str
                      ) -> tuple[caffe_pb2.NetParameter, model_io.CaffemodelParams, dict[str, list[tuple[int, ...]]]]:
    """The float net, its weights, checked against each other in Python (no Caffe abort), and each
    layer's input shapes (whether an AVE Pooling's windows tile its input)."""
    net = model_io.read_prototxt(model_file)
    quantized = [layer.name for layer in net.layer
                 if layer.type in NOT_FLOAT_TYPES or ql.python_layer_class(layer) is not None]
    if quantized:
        raise ModelError(f"{model_file}: layer '{quantized[0]}' is a quantization layer: give the float model "
                         "(a quantized or calibration model cannot be quantized again)")
    probed = model_io.probe_net(net, model_file)
    params = model_io.read_caffemodel(weights_file)
    model_io.check_weights_match(model_file, weights_file, probed.params, params)
    return net, params, probed.bottoms


def _fuse(net: caffe_pb2.NetParameter, params: Mapping[str, list[np.ndarray]],
          skip_fusion: Iterable[str]) -> FusedModel:
    fused_net, fused_params, groups = fuse_batchnorm(net, params, frozenset(skip_fusion))
    for group in groups:
        LOG.info("fused %s into layer '%s' (%s)", ", ".join(group.removed), group.layer, group.kind)
    return FusedModel(fused_net, fused_params, tuple(groups))


def _required_layers(net: caffe_pb2.NetParameter) -> list[str]:
    """The layers a record must name: quantizable, and run in the TEST phase (the inference net)."""
    names, _ = quantizable_layers(net)
    by_name = layers_by_name(net)
    return [name for name in names if runs_in_phase(by_name[name], caffe_pb2.TEST)]


# --------------------------------------------------------------------------- API


def init(config_file: str, model_file: str, weights_file: str, scale_offset_record_file: str) -> CalibrationGraph:
    """Parse the float model and the calibration config into a :class:`CalibrationGraph`, and
    create the record file, or empty it but for its ``skip_fusion`` entries (kept and honoured by
    the fusions). Also resets the record's forward-pass file.

    The model and weights are checked against each other (Caffe is asked for the parameter shapes
    in a child process) and the config against the model; every error is raised before anything
    is written (:class:`ModelError`, :class:`~amct_retrain.config.ConfigError`, naming the file and
    the layer). The inputs are not modified.
    """
    check_outputs_are_not_inputs({"model file": model_file, "weights file": weights_file, "config file": config_file},
                                 {"record file": scale_offset_record_file,
                                  "forward-pass file": forward_passes_file(os.fspath(scale_offset_record_file))})
    net, params, bottoms = _read_float_model(model_file, weights_file)
    config = load_calibration_config(config_file, net)
    record_file = os.path.abspath(scale_offset_record_file)
    skip_fusion = skip_fusion_entries(existing_record(record_file))
    unknown = sorted(set(skip_fusion) - set(layers_by_name(net)))
    if unknown:  # else only save_model would tell, after the calibration ran
        raise ModelError(f"{record_file}: skip_fusion entry of layer '{unknown[0]}', which {model_file} lacks")
    with staged_outputs() as out:
        out.write(record_file, record.format_record(skip_fusion))
        out.write(forward_passes_file(record_file), forward_passes_text({}))
    LOG.info("calibration of %d layer(s) over %d batch(es) set up; record file %s",
             len(config.layers), config.batch_num, record_file)
    return CalibrationGraph(os.fspath(config_file), os.fspath(model_file), os.fspath(weights_file), record_file,
                            net, params, config, frozenset(skip_fusion), bottom_shapes=bottoms)


def _check_graph(graph: object, call: str) -> None:
    if not isinstance(graph, CalibrationGraph):
        raise ArgumentError(f"{call}: graph must be the CalibrationGraph that init() returned, got "
                            f"{type(graph).__name__} {str(graph)[:80]!r}")


def _graph_inputs(graph: CalibrationGraph) -> dict[str, str]:
    return {"model file": graph.model_file, "weights file": graph.weights_file, "config file": graph.config_file,
            "record file": graph.record_file}


def _outputs(save_path: str | os.PathLike) -> dict[str, str]:
    return {f"output {role}": path for role, path in output_files(os.fspath(save_path)).items()}


def _calibrated_layers(net: caffe_pb2.NetParameter, config: CalibrationConfig,
                       bottom_shapes: Mapping[str, list[tuple[int, ...]]],
                       model_file: str) -> dict[str, LayerCalibrationConfig]:
    """The configured layers calibration observes: those that run in the TEST phase and whose input
    shape breaks no constraint (an AVE Pooling that does not tile its input stays float, warned)."""
    by_name = layers_by_name(net)
    layers = {}
    for name, layer_config in config.layers.items():
        layer = by_name[name]
        if not runs_in_phase(layer, caffe_pb2.TEST):
            LOG.warning("layer '%s' never runs in the TEST phase (phase rules): calibration cannot observe it; "
                        "it stays in float", name)
            continue
        check_quantizable(layer)
        layers[name] = layer_config
    return without_shape_broken_layers(layers, net, bottom_shapes, model_file)


def _check_shared_settings(net: caffe_pb2.NetParameter, layers: Mapping[str, LayerCalibrationConfig],
                           owners: Mapping[str, str], config_file: str) -> None:
    by_name = layers_by_name(net)
    for name, owner in owners.items():
        if (layers[name].ifmr, layers[name].num_bits_d) != (layers[owner].ifmr, layers[owner].num_bits_d):
            raise ConfigError(f"{config_file}: layer {name!r}: key 'activation_quant_params': the layer reads blob "
                              f"'{by_name[name].bottom[0]}' as layer {owner!r} does and shares its activation "
                              "quantizer (one scale_d), so their activation_quant_params (num_bits included) "
                              "must be equal")


def quantize_model(graph: CalibrationGraph, modified_model_file: str, modified_weights_file: str) -> None:
    """Write the calibration model: the fused float model with the calibration observers.

    Folds Conv/Deconv/FC + BatchNorm (+ Scale) and BatchNorm (+ Scale) + Conv (BatchNorms in
    inference form; ``skip_fusion`` layers left alone); writes each calibrated layer's ``scale_w``
    (ARQ of the fused weights, one per output channel with ``channel_wise``) and ``offset_w`` (0)
    into the record, and an entry without factors for every other quantizable layer (kept in
    float); writes the modified prototxt and caffemodel (the fused float weights). All or nothing;
    the inputs are not modified. Then run the modified model ``batch_num`` times in the TEST phase
    (``caffe.Net(modified_model_file, caffe.TEST, weights=modified_weights_file).forward()``, or
    ``caffe test``) and call :func:`save_model`.
    """
    _check_graph(graph, "quantize_model")
    check_outputs_are_not_inputs(_graph_inputs(graph),
                                 {"modified model file": modified_model_file, "modified weights file": modified_weights_file})
    fused = _fuse(graph.net, graph.params, graph.skip_fusion)
    layers = _calibrated_layers(fused.net, graph.config, graph.bottom_shapes, graph.model_file)
    owners = activation_quantizer_owners(fused.net, list(layers))
    _check_shared_settings(fused.net, layers, owners, graph.config_file)
    records = {name: record.SingleLayerRecord(skip_fusion=True) for name in graph.skip_fusion}
    by_name = layers_by_name(fused.net)
    for name, layer_config in layers.items():
        scale_w = fixed_weight_scale(by_name[name])  # AVE Pooling: [1/n]; the others: ARQ of their weights
        if scale_w is None:
            weights = fused.params[name][0]
            numerics.check_finite(weights, f"{graph.weights_file}: layer '{name}' weights")
            scale_w = numerics.arq_scale(weights, weight_channel_axis(layer_config.layer_type,
                                                                      layer_config.channel_wise),
                                         layer_config.num_bits_w)
        rec = records.setdefault(name, record.SingleLayerRecord())
        rec.scale_w[:] = scale_w.tolist()
        rec.offset_w[:] = [0] * len(scale_w)
        if layer_config.num_bits_w != numerics.DEFAULT_BITS:  # absent is 8: an 8-bit record as before
            rec.num_bits_w = layer_config.num_bits_w
    for name in _required_layers(fused.net):
        records.setdefault(name, record.SingleLayerRecord())  # no factors: kept in float
    config = graph.config
    ifmr = {name: layer_config.ifmr.ifmr_kwargs() for name, layer_config in layers.items()}
    modified = insert_calibration_layers(fused.net, ifmr, owners, graph.record_file, config.batch_num,
                                         config.activation_offset,
                                         {name: layer_config.num_bits_d for name, layer_config in layers.items()})
    with staged_outputs() as out:
        out.write(modified_model_file, text_format.MessageToString(modified))
        out.write(modified_weights_file, model_io.caffemodel_chunks(modified.name, fused.params))
        out.write(graph.record_file, record.format_record(records))
        out.write(forward_passes_file(graph.record_file), forward_passes_text(dict.fromkeys(layers, 0)))
    graph.calibrated = Calibrated(fused, layers)
    LOG.info("calibration model with %d quantized layer(s) written to %s and %s: run it %d time(s) in the TEST "
             "phase, then save_model", len(layers), modified_model_file, modified_weights_file, config.batch_num)


def save_model(graph: CalibrationGraph, save_type: str, save_path: str) -> None:
    """Write the fake-quant and/or deploy models (``save_type`` 'Fakequant', 'Deploy' or 'Both')
    and ``<save_path>_quant.json`` from the calibration's record.

    Every calibrated layer needs its complete record (the observers write it after ``batch_num``
    TEST forward passes of the calibration model): otherwise a :class:`ModelError` names the layer
    and, when too few passes ran, says "calibration needs batch_num=N forward passes; K ran". The
    record is then validated and exported exactly as :func:`convert_model` does.
    """
    _check_graph(graph, "save_model")
    check_save_type(save_type)  # checked before any work
    check_save_path(save_path)
    check_outputs_are_not_inputs(_graph_inputs(graph), _outputs(save_path))
    if graph.calibrated is None:
        raise ModelError(f"{graph.model_file}: no calibration model yet: call quantize_model(graph, ...) and run "
                         "it in the TEST phase before save_model")
    records = record.read_record(graph.record_file)
    passes = read_forward_passes(graph.record_file)
    batch_num = graph.config.batch_num
    for name in graph.calibrated.layers:
        rec = records.get(name, record.SingleLayerRecord())
        ran = passes.get(name, 0)
        if not record.layer_record_complete(rec) and ran < batch_num:
            raise ModelError(f"{graph.record_file}: layer '{name}' is not calibrated: calibration needs "
                             f"batch_num={batch_num} forward passes; {ran} ran (run the model quantize_model wrote "
                             "in the TEST phase)")
    _export(graph.calibrated.fused, records, graph.record_file, graph.model_file, graph.weights_file, save_type,
            save_path,
            graph.bottom_shapes)


def convert_model(model_file: str, weights_file: str, scale_offset_record_file: str, save_path: str) -> None:
    """Write the fake-quant and deploy models and ``<save_path>_quant.json`` of a float model
    with the factors of a record file, with no calibration.

    The model is fused as the record says (every fusion of :func:`quantize_model`, but for
    ``skip_fusion`` layers). The record must name each quantizable layer of the fused model that
    runs in the TEST phase, with complete factors (``scale_d``, ``offset_d``, ``scale_w`` and
    ``offset_w`` = 0 one per output channel of a (De)Convolution or one in all, ``shift_bit`` one
    per output channel) or with none (the layer stays in float). A record that misses such a
    layer, names a layer the fused model lacks (a BatchNorm fusion removed, say), or does not fit a
    layer is a :class:`ModelError` naming the layer; nothing is written then. With a calibration's
    record, the files are :func:`save_model`'s, byte for byte.
    """
    check_save_path(save_path)
    check_outputs_are_not_inputs({"model file": model_file, "weights file": weights_file,
                                  "record file": scale_offset_record_file}, _outputs(save_path))
    net, params, bottoms = _read_float_model(model_file, weights_file)
    record_file = os.path.abspath(scale_offset_record_file)
    records = record.read_record(record_file)
    fused = _fuse(net, params, {name for name, rec in records.items() if rec.skip_fusion})
    _export(fused, records, record_file, model_file, weights_file, "Both", save_path, bottoms)


# --------------------------------------------------------------------------- record -> factors


def _present(rec: record.SingleLayerRecord, field: str) -> bool:
    return rec.HasField(field) if field in ("scale_d", "offset_d") else len(getattr(rec, field)) > 0


def _layer_factors(layer: caffe_pb2.LayerParameter, rec: record.SingleLayerRecord, channels: int,
                   where: str) -> tuple[ExportLayer, LayerFactors]:
    """The export description and factors of a quantized layer with ``channels`` output channels
    from its complete record entry, checked against the layer (``where`` starts each message)."""
    missing = [field for field in FACTOR_FIELDS if not _present(rec, field)]
    if missing:
        raise ModelError(f"{where}: incomplete record: no {', '.join(missing)}")
    check_quantizable(layer)
    rule = QUANTIZABLE_RULES[layer.type]
    fixed = fixed_weight_scale(layer)
    if fixed is not None and not np.array_equal(np.asarray(rec.scale_w, np.float32), fixed):
        raise ModelError(f"{where}: scale_w {list(rec.scale_w)} of a {layer.type} must be its fixed "
                         f"{fixed.tolist()} (1 / window size)")
    allowed = sorted({1, channels}) if rule.channel_wise_allowed else [1]
    n = len(rec.scale_w)
    if n not in allowed:
        raise ModelError(f"{where}: {n} scale_w values for a {layer.type} with {channels} output channels (the fused "
                         f"model's): expected {' or '.join(map(str, allowed))}; a record of another model or fusion?")
    if len(rec.offset_w) != n or any(rec.offset_w):
        raise ModelError(f"{where}: offset_w must hold one 0 per scale_w value (symmetric weights), got "
                         f"{list(rec.offset_w)[:8]}")
    if len(rec.shift_bit) != channels or not all(1 <= b <= 16 for b in rec.shift_bit):
        raise ModelError(f"{where}: shift_bit must hold one value in 1..16 per output channel ({channels}), got "
                         f"{len(rec.shift_bit)} value(s) {list(rec.shift_bit)[:8]}")
    try:
        num_bits_d, num_bits_w = record.bit_widths(rec, where)
    except record.RecordFileError as err:
        raise ModelError(str(err)) from None
    bw = numerics.bit_width(num_bits_d)
    if not bw.code_min <= rec.offset_d <= bw.code_max:
        raise ModelError(f"{where}: offset_d {rec.offset_d} is not a {num_bits_d}-bit code "
                         f"[{bw.code_min}, {bw.code_max}]")
    factors = LayerFactors(np.float32(rec.scale_d), int(rec.offset_d), np.asarray(rec.scale_w, np.float32),
                           np.asarray(rec.shift_bit, np.uint32), num_bits_d, num_bits_w)
    try:  # scale_d and scale_w positive finite, and so are their products
        numerics.deq_scales(factors.scale_d, factors.scale_w)
    except numerics.NumericsError as err:
        raise ModelError(f"{where}: scale_d {rec.scale_d} / scale_w: {err}") from None
    return ExportLayer(layer.name, layer.bottom[0], rule.channel_axis if n > 1 else None), factors


def _record_factors(fused: FusedModel, records: Mapping[str, record.SingleLayerRecord], record_file: str,
                    model_file: str, bottom_shapes: Mapping[str, list[tuple[int, ...]]]
                    ) -> tuple[dict[str, ExportLayer], dict[str, LayerFactors]]:
    """The quantized layers of ``fused`` and their factors, as the record gives them, validated."""
    by_name = layers_by_name(fused.net)
    folded_into = {removed: g.layer for g in fused.groups for removed in g.removed}
    for name in records:
        if name in folded_into:
            raise ModelError(f"{record_file}: has a record of layer '{name}', which BatchNorm fusion folded into "
                             f"'{folded_into[name]}': the record does not match the fused model (a skip_fusion entry "
                             f"of '{folded_into[name]}' keeps the BatchNorm)")
        if name not in by_name:
            raise ModelError(f"{record_file}: has a record of layer '{name}', but {model_file} has no such layer")
    for name in _required_layers(fused.net):
        if name not in records:
            raise ModelError(f"{record_file}: has no record of quantizable layer '{name}' of {model_file}: give its "
                             f"factors, or an entry without factors (record {{ key: \"{name}\" value {{ }} }}) to "
                             "keep it in float")
    names, broken = quantizable_layers(fused.net)
    layers, factors = {}, {}
    for name, rec in records.items():
        if not any(_present(rec, field) for field in FACTOR_FIELDS):
            continue  # kept in float
        where = f"{record_file}: layer '{name}'"
        if name in broken:
            raise ModelError(f"{where}: has factors, but the layer cannot be quantized: {broken[name]}")
        if name not in names:
            raise ModelError(f"{where}: has factors, but the layer ({by_name[name].type}) is not quantizable "
                             f"(quantizable: {', '.join(QUANTIZABLE_RULES)})")
        layer = by_name[name]
        rule = QUANTIZABLE_RULES[layer.type]
        shapes = bottom_shapes.get(name)
        if not shapes and not rule.has_weights:
            raise ModelError(f"{where}: Caffe gave no input shape of the layer: its channels are unknown")
        why = shape_constraint_broken(layer, shapes[0]) if shapes else None
        if why is not None:
            raise ModelError(f"{where}: has factors, but the layer cannot be quantized: {why}")
        shape = shapes[0] if shapes else None
        # A layer without weights (AVE Pooling) keeps its input's channels.
        channels = fused.params[name][0].shape[rule.channel_axis] if rule.has_weights else shape[1]
        layers[name], factors[name] = _layer_factors(layer, rec, channels, where)
    # Net order (the record's is alphabetical): the quant info file lists the layers so.
    ordered = [name for name in by_name if name in layers]
    return {name: layers[name] for name in ordered}, {name: factors[name] for name in ordered}


def _export(fused: FusedModel, records: Mapping[str, record.SingleLayerRecord], record_file: str,
            model_file: str, weights_file: str, save_type: str, save_path: str,
            bottom_shapes: Mapping[str, list[tuple[int, ...]]]) -> None:
    layers, factors = _record_factors(fused, records, record_file, model_file, bottom_shapes)
    if not layers:
        LOG.warning("%s: quantizes no layer of %s: the saved models are float", record_file, model_file)
    write_quantized_models(fused.net, fused.params, layers, factors, save_type, save_path, record_file,
                           fused.fused_layers, weights_file)
