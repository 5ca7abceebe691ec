"""Quantized Deconvolution: config rules, retraining, saved models, integer executor, ONNX export."""
import json
import logging

import caffe
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from caffe.proto import caffe_pb2
from google.protobuf import text_format

import amct_retrain
from amct_retrain import numerics, record
from amct_retrain.config import ConfigError
from amct_retrain.export.onnx import export_onnx
from amct_retrain.graph import quant_layers as ql
from amct_retrain.graph.caffe_params import conv_geometry
from amct_retrain.reference import ReferenceExecutor, output_steps, read_deploy_blobs, saved_model_parity
from amct_retrain.numerics import conv_output_hw
from tests import nets
from tests.nets import MASTER_WEIGHTS

pytestmark = pytest.mark.caffe

BATCH, C_IN, HW, FEATURES, CLASSES = 4, 3, 8, 6, 3
# Segmentation-like: conv (stride 2) halves the image, the Deconvolution (stride 2, kernel 4,
# pad 1) brings it back: 2 * (4 - 1) + 4 - 2 * 1 = 8. Its weights are (C_in 6, C_out 3, 4, 4):
# C_in != C_out, so a scale on the wrong axis shows up as a wrong length.
SEG_NET = f"""name: "seg"
layer {{ name: "data" type: "DummyData" top: "data" top: "target"
  dummy_data_param {{ shape {{ dim: {BATCH} dim: {C_IN} dim: {HW} dim: {HW} }}
    shape {{ dim: {BATCH} dim: {CLASSES} dim: {HW} dim: {HW} }}
    data_filler {{ type: "gaussian" std: 1 }} data_filler {{ type: "gaussian" std: 1 }} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: {FEATURES} kernel_size: 3 stride: 2 pad: 1 weight_filler {{ type: "xavier" }}
    bias_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "deconv" type: "Deconvolution" bottom: "conv1" top: "deconv"
  convolution_param {{ num_output: {CLASSES} kernel_size: 4 stride: 2 pad: 1 weight_filler {{ type: "xavier" }}
    bias_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "deconv" bottom: "target" top: "loss" }}
"""
DECONV_WEIGHT_SHAPE = (FEATURES, CLASSES, 4, 4)
ITERS = 6


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    """SEG_NET configured, made quantization-aware, trained ITERS steps (TEST at the end), saved."""
    tmp = tmp_path_factory.mktemp("deconv")
    return nets.retrain_and_save(tmp, SEG_NET, "seg", ITERS)


def test_config_quantizes_the_deconvolution_per_channel(seg):
    data = json.loads(seg["config"].read_text())
    assert list(data) == ["version", "batch_num", "conv1", "deconv"], f"configured layers: {list(data)}"
    assert data["deconv"]["retrain_weight_config"] == {"algo": "arq_retrain", "channel_wise": True}, \
        f"deconv weight config: {data['deconv']}"


def test_retrain_model_quantizes_deconvolution_weights_on_axis_1(seg):
    layers = {layer.name: layer for layer in
              text_format.Parse(seg["retrain_model"].read_text(), caffe_pb2.NetParameter()).layer}
    for inserted in (ql.arq_layer_name("deconv"), ql.shift_n_layer_name("deconv")):
        params = ql.layer_params(layers[inserted])
        assert params["channel_axis"] == 1 and params["weight_shape"] == list(DECONV_WEIGHT_SHAPE), \
            f"{inserted}: channel_axis {params['channel_axis']}, weight_shape {params['weight_shape']}"
    net = caffe.Net(str(seg["retrain_model"]), caffe.TEST, weights=str(seg["snapshot"]))
    master = net.params[ql.arq_layer_name("deconv")][MASTER_WEIGHTS].data
    net.forward()
    expected = numerics.arq_fake_quantize(master, numerics.arq_scale(master, 1), 1)
    assert np.array_equal(net.params["deconv"][0].data, expected), \
        "the Deconvolution's weights are not ARQ of its master weights per channel on axis 1"


def test_record_has_one_scale_and_shift_per_output_channel(seg):
    rec = record.read_record(seg["record"])["deconv"]
    master = caffe.Net(str(seg["retrain_model"]), caffe.TEST, weights=str(seg["snapshot"])).params["deconv_arq"][MASTER_WEIGHTS].data
    scale_w = np.asarray(rec.scale_w, np.float32)
    assert scale_w.shape == (CLASSES,) and np.array_equal(scale_w, numerics.arq_scale(master, 1)), \
        f"scale_w {scale_w} must be ARQ per output channel (axis 1, C_out = {CLASSES})"
    assert len(rec.shift_bit) == CLASSES and all(1 <= n <= 16 for n in rec.shift_bit), \
        f"shift_bit {list(rec.shift_bit)}: one per output channel (axis 1 of the output), in 1..16"


def test_deploy_and_fake_quant_deconvolution_blobs_agree(seg):
    rec = record.read_record(seg["record"])["deconv"]
    scale_w = np.asarray(rec.scale_w, np.float32)
    deq = numerics.deq_scales(rec.scale_d, scale_w)
    fake = caffe.Net(seg["fake_quant_model"], caffe.TEST, weights=seg["fake_quant_weights"]).params["deconv"]
    deploy = read_deploy_blobs(seg["deploy_weights"])
    weights_int8 = np.frombuffer(deploy["deconv"][0].int8_data, np.int8).reshape(deploy["deconv"][0].shape.dim)
    assert weights_int8.shape == DECONV_WEIGHT_SHAPE, f"deploy weights shape {weights_int8.shape}"
    dequantized = weights_int8.astype(np.float32) * scale_w.reshape(1, -1, 1, 1)
    assert np.array_equal(dequantized, fake[0].data), \
        f"int8 weights x scale_w (axis 1) != fake-quant weights: largest difference " \
        f"{np.abs(dequantized - fake[0].data).max()}"
    bias_int32 = np.array(deploy["deconv"][1].int32_data, np.int64)
    master_bias = caffe.Net(str(seg["retrain_model"]), caffe.TEST, weights=str(seg["snapshot"])).params["deconv"][1]
    assert np.array_equal(bias_int32, numerics.quantize_bias(master_bias.data, rec.scale_d, scale_w, "deconv")), \
        f"int32 bias {bias_int32} != rint(bias / (scale_d * scale_w[c]))"
    assert np.array_equal(fake[1].data, numerics.dequantize_bias(bias_int32, deq)), \
        "fake-quant bias != int32 bias x deq"
    unpacked, shift_bit, _ = numerics.unpack_deq_scale(
        np.array(deploy["deconv_dequant_layer"][0].uint64_data, np.uint64))
    assert np.array_equal(unpacked, deq) and np.array_equal(shift_bit, rec.shift_bit), \
        f"DeQuant holds deq {unpacked} / shift {shift_bit}; record: deq {deq} / shift {list(rec.shift_bit)}"


def test_integer_executor_matches_fake_quant_within_one_step(seg):
    worst = saved_model_parity(seg["save_path"], str(seg["record"]))
    assert set(worst) == {"conv1", "deconv"} and max(worst.values()) <= 1.0, \
        f"largest difference in output steps per layer: {worst}"
    reference = ReferenceExecutor(seg["deploy_model"], seg["deploy_weights"])
    reference.forward()
    shape = reference.net.blobs["deconv"].data.shape
    assert shape == (BATCH, CLASSES, HW, HW), f"integer Deconvolution output shape {shape}"


def test_onnx_export_runs_a_quantized_conv_transpose_like_the_fake_quant_model(seg):
    export_onnx(seg["deploy_model"], seg["deploy_weights"], seg["onnx"])
    model = onnx.load(str(seg["onnx"]))
    producers = {n.output[0]: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    (deconv,) = [n for n in model.graph.node if n.op_type == "ConvTranspose"]
    weights = producers[deconv.input[1]]
    axis = {a.name: a.i for a in weights.attribute}.get("axis")
    assert weights.op_type == "DequantizeLinear" and axis == 1, \
        f"ConvTranspose weights come from {weights.op_type} on axis {axis}, not DequantizeLinear on axis 1"
    assert inits[weights.input[0]].data_type == onnx.TensorProto.INT8, "ConvTranspose weights are not int8"
    assert list(inits[weights.input[1]].dims) == [CLASSES], \
        f"weight scales {list(inits[weights.input[1]].dims)}: one per output channel"
    assert producers[deconv.input[2]].op_type == "DequantizeLinear" and \
        inits[producers[deconv.input[2]].input[0]].data_type == onnx.TensorProto.INT32, "bias is not int32 -> DQ"
    ops = nets.ops_after(model, deconv.output[0])
    assert ops == ["Div", "Round", "QuantizeLinear", "DequantizeLinear"], \
        f"ConvTranspose output goes through {ops}, not the shift-N requantisation"

    fake = caffe.Net(seg["fake_quant_model"], caffe.TEST, weights=seg["fake_quant_weights"])
    session = ort.InferenceSession(str(seg["onnx"]), providers=["CPUExecutionProvider"])
    got, expected = [], []
    for _ in range(8):  # DummyData draws a new batch every forward
        fake.forward()
        got.append(session.run(["deconv"], {"data": fake.blobs["data"].data})[0])
        expected.append(fake.blobs["deconv"].data.copy())
    got, expected = np.concatenate(got), np.concatenate(expected)
    assert got.shape == expected.shape, f"onnx output {got.shape}, fake-quant {expected.shape}"
    diff = np.abs(got.astype(np.float64) - expected)
    step = output_steps(record.read_record(seg["record"])["deconv"]).reshape(1, -1, 1, 1)
    report = (f"{diff.size} outputs: largest |onnx - fake-quant| {diff.max():.6g} = {(diff / step).max():.3g} "
              f"output steps, {np.mean(diff == 0):.2%} bit-identical")
    assert np.mean(diff == 0) >= 0.99, report


def _grouped_deploy_model(seg, tmp_path):
    model = text_format.Parse(open(seg["deploy_model"]).read(), caffe_pb2.NetParameter())
    next(layer for layer in model.layer if layer.name == "deconv").convolution_param.group = 3
    path = tmp_path / "grouped.prototxt"
    path.write_text(text_format.MessageToString(model))
    return str(path)


@pytest.mark.parametrize("consumer", ["integer executor", "ONNX export"])
def test_deploy_model_with_a_grouped_quantized_deconvolution_is_refused(seg, tmp_path, consumer):
    model = _grouped_deploy_model(seg, tmp_path)
    with pytest.raises(ValueError, match="'deconv'.*group must be 1"):
        if consumer == "ONNX export":
            export_onnx(model, seg["deploy_weights"], tmp_path / "grouped.onnx")
        else:
            ReferenceExecutor(model, seg["deploy_weights"])


BROKEN_DECONVS = f"""
layer {{ name: "up_group" type: "Deconvolution" bottom: "conv1" top: "up_group"
  convolution_param {{ num_output: 4 kernel_size: 4 stride: 2 pad: 1 group: 2 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "up_dilated" type: "Deconvolution" bottom: "conv1" top: "up_dilated"
  convolution_param {{ num_output: {CLASSES} kernel_size: 3 stride: 2 dilation: 2
    weight_filler {{ type: "xavier" }} }} }}
"""


@pytest.fixture
def broken_model(tmp_path):
    model, weights = tmp_path / "broken.prototxt", tmp_path / "broken.caffemodel"
    model.write_text(SEG_NET + BROKEN_DECONVS)
    caffe.Net(str(model), caffe.TEST).save(str(weights))
    return model, weights


def test_grouped_or_dilated_deconvolution_stays_float_with_a_warning(broken_model, tmp_path, caplog):
    model, weights = broken_model
    config = tmp_path / "config.json"
    with caplog.at_level(logging.WARNING, logger="amct_retrain.config"):
        amct_retrain.create_quant_retrain_config(str(config), str(model), str(weights))
    data = json.loads(config.read_text())
    assert list(data) == ["version", "batch_num", "conv1", "deconv"], \
        f"the grouped and the dilated Deconvolution must stay float: {list(data)}"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for layer, constraint in (("up_group", "group must be 1"), ("up_dilated", "dilation must be 1")):
        assert any(layer in w and constraint in w for w in warnings), \
            f"no warning naming {layer} and '{constraint}': {warnings}"


@pytest.mark.parametrize("layer, constraint", [("up_group", "group must be 1"),
                                               ("up_dilated", "dilation must be 1")])
def test_a_broken_deconvolution_named_by_the_user_is_an_error(broken_model, tmp_path, layer, constraint):
    model, weights = broken_model
    definition = tmp_path / "simple.yaml"
    definition.write_text(f"override_layer_configs: [{{layer_name: {layer}}}]\n")
    with pytest.raises(ConfigError, match=f"{layer}.*{constraint}"):
        amct_retrain.create_quant_retrain_config(str(tmp_path / "c.json"), str(model), str(weights), str(definition))


GEOMETRIES = {
    "stride 2, kernel 4, pad 1": "kernel_size: 4 stride: 2 pad: 1",
    "stride 3, kernel 2x3, pad 0x1": "kernel_h: 2 kernel_w: 3 stride: 3 pad_h: 0 pad_w: 1",
    "stride 1, kernel 3, dilation 2, pad 2": "kernel_size: 3 dilation: 2 pad: 2",
}


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_integer_transposed_convolution_is_caffes_deconvolution(tmp_path, geometry):
    """On integer values, Caffe's float32 Deconvolution is exact: the executor's must equal it."""
    model = tmp_path / "deconv.prototxt"
    model.write_text(f"""name: "d" input: "x" input_shape {{ dim: 2 dim: 5 dim: 4 dim: 5 }}
        layer {{ name: "up" type: "Deconvolution" bottom: "x" top: "y"
                convolution_param {{ num_output: 3 bias_term: false {GEOMETRIES[geometry]} }} }}""")
    net = caffe.Net(str(model), caffe.TEST)
    rng = np.random.default_rng(7)
    x = rng.integers(-128, 128, net.blobs["x"].data.shape).astype(np.float64)
    w = rng.integers(-128, 128, net.params["up"][0].data.shape).astype(np.float64)
    net.blobs["x"].data[...], net.params["up"][0].data[...] = x, w
    expected = net.forward()["y"]
    layer = text_format.Parse(model.read_text(), caffe_pb2.NetParameter()).layer[0]
    g = conv_geometry(layer).__dict__
    got = numerics.deconv_accumulate(x, w, g)
    assert list(got.shape[2:]) == conv_output_hw(x.shape[2:], g, transposed=True) == list(expected.shape[2:]), \
        f"{geometry}: output {got.shape}, Caffe's {expected.shape}"
    assert np.array_equal(got, expected), f"{geometry}: largest difference {np.abs(got - expected).max()}"


SEG_BN_NET = f"""name: "seg_bn"
layer {{ name: "data" type: "DummyData" top: "data" top: "target"
  dummy_data_param {{ shape {{ dim: {BATCH} dim: 3 dim: {HW} dim: {HW} }} shape {{ dim: {BATCH} dim: {CLASSES} dim: {HW} dim: {HW} }}
    data_filler {{ type: "gaussian" std: 1 }} data_filler {{ type: "gaussian" std: 1 }} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: {FEATURES} kernel_size: 3 stride: 2 pad: 1 bias_term: false weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }}
layer {{ name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param {{ bias_term: true }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "deconv" type: "Deconvolution" bottom: "conv1" top: "deconv"
  convolution_param {{ num_output: {CLASSES} kernel_size: 4 stride: 2 pad: 1 bias_term: false weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "bn2" type: "BatchNorm" bottom: "deconv" top: "deconv" }}
layer {{ name: "scale2" type: "Scale" bottom: "deconv" top: "deconv" scale_param {{ bias_term: true }} }}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "deconv" bottom: "target" top: "loss" }}
"""


def _inference_statistics(net):
    rng = np.random.default_rng(7)
    for bn in ("bn1", "bn2"):
        channels = net.params[bn][0].data.shape[0]
        net.params[bn][0].data[...] = rng.normal(0, 0.1, channels)
        net.params[bn][1].data[...] = rng.uniform(0.5, 2.0, channels)
        net.params[bn][2].data[...] = 1.0


def test_segmentation_net_with_deconv_batchnorm_scale_is_fused_quantized_and_exact(tmp_path):
    files = nets.retrain_and_save(tmp_path, SEG_BN_NET, "seg_bn", ITERS, prepare=_inference_statistics)
    for key in ("retrain_model", "fake_quant_model", "deploy_model"):
        types = [layer.type for layer in text_format.Parse(open(files[key]).read(), caffe_pb2.NetParameter()).layer]
        assert "BatchNorm" not in types and "Scale" not in types, f"{key} keeps BatchNorm/Scale: {types}"
    info = json.load(open(files["quant_info"]))
    assert info["fused_layers"] == {"conv1": {"kind": "conv_bn", "removed": ["bn1", "scale1"]},
                                    "deconv": {"kind": "deconv_bn", "removed": ["bn2", "scale2"]}}, info["fused_layers"]
    worst = saved_model_parity(files["save_path"], str(files["record"]))
    assert set(worst) == {"conv1", "deconv"} and max(worst.values()) <= 1.0, f"output steps per layer: {worst}"
