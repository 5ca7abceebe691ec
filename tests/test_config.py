"""Tests for amct_retrain.config (retrain config JSON, simplified config, backend rules)."""

import json
import logging
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from caffe.proto import caffe_pb2
from google.protobuf import text_format

from amct_retrain import config as cfg
from amct_retrain.errors import OutputPathError
from amct_retrain.config import (
    QUANTIZABLE_RULES,
    ConfigError,
    Constraint,
    LayerQuantConfig,
    QuantRule,
    create_quant_retrain_config,
    load_retrain_config,
    quantizable_layers,
)

pytestmark = pytest.mark.caffe  # the config reads nets as Caffe's NetParameter (caffe_pb2)

# conv1 -> relu1 -> pool1 (MAX) -> conv2 (depthwise) -> ip1 -> relu2 -> ip2, with the data
# layer listed twice (TRAIN and TEST), as real train/val prototxts do.
NET = """
name: "small"
layer { name: "data" type: "DummyData" top: "data" include { phase: TRAIN }
        dummy_data_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "data" type: "DummyData" top: "data" include { phase: TEST }
        dummy_data_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
        convolution_param { num_output: 4 kernel_size: 1 group: 4 } }
layer { name: "ip1" type: "InnerProduct" bottom: "conv2" top: "ip1"
        inner_product_param { num_output: 8 } }
layer { name: "relu2" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 2 } }
"""
QUANT = ["conv1", "conv2", "ip1", "ip2"]

# conv3d: a 3-D kernel (N-D convolution, on a 5-D input); ip_t: transposed; ip_ax: axis 2.
# A net Caffe builds: the config generators ask it first.
BROKEN_NET = """
name: "broken"
layer { name: "data5" type: "Input" top: "data5" input_param { shape { dim: 1 dim: 3 dim: 4 dim: 8 dim: 8 } } }
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv3d" type: "Convolution" bottom: "data5" top: "conv3d"
        convolution_param { num_output: 4 kernel_size: 3 kernel_size: 3 kernel_size: 3 } }
layer { name: "conv_ok" type: "Convolution" bottom: "data" top: "conv_ok"
        convolution_param { num_output: 4 kernel_h: 1 kernel_w: 3 } }
layer { name: "ip_t" type: "InnerProduct" bottom: "conv_ok" top: "ip_t"
        inner_product_param { num_output: 8 transpose: true } }
layer { name: "ip_ax" type: "InnerProduct" bottom: "conv_ok" top: "ip_ax"
        inner_product_param { num_output: 8 axis: 2 } }
"""

CONV_DEFAULT = {
    "retrain_enable": True,
    "retrain_data_config": {"algo": "ulq_quantize", "fixed_min": False},
    "retrain_weight_config": {"algo": "arq_retrain", "channel_wise": True},
}
IP_DEFAULT = {
    "retrain_enable": True,
    "retrain_data_config": {"algo": "ulq_quantize", "fixed_min": False},
    "retrain_weight_config": {"algo": "arq_retrain", "channel_wise": False},
}
DEFAULT_JSON = {"version": 1, "batch_num": 1, "conv1": CONV_DEFAULT, "conv2": CONV_DEFAULT,
                "ip1": IP_DEFAULT, "ip2": IP_DEFAULT}


def parse_net(text: str) -> caffe_pb2.NetParameter:
    return text_format.Parse(text, caffe_pb2.NetParameter())


@pytest.fixture
def files(tmp_path):
    """(model, weights) for NET; the weights file only has to exist."""
    model = tmp_path / "model.prototxt"
    model.write_text(NET)
    weights = tmp_path / "model.caffemodel"
    weights.write_bytes(b"\x00not really a caffemodel")
    return model, weights


@pytest.fixture
def broken_files(tmp_path):
    model = tmp_path / "broken.prototxt"
    model.write_text(BROKEN_NET)
    weights = tmp_path / "broken.caffemodel"
    weights.write_bytes(b"")
    return model, weights


def create(tmp_path, files, definition_text=None, ext=".yaml", name="out.json"):
    """Run create_quant_retrain_config, return the JSON written as (dict, raw text)."""
    model, weights = files
    definition = None
    if definition_text is not None:
        definition = tmp_path / f"simple{ext}"
        definition.write_text(definition_text)
    out = tmp_path / name
    create_quant_retrain_config(out, model, weights, definition)
    text = out.read_text()
    return json.loads(text), text


# --------------------------------------------------------------------------- rules and net reading


def test_quantizable_layers_in_net_order_once():
    names, broken = quantizable_layers(parse_net(NET))
    assert names == QUANT, f"quantizable layers {names} != {QUANT}"
    assert broken == {}, f"NET has no broken layer, got {broken}"


def test_duplicate_layer_names_listed_once():
    net = parse_net(NET + """
        layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" include { phase: TEST }
                convolution_param { num_output: 4 kernel_size: 3 } }""")
    names, _ = quantizable_layers(net)
    assert names == QUANT, f"conv1 listed twice in the net must appear once: {names}"


def test_broken_constraints_reported_as_text():
    names, broken = quantizable_layers(parse_net(BROKEN_NET))
    assert names == ["conv_ok"], f"only conv_ok (kernel_h/kernel_w) is quantizable, got {names}"
    assert set(broken) == {"conv3d", "ip_t", "ip_ax"}, f"broken layers {broken}"
    assert "4-D" in broken["conv3d"], f"conv3d reason {broken['conv3d']!r}"
    assert "transpose" in broken["ip_t"], f"ip_t reason {broken['ip_t']!r}"
    assert "axis" in broken["ip_ax"], f"ip_ax reason {broken['ip_ax']!r}"


def test_rules_are_data_a_new_type_is_one_entry(monkeypatch, tmp_path):
    # What a later issue does for Deconvolution: add an entry, nothing else.
    monkeypatch.setitem(QUANTIZABLE_RULES, "Deconvolution", QuantRule(
        layer_type="Deconvolution",
        constraints=(Constraint("group must be 1", lambda l: l.convolution_param.group == 1),),
        channel_wise_allowed=True, channel_wise_default=True, channel_axis=1))
    net_text = NET + """
        layer { name: "up" type: "Deconvolution" bottom: "conv2" top: "up"
                convolution_param { num_output: 4 kernel_size: 2 stride: 2 } }
        layer { name: "up_g" type: "Deconvolution" bottom: "conv2" top: "up_g"
                convolution_param { num_output: 4 kernel_size: 2 group: 2 } }"""
    names, broken = quantizable_layers(parse_net(net_text))
    assert names == QUANT + ["up"], f"the new type's valid layer is quantizable: {names}"
    assert broken == {"up_g": "group must be 1"}, f"the new type's constraint applies: {broken}"
    model = tmp_path / "m.prototxt"
    model.write_text(net_text)
    weights = tmp_path / "w.caffemodel"
    weights.write_bytes(b"")
    data, _ = create(tmp_path, (model, weights))
    assert data["up"]["retrain_weight_config"]["channel_wise"] is True, f"Deconvolution entry: {data.get('up')}"


# --------------------------------------------------------------------------- generation


def test_default_json(tmp_path, files):
    data, text = create(tmp_path, files)
    assert data == DEFAULT_JSON, f"default JSON:\n{text}"
    assert list(data) == ["version", "batch_num", *QUANT], f"key order {list(data)}"


def test_broken_layers_left_out_with_warning(tmp_path, broken_files, caplog):
    with caplog.at_level(logging.WARNING, logger="amct_retrain.config"):
        data, text = create(tmp_path, broken_files)
    assert list(data) == ["version", "batch_num", "conv_ok"], f"only conv_ok is configured:\n{text}"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for layer, reason in [("conv3d", "4-D"), ("ip_t", "transpose"), ("ip_ax", "axis")]:
        assert any(layer in w and reason in w for w in warnings), f"no warning naming {layer} / {reason}: {warnings}"


FULL_YAML = """\
batch_num: 4
skip_layers: [conv1]
quant_skip_layers: []
skip_layer_types: []
retrain_data_quant_config:
  ulq_quantize:
    clip_max_min: {clip_max: 6.0, clip_min: -6.0}
    fixed_min: true
retrain_weight_quant_config:
  arq_retrain: {channel_wise: false}
override_layer_types:
  - layer_type: InnerProduct
    retrain_data_quant_config:
      ulq_quantize: {clip_max_min: {clip_max: 4.5, clip_min: -0.1}}
override_layer_configs:
  - layer_name: ip2
    retrain_data_quant_config:
      ulq_quantize: {clip_max_min: {clip_max: 3, clip_min: 0}, fixed_min: true}
    retrain_weight_quant_config:
      arq_retrain: {channel_wise: false}
"""

FULL_CFG = """\
batch_num: 4
skip_layers: "conv1"
retrain_data_quant_config {
  ulq_quantize { clip_max_min { clip_max: 6.0 clip_min: -6.0 } fixed_min: true }
}
retrain_weight_quant_config { arq_retrain { channel_wise: false } }
override_layer_types {
  layer_type: "InnerProduct"
  retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: 4.5 clip_min: -0.1 } } }
}
# a comment, as the original .cfg files have
override_layer_configs {
  layer_name: "ip2"
  retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: 3 clip_min: 0 } fixed_min: true } }
  retrain_weight_quant_config { arq_retrain { channel_wise: false } }
}
"""


def test_yaml_and_cfg_give_identical_json(tmp_path, files):
    _, yaml_text = create(tmp_path, files, FULL_YAML, ".yaml", "from_yaml.json")
    _, cfg_text = create(tmp_path, files, FULL_CFG, ".cfg", "from_cfg.json")
    assert yaml_text == cfg_text, f"YAML and .cfg outputs differ:\n{yaml_text}\n---\n{cfg_text}"
    data = json.loads(yaml_text)
    assert data["batch_num"] == 4, f"batch_num {data['batch_num']}"
    assert "conv1" not in data, "conv1 is skipped"
    assert data["ip1"]["retrain_data_config"] == {"algo": "ulq_quantize", "clip_max": 4.5, "clip_min": -0.1,
                                                  "fixed_min": False}, f"ip1 {data['ip1']}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lo=st.floats(-1e6, 0.0), hi=st.floats(0.0, 1e6), fixed_min=st.booleans())
def test_clips_exact_through_yaml_cfg_json_and_load(tmp_path, files, lo, hi, fixed_min):
    if lo == hi:  # both 0: an empty range is an error, tested elsewhere
        return
    body = {"clip_max": repr(hi), "clip_min": repr(lo)}
    yaml_text = (f"retrain_data_quant_config: {{ulq_quantize: {{clip_max_min: "
                 f"{{clip_max: {body['clip_max']}, clip_min: {body['clip_min']}}}, "
                 f"fixed_min: {str(fixed_min).lower()}}}}}\n")
    cfg_text = (f"retrain_data_quant_config {{ ulq_quantize {{ clip_max_min {{ clip_max: {body['clip_max']} "
                f"clip_min: {body['clip_min']} }} fixed_min: {str(fixed_min).lower()} }} }}\n")
    _, from_yaml = create(tmp_path, files, yaml_text, ".yaml", "y.json")
    _, from_cfg = create(tmp_path, files, cfg_text, ".cfg", "c.json")
    assert from_yaml == from_cfg, f"YAML and .cfg differ for clips ({lo!r}, {hi!r}):\n{from_yaml}\n{from_cfg}"
    layer = load_retrain_config(tmp_path / "y.json", parse_net(NET)).layers["ip1"]
    assert (layer.clip_min, layer.clip_max, layer.fixed_min) == (lo, hi, fixed_min), \
        f"clips not exact: {layer} vs ({lo!r}, {hi!r}, {fixed_min})"


def test_yaml_exponent_floats_are_numbers(tmp_path, files):
    data, _ = create(tmp_path, files,
                     "retrain_data_quant_config: {ulq_quantize: {clip_max_min: {clip_max: 1e-5, clip_min: -2E1}}}\n")
    d = data["conv1"]["retrain_data_config"]
    assert (d["clip_max"], d["clip_min"]) == (1e-5, -20.0), f"1e-5 / -2E1 read as numbers (YAML 1.2): {d}"


def test_yml_extension_accepted(tmp_path, files):
    data, _ = create(tmp_path, files, "batch_num: 2\n", ".yml")
    assert data["batch_num"] == 2, f"batch_num from .yml: {data['batch_num']}"


def test_empty_definition_gives_defaults(tmp_path, files):
    data, _ = create(tmp_path, files, "", ".yaml")
    assert data == DEFAULT_JSON, f"an empty YAML is all defaults: {data}"


def test_precedence_layer_over_type_over_global(tmp_path, files):
    data, text = create(tmp_path, files, """
retrain_data_quant_config: {ulq_quantize: {clip_max_min: {clip_max: 6, clip_min: -6}, fixed_min: true}}
retrain_weight_quant_config: {arq_retrain: {channel_wise: false}}
override_layer_types:
  - layer_type: InnerProduct
    retrain_data_quant_config: {ulq_quantize: {clip_max_min: {clip_max: 4, clip_min: -4}}}
  - layer_type: Convolution
    retrain_data_quant_config: {ulq_quantize: {fixed_min: false}}
override_layer_configs:
  - layer_name: ip2
    retrain_data_quant_config: {ulq_quantize: {clip_max_min: {clip_max: 3, clip_min: 0}}}
  - layer_name: conv2
    retrain_weight_quant_config: {arq_retrain: {channel_wise: true}}
""")
    d = {name: data[name]["retrain_data_config"] for name in QUANT}
    w = {name: data[name]["retrain_weight_config"]["channel_wise"] for name in QUANT}
    # conv: type override's data block (no clips: IFMR), global weights (per-tensor) ...
    assert d["conv1"] == {"algo": "ulq_quantize", "fixed_min": False}, f"conv1 data (type > global):\n{text}"
    assert w["conv1"] is False, f"conv1 channel_wise (global):\n{text}"
    # ... except conv2, whose layer override wins for the weights.
    assert w["conv2"] is True, f"conv2 channel_wise (layer > global):\n{text}"
    assert d["conv2"] == d["conv1"], f"conv2 data follows its type:\n{text}"
    assert d["ip1"] == {"algo": "ulq_quantize", "clip_max": 4.0, "clip_min": -4.0, "fixed_min": False}, \
        f"ip1 data (type > global; the block replaces the global one whole):\n{text}"
    assert d["ip2"] == {"algo": "ulq_quantize", "clip_max": 3.0, "clip_min": 0.0, "fixed_min": False}, \
        f"ip2 data (layer > type):\n{text}"
    assert w["ip1"] is False and w["ip2"] is False, f"InnerProduct stays per-tensor:\n{text}"


def test_global_channel_wise_true_does_not_reach_innerproduct(tmp_path, files):
    data, _ = create(tmp_path, files, "retrain_weight_quant_config: {arq_retrain: {channel_wise: true}}\n")
    cw = {name: data[name]["retrain_weight_config"]["channel_wise"] for name in QUANT}
    assert cw == {"conv1": True, "conv2": True, "ip1": False, "ip2": False}, f"channel_wise {cw}"


def test_skip_layers_union_quant_skip_layers(tmp_path, files):
    data, _ = create(tmp_path, files, "skip_layers: [conv1, relu1]\nquant_skip_layers: [ip2, conv1]\n")
    assert [k for k in data if k in QUANT] == ["conv2", "ip1"], f"skip_layers ∪ quant_skip_layers: {list(data)}"


def test_skip_layer_types(tmp_path, files):
    data, _ = create(tmp_path, files, 'skip_layer_types: "InnerProduct"\n', ".cfg")
    assert [k for k in data if k in QUANT] == ["conv1", "conv2"], f"InnerProduct skipped: {list(data)}"


def test_skipped_and_overridden_layer_is_skipped_with_warning(tmp_path, files, caplog):
    with caplog.at_level(logging.WARNING, logger="amct_retrain.config"):
        data, _ = create(tmp_path, files, "skip_layers: [ip1]\noverride_layer_configs: [{layer_name: ip1}]\n")
    assert "ip1" not in data, f"skip wins: {list(data)}"
    assert any("ip1" in r.getMessage() for r in caplog.records), "a warning names ip1"


# --------------------------------------------------------------------------- generation errors

# (id, definition file extension, definition text, substrings the message must hold besides the file name)
CREATE_ERRORS = [
    ("unknown-field", ".yaml", "foo: 1\n", ["foo", "unknown"]),
    ("unknown-nested-field", ".yaml", "retrain_data_quant_config: {ulq_quantize: {clip: 1}}\n",
     ["retrain_data_quant_config.ulq_quantize.clip"]),
    ("unknown-field-in-override", ".yaml", "override_layer_configs: [{layer_name: conv1, typo: 1}]\n",
     ["override_layer_configs[0].typo"]),
    ("unknown-field-cfg", ".cfg", "batch_num: 2\nfoo: 1\n", ["foo", ":2:"]),
    ("wrong-type-batch-num", ".yaml", "batch_num: '2'\n", ["batch_num", "integer"]),
    ("wrong-type-bool-as-number", ".yaml",
     "retrain_data_quant_config: {ulq_quantize: {clip_max_min: {clip_max: true, clip_min: 0}}}\n",
     ["clip_max_min.clip_max", "number"]),
    ("wrong-type-channel-wise", ".yaml", "retrain_weight_quant_config: {arq_retrain: {channel_wise: 1}}\n",
     ["channel_wise", "boolean"]),
    ("wrong-type-list", ".yaml", "skip_layers: conv1\n", ["skip_layers", "list"]),
    ("wrong-type-cfg", ".cfg", 'batch_num: "a"\n', ["batch_num"]),
    ("batch-num-zero", ".yaml", "batch_num: 0\n", ["batch_num", ">= 1"]),
    ("batch-num-negative", ".yaml", "batch_num: -1\n", ["batch_num", "range"]),
    ("skip-layer-missing", ".yaml", "skip_layers: [conv1, nope]\n", ["skip_layers[1]", "nope"]),
    ("quant-skip-layer-missing", ".cfg", 'quant_skip_layers: "nope"\n', ["quant_skip_layers[0]", "nope"]),
    ("override-layer-missing", ".yaml", "override_layer_configs: [{layer_name: nope}]\n",
     ["override_layer_configs[0].layer_name", "nope"]),
    ("override-layer-without-name", ".yaml", "override_layer_configs: [{}]\n",
     ["override_layer_configs[0].layer_name", "required"]),
    ("override-layer-not-quantizable", ".yaml", "override_layer_configs: [{layer_name: relu1}]\n",
     ["relu1", "not quantizable"]),
    ("override-type-not-quantizable", ".yaml", "override_layer_types: [{layer_type: ReLU}]\n",
     ["override_layer_types[0].layer_type", "ReLU"]),
    ("clip-min-ge-clip-max", ".yaml",
     "retrain_data_quant_config: {ulq_quantize: {clip_max_min: {clip_max: -1, clip_min: -1}}}\n",
     ["retrain_data_quant_config.ulq_quantize.clip_max_min.clip_min"]),
    ("clip-min-ge-clip-max-in-layer-override", ".cfg",
     'override_layer_configs { layer_name: "conv2" retrain_data_quant_config { ulq_quantize {'
     ' clip_max_min { clip_max: 1 clip_min: 2 } } } }\n', ["conv2", "clip_min"]),
    ("clip-range-without-zero", ".yaml",
     "retrain_data_quant_config: {ulq_quantize: {clip_max_min: {clip_max: 3, clip_min: 1}}}\n",
     ["clip_min", "contain 0"]),
    ("clip-max-only", ".yaml", "retrain_data_quant_config: {ulq_quantize: {clip_max_min: {clip_max: 3}}}\n",
     ["clip_max_min.clip_min", "both"]),
    ("channel-wise-ip-type", ".yaml",
     "override_layer_types: [{layer_type: InnerProduct, retrain_weight_quant_config: "
     "{arq_retrain: {channel_wise: true}}}]\n", ["override_layer_types[0]", "channel_wise", "InnerProduct"]),
    ("channel-wise-ip-layer", ".yaml",
     "override_layer_configs: [{layer_name: ip1, retrain_weight_quant_config: "
     "{arq_retrain: {channel_wise: true}}}]\n", ["ip1", "channel_wise"]),
    ("duplicate-override", ".yaml", "override_layer_configs: [{layer_name: ip1}, {layer_name: ip1}]\n",
     ["override_layer_configs[1]", "ip1"]),
    ("duplicate-yaml-key", ".yaml", "batch_num: 1\nbatch_num: 2\n", ["batch_num", "duplicate", ":2:"]),
    ("yaml-syntax", ".yaml", "skip_layers: [conv1\n", ["invalid YAML"]),
    ("yaml-not-a-mapping", ".yaml", "- conv1\n", ["mapping"]),
    ("bad-extension", ".json", "{}", [".json", "extension"]),
]


@pytest.mark.parametrize("ext,text,expected", [c[1:] for c in CREATE_ERRORS], ids=[c[0] for c in CREATE_ERRORS])
def test_create_errors_name_file_and_key(tmp_path, files, ext, text, expected):
    definition = tmp_path / f"simple{ext}"
    definition.write_text(text)
    out = tmp_path / "out.json"
    with pytest.raises(ConfigError) as e:
        create_quant_retrain_config(out, *files, definition)
    msg = str(e.value)
    assert str(definition) in msg, f"message does not name {definition}: {msg}"
    for part in expected:
        assert part in msg, f"message does not contain {part!r}: {msg}"
    assert not out.exists(), "a failing create must not write the output"


@pytest.mark.parametrize("layer", ["conv3d", "ip_t"])
def test_overriding_a_broken_layer_is_an_error(tmp_path, broken_files, layer):
    definition = tmp_path / "simple.yaml"
    definition.write_text(f"override_layer_configs: [{{layer_name: {layer}}}]\n")
    with pytest.raises(ConfigError) as e:
        create_quant_retrain_config(tmp_path / "out.json", *broken_files, definition)
    msg = str(e.value)
    assert str(definition) in msg and layer in msg, f"message must name the file and {layer}: {msg}"
    assert "cannot be quantized" in msg, f"message must give the constraint: {msg}"


def test_missing_weights_file_is_named(tmp_path, files):
    model, _ = files
    weights = tmp_path / "absent.caffemodel"
    with pytest.raises(ConfigError) as e:
        create_quant_retrain_config(tmp_path / "out.json", model, weights)
    assert str(weights) in str(e.value), f"message must name the weights file: {e.value}"


def test_missing_definition_file_is_named(tmp_path, files):
    definition = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as e:
        create_quant_retrain_config(tmp_path / "out.json", *files, definition)
    assert str(definition) in str(e.value), f"message must name the definition file: {e.value}"


def test_refuses_to_overwrite_an_input(tmp_path, files):
    model, weights = files
    before = model.read_bytes()
    with pytest.raises(OutputPathError) as e:
        create_quant_retrain_config(model, model, weights)
    assert str(model) in str(e.value), f"message: {e.value}"
    assert model.read_bytes() == before, "the model must be untouched"


def test_failing_create_keeps_existing_output(tmp_path, files):
    out = tmp_path / "out.json"
    out.write_text('{"previous": true}\n')
    before = sorted(os.listdir(tmp_path))
    definition = tmp_path / "simple.yaml"
    definition.write_text("skip_layers: [nope]\n")
    with pytest.raises(ConfigError):
        create_quant_retrain_config(out, *files, definition)
    assert out.read_text() == '{"previous": true}\n', "an existing output must be untouched by a failure"
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["simple.yaml"]), \
        f"no temp file may be left behind: {os.listdir(tmp_path)}"


def test_failing_create_does_not_create_output_folder(tmp_path, files):
    out = tmp_path / "new" / "out.json"
    definition = tmp_path / "simple.yaml"
    definition.write_text("batch_num: 0\n")
    with pytest.raises(ConfigError):
        create_quant_retrain_config(out, *files, definition)
    assert not out.parent.exists(), "validation fails before anything is created"


def test_inputs_are_byte_identical(tmp_path, files):
    model, weights = files
    definition = tmp_path / "simple.yaml"
    definition.write_text(FULL_YAML)
    before = [p.read_bytes() for p in (model, weights, definition)]
    mtimes = [p.stat().st_mtime_ns for p in (model, weights, definition)]
    create_quant_retrain_config(tmp_path / "out.json", model, weights, definition)
    assert [p.read_bytes() for p in (model, weights, definition)] == before, "inputs changed"
    assert [p.stat().st_mtime_ns for p in (model, weights, definition)] == mtimes, "inputs were rewritten"


def test_missing_output_folder_is_created(tmp_path, files):
    out = tmp_path / "a" / "b" / "retrain.json"
    create_quant_retrain_config(str(out), str(files[0]), str(files[1]))
    assert json.loads(out.read_text()) == DEFAULT_JSON, "output written into the created folder"
    assert os.listdir(out.parent) == ["retrain.json"], f"only the output in the folder: {os.listdir(out.parent)}"


def test_existing_output_replaced_whole(tmp_path, files):
    out = tmp_path / "out.json"
    out.write_text("x" * 10000)
    create_quant_retrain_config(out, *files)
    assert json.loads(out.read_text()) == DEFAULT_JSON, "output fully replaced"


# --------------------------------------------------------------------------- loading


def write_json(tmp_path, data, name="retrain.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data, indent=2))
    return path


def test_load_round_trip(tmp_path, files):
    data, _ = create(tmp_path, files, FULL_YAML)
    rc = load_retrain_config(tmp_path / "out.json", parse_net(NET))
    assert rc.batch_num == 4 and rc.log_dir is None, f"batch_num/log_dir {rc.batch_num}, {rc.log_dir}"
    assert list(rc.layers) == ["conv2", "ip1", "ip2"], f"layers {list(rc.layers)}"
    assert rc.layers["conv2"] == LayerQuantConfig("Convolution", -6.0, 6.0, True, False), f"conv2 {rc.layers['conv2']}"
    assert rc.layers["ip1"] == LayerQuantConfig("InnerProduct", -0.1, 4.5, False, False), f"ip1 {rc.layers['ip1']}"
    assert rc.layers["ip2"] == LayerQuantConfig("InnerProduct", 0.0, 3.0, True, False), f"ip2 {rc.layers['ip2']}"


def test_load_default_net_order_disabled_and_log_dir(tmp_path):
    data = {"ip2": IP_DEFAULT, "version": 1, "log_dir": "runs/q", "conv1": CONV_DEFAULT,
            "ip1": {"retrain_enable": False}, "relu1": {"retrain_enable": False}}
    rc = load_retrain_config(write_json(tmp_path, data), parse_net(NET))
    assert list(rc.layers) == ["conv1", "ip2"], f"enabled layers in net order: {list(rc.layers)}"
    assert rc.batch_num == 1, f"batch_num defaults to 1: {rc.batch_num}"
    assert rc.log_dir == "runs/q", f"log_dir {rc.log_dir!r}"
    assert rc.layers["conv1"] == LayerQuantConfig("Convolution", None, None, False, True), f"{rc.layers['conv1']}"


def test_load_contract_example(tmp_path):
    path = tmp_path / "contract.json"
    path.write_text('{"version": 1,\n "batch_num": 1,\n "conv1": {"retrain_enable": true,\n'
                    '  "retrain_data_config": {"algo": "ulq_quantize", "clip_max": 6.0, "clip_min": -6.0,'
                    ' "fixed_min": false},\n'
                    '  "retrain_weight_config": {"algo": "arq_retrain", "channel_wise": true}}}\n')
    rc = load_retrain_config(path, parse_net(NET))
    assert rc.layers == {"conv1": LayerQuantConfig("Convolution", -6.0, 6.0, False, True)}, f"{rc.layers}"


def _set(data, keys, value):
    """Copy of ``data`` with data[k0][k1]... = value (value DELETE removes the key)."""
    data = json.loads(json.dumps(data))  # not deepcopy: it would keep conv1 and conv2 one shared dict
    obj = data
    for k in keys[:-1]:
        obj = obj[k]
    if value is DELETE:
        del obj[keys[-1]]
    else:
        obj[keys[-1]] = value
    return data


DELETE = object()
CLIPS = {"algo": "ulq_quantize", "clip_max": 6.0, "clip_min": -6.0, "fixed_min": False}

# (id, path of keys to change in DEFAULT_JSON, new value, substrings besides the file name)
LOAD_ERRORS = [
    ("version-2", ["version"], 2, ["version", "unsupported"]),
    ("version-missing", ["version"], DELETE, ["version", "missing"]),
    ("version-string", ["version"], "1", ["version", "integer"]),
    ("unknown-top-level-key", ["foo"], 1, ["foo", "no layer named"]),
    ("unknown-layer-key", ["conv1", "retrain_enabled"], True, ["conv1", "retrain_enabled"]),
    ("unknown-data-key", ["conv1", "retrain_data_config", "clipmax"], 1.0,
     ["conv1", "retrain_data_config.clipmax"]),
    ("unknown-weight-key", ["ip1", "retrain_weight_config", "per_channel"], False,
     ["ip1", "retrain_weight_config.per_channel"]),
    ("retrain-enable-string", ["conv1", "retrain_enable"], "yes", ["conv1", "retrain_enable", "boolean"]),
    ("retrain-enable-missing", ["conv1", "retrain_enable"], DELETE, ["conv1", "retrain_enable"]),
    ("clip-bool", ["conv1", "retrain_data_config"], {**CLIPS, "clip_max": True},
     ["conv1", "retrain_data_config.clip_max", "number"]),
    ("clip-string", ["conv1", "retrain_data_config"], {**CLIPS, "clip_min": "-6"},
     ["conv1", "retrain_data_config.clip_min"]),
    ("fixed-min-int", ["conv2", "retrain_data_config", "fixed_min"], 0, ["conv2", "fixed_min", "boolean"]),
    ("channel-wise-string", ["conv1", "retrain_weight_config", "channel_wise"], "true",
     ["conv1", "channel_wise"]),
    ("batch-num-float", ["batch_num"], 1.5, ["batch_num", "integer"]),
    ("batch-num-bool", ["batch_num"], True, ["batch_num", "integer"]),
    ("batch-num-zero", ["batch_num"], 0, ["batch_num", ">= 1"]),
    ("log-dir-number", ["log_dir"], 3, ["log_dir", "string"]),
    ("layer-not-object", ["conv1"], True, ["conv1", "object"]),
    ("layer-missing-from-model", ["nope"], CONV_DEFAULT, ["nope", "no layer named"]),
    ("layer-not-quantizable", ["relu1"], CONV_DEFAULT, ["relu1", "not quantizable", "ReLU"]),
    ("data-algo", ["conv1", "retrain_data_config", "algo"], "ifmr", ["conv1", "retrain_data_config.algo", "ifmr"]),
    ("weight-algo", ["ip2", "retrain_weight_config", "algo"], "nuq", ["ip2", "retrain_weight_config.algo"]),
    ("data-config-missing", ["conv1", "retrain_data_config"], DELETE, ["conv1", "retrain_data_config"]),
    ("weight-config-missing", ["conv1", "retrain_weight_config"], DELETE, ["conv1", "retrain_weight_config"]),
    ("only-clip-min", ["conv1", "retrain_data_config", "clip_min"], -1.0,
     ["conv1", "retrain_data_config.clip_max", "together"]),
    ("only-clip-max", ["ip1", "retrain_data_config", "clip_max"], 1.0, ["ip1", "retrain_data_config.clip_min"]),
    ("clip-min-ge-max", ["conv1", "retrain_data_config"], {**CLIPS, "clip_min": 2.0, "clip_max": 2.0},
     ["conv1", "clip_min", "less than"]),
    ("clip-min-positive", ["conv1", "retrain_data_config"], {**CLIPS, "clip_min": 1.0, "clip_max": 2.0},
     ["conv1", "clip_min", "contain 0"]),
    ("clip-max-negative", ["conv1", "retrain_data_config"], {**CLIPS, "clip_min": -2.0, "clip_max": -1.0},
     ["conv1", "clip_max", "contain 0"]),
    ("clip-nan", ["conv1", "retrain_data_config"], {**CLIPS, "clip_max": float("nan")},
     ["conv1", "clip_max", "finite"]),
    ("channel-wise-ip", ["ip1", "retrain_weight_config", "channel_wise"], True,
     ["ip1", "channel_wise", "InnerProduct"]),
]


@pytest.mark.parametrize("keys,value,expected", [c[1:] for c in LOAD_ERRORS], ids=[c[0] for c in LOAD_ERRORS])
def test_load_errors_name_file_layer_and_key(tmp_path, keys, value, expected):
    path = write_json(tmp_path, _set(DEFAULT_JSON, keys, value))
    with pytest.raises(ConfigError) as e:
        load_retrain_config(path, parse_net(NET))
    msg = str(e.value)
    assert str(path) in msg, f"message does not name {path}: {msg}"
    for part in expected:
        assert part in msg, f"message does not contain {part!r}: {msg}"


@pytest.mark.parametrize("layer,reason", [("conv3d", "4-D"), ("ip_t", "transpose")])
def test_load_rejects_layer_breaking_a_constraint(tmp_path, layer, reason):
    path = write_json(tmp_path, {"version": 1, layer: CONV_DEFAULT if layer == "conv3d" else IP_DEFAULT})
    with pytest.raises(ConfigError) as e:
        load_retrain_config(path, parse_net(BROKEN_NET))
    msg = str(e.value)
    assert str(path) in msg and layer in msg and reason in msg, f"must name file, {layer} and {reason!r}: {msg}"


def test_load_invalid_json_has_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"version": 1,\n "batch_num": 1,\n "conv1": {"retrain_enable": tru}}\n')
    with pytest.raises(ConfigError) as e:
        load_retrain_config(path, parse_net(NET))
    assert str(e.value).startswith(f"{path}:3:"), f"expected FILE:LINE:COL: {e.value}"


def test_load_duplicate_key(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"version": 1, "conv1": {"retrain_enable": false}, "conv1": {"retrain_enable": false}}')
    with pytest.raises(ConfigError) as e:
        load_retrain_config(path, parse_net(NET))
    assert str(path) in str(e.value) and "conv1" in str(e.value), f"message: {e.value}"


def test_load_missing_file(tmp_path):
    path = tmp_path / "absent.json"
    with pytest.raises(ConfigError) as e:
        load_retrain_config(path, parse_net(NET))
    assert str(path) in str(e.value), f"message: {e.value}"


def test_load_top_level_not_object(tmp_path):
    path = write_json(tmp_path, [1, 2])
    with pytest.raises(ConfigError) as e:
        load_retrain_config(path, parse_net(NET))
    assert str(path) in str(e.value) and "object" in str(e.value), f"message: {e.value}"


def test_public_names_exported():
    for name in ["ConfigError", "QUANTIZABLE_RULES", "quantizable_layers", 
                 "create_quant_retrain_config", "load_retrain_config", "RetrainConfig", "LayerQuantConfig"]:
        assert hasattr(cfg, name) and name in cfg.__all__, f"{name} missing from amct_retrain.config"
