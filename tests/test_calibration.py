"""Post-training calibration and convert_model, in real Caffe (contract section 1)."""
import hashlib
import json
import shutil

import caffe
import numpy as np
import pytest

import amct_retrain
from amct_retrain import calibration, numerics, record
from amct_retrain.config import ConfigError, load_calibration_config
from amct_retrain.graph import quant_layers as ql
from amct_retrain.graph.model_io import ModelError, read_caffemodel, read_prototxt
from amct_retrain.layer_specs import ACTIVATION_OBSERVER
from amct_retrain.reference import saved_model_parity
from amct_retrain.saver import output_files
from samples import calibration_demo

pytestmark = pytest.mark.caffe

FLOAT_ITERS = 300
DIGITS_LAYERS = ("conv1", "conv2", "ip1", "ip2")


def digests(files: dict[str, str]) -> dict[str, str]:
    return {kind: hashlib.sha256(open(path, "rb").read()).hexdigest() for kind, path in files.items()}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The calibration demo: the digits CNN trained (300 iterations), calibrated (batch_num 2), saved."""
    out = tmp_path_factory.mktemp("calibration")
    return {"out": out, **calibration_demo.run(out, FLOAT_ITERS)}


def test_calibrated_int8_is_within_two_points_of_float(digits):
    acc = digits["accuracy"]
    assert acc["float"] > 0.9, f"the float model did not learn the digits: {acc}"
    loss = acc["float"] - acc["INT8 fake-quant, calibrated"]
    assert loss <= 0.02, f"calibrated INT8 loses {loss:.4f} (more than 2 points): {acc}"
    assert acc["INT8 deploy, integer executor"] == acc["INT8 fake-quant, calibrated"], \
        f"the integer executor disagrees with the fake-quant model: {acc}"
    records = record.read_record(digits["record"])
    assert set(records) == set(DIGITS_LAYERS) and all(record.layer_record_complete(r) for r in records.values()), \
        f"incomplete calibration record: {records}"


def test_integer_executor_matches_the_fake_quant_model_within_one_step(digits):
    worst = saved_model_parity(str(digits["save_path"]), str(digits["record"]))
    assert set(worst) == set(DIGITS_LAYERS) and max(worst.values()) <= 1.0, \
        f"integer executor vs fake-quant model, output steps per layer: {worst}"


def test_convert_model_with_the_calibration_record_reproduces_the_saved_files(digits, tmp_path):
    converted = str(tmp_path / "converted" / "digits")
    amct_retrain.convert_model(str(digits["float_model"]), str(digits["float_weights"]), str(digits["record"]),
                               converted)
    saved, made = digests(output_files(str(digits["save_path"]))), digests(output_files(converted))
    assert saved == made, f"convert_model's files differ from save_model's: {saved} vs {made}"


def test_quant_info_lists_the_quantized_layers_in_net_order(digits):
    info = json.load(open(output_files(str(digits["save_path"]))["quant_info"]))
    assert list(info["quantized_layers"]) == list(DIGITS_LAYERS), f"quant info: {info['quantized_layers']}"
    assert info["quantized_layers"]["conv1"]["input_blob"] == "data", f"conv1's input: {info['quantized_layers']}"


def test_too_few_forward_passes_is_an_error_with_both_counts(digits, tmp_path):
    record_file = tmp_path / "record.txt"
    graph = amct_retrain.init(str(digits["config"]), str(digits["float_model"]), str(digits["float_weights"]),
                              str(record_file))
    model, weights = tmp_path / "calibration.prototxt", tmp_path / "calibration.caffemodel"
    amct_retrain.quantize_model(graph, str(model), str(weights))
    caffe.Net(str(model), caffe.TEST, weights=str(weights)).forward()  # one pass of the two needed
    save_path = str(tmp_path / "result" / "digits")
    with pytest.raises(ModelError) as err:
        amct_retrain.save_model(graph, "Both", save_path)
    msg = str(err.value)
    assert "batch_num=2" in msg and "1 ran" in msg and "'conv1'" in msg, f"message must give both counts: {msg}"
    assert not (tmp_path / "result").exists(), "save_model wrote output for an uncalibrated model"


def _broken_record(records, tmp_path, edit):
    edited = {name: record.SingleLayerRecord() for name in records}
    for name, rec in records.items():
        edited[name].CopyFrom(rec)
    edit(edited)
    path = tmp_path / "edited_record.txt"
    record.write_record(path, edited)
    return path


def _without_conv2(records):
    del records["conv2"]


def _with_unknown_layer(records):
    records["conv9"] = record.SingleLayerRecord(scale_d=0.1, offset_d=0)


def _short_scale_w(records):
    del records["conv2"].scale_w[3:]
    del records["conv2"].offset_w[3:]


def _per_channel_fc(records):
    rec = records["ip1"]
    rec.scale_w.extend([rec.scale_w[0]] * (len(rec.shift_bit) - 1))
    rec.offset_w.extend([0] * (len(rec.shift_bit) - 1))


def _no_shift_bit(records):
    del records["ip2"].shift_bit[:]


@pytest.mark.parametrize("edit,expected", [
    (_without_conv2, ["'conv2'", "no record"]),
    (_with_unknown_layer, ["'conv9'", "no such layer"]),
    (_short_scale_w, ["'conv2'", "3 scale_w values", "32 output channels"]),
    (_per_channel_fc, ["'ip1'", "scale_w", "expected 1"]),
    (_no_shift_bit, ["'ip2'", "incomplete", "shift_bit"]),
], ids=["missing-layer", "unknown-layer", "scale-w-length", "per-channel-fc", "no-shift-bit"])
def test_convert_model_refuses_a_record_that_does_not_fit(digits, tmp_path, edit, expected):
    path = _broken_record(record.read_record(digits["record"]), tmp_path, edit)
    save_path = str(tmp_path / "result" / "digits")
    with pytest.raises(ModelError) as err:
        amct_retrain.convert_model(str(digits["float_model"]), str(digits["float_weights"]), str(path), save_path)
    msg = str(err.value)
    assert str(path) in msg and all(part in msg for part in expected), f"message must name {expected}: {msg}"
    assert not (tmp_path / "result").exists(), "convert_model wrote output for a bad record"


def test_a_layer_recorded_without_factors_stays_float(digits, tmp_path):
    path = _broken_record(record.read_record(digits["record"]), tmp_path, lambda r: r["ip2"].Clear())
    save_path = str(tmp_path / "result" / "digits")
    amct_retrain.convert_model(str(digits["float_model"]), str(digits["float_weights"]), str(path), save_path)
    info = json.load(open(output_files(save_path)["quant_info"]))
    assert list(info["quantized_layers"]) == ["conv1", "conv2", "ip1"], f"ip2 must stay float: {info}"
    deploy = read_caffemodel(output_files(save_path)["deploy_weights"])
    assert np.array_equal(deploy["ip2"][0], read_caffemodel(digits["float_weights"])["ip2"][0]), \
        "ip2 must keep its float weights"


def test_retraining_from_the_calibration_record_starts_its_clips_there(digits, tmp_path):
    calibrated = record.read_record(digits["record"])
    record_file = tmp_path / "record.txt"
    shutil.copy(digits["record"], record_file)
    config = tmp_path / "retrain_config.json"
    amct_retrain.create_quant_retrain_config(str(config), str(digits["float_model"]), str(digits["float_weights"]))
    model, weights = tmp_path / "retrain.prototxt", tmp_path / "retrain.caffemodel"
    amct_retrain.create_quant_retrain_model(str(digits["float_model"]), str(digits["float_weights"]), str(config),
                                            str(model), str(weights), str(record_file))
    blobs = read_caffemodel(weights)
    for name in DIGITS_LAYERS:
        clip_max, clip_min, state = blobs[ql.ulq_layer_name(name)]
        rec = calibrated[name]
        o = -rec.offset_d - 128
        expected = (np.float32(rec.scale_d * o), np.float32(rec.scale_d * (o + 255)))
        assert (clip_min[0], clip_max[0]) == expected and state[0] == 1, \
            f"{name}: clips {clip_min, clip_max}, state {state}, expected {expected} from the record, ready"
        scale_d, offset_d = numerics.ulq_deploy_factors(clip_min[0], clip_max[0])
        assert offset_d == rec.offset_d and scale_d == pytest.approx(rec.scale_d, rel=1e-6), \
            f"{name}: the clips' grid ({scale_d}, {offset_d}) is not the record's ({rec.scale_d}, {rec.offset_d})"
    assert record.read_record(record_file) == {}, "the calibration's factors must leave the retraining's record"
    layers = {layer.name: layer for layer in read_prototxt(model).layer}
    assert ql.layer_params(layers[ql.ulq_layer_name("conv1")])["clip_min"] is not None, \
        "the ULQ layer's param_str must carry the clips from the record"


# BN+Scale+Conv (bn0, scale0 into conv1), FC+BN+Scale (fc, bn_fc, scale_fc). conv2 and conv3 read the
# ReLU's output after a MAX Pooling does: they share one activation observer, placed before the Pooling.
FUSION_NET = """name: "fusion"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } } }
layer { name: "bn0" type: "BatchNorm" bottom: "data" top: "bn0" batch_norm_param { use_global_stats: true } }
layer { name: "scale0" type: "Scale" bottom: "bn0" top: "bn0" scale_param { bias_term: true } }
layer { name: "conv1" type: "Convolution" bottom: "bn0" top: "conv1" convolution_param { num_output: 6 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "side" type: "Pooling" bottom: "conv1" top: "side" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "conv3" type: "Convolution" bottom: "conv1" top: "conv3" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "fc" type: "InnerProduct" bottom: "conv2" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "bn_fc" type: "BatchNorm" bottom: "fc" top: "fc" batch_norm_param { use_global_stats: true } }
layer { name: "scale_fc" type: "Scale" bottom: "fc" top: "fc" scale_param { bias_term: true } }
"""
FUSION_LAYERS = ("conv1", "conv2", "conv3", "fc")
OUTPUTS = ("side", "conv3", "fc")


@pytest.fixture(scope="module")
def fusion_model(tmp_path_factory):
    """FUSION_NET with random weights and BatchNorm statistics, and two random input batches."""
    tmp = tmp_path_factory.mktemp("fusion")
    model = tmp / "fusion.prototxt"
    model.write_text(FUSION_NET)
    net = caffe.Net(str(model), caffe.TEST)
    rng = np.random.default_rng(5)
    for name, blobs in net.params.items():
        if net.layer_dict[name].type == "BatchNorm":
            blobs[0].data[...] = rng.normal(0, 1, blobs[0].data.shape)
            blobs[1].data[...] = rng.uniform(0.5, 2, blobs[1].data.shape)
            blobs[2].data[...] = 1
        else:
            for blob in blobs:
                blob.data[...] = rng.normal(0, 0.5, blob.data.shape)
    weights = tmp / "fusion.caffemodel"
    net.save(str(weights))
    return {"tmp": tmp, "model": model, "weights": weights,
            "batches": [rng.normal(0, 1, (4, 3, 8, 8)).astype(np.float32) for _ in range(2)]}


def _outputs(net: caffe.Net, x: np.ndarray) -> dict[str, np.ndarray]:
    net.blobs["data"].data[...] = x
    net.forward()
    return {name: net.blobs[name].data.copy() for name in OUTPUTS}


def _calibrate(fusion_model, tmp_path, **config_args):
    """Calibrate FUSION_NET over its two batches; returns (graph, record file, calibration model)."""
    config, record_file = tmp_path / "config.json", tmp_path / "record.txt"
    amct_retrain.create_quant_config(str(config), str(fusion_model["model"]), str(fusion_model["weights"]),
                                     batch_num=2, **config_args)
    graph = amct_retrain.init(str(config), str(fusion_model["model"]), str(fusion_model["weights"]), str(record_file))
    model, weights = tmp_path / "calibration.prototxt", tmp_path / "calibration.caffemodel"
    amct_retrain.quantize_model(graph, str(model), str(weights))
    net = caffe.Net(str(model), caffe.TEST, weights=str(weights))
    for x in fusion_model["batches"]:
        _outputs(net, x)
    return graph, record_file, net


def test_the_observers_write_the_record_once_per_calibration(fusion_model, tmp_path, monkeypatch):
    writes = []
    real_update = record.update_layer_records
    monkeypatch.setattr(record, "update_layer_records", lambda path, updates: (
        writes.append(sorted(updates)), real_update(path, updates))[1])
    _, record_file, _ = _calibrate(fusion_model, tmp_path)
    assert writes == [sorted(FUSION_LAYERS)], f"record writes of one calibration: {writes}"
    records = record.read_record(record_file)
    assert all(record.layer_record_complete(records[name]) for name in FUSION_LAYERS), records


def test_bn_scale_conv_and_fc_bn_scale_are_fused_in_calibration(fusion_model, tmp_path):
    floats = caffe.Net(str(fusion_model["model"]), caffe.TEST, weights=str(fusion_model["weights"]))
    graph, record_file, calibrating = _calibrate(fusion_model, tmp_path)
    layers = read_prototxt(tmp_path / "calibration.prototxt").layer
    types = [layer.type for layer in layers]
    assert "BatchNorm" not in types and "Scale" not in types, f"BatchNorm/Scale left in the calibration model: {types}"
    x = fusion_model["batches"][0]
    expected, fused = _outputs(floats, x), _outputs(calibrating, x)
    for name in OUTPUTS:
        scale = np.abs(expected[name]).max()
        assert np.abs(fused[name] - expected[name]).max() <= 1e-5 * scale, \
            f"{name}: the fused calibration model does not compute the float model"
    observers = [layer for layer in layers if ACTIVATION_OBSERVER.is_layer(layer)]
    assert [ql.layer_params(o)["layers"] for o in observers] == [["conv1"], ["conv2", "conv3"], ["fc"]], \
        f"conv2 and conv3 read one blob and must share an observer: {[o.name for o in observers]}"
    records = record.read_record(record_file)
    assert records["conv2"].scale_d == records["conv3"].scale_d, "sharers must share scale_d"

    save_path = str(tmp_path / "result" / "fusion")
    amct_retrain.save_model(graph, "Both", save_path)
    files = output_files(save_path)
    deploy_types = [layer.type for layer in read_prototxt(files["deploy_model"]).layer]
    assert "BatchNorm" not in deploy_types and "Scale" not in deploy_types, f"deploy model: {deploy_types}"
    fused_layers = json.load(open(files["quant_info"]))["fused_layers"]
    assert fused_layers == {"conv1": {"kind": "bn_conv", "removed": ["bn0", "scale0"]},
                            "fc": {"kind": "fc_bn", "removed": ["bn_fc", "scale_fc"]}}, f"quant info: {fused_layers}"

    converted = str(tmp_path / "converted" / "fusion")
    amct_retrain.convert_model(str(fusion_model["model"]), str(fusion_model["weights"]), str(record_file), converted)
    assert digests(files) == digests(output_files(converted)), "convert_model differs from save_model after fusions"


def test_a_skipped_layer_stays_float_in_save_model_and_convert_model(fusion_model, tmp_path):
    graph, record_file, _ = _calibrate(fusion_model, tmp_path, skip_layers=["conv3"])
    assert record.read_record(record_file)["conv3"] == record.SingleLayerRecord(), \
        "a skipped quantizable layer must be recorded without factors"
    saved, converted = str(tmp_path / "saved" / "fusion"), str(tmp_path / "converted" / "fusion")
    amct_retrain.save_model(graph, "Both", saved)
    amct_retrain.convert_model(str(fusion_model["model"]), str(fusion_model["weights"]), str(record_file), converted)
    assert digests(output_files(saved)) == digests(output_files(converted)), "convert_model differs from save_model"
    quantized = json.load(open(output_files(saved)["quant_info"]))["quantized_layers"]
    assert list(quantized) == ["conv1", "conv2", "fc"], f"conv3 must stay float: {list(quantized)}"


def test_a_record_of_a_batchnorm_that_fusion_removed_is_an_error(fusion_model, tmp_path):
    _, record_file, _ = _calibrate(fusion_model, tmp_path)
    records = record.read_record(record_file)
    records["bn_fc"] = record.SingleLayerRecord(scale_d=0.1, offset_d=0)
    record.write_record(record_file, records)
    with pytest.raises(ModelError, match="'bn_fc'.*folded into 'fc'"):
        amct_retrain.convert_model(str(fusion_model["model"]), str(fusion_model["weights"]), str(record_file),
                                   str(tmp_path / "result" / "fusion"))


def test_skip_fusion_in_the_record_keeps_the_batchnorm_in_convert_model(fusion_model, tmp_path):
    _, record_file, _ = _calibrate(fusion_model, tmp_path)
    records = record.read_record(record_file)
    records["fc"].skip_fusion = True
    record.write_record(record_file, records)
    save_path = str(tmp_path / "result" / "fusion")
    amct_retrain.convert_model(str(fusion_model["model"]), str(fusion_model["weights"]), str(record_file), save_path)
    deploy_types = [layer.type for layer in read_prototxt(output_files(save_path)["deploy_model"]).layer]
    assert deploy_types.count("BatchNorm") == 1, f"skip_fusion must keep fc's BatchNorm: {deploy_types}"


def test_activation_offset_false_gives_symmetric_activations(fusion_model, tmp_path):
    graph, record_file, _ = _calibrate(fusion_model, tmp_path, activation_offset=False)
    assert json.load(open(tmp_path / "config.json"))["activation_offset"] is False, "config lost activation_offset"
    records = record.read_record(record_file)
    assert all(records[name].offset_d == 0 and records[name].scale_d > 0 for name in FUSION_LAYERS), \
        f"offset_d must be 0 with activation_offset false: {[(n, records[n].offset_d) for n in FUSION_LAYERS]}"
    amct_retrain.save_model(graph, "Deploy", str(tmp_path / "result" / "fusion"))


def test_config_json_format_and_skip_layers(fusion_model, tmp_path):
    config = tmp_path / "config.json"
    amct_retrain.create_quant_config(str(config), str(fusion_model["model"]), str(fusion_model["weights"]),
                                     skip_layers=["conv3"], batch_num=3)
    data = json.load(open(config))
    assert data["version"] == 1 and data["batch_num"] == 3 and data["activation_offset"] is True, f"top: {data}"
    assert set(data) - {"version", "batch_num", "activation_offset"} == {"conv1", "conv2", "fc"}, f"layers: {data}"
    assert data["conv1"] == {"quant_enable": True,
                             "activation_quant_params": {"algo": "ifmr", "max_percentile": 0.999999,
                                                         "min_percentile": 0.999999, "search_range": [0.7, 1.3],
                                                         "search_step": 0.01},
                             "weight_quant_params": {"wts_algo": "arq_quantize", "channel_wise": True}}, data["conv1"]
    assert data["fc"]["weight_quant_params"]["channel_wise"] is False, f"fc must be per tensor: {data['fc']}"


def test_simplified_config_in_yaml_and_cfg_gives_the_same_json(fusion_model, tmp_path):
    yaml_file, cfg_file = tmp_path / "calibration.yaml", tmp_path / "calibration.cfg"
    yaml_file.write_text("batch_num: 2\nactivation_offset: false\nskip_layers: [conv3]\n"
                         "common_config: {arq_quantize: {channel_wise: false}, ifmr_quantize: {search_step: 0.02}}\n"
                         "override_layer_configs: [{layer_name: conv1, calibration_config: "
                         "{ifmr_quantize: {max_percentile: 0.9999}}}]\n")
    cfg_file.write_text('batch_num: 2\nactivation_offset: false\nskip_layers: "conv3"\n'
                        "common_config { arq_quantize { channel_wise: false } ifmr_quantize { search_step: 0.02 } }\n"
                        'override_layer_configs { layer_name: "conv1" calibration_config {'
                        " ifmr_quantize { max_percentile: 0.9999 } } }\n")
    outputs = []
    for definition in (yaml_file, cfg_file):
        out = tmp_path / f"{definition.suffix[1:]}.json"
        amct_retrain.create_quant_config(str(out), str(fusion_model["model"]), str(fusion_model["weights"]),
                                         config_defination=str(definition))
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1], f"YAML and .cfg differ:\n{outputs[0]}\n{outputs[1]}"
    data = json.loads(outputs[0])
    assert data["activation_offset"] is False and "conv3" not in data, f"top-level settings lost: {data}"
    assert data["conv1"]["activation_quant_params"]["max_percentile"] == 0.9999 and \
        data["conv1"]["activation_quant_params"]["search_step"] == 0.01, f"conv1's override replaces the block: {data}"
    assert data["conv2"]["activation_quant_params"]["search_step"] == 0.02 and \
        data["conv2"]["weight_quant_params"]["channel_wise"] is False, f"global settings: {data['conv2']}"


def _config_with(fusion_model, tmp_path, edit):
    config = tmp_path / "config.json"
    amct_retrain.create_quant_config(str(config), str(fusion_model["model"]), str(fusion_model["weights"]))
    data = json.load(open(config))
    edit(data)
    config.write_text(json.dumps(data))
    return config


@pytest.mark.parametrize("edit,expected", [
    (lambda d: d["conv1"].update(quant_enabled=True), ["'conv1'", "quant_enabled"]),
    (lambda d: d["conv2"]["activation_quant_params"].update(max_percentile=0.3), ["'conv2'", "max_percentile"]),
    (lambda d: d["conv2"]["activation_quant_params"].update(search_range=[1.3, 0.7]), ["'conv2'", "search_range[0]"]),
    (lambda d: d["conv1"]["activation_quant_params"].update(algo="kl"), ["'conv1'", "algo", "'kl'"]),
    (lambda d: d["fc"]["weight_quant_params"].update(channel_wise=True), ["'fc'", "channel_wise", "InnerProduct"]),
    (lambda d: d.update(activation_offset="no"), ["activation_offset", "boolean"]),
    (lambda d: d.update(relu1=d["conv1"]), ["'relu1'", "not quantizable", "ReLU"]),
], ids=["unknown-key", "percentile", "search-range", "algo", "channel-wise-fc", "activation-offset", "relu"])
def test_config_errors_name_file_layer_and_key(fusion_model, tmp_path, edit, expected):
    config = _config_with(fusion_model, tmp_path, edit)
    with pytest.raises(ConfigError) as err:
        load_calibration_config(config, read_prototxt(fusion_model["model"]))
    msg = str(err.value)
    assert str(config) in msg and all(part in msg for part in expected), f"message must name {expected}: {msg}"


def test_sharers_with_different_activation_settings_are_an_error(fusion_model, tmp_path):
    config = _config_with(fusion_model, tmp_path,
                          lambda d: d["conv3"]["activation_quant_params"].update(search_step=0.05))
    graph = amct_retrain.init(str(config), str(fusion_model["model"]), str(fusion_model["weights"]),
                              str(tmp_path / "record.txt"))
    with pytest.raises(ConfigError, match="'conv3'.*'conv2'"):
        amct_retrain.quantize_model(graph, str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel"))
    assert not (tmp_path / "m.prototxt").exists(), "quantize_model wrote output despite the error"


def test_init_keeps_skip_fusion_entries_and_empties_the_rest(fusion_model, tmp_path):
    record_file = tmp_path / "record.txt"
    record.write_record(record_file, {"fc": record.SingleLayerRecord(skip_fusion=True, scale_d=1.0),
                                      "conv1": record.SingleLayerRecord(scale_d=2.0)})
    config = tmp_path / "config.json"
    amct_retrain.create_quant_config(str(config), str(fusion_model["model"]), str(fusion_model["weights"]))
    amct_retrain.init(str(config), str(fusion_model["model"]), str(fusion_model["weights"]), str(record_file))
    assert record.read_record(record_file) == {"fc": record.SingleLayerRecord(skip_fusion=True)}, \
        f"init must keep only skip_fusion: {record.read_record(record_file)}"
    assert calibration.read_forward_passes(str(record_file)) == {}, "init must reset the forward-pass counts"
