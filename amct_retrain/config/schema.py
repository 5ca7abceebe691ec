"""The retrain and calibration config JSON files: their structure, read and validated against a net."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails, PydanticCustomError

from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.config.common import (CONFIG_VERSION, CalibrationDataAlgo, CalibrationWeightAlgo, DataAlgo,
                                        IfmrParams, WeightAlgo, check_clips, check_ifmr, config_error)
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


# The structure of the JSON files, declared with pydantic: each model is one JSON object, its fields
# the keys it may hold with their JSON types and defaults; `_JsonObject` makes an unknown key an error
# and keeps the JSON types apart (no "1" -> 1, no true -> 1). A new key is one field line, e.g.
# `num_bits: Annotated[int, Field(ge=2, le=8)] = 8`; the error naming file, layer and key comes with it.


class _JsonObject(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


_Object = TypeVar("_Object", bound=_JsonObject)
_Given = TypeVar("_Given")


def _not_null(value: Any) -> Any:
    """An optional key given as JSON null is an error (leaving it out is how to not set it)."""
    if value is None:
        raise PydanticCustomError("null_given", "null is not allowed here; leave the key out to use the default")
    return value


def _supported_version(version: int) -> int:
    if version != CONFIG_VERSION:
        raise PydanticCustomError("version", f"unsupported version {version}; expected {CONFIG_VERSION}")
    return version


Version = Annotated[int, AfterValidator(_supported_version)]
BatchNum = Annotated[int, Field(ge=1)]
OptionalNumber = Annotated[float | None, BeforeValidator(_not_null)]  # left out: None
OptionalBool = Annotated[bool | None, BeforeValidator(_not_null)]


class RetrainDataJson(_JsonObject):
    """A layer's ``retrain_data_config``; clips both left out: IFMR initialises them."""
    algo: DataAlgo
    clip_max: OptionalNumber = None
    clip_min: OptionalNumber = None
    fixed_min: bool = False


class RetrainWeightJson(_JsonObject):
    """A layer's ``retrain_weight_config``; ``channel_wise`` left out: the layer type's default."""
    algo: WeightAlgo
    channel_wise: OptionalBool = None


class RetrainLayerJson(_JsonObject):
    """One layer's entry of the retrain config."""
    retrain_enable: bool
    retrain_data_config: RetrainDataJson | None = None
    retrain_weight_config: RetrainWeightJson | None = None


class RetrainTopJson(_JsonObject):
    """The top-level keys of the retrain config (every other key names a layer)."""
    version: Version
    batch_num: BatchNum = 1
    log_dir: Annotated[str, Field(min_length=1)] | None = None  # where the quant layers write TensorBoard logs


class ActivationJson(_JsonObject):
    """A layer's ``activation_quant_params`` (see :class:`IfmrParams`)."""
    algo: CalibrationDataAlgo
    max_percentile: float = IfmrParams.max_percentile
    min_percentile: float = IfmrParams.min_percentile
    search_range: Annotated[list[float], Field(min_length=2, max_length=2)] = [IfmrParams.search_start,
                                                                                IfmrParams.search_end]
    search_step: float = IfmrParams.search_step


class CalibrationWeightJson(_JsonObject):
    """A layer's ``weight_quant_params``; ``channel_wise`` left out: the layer type's default."""
    wts_algo: CalibrationWeightAlgo
    channel_wise: OptionalBool = None


class CalibrationLayerJson(_JsonObject):
    """One layer's entry of the calibration config."""
    quant_enable: bool
    activation_quant_params: ActivationJson | None = None
    weight_quant_params: CalibrationWeightJson | None = None


class CalibrationTopJson(_JsonObject):
    """The top-level keys of the calibration config (every other key names a layer)."""
    version: Version
    batch_num: BatchNum = 1
    activation_offset: bool = True


_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
               type(None): "null"}
_EXPECTED = {"bool_type": "a boolean", "int_type": "an integer", "float_type": "a number", "string_type": "a string",
             "list_type": "an array", "model_type": "an object"}


def _object_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel]:
    """The model of the JSON object at ``loc`` (keys only) below ``model``."""
    for key in loc:
        annotation = model.model_fields[str(key)].annotation
        model = next(a for a in (annotation, *get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel))
    return model


def _error_message(model: type[BaseModel], error: ErrorDetails) -> str:
    kind, value, ctx = error["type"], error["input"], error.get("ctx", {})
    got = f"{_JSON_TYPES.get(type(value), type(value).__name__)} {json.dumps(value)[:80]}"
    if kind == "extra_forbidden":
        return f"unknown key; expected one of: {', '.join(_object_at(model, error['loc'][:-1]).model_fields)}"
    if kind == "missing":
        field = _object_at(model, error["loc"][:-1]).model_fields[str(error["loc"][-1])]
        literal = get_args(field.annotation) if get_origin(field.annotation) is Literal else ()
        return f"missing; expected {literal[0]!r}" if literal else "missing"
    if kind == "float_type" and type(value) is int:  # float() would overflow
        return f"number {str(value)[:20]}... is out of range"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {got}"
    if kind == "literal_error":
        return f"unsupported value {value!r}; expected {ctx['expected']}"
    if kind == "greater_than_equal":
        return f"must be >= {ctx['ge']}, got {value}"
    if kind == "string_too_short":
        return "must not be empty (leave the key out instead)"
    if kind in ("too_short", "too_long"):
        return f"expected {ctx.get('min_length', ctx.get('max_length'))} values, got {ctx['actual_length']}"
    return error["msg"]


def _parse(path: str, model: type[_Object], data: Any, layer: str | None = None) -> _Object:
    """``data`` validated as ``model``; else a ConfigError naming the file, the layer and the key (the first
    unknown key if any, as a typo there explains the other errors)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = sorted(e.errors(), key=lambda error: error["type"] != "extra_forbidden")
        error = errors[0]
        key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]).lstrip(".")
        raise config_error(path, _error_message(model, error), layer, key or layer) from None


def _validated(path: str, data: Any, what: str, top: type[_Object], entry_model: type[_JsonObject],
               net: caffe_pb2.NetParameter, layer_config: Callable[..., Any]) -> tuple[_Object, dict[str, Any]]:
    """The top-level keys of a config JSON parsed as ``top``, and ``layer_config(path, name, entry,
    layer, broken)`` of each layer's entry parsed as ``entry_model``: the enabled ones (not None), in
    net order. Every key but the top-level ones must name a layer of ``net``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the {what} must be a JSON object, got {_JSON_TYPES.get(type(data), 'a value')}")
    parsed = _parse(path, top, {k: v for k, v in data.items() if k in top.model_fields})
    by_name = layers_by_name(net)
    _, broken = quantizable_layers(net)
    configs = {}
    for name, value in data.items():
        if name in top.model_fields:
            continue
        if name not in by_name:
            raise config_error(path, f"unknown key: the model has no layer named {name!r} "
                               f"(top-level keys are {', '.join(top.model_fields)} and layer names)", name)
        # Structure and types are checked even for disabled layers: a typo is a typo.
        config = layer_config(path, name, _parse(path, entry_model, value, name), by_name[name], broken.get(name))
        if config is not None:
            configs[name] = config
    # Net order, not file order: the graph passes walk the net.
    return parsed, {name: configs[name] for name in by_name if name in configs}


def validate_retrain_config(path: str, data: Any, net: caffe_pb2.NetParameter) -> RetrainConfig:
    """The retrain config ``data`` (read from ``path``) validated against ``net``."""
    top, layers = _validated(path, data, "retrain config", RetrainTopJson, RetrainLayerJson, net, _retrain_layer)
    return RetrainConfig(batch_num=top.batch_num, log_dir=top.log_dir, layers=layers)


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


def _required(path: str, name: str, block: _Given | None, key: str, enable_key: str) -> _Given:
    if block is None:
        raise config_error(path, f"missing (needed when {enable_key} is true)", name, key)
    return block


def _channel_wise(path: str, name: str, layer: caffe_pb2.LayerParameter, rule: QuantRule,
                  weight: RetrainWeightJson | CalibrationWeightJson | None, key: str) -> bool:
    channel_wise = rule.channel_wise_default if weight is None or weight.channel_wise is None else weight.channel_wise
    if channel_wise and not rule.channel_wise_allowed:
        raise config_error(path, f"channel_wise must be false for {layer.type}", name, f"{key}.channel_wise")
    return channel_wise


def _retrain_layer(path: str, name: str, entry: RetrainLayerJson, layer: caffe_pb2.LayerParameter,
                   broken: str | None) -> LayerQuantConfig | None:
    if not entry.retrain_enable:
        return None
    data = _required(path, name, entry.retrain_data_config, "retrain_data_config", "retrain_enable")
    rule = _enabled_rule(path, name, layer, broken, "retrain_enable")
    if (data.clip_min is None) != (data.clip_max is None):
        missing = "clip_min" if data.clip_min is None else "clip_max"
        raise config_error(path, "clip_max and clip_min must be given together (or neither, for IFMR)",
                           name, f"retrain_data_config.{missing}")
    if data.clip_min is not None and data.clip_max is not None:
        check_clips(path, name, "retrain_data_config", data.clip_min, data.clip_max)
    if rule.has_weights:
        _required(path, name, entry.retrain_weight_config, "retrain_weight_config", "retrain_enable")
    return LayerQuantConfig(
        layer_type=layer.type,
        clip_min=data.clip_min,
        clip_max=data.clip_max,
        fixed_min=data.fixed_min,
        channel_wise=_channel_wise(path, name, layer, rule, entry.retrain_weight_config, "retrain_weight_config"),
    )


def validate_calibration_config(path: str, data: Any, net: caffe_pb2.NetParameter) -> CalibrationConfig:
    """The calibration config ``data`` (read from ``path``) validated against ``net``."""
    top, layers = _validated(path, data, "calibration config", CalibrationTopJson, CalibrationLayerJson, net,
                             _calibration_layer)
    return CalibrationConfig(batch_num=top.batch_num, activation_offset=top.activation_offset, layers=layers)


_IFMR_JSON_KEYS = {"search_start": "search_range[0]", "search_end": "search_range[1]"}


def _ifmr_params(path: str, name: str, activation: ActivationJson) -> IfmrParams:
    params = IfmrParams(max_percentile=activation.max_percentile, min_percentile=activation.min_percentile,
                        search_start=activation.search_range[0], search_end=activation.search_range[1],
                        search_step=activation.search_step)
    return check_ifmr(path, name, lambda f: f"activation_quant_params.{_IFMR_JSON_KEYS.get(f, f)}", params)


def _calibration_layer(path: str, name: str, entry: CalibrationLayerJson, layer: caffe_pb2.LayerParameter,
                       broken: str | None) -> LayerCalibrationConfig | None:
    activation = entry.activation_quant_params
    ifmr = None if activation is None else _ifmr_params(path, name, activation)  # checked if given, even disabled
    if not entry.quant_enable:
        return None
    ifmr = _required(path, name, ifmr, "activation_quant_params", "quant_enable")
    rule = _enabled_rule(path, name, layer, broken, "quant_enable")
    if rule.has_weights:
        _required(path, name, entry.weight_quant_params, "weight_quant_params", "quant_enable")
    return LayerCalibrationConfig(
        layer_type=layer.type,
        channel_wise=_channel_wise(path, name, layer, rule, entry.weight_quant_params, "weight_quant_params"),
        ifmr=ifmr,
    )
