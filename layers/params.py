"""Validation of the JSON that reaches each quant layer through ``python_param.param_str``.

Errors name the layer type, the layer and the key, because a bad param_str otherwise
surfaces as an opaque Python exception inside Caffe's layer setup.
"""
import json
from dataclasses import dataclass
from typing import Any
from amct_retrain.errors import LayerParamError  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Key:
    """One accepted param_str key: its JSON type(s), and whether it must be present."""
    types: tuple
    required: bool = False
    default: Any = None


def parse_param_str(param_str: str, schema: dict[str, Key], layer_type: str) -> dict[str, Any]:
    """Parse ``param_str`` (a JSON object) against ``schema``; fill defaults.

    Every layer's schema has a required ``name`` key (pycaffe does not tell a Python
    layer its own name), used in every later error message.
    """
    try:
        params = json.loads(param_str or "{}")
    except json.JSONDecodeError as err:
        raise LayerParamError(f"{layer_type}: param_str is not valid JSON ({err}): {param_str!r}") from None
    if not isinstance(params, dict):
        raise LayerParamError(f"{layer_type}: param_str must be a JSON object, got {param_str!r}")
    where = f"{layer_type} layer '{params.get('name', '?')}'"
    for key in params:
        if key not in schema:
            raise LayerParamError(f"{where}: unknown param_str key '{key}' (known: {sorted(schema)})")
    parsed = {}
    for key, spec in schema.items():
        if key not in params:
            if spec.required:
                raise LayerParamError(f"{where}: param_str key '{key}' is required")
            parsed[key] = spec.default
            continue
        value = params[key]
        # bool is an int in Python: never accept it where a number is meant, nor the reverse.
        wrong_bool = isinstance(value, bool) and bool not in spec.types
        if wrong_bool or not isinstance(value, spec.types):
            names = "/".join("null" if t is type(None) else t.__name__ for t in spec.types)
            raise LayerParamError(f"{where}: param_str key '{key}' must be {names}, got {value!r}")
        parsed[key] = value
    return parsed


NUMBER = (int, float)
