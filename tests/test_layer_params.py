"""param_str validation of the quant layers: every error names the layer and the key."""
import json

import pytest

from amct_retrain.errors import LayerParamError
from amct_retrain.layer_specs import ALL_SPECS, NUMBER, WEIGHT_ARQ, Key, LayerSpec

SPEC = LayerSpec("activation", "ActivationULQ", {
    "name": Key((str,), required=True), "clip_max": Key(NUMBER + (type(None),)),
    "fixed_min": Key((bool,), default=False), "batch_num": Key((int,), default=1)})


def test_defaults_are_filled():
    assert SPEC.parse('{"name": "q"}') == \
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
        SPEC.parse(json.dumps(params))
    assert fragment in str(err.value), f"message {err.value!r} lacks {fragment!r}"
    if "name" in params:
        assert "ActivationULQ layer 'q'" in str(err.value), f"message {err.value!r} does not name the layer"


def test_invalid_json_is_reported_with_the_text():
    with pytest.raises(LayerParamError, match="not valid JSON"):
        SPEC.parse("{name: q}")


def test_blobs_are_found_by_name_with_optional_blobs_only_when_present():
    assert WEIGHT_ARQ.blob_names() == ("fake_quant_weights", "master_weights", "scale_w")
    assert WEIGHT_ARQ.blob("scale_w") == 2 and WEIGHT_ARQ.blob("scale_w", {"clip_state"}) == 3
    assert WEIGHT_ARQ.ordered({"scale_w": 3, "master_weights": 2, "fake_quant_weights": 1}) == [1, 2, 3]
    with pytest.raises(ValueError, match="expected"):
        WEIGHT_ARQ.ordered({"scale_w": 3, "master_weights": 2})  # a blob missing


@pytest.mark.caffe  # imports the layers, hence pycaffe
@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.layer_class)
def test_every_spec_names_its_layer_class_in_its_module(spec):
    import importlib

    layer_class = getattr(importlib.import_module(spec.python_module), spec.layer_class, None)
    assert layer_class is not None, f"{spec.python_module} has no {spec.layer_class}"
    assert "name" in spec.keys and spec.keys["name"].required, f"{spec.layer_class}: every spec needs a required name"
