"""Nets of real published shapes for tests/test_published_models.py.

* The BVLC deploy definitions that ship in the Caffe source tree the project builds
  (``<src>/models``): AlexNet, CaffeNet, GoogLeNet, R-CNN, shrunk for CI (batch, input size,
  the width of the big InnerProduct layers) and given a small TRAIN-only loss.
* NetSpec-built nets in the style of published ones: a ResNet-50-style net (Conv + BatchNorm +
  Scale + ReLU, bottleneck blocks with projection shortcuts), a MobileNet-style net (depthwise
  + pointwise convolutions, each with BatchNorm + Scale), an MLP (InnerProduct + BatchNorm +
  Scale + ReLU), and small nets with the graph shapes that trip graph passes (explicit Split,
  Concat of quantized branches, phase rules, TRAIN/TEST data layers, legacy ``input:`` fields).

Every builder returns a ``caffe_pb2.NetParameter``; :func:`float_weights` gives it weights from
Caffe's own fillers (and BatchNorm statistics from a few TRAIN forwards, as training leaves them).
"""
import pathlib
from dataclasses import dataclass, field

import caffe
import numpy as np
from caffe import layers as L
from caffe import params as P
from google.protobuf import text_format

from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.graph import model_io

QUANTIZABLE_TYPES = ("Convolution", "InnerProduct")


def caffe_models_dir() -> pathlib.Path:
    """``<src>/models`` of the Caffe source tree pycaffe was built from (``<src>/python/caffe``)."""
    return pathlib.Path(caffe.__file__).resolve().parents[2] / "models"


# --------------------------------------------------------------------------- BVLC deploy nets


@dataclass(frozen=True)
class Published:
    """How one BVLC deploy definition is shrunk for CI; every other layer is as published."""
    folder: str
    size: int                                   # input H = W (published: 227, GoogLeNet 224)
    num_output: dict[str, int] = field(default_factory=dict)  # big InnerProduct layers -> smaller width
    fillers_from: str | None = None             # train_val.prototxt giving the fillers deploy lacks
    global_pool: tuple[str, ...] = ()           # fixed-size final AVE pools made global (same at full size)


PUBLISHED = {
    # 99 x 99 keeps every stage (conv1 23x23, pool5 2x2); fc6/fc7 4096 -> 64 keeps the weights small.
    "alexnet": Published("bvlc_alexnet", 99, {"fc6": 64, "fc7": 64}, fillers_from="bvlc_alexnet"),
    "caffenet": Published("bvlc_reference_caffenet", 99, {"fc6": 64, "fc7": 64},
                          fillers_from="bvlc_reference_caffenet"),
    # R-CNN is CaffeNet fine-tuned (no train_val ships): CaffeNet's fillers.
    "rcnn": Published("bvlc_reference_rcnn_ilsvrc13", 99, {"fc6": 64, "fc7": 64},
                      fillers_from="bvlc_reference_caffenet"),
    # 64 x 64: inception 3x at 8x8, 4x at 4x4, 5x at 2x2; its 7x7 average pool (global at 224) made global.
    "googlenet": Published("bvlc_googlenet", 64, global_pool=("pool5/7x7_s1",)),
}
# For a layer that no train_val.prototxt describes (R-CNN's fc-rcnn): CaffeNet's fc8 fillers.
DEFAULT_FILLERS = (caffe_pb2.FillerParameter(type="gaussian", std=0.01),
                   caffe_pb2.FillerParameter(type="constant", value=0.0))


def _train_val_fillers(folder: str) -> dict[str, tuple[caffe_pb2.FillerParameter, caffe_pb2.FillerParameter]]:
    net = model_io.read_prototxt(caffe_models_dir() / folder / "train_val.prototxt")
    out = {}
    for layer in net.layer:
        p = layer.inner_product_param if layer.type == "InnerProduct" else layer.convolution_param
        if layer.type in QUANTIZABLE_TYPES and p.HasField("weight_filler"):
            out[layer.name] = (p.weight_filler, p.bias_filler)
    return out


def _set_fillers(layer: caffe_pb2.LayerParameter, fillers) -> None:
    p = layer.inner_product_param if layer.type == "InnerProduct" else layer.convolution_param
    if p.HasField("weight_filler"):
        return
    p.weight_filler.CopyFrom(fillers[0])
    p.bias_filler.CopyFrom(fillers[1])


def _classifier(net: caffe_pb2.NetParameter) -> caffe_pb2.LayerParameter:
    return [layer for layer in net.layer if layer.type == "InnerProduct"][-1]


def published_net(name: str, batch: int = 2) -> caffe_pb2.NetParameter:
    """The BVLC deploy definition ``name`` (a key of :data:`PUBLISHED`) as CI trains it.

    Changed from the file: the Input shape (``batch`` x 3 x size x size), ``num_output`` of the
    big InnerProduct layers, fillers where the deploy file has none (from the model's
    train_val.prototxt), GoogLeNet's final 7x7 average pool made global, and a TRAIN-only
    ``label`` DummyData + ``loss`` SoftmaxWithLoss on the classifier. Everything else as published.
    """
    spec = PUBLISHED[name]
    net = model_io.read_prototxt(caffe_models_dir() / spec.folder / "deploy.prototxt")
    fillers = _train_val_fillers(spec.fillers_from) if spec.fillers_from else {}
    inputs = [layer for layer in net.layer if layer.type == "Input"]
    assert len(inputs) == 1 and len(inputs[0].input_param.shape) == 1, f"{spec.folder}: one Input layer expected"
    inputs[0].input_param.shape[0].dim[:] = [batch, 3, spec.size, spec.size]
    for layer in net.layer:
        if layer.type in QUANTIZABLE_TYPES:
            _set_fillers(layer, fillers.get(layer.name, DEFAULT_FILLERS))
        if layer.name in spec.num_output:
            layer.inner_product_param.num_output = spec.num_output[layer.name]
        if layer.name in spec.global_pool:
            pool = layer.pooling_param
            pool.ClearField("kernel_size")
            pool.ClearField("stride")
            pool.global_pooling = True
    classifier = _classifier(net)
    classes = classifier.inner_product_param.num_output
    label = net.layer.add()
    text_format.Parse(f"""name: "label" type: "DummyData" top: "label" include {{ phase: TRAIN }}
        dummy_data_param {{ shape {{ dim: {batch} }} data_filler {{ type: "uniform" min: 0 max: {classes - 1} }} }}""",
                      label)
    loss = net.layer.add()
    text_format.Parse(f"""name: "loss" type: "SoftmaxWithLoss" bottom: "{classifier.top[0]}" bottom: "label"
        top: "loss" include {{ phase: TRAIN }}""", loss)
    return net


# --------------------------------------------------------------------------- NetSpec helpers

GAUSSIAN = dict(type="gaussian", std=1)


def _data(n: caffe.NetSpec, shape: list[int], classes: int, batch: int) -> None:
    """DummyData ``data`` (gaussian, refilled every forward) and ``label`` (uniform class ids)."""
    n.data, n.label = L.DummyData(shape=[dict(dim=shape), dict(dim=[batch])],
                                  data_filler=[GAUSSIAN, dict(type="uniform", min=0, max=classes - 1)], ntop=2)


def _head(n: caffe.NetSpec, scores) -> None:
    """SoftmaxWithLoss in both phases, Accuracy in TEST only (as train_val files have them)."""
    n.loss = L.SoftmaxWithLoss(scores, n.label)
    n.accuracy = L.Accuracy(scores, n.label, include=dict(phase=caffe.TEST))


def _conv_bn(n: caffe.NetSpec, name: str, bottom, num_output: int, kernel: int, stride: int = 1, pad: int = 0,
             group: int = 1, bias: bool = False, bn: str = "", scale: str = "", relu: str | None = None):
    """Convolution ``name`` + in-place BatchNorm ``bn`` (use_global_stats false, as train_val files
    have it) + in-place Scale ``scale`` (with bias) + an in-place ReLU ``relu`` if named."""
    n[name] = L.Convolution(bottom, num_output=num_output, kernel_size=kernel, stride=stride, pad=pad, group=group,
                            bias_term=bias, weight_filler=dict(type="msra"))
    n[bn] = L.BatchNorm(n[name], in_place=True, batch_norm_param=dict(use_global_stats=False))
    n[scale] = L.Scale(n[name], in_place=True, scale_param=dict(bias_term=True))
    if relu:
        n[relu] = L.ReLU(n[name], in_place=True)
    return n[name]


def _to_net(n: caffe.NetSpec, name: str) -> caffe_pb2.NetParameter:
    net = n.to_proto()
    net.name = name
    return net


# --------------------------------------------------------------------------- ResNet / MobileNet / MLP


def resnet_net(batch: int = 2, size: int = 32, classes: int = 10) -> caffe_pb2.NetParameter:
    """ResNet-50's layout at small width and resolution: conv1 7x7/2 + BN + Scale + ReLU, pool1,
    bottleneck blocks res2a (projection shortcut), res2b (identity), res3a (projection, stride 2),
    each branch a Conv + BN + Scale (+ ReLU), summed by Eltwise, then in-place ReLU; global
    average pool and fc. Layer names follow the published ResNet-50 (res2a_branch2a, bn2a_branch2a,
    scale2a_branch2a, ...)."""
    n = caffe.NetSpec()
    _data(n, [batch, 3, size, size], classes, batch)
    _conv_bn(n, "conv1", n.data, 16, 7, 2, 3, bias=True, bn="bn_conv1", scale="scale_conv1", relu="conv1_relu")
    n.pool1 = L.Pooling(n.conv1, kernel_size=3, stride=2, pool=P.Pooling.MAX)
    bottom = n.pool1
    for block, (mid, out, stride, project) in {"2a": (8, 32, 1, True), "2b": (8, 32, 1, False),
                                               "3a": (16, 64, 2, True)}.items():
        def conv(branch, bottom_, num_output, kernel, stride_=1, pad=0, relu=True, block=block):
            return _conv_bn(n, f"res{block}_{branch}", bottom_, num_output, kernel, stride_, pad,
                            bn=f"bn{block}_{branch}", scale=f"scale{block}_{branch}",
                            relu=f"res{block}_{branch}_relu" if relu else None)

        shortcut = conv("branch1", bottom, out, 1, stride, relu=False) if project else bottom
        a = conv("branch2a", bottom, mid, 1, stride)
        b = conv("branch2b", a, mid, 3, 1, 1)
        c = conv("branch2c", b, out, 1, relu=False)
        n[f"res{block}"] = L.Eltwise(shortcut, c)
        n[f"res{block}_relu"] = L.ReLU(n[f"res{block}"], in_place=True)
        bottom = n[f"res{block}"]
    n.pool5 = L.Pooling(bottom, pool=P.Pooling.AVE, global_pooling=True)
    n.fc10 = L.InnerProduct(n.pool5, num_output=classes, weight_filler=dict(type="msra"))
    _head(n, n.fc10)
    return _to_net(n, "ResNet-50-style")


def mobilenet_net(batch: int = 2, size: int = 32, classes: int = 10) -> caffe_pb2.NetParameter:
    """MobileNet v1's layout at small width: conv1 3x3/2, then depthwise separable blocks, each a
    depthwise 3x3 Convolution (group = channels) and a pointwise 1x1 Convolution, each followed
    by BatchNorm + Scale + ReLU (names as in the published MobileNet-Caffe: conv2_1/dw,
    conv2_1/dw/bn, conv2_1/dw/scale, relu2_1/dw, conv2_1/sep, ...); global average pool and a
    1x1 Convolution classifier (``fc7``, output 1x1: the "global conv" case)."""
    n = caffe.NetSpec()
    _data(n, [batch, 3, size, size], classes, batch)

    def conv_bn(name, relu_name, bottom, num_output, kernel, stride=1, pad=0, group=1):
        return _conv_bn(n, name, bottom, num_output, kernel, stride, pad, group, bn=f"{name}/bn",
                        scale=f"{name}/scale", relu=relu_name)

    x = conv_bn("conv1", "relu1", n.data, 16, 3, 2, 1)
    channels = 16
    for block, (out, stride) in {"2_1": (32, 1), "2_2": (64, 2), "3_1": (64, 1)}.items():
        x = conv_bn(f"conv{block}/dw", f"relu{block}/dw", x, channels, 3, stride, 1, group=channels)
        x = conv_bn(f"conv{block}/sep", f"relu{block}/sep", x, out, 1)
        channels = out
    n.pool6 = L.Pooling(x, pool=P.Pooling.AVE, global_pooling=True)
    n.fc7 = L.Convolution(n.pool6, num_output=classes, kernel_size=1, weight_filler=dict(type="msra"))
    _head(n, n.fc7)
    return _to_net(n, "MobileNet-style")


def mlp_net(batch: int = 8, features: int = 32, classes: int = 10) -> caffe_pb2.NetParameter:
    """InnerProduct + BatchNorm + Scale + ReLU, twice, then the classifier InnerProduct."""
    n = caffe.NetSpec()
    _data(n, [batch, features], classes, batch)
    x = n.data
    for i, width in ((1, 64), (2, 32)):
        n[f"fc{i}"] = L.InnerProduct(x, num_output=width, weight_filler=dict(type="xavier"),
                                     bias_filler=dict(type="gaussian", std=0.1))
        x = n[f"fc{i}"]
        n[f"fc{i}/bn"] = L.BatchNorm(x, in_place=True, batch_norm_param=dict(use_global_stats=False))
        n[f"fc{i}/scale"] = L.Scale(x, in_place=True, scale_param=dict(bias_term=True))
        n[f"fc{i}/relu"] = L.ReLU(x, in_place=True)
    n.fc3 = L.InnerProduct(x, num_output=classes, weight_filler=dict(type="xavier"))
    _head(n, n.fc3)
    return _to_net(n, "MLP")


# --------------------------------------------------------------------------- graph shapes


def _conv(bottom, num_output: int, kernel: int = 3, pad: int = 1, **kw):
    return L.Convolution(bottom, num_output=num_output, kernel_size=kernel, pad=pad,
                         weight_filler=dict(type="xavier"), bias_filler=dict(type="gaussian", std=0.1), **kw)


def split_net(batch: int = 4, classes: int = 5) -> caffe_pb2.NetParameter:
    """An explicit Split layer whose two tops feed two quantized convolutions (summed)."""
    n = caffe.NetSpec()
    _data(n, [batch, 3, 8, 8], classes, batch)
    n.conv1 = _conv(n.data, 6)
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.split_a, n.split_b = L.Split(n.conv1, ntop=2)
    n.conv2a = _conv(n.split_a, 6)
    n.conv2b = _conv(n.split_b, 6, kernel=1, pad=0)
    n.sum = L.Eltwise(n.conv2a, n.conv2b)
    n.fc = L.InnerProduct(n.sum, num_output=classes, weight_filler=dict(type="xavier"))
    _head(n, n.fc)
    return _to_net(n, "explicit_split")


def concat_net(batch: int = 4, classes: int = 5) -> caffe_pb2.NetParameter:
    """An Inception-like module: two quantized branches reading one blob, concatenated, then
    read by a quantized convolution."""
    n = caffe.NetSpec()
    _data(n, [batch, 3, 8, 8], classes, batch)
    n.branch_1x1 = _conv(n.data, 4, kernel=1, pad=0)
    n.relu_1x1 = L.ReLU(n.branch_1x1, in_place=True)
    n.branch_3x3 = _conv(n.data, 6)
    n.relu_3x3 = L.ReLU(n.branch_3x3, in_place=True)
    n.concat = L.Concat(n.branch_1x1, n.branch_3x3)
    n.conv_after = _conv(n.concat, 8)
    n.relu_after = L.ReLU(n.conv_after, in_place=True)
    n.fc = L.InnerProduct(n.conv_after, num_output=classes, weight_filler=dict(type="xavier"))
    _head(n, n.fc)
    return _to_net(n, "concat")


def phase_rules_net(train_source: str, test_source: str, train_batch: int = 6, classes: int = 5,
                    ) -> caffe_pb2.NetParameter:
    """Two HDF5Data layers named ``data`` (TRAIN and TEST, different sources and batch sizes), a
    TRAIN-only auxiliary classifier (quantizable conv + fc, a head used only to train), a
    Dropout excluded from TEST and an Accuracy included in TEST only.

    The HDF5 files hold ``data`` (N, 3, 8, 8) and ``label`` (N,): see :func:`write_hdf5_source`.
    """
    n = caffe.NetSpec()
    n.data, n.label = L.HDF5Data(source=train_source, batch_size=train_batch, ntop=2,
                                 include=dict(phase=caffe.TRAIN))
    n.conv1 = _conv(n.data, 6)
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.drop1 = L.Dropout(n.conv1, in_place=True, dropout_ratio=0.2, exclude=dict(phase=caffe.TEST))
    n.conv_aux = _conv(n.conv1, 4, kernel=1, pad=0, include=dict(phase=caffe.TRAIN))
    n.fc_aux = L.InnerProduct(n.conv_aux, num_output=classes, weight_filler=dict(type="xavier"),
                              include=dict(phase=caffe.TRAIN))
    n.loss_aux = L.SoftmaxWithLoss(n.fc_aux, n.label, loss_weight=0.3, include=dict(phase=caffe.TRAIN))
    n.conv2 = _conv(n.conv1, 8)
    n.relu2 = L.ReLU(n.conv2, in_place=True)
    n.fc = L.InnerProduct(n.conv2, num_output=classes, weight_filler=dict(type="xavier"))
    _head(n, n.fc)
    net = _to_net(n, "phase_rules")
    test_data = caffe_pb2.LayerParameter()
    test_data.CopyFrom(net.layer[0])
    test_data.include[0].phase = caffe_pb2.TEST
    test_data.hdf5_data_param.source = test_source
    test_data.hdf5_data_param.batch_size = 2 * train_batch
    net.layer.insert(1, test_data)
    return net


def test_only_net(batch: int = 4, classes: int = 5) -> caffe_pb2.NetParameter:
    """A quantizable Convolution that runs in the TEST phase only (a TEST-time probe head)."""
    n = caffe.NetSpec()
    _data(n, [batch, 3, 8, 8], classes, batch)
    n.conv1 = _conv(n.data, 6)
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.conv_test = _conv(n.conv1, 4, include=dict(phase=caffe.TEST))
    n.fc = L.InnerProduct(n.conv1, num_output=classes, weight_filler=dict(type="xavier"))
    _head(n, n.fc)
    return _to_net(n, "test_only_layer")


def write_hdf5_source(folder: pathlib.Path, tag: str, count: int, classes: int = 5, seed: int = 0) -> pathlib.Path:
    """An HDF5 file of ``count`` random 3x8x8 images and labels, and the list file naming it."""
    import h5py

    rng = np.random.default_rng(seed)
    h5 = folder / f"{tag}.h5"
    with h5py.File(h5, "w") as f:
        f["data"] = rng.normal(0, 1, (count, 3, 8, 8)).astype(np.float32)
        f["label"] = rng.integers(0, classes, count).astype(np.float32)
    listing = folder / f"{tag}.txt"
    listing.write_text(f"{h5}\n")
    return listing


def legacy_input_net(batch: int = 2, classes: int = 5) -> caffe_pb2.NetParameter:
    """A deploy-style net fed by the legacy ``input:`` / ``input_shape`` fields (no Input layer),
    with a TRAIN-only label and loss."""
    n = caffe.NetSpec()
    n.data = L.Input()  # dropped: the net's ``input`` field feeds ``data``
    n.conv1 = _conv(n.data, 6, stride=2)
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.conv2 = _conv(n.conv1, 6, group=2)
    n.relu2 = L.ReLU(n.conv2, in_place=True)
    n.fc = L.InnerProduct(n.conv2, num_output=classes, weight_filler=dict(type="xavier"))
    net = n.to_proto()
    del net.layer[0]
    net.name = "legacy_input"
    net.input.append("data")
    net.input_shape.add().dim.extend([batch, 3, 8, 8])
    text_format.Parse(f"""layer {{ name: "label" type: "DummyData" top: "label" include {{ phase: TRAIN }}
        dummy_data_param {{ shape {{ dim: {batch} }} data_filler {{ type: "uniform" min: 0 max: {classes - 1} }} }} }}
        layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss"
        include {{ phase: TRAIN }} }}""", net)
    return net


# --------------------------------------------------------------------------- weights


def quantizable_layer_names(net: caffe_pb2.NetParameter) -> list[str]:
    """Names of the Convolution and InnerProduct layers, in net order, each once."""
    names: list[str] = []
    for layer in net.layer:
        if layer.type in QUANTIZABLE_TYPES and layer.name not in names:
            names.append(layer.name)
    return names


def set_inputs(net: caffe.Net, inputs: dict[str, np.ndarray]) -> None:
    for name, value in inputs.items():
        net.blobs[name].reshape(*value.shape)
        net.blobs[name].data[...] = value


def float_weights(model_file: pathlib.Path, weights_file: pathlib.Path, inputs: dict[str, np.ndarray] | None = None,
                  statistics_batches: int = 4, seed: int = 0) -> None:
    """Weights of ``model_file`` from Caffe's fillers, saved to ``weights_file``.

    The BatchNorm layers (use_global_stats false in TRAIN) accumulate their statistics over
    ``statistics_batches`` TRAIN forwards, as training would leave them: with the fillers'
    zero statistics a frozen BatchNorm scales by 1/sqrt(eps). Nets fed by Input layers or
    ``input:`` fields get gaussian ``inputs`` (name -> array), or random ones of their shape.
    """
    caffe.set_random_seed(seed)
    net = caffe.Net(str(model_file), caffe.TRAIN)
    if any(layer.type == "BatchNorm" for layer in net.layers):
        rng = np.random.default_rng(seed)
        for _ in range(statistics_batches):
            if inputs:
                set_inputs(net, {k: rng.normal(0, 1, v.shape).astype(np.float32) for k, v in inputs.items()})
            net.forward()
    net.save(str(weights_file))


def legacy_v1_text(batch: int = 2, classes: int = 5) -> str:
    """A V1 net (``layers { type: CONVOLUTION }``, ``blobs_lr``) fed by the oldest legacy fields,
    ``input:`` with four ``input_dim``: as BVLC's oldest model zoo files are written."""
    return f"""name: "legacy_v1"
input: "data"
input_dim: {batch}
input_dim: 3
input_dim: 8
input_dim: 8
layers {{ name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1" blobs_lr: 1 blobs_lr: 2
  weight_decay: 1 weight_decay: 0
  convolution_param {{ num_output: 6 kernel_size: 3 pad: 1 weight_filler {{ type: "xavier" }}
    bias_filler {{ type: "constant" value: 0.1 }} }} }}
layers {{ name: "relu1" type: RELU bottom: "conv1" top: "conv1" }}
layers {{ name: "pool1" type: POOLING bottom: "conv1" top: "pool1"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layers {{ name: "fc" type: INNER_PRODUCT bottom: "pool1" top: "fc" blobs_lr: 1 blobs_lr: 2
  inner_product_param {{ num_output: {classes} weight_filler {{ type: "xavier" }} }} }}
layers {{ name: "label" type: DUMMY_DATA top: "label" include {{ phase: TRAIN }}
  dummy_data_param {{ num: {batch} channels: 1 height: 1 width: 1
    data_filler {{ type: "uniform" min: 0 max: {classes - 1} }} }} }}
layers {{ name: "loss" type: SOFTMAX_LOSS bottom: "fc" bottom: "label" top: "loss" include {{ phase: TRAIN }} }}
"""


def input_shapes(net: caffe_pb2.NetParameter) -> dict[str, tuple[int, ...]]:
    """The blobs a net is fed from outside: Input layers, and the legacy ``input:`` fields with
    ``input_shape`` or ``input_dim``."""
    shapes = {}
    for layer in net.layer:
        if layer.type == "Input":
            for i, top in enumerate(layer.top):
                shape = layer.input_param.shape[min(i, len(layer.input_param.shape) - 1)]
                shapes[top] = tuple(shape.dim)
    for i, name in enumerate(net.input):
        shapes[name] = (tuple(net.input_shape[i].dim) if net.input_shape else tuple(net.input_dim[4 * i:4 * i + 4]))
    return shapes
