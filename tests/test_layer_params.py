"""param_str validation of the quant layers: every error names the layer and the key."""
import json

import pytest

from amct_retrain_layers.params import NUMBER, Key, LayerParamError, parse_param_str

SCHEMA = {"name": Key((str,), required=True), "clip_max": Key(NUMBER + (type(None),)),
          "fixed_min": Key((bool,), default=False), "batch_num": Key((int,), default=1)}


def test_defaults_are_filled():
    assert parse_param_str('{"name": "q"}', SCHEMA, "T") == \
        {"name": "q", "clip_max": None, "fixed_min": False, "batch_num": 1}


@pytest.mark.parametrize("params, fragment", [
    ({"name": "q", "colour": 1}, "unknown param_str key 'colour'"),
    ({"name": "q", "clip_max": "6"}, "key 'clip_max' must be int/float/null"),
    ({"name": "q", "fixed_min": 1}, "key 'fixed_min' must be bool"),
    ({"name": "q", "batch_num": True}, "key 'batch_num' must be int"),
    ({"clip_max": 1.0}, "key 'name' is required"),
])
def test_bad_params_name_layer_and_key(params, fragment):
    with pytest.raises(LayerParamError) as err:
        parse_param_str(json.dumps(params), SCHEMA, "ActivationULQ")
    assert fragment in str(err.value), f"message {err.value!r} lacks {fragment!r}"
    if "name" in params:
        assert "ActivationULQ layer 'q'" in str(err.value), f"message {err.value!r} does not name the layer"


def test_invalid_json_is_reported_with_the_text():
    with pytest.raises(LayerParamError, match="not valid JSON"):
        parse_param_str("{name: q}", SCHEMA, "ActivationULQ")
