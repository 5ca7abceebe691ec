"""BatchNorm fusion: each fused net, run by Caffe, computes what the original net computed."""
import copy
import logging

import caffe
import numpy as np
import pytest
from caffe.proto import caffe_pb2
from google.protobuf import text_format

from amct_retrain.graph import fuse
from amct_retrain.graph.model_io import ModelError, caffemodel_bytes, read_prototxt

pytestmark = pytest.mark.caffe
LOG = logging.getLogger(__name__)
TOLERANCE = 1e-5  # max |fused - original| / max |original| over every net output


def _input(shape=(2, 4, 8, 8)) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}\n'


def _conv(name, bottom, top, num_output, extra="", layer_type="Convolution", rules="") -> str:
    return (f'layer {{ name: "{name}" type: "{layer_type}" bottom: "{bottom}" top: "{top}" {rules}\n'
            f'  convolution_param {{ num_output: {num_output} kernel_size: 3 {extra} }} }}\n')


def _bn(name, bottom, top, param="use_global_stats: true", rules="") -> str:
    return (f'layer {{ name: "{name}" type: "BatchNorm" bottom: "{bottom}" top: "{top}" {rules}\n'
            f'  batch_norm_param {{ {param} }} }}\n')


def _scale(name, bottom, top, bias=True, rules="") -> str:
    return (f'layer {{ name: "{name}" type: "Scale" bottom: "{bottom}" top: "{top}" {rules}\n'
            f'  scale_param {{ bias_term: {str(bias).lower()} }} }}\n')


def _layer(name, layer_type, bottom, top, extra="") -> str:
    return f'layer {{ name: "{name}" type: "{layer_type}" bottom: "{bottom}" top: "{top}" {extra} }}\n'


def _random_net(model_file, seed: int, bn_factor: float) -> caffe.Net:
    """The TEST net of ``model_file`` with every blob random; BatchNorm blobs hold the running
    sums of a mean and a positive variance under moving average factor ``bn_factor``."""
    rng = np.random.default_rng(seed)
    net = caffe.Net(str(model_file), caffe.TEST)
    for name, blobs in net.params.items():
        if net.layer_dict[name].type == "BatchNorm":
            channels = blobs[0].data.shape
            blobs[0].data[...] = rng.normal(0, 1, channels) * bn_factor
            blobs[1].data[...] = rng.uniform(0.5, 1.5, channels) * bn_factor
            blobs[2].data[...] = bn_factor
        else:
            for blob in blobs:
                blob.data[...] = rng.normal(0, 0.5, blob.data.shape)
    return net


def _outputs(net: caffe.Net, x: np.ndarray) -> dict[str, np.ndarray]:
    net.blobs["data"].data[...] = x
    return {name: blob.copy() for name, blob in net.forward().items()}


def fuse_and_compare(tmp_path, text: str, fusion=fuse.fuse_batchnorm, skip=(), bn_factor: float = 0.9,
                     seed: int = 0):
    """Build ``text`` in Caffe with random blobs, fuse it, run both nets on one input.

    Returns (original net, fused net, groups, max relative difference of the outputs); also
    checks that the fusion left its inputs as they were.
    """
    model = tmp_path / "original.prototxt"
    model.write_text('name: "fuse_test"\n' + text)
    caffe_net = _random_net(model, seed, bn_factor)
    x = np.random.default_rng(seed + 1).normal(0, 1, caffe_net.blobs["data"].data.shape)
    expected = _outputs(caffe_net, x)
    net = read_prototxt(model)
    params = {name: [b.data.copy() for b in blobs] for name, blobs in caffe_net.params.items()}
    net_before, params_before = copy.deepcopy(net), copy.deepcopy(params)

    fused_net, fused_params, groups = fusion(net, params, skip=skip)

    assert net == net_before, "the fusion modified its input net"
    assert params.keys() == params_before.keys() and all(
        all(np.array_equal(a, b) for a, b in zip(params[k], params_before[k])) for k in params), \
        "the fusion modified its input weights"
    fused_model, fused_weights = tmp_path / "fused.prototxt", tmp_path / "fused.caffemodel"
    fused_model.write_text(text_format.MessageToString(fused_net))
    fused_weights.write_bytes(caffemodel_bytes(fused_net.name, fused_params))
    got = _outputs(caffe.Net(str(fused_model), caffe.TEST, weights=str(fused_weights)), x)
    assert got.keys() == expected.keys(), f"net outputs changed: {sorted(expected)} -> {sorted(got)}"
    rel = max(float(np.abs(got[k] - expected[k]).max() / np.abs(expected[k]).max()) for k in expected)
    LOG.info("%s: max relative difference %.3g", groups or "unfused", rel)
    assert rel <= TOLERANCE, f"fused outputs differ from the original: max relative difference {rel:.3g}"
    return net, fused_net, groups, rel


def _types(net: caffe_pb2.NetParameter) -> list[str]:
    return [layer.type for layer in net.layer]


CONV_BN_SCALE_IN_PLACE = (_input() + _conv("conv1", "data", "conv1", 6, "pad: 1")
                          + _bn("bn1", "conv1", "conv1") + _scale("scale1", "conv1", "conv1"))


def test_conv_bn_scale_in_place(tmp_path):
    _, fused, groups, rel = fuse_and_compare(tmp_path, CONV_BN_SCALE_IN_PLACE, fuse.fold_conv_batchnorm)
    assert groups == [fuse.FusedGroup("conv_bn", "conv1", ("bn1", "scale1"))], f"groups: {groups}"
    assert _types(fused) == ["Input", "Convolution"], f"layers left: {_types(fused)} (rel diff {rel:.3g})"


def test_conv_without_bias_bn_scale_not_in_place_keeps_the_output_blob(tmp_path):
    text = (_input() + _conv("conv1", "data", "conv1", 6, "pad: 1 bias_term: false")
            + _bn("bn1", "conv1", "bn1") + _scale("scale1", "bn1", "scale1")
            + _layer("relu1", "ReLU", "scale1", "scale1") + _conv("conv2", "scale1", "conv2", 3))
    _, fused, groups, rel = fuse_and_compare(tmp_path, text, fuse.fold_conv_batchnorm, bn_factor=1.0)
    assert groups == [fuse.FusedGroup("conv_bn", "conv1", ("bn1", "scale1"))], f"groups: {groups}"
    conv1 = fused.layer[1]
    assert conv1.convolution_param.bias_term and list(conv1.top) == ["scale1"], \
        f"conv1 should gain a bias and write the Scale's blob: {conv1}"


def test_conv_with_bias_bn_without_scale(tmp_path):
    text = _input() + _conv("conv1", "data", "conv1", 5, "stride: 2") + _bn("bn1", "conv1", "bn1")
    _, fused, groups, rel = fuse_and_compare(tmp_path, text, fuse.fold_conv_batchnorm)
    assert groups == [fuse.FusedGroup("conv_bn", "conv1", ("bn1",))], f"groups: {groups}"
    assert list(fused.layer[1].top) == ["bn1"], f"conv1 should write 'bn1': {fused.layer[1]}"


@pytest.mark.parametrize("group, num_output", [(2, 6), (4, 4), (4, 8)], ids=["grouped", "depthwise", "depthwise_x2"])
def test_grouped_and_depthwise_conv(tmp_path, group, num_output):
    text = (_input() + _conv("conv1", "data", "conv1", num_output, f"pad: 1 group: {group}")
            + _bn("bn1", "conv1", "conv1") + _scale("scale1", "conv1", "conv1"))
    _, fused, groups, rel = fuse_and_compare(tmp_path, text, fuse.fold_conv_batchnorm)
    assert [g.layer for g in groups] == ["conv1"], f"group {group} conv not fused: {groups}"


def test_deconv_bn_scale(tmp_path):
    text = (_input() + _conv("deconv1", "data", "deconv1", 6, "stride: 2", "Deconvolution")
            + _bn("bn1", "deconv1", "bn1") + _scale("scale1", "bn1", "bn1", bias=False))
    _, fused, groups, rel = fuse_and_compare(tmp_path, text, fuse.fold_deconv_batchnorm)
    assert groups == [fuse.FusedGroup("deconv_bn", "deconv1", ("bn1", "scale1"))], f"groups: {groups}"
    assert _types(fused) == ["Input", "Deconvolution"], f"layers left: {_types(fused)}"


def test_grouped_deconv_is_left_with_a_warning(tmp_path, caplog):
    text = (_input() + _conv("deconv1", "data", "deconv1", 6, "stride: 2 group: 2", "Deconvolution")
            + _bn("bn1", "deconv1", "bn1") + _scale("scale1", "bn1", "bn1"))
    with caplog.at_level(logging.WARNING, logger=fuse.__name__):
        net, fused, groups, rel = fuse_and_compare(tmp_path, text)
    assert not groups and fused == net, f"a group-2 Deconvolution was fused: {groups}"
    assert "deconv1" in caplog.text and "group 2" in caplog.text, f"no warning naming the group: {caplog.text!r}"


@pytest.mark.parametrize("transpose", [False, True])
def test_fc_bn_scale_after_a_spatial_input(tmp_path, transpose):
    fc_param = f"inner_product_param {{ num_output: 7 transpose: {str(transpose).lower()} }}"
    text = (_input() + _conv("conv1", "data", "conv1", 5) + _layer("fc1", "InnerProduct", "conv1", "fc1", fc_param)
            + _bn("bn1", "fc1", "fc1") + _scale("scale1", "fc1", "fc1"))
    _, fused, groups, rel = fuse_and_compare(tmp_path, text, fuse.fold_fc_batchnorm)
    assert groups == [fuse.FusedGroup("fc_bn", "fc1", ("bn1", "scale1"))], f"groups: {groups}"
    assert _types(fused) == ["Input", "Convolution", "InnerProduct"], f"layers left: {_types(fused)}"


def test_bn_scale_before_an_unpadded_conv(tmp_path):
    text = (_input() + _bn("bn0", "data", "bn0") + _scale("scale0", "bn0", "bn0")
            + _conv("conv1", "bn0", "conv1", 6, "stride: 2 bias_term: false"))
    _, fused, groups, rel = fuse_and_compare(tmp_path, text, fuse.fold_batchnorm_into_next_conv)
    assert groups == [fuse.FusedGroup("bn_conv", "conv1", ("bn0", "scale0"))], f"groups: {groups}"
    conv1 = fused.layer[1]
    assert list(conv1.bottom) == ["data"] and conv1.convolution_param.bias_term, \
        f"conv1 should read 'data' and gain a bias: {conv1}"


def test_bn_scale_before_a_padded_conv_is_left(tmp_path, caplog):
    text = (_input() + _bn("bn0", "data", "bn0") + _scale("scale0", "bn0", "bn0")
            + _conv("conv1", "bn0", "conv1", 6, "pad: 1"))
    with caplog.at_level(logging.WARNING, logger=fuse.__name__):
        net, fused, groups, rel = fuse_and_compare(tmp_path, text)
    assert not groups and fused == net, f"BN before a padded conv was fused: {groups}"
    assert "pads" in caplog.text, f"no warning about the padding: {caplog.text!r}"


def test_blob_with_two_readers_is_left(tmp_path):
    text = (_input() + _conv("conv1", "data", "conv1", 6) + _bn("bn1", "conv1", "bn1")
            + _scale("scale1", "bn1", "bn1") + _layer("relu1", "ReLU", "conv1", "relu1"))
    net, fused, groups, rel = fuse_and_compare(tmp_path, text)
    assert not groups and fused == net, f"conv1 feeds bn1 and relu1 but was fused: {groups}"


@pytest.mark.parametrize("skip", [("conv1",), ("bn1",)])
def test_skip_is_honoured(tmp_path, skip):
    net, fused, groups, rel = fuse_and_compare(tmp_path, CONV_BN_SCALE_IN_PLACE, skip=skip)
    assert not groups and fused == net, f"skip={skip} ignored: {groups}"


def test_skipped_scale_stays_after_the_fused_conv(tmp_path):
    _, fused, groups, rel = fuse_and_compare(tmp_path, CONV_BN_SCALE_IN_PLACE, skip=("scale1",))
    assert groups == [fuse.FusedGroup("conv_bn", "conv1", ("bn1",))], f"groups: {groups}"
    assert _types(fused) == ["Input", "Convolution", "Scale"], f"layers left: {_types(fused)}"


def test_bn_in_train_without_global_stats_is_an_error(tmp_path):
    text = _input() + _conv("conv1", "data", "conv1", 6) + _bn("bn_train", "conv1", "conv1", "use_global_stats: false")
    with pytest.raises(ModelError) as e:
        fuse_and_compare(tmp_path, text)
    assert "bn_train" in str(e.value) and "use_global_stats: true" in str(e.value), f"message: {e.value}"


def test_unset_global_stats_fuses_and_false_is_refused_for_the_true_reason(tmp_path):
    """Unset use_global_stats (a train_val.prototxt's BatchNorm): the stored statistics in TEST,
    where the fused models run, so it fuses; false normalises with batch statistics in TEST too."""
    unset = _input() + _conv("conv1", "data", "conv1", 6) + _bn("bn1", "conv1", "conv1", "")
    _, _, groups, rel = fuse_and_compare(tmp_path, unset)
    assert [g.layer for g in groups] == ["conv1"], f"a BatchNorm with use_global_stats unset was not fused: {groups}"
    false = _input() + _conv("conv1", "data", "conv1", 6) + _bn("bn1", "conv1", "conv1", "use_global_stats: false")
    with pytest.raises(ModelError) as e:
        fuse_and_compare(tmp_path, false)
    message = str(e.value)
    assert "bn1" in message and "TEST phase too" in message and "TRAIN" not in message, f"message: {message}"


def test_scale_with_other_phase_rules_stays(tmp_path):
    text = (_input() + _conv("conv1", "data", "conv1", 6) + _bn("bn1", "conv1", "conv1")
            + _scale("scale1", "conv1", "conv1", rules="include { phase: TEST }"))
    _, fused, groups, rel = fuse_and_compare(tmp_path, text)
    assert groups == [fuse.FusedGroup("conv_bn", "conv1", ("bn1",))], f"groups: {groups}"
    assert _types(fused) == ["Input", "Convolution", "Scale"], f"the TEST-only Scale must stay: {_types(fused)}"


def test_fuse_batchnorm_applies_all_four(tmp_path):
    text = (_input((2, 4, 10, 10)) + _bn("bn0", "data", "bn0") + _scale("scale0", "bn0", "bn0")
            + _conv("conv1", "bn0", "conv1", 6) + _bn("bn1", "conv1", "conv1") + _scale("scale1", "conv1", "conv1")
            + _layer("relu1", "ReLU", "conv1", "conv1")
            + _conv("deconv1", "conv1", "deconv1", 4, "stride: 2", "Deconvolution") + _bn("bn2", "deconv1", "bn2")
            + _layer("relu2", "ReLU", "bn2", "bn2") + _conv("conv2", "bn2", "conv2", 6, "pad: 1 group: 2")
            + _bn("bn3", "conv2", "conv2")
            + _layer("pool", "Pooling", "conv2", "pool", "pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
            + _layer("fc1", "InnerProduct", "pool", "fc1", "inner_product_param { num_output: 5 }")
            + _bn("bn4", "fc1", "bn4") + _scale("scale4", "bn4", "out"))
    _, fused, groups, rel = fuse_and_compare(tmp_path, text)
    expected = {fuse.FusedGroup("conv_bn", "conv1", ("bn1", "scale1")), fuse.FusedGroup("conv_bn", "conv2", ("bn3",)),
                fuse.FusedGroup("deconv_bn", "deconv1", ("bn2",)), fuse.FusedGroup("fc_bn", "fc1", ("bn4", "scale4")),
                fuse.FusedGroup("bn_conv", "conv1", ("bn0", "scale0"))}
    assert set(groups) == expected and len(groups) == len(expected), f"groups: {groups}"
    assert not {"BatchNorm", "Scale"} & set(_types(fused)), f"layers left: {_types(fused)}"


def test_zero_moving_average_factor_reads_as_zero_statistics():
    """Caffe reads mean = var = 0 when the moving average factor is 0."""
    bn = caffe_pb2.LayerParameter(name="bn", type="BatchNorm")
    a, b = fuse.batchnorm_affine(bn, [np.ones(3), np.ones(3), np.zeros(1)])
    eps = bn.batch_norm_param.eps
    assert np.allclose(a, 1 / np.sqrt(eps)) and np.allclose(b, 0), f"a={a}, b={b}"
