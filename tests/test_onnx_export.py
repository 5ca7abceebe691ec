"""QDQ ONNX export of deploy models, run by onnxruntime and compared with Caffe."""
import os

os.environ.setdefault("GLOG_minloglevel", "2")
import caffe  # noqa: E402
import h5py  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pytest  # noqa: E402
from google.protobuf import text_format  # noqa: E402

from amct_retrain import numerics, record  # noqa: E402
from amct_retrain.caffe_proto import caffe_pb2  # noqa: E402
from amct_retrain.export.onnx import OPSET, export_onnx, recover_scales  # noqa: E402
from amct_retrain.graph.model_io import ModelError  # noqa: E402
from samples import digits_demo  # noqa: E402
from tests import nets  # noqa: E402

pytestmark = pytest.mark.caffe
DEMO_LAYERS = ("conv1", "conv2", "ip1", "ip2")


def _session(onnx_file) -> ort.InferenceSession:
    return ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])


def _caffe_outputs(model, weights, inputs: dict[str, np.ndarray], blobs) -> dict[str, np.ndarray]:
    """``blobs`` of a TEST net fed ``inputs`` (its data layers skipped)."""
    net = caffe.Net(str(model), caffe.TEST, weights=str(weights))
    for name, value in inputs.items():
        net.blobs[name].reshape(*value.shape)
        net.blobs[name].data[...] = value
    data_types = {"HDF5Data", "DummyData", "Input"}
    first = next(name for name, layer in zip(net._layer_names, net.layers) if layer.type not in data_types)
    net.forward(start=first)
    return {b: net.blobs[b].data.copy() for b in blobs}


def _output_step(deploy_weights, dequant_layer: str) -> np.ndarray:
    """float64 (C,): deq * 2^N, the quantization step of a quantized layer's output."""
    net = caffe_pb2.NetParameter.FromString(open(deploy_weights, "rb").read())
    blob = next(layer.blobs[0] for layer in net.layer if layer.name == dequant_layer)
    deq, shift, _ = numerics.unpack_deq_scale(np.array(blob.uint64_data, np.uint64))
    return deq.astype(np.float64) * 2.0 ** shift


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The digits demo (float training, QAT, saved models) and its deploy model as ONNX."""
    out = tmp_path_factory.mktemp("digits")
    accuracies = digits_demo.run(out, float_iters=300, retrain_iters=100)
    prefix = out / "result" / "digits"
    files = {"out": out, "accuracies": accuracies, "onnx": out / "digits.onnx", "record": out / "record.txt",
             "deploy_model": f"{prefix}_deploy_model.prototxt", "deploy_weights": f"{prefix}_deploy_weights.caffemodel",
             "fake_quant_model": f"{prefix}_fake_quant_model.prototxt",
             "fake_quant_weights": f"{prefix}_fake_quant_weights.caffemodel"}
    export_onnx(files["deploy_model"], files["deploy_weights"], files["onnx"])
    return files


def test_demo_onnx_agrees_with_the_fake_quant_model(demo):
    with h5py.File(demo["out"] / "test.h5") as f:
        x, labels = f["data"][...], f["label"][...].astype(int)
    session = _session(demo["onnx"])
    inputs = {i.name: i.shape for i in session.get_inputs()}
    assert inputs == {"data": list(x.shape)}, f"graph inputs {inputs}: the TEST data top with Caffe's shape"
    got = session.run(["ip2"], {"data": x})[0]
    fake = _caffe_outputs(demo["fake_quant_model"], demo["fake_quant_weights"], {"data": x}, ["ip2"])["ip2"]
    step = _output_step(demo["deploy_weights"], "ip2_dequant_layer")
    diff = np.abs(got.astype(np.float64) - fake)
    agreement = np.mean(got.argmax(1) == fake.argmax(1))
    acc_onnx, acc_fake = np.mean(got.argmax(1) == labels), np.mean(fake.argmax(1) == labels)
    identical = np.mean(diff == 0)
    report = (f"{len(x)} test images: largest |onnx - fake-quant| {diff.max():.6g} = {(diff / step).max():.3g} "
              f"output steps (deq*2^N), {identical:.2%} of the outputs bit-identical; top-1 agreement "
              f"{agreement:.4f}; accuracy onnx {acc_onnx:.4f}, fake-quant {acc_fake:.4f}")
    assert agreement >= 0.995, report
    assert abs(acc_onnx - acc_fake) <= 0.01, report
    # The requantisation rounds the recovered accumulator as the fake-quant model does, so the
    # outputs are the same grid points; only a code that x / scale_d and x * (1/scale_d) round
    # differently (a few per million) may move some. Quantizing y by deq*2^N directly: 76%.
    assert identical >= 0.99, report


def test_demo_onnx_is_a_qdq_graph(demo):
    model = onnx.load(str(demo["onnx"]))
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)], model.opset_import
    inits = {t.name: t for t in model.graph.initializer}
    producers = {n.output[0]: n for n in model.graph.node}

    def dequantized(tensor, dtype):
        node = producers.get(tensor)
        return node is not None and node.op_type == "DequantizeLinear" and (
            inits[node.input[0]].data_type == dtype if node.input[0] in inits else
            producers[node.input[0]].op_type == "QuantizeLinear")
    linear = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert [n.input[2] for n in linear if len(n.input) > 2], "the demo's layers have biases"
    for n in linear:
        assert dequantized(n.input[0], None), f"{n.name}: input is not QuantizeLinear -> DequantizeLinear"
        assert dequantized(n.input[1], onnx.TensorProto.INT8), f"{n.name}: weights are not int8 -> DequantizeLinear"
        assert dequantized(n.input[2], onnx.TensorProto.INT32), f"{n.name}: bias is not int32 -> DequantizeLinear"
    consumers = {t: n for n in model.graph.node for t in n.input}
    for n in linear:
        chain = [consumers[n.output[0]]]
        while len(chain) < 4 and chain[-1].output[0] in consumers:
            chain.append(consumers[chain[-1].output[0]])
        ops = [c.op_type for c in chain]
        assert ops == ["Div", "Round", "QuantizeLinear", "DequantizeLinear"], \
            f"{n.name}: the output goes through {ops}, not the shift-N requantisation"
        assert inits[chain[2].input[2]].data_type == onnx.TensorProto.INT16, f"{n.name}: requantisation not int16"
    for name in DEMO_LAYERS:
        assert inits[f"{name}_quant_layer/zero_point"].data_type == onnx.TensorProto.INT8, \
            f"{name}: activation zero point is not int8"


def _ulps(a, b) -> np.ndarray:
    """How many float32 steps apart positive a and b are."""
    return np.abs(np.asarray(a, np.float32).view(np.int32).astype(np.int64) -
                  np.asarray(b, np.float32).view(np.int32).astype(np.int64))


def test_recovered_scales_fit_the_deploy_factors(demo, retrained):
    """From the deploy files alone: scale_d is at most an ulp from the record's (the Quant layer
    stores only its rounded reciprocal); scale_d * scale_w gives deq back within an ulp."""
    for files, layers in ((demo, DEMO_LAYERS), (retrained, nets.QUANTIZED)):
        records = record.read_record(files["record"])
        model = text_format.Parse(open(files["deploy_model"]).read(), caffe_pb2.NetParameter())
        weights = caffe_pb2.NetParameter.FromString(open(files["deploy_weights"], "rb").read())
        quant = {layer.name: layer.quant_param.scale for layer in model.layer if layer.type == "Quant"}
        packed = {layer.name: layer.blobs[0].uint64_data for layer in weights.layer
                  if layer.name.endswith("_dequant_layer")}
        for name in layers:
            deq = numerics.unpack_deq_scale(np.array(packed[f"{name}_dequant_layer"], np.uint64))[0]
            scale_d, scale_w = recover_scales(quant[f"{name}_quant_layer"], deq)
            assert _ulps(scale_d, records[name].scale_d) <= 1, \
                f"{name}: recovered scale_d {scale_d!r}, record {records[name].scale_d!r}"
            product = numerics.deq_scales(scale_d, scale_w)
            assert _ulps(product, deq).max() <= 1, f"{name}: scale_d * scale_w {product} != deq {deq}"


def test_retrained_small_net_exports_and_runs(retrained, tmp_path):
    """DummyData input (its target dropped), per-channel and grouped convs, per-tensor fc."""
    onnx_file = tmp_path / "small.onnx"
    export_onnx(retrained["deploy_model"], retrained["deploy_weights"], onnx_file)
    session = _session(onnx_file)
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    assert names == (["data"], ["fc"]), f"inputs / outputs {names}: the label 'target' must be dropped"
    x = np.random.default_rng(3).normal(size=session.get_inputs()[0].shape).astype(np.float32)
    got = session.run(["fc"], {"data": x})[0]
    fake = _caffe_outputs(retrained["fake_quant_model"], retrained["fake_quant_weights"], {"data": x}, ["fc"])["fc"]
    step = _output_step(retrained["deploy_weights"], "fc_dequant_layer")
    diff = np.abs(got.astype(np.float64) - fake)
    assert np.mean(diff == 0) >= 0.95, (f"{np.mean(diff == 0):.1%} of the outputs bit-identical; largest "
                                        f"|onnx - fake-quant| {diff.max():.6g} = {(diff / step).max():.3g} steps")


def _corrupt(files, tmp_path, layer: str, edit) -> tuple[str, str]:
    """A copy of the deploy files with ``edit(layer_parameter)`` applied to one layer."""
    model = text_format.Parse(open(files["deploy_model"]).read(), caffe_pb2.NetParameter())
    weights = caffe_pb2.NetParameter.FromString(open(files["deploy_weights"], "rb").read())
    for net in (model, weights):
        for param in net.layer:
            if param.name == layer:
                edit(param)
    model_file, weights_file = tmp_path / "deploy.prototxt", tmp_path / "deploy.caffemodel"
    model_file.write_text(text_format.MessageToString(model))
    weights_file.write_bytes(weights.SerializeToString())
    return str(model_file), str(weights_file)


def _set_deq_word(value: int):
    def edit(layer):
        if layer.blobs:
            layer.blobs[0].uint64_data[0] = value | (layer.blobs[0].uint64_data[0] & 0xFF00000000)
    return edit


def _drop_blob(index: int):
    def edit(layer):
        if layer.blobs:
            del layer.blobs[index]
    return edit


def _drop_last_deq(layer):
    if layer.blobs:
        layer.blobs[0].uint64_data.pop()


# case -> (deploy model, layer to corrupt, edit); the small net's conv2 has no bias.
CORRUPTIONS = {
    "no deq_scale blob": ("demo", "conv2_dequant_layer", _drop_blob(0)),
    "NaN deq": ("demo", "conv2_dequant_layer", _set_deq_word(0x7FC00000)),
    "negative deq": ("demo", "conv2_dequant_layer", _set_deq_word(0xBF800000)),
    "one deq value short of the bias": ("demo", "conv2_dequant_layer", _drop_last_deq),
    "one deq value short, no bias": ("retrained", "conv2_dequant_layer", _drop_last_deq),
    "truncated int8 weights": ("demo", "conv2", lambda layer: layer.blobs and setattr(
        layer.blobs[0], "int8_data", layer.blobs[0].int8_data[:-1])),
    "no int32 bias": ("demo", "ip1", _drop_blob(1)),
    "zero Quant scale": ("demo", "ip2_quant_layer", lambda layer: setattr(layer.quant_param, "scale", 0.0)),
}
INPUT_SHAPES = {"demo": (1, 1, 8, 8), "retrained": (1, 6, 8, 8)}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_deploy_blobs_contradicting_the_model_are_errors_naming_the_layer(request, tmp_path, case):
    source, layer, edit = CORRUPTIONS[case]
    model_file, weights_file = _corrupt(request.getfixturevalue(source), tmp_path, layer, edit)
    onnx_file = tmp_path / "bad.onnx"
    with pytest.raises(ValueError, match=f"'{layer.split('_')[0]}") as err:
        export_onnx(model_file, weights_file, onnx_file, input_shapes={"data": INPUT_SHAPES[source]})
    assert not onnx_file.exists(), f"{case}: an ONNX file was written despite {err.value}"


def test_unsupported_layer_type_is_an_error_naming_it(demo, tmp_path):
    model = text_format.Parse(open(demo["deploy_model"]).read(), caffe_pb2.NetParameter())
    model.layer.add().CopyFrom(text_format.Parse('name: "abs" type: "AbsVal" bottom: "ip2" top: "abs"',
                                                 caffe_pb2.LayerParameter()))
    model_file = tmp_path / "abs.prototxt"
    model_file.write_text(text_format.MessageToString(model))
    with pytest.raises(ModelError, match="layer 'abs' has type 'AbsVal'"):
        export_onnx(model_file, demo["deploy_weights"], tmp_path / "abs.onnx")


def test_input_shapes_override_caffe_and_must_name_the_inputs(demo, tmp_path):
    onnx_file = tmp_path / "batch2.onnx"
    export_onnx(demo["deploy_model"], demo["deploy_weights"], onnx_file, input_shapes={"data": (2, 1, 8, 8)})
    shapes = [i.shape for i in _session(onnx_file).get_inputs()]
    assert shapes == [[2, 1, 8, 8]], f"input shapes {shapes}"
    with pytest.raises(ModelError, match=r"missing \['data'\], unknown \['image'\]"):
        export_onnx(demo["deploy_model"], demo["deploy_weights"], onnx_file, input_shapes={"image": (1, 1, 8, 8)})
    # 9x9 images give ip1 800 inputs where its weights take 512.
    with pytest.raises(ModelError, match="node name: ip1/.*512 and 800"):
        export_onnx(demo["deploy_model"], demo["deploy_weights"], onnx_file, input_shapes={"data": (1, 1, 9, 9)})


# A float net with every float layer the export maps: a deploy model with nothing quantized.
FLOAT_OPS_LAYERS = """
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4
  kernel_size: 3 stride: 2 pad: 2 dilation: 2 weight_filler { type: "gaussian" std: 0.5 }
  bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "gconv" type: "Convolution" bottom: "conv" top: "gconv" convolution_param { num_output: 4 group: 2
  kernel_h: 3 kernel_w: 1 pad_h: 1 pad_w: 0 bias_term: false weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "bn" type: "BatchNorm" bottom: "gconv" top: "gconv" }
layer { name: "scale" type: "Scale" bottom: "gconv" top: "gconv" scale_param { bias_term: true
  filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 } } }
layer { name: "leaky" type: "ReLU" bottom: "gconv" top: "gconv" relu_param { negative_slope: 0.1 } }
layer { name: "maxpool" type: "Pooling" bottom: "gconv" top: "maxpool"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "avepool" type: "Pooling" bottom: "gconv" top: "avepool"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "avepool_nopad" type: "Pooling" bottom: "gconv" top: "avepool_nopad"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
layer { name: "floorpool" type: "Pooling" bottom: "gconv" top: "floorpool"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 ceil_mode: false } }
layer { name: "sum" type: "Eltwise" bottom: "maxpool" bottom: "avepool" top: "sum"
  eltwise_param { operation: SUM coeff: 0.5 coeff: -2 } }
layer { name: "prod" type: "Eltwise" bottom: "maxpool" bottom: "avepool" bottom: "sum" top: "prod"
  eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "sum" bottom: "prod" top: "max" eltwise_param { operation: MAX } }
layer { name: "sigmoid" type: "Sigmoid" bottom: "max" top: "sigmoid" }
layer { name: "tanh" type: "TanH" bottom: "sum" top: "tanh" }
layer { name: "concat" type: "Concat" bottom: "sigmoid" bottom: "tanh" top: "concat" }
layer { name: "deconv" type: "Deconvolution" bottom: "concat" top: "deconv" convolution_param { num_output: 3
  kernel_size: 3 stride: 2 pad: 1 weight_filler { type: "gaussian" std: 0.5 }
  bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "gap" type: "Pooling" bottom: "deconv" top: "gap" pooling_param { pool: AVE global_pooling: true } }
layer { name: "drop" type: "Dropout" bottom: "deconv" top: "drop" }
layer { name: "flat" type: "Flatten" bottom: "drop" top: "flat" }
layer { name: "reshape" type: "Reshape" bottom: "flat" top: "reshape"
  reshape_param { shape { dim: 0 dim: 3 dim: -1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "reshape" top: "ip" inner_product_param { num_output: 5
  weight_filler { type: "gaussian" std: 0.2 } bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "ipt" type: "InnerProduct" bottom: "ip" top: "ipt" inner_product_param { num_output: 4 transpose: true
  weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "prob" type: "Softmax" bottom: "ipt" top: "prob" }
layer { name: "train_only" type: "AbsVal" bottom: "prob" top: "abs" include { phase: TRAIN } }
"""
FLOAT_OPS_INPUTS = {
    "Input layer": 'layer { name: "input" type: "Input" top: "data" '
                   'input_param { shape { dim: 2 dim: 3 dim: 11 dim: 11 } } }',
    "legacy input fields": 'input: "data" input_shape { dim: 2 dim: 3 dim: 11 dim: 11 }',
}
FLOAT_OPS_OUTPUTS = ["avepool_nopad", "floorpool", "gap", "prob"]


@pytest.mark.parametrize("inputs", sorted(FLOAT_OPS_INPUTS))
def test_float_layers_match_caffe(tmp_path, inputs):
    model = tmp_path / "float_ops.prototxt"
    model.write_text(f'name: "float_ops"\n{FLOAT_OPS_INPUTS[inputs]}\n{FLOAT_OPS_LAYERS}')
    net = caffe.Net(str(model), caffe.TEST)
    rng = np.random.default_rng(5)
    mean, var, factor = net.params["bn"]
    mean.data[...] = rng.normal(size=mean.data.shape) * 2
    var.data[...] = rng.uniform(0.5, 2, size=var.data.shape) * 2
    factor.data[...] = 2  # Caffe divides the stored sums by this factor
    weights = tmp_path / "float_ops.caffemodel"
    net.save(str(weights))
    onnx_file = tmp_path / "float_ops.onnx"
    export_onnx(model, weights, onnx_file)
    session = _session(onnx_file)
    outputs = sorted(o.name for o in session.get_outputs())
    assert outputs == FLOAT_OPS_OUTPUTS, f"graph outputs {outputs}: the blobs no layer reads"
    x = rng.normal(size=(2, 3, 11, 11)).astype(np.float32)
    got = dict(zip(outputs, session.run(outputs, {"data": x})))
    expected = _caffe_outputs(model, weights, {"data": x}, outputs)
    for name in outputs:
        assert got[name].shape == expected[name].shape, f"{name}: onnx {got[name].shape}, caffe {expected[name].shape}"
        err = np.abs(got[name] - expected[name]).max()
        assert err <= 1e-5 + 1e-4 * np.abs(expected[name]).max(), f"{name}: largest |onnx - caffe| {err:.3g}"
