"""Bit widths 2 to 8 through retraining and calibration in real Caffe: the fake-quant model on the
b-bit grids, the deploy model's int8 containers holding b-bit codes, the record and the quant info
file naming the widths, and the integer executor (and the exact ONNX export) equal to the
fake-quant model at every width."""
import json

import caffe
import numpy as np
import pytest
from google.protobuf import text_format

import amct_retrain
from amct_retrain import numerics, record
from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.errors import ModelError
from amct_retrain.reference import saved_model_parity
from amct_retrain.saved_models import read_deploy_blobs
from amct_retrain.saver import output_files
from tests import nets

pytestmark = pytest.mark.caffe


def with_bits(config_file, blocks: tuple[str, str], bits: tuple[int, int], layers=None) -> None:
    """Set ``num_bits`` in the activation and weight blocks of the layer entries of a JSON config."""
    data = json.loads(config_file.read_text())
    for name, entry in data.items():
        if isinstance(entry, dict) and (layers is None or name in layers):
            for block, b in zip(blocks, bits):
                entry[block]["num_bits"] = b
    config_file.write_text(json.dumps(data))


def retrain_at(tmp_path, num_bits_w: int, num_bits_d: int, iters: int = 6) -> dict:
    """nets.FLOAT_NET (a per-channel conv, a grouped conv without bias, an FC) retrained at
    W``num_bits_w``A``num_bits_d`` and saved; the files by role."""
    return nets.retrain_float_model(tmp_path, iters, lambda config: with_bits(
        config, ("retrain_data_config", "retrain_weight_config"), (num_bits_d, num_bits_w)), "small")


@pytest.mark.parametrize("num_bits", [2, 4, 8])
def test_retrained_at_b_bits_the_integer_executor_equals_the_fake_quant_model(tmp_path, num_bits):
    f = retrain_at(tmp_path, num_bits, num_bits)
    bw = numerics.bit_width(num_bits)
    worst = saved_model_parity(f["save_path"], str(f["record"]))
    assert max(worst.values()) <= 1.0, f"{num_bits} bits: integer executor vs fake-quant, output steps: {worst}"

    records = record.read_record(f["record"])
    info = json.loads(open(f["quant_info"]).read())["quantized_layers"]
    deploy = read_deploy_blobs(f["deploy_weights"])
    for layer in nets.QUANTIZED:
        assert record.bit_widths(records[layer]) == (num_bits, num_bits), f"{layer}: record {records[layer]}"
        assert records[layer].HasField("num_bits_d") == (num_bits != 8), "8 bits must be stored as absent"
        assert (info[layer].get("num_bits_d", 8), info[layer].get("num_bits_w", 8)) == (num_bits, num_bits), info
        codes = np.frombuffer(deploy[layer][0].int8_data, np.int8)
        assert bw.code_min <= codes.min() and codes.max() <= bw.code_max, \
            f"{layer}: int8 weights hold codes {codes.min()}..{codes.max()}, not {num_bits}-bit ones"
        assert codes.min() == bw.code_min or codes.max() == bw.code_max, "the b-bit range is not used"
    retrained = text_format.Parse(f["model"].read_text(), caffe_pb2.NetParameter())
    ulq = next(layer for layer in retrained.layer if layer.name == "conv1_ulq")
    assert ("num_bits_d" in ulq.python_param.param_str) == (num_bits != 8), "an 8-bit layer's param_str changed"

    fake = caffe.Net(f["fake_quant_model"], caffe.TEST, weights=f["fake_quant_weights"])
    fake.forward()
    quantized_input = fake.blobs["conv1_input_fake_quant"].data
    assert np.unique(quantized_input).size <= 2 ** num_bits, "the fake-quant input has more than 2^b levels"
    w = fake.params["conv1"][0].data
    scale_w = np.asarray(records["conv1"].scale_w, np.float32).reshape(-1, 1, 1, 1)
    assert np.abs(np.rint(w / scale_w)).max() <= 2 ** (num_bits - 1)


def test_retrained_w4a8_keeps_8_bit_activations(tmp_path):
    f = retrain_at(tmp_path, 4, 8)
    records = record.read_record(f["record"])
    assert all(record.bit_widths(records[layer]) == (8, 4) for layer in nets.QUANTIZED)
    assert max(saved_model_parity(f["save_path"], str(f["record"])).values()) <= 1.0


def test_the_exact_onnx_export_is_the_integer_executor_at_4_bits(tmp_path):
    pytest.importorskip("onnxruntime")
    from amct_retrain.export import export_onnx
    from tests.onnx_checks import assert_exact_on_random_activations

    f = retrain_at(tmp_path, 4, 4)
    onnx_file = tmp_path / "small_exact.onnx"
    export_onnx(f["deploy_model"], f["deploy_weights"], onnx_file, mode="exact")
    compared = assert_exact_on_random_activations(f["deploy_model"], f["deploy_weights"], onnx_file)
    assert set(compared) == set(nets.QUANTIZED)
    # The standard (8-bit QDQ) form cannot clip codes to 4 bits: refused, not written wrong.
    standard_file = tmp_path / "small_standard.onnx"
    with pytest.raises(ModelError, match="4 bits.*mode='exact'"):
        export_onnx(f["deploy_model"], f["deploy_weights"], standard_file)
    assert not standard_file.exists(), "a refused export left a file"


def test_calibration_at_4_bits_writes_4_bit_factors_and_an_exact_deploy_model(tmp_path):
    model, weights = nets.float_model(tmp_path)
    config, record_file = tmp_path / "calibration.json", tmp_path / "record.txt"
    amct_retrain.create_quant_config(str(config), str(model), str(weights))
    with_bits(config, ("activation_quant_params", "weight_quant_params"), (4, 4), layers={"conv2", "fc"})
    graph = amct_retrain.init(str(config), str(model), str(weights), str(record_file))
    files = [str(tmp_path / n) for n in ("calibration.prototxt", "calibration.caffemodel")]
    amct_retrain.quantize_model(graph, *files)
    caffe.Net(files[0], caffe.TEST, weights=files[1]).forward()
    save_path = str(tmp_path / "result" / "small")
    amct_retrain.save_model(graph, "Both", save_path)
    records = record.read_record(record_file)
    assert record.bit_widths(records["conv1"]) == (8, 8)
    for layer in ("conv2", "fc"):
        rec = records[layer]
        assert record.bit_widths(rec) == (4, 4), f"{layer}: {rec}"
        assert -8 <= rec.offset_d <= 7, f"{layer}: offset_d {rec.offset_d} is no 4-bit code"
    deploy = read_deploy_blobs(output_files(save_path)["deploy_weights"])
    codes = np.frombuffer(deploy["fc"][0].int8_data, np.int8)
    assert codes.min() >= -8 and codes.max() <= 7
    assert max(saved_model_parity(save_path, str(record_file)).values()) <= 1.0


# --------------------------------------------------------------------------- the configs' num_bits

RETRAIN_YAML = """retrain_data_quant_config: {ulq_quantize: {num_bits: 6}}
retrain_weight_quant_config: {arq_retrain: {num_bits: 5}}
override_layer_types:
  - layer_type: InnerProduct
    retrain_weight_quant_config: {arq_retrain: {channel_wise: false, num_bits: 3}}
override_layer_configs:
  - layer_name: conv2
    retrain_data_quant_config: {ulq_quantize: {num_bits: 2}}
"""
RETRAIN_CFG = """retrain_data_quant_config { ulq_quantize { num_bits: 6 } }
retrain_weight_quant_config { arq_retrain { num_bits: 5 } }
override_layer_types { layer_type: "InnerProduct"
  retrain_weight_quant_config { arq_retrain { channel_wise: false num_bits: 3 } } }
override_layer_configs { layer_name: "conv2" retrain_data_quant_config { ulq_quantize { num_bits: 2 } } }
"""
CALIBRATION_YAML = """common_config: {ifmr_quantize: {num_bits: 4}, arq_quantize: {num_bits: 6}}
override_layer_configs:
  - layer_name: fc
    calibration_config: {ifmr_quantize: {max_percentile: 0.9999}, arq_quantize: {num_bits: 2}}
"""


@pytest.mark.parametrize("suffix, text", [(".yaml", RETRAIN_YAML), (".cfg", RETRAIN_CFG)])
def test_simplified_retrain_config_sets_bits_globally_per_type_and_per_layer(tmp_path, suffix, text):
    from amct_retrain.config import load_retrain_config
    from amct_retrain.graph import model_io

    model, weights = nets.float_model(tmp_path)
    simplified, config = tmp_path / f"simplified{suffix}", tmp_path / "config.json"
    simplified.write_text(text)
    amct_retrain.create_quant_retrain_config(str(config), str(model), str(weights), str(simplified))
    layers = load_retrain_config(str(config), model_io.read_prototxt(str(model))).layers
    got = {name: (c.num_bits_d, c.num_bits_w) for name, c in layers.items()}
    # layer > type > global, whole blocks: conv2's data block has no clips and 2 bits; the FC's weights 3
    assert got == {"conv1": (6, 5), "conv2": (2, 5), "fc": (6, 3)}, got


def test_simplified_calibration_config_sets_bits_and_an_8_bit_one_writes_no_num_bits(tmp_path):
    from amct_retrain.config import load_calibration_config
    from amct_retrain.graph import model_io

    model, weights = nets.float_model(tmp_path)
    simplified, config = tmp_path / "simplified.yaml", tmp_path / "calibration.json"
    simplified.write_text(CALIBRATION_YAML)
    amct_retrain.create_quant_config(str(config), str(model), str(weights), config_defination=str(simplified))
    layers = load_calibration_config(str(config), model_io.read_prototxt(str(model))).layers
    got = {name: (c.num_bits_d, c.num_bits_w) for name, c in layers.items()}
    assert got == {"conv1": (4, 6), "conv2": (4, 6), "fc": (8, 2)}, got  # fc's own ifmr block: 8 bits
    amct_retrain.create_quant_config(str(config), str(model), str(weights))
    assert "num_bits" not in config.read_text(), "an 8-bit config must be written as before"


@pytest.mark.parametrize("where, text, key", [
    (".yaml", "retrain_data_quant_config: {ulq_quantize: {num_bits: 9}}\n",
     "retrain_data_quant_config.ulq_quantize.num_bits"),
    (".cfg", 'override_layer_configs { layer_name: "fc" retrain_weight_quant_config { arq_retrain { num_bits: 1 } } }',
     "override_layer_configs[0].retrain_weight_quant_config.arq_retrain.num_bits"),
    (".yaml", "retrain_data_quant_config: {ulq_quantize: {num_bits: four}}\n",
     "retrain_data_quant_config.ulq_quantize.num_bits"),
])
def test_a_bad_bit_width_in_a_simplified_config_names_the_file_and_key(tmp_path, where, text, key):
    model, weights = nets.float_model(tmp_path)
    simplified = tmp_path / f"simplified{where}"
    simplified.write_text(text)
    with pytest.raises(amct_retrain.ConfigError) as err:
        amct_retrain.create_quant_retrain_config(str(tmp_path / "c.json"), str(model), str(weights), str(simplified))
    assert str(simplified) in str(err.value) and key in str(err.value), str(err.value)
    assert not (tmp_path / "c.json").exists(), "a config was written despite the error"


@pytest.mark.parametrize("block, value, message", [
    ("retrain_data_config", 9, "must be a bit width in 2..8, got 9"),
    ("retrain_weight_config", 1, "must be a bit width in 2..8, got 1"),
    ("retrain_weight_config", 4.0, "expected an integer"),
])
def test_a_bad_bit_width_in_the_retrain_json_names_file_layer_and_key(tmp_path, block, value, message):
    model, weights = nets.float_model(tmp_path)
    config = tmp_path / "config.json"
    amct_retrain.create_quant_retrain_config(str(config), str(model), str(weights))
    data = json.loads(config.read_text())
    data["conv2"][block]["num_bits"] = value
    config.write_text(json.dumps(data))
    with pytest.raises(amct_retrain.ConfigError) as err:
        amct_retrain.create_quant_retrain_model(str(model), str(weights), str(config), str(tmp_path / "m.prototxt"),
                                                str(tmp_path / "m.caffemodel"), str(tmp_path / "r.txt"))
    text = str(err.value)
    assert str(config) in text and "conv2" in text and f"{block}.num_bits" in text and message in text, text
    assert not (tmp_path / "m.prototxt").exists()


def test_a_bad_bit_width_in_the_calibration_json_names_file_layer_and_key(tmp_path):
    model, weights = nets.float_model(tmp_path)
    config = tmp_path / "calibration.json"
    amct_retrain.create_quant_config(str(config), str(model), str(weights))
    data = json.loads(config.read_text())
    data["fc"]["activation_quant_params"]["num_bits"] = 16
    config.write_text(json.dumps(data))
    with pytest.raises(amct_retrain.ConfigError, match=r"layer 'fc'.*activation_quant_params\.num_bits.*2\.\.8"):
        amct_retrain.init(str(config), str(model), str(weights), str(tmp_path / "record.txt"))


def test_layers_sharing_an_activation_quantizer_must_share_its_bit_width(tmp_path):
    from tests.test_retrain_model import BRANCHED_NET

    model = tmp_path / "branched.prototxt"
    model.write_text(BRANCHED_NET)
    weights = tmp_path / "branched.caffemodel"
    caffe.Net(str(model), caffe.TEST).save(str(weights))
    config = tmp_path / "config.json"
    amct_retrain.create_quant_retrain_config(str(config), str(model), str(weights))
    with_bits(config, ("retrain_data_config", "retrain_weight_config"), (4, 4), layers={"branch_b"})
    with pytest.raises(amct_retrain.ConfigError, match="branch_b.*shares its activation quantizer"):
        amct_retrain.create_quant_retrain_model(str(model), str(weights), str(config), str(tmp_path / "m.prototxt"),
                                                str(tmp_path / "m.caffemodel"), str(tmp_path / "r.txt"))


def test_a_deploy_model_without_its_quant_info_file_is_read_as_8_bit_with_a_warning(tmp_path, caplog):
    from amct_retrain.saved_models import activation_bit_widths

    deploy_model = output_files(str(tmp_path / "model"))["deploy_model"]
    with caplog.at_level("WARNING", logger="amct_retrain.saved_models"):
        assert activation_bit_widths(deploy_model) == {}
    assert "no quant info file" in caplog.text and "8-bit" in caplog.text, caplog.text
    info = output_files(str(tmp_path / "model"))["quant_info"]
    with open(info, "w") as f:
        json.dump({"quantized_layers": {"conv1": {"num_bits_d": 4}, "ip1": {}}}, f)
    caplog.clear()
    assert activation_bit_widths(deploy_model) == {"conv1": 4, "ip1": 8}
    assert "no quant info file" not in caplog.text
