"""save_quant_retrain_model: the fake-quant and deploy models from a retrained net."""
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from google.protobuf import text_format

from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain import numerics, record
from amct_retrain.errors import ArgumentError, OutputPathError
from amct_retrain.fileio import check_outputs_are_not_inputs, staged_outputs
from amct_retrain.graph import model_io
from amct_retrain.graph import quant_layers as ql
from amct_retrain.graph.saved_nets import deploy_net, fake_quant_net, quant_layer_names
from amct_retrain.graph.netgraph import runs_in_phase
from amct_retrain.graph.insert import has_weights
from amct_retrain.graph.model_io import ModelError
from amct_retrain.graph.strip import QuantizedLayer, find_quantized_layers, strip_quant_layers
from amct_retrain.layer_specs import ACTIVATION_ULQ, LAST_MAX, LAST_MIN, READY, WEIGHT_ARQ
from amct_retrain.saved_models import output_files

LOG = logging.getLogger(__name__)
SAVE_TYPES = ("Fakequant", "Deploy", "Both")


@dataclass(frozen=True)
class LayerFactors:
    """The integer factors of one quantized layer, as the last TEST pass recorded them."""
    scale_d: np.float32
    offset_d: int
    scale_w: np.ndarray     # float32 (C,) channel-wise, or (1,) per tensor
    shift_bit: np.ndarray   # uint32 (C,)
    num_bits_d: int = numerics.DEFAULT_BITS  # the bit widths of the activation and weight codes
    num_bits_w: int = numerics.DEFAULT_BITS

    @property
    def deq(self) -> np.ndarray:
        """float32 (C,): scale_d * scale_w[c] for every output channel."""
        return np.broadcast_to(numerics.deq_scales(self.scale_d, self.scale_w), self.shift_bit.shape).copy()


def check_save_path(save_path: str | os.PathLike) -> None:
    """Refuse a ``save_path`` that is not a file prefix (``./result/model``): empty, a folder, or
    ending in a path separator (it would write ``_fake_quant_model.prototxt`` into the folder)."""
    if not isinstance(save_path, (str, os.PathLike)):
        raise ArgumentError(f"save_path must be a path prefix such as './result/model', got {save_path!r}")
    path = os.fspath(save_path)
    if not path or path.endswith(os.sep) or (os.altsep and path.endswith(os.altsep)) or os.path.isdir(path) \
            or os.path.basename(path) in (".", ".."):
        raise OutputPathError(f"save_path {path!r} is {'empty' if not path else 'a folder'}: give a file prefix such "
                              "as './result/model' (the outputs are <prefix>_fake_quant_model.prototxt, ...)")


def check_save_type(save_type: object) -> None:
    """Refuse a save_type other than 'Fakequant', 'Deploy' or 'Both'."""
    if save_type not in SAVE_TYPES:
        raise ArgumentError(f"save_type must be one of {SAVE_TYPES}, got {save_type!r}")


def _float32_text(value: float) -> str:
    """A float32 with the shortest digits that give it back exactly (so two different values never print alike)."""
    return str(np.float32(value))


def _record_differences(name: str, rec: record.SingleLayerRecord, scale_d: np.float32, offset_d: int,
                        scale_w: np.ndarray | None, bits: tuple[int, int]) -> list[str]:
    """What the record of layer ``name`` holds against what the weights give: one line per field
    (per channel for scale_w, at most 4 of them); ``scale_w`` None when it matches; ``bits`` the
    (num_bits_d, num_bits_w) of the retrained model."""
    lines = [f"layer '{name}' field {field}: record {got}, model {want}"
             for field, got, want in zip(("num_bits_d", "num_bits_w"), record.bit_widths(rec, name), bits)
             if got != want]
    if np.float32(rec.scale_d) != scale_d:
        lines.append(f"layer '{name}' field scale_d: record {_float32_text(rec.scale_d)}, "
                     f"weights {_float32_text(scale_d)}")
    if rec.offset_d != offset_d:
        lines.append(f"layer '{name}' field offset_d: record {rec.offset_d}, weights {offset_d}")
    if scale_w is not None:
        recorded = np.asarray(rec.scale_w, np.float32)
        if recorded.shape != scale_w.shape:
            lines.append(f"layer '{name}' field scale_w: record {recorded.size} value(s), weights {scale_w.size}")
        else:
            channels = np.flatnonzero(recorded != scale_w)
            lines += [f"layer '{name}' field scale_w channel {c}: record {_float32_text(recorded[c])}, "
                      f"weights {_float32_text(scale_w[c])}" for c in channels[:4]]
            if channels.size > 4:
                lines.append(f"layer '{name}' field scale_w: {channels.size - 4} more channel(s) differ")
    return lines


def layer_factors(layer: QuantizedLayer, rec: record.SingleLayerRecord, params: dict, files: str,
                  regenerate: str) -> tuple[LayerFactors, list[str]]:
    """The record's factors for ``layer`` and how they differ from the retrained weights' (one
    line per differing field or channel; none when the record comes from the TEST pass that
    followed these weights, the final snapshot). ``regenerate`` is the command that writes the
    record of these weights, for the messages."""
    name = layer.name
    if not record.layer_record_complete(rec):
        raise ModelError(f"{files}: the record of layer '{name}' is incomplete (no TEST pass "
                         f"searched its shift_bit): run a TEST phase after the last iteration ({regenerate})")
    clip_max, clip_min, clip_state = (params[layer.ulq_name][ACTIVATION_ULQ.blob(blob)]
                                      for blob in ("clip_max", "clip_min", "clip_state"))
    clips_ready, last_min, last_max = clip_state[READY], clip_state[LAST_MIN], clip_state[LAST_MAX]
    if not clips_ready:
        raise ModelError(f"{files}: layer '{name}' never initialised its clips: the weights do not match "
                         "the record (not retrained, or another model): use the snapshot of the run")
    # The TEST pass sanitised the snapshot's clips with the last valid pair, as here.
    try:
        scale_d, offset_d = numerics.ulq_deploy_factors(*numerics.ulq_sanitize_clips(
            clip_min, clip_max, (float(last_min), float(last_max)), layer.fixed_min), layer.num_bits_d)
    except numerics.NumericsError as err:
        raise ModelError(f"{files}: layer '{name}': the clips of '{layer.ulq_name}' (clip_min {clip_min}, clip_max "
                         f"{clip_max}, last valid pair ({last_min}, {last_max})) give no quantization grid: {err}") from None
    scale_w = np.asarray(rec.scale_w, np.float32)
    if layer.has_weights:
        master = params[ql.arq_layer_name(name)][WEIGHT_ARQ.blob("master_weights")]
        numerics.check_finite(master, f"{files}: layer '{name}' master weights (blob 'master_weights' of "
                                      f"'{ql.arq_layer_name(name)}')")
        expected_w = numerics.arq_scale(master, layer.channel_axis, layer.num_bits_w)
        matches_w = np.array_equal(scale_w, expected_w) or (
            scale_w.size > 1 and np.array_equal(scale_w, numerics.unify_global_conv_scales(scale_d, expected_w)))
    else:  # AVE Pooling: the fixed [1/n] the retrained model's ShiftNSearch searched with
        expected_w = np.asarray(layer.fixed_scale_w, np.float32)
        matches_w = np.array_equal(scale_w, expected_w)
    bits = (layer.num_bits_d, layer.num_bits_w)
    differences = _record_differences(name, rec, scale_d, offset_d, None if matches_w else expected_w, bits)
    return LayerFactors(scale_d, offset_d, scale_w, np.asarray(rec.shift_bit, np.uint32), *bits), differences


def regenerate_command(retrained_model_file: str, retrained_weights_file: str) -> str:
    """The shell command that writes the record of ``retrained_weights_file`` (:func:`regenerate_record`)."""
    return f"amct-retrain record --model {retrained_model_file} --weights {retrained_weights_file}"


def regenerate_record(retrained_model_file: str, retrained_weights_file: str) -> str:
    """Write the record of a snapshot again: one TEST pass of the retrain model with its weights.

    The ShiftNSearch layers of ``retrained_model_file`` search shift-N over their ``batch_num``
    TEST batches (the first ones of the TEST data) and write scale_d, offset_d, scale_w and
    shift_bit into their record file, which then matches ``retrained_weights_file`` for
    :func:`save_quant_retrain_model`. scale_d, offset_d and scale_w are those of the weights;
    shift_bit may differ from the training's last TEST when that one read other batches.

    Returns:
        The record file written.

    Raises:
        ModelError: the model has no quantized layer that runs in the TEST phase, or the
            weights lack a quantized layer's blobs.
    """
    import caffe  # pycaffe only where a net is run

    net = model_io.read_prototxt(retrained_model_file)
    quantized, _ = _split_by_test_phase(net, find_quantized_layers(net, retrained_model_file), retrained_model_file)
    params = model_io.read_caffemodel(retrained_weights_file)
    missing = sorted(q.ulq_name for q in quantized.values() if q.ulq_name not in params)
    if missing:
        raise ModelError(f"{retrained_weights_file}: has no weights for layer '{missing[0]}' of "
                         f"{retrained_model_file}: weights of another model?")
    batches = max(q.batch_num for q in quantized.values())
    test_net = caffe.Net(retrained_model_file, caffe.TEST, weights=retrained_weights_file)
    for _ in range(batches):
        test_net.forward()
    record_files = sorted({q.record_file for q in quantized.values()})
    LOG.info("record of %s written to %s (%d TEST batch(es))", retrained_weights_file, ", ".join(record_files),
             batches)
    return record_files[0]


def quantized_params(name: str, weights: np.ndarray, bias: np.ndarray | None, f: LayerFactors,
                     channel_axis: int | None) -> tuple[list, list]:
    """(fake-quant blobs, deploy blobs) of quantized layer ``name`` from its float weights and
    bias: float32 weights on the ``num_bits_w`` grid and the int32 bias times deq; int8 weights (holding
    ``num_bits_w``-bit codes) and int32 bias."""
    # Computed as the writer reaches them, a few MB at a time (model_io.LazyBlob).
    fake = [model_io.arq_weight_blob(weights, f.scale_w, channel_axis, num_bits=f.num_bits_w)]
    deploy = [model_io.arq_weight_blob(weights, f.scale_w, channel_axis, codes=True, num_bits=f.num_bits_w)]
    if bias is not None:
        bias_int32 = numerics.quantize_bias(bias, f.scale_d, f.scale_w, name)
        fake.append(numerics.dequantize_bias(bias_int32, f.deq))
        deploy.append(bias_int32)
    return fake, deploy


@dataclass(frozen=True)
class ExportLayer:
    """A layer the saved models quantize: its float input blob and its weight channel axis."""
    name: str
    input_blob: str
    channel_axis: int | None


def write_quantized_models(float_net, float_params: Mapping[str, list[np.ndarray]],
                           layers: Mapping[str, ExportLayer], factors: Mapping[str, LayerFactors],
                           save_type: str, save_path: str, record_file: str,
                           fused: Mapping[str, dict] | None = None, weights_file: str = "") -> None:
    """Write the fake-quant and/or deploy models and the quant info file of ``float_net``
    (its float weights in ``float_params``) with ``layers`` quantized by ``factors``: the one
    exporter behind retraining's, calibration's and conversion's savers. ``fused``: layer name ->
    {"kind", "removed"} of the BatchNorm fusions the model went through, for the quant info file.
    ``weights_file``: where ``float_params`` come from, named in errors (NaN weights, say).
    """
    check_save_type(save_type)
    check_save_path(save_path)
    fake_params, deploy_params = dict(float_params), dict(float_params)
    types = {layer.name: layer.type for layer in float_net.layer if layer.name in layers}
    for name, layer in layers.items():
        f = factors[name]
        if has_weights(types[name]):  # AVE Pooling has no blobs: only its DeQuant's deq pack
            weights, *bias = float_params[name]
            with numerics.errors_named(f"{weights_file}: layer '{name}'"):
                numerics.check_finite(weights, "weights")
                fake_params[name], deploy_params[name] = quantized_params(name, weights, bias[0] if bias else None,
                                                                          f, layer.channel_axis)
        deploy_params[quant_layer_names(name)["dequant"]] = [
            numerics.pack_deq_scale(f.deq, f.shift_bit, np.zeros_like(f.shift_bit, dtype=np.int8))]
    outputs = output_files(save_path)
    tops = {layer.name: layer.top[0] for layer in float_net.layer if layer.name in layers}
    info = {"version": 1, "record_file": os.path.abspath(record_file),
            "fused_layers": dict(fused or {}),
            "quantized_layers": {name: {"input_blob": q.input_blob, "output_blob": tops[name],
                                        **quant_layer_names(name), **ql.bits_params(factors[name].num_bits_d,
                                                                                     factors[name].num_bits_w)}
                                 for name, q in layers.items()}}
    with staged_outputs() as out:
        if save_type in ("Fakequant", "Both"):
            out.write(outputs["fake_quant_model"], text_format.MessageToString(fake_quant_net(float_net, factors)))
            out.write(outputs["fake_quant_weights"], model_io.caffemodel_chunks(float_net.name, fake_params))
        if save_type in ("Deploy", "Both"):
            out.write(outputs["deploy_model"], text_format.MessageToString(deploy_net(float_net, factors)))
            out.write(outputs["deploy_weights"], model_io.caffemodel_chunks(float_net.name, deploy_params))
        out.write(outputs["quant_info"], json.dumps(info, indent=2))
    LOG.info("saved %s model(s) of %d quantized layers under %s", save_type, len(layers), save_path)


def _layer(net: caffe_pb2.NetParameter, name: str) -> caffe_pb2.LayerParameter:
    return next(layer for layer in net.layer if layer.name == name)


def _split_by_test_phase(net: caffe_pb2.NetParameter, retrained: dict[str, QuantizedLayer], model_file: str
                         ) -> tuple[dict[str, QuantizedLayer], list[str]]:
    """(the quantized layers that run in the TEST phase, the names of those that never do).

    A layer that the phase rules keep out of every TEST net (an auxiliary TRAIN-only head) was
    retrained, but no TEST pass measured its factors, and no inference net runs it: the saved
    models keep it in float, with its float weights."""
    train_only = [name for name in retrained if not runs_in_phase(_layer(net, name), caffe_pb2.TEST)]
    if train_only:
        LOG.warning("layers %s never run in the TEST phase (phase rules): no TEST pass measured their "
                    "factors; the saved models keep them in float", ", ".join(train_only))
    quantized = {name: q for name, q in retrained.items() if name not in train_only}
    if not quantized:
        raise ModelError(f"{model_file}: none of its quantized layers runs in the TEST phase")
    return quantized, train_only


def save_quant_retrain_model(retrained_model_file: str, retrained_weights_file: str, save_type: str,
                             save_path: str, scale_offset_record_file: str | None = None,
                             config_file: str | None = None) -> None:
    """Write the fake-quant model (runs in Caffe) and/or the deploy model (int8 weights,
    int32 bias, Quant/DeQuant layers), plus ``<save_path>_quant.json``.

    ``save_type`` is 'Fakequant', 'Deploy' or 'Both'; ``save_path`` a prefix such as
    ``./result/model``. The factors come from the record file (default: the one the
    retrained model's ShiftNSearch layers write), i.e. from the last TEST pass.
    ``config_file`` is accepted for compatibility; the retrained model carries its settings.
    """
    check_save_type(save_type)  # checked before any work
    check_save_path(save_path)
    if config_file is not None and not os.path.isfile(config_file):
        raise ModelError(f"{config_file}: config file does not exist")
    net = model_io.read_prototxt(retrained_model_file)
    retrained = find_quantized_layers(net, retrained_model_file)
    quantized, _ = _split_by_test_phase(net, retrained, retrained_model_file)
    record_file = scale_offset_record_file or next(iter(quantized.values())).record_file
    check_outputs_are_not_inputs(
        {"retrained model file": retrained_model_file, "retrained weights file": retrained_weights_file,
         "record file": record_file, "config file": config_file},
        {f"output {role}": path for role, path in output_files(os.fspath(save_path)).items()})
    records = record.read_record(record_file)
    params = model_io.read_caffemodel(retrained_weights_file)
    files = f"{retrained_weights_file} / {record_file}"
    for name in retrained:
        owners = ((name, retrained[name].ulq_name, ql.arq_layer_name(name)) if retrained[name].has_weights
                  else (retrained[name].ulq_name,))  # a layer without weights has only its quantizer's blobs
        for owner in owners:
            if owner not in params and not runs_in_phase(_layer(net, name), caffe_pb2.TRAIN):
                raise ModelError(f"{retrained_weights_file}: has no weights for layer '{owner}': layer '{name}' "
                                 "never runs in the TRAIN phase (phase rules) and Caffe's snapshots hold the TRAIN "
                                 "net's weights only: a TEST-only layer cannot be retrained; add it to skip_layers")
            if owner not in params:
                raise ModelError(f"{retrained_weights_file}: has no weights for layer '{owner}' of "
                                 f"{retrained_model_file}: weights of another model?")
        if name in quantized and name not in records:
            raise ModelError(f"{record_file}: has no record of layer '{name}': run a TEST phase after training")
    float_net = strip_quant_layers(net, retrained)
    float_params = {k: v for k, v in params.items()
                    if k not in {q.ulq_name for q in retrained.values()} | {ql.arq_layer_name(n) for n in retrained}}
    # The float (master) weights; the TRAIN-only ones stay float. A pooling has none.
    for name in (n for n, q in retrained.items() if q.has_weights):
        float_params[name] = [params[ql.arq_layer_name(name)][WEIGHT_ARQ.blob("master_weights")], *params[name][1:]]
    # Weights of another model (or another model's retrained prototxt) would make models Caffe cannot load.
    model_io.check_params_fit_layers(float_net, float_params, retrained_weights_file, retrained_model_file)
    regenerate = regenerate_command(retrained_model_file, retrained_weights_file)
    factors, differences = {}, []
    for name, q in quantized.items():
        factors[name], differ = layer_factors(q, records[name], params, files, regenerate)
        differences += differ
    if differences:
        raise ModelError(f"{files}: the record does not match the retrained weights; it holds the factors of "
                         "other weights (every TEST pass of the retrain model, `caffe test` or `caffe train` "
                         "included, rewrites it):\n  " + "\n  ".join(differences)
                         + f"\nwrite the record of these weights with: {regenerate}")
    layers = {name: ExportLayer(name, q.input_blob, q.channel_axis) for name, q in quantized.items()}
    fused = {name: q.fused for name, q in retrained.items() if q.fused}
    write_quantized_models(float_net, float_params, layers, factors, save_type, save_path, record_file, fused,
                           retrained_weights_file)
