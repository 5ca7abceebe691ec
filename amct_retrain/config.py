"""Retrain and calibration configuration: which layers are quantized, and how (contract sections 2 and 4).

Four things live here:

* The backend rules (:data:`QUANTIZABLE_RULES`): which Caffe layer types can be
  quantized and under which constraints, as data, so that a new quantizable type
  is one more entry, not new code paths.
* The retrain config JSON: :func:`create_quant_retrain_config` writes it for every
  quantizable layer (optionally shaped by a *simplified config*), and
  :func:`load_retrain_config` reads and validates it against a net.
* The calibration config JSON (post-training calibration): :func:`create_quant_config`
  writes it, :func:`load_calibration_config` reads it; same machinery, its own keys
  (see :func:`create_quant_config` for the format).
* The simplified config (``config_defination``), in YAML (``.yaml``/``.yml``) or
  protobuf text (``.cfg``), one schema for retraining and one for calibration.  Both formats are checked against one schema, a proto2
  message built at import time from a ``FileDescriptorProto`` (the technique of
  :mod:`amct_retrain.record`: no protoc, no generated file).  A YAML document is
  walked against that descriptor, so unknown keys and wrong types are reported
  the same way for both formats, and the same settings give byte-identical JSON.

Design choices (not fixed by the contract):

* Skipped layers are *omitted* from the generated JSON; a quantizable layer absent
  from the JSON stays in float, exactly like one with ``"retrain_enable": false``.
* Overrides replace whole blocks: a per-layer ``retrain_data_quant_config`` is the
  complete data config of that layer (fields it leaves out take the defaults, they
  are not inherited from the per-type or global block).  Field-wise inheritance
  would make it impossible to send one layer back to IFMR initialisation (no clips)
  once the global block sets clips.  Data and weight blocks are resolved separately.
* A global ``channel_wise: true`` applies only to layer types that allow per-channel
  weights (Convolution, Deconvolution); InnerProduct stays per-tensor.  Asking for ``channel_wise:
  true`` on an InnerProduct *type* or *layer* override is an error.
* A layer both skipped and overridden is skipped, with a warning.
* A layer without weights (AVE Pooling) still gets a ``retrain_weight_config`` with
  ``channel_wise: false`` in the generated retrain JSON (the original toolkit's form); reading a
  retrain or calibration JSON does not require a weight block for it.
* Constraints that need the input shape (an AVE Pooling's windows must tile its input) cannot be
  checked on the prototxt: the model builders check them (:func:`without_shape_broken_layers`)
  and leave such a layer in float with a warning, even when the user named it.
* ``log_dir`` is an optional top-level JSON key of ours (not written by the
  generator): where the quant layers write TensorBoard logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from caffe.proto import caffe_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from amct_retrain.fileio import atomic_write, check_outputs_are_not_inputs, parse_text_proto, read_text_file
from amct_retrain.graph.model_io import probe_net, read_prototxt
from amct_retrain.layer_types import (QUANTIZABLE_RULES, TILING_CONSTRAINT, Constraint, QuantRule, layers_by_name,
                                      quantizable_layers, rule_for, shape_constraint_broken)
from amct_retrain.errors import ConfigError  # noqa: F401 (re-exported)

__all__ = [
    "ConfigError",
    "Constraint",
    "QuantRule",
    "QUANTIZABLE_RULES",
    "quantizable_layers",
    "shape_constraint_broken",
    "without_shape_broken_layers",
    "TILING_CONSTRAINT",
    "layers_by_name",
    "create_quant_retrain_config",
    "load_retrain_config",
    "RetrainConfig",
    "LayerQuantConfig",
    "SimplifiedRetrainConfig",
    "read_simplified_config",
    "CONFIG_VERSION",
    "DATA_ALGO",
    "WEIGHT_ALGO",
    "create_quant_config",
    "load_calibration_config",
    "read_config_json",
    "CalibrationConfig",
    "LayerCalibrationConfig",
    "IfmrParams",
    "SimplifiedCalibrationConfig",
    "CALIBRATION_DATA_ALGO",
    "CALIBRATION_WEIGHT_ALGO",
]

logger = logging.getLogger(__name__)

CONFIG_VERSION = 1
DATA_ALGO = "ulq_quantize"
WEIGHT_ALGO = "arq_retrain"
CALIBRATION_DATA_ALGO = "ifmr"
CALIBRATION_WEIGHT_ALGO = "arq_quantize"


def _err(path: str, message: str, layer: str | None = None, key: str | None = None) -> ConfigError:
    where = path
    if layer is not None:
        where += f": layer {layer!r}"
    if key is not None:
        where += f": key {key!r}"
    return ConfigError(f"{where}: {message}")


# --------------------------------------------------------------------------- backend rules


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


# --------------------------------------------------------------------------- reading files


# --------------------------------------------------------------------------- simplified config schema

_PACKAGE = "amct_retrain.retrain_config"
_F = descriptor_pb2.FieldDescriptorProto


def _build_schema() -> tuple[type, type]:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="amct_retrain/retrain_config.proto", package=_PACKAGE, syntax="proto2"
    )

    def message(name: str, fields: list[tuple[str, int, int, int, str]]) -> None:
        m = fdp.message_type.add(name=name)
        for fname, number, label, ftype, type_name in fields:
            f = m.field.add(name=fname, number=number, label=label, type=ftype)
            if type_name:
                f.type_name = f".{_PACKAGE}.{type_name}"

    opt, rep = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
    msg, string = _F.TYPE_MESSAGE, _F.TYPE_STRING
    # double, not float: YAML numbers are doubles, and the same clip written in
    # YAML and in .cfg must give the same JSON (0.1 as float32 would not).
    message("ClipMaxMin", [("clip_max", 1, opt, _F.TYPE_DOUBLE, ""), ("clip_min", 2, opt, _F.TYPE_DOUBLE, "")])
    message("UlqQuantize", [("clip_max_min", 1, opt, msg, "ClipMaxMin"), ("fixed_min", 2, opt, _F.TYPE_BOOL, "")])
    message("RetrainDataQuantConfig", [("ulq_quantize", 1, opt, msg, "UlqQuantize")])
    message("ArqRetrain", [("channel_wise", 1, opt, _F.TYPE_BOOL, "")])
    message("RetrainWeightQuantConfig", [("arq_retrain", 1, opt, msg, "ArqRetrain")])
    blocks = [
        ("retrain_data_quant_config", 2, opt, msg, "RetrainDataQuantConfig"),
        ("retrain_weight_quant_config", 3, opt, msg, "RetrainWeightQuantConfig"),
    ]
    message("OverrideLayerType", [("layer_type", 1, opt, string, ""), *blocks])
    message("OverrideLayerConfig", [("layer_name", 1, opt, string, ""), *blocks])
    message("SimplifiedRetrainConfig", [
        ("batch_num", 1, opt, _F.TYPE_UINT32, ""),
        ("skip_layers", 2, rep, string, ""),
        ("skip_layer_types", 3, rep, string, ""),
        ("retrain_data_quant_config", 4, opt, msg, "RetrainDataQuantConfig"),
        ("retrain_weight_quant_config", 5, opt, msg, "RetrainWeightQuantConfig"),
        ("override_layer_types", 6, rep, msg, "OverrideLayerType"),
        ("override_layer_configs", 7, rep, msg, "OverrideLayerConfig"),
        ("quant_skip_layers", 8, rep, string, ""),
    ])

    # Calibration: the original toolkit's blocks (common_config and the overrides' calibration_config,
    # each with ifmr_quantize and arq_quantize); skip lists and overrides as for retraining.
    message("ArqQuantize", [("channel_wise", 1, opt, _F.TYPE_BOOL, "")])
    message("IfmrQuantize", [(name, number, opt, _F.TYPE_DOUBLE, "") for number, name in enumerate(
        ("search_range_start", "search_range_end", "search_step", "max_percentile", "min_percentile"), 1)])
    message("CalibrationQuantConfig", [("arq_quantize", 1, opt, msg, "ArqQuantize"),
                                       ("ifmr_quantize", 2, opt, msg, "IfmrQuantize")])
    calibration_block = ("calibration_config", 2, opt, msg, "CalibrationQuantConfig")
    message("OverrideCalibrationLayerType", [("layer_type", 1, opt, string, ""), calibration_block])
    message("OverrideCalibrationLayerConfig", [("layer_name", 1, opt, string, ""), calibration_block])
    message("SimplifiedCalibrationConfig", [
        ("batch_num", 1, opt, _F.TYPE_UINT32, ""),
        ("activation_offset", 2, opt, _F.TYPE_BOOL, ""),
        ("skip_layers", 4, rep, string, ""),
        ("skip_layer_types", 5, rep, string, ""),
        ("common_config", 6, opt, msg, "CalibrationQuantConfig"),
        ("override_layer_types", 7, rep, msg, "OverrideCalibrationLayerType"),
        ("override_layer_configs", 8, rep, msg, "OverrideCalibrationLayerConfig"),
        ("quant_skip_layers", 9, rep, string, ""),
    ])

    # A private pool, as in record.py: no clash with the process-wide default pool.
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return tuple(message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
                 for name in ("SimplifiedRetrainConfig", "SimplifiedCalibrationConfig"))


SimplifiedRetrainConfig, SimplifiedCalibrationConfig = _build_schema()


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last silently)."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        with contextlib.suppress(TypeError):  # unhashable keys: construct_mapping reports them
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)
# PyYAML follows YAML 1.1, where a float needs a dot: `clip_min: 1e-5` would be the
# string "1e-5".  Also resolve exponent-only floats, as YAML 1.2 (and users) do.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _fill_message(path: str, data: Any, msg: Message, key: str) -> None:
    """Copy a YAML mapping into ``msg``, checking keys and types against its descriptor."""
    if not isinstance(data, dict):
        raise _err(path, f"expected a mapping, got {_yaml_type_name(data)}", key=key or "<top level>")
    fields = msg.DESCRIPTOR.fields_by_name
    for name, value in data.items():
        sub = f"{key}.{name}" if key else str(name)
        field = fields.get(name) if isinstance(name, str) else None
        if field is None:
            raise _err(path, f"unknown field; expected one of: {', '.join(fields)}", key=sub)
        if field.is_repeated:
            if not isinstance(value, list):
                raise _err(path, f"expected a list, got {_yaml_type_name(value)}", key=sub)
            for i, item in enumerate(value):
                if field.type == _F.TYPE_MESSAGE:
                    _fill_message(path, item, getattr(msg, name).add(), f"{sub}[{i}]")
                else:
                    getattr(msg, name).append(_scalar(path, field, item, f"{sub}[{i}]"))
        elif field.type == _F.TYPE_MESSAGE:
            sub_msg = getattr(msg, name)
            sub_msg.SetInParent()  # an empty mapping still counts as "given"
            _fill_message(path, value, sub_msg, sub)
        else:
            setattr(msg, name, _scalar(path, field, value, sub))


def _scalar(path: str, field: Any, value: Any, key: str) -> Any:
    ftype = field.type
    if ftype == _F.TYPE_BOOL:
        ok, want = isinstance(value, bool), "a boolean (true/false)"
    elif ftype == _F.TYPE_STRING:
        ok, want = isinstance(value, str), "a string"
    elif ftype == _F.TYPE_DOUBLE:
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:  # integer types
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
        if ok and ftype == _F.TYPE_UINT32 and not 0 <= value < 2**32:
            raise _err(path, f"value {value} out of range for an unsigned 32-bit integer", key=key)
    if not ok:
        raise _err(path, f"expected {want}, got {_yaml_type_name(value)} {value!r}", key=key)
    return float(value) if ftype == _F.TYPE_DOUBLE else value


def read_simplified_config(config_defination: str | os.PathLike,
                           schema: type = SimplifiedRetrainConfig) -> Message:
    """Parse a simplified config (YAML or protobuf-text ``.cfg``) into a ``schema`` message:
    ``SimplifiedRetrainConfig`` (retraining) or ``SimplifiedCalibrationConfig`` (calibration).

    Only syntax, field names and field types are checked here; checks against a
    model happen in :func:`create_quant_retrain_config` / :func:`create_quant_config`.
    """
    path = os.fspath(config_defination)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".yaml", ".yml", ".cfg"):
        raise ConfigError(
            f"{path}: unsupported simplified config extension {ext or '(none)'!r}; use .yaml, .yml or .cfg"
        )
    text = read_text_file(path, "simplified config", ConfigError)
    msg = schema()
    if ext == ".cfg":
        parse_text_proto(path, text, msg, ConfigError)
        return msg
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        detail = " ".join(str(p) for p in (e.context, e.problem) if p)
        raise ConfigError(f"{where}: invalid YAML: {detail}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:  # an empty document: all defaults
        return msg
    _fill_message(path, data, msg, "")
    return msg


# --------------------------------------------------------------------------- shared checks


def _check_clips(path: str, layer: str | None, key: str, clip_min: float, clip_max: float) -> None:
    for name, v in (("clip_min", clip_min), ("clip_max", clip_max)):
        if not math.isfinite(v):
            raise _err(path, f"{name} must be a finite number, got {v}", layer, f"{key}.{name}")
    if clip_min >= clip_max:
        raise _err(path, f"clip_min ({clip_min}) must be less than clip_max ({clip_max})", layer, f"{key}.clip_min")
    # The quantized range always holds an exact 0 (zero padding, ReLU outputs).
    if clip_min > 0:
        raise _err(path, f"clip_min ({clip_min}) must be <= 0: the range must contain 0", layer, f"{key}.clip_min")
    if clip_max < 0:
        raise _err(path, f"clip_max ({clip_max}) must be >= 0: the range must contain 0", layer, f"{key}.clip_max")


# --------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class _DataSettings:
    clip_min: float | None = None
    clip_max: float | None = None
    fixed_min: bool = False


def _data_settings(path: str, block: Message, key: str, layer: str | None) -> _DataSettings:
    ulq = block.ulq_quantize
    clip_min = clip_max = None
    if ulq.HasField("clip_max_min"):
        cmm = ulq.clip_max_min
        ckey = f"{key}.ulq_quantize.clip_max_min"
        for name in ("clip_max", "clip_min"):
            if not cmm.HasField(name):
                raise _err(path, "clip_max_min needs both clip_max and clip_min", layer, f"{ckey}.{name}")
        clip_min, clip_max = cmm.clip_min, cmm.clip_max
        _check_clips(path, layer, ckey, clip_min, clip_max)
    return _DataSettings(clip_min, clip_max, ulq.fixed_min)


def _channel_wise_setting(arq: Message) -> bool | None:
    return arq.channel_wise if arq.HasField("channel_wise") else None


@dataclass(frozen=True)
class _Override:
    data: Any  # the activation block's settings (_DataSettings, IfmrParams), None if not given
    channel_wise: bool | None
    weight_given: bool


def _override_of(path: str, layer: str | None, rule: QuantRule | None, data: Any, arq: Message | None,
                 arq_key: str) -> _Override:
    """An override with activation settings ``data`` and the weight block ``arq`` (None: not given)."""
    channel_wise = None if arq is None else _channel_wise_setting(arq)
    if channel_wise and rule is not None and not rule.channel_wise_allowed:
        raise _err(path, f"channel_wise must be false for {rule.layer_type}", layer, f"{arq_key}.channel_wise")
    return _Override(data, channel_wise, arq is not None)


def _override(path: str, entry: Message, key: str, layer: str | None, rule: QuantRule | None) -> _Override:
    data = None
    if entry.HasField("retrain_data_quant_config"):
        data = _data_settings(path, entry.retrain_data_quant_config, f"{key}.retrain_data_quant_config", layer)
    given = entry.HasField("retrain_weight_quant_config")
    return _override_of(path, layer, rule, data, entry.retrain_weight_quant_config.arq_retrain if given else None,
                        f"{key}.retrain_weight_quant_config.arq_retrain")


def _batch_num(path: str, spec: Message) -> int:
    if not spec.HasField("batch_num"):
        return 1
    if spec.batch_num < 1:
        raise _err(path, f"batch_num must be >= 1, got {spec.batch_num}", key="batch_num")
    return spec.batch_num


ReadOverride = Callable[[str, Message, str, str | None, QuantRule | None], _Override]


def _resolve_layers(path: str, spec: Message, net: caffe_pb2.NetParameter, model_path: str,
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
                raise _err(path, f"model {model_path} has no layer named {name!r}", name, f"{field}[{i}]")
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
            raise _err(path, "layer_type is required", key=f"{key}.layer_type")
        t = entry.layer_type
        if t not in QUANTIZABLE_RULES:
            raise _err(path, f"layer type {t!r} is not quantizable (quantizable: {', '.join(QUANTIZABLE_RULES)})",
                       key=f"{key}.layer_type")
        if t in type_overrides:
            raise _err(path, f"layer type {t!r} is overridden more than once", key=f"{key}.layer_type")
        type_overrides[t] = read_override(path, entry, key, None, QUANTIZABLE_RULES[t])
        if t in skipped_types:
            logger.warning("%s: layer type %s is in skip_layer_types; its override is ignored", path, t)

    layer_overrides: dict[str, _Override] = {}
    for i, entry in enumerate(spec.override_layer_configs):
        key = f"override_layer_configs[{i}]"
        if not entry.HasField("layer_name"):
            raise _err(path, "layer_name is required", key=f"{key}.layer_name")
        name = entry.layer_name
        if name not in by_name:
            raise _err(path, f"model {model_path} has no layer named {name!r}", name, f"{key}.layer_name")
        if name in layer_overrides:
            raise _err(path, "layer is overridden more than once", name, f"{key}.layer_name")
        layer = by_name[name]
        rule = rule_for(layer)
        if rule is None:
            raise _err(path, f"layer of type {layer.type} is not quantizable "
                       f"(quantizable: {', '.join(QUANTIZABLE_RULES)})", name, f"{key}.layer_name")
        if name in broken:
            raise _err(path, f"layer cannot be quantized: {broken[name]}", name, f"{key}.layer_name")
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


def _settings(chain: list[_Override], global_data: Any, global_cw: bool | None, rule: QuantRule) -> tuple[Any, bool]:
    """(activation settings, channel_wise) of one layer. Precedence, per block: layer override >
    type override > global > default."""
    data = next((o.data for o in chain if o.data is not None), global_data)
    weight_owner = next((o for o in chain if o.weight_given), None)
    if weight_owner is not None:
        channel_wise = weight_owner.channel_wise
    else:
        # A global channel_wise only reaches types that allow per-channel weights.
        channel_wise = global_cw if rule.channel_wise_allowed else None
    return data, rule.channel_wise_default if channel_wise is None else channel_wise


def _generate(path: str, spec: Message | None, net: caffe_pb2.NetParameter, model_path: str) -> dict[str, Any]:
    """Build the retrain config dict for ``net``, shaped by the simplified config ``spec``."""
    spec = spec if spec is not None else SimplifiedRetrainConfig()
    batch_num = _batch_num(path, spec)
    global_data = _DataSettings()
    if spec.HasField("retrain_data_quant_config"):
        global_data = _data_settings(path, spec.retrain_data_quant_config, "retrain_data_quant_config", None)
    global_cw = None
    if spec.HasField("retrain_weight_quant_config"):
        global_cw = _channel_wise_setting(spec.retrain_weight_quant_config.arq_retrain)

    out: dict[str, Any] = {"version": CONFIG_VERSION, "batch_num": batch_num}
    for name, rule, chain in _resolve_layers(path, spec, net, model_path, _override):
        data, channel_wise = _settings(chain, global_data, global_cw, rule)
        data_cfg: dict[str, Any] = {"algo": DATA_ALGO}
        if data.clip_max is not None:
            data_cfg["clip_max"] = data.clip_max
            data_cfg["clip_min"] = data.clip_min
        data_cfg["fixed_min"] = data.fixed_min
        # Written for weightless types too (Pooling: channel_wise false), as the original toolkit does.
        entry: dict[str, Any] = {"retrain_enable": True, "retrain_data_config": data_cfg,
                                 "retrain_weight_config": {"algo": WEIGHT_ALGO, "channel_wise": channel_wise}}
        out[name] = entry
    return out


def _read_create_inputs(out_path: str, model_path: str, weights_path: str, def_path: str | None,
                        schema: type) -> tuple[caffe_pb2.NetParameter, Message | None]:
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
        kind = layer.type
        if layer.type == "Pooling":
            kind = f"{caffe_pb2.PoolingParameter.PoolMethod.Name(layer.pooling_param.pool)} Pooling"
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
            why = (f"it has no quantizable layer (it has {_what_the_net_has(net)}; quantizable: Convolution, "
                   "Deconvolution, InnerProduct, AVE Pooling)")
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
    parsed = _validate(out_path, data, net)
    _write_generated(out_path, data, parsed.layers, net, model_path, "retrain config")


# --------------------------------------------------------------------------- calibration config


@dataclass(frozen=True)
class IfmrParams:
    """The IFMR range search of one layer's activations (``activation_quant_params``).

    As in amct_caffe, ``min_percentile`` is the share of values at or above the lower bound:
    the lower bound is the ``1 - min_percentile`` quantile (0.999999: the 0.000001 quantile of the
    contract). The upper bound starts at the ``max_percentile`` quantile and is searched over
    ``search_start * max, ..., search_end * max`` in steps of ``search_step``.
    """
    max_percentile: float = 0.999999
    min_percentile: float = 0.999999
    search_start: float = 0.7
    search_end: float = 1.3
    search_step: float = 0.01

    def ifmr_kwargs(self) -> dict[str, float]:
        """The arguments of :func:`amct_retrain.numerics.ifmr_search`."""
        return {"min_percentile": 1.0 - self.min_percentile, "max_percentile": self.max_percentile,
                "search_start": self.search_start, "search_end": self.search_end, "search_step": self.search_step}


def _check_ifmr(path: str, layer: str | None, key_of: Callable[[str], str], p: IfmrParams) -> IfmrParams:
    """``p`` if its values are usable; else a ConfigError naming ``key_of(field)``."""
    for field in ("max_percentile", "min_percentile"):
        v = getattr(p, field)
        if not (math.isfinite(v) and 0.5 < v <= 1.0):
            raise _err(path, f"{field} must lie in (0.5, 1], got {v}", layer, key_of(field))
    if not (math.isfinite(p.search_start) and math.isfinite(p.search_end) and 0 < p.search_start <= p.search_end):
        raise _err(path, f"the search range must satisfy 0 < start <= end, got [{p.search_start}, {p.search_end}]",
                   layer, key_of("search_start"))
    if not (math.isfinite(p.search_step) and p.search_step > 0):
        raise _err(path, f"search_step must be a positive number, got {p.search_step}", layer, key_of("search_step"))
    return p


_IFMR_CFG_KEYS = {"search_start": "search_range_start", "search_end": "search_range_end"}


def _ifmr_settings(path: str, block: Message, key: str, layer: str | None) -> IfmrParams:
    """IfmrParams from a simplified config's ``ifmr_quantize`` block (unset fields: the defaults)."""
    default = IfmrParams()
    def cfg_key(field: str) -> str:
        return _IFMR_CFG_KEYS.get(field, field)

    values = {f.name: getattr(block, cfg_key(f.name)) if block.HasField(cfg_key(f.name)) else getattr(default, f.name)
              for f in dataclasses.fields(IfmrParams)}
    return _check_ifmr(path, layer, lambda field: f"{key}.{cfg_key(field)}", IfmrParams(**values))


def _calibration_override(path: str, entry: Message, key: str, layer: str | None,
                          rule: QuantRule | None) -> _Override:
    block, bkey = entry.calibration_config, f"{key}.calibration_config"
    data = (_ifmr_settings(path, block.ifmr_quantize, f"{bkey}.ifmr_quantize", layer)
            if block.HasField("ifmr_quantize") else None)
    arq = block.arq_quantize if block.HasField("arq_quantize") else None
    return _override_of(path, layer, rule, data, arq, f"{bkey}.arq_quantize")


def _ifmr_json(p: IfmrParams) -> dict[str, Any]:
    return {"algo": CALIBRATION_DATA_ALGO, "max_percentile": p.max_percentile, "min_percentile": p.min_percentile,
            "search_range": [p.search_start, p.search_end], "search_step": p.search_step}


def _generate_calibration(path: str, spec: Message, net: caffe_pb2.NetParameter,
                          model_path: str) -> dict[str, Any]:
    """Build the calibration config dict for ``net``, shaped by the simplified config ``spec``."""
    global_ifmr, global_cw = IfmrParams(), None
    if spec.HasField("common_config"):
        common = spec.common_config
        if common.HasField("ifmr_quantize"):
            global_ifmr = _ifmr_settings(path, common.ifmr_quantize, "common_config.ifmr_quantize", None)
        global_cw = _channel_wise_setting(common.arq_quantize)
    out: dict[str, Any] = {"version": CONFIG_VERSION, "batch_num": _batch_num(path, spec),
                           "activation_offset": spec.activation_offset if spec.HasField("activation_offset") else True}
    for name, rule, chain in _resolve_layers(path, spec, net, model_path, _calibration_override):
        ifmr, channel_wise = _settings(chain, global_ifmr, global_cw, rule)
        entry: dict[str, Any] = {"quant_enable": True, "activation_quant_params": _ifmr_json(ifmr)}
        if rule.has_weights:
            entry["weight_quant_params"] = {"wts_algo": CALIBRATION_WEIGHT_ALGO, "channel_wise": channel_wise}
        out[name] = entry
    return out


def _spec_from_arguments(skip_layers: Any, batch_num: Any, activation_offset: Any) -> Message:
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
    if spec is None:
        data = _generate_calibration("create_quant_config", _spec_from_arguments(
            skip_layers, batch_num, activation_offset), net, model_path)
    else:
        ignored = [name for name, given in (("skip_layers", bool(skip_layers)), ("batch_num", batch_num != 1),
                                            ("activation_offset", activation_offset is not True)) if given]
        if ignored:
            logger.warning("%s: the simplified config decides; argument(s) %s ignored", def_path, ", ".join(ignored))
        data = _generate_calibration(def_path, spec, net, model_path)
    parsed = _validate_calibration(out_path, data, net)
    _write_generated(out_path, data, parsed.layers, net, model_path, "calibration config")


# --------------------------------------------------------------------------- loading


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
        raise _err(path, "key given more than once", key=e.key) from None


def load_retrain_config(config_file: str | os.PathLike, net: caffe_pb2.NetParameter) -> RetrainConfig:
    """Read the retrain config JSON and validate it against ``net``.

    Raises :class:`ConfigError` naming the file, layer and key for invalid JSON
    (with its line), a ``version`` other than 1, unknown keys, wrong types, layer
    names the model lacks, layers that cannot be quantized, unknown algorithms,
    inconsistent clips, ``channel_wise`` on a type that does not allow it, or
    ``batch_num`` < 1.  Quantizable layers absent from the file stay in float.
    """
    path = os.fspath(config_file)
    return _validate(path, read_config_json(path, "retrain config"), net)


def load_calibration_config(config_file: str | os.PathLike, net: caffe_pb2.NetParameter) -> CalibrationConfig:
    """Read the calibration config JSON (see :func:`create_quant_config`) and validate it against
    ``net``, with the errors of :func:`load_retrain_config` (file, layer and key named); also a
    percentile outside (0.5, 1], a search range that is not ``0 < start <= end`` and a search step
    <= 0 are errors. Quantizable layers absent from the file stay in float."""
    path = os.fspath(config_file)
    return _validate_calibration(path, read_config_json(path, "calibration config"), net)


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
        raise _err(path, f"expected {names[kind]}, got {_json_type(value)} {json.dumps(value)[:80]}", layer, key)
    if kind == "number" and isinstance(value, int) and not -1e308 < value < 1e308:  # float() would overflow
        raise _err(path, f"number {str(value)[:20]}... is out of range", layer, key)


def _json_type(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def _check_keys(path: str, obj: Mapping[str, Any], allowed: Iterable[str], layer: str | None, key: str) -> None:
    allowed = tuple(allowed)
    for k in obj:
        if k not in allowed:
            raise _err(path, f"unknown key; expected one of: {', '.join(allowed)}", layer, f"{key}.{k}" if key else k)


def _validate_top(path: str, data: Any, what: str) -> int:
    """Check the top level of a config JSON (an object, its version); return its batch_num."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the {what} must be a JSON object, got {_json_type(data)}")
    if "version" not in data:
        raise _err(path, f"missing; expected {CONFIG_VERSION}", key="version")
    version = data["version"]
    _want(path, version, "int", None, "version")
    if version != CONFIG_VERSION:
        raise _err(path, f"unsupported version {version}; expected {CONFIG_VERSION}", key="version")
    batch_num = data.get("batch_num", 1)
    _want(path, batch_num, "int", None, "batch_num")
    if batch_num < 1:
        raise _err(path, f"batch_num must be >= 1, got {batch_num}", key="batch_num")
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
            raise _err(path, f"unknown key: the model has no layer named {name!r} "
                       f"(top-level keys are {', '.join(top_keys)} and layer names)", name)
        parsed = validate_layer(path, name, entry, by_name[name], broken.get(name))
        if parsed is not None:
            configs[name] = parsed
    # Net order, not file order: the graph passes walk the net.
    return {name: configs[name] for name in by_name if name in configs}


def _validate(path: str, data: Any, net: caffe_pb2.NetParameter) -> RetrainConfig:
    batch_num = _validate_top(path, data, "retrain config")
    log_dir = data.get("log_dir")
    if log_dir is not None:
        _want(path, log_dir, "str", None, "log_dir")
        if not log_dir:
            raise _err(path, "log_dir must not be empty (leave it out for no logs)", key="log_dir")
    layers = _validate_layers(path, data, net, _TOP_KEYS, _validate_layer)
    return RetrainConfig(batch_num=batch_num, log_dir=log_dir, layers=layers)


def _check_algo(path: str, name: str, cfg: Mapping[str, Any], key: str, field: str, algo: str) -> None:
    if field not in cfg:
        raise _err(path, f"missing; expected {algo!r}", name, f"{key}.{field}")
    _want(path, cfg[field], "str", name, f"{key}.{field}")
    if cfg[field] != algo:
        raise _err(path, f"unsupported algorithm {cfg[field]!r}; expected {algo!r}", name, f"{key}.{field}")


def _enabled_rule(path: str, name: str, layer: caffe_pb2.LayerParameter, broken: str | None,
                  enable_key: str) -> QuantRule:
    """The rule of an enabled layer; an error if it is not quantizable or breaks a constraint."""
    rule = rule_for(layer)
    if rule is None:
        raise _err(path, f"layer of type {layer.type} is not quantizable "
                   f"(quantizable: {', '.join(QUANTIZABLE_RULES)}); set {enable_key} false or remove it",
                   name, enable_key)
    if broken is not None:
        raise _err(path, f"layer cannot be quantized: {broken}", name, enable_key)
    return rule


def _channel_wise(path: str, name: str, layer: caffe_pb2.LayerParameter, rule: QuantRule,
                  weight_cfg: Mapping[str, Any] | None, key: str) -> bool:
    channel_wise = rule.channel_wise_default
    if weight_cfg is not None and "channel_wise" in weight_cfg:
        channel_wise = weight_cfg["channel_wise"]
    if channel_wise and not rule.channel_wise_allowed:
        raise _err(path, f"channel_wise must be false for {layer.type}", name, f"{key}.channel_wise")
    return channel_wise


def _layer_entry_enabled(path: str, name: str, entry: Any, keys, flag: str) -> bool:
    """Check a layer's entry is an object of known keys with the boolean ``flag``; return it."""
    _want(path, entry, "object", name, name)
    _check_keys(path, entry, keys, name, "")
    if flag not in entry:
        raise _err(path, "missing", name, flag)
    _want(path, entry[flag], "bool", name, flag)
    return entry[flag]


def _validate_layer(path: str, name: str, entry: Any, layer: caffe_pb2.LayerParameter,
                    broken: str | None) -> LayerQuantConfig | None:
    enabled = _layer_entry_enabled(path, name, entry, _LAYER_KEYS, "retrain_enable")

    # Structure and types are checked even for disabled layers: a typo is a typo.
    data_cfg = entry.get("retrain_data_config")
    if data_cfg is not None or enabled:
        if data_cfg is None:
            raise _err(path, "missing (needed when retrain_enable is true)", name, "retrain_data_config")
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
        raise _err(path, "clip_max and clip_min must be given together (or neither, for IFMR)",
                   name, f"retrain_data_config.{missing}")
    if clip_min is not None:
        _check_clips(path, name, "retrain_data_config", float(clip_min), float(clip_max))
        clip_min, clip_max = float(clip_min), float(clip_max)

    if rule.has_weights and weight_cfg is None:
        raise _err(path, "missing (needed when retrain_enable is true)", name, "retrain_weight_config")
    return LayerQuantConfig(
        layer_type=layer.type,
        clip_min=clip_min,
        clip_max=clip_max,
        fixed_min=data_cfg.get("fixed_min", False),
        channel_wise=_channel_wise(path, name, layer, rule, weight_cfg, "retrain_weight_config"),
    )


def _validate_calibration(path: str, data: Any, net: caffe_pb2.NetParameter) -> CalibrationConfig:
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
        raise _err(path, f"expected [start, end], got {len(search_range)} values", name, f"{key}.search_range")
    for i, v in enumerate(search_range):
        _want(path, v, "number", name, f"{key}.search_range[{i}]")
    params = IfmrParams(max_percentile=float(cfg.get("max_percentile", default.max_percentile)),
                        min_percentile=float(cfg.get("min_percentile", default.min_percentile)),
                        search_start=float(search_range[0]), search_end=float(search_range[1]),
                        search_step=float(cfg.get("search_step", default.search_step)))
    json_key = {"search_start": "search_range[0]", "search_end": "search_range[1]"}
    return _check_ifmr(path, name, lambda f: f"{key}.{json_key.get(f, f)}", params)


def _validate_calibration_layer(path: str, name: str, entry: Any, layer: caffe_pb2.LayerParameter,
                                broken: str | None) -> LayerCalibrationConfig | None:
    enabled = _layer_entry_enabled(path, name, entry, _CALIBRATION_LAYER_KEYS, "quant_enable")

    # Structure and types are checked even for disabled layers: a typo is a typo.
    act_cfg, ifmr = entry.get("activation_quant_params"), None
    if act_cfg is not None or enabled:
        if act_cfg is None:
            raise _err(path, "missing (needed when quant_enable is true)", name, "activation_quant_params")
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
        raise _err(path, "missing (needed when quant_enable is true)", name, "weight_quant_params")
    return LayerCalibrationConfig(
        layer_type=layer.type,
        channel_wise=_channel_wise(path, name, layer, rule, weight_cfg, "weight_quant_params"),
        ifmr=ifmr,
    )
