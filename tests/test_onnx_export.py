"""QDQ ONNX export of deploy models, run by onnxruntime and compared with Caffe."""
import os

os.environ.setdefault("GLOG_minloglevel", "2")
import caffe  # noqa: E402
import h5py  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402
import pytest  # noqa: E402
from google.protobuf import text_format  # noqa: E402

from amct_retrain import numerics, record  # noqa: E402
from amct_retrain.caffe_proto import caffe_pb2  # noqa: E402
from amct_retrain.export import float_layers  # noqa: E402
from amct_retrain.export.graph import OPSET  # noqa: E402
from amct_retrain.export.onnx import export_onnx  # noqa: E402
from amct_retrain.export.quantized import recover_scales  # noqa: E402
from amct_retrain.graph.model_io import ModelError  # noqa: E402
from amct_retrain.layer_types import QUANTIZABLE_RULES  # noqa: E402
from tests import nets, onnx_checks  # noqa: E402

pytestmark = pytest.mark.caffe
DEMO_LAYERS = ("conv1", "conv2", "ip1", "ip2")


_session = onnx_checks.session


def _caffe_outputs(model, weights, inputs: dict[str, np.ndarray], blobs) -> dict[str, np.ndarray]:
    """``blobs`` of a TEST net fed ``inputs`` (its data layers skipped)."""
    net = caffe.Net(str(model), caffe.TEST, weights=str(weights))
    for name, value in inputs.items():
        net.blobs[name].reshape(*value.shape)
        net.blobs[name].data[...] = value
    data_types = {"HDF5Data", "DummyData", "Input"}
    first = next(name for name, layer in zip(net._layer_names, net.layers) if layer.type not in data_types)
    # Up to the last writer of the blobs asked for: a loss layer would refuse another batch size.
    last = [name for name in net._layer_names if set(net.top_names[name]) & set(blobs)][-1]
    net.forward(start=first, end=last)
    return {b: net.blobs[b].data.copy() for b in blobs}


def _output_step(deploy_weights, dequant_layer: str) -> np.ndarray:
    """float64 (C,): deq * 2^N, the quantization step of a quantized layer's output."""
    net = caffe_pb2.NetParameter.FromString(open(deploy_weights, "rb").read())
    blob = next(layer.blobs[0] for layer in net.layer if layer.name == dequant_layer)
    deq, shift, _ = numerics.unpack_deq_scale(np.array(blob.uint64_data, np.uint64))
    return deq.astype(np.float64) * 2.0 ** shift


def _bits_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.int32) == np.asarray(b, np.float32).view(np.int32)


def test_exact_demo_onnx_equals_the_fake_quant_model_on_every_test_image(demo):
    with h5py.File(demo["out"] / "test.h5") as f:
        x, labels = f["data"][...], f["label"][...].astype(int)
    session = _session(demo["onnx"])
    inputs = {i.name: i.shape for i in session.get_inputs()}
    assert inputs == {"data": ["batch", *x.shape[1:]]}, f"graph inputs {inputs}: the data top, batch symbolic"
    fake = _caffe_outputs(demo["fake_quant_model"], demo["fake_quant_weights"], {"data": x}, ["ip2"])["ip2"]
    # All 450 images at once, then in batches of 7 (the prototxt's batch is neither).
    for got in (session.run(["ip2"], {"data": x})[0],
                np.concatenate([session.run(["ip2"], {"data": x[i:i + 7]})[0] for i in range(0, len(x), 7)])):
        same = _bits_equal(got, fake)
        assert same.all(), (f"{np.mean(~same.all(1)):.2%} of {len(x)} test images differ from the fake-quant "
                            f"model (largest |diff| {np.abs(got - fake).max():.6g})")
    assert np.mean(got.argmax(1) == labels) == np.mean(fake.argmax(1) == labels)


def test_exact_demo_layers_equal_numerics_on_a_million_activations_each(demo):
    compared = onnx_checks.assert_exact_on_random_activations(demo["deploy_model"], demo["deploy_weights"],
                                                              demo["onnx"])
    assert set(compared) == set(DEMO_LAYERS), f"layers compared: {compared}"


def test_exact_quant_multiplies_where_quantize_linear_divides(tmp_path):
    """The issue's example: x / s rounds to 101 where the deploy Quant layer's x * float32(1/s)
    gives 100; the export makes the Quant layer's codes (numerics.quant_layer_forward)."""
    from amct_retrain.export import onnx as exporter
    from amct_retrain.export.graph import IR_VERSION, Graph

    scale_d = np.float32(0.02302308)
    quant_scale = numerics.quant_multiplier(scale_d)
    x = np.float32(2.3138196)
    assert np.rint(x / scale_d) == 101 and np.rint(x * quant_scale) == 100, "the example no longer holds"
    rng = np.random.default_rng(1)
    offset = -20
    xs = np.concatenate([[x], onnx_checks.boundary_activations(rng, 1_000_000, quant_scale, offset)])
    g = Graph("test", {"x"}, {})
    g.add_input("x", (1,))
    q = float_layers.int8_codes(g, exporter._codes(g, "x", float(quant_scale), offset), offset)
    graph = onnx.helper.make_graph(g.nodes, "quant", g.inputs, [onnx.helper.make_tensor_value_info(
        q, onnx.TensorProto.INT8, ["batch"])], g.initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    got = _session(model).run(None, {"x": xs.astype(np.float32)})[0]
    expected = numerics.quant_layer_forward(xs, quant_scale, offset)
    assert got[0] == 100 - 20, f"code of the example {got[0]}, the Quant layer makes {100 - 20}"
    assert np.array_equal(got, expected), f"{np.count_nonzero(got != expected)} of {xs.size} codes differ"


def test_exact_demo_onnx_is_an_integer_graph(demo):
    model = onnx.load(str(demo["onnx"]))
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)], model.opset_import
    inits = {t.name: t for t in model.graph.initializer}
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops, "QuantizeLinear divides: not exact"
    integer = [n for n in model.graph.node if n.op_type in ("ConvInteger", "MatMulInteger")]
    assert [n.op_type for n in integer] == ["ConvInteger", "ConvInteger", "MatMulInteger", "MatMulInteger"], ops
    for n in integer:
        assert inits[n.input[1]].data_type == onnx.TensorProto.INT8, f"{n.name}: weights are not int8"
        assert nets.ops_after(model, n.output[0], 2) == ["Add", "Cast"], \
            f"{n.name}: the accumulator is not int32 + bias, then cast to double"
    model_text = text_format.Parse(open(demo["deploy_model"]).read(), caffe_pb2.NetParameter())
    for layer in model_text.layer:
        if layer.type == "Quant":
            multiplier = numpy_helper.to_array(inits[f"{layer.name}/quant_scale"])
            assert multiplier == np.float32(layer.quant_param.scale), \
                f"{layer.name}: multiplies by {multiplier!r}, the Quant layer by {layer.quant_param.scale!r}"


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


def test_retrained_small_net_exports_exactly(retrained, tmp_path):
    """DummyData input (its target dropped), per-channel and grouped convs, per-tensor fc: equal
    to the fake-quant model at a batch the prototxt does not have, and to numerics per layer."""
    onnx_file = tmp_path / "small.onnx"
    export_onnx(retrained["deploy_model"], retrained["deploy_weights"], onnx_file, mode="exact")
    session = _session(onnx_file)
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    assert names == (["data"], ["fc"]), f"inputs / outputs {names}: the label 'target' must be dropped"
    x = np.random.default_rng(3).normal(size=(9, *session.get_inputs()[0].shape[1:])).astype(np.float32)
    got = session.run(["fc"], {"data": x})[0]
    fake = _caffe_outputs(retrained["fake_quant_model"], retrained["fake_quant_weights"], {"data": x}, ["fc"])["fc"]
    same = _bits_equal(got, fake)
    assert same.all(), f"{np.mean(~same):.2%} of the outputs differ; largest {np.abs(got - fake).max():.6g}"
    compared = onnx_checks.assert_exact_on_random_activations(retrained["deploy_model"],
                                                              retrained["deploy_weights"], onnx_file)
    assert set(compared) == set(nets.QUANTIZED), f"layers compared: {compared}"


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


@pytest.mark.parametrize("mode", ["exact", "standard"])
@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_deploy_blobs_contradicting_the_model_are_errors_naming_the_layer(request, tmp_path, case, mode):
    source, layer, edit = CORRUPTIONS[case]
    model_file, weights_file = _corrupt(request.getfixturevalue(source), tmp_path, layer, edit)
    onnx_file = tmp_path / "bad.onnx"
    with pytest.raises(ValueError, match=f"'{layer.split('_')[0]}") as err:
        export_onnx(model_file, weights_file, onnx_file, input_shapes={"data": INPUT_SHAPES[source]}, mode=mode)
    assert not onnx_file.exists(), f"{case}: an ONNX file was written despite {err.value}"


def test_unsupported_layer_type_is_an_error_naming_it(demo, tmp_path):
    model = text_format.Parse(open(demo["deploy_model"]).read(), caffe_pb2.NetParameter())
    model.layer.add().CopyFrom(text_format.Parse(
        'name: "cols" type: "Im2col" bottom: "ip2" top: "cols" convolution_param { kernel_size: 1 }',
        caffe_pb2.LayerParameter()))
    model_file = tmp_path / "im2col.prototxt"
    model_file.write_text(text_format.MessageToString(model))
    with pytest.raises(ModelError, match="layer 'cols' has type 'Im2col', which the ONNX export does not support"):
        export_onnx(model_file, demo["deploy_weights"], tmp_path / "im2col.onnx")
    assert not (tmp_path / "im2col.onnx").exists()


def test_input_shapes_override_caffe_and_must_name_the_inputs(demo, tmp_path):
    onnx_file = tmp_path / "batch2.onnx"
    export_onnx(demo["deploy_model"], demo["deploy_weights"], onnx_file, input_shapes={"data": (2, 1, 8, 8)})
    shapes = [i.shape for i in _session(onnx_file).get_inputs()]
    assert shapes == [["batch", 1, 8, 8]], f"input shapes {shapes}: the batch axis stays symbolic"
    with pytest.raises(ModelError, match=r"missing \['data'\], unknown \['image'\]"):
        export_onnx(demo["deploy_model"], demo["deploy_weights"], onnx_file, input_shapes={"image": (1, 1, 8, 8)})
    # 9x9 images give ip1 800 inputs where its weights take 512.
    with pytest.raises(ModelError, match="node name: ip1/.*(512 and 800|Incompatible dimensions)"):
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


# The rest of BVLC Caffe's standard layers that ONNX expresses; the Input layer's batch is 2,
# the test feeds 3 (the batch axis is symbolic).
MORE_FLOAT_LAYERS = """name: "more_float_ops"
layer { name: "input" type: "Input" top: "data" top: "ids" top: "picks"
  input_param { shape { dim: 2 dim: 4 dim: 7 dim: 7 } shape { dim: 2 dim: 3 } shape { dim: 4 } } }
layer { name: "lrn" type: "LRN" bottom: "data" top: "lrn" lrn_param { local_size: 3 alpha: 0.5 beta: 0.6 k: 2 } }
layer { name: "lrn_within" type: "LRN" bottom: "data" top: "lrn_within"
  lrn_param { local_size: 3 alpha: 0.7 beta: 0.8 norm_region: WITHIN_CHANNEL } }
layer { name: "prelu" type: "PReLU" bottom: "lrn" top: "prelu" prelu_param { filler { type: "gaussian" std: 1 } } }
layer { name: "prelu_shared" type: "PReLU" bottom: "lrn_within" top: "prelu_shared"
  prelu_param { channel_shared: true filler { type: "constant" value: 0.3 } } }
layer { name: "elu" type: "ELU" bottom: "data" top: "elu" elu_param { alpha: 0.5 } }
layer { name: "abs" type: "AbsVal" bottom: "data" top: "abs" }
layer { name: "bnll" type: "BNLL" bottom: "data" top: "bnll" }
layer { name: "power" type: "Power" bottom: "abs" top: "power" power_param { power: 0.5 scale: 2 shift: 0.1 } }
layer { name: "square" type: "Power" bottom: "data" top: "square" power_param { power: 2 shift: -0.5 } }
layer { name: "affine" type: "Power" bottom: "data" top: "affine" power_param { scale: -3 shift: 0.5 } }
layer { name: "exp" type: "Exp" bottom: "data" top: "exp" }
layer { name: "exp2" type: "Exp" bottom: "data" top: "exp2" exp_param { base: 2 scale: 0.5 shift: 0.3 } }
layer { name: "log" type: "Log" bottom: "power" top: "log" }
layer { name: "log10" type: "Log" bottom: "abs" top: "log10" log_param { base: 10 scale: 2 shift: 1 } }
layer { name: "threshold" type: "Threshold" bottom: "data" top: "threshold" threshold_param { threshold: 0.2 } }
layer { name: "slice" type: "Slice" bottom: "elu" top: "s1" top: "s2" top: "s3" slice_param { axis: 1 slice_point: 1 slice_point: 3 } }
layer { name: "halves" type: "Slice" bottom: "bnll" top: "h1" top: "h2" }
layer { name: "split" type: "Split" bottom: "h1" top: "h1a" top: "h1b" }
layer { name: "sum" type: "Eltwise" bottom: "h1a" bottom: "h2" bottom: "h1b" top: "sum"
  eltwise_param { operation: SUM coeff: 1.5 coeff: -1 coeff: 0.25 } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" pooling_param { pool: MAX kernel_size: 3 stride: 1 } }
layer { name: "crop" type: "Crop" bottom: "lrn" bottom: "pool" top: "crop" crop_param { axis: 2 offset: 1 offset: 2 } }
layer { name: "argmax" type: "ArgMax" bottom: "data" top: "argmax" argmax_param { top_k: 3 out_max_val: true } }
layer { name: "argmax_c" type: "ArgMax" bottom: "data" top: "argmax_c" argmax_param { axis: 1 } }
layer { name: "argmax_vals" type: "ArgMax" bottom: "data" top: "argmax_vals" argmax_param { axis: 3 top_k: 2 out_max_val: true } }
layer { name: "flat" type: "Flatten" bottom: "prelu" top: "flat" flatten_param { axis: 1 end_axis: 2 } }
layer { name: "reshape" type: "Reshape" bottom: "prelu_shared" top: "reshape"
  reshape_param { axis: 1 num_axes: 1 shape { dim: 2 dim: -1 } } }
layer { name: "param" type: "Parameter" top: "param" parameter_param { shape { dim: 4 } } }
layer { name: "mean_hw" type: "Reduction" bottom: "data" top: "mean_hw" reduction_param { operation: MEAN axis: 2 } }
layer { name: "scale2" type: "Scale" bottom: "square" bottom: "mean_hw" top: "scale2" scale_param { axis: 0 } }
layer { name: "scale_bias2" type: "Scale" bottom: "affine" bottom: "param" top: "scale_bias2"
  scale_param { bias_term: true bias_filler { type: "gaussian" std: 1 } } }
layer { name: "bias" type: "Bias" bottom: "exp2" top: "bias" bias_param { filler { type: "gaussian" std: 1 } } }
layer { name: "bias2" type: "Bias" bottom: "log10" bottom: "param" top: "bias2" }
layer { name: "asum" type: "Reduction" bottom: "data" top: "asum" reduction_param { operation: ASUM axis: 1 coeff: 0.5 } }
layer { name: "sumsq" type: "Reduction" bottom: "data" top: "sumsq" reduction_param { operation: SUMSQ axis: 2 } }
layer { name: "total" type: "Reduction" bottom: "data" top: "total" reduction_param { operation: SUM axis: 1 coeff: -2 } }
layer { name: "mvn" type: "MVN" bottom: "exp" top: "mvn" }
layer { name: "mvn_across" type: "MVN" bottom: "threshold" top: "mvn_across"
  mvn_param { across_channels: true normalize_variance: false } }
layer { name: "tile" type: "Tile" bottom: "s1" top: "tile" tile_param { axis: 1 tiles: 3 } }
layer { name: "embed" type: "Embed" bottom: "ids" top: "embed" embed_param { num_output: 6 input_dim: 5
  weight_filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 } } }
layer { name: "reindex" type: "BatchReindex" bottom: "log" bottom: "picks" top: "reindex" }
layer { name: "silence" type: "Silence" bottom: "s2" bottom: "s3" }
layer { name: "drop" type: "Dropout" bottom: "sum" top: "drop" dropout_param { dropout_ratio: 0.3 } }
"""
MORE_FLOAT_OUTPUTS = sorted(["argmax", "argmax_c", "argmax_vals", "asum", "bias", "bias2", "crop", "drop",
                             "embed", "flat", "mvn", "mvn_across", "reindex", "reshape", "scale2", "scale_bias2",
                             "sumsq", "tile", "total"])


def test_more_float_layers_match_caffe_at_another_batch_size(tmp_path):
    model = tmp_path / "more_float_ops.prototxt"
    model.write_text(MORE_FLOAT_LAYERS)
    weights = tmp_path / "more_float_ops.caffemodel"
    net = caffe.Net(str(model), caffe.TEST)
    rng = np.random.default_rng(7)
    net.params["param"][0].data[...] = rng.normal(size=4)
    net.save(str(weights))
    onnx_file = tmp_path / "more_float_ops.onnx"
    export_onnx(model, weights, onnx_file, mode="exact")
    session = _session(onnx_file)
    outputs = sorted(o.name for o in session.get_outputs())
    assert outputs == MORE_FLOAT_OUTPUTS, f"graph outputs {outputs}: the blobs no layer reads"
    batch = 3
    inputs = {"data": rng.normal(size=(batch, 4, 7, 7)).astype(np.float32),
              "ids": rng.integers(0, 5, size=(batch, 3)).astype(np.float32),
              "picks": np.array([2, 0, 1, 2], np.float32)}
    got = dict(zip(outputs, session.run(outputs, inputs)))
    net = caffe.Net(str(model), caffe.TEST, weights=str(weights))
    for name, value in inputs.items():
        net.blobs[name].reshape(*value.shape)
        net.blobs[name].data[...] = value
    net.forward()
    for name in outputs:
        expected = net.blobs[name].data
        assert got[name].shape == expected.shape, f"{name}: onnx {got[name].shape}, caffe {expected.shape}"
        err = np.abs(got[name] - expected).max()
        assert err <= 1e-5 + 1e-5 * np.abs(expected).max(), f"{name}: largest |onnx - caffe| {err:.3g}"


def test_every_quantizable_type_has_its_onnx_converters():
    types = set(QUANTIZABLE_RULES)
    assert set(float_layers.EXACT_ACCUMULATORS) == types, "one exact integer accumulator per quantizable type"
    assert types <= set(float_layers.FLOAT_CONVERTERS), f"no float converter for {types - set(float_layers.FLOAT_CONVERTERS)}"
