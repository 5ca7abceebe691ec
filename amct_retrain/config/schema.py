"""The retrain and calibration config JSON files: their structure, read and validated against a net."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.config.common import (CALIBRATION_DATA_ALGO, CALIBRATION_WEIGHT_ALGO, CONFIG_VERSION, DATA_ALGO,
                                        WEIGHT_ALGO, IfmrParams, check_clips, check_ifmr, config_error)
from amct_retrain.errors import ConfigError
from amct_retrain.fileio import read_text_file
from amct_retrain.layer_types import QUANTIZABLE_RULES, QuantRule, layers_by_name, quantizable_layers, rule_for


@dataclass(frozen=True)
class LayerQuantConfig:
    """Retrain settings of one quantized layer.

    ``clip_min``/``clip_max`` are both None (initialise from the first batch with
    IFMR) or both set, with ``clip_min <= 0 <= clip_max`` and ``clip_min < clip_max``.
    """

    layer_type: str
    clip_min: float | None
    clip_max: float | None
    fixed_min: bool
    channel_wise: bool


@dataclass(frozen=True)
class RetrainConfig:
    """A validated retrain config: ``layers`` holds only the enabled layers, in net order."""

    batch_num: int
    log_dir: str | None
    layers: dict[str, LayerQuantConfig]


@dataclass(frozen=True)
class LayerCalibrationConfig:
    """Calibration settings of one quantized layer."""

    layer_type: str
    channel_wise: bool
    ifmr: IfmrParams


@dataclass(frozen=True)
class CalibrationConfig:
    """A validated calibration config: ``layers`` holds only the enabled layers, in net order.
    ``activation_offset`` false: symmetric activation ranges (offset_d 0)."""

    batch_num: int
    activation_offset: bool
    layers: dict[str, LayerCalibrationConfig]


_TOP_KEYS = ("version", "batch_num", "log_dir")
_LAYER_KEYS = ("retrain_enable", "retrain_data_config", "retrain_weight_config")
_DATA_KEYS = ("algo", "clip_max", "clip_min", "fixed_min")
_WEIGHT_KEYS = ("algo", "channel_wise")
_CALIBRATION_TOP_KEYS = ("version", "batch_num", "activation_offset")
_CALIBRATION_LAYER_KEYS = ("quant_enable", "activation_quant_params", "weight_quant_params")
_ACTIVATION_KEYS = ("algo", "max_percentile", "min_percentile", "search_range", "search_step")
_CALIBRATION_WEIGHT_KEYS = ("wts_algo", "channel_wise")


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def read_config_json(path: str, what: str) -> Any:
    """The JSON of a config file, with its keys unique; :class:`ConfigError` naming the file (and line) if not."""
    text = read_text_file(path, what, ConfigError)
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except _DuplicateKey as e:
        raise config_error(path, "key given more than once", key=e.key) from None


def load_retrain_config(config_file: str | os.PathLike, net: caffe_pb2.NetParameter) -> RetrainConfig:
    """Read the retrain config JSON and validate it against ``net``.

    Raises :class:`ConfigError` naming the file, layer and key for invalid JSON
    (with its line), a ``version`` other than 1, unknown keys, wrong types, layer
    names the model lacks, layers that cannot be quantized, unknown algorithms,
    inconsistent clips, ``channel_wise`` on a type that does not allow it, or
    ``batch_num`` < 1.  Quantizable layers absent from the file stay in float.
    """
    path = os.fspath(config_file)
    return validate_retrain_config(path, read_config_json(path, "retrain config"), net)


def load_calibration_config(config_file: str | os.PathLike, net: caffe_pb2.NetParameter) -> CalibrationConfig:
    """Read the calibration config JSON (see :func:`create_quant_config`) and validate it against
    ``net``, with the errors of :func:`load_retrain_config` (file, layer and key named); also a
    percentile outside (0.5, 1], a search range that is not ``0 < start <= end`` and a search step
    <= 0 are errors. Quantizable layers absent from the file stay in float."""
    path = os.fspath(config_file)
    return validate_calibration_config(path, read_config_json(path, "calibration config"), net)


def _want(path: str, value: Any, kind: str, layer: str | None, key: str) -> None:
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind == "str":
        ok = isinstance(value, str)
    elif kind == "array":
        ok = isinstance(value, list)
    else:  # "object"
        ok = isinstance(value, dict)
    if not ok:
        names = {"bool": "a boolean", "int": "an integer", "number": "a number", "str": "a string",
                 "array": "an array", "object": "an object"}
        raise config_error(path, f"expected {names[kind]}, got {_json_type(value)} {json.dumps(value)[:80]}", layer, key)
    if kind == "number" and isinstance(value, int) and not -1e308 < value < 1e308:  # float() would overflow
        raise config_error(path, f"number {str(value)[:20]}... is out of range", layer, key)


def _json_type(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def _check_keys(path: str, obj: Mapping[str, Any], allowed: Iterable[str], layer: str | None, key: str) -> None:
    allowed = tuple(allowed)
    for k in obj:
        if k not in allowed:
            raise config_error(path, f"unknown key; expected one of: {', '.join(allowed)}", layer, f"{key}.{k}" if key else k)


def _validate_top(path: str, data: Any, what: str) -> int:
    """Check the top level of a config JSON (an object, its version); return its batch_num."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the {what} must be a JSON object, got {_json_type(data)}")
    if "version" not in data:
        raise config_error(path, f"missing; expected {CONFIG_VERSION}", key="version")
    version = data["version"]
    _want(path, version, "int", None, "version")
    if version != CONFIG_VERSION:
        raise config_error(path, f"unsupported version {version}; expected {CONFIG_VERSION}", key="version")
    batch_num = data.get("batch_num", 1)
    _want(path, batch_num, "int", None, "batch_num")
    if batch_num < 1:
        raise config_error(path, f"batch_num must be >= 1, got {batch_num}", key="batch_num")
    return batch_num


def _validate_layers(path: str, data: dict[str, Any], net: caffe_pb2.NetParameter, top_keys: tuple[str, ...],
                     validate_layer: Callable[..., Any]) -> dict[str, Any]:
    """``validate_layer(path, name, entry, layer, broken)`` of every layer entry; the enabled
    ones (not None) in net order. Any other key than ``top_keys`` must name a layer."""
    by_name = layers_by_name(net)
    _, broken = quantizable_layers(net)
    configs: dict[str, Any] = {}
    for name, entry in data.items():
        if name in top_keys:
            continue
        if name not in by_name:
            raise config_error(path, f"unknown key: the model has no layer named {name!r} "
                       f"(top-level keys are {', '.join(top_keys)} and layer names)", name)
        parsed = validate_layer(path, name, entry, by_name[name], broken.get(name))
        if parsed is not None:
            configs[name] = parsed
    # Net order, not file order: the graph passes walk the net.
    return {name: configs[name] for name in by_name if name in configs}


def validate_retrain_config(path: str, data: Any, net: caffe_pb2.NetParameter) -> RetrainConfig:
    batch_num = _validate_top(path, data, "retrain config")
    log_dir = data.get("log_dir")
    if log_dir is not None:
        _want(path, log_dir, "str", None, "log_dir")
        if not log_dir:
            raise config_error(path, "log_dir must not be empty (leave it out for no logs)", key="log_dir")
    layers = _validate_layers(path, data, net, _TOP_KEYS, _validate_layer)
    return RetrainConfig(batch_num=batch_num, log_dir=log_dir, layers=layers)


def _check_algo(path: str, name: str, cfg: Mapping[str, Any], key: str, field: str, algo: str) -> None:
    if field not in cfg:
        raise config_error(path, f"missing; expected {algo!r}", name, f"{key}.{field}")
    _want(path, cfg[field], "str", name, f"{key}.{field}")
    if cfg[field] != algo:
        raise config_error(path, f"unsupported algorithm {cfg[field]!r}; expected {algo!r}", name, f"{key}.{field}")


def _enabled_rule(path: str, name: str, layer: caffe_pb2.LayerParameter, broken: str | None,
                  enable_key: str) -> QuantRule:
    """The rule of an enabled layer; an error if it is not quantizable or breaks a constraint."""
    rule = rule_for(layer)
    if rule is None:
        raise config_error(path, f"layer of type {layer.type} is not quantizable "
                   f"(quantizable: {', '.join(QUANTIZABLE_RULES)}); set {enable_key} false or remove it",
                   name, enable_key)
    if broken is not None:
        raise config_error(path, f"layer cannot be quantized: {broken}", name, enable_key)
    return rule


def _channel_wise(path: str, name: str, layer: caffe_pb2.LayerParameter, rule: QuantRule,
                  weight_cfg: Mapping[str, Any] | None, key: str) -> bool:
    channel_wise = rule.channel_wise_default
    if weight_cfg is not None and "channel_wise" in weight_cfg:
        channel_wise = weight_cfg["channel_wise"]
    if channel_wise and not rule.channel_wise_allowed:
        raise config_error(path, f"channel_wise must be false for {layer.type}", name, f"{key}.channel_wise")
    return channel_wise


def _layer_entry_enabled(path: str, name: str, entry: Any, keys, flag: str) -> bool:
    """Check a layer's entry is an object of known keys with the boolean ``flag``; return it."""
    _want(path, entry, "object", name, name)
    _check_keys(path, entry, keys, name, "")
    if flag not in entry:
        raise config_error(path, "missing", name, flag)
    _want(path, entry[flag], "bool", name, flag)
    return entry[flag]


def _validate_layer(path: str, name: str, entry: Any, layer: caffe_pb2.LayerParameter,
                    broken: str | None) -> LayerQuantConfig | None:
    enabled = _layer_entry_enabled(path, name, entry, _LAYER_KEYS, "retrain_enable")

    # Structure and types are checked even for disabled layers: a typo is a typo.
    data_cfg = entry.get("retrain_data_config")
    if data_cfg is not None or enabled:
        if data_cfg is None:
            raise config_error(path, "missing (needed when retrain_enable is true)", name, "retrain_data_config")
        _want(path, data_cfg, "object", name, "retrain_data_config")
        _check_keys(path, data_cfg, _DATA_KEYS, name, "retrain_data_config")
    weight_cfg = entry.get("retrain_weight_config")
    if weight_cfg is not None:
        _want(path, weight_cfg, "object", name, "retrain_weight_config")
        _check_keys(path, weight_cfg, _WEIGHT_KEYS, name, "retrain_weight_config")
    for cfg, key, algo in ((data_cfg, "retrain_data_config", DATA_ALGO),
                           (weight_cfg, "retrain_weight_config", WEIGHT_ALGO)):
        if cfg is not None:
            _check_algo(path, name, cfg, key, "algo", algo)
    if data_cfg is not None:
        for k in ("clip_max", "clip_min"):
            if k in data_cfg:
                _want(path, data_cfg[k], "number", name, f"retrain_data_config.{k}")
        if "fixed_min" in data_cfg:
            _want(path, data_cfg["fixed_min"], "bool", name, "retrain_data_config.fixed_min")
    if weight_cfg is not None and "channel_wise" in weight_cfg:
        _want(path, weight_cfg["channel_wise"], "bool", name, "retrain_weight_config.channel_wise")
    if not enabled:
        return None

    rule = _enabled_rule(path, name, layer, broken, "retrain_enable")
    clip_min, clip_max = data_cfg.get("clip_min"), data_cfg.get("clip_max")
    if (clip_min is None) != (clip_max is None):
        missing = "clip_min" if clip_min is None else "clip_max"
        raise config_error(path, "clip_max and clip_min must be given together (or neither, for IFMR)",
                   name, f"retrain_data_config.{missing}")
    if clip_min is not None:
        check_clips(path, name, "retrain_data_config", float(clip_min), float(clip_max))
        clip_min, clip_max = float(clip_min), float(clip_max)

    if rule.has_weights and weight_cfg is None:
        raise config_error(path, "missing (needed when retrain_enable is true)", name, "retrain_weight_config")
    return LayerQuantConfig(
        layer_type=layer.type,
        clip_min=clip_min,
        clip_max=clip_max,
        fixed_min=data_cfg.get("fixed_min", False),
        channel_wise=_channel_wise(path, name, layer, rule, weight_cfg, "retrain_weight_config"),
    )


def validate_calibration_config(path: str, data: Any, net: caffe_pb2.NetParameter) -> CalibrationConfig:
    batch_num = _validate_top(path, data, "calibration config")
    activation_offset = data.get("activation_offset", True)
    _want(path, activation_offset, "bool", None, "activation_offset")
    layers = _validate_layers(path, data, net, _CALIBRATION_TOP_KEYS, _validate_calibration_layer)
    return CalibrationConfig(batch_num=batch_num, activation_offset=activation_offset, layers=layers)


def _ifmr_from_json(path: str, name: str, cfg: Mapping[str, Any]) -> IfmrParams:
    key = "activation_quant_params"
    default = IfmrParams()
    for field in ("max_percentile", "min_percentile", "search_step"):
        if field in cfg:
            _want(path, cfg[field], "number", name, f"{key}.{field}")
    search_range = cfg.get("search_range", [default.search_start, default.search_end])
    _want(path, search_range, "array", name, f"{key}.search_range")
    if len(search_range) != 2:
        raise config_error(path, f"expected [start, end], got {len(search_range)} values", name, f"{key}.search_range")
    for i, v in enumerate(search_range):
        _want(path, v, "number", name, f"{key}.search_range[{i}]")
    params = IfmrParams(max_percentile=float(cfg.get("max_percentile", default.max_percentile)),
                        min_percentile=float(cfg.get("min_percentile", default.min_percentile)),
                        search_start=float(search_range[0]), search_end=float(search_range[1]),
                        search_step=float(cfg.get("search_step", default.search_step)))
    json_key = {"search_start": "search_range[0]", "search_end": "search_range[1]"}
    return check_ifmr(path, name, lambda f: f"{key}.{json_key.get(f, f)}", params)


def _validate_calibration_layer(path: str, name: str, entry: Any, layer: caffe_pb2.LayerParameter,
                                broken: str | None) -> LayerCalibrationConfig | None:
    enabled = _layer_entry_enabled(path, name, entry, _CALIBRATION_LAYER_KEYS, "quant_enable")

    # Structure and types are checked even for disabled layers: a typo is a typo.
    act_cfg, ifmr = entry.get("activation_quant_params"), None
    if act_cfg is not None or enabled:
        if act_cfg is None:
            raise config_error(path, "missing (needed when quant_enable is true)", name, "activation_quant_params")
        _want(path, act_cfg, "object", name, "activation_quant_params")
        _check_keys(path, act_cfg, _ACTIVATION_KEYS, name, "activation_quant_params")
        _check_algo(path, name, act_cfg, "activation_quant_params", "algo", CALIBRATION_DATA_ALGO)
        ifmr = _ifmr_from_json(path, name, act_cfg)
    weight_cfg = entry.get("weight_quant_params")
    if weight_cfg is not None:
        _want(path, weight_cfg, "object", name, "weight_quant_params")
        _check_keys(path, weight_cfg, _CALIBRATION_WEIGHT_KEYS, name, "weight_quant_params")
        _check_algo(path, name, weight_cfg, "weight_quant_params", "wts_algo", CALIBRATION_WEIGHT_ALGO)
        if "channel_wise" in weight_cfg:
            _want(path, weight_cfg["channel_wise"], "bool", name, "weight_quant_params.channel_wise")
    if not enabled:
        return None

    rule = _enabled_rule(path, name, layer, broken, "quant_enable")
    if rule.has_weights and weight_cfg is None:
        raise config_error(path, "missing (needed when quant_enable is true)", name, "weight_quant_params")
    return LayerCalibrationConfig(
        layer_type=layer.type,
        channel_wise=_channel_wise(path, name, layer, rule, weight_cfg, "weight_quant_params"),
        ifmr=ifmr,
    )
