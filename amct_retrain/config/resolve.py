"""Resolution of the configs against a net: the generators of the retrain and calibration config
JSON (shaped by a simplified config), and the shape checks of the model builders."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.config.common import (CALIBRATION_DATA_ALGO, CALIBRATION_WEIGHT_ALGO, CONFIG_VERSION, DATA_ALGO,
                                        WEIGHT_ALGO, IfmrParams, check_clips, check_ifmr, config_error)
from amct_retrain.config.schema import validate_calibration_config, validate_retrain_config
from amct_retrain.config.simplified import (SimplifiedCalibrationConfig, SimplifiedMessage, SimplifiedRetrainConfig,
                                            read_simplified_config)
from amct_retrain.errors import ConfigError
from amct_retrain.fileio import atomic_write, check_outputs_are_not_inputs
from amct_retrain.graph.model_io import probe_net, read_prototxt
from amct_retrain.layer_types import (QUANTIZABLE_RULES, QuantRule, layer_kind, layers_by_name, quantizable_layers,
                                      quantized_kinds, rule_for, shape_constraint_broken)
from amct_retrain.numerics import BITS_RANGE, DEFAULT_BITS

logger = logging.getLogger(__name__)


def without_shape_broken_layers(layers: Mapping[str, Any], net: caffe_pb2.NetParameter,
                                bottom_shapes: Mapping[str, list[tuple[int, ...]]], model_path: str) -> dict[str, Any]:
    """``layers`` (name -> config, in order) without those whose input shape breaks a constraint
    (:func:`shape_constraint_broken`, as Caffe gives the shapes: ``bottom_shapes``), each left in
    float with a warning naming the constraint. The config files cannot see shapes, so the model
    builders check them here."""
    by_name = layers_by_name(net)
    kept = {}
    for name, layer_config in layers.items():
        shapes = bottom_shapes.get(name)
        why = shape_constraint_broken(by_name[name], shapes[0]) if shapes else None
        if why is not None:
            logger.warning("%s: layer %r (%s) is left in float: %s", model_path, name, by_name[name].type, why)
            continue
        kept[name] = layer_config
    return kept




@dataclass(frozen=True)
class _DataSettings:
    clip_min: float | None = None
    clip_max: float | None = None
    fixed_min: bool = False
    num_bits: int = DEFAULT_BITS


def _bits_setting(path: str, block: SimplifiedMessage, key: str, layer: str | None) -> int:
    """A block's ``num_bits`` (unset: 8), checked to be a bit width."""
    if not block.HasField("num_bits"):
        return DEFAULT_BITS
    if block.num_bits not in BITS_RANGE:
        raise config_error(path, f"must be a bit width in {BITS_RANGE.start}..{BITS_RANGE.stop - 1}, got "
                           f"{block.num_bits}", layer, f"{key}.num_bits")
    return int(block.num_bits)


def _bits_json(num_bits: int) -> dict[str, int]:
    """The ``num_bits`` key of a generated JSON block: written when not 8, so an 8-bit config is as before."""
    return {} if num_bits == DEFAULT_BITS else {"num_bits": num_bits}


def _data_settings(path: str, block: SimplifiedMessage, key: str, layer: str | None) -> _DataSettings:
    ulq = block.ulq_quantize
    clip_min = clip_max = None
    if ulq.HasField("clip_max_min"):
        cmm = ulq.clip_max_min
        ckey = f"{key}.ulq_quantize.clip_max_min"
        for name in ("clip_max", "clip_min"):
            if not cmm.HasField(name):
                raise config_error(path, "clip_max_min needs both clip_max and clip_min", layer, f"{ckey}.{name}")
        clip_min, clip_max = cmm.clip_min, cmm.clip_max
        check_clips(path, layer, ckey, clip_min, clip_max)
    return _DataSettings(clip_min, clip_max, ulq.fixed_min, _bits_setting(path, ulq, f"{key}.ulq_quantize", layer))


def _channel_wise_setting(arq: SimplifiedMessage) -> bool | None:
    return arq.channel_wise if arq.HasField("channel_wise") else None


@dataclass(frozen=True)
class _Override:
    data: Any  # the activation block's settings (_DataSettings, _CalibrationData), None if not given
    channel_wise: bool | None
    weight_given: bool
    weight_bits: int = DEFAULT_BITS  # the weight block's num_bits


def _override_of(path: str, layer: str | None, rule: QuantRule | None, data: Any, arq: SimplifiedMessage | None,
                 arq_key: str) -> _Override:
    """An override with activation settings ``data`` and the weight block ``arq`` (None: not given)."""
    channel_wise = None if arq is None else _channel_wise_setting(arq)
    if channel_wise and rule is not None and not rule.channel_wise_allowed:
        raise config_error(path, f"channel_wise must be false for {rule.layer_type}", layer, f"{arq_key}.channel_wise")
    return _Override(data, channel_wise, arq is not None,
                     DEFAULT_BITS if arq is None else _bits_setting(path, arq, arq_key, layer))


def _override(path: str, entry: SimplifiedMessage, key: str, layer: str | None, rule: QuantRule | None) -> _Override:
    data = None
    if entry.HasField("retrain_data_quant_config"):
        data = _data_settings(path, entry.retrain_data_quant_config, f"{key}.retrain_data_quant_config", layer)
    given = entry.HasField("retrain_weight_quant_config")
    return _override_of(path, layer, rule, data, entry.retrain_weight_quant_config.arq_retrain if given else None,
                        f"{key}.retrain_weight_quant_config.arq_retrain")


def _batch_num(path: str, spec: SimplifiedMessage) -> int:
    if not spec.HasField("batch_num"):
        return 1
    if spec.batch_num < 1:
        raise config_error(path, f"batch_num must be >= 1, got {spec.batch_num}", key="batch_num")
    return spec.batch_num


ReadOverride = Callable[[str, SimplifiedMessage, str, str | None, QuantRule | None], _Override]


def _resolve_layers(path: str, spec: SimplifiedMessage, net: caffe_pb2.NetParameter, model_path: str,
                    read_override: ReadOverride) -> list[tuple[str, QuantRule, list[_Override]]]:
    """The quantizable layers of ``net`` that the simplified config ``spec`` does not skip, in net
    order, each with its rule and its overrides (layer override first, then type override), read
    with ``read_override(path, entry, key, layer, rule)``. Validates the skip lists and overrides."""
    by_name = layers_by_name(net)
    names, broken = quantizable_layers(net)

    skipped: set[str] = set()
    for field in ("skip_layers", "quant_skip_layers"):
        for i, name in enumerate(getattr(spec, field)):
            if name not in by_name:
                raise config_error(path, f"model {model_path} has no layer named {name!r}", name, f"{field}[{i}]")
            if rule_for(by_name[name]) is None:
                logger.warning("%s: %s lists layer %r of type %s, which is not quantizable anyway",
                               path, field, name, by_name[name].type)
            skipped.add(name)
    skipped_types = set(spec.skip_layer_types)
    for t in skipped_types - set(QUANTIZABLE_RULES):
        logger.warning("%s: skip_layer_types lists %r, which is not a quantizable type (quantizable: %s)",
                       path, t, ", ".join(QUANTIZABLE_RULES))

    type_overrides: dict[str, _Override] = {}
    for i, entry in enumerate(spec.override_layer_types):
        key = f"override_layer_types[{i}]"
        if not entry.HasField("layer_type"):
            raise config_error(path, "layer_type is required", key=f"{key}.layer_type")
        t = entry.layer_type
        if t not in QUANTIZABLE_RULES:
            raise config_error(path, f"layer type {t!r} is not quantizable (quantizable: {', '.join(QUANTIZABLE_RULES)})",
                       key=f"{key}.layer_type")
        if t in type_overrides:
            raise config_error(path, f"layer type {t!r} is overridden more than once", key=f"{key}.layer_type")
        type_overrides[t] = read_override(path, entry, key, None, QUANTIZABLE_RULES[t])
        if t in skipped_types:
            logger.warning("%s: layer type %s is in skip_layer_types; its override is ignored", path, t)

    layer_overrides: dict[str, _Override] = {}
    for i, entry in enumerate(spec.override_layer_configs):
        key = f"override_layer_configs[{i}]"
        if not entry.HasField("layer_name"):
            raise config_error(path, "layer_name is required", key=f"{key}.layer_name")
        name = entry.layer_name
        if name not in by_name:
            raise config_error(path, f"model {model_path} has no layer named {name!r}", name, f"{key}.layer_name")
        if name in layer_overrides:
            raise config_error(path, "layer is overridden more than once", name, f"{key}.layer_name")
        layer = by_name[name]
        rule = rule_for(layer)
        if rule is None:
            raise config_error(path, f"layer of type {layer.type} is not quantizable "
                       f"(quantizable: {', '.join(QUANTIZABLE_RULES)})", name, f"{key}.layer_name")
        if name in broken:
            raise config_error(path, f"layer cannot be quantized: {broken[name]}", name, f"{key}.layer_name")
        layer_overrides[name] = read_override(path, entry, key, name, rule)
        if name in skipped or layer.type in skipped_types:
            logger.warning("%s: layer %r is skipped; its override_layer_configs entry is ignored", path, name)

    # Found automatically, so a broken constraint is a warning, not an error.
    for name, why in broken.items():
        if name not in skipped and by_name[name].type not in skipped_types:
            logger.warning("%s: layer %r (%s) is left in float: %s", model_path, name, by_name[name].type, why)

    resolved = []
    for name in names:
        layer_type = by_name[name].type
        if name in skipped or layer_type in skipped_types:
            continue
        chain = [o for o in (layer_overrides.get(name), type_overrides.get(layer_type)) if o is not None]
        resolved.append((name, QUANTIZABLE_RULES[layer_type], chain))
    return resolved


def _settings(chain: list[_Override], global_data: Any, global_weight: _Override,
              rule: QuantRule) -> tuple[Any, bool, int]:
    """(activation settings, channel_wise, weight num_bits) of one layer. Precedence, per block:
    layer override > type override > global (``global_weight``: the global weight block) > default."""
    data = next((o.data for o in chain if o.data is not None), global_data)
    weight_owner = next((o for o in chain if o.weight_given), None)
    if weight_owner is not None:
        channel_wise, weight_bits = weight_owner.channel_wise, weight_owner.weight_bits
    else:
        # A global channel_wise only reaches types that allow per-channel weights.
        channel_wise = global_weight.channel_wise if rule.channel_wise_allowed else None
        weight_bits = global_weight.weight_bits
    return data, rule.channel_wise_default if channel_wise is None else channel_wise, weight_bits


def _generate(path: str, spec: SimplifiedMessage | None, net: caffe_pb2.NetParameter, model_path: str) -> dict[str, Any]:
    """Build the retrain config dict for ``net``, shaped by the simplified config ``spec``."""
    spec = spec if spec is not None else SimplifiedRetrainConfig()
    batch_num = _batch_num(path, spec)
    global_data = _DataSettings()
    if spec.HasField("retrain_data_quant_config"):
        global_data = _data_settings(path, spec.retrain_data_quant_config, "retrain_data_quant_config", None)
    global_weight = _override_of(path, None, None, None, spec.retrain_weight_quant_config.arq_retrain
                                 if spec.HasField("retrain_weight_quant_config") else None,
                                 "retrain_weight_quant_config.arq_retrain")

    out: dict[str, Any] = {"version": CONFIG_VERSION, "batch_num": batch_num}
    for name, rule, chain in _resolve_layers(path, spec, net, model_path, _override):
        data, channel_wise, weight_bits = _settings(chain, global_data, global_weight, rule)
        data_cfg: dict[str, Any] = {"algo": DATA_ALGO}
        if data.clip_max is not None:
            data_cfg["clip_max"] = data.clip_max
            data_cfg["clip_min"] = data.clip_min
        data_cfg["fixed_min"] = data.fixed_min
        data_cfg.update(_bits_json(data.num_bits))
        # Written for weightless types too (Pooling: channel_wise false), as the original toolkit does.
        entry: dict[str, Any] = {"retrain_enable": True, "retrain_data_config": data_cfg,
                                 "retrain_weight_config": {"algo": WEIGHT_ALGO, "channel_wise": channel_wise,
                                                           **_bits_json(weight_bits)}}
        out[name] = entry
    return out


def _read_create_inputs(out_path: str, model_path: str, weights_path: str, def_path: str | None,
                        schema: type) -> tuple[caffe_pb2.NetParameter, SimplifiedMessage | None]:
    """The net and the simplified config (or None) of a config generator, checked: the output is
    neither an input nor a directory, the weights file exists and Caffe can build the net (asked
    in a child process, as the model builders do, so that a net Caffe cannot build is refused at
    the first call)."""
    check_outputs_are_not_inputs({"model file": model_path, "weights file": weights_path,
                                  "simplified config": def_path}, {"config file": out_path})
    if os.path.isdir(out_path):
        raise ConfigError(f"{out_path}: is a directory, not a config file path")
    net = read_prototxt(model_path)
    if not os.path.isfile(weights_path):
        raise ConfigError(f"{weights_path}: weights file does not exist")
    spec = read_simplified_config(def_path, schema) if def_path is not None else None
    probe_net(net, model_path)
    return net, spec


def _what_the_net_has(net: caffe_pb2.NetParameter) -> str:
    counts: dict[str, int] = {}
    for layer in layers_by_name(net).values():
        kind = layer_kind(layer)
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in counts.items())


def _write_generated(out_path: str, data: dict[str, Any], layers: Mapping[str, Any], net: caffe_pb2.NetParameter,
                     model_path: str, what: str) -> None:
    if not layers:
        names, broken = quantizable_layers(net)
        if names or broken:
            why = (f"its quantizable layers ({', '.join(list(names) + list(broken))}) are all skipped or break a "
                   "constraint (see the warnings)")
        else:
            why = f"it has no quantizable layer (it has {_what_the_net_has(net)}; quantizable: {quantized_kinds()})"
        raise ConfigError(f"{model_path}: nothing to quantize: {why}; no {what} written to {out_path}")
    atomic_write(out_path, json.dumps(data, indent=4) + "\n")
    logger.info("wrote %s for %d layer(s) to %s", what, len(layers), out_path)


def create_quant_retrain_config(
    config_file: str | os.PathLike,
    model_file: str | os.PathLike,
    weights_file: str | os.PathLike,
    config_defination: str | os.PathLike | None = None,
) -> None:
    """Write the retrain config JSON for every quantizable layer of ``model_file``.

    Without ``config_defination`` every quantizable layer gets the defaults (clips
    initialised by IFMR, ``fixed_min`` false, per-channel weights for Convolution,
    per-tensor for InnerProduct).  With it, the simplified config (``.yaml``/``.yml``
    or ``.cfg``) sets ``batch_num``, skips layers / types and overrides settings
    globally, per type and per layer (layer > type > global > default).

    Quantizable-type layers that break a backend constraint are left out with a
    warning.  ``weights_file`` must exist; it is not read.  Caffe is asked (in a child
    process) whether it can build the net, so a net it cannot build is a
    :class:`~amct_retrain.errors.ModelError` naming the layer here already.  A net with nothing
    to quantize is an error.  Everything is validated before anything is written; the output
    folder is created if missing and the file is replaced atomically.  Raises
    :class:`ConfigError` naming the file and the offending key / layer.
    """
    out_path, model_path, weights_path = os.fspath(config_file), os.fspath(model_file), os.fspath(weights_file)
    def_path = os.fspath(config_defination) if config_defination is not None else None
    net, spec = _read_create_inputs(out_path, model_path, weights_path, def_path, SimplifiedRetrainConfig)
    data = _generate(def_path or out_path, spec, net, model_path)
    # Self-check: what we write must load; a failure here is a bug, reported before writing.
    parsed = validate_retrain_config(out_path, data, net)
    _write_generated(out_path, data, parsed.layers, net, model_path, "retrain config")


_IFMR_CFG_KEYS = {"search_start": "search_range_start", "search_end": "search_range_end"}


def _ifmr_settings(path: str, block: SimplifiedMessage, key: str, layer: str | None) -> IfmrParams:
    """IfmrParams from a simplified config's ``ifmr_quantize`` block (unset fields: the defaults)."""
    default = IfmrParams()
    def cfg_key(field: str) -> str:
        return _IFMR_CFG_KEYS.get(field, field)

    values = {f.name: getattr(block, cfg_key(f.name)) if block.HasField(cfg_key(f.name)) else getattr(default, f.name)
              for f in dataclasses.fields(IfmrParams)}
    return check_ifmr(path, layer, lambda field: f"{key}.{cfg_key(field)}", IfmrParams(**values))


@dataclass(frozen=True)
class _CalibrationData:
    """A calibration activation block's settings: the IFMR search and the bit width."""
    ifmr: IfmrParams = IfmrParams()
    num_bits: int = DEFAULT_BITS


def _calibration_data(path: str, block: SimplifiedMessage, key: str, layer: str | None) -> _CalibrationData:
    return _CalibrationData(_ifmr_settings(path, block, key, layer), _bits_setting(path, block, key, layer))


def _calibration_override(path: str, entry: SimplifiedMessage, key: str, layer: str | None,
                          rule: QuantRule | None) -> _Override:
    block, bkey = entry.calibration_config, f"{key}.calibration_config"
    data = (_calibration_data(path, block.ifmr_quantize, f"{bkey}.ifmr_quantize", layer)
            if block.HasField("ifmr_quantize") else None)
    arq = block.arq_quantize if block.HasField("arq_quantize") else None
    return _override_of(path, layer, rule, data, arq, f"{bkey}.arq_quantize")


def _ifmr_json(p: IfmrParams) -> dict[str, Any]:
    return {"algo": CALIBRATION_DATA_ALGO, "max_percentile": p.max_percentile, "min_percentile": p.min_percentile,
            "search_range": [p.search_start, p.search_end], "search_step": p.search_step}


def _generate_calibration(path: str, spec: SimplifiedMessage, net: caffe_pb2.NetParameter,
                          model_path: str) -> dict[str, Any]:
    """Build the calibration config dict for ``net``, shaped by the simplified config ``spec``."""
    global_data, global_weight = _CalibrationData(), _Override(None, None, False)
    if spec.HasField("common_config"):
        common = spec.common_config
        if common.HasField("ifmr_quantize"):
            global_data = _calibration_data(path, common.ifmr_quantize, "common_config.ifmr_quantize", None)
        global_weight = _override_of(path, None, None, None, common.arq_quantize, "common_config.arq_quantize")
    out: dict[str, Any] = {"version": CONFIG_VERSION, "batch_num": _batch_num(path, spec),
                           "activation_offset": spec.activation_offset if spec.HasField("activation_offset") else True}
    for name, rule, chain in _resolve_layers(path, spec, net, model_path, _calibration_override):
        data, channel_wise, weight_bits = _settings(chain, global_data, global_weight, rule)
        entry: dict[str, Any] = {"quant_enable": True,
                                 "activation_quant_params": {**_ifmr_json(data.ifmr), **_bits_json(data.num_bits)}}
        if rule.has_weights:
            entry["weight_quant_params"] = {"wts_algo": CALIBRATION_WEIGHT_ALGO, "channel_wise": channel_wise,
                                            **_bits_json(weight_bits)}
        out[name] = entry
    return out


def _spec_from_arguments(skip_layers: Any, batch_num: Any, activation_offset: Any) -> SimplifiedMessage:
    """The simplified calibration config that create_quant_config's arguments amount to."""
    where = "create_quant_config"
    if not isinstance(batch_num, int) or isinstance(batch_num, bool) or not 1 <= batch_num < 2**32:
        raise ConfigError(f"{where}: argument batch_num must be an integer >= 1, got {batch_num!r}")
    if not isinstance(activation_offset, bool):
        raise ConfigError(f"{where}: argument activation_offset must be True or False, got {activation_offset!r}")
    skip = [] if skip_layers is None else list(skip_layers) if (
        isinstance(skip_layers, Iterable) and not isinstance(skip_layers, str)) else None
    if skip is None or not all(isinstance(n, str) for n in skip):
        raise ConfigError(f"{where}: argument skip_layers must be a list of layer names, got {skip_layers!r}")
    return SimplifiedCalibrationConfig(batch_num=batch_num, activation_offset=activation_offset, skip_layers=skip)


def create_quant_config(
    config_file: str | os.PathLike,
    model_file: str | os.PathLike,
    weights_file: str | os.PathLike,
    skip_layers: Iterable[str] | None = None,
    batch_num: int = 1,
    activation_offset: bool = True,
    config_defination: str | os.PathLike | None = None,
) -> None:
    """Write the calibration config JSON for every quantizable layer of ``model_file`` not in
    ``skip_layers``.

    The format (the original toolkit's; version 1)::

        {"version": 1, "batch_num": 2, "activation_offset": true,
         "conv1": {"quant_enable": true,
                   "activation_quant_params": {"algo": "ifmr", "max_percentile": 0.999999,
                                               "min_percentile": 0.999999, "search_range": [0.7, 1.3],
                                               "search_step": 0.01},
                   "weight_quant_params": {"wts_algo": "arq_quantize", "channel_wise": true}}}

    ``batch_num``: the forward passes calibration observes (their batches together give the
    ranges). ``activation_offset``: false makes every activation range symmetric, [-a, a] with
    offset_d 0. ``activation_quant_params``: see :class:`IfmrParams` (all keys but ``algo`` are
    optional). ``channel_wise``: per-output-channel weight scales, only for (De)Convolution.
    ``quant_enable: false`` (or leaving a layer out) keeps a layer in float.

    With ``config_defination`` (``.yaml``/``.yml`` or ``.cfg``, read like the retraining's), the
    other arguments are ignored and it sets ``batch_num``, ``activation_offset``, ``skip_layers`` /
    ``quant_skip_layers`` / ``skip_layer_types``, a global ``common_config { ifmr_quantize {
    search_range_start search_range_end search_step max_percentile min_percentile } arq_quantize
    { channel_wise } }`` and ``override_layer_types`` / ``override_layer_configs`` entries with a
    ``calibration_config`` block of the same shape (layer > type > global > default, whole blocks).

    The net is validated as :func:`create_quant_retrain_config` does (Caffe builds it in a child
    process; nothing to quantize is an error). Validated before anything is written; the file is
    replaced atomically. Raises :class:`ConfigError` naming the file (or argument), layer and key.
    """
    out_path, model_path, weights_path = os.fspath(config_file), os.fspath(model_file), os.fspath(weights_file)
    def_path = os.fspath(config_defination) if config_defination is not None else None
    net, spec = _read_create_inputs(out_path, model_path, weights_path, def_path, SimplifiedCalibrationConfig)
    if def_path is None:
        data = _generate_calibration("create_quant_config", _spec_from_arguments(
            skip_layers, batch_num, activation_offset), net, model_path)
    else:
        ignored = [name for name, given in (("skip_layers", bool(skip_layers)), ("batch_num", batch_num != 1),
                                            ("activation_offset", activation_offset is not True)) if given]
        if ignored:
            logger.warning("%s: the simplified config decides; argument(s) %s ignored", def_path, ", ".join(ignored))
        data = _generate_calibration(def_path, spec, net, model_path)
    parsed = validate_calibration_config(out_path, data, net)
    _write_generated(out_path, data, parsed.layers, net, model_path, "calibration config")
