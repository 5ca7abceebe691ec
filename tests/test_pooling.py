"""Quantized AVE Pooling: config rules, retraining, saved models, integer executor, ONNX export."""
import json
import logging

import caffe
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format

import amct_retrain
from amct_retrain import numerics, record
from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.config import ConfigError
from amct_retrain.export.onnx import export_onnx
from amct_retrain.graph import quant_layers as ql
from amct_retrain.reference import output_steps, read_deploy_blobs, saved_model_parity
from amct_retrain.saver import output_files
from tests import nets, onnx_checks

pytestmark = pytest.mark.caffe

BATCH, C_IN, HW, FEATURES, OUT = 4, 3, 8, 6, 4
# conv (pad 1) keeps 8 x 8; the AVE pooling (kernel 2, stride 2) tiles it: (8 - 2) % 2 == 0.
POOL_NET = f"""name: "pool"
layer {{ name: "data" type: "DummyData" top: "data" top: "target"
  dummy_data_param {{ shape {{ dim: {BATCH} dim: {C_IN} dim: {HW} dim: {HW} }}
    shape {{ dim: {BATCH} dim: {OUT} dim: {HW // 2} dim: {HW // 2} }}
    data_filler {{ type: "gaussian" std: 1 }} data_filler {{ type: "gaussian" std: 1 }} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: {FEATURES} kernel_size: 3 pad: 1 weight_filler {{ type: "xavier" }}
    bias_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "pool" type: "Pooling" bottom: "conv1" top: "pool"
  pooling_param {{ pool: AVE kernel_size: 2 stride: 2 }} }}
layer {{ name: "conv2" type: "Convolution" bottom: "pool" top: "conv2"
  convolution_param {{ num_output: {OUT} kernel_size: 1 weight_filler {{ type: "xavier" }}
    bias_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "conv2" bottom: "target" top: "loss" }}
"""
ITERS = 6


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    """POOL_NET configured, made quantization-aware, trained ITERS steps (TEST at the end), saved."""
    tmp = tmp_path_factory.mktemp("pooling")
    return nets.retrain_and_save(tmp, POOL_NET, "pool", ITERS)


def _layers(path) -> dict[str, caffe_pb2.LayerParameter]:
    return {layer.name: layer for layer in text_format.Parse(open(path).read(), caffe_pb2.NetParameter()).layer}


def test_config_lists_the_pooling_per_tensor(pooled):
    data = json.loads(pooled["config"].read_text())
    assert list(data) == ["version", "batch_num", "conv1", "pool", "conv2"], f"configured layers: {list(data)}"
    assert data["pool"]["retrain_weight_config"]["channel_wise"] is False, f"pool config: {data['pool']}"


def test_retrain_model_has_no_weight_quantizer_for_the_pooling(pooled):
    layers = _layers(pooled["retrain_model"])
    assert ql.ulq_layer_name("pool") in layers, "no ActivationULQ before the pooling"
    assert ql.arq_layer_name("pool") not in layers, "a WeightARQ for a layer without weights"
    params = ql.layer_params(layers[ql.shift_n_layer_name("pool")])
    assert params["scale_w"] == [0.25] and "weight_shape" not in params, \
        f"the pooling's ShiftNSearch must search with the fixed scale_w [1/4]: {params}"
    assert not layers["pool"].param, f"the pooling got param specs: {layers['pool'].param}"


def test_record_has_the_fixed_scale_and_one_shift_per_channel(pooled):
    rec = record.read_record(pooled["record"])["pool"]
    assert list(rec.scale_w) == [0.25] and list(rec.offset_w) == [0], \
        f"scale_w {list(rec.scale_w)} / offset_w {list(rec.offset_w)}: must be [1/n] = [0.25] / [0]"
    assert len(rec.shift_bit) == FEATURES and all(1 <= n <= 16 for n in rec.shift_bit), \
        f"shift_bit {list(rec.shift_bit)}: one per channel ({FEATURES}), in 1..16"


def test_deploy_model_wraps_the_pooling_in_quant_and_dequant(pooled):
    model = text_format.Parse(open(pooled["deploy_model"]).read(), caffe_pb2.NetParameter())
    order = [layer.type for layer in model.layer]
    i = [layer.name for layer in model.layer].index("pool")
    assert order[i - 1:i + 2] == ["Quant", "Pooling", "DeQuant"], f"deploy layer types around pool: {order}"
    assert model.layer[i].pooling_param == text_format.Parse(
        "pool: AVE kernel_size: 2 stride: 2", caffe_pb2.PoolingParameter()), \
        f"pooling_param changed: {model.layer[i].pooling_param}"
    deploy = read_deploy_blobs(pooled["deploy_weights"])
    assert not deploy.get("pool"), f"the deploy pooling has blobs: {len(deploy.get('pool', []))}"
    rec = record.read_record(pooled["record"])["pool"]
    deq, shift_bit, _ = numerics.unpack_deq_scale(np.array(deploy["pool_dequant_layer"][0].uint64_data, np.uint64))
    expected = np.broadcast_to(numerics.deq_scales(rec.scale_d, [0.25]), (FEATURES,))
    assert np.array_equal(deq, expected) and np.array_equal(shift_bit, rec.shift_bit), \
        f"DeQuant holds deq {deq} / shift {shift_bit}; record: deq {expected} / shift {list(rec.shift_bit)}"
    assert not read_deploy_blobs(pooled["fake_quant_weights"]).get("pool"), "the fake-quant pooling has blobs"


def test_integer_executor_matches_fake_quant(pooled):
    worst = saved_model_parity(pooled["save_path"], str(pooled["record"]))
    print(f"integer executor vs fake-quant, output steps: {worst}")
    assert set(worst) == {"conv1", "pool", "conv2"} and max(worst.values()) <= 1.0, \
        f"largest difference in output steps per layer: {worst}"
    assert worst["pool"] == 0.0, f"the integer pooling is exact, got {worst['pool']} output steps"


def test_exact_onnx_export_runs_the_quantized_pooling_like_the_fake_quant_model(pooled):
    export_onnx(pooled["deploy_model"], pooled["deploy_weights"], pooled["onnx"], mode="exact")
    model = onnx.load(str(pooled["onnx"]))
    (pool,) = [n for n in model.graph.node if n.name.startswith("pool/ConvInteger")]
    attrs = {a.name: a for a in pool.attribute}
    assert attrs["group"].i == FEATURES and list(attrs["strides"].ints) == [2, 2], \
        f"the window sums are not a depthwise stride-2 ConvInteger: {pool}"

    # The pooling's output is an inner tensor: expose it too, to compare it and the net's output.
    model.graph.output.append(onnx.helper.make_tensor_value_info("pool", onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    fake = caffe.Net(pooled["fake_quant_model"], caffe.TEST, weights=pooled["fake_quant_weights"])
    blobs = ("pool", "conv2")
    got, expected = {b: [] for b in blobs}, {b: [] for b in blobs}
    for _ in range(8):  # DummyData draws a new batch every forward
        fake.forward()
        for blob, value in zip(blobs, session.run(list(blobs), {"data": fake.blobs["data"].data})):
            got[blob].append(value)
            expected[blob].append(fake.blobs[blob].data.copy())
    records = record.read_record(pooled["record"])
    for blob in blobs:
        g, e = np.concatenate(got[blob]), np.concatenate(expected[blob])
        assert g.shape == e.shape, f"{blob}: onnx output {g.shape}, fake-quant {e.shape}"
        diff = np.abs(g.astype(np.float64) - e)
        step = output_steps(records[blob]).reshape(1, -1, 1, 1)
        report = (f"{blob}: {diff.size} outputs: largest |onnx - fake-quant| {diff.max():.6g} = "
                  f"{(diff / step).max():.3g} output steps, {np.mean(diff == 0):.2%} bit-identical")
        print(report)
        assert np.array_equal(g.view(np.int32), e.view(np.int32)), report
    compared = onnx_checks.assert_exact_on_random_activations(pooled["deploy_model"], pooled["deploy_weights"],
                                                              pooled["onnx"])
    assert set(compared) == {"conv1", "pool", "conv2"}, f"layers compared: {compared}"


FLOAT_POOLS = {
    "max": ("pool: MAX kernel_size: 2 stride: 2", None),
    "global": ("pool: AVE global_pooling: true", "global_pooling must be false"),
    "padded": ("pool: AVE kernel_size: 2 stride: 2 pad: 1", "pad must be 0"),
    "non-tiling": ("pool: AVE kernel_size: 3 stride: 2", "tile the input"),
}


def _net_with_pool(tmp_path, pooling_param: str):
    """POOL_NET with the pooling replaced (the loss target fitted to its output by a 1 x 1 view)."""
    text = POOL_NET.replace("pool: AVE kernel_size: 2 stride: 2", pooling_param)
    net = text_format.Parse(text, caffe_pb2.NetParameter())
    del net.layer[-1]  # the target's shape no longer fits: no loss, a float layer is all the test needs
    model, weights = tmp_path / "float_pool.prototxt", tmp_path / "float_pool.caffemodel"
    model.write_text(text_format.MessageToString(net))
    caffe.Net(str(model), caffe.TEST).save(str(weights))
    return model, weights


@pytest.mark.parametrize("kind", sorted(FLOAT_POOLS))
def test_max_and_broken_ave_poolings_stay_float(tmp_path, caplog, kind):
    pooling_param, constraint = FLOAT_POOLS[kind]
    model, weights = _net_with_pool(tmp_path, pooling_param)
    config, record_file = tmp_path / "config.json", tmp_path / "record.txt"
    retrain_model = tmp_path / "retrain.prototxt"
    with caplog.at_level(logging.WARNING):
        amct_retrain.create_quant_retrain_config(str(config), str(model), str(weights))
        amct_retrain.create_quant_retrain_model(str(model), str(weights), str(config), str(retrain_model),
                                                str(tmp_path / "retrain.caffemodel"), str(record_file))
    layers = _layers(retrain_model)
    assert ql.shift_n_layer_name("pool") not in layers and ql.ulq_layer_name("pool") not in layers, \
        f"{kind} pooling was quantized: {list(layers)}"
    assert ql.shift_n_layer_name("conv2") in layers, f"conv2 must still be quantized: {list(layers)}"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "'pool'" in r.getMessage()]
    if constraint is None:
        assert not warnings, f"a MAX pooling must stay float silently: {warnings}"
    else:
        assert any(constraint in w for w in warnings), f"no warning naming '{constraint}': {warnings}"


@pytest.mark.parametrize("kind", ["global", "padded"])
def test_a_broken_ave_pooling_named_by_the_user_is_an_error(tmp_path, kind):
    pooling_param, constraint = FLOAT_POOLS[kind]
    model, weights = _net_with_pool(tmp_path, pooling_param)
    definition = tmp_path / "simple.yaml"
    definition.write_text("override_layer_configs: [{layer_name: pool}]\n")
    with pytest.raises(ConfigError, match=f"pool.*{constraint}"):
        amct_retrain.create_quant_retrain_config(str(tmp_path / "c.json"), str(model), str(weights), str(definition))


def test_channel_wise_pooling_is_an_error(tmp_path):
    model, weights = _net_with_pool(tmp_path, "pool: AVE kernel_size: 2 stride: 2")
    config = tmp_path / "config.json"
    amct_retrain.create_quant_retrain_config(str(config), str(model), str(weights))
    data = json.loads(config.read_text())
    data["pool"]["retrain_weight_config"]["channel_wise"] = True
    config.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="channel_wise must be false for Pooling"):
        amct_retrain.create_quant_retrain_model(str(model), str(weights), str(config), str(tmp_path / "m.prototxt"),
                                                str(tmp_path / "m.caffemodel"), str(tmp_path / "r.txt"))


def test_integer_window_sums_are_caffes_average_times_n(tmp_path):
    """On integer values Caffe's float32 AVE pooling is exact: the executor's sums, / n, must equal it."""
    model = tmp_path / "pool.prototxt"
    model.write_text("""name: "p" input: "x" input_shape { dim: 2 dim: 3 dim: 7 dim: 9 }
        layer { name: "pool" type: "Pooling" bottom: "x" top: "y"
                pooling_param { pool: AVE kernel_h: 3 kernel_w: 1 stride_h: 2 stride_w: 2 } }""")
    net = caffe.Net(str(model), caffe.TEST)
    x = np.random.default_rng(3).integers(-128, 128, net.blobs["x"].data.shape).astype(np.float64)
    net.blobs["x"].data[...] = x
    expected = net.forward()["y"] * 3
    got = numerics.window_sums(x, (3, 1), (2, 2))
    assert got.shape == expected.shape, f"window sums {got.shape}, Caffe {expected.shape}"
    assert np.array_equal(got, np.rint(expected)), f"largest difference {np.abs(got - expected).max()}"


def test_calibration_quantizes_the_pooling(tmp_path):
    """Post-training calibration: an activation observer before the pooling, a shift-N observer
    after it with the fixed scale_w; the saved models run like the retrained ones, and
    convert_model of the record writes the same files."""
    model, weights = tmp_path / "pool.prototxt", tmp_path / "pool.caffemodel"
    model.write_text(POOL_NET)
    caffe.Net(str(model), caffe.TEST).save(str(weights))
    config, record_file = tmp_path / "calibration.json", tmp_path / "record.txt"
    amct_retrain.create_quant_config(str(config), str(model), str(weights))
    assert "pool" in json.loads(config.read_text()), f"calibration config: {config.read_text()}"
    graph = amct_retrain.init(str(config), str(model), str(weights), str(record_file))
    calibration_model, calibration_weights = tmp_path / "calibration.prototxt", tmp_path / "calibration.caffemodel"
    amct_retrain.quantize_model(graph, str(calibration_model), str(calibration_weights))
    caffe.Net(str(calibration_model), caffe.TEST, weights=str(calibration_weights)).forward()
    save_path = str(tmp_path / "result" / "pool")
    amct_retrain.save_model(graph, "Both", save_path)
    rec = record.read_record(record_file)["pool"]
    assert list(rec.scale_w) == [0.25] and len(rec.shift_bit) == FEATURES, \
        f"pool record: scale_w {list(rec.scale_w)}, shift_bit {list(rec.shift_bit)}"
    deploy = [layer.type for layer in
              text_format.Parse(open(output_files(save_path)["deploy_model"]).read(), caffe_pb2.NetParameter()).layer]
    assert "Pooling" in deploy and deploy[deploy.index("Pooling") - 1:deploy.index("Pooling") + 2] == \
        ["Quant", "Pooling", "DeQuant"], f"deploy layer types: {deploy}"
    worst = saved_model_parity(save_path, str(record_file))
    assert worst.get("pool") == 0.0 and max(worst.values()) <= 1.0, f"output steps per layer: {worst}"
    converted = str(tmp_path / "converted" / "pool")
    amct_retrain.convert_model(str(model), str(weights), str(record_file), converted)
    for key, path in output_files(save_path).items():
        if key != "quant_info":  # it names the record file, the same here
            assert open(path, "rb").read() == open(output_files(converted)[key], "rb").read(), \
                f"convert_model's {key} differs from save_model's"
