"""The simplified config (``config_defination``), in YAML (``.yaml``/``.yml``) or protobuf text
(``.cfg``): one schema for retraining and one for calibration, read into a protobuf message."""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any

import yaml
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from amct_retrain.config.common import config_error
from amct_retrain.errors import ConfigError
from amct_retrain.fileio import parse_text_proto, read_text_file



_PACKAGE = "amct_retrain.retrain_config"
# A message of the schemas below: its class is built at import time, so a type checker knows none of its fields.
SimplifiedMessage = Any
_F = descriptor_pb2.FieldDescriptorProto


def _build_schema() -> tuple[type[SimplifiedMessage], type[SimplifiedMessage]]:
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
    def message_class(name: str) -> type[Message]:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))

    return message_class("SimplifiedRetrainConfig"), message_class("SimplifiedCalibrationConfig")


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
        raise config_error(path, f"expected a mapping, got {_yaml_type_name(data)}", key=key or "<top level>")
    fields = msg.DESCRIPTOR.fields_by_name
    for name, value in data.items():
        sub = f"{key}.{name}" if key else str(name)
        field = fields.get(name) if isinstance(name, str) else None
        if field is None:
            raise config_error(path, f"unknown field; expected one of: {', '.join(fields)}", key=sub)
        if field.is_repeated:
            if not isinstance(value, list):
                raise config_error(path, f"expected a list, got {_yaml_type_name(value)}", key=sub)
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
            raise config_error(path, f"value {value} out of range for an unsigned 32-bit integer", key=key)
    if not ok:
        raise config_error(path, f"expected {want}, got {_yaml_type_name(value)} {value!r}", key=key)
    return float(value) if ftype == _F.TYPE_DOUBLE else value


def read_simplified_config(config_defination: str | os.PathLike,
                           schema: type = SimplifiedRetrainConfig) -> SimplifiedMessage:
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
