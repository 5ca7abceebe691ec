"""The golden-file cases: small float nets and the output of every graph pass on them.

Each net runs through the passes the toolkit chains (``pass_outputs``): the BatchNorm fusions of
retraining and of calibration, the insertion of the retraining layers (public API, default config),
the strip back to the float net, the insertion of the calibration observers, the fake-quant and
deploy export (``convert_model`` with a synthetic record) and the integer executor's rewrite of the
deploy net. Everything is deterministic: weights come from a seeded numpy generator, factors from
formulas, never from a forward pass. Paths of the temporary work folder read ``$WORK`` in the
outputs, so they compare on any machine. ``python -m tests.golden.regenerate`` rewrites the files.
"""
import hashlib
import os
import pathlib

import caffe
import numpy as np
from caffe.proto import caffe_pb2
from google.protobuf import text_format

import amct_retrain
from amct_retrain import record
from amct_retrain.graph import model_io
from amct_retrain.graph.fuse import fuse_batchnorm, fuse_for_retraining
from amct_retrain.graph.strip import find_quantized_layers, strip_quant_layers
from amct_retrain.reference import reference_net
from amct_retrain.saver import output_files

GOLDEN_DIR = pathlib.Path(__file__).resolve().parent
PASSES_DIR = GOLDEN_DIR / "passes"
WORK = "$WORK"  # stands for the temporary work folder in every golden file

_DATA = """layer { name: "data" type: "DummyData" top: "data" top: "target"
  dummy_data_param { shape { dim: 2 dim: %(c)d dim: %(h)d dim: %(w)d } shape { dim: 2 dim: %(t)d }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "gaussian" std: 1 } } }
"""
_LOSS = 'layer { name: "loss" type: "EuclideanLoss" bottom: "%s" bottom: "target" top: "loss" }\n'

NETS: dict[str, str] = {
    # Two quantized convolutions read one blob version (one shared ActivationULQ), Concat, MAX pool
    # (not quantized), TRAIN/TEST data layers with phase rules and a TRAIN-only InnerProduct head.
    "branched": """name: "branched"
layer { name: "data" type: "DummyData" top: "data" top: "target" include { phase: TRAIN }
  dummy_data_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } shape { dim: 2 dim: 5 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "data" type: "DummyData" top: "data" top: "target" include { phase: TEST }
  dummy_data_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } shape { dim: 1 dim: 5 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" param { lr_mult: 2 decay_mult: 0.5 }
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2a" type: "Convolution" bottom: "conv1" top: "conv2a"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "conv2b" type: "Convolution" bottom: "conv1" top: "conv2b"
  convolution_param { num_output: 2 kernel_size: 1 bias_term: false } }
layer { name: "concat" type: "Concat" bottom: "conv2a" bottom: "conv2b" top: "concat" }
layer { name: "pool" type: "Pooling" bottom: "concat" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "aux" type: "InnerProduct" bottom: "pool" top: "aux" include { phase: TRAIN }
  inner_product_param { num_output: 5 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "fc" bottom: "target" top: "loss" }
layer { name: "aux_loss" type: "EuclideanLoss" bottom: "aux" bottom: "target" top: "aux_loss"
  include { phase: TRAIN } loss_weight: 0.5 }
""",
    # Conv + BatchNorm + Scale (both fusions), BatchNorm + Scale + Conv (calibration's bn_conv),
    # InnerProduct + BatchNorm (calibration's fc_bn).
    "conv_bn_scale": 'name: "conv_bn_scale"\n' + _DATA % {"c": 3, "h": 6, "w": 6, "t": 4} + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" batch_norm_param { use_global_stats: true } }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "bn2" type: "BatchNorm" bottom: "conv1" top: "bn2" batch_norm_param { use_global_stats: true } }
layer { name: "scale2" type: "Scale" bottom: "bn2" top: "bn2" scale_param { bias_term: true } }
layer { name: "conv2" type: "Convolution" bottom: "bn2" top: "conv2" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "fc" type: "InnerProduct" bottom: "conv2" top: "fc" inner_product_param { num_output: 4 } }
layer { name: "bn3" type: "BatchNorm" bottom: "fc" top: "fc" batch_norm_param { use_global_stats: true } }
""" + _LOSS % "fc",
    # A strided Deconvolution + BatchNorm + Scale (no bias: the fusion adds one), and a padded Deconvolution.
    "deconv": 'name: "deconv"\n' + _DATA % {"c": 3, "h": 4, "w": 4, "t": 6} + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "deconv1" type: "Deconvolution" bottom: "conv1" top: "deconv1"
  convolution_param { num_output: 3 kernel_size: 2 stride: 2 bias_term: false } }
layer { name: "bn1" type: "BatchNorm" bottom: "deconv1" top: "deconv1" batch_norm_param { use_global_stats: true } }
layer { name: "scale1" type: "Scale" bottom: "deconv1" top: "deconv1" scale_param { bias_term: false } }
layer { name: "deconv2" type: "Deconvolution" bottom: "deconv1" top: "deconv2"
  convolution_param { num_output: 2 kernel_size: 3 stride: 1 pad: 1 } }
layer { name: "fc" type: "InnerProduct" bottom: "deconv2" top: "fc" inner_product_param { num_output: 6 } }
""" + _LOSS % "fc",
    # AVE Pooling quantized (windows tile the input), a padded AVE Pooling left float, MAX left alone.
    "ave_pool": 'name: "ave_pool"\n' + _DATA % {"c": 3, "h": 8, "w": 8, "t": 3} + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "pool2" type: "Pooling" bottom: "pool1" top: "pool2" pooling_param { pool: AVE kernel_size: 3 stride: 1 pad: 1 } }
layer { name: "pool3" type: "Pooling" bottom: "pool2" top: "pool3" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool3" top: "fc" inner_product_param { num_output: 3 } }
""" + _LOSS % "fc",
    # An MLP: InnerProduct layers, one without bias, one reading a flattened 4-D blob.
    "inner_product": 'name: "inner_product"\n' + _DATA % {"c": 2, "h": 3, "w": 3, "t": 3} + """
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1" param { lr_mult: 1 } param { lr_mult: 2 }
  inner_product_param { num_output: 8 } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" inner_product_param { num_output: 6 bias_term: false } }
layer { name: "sigmoid" type: "Sigmoid" bottom: "ip2" top: "ip2" }
layer { name: "ip3" type: "InnerProduct" bottom: "ip2" top: "ip3" inner_product_param { num_output: 3 } }
""" + _LOSS % "ip3",
    # A deploy net: an Input layer, no loss.
    "input_deploy": """name: "input_deploy"
layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc" inner_product_param { num_output: 3 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
""",
}


def write_float_model(name: str, net_text: str, work: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """``net_text`` as ``<work>/<name>.prototxt`` and seeded weights (BatchNorm: positive variances,
    scale factor 1) as ``<work>/<name>.caffemodel``."""
    model, weights = work / f"{name}.prototxt", work / f"{name}.caffemodel"
    model.write_text(net_text)
    net = caffe.Net(str(model), caffe.TRAIN)  # the TRAIN net: it has the TRAIN-only layers' weights
    types = {layer.name: layer.type for layer in model_io.read_prototxt(model).layer}
    rng = np.random.default_rng(sum(name.encode()))
    for layer_name, blobs in net.params.items():
        layer_type = types[layer_name]
        for i, blob in enumerate(blobs):
            shape = blob.data.shape  # weights ~ N(0, 1 / fan-in), so activations keep their scale
            values = rng.normal(0.0, (1.0 / np.prod(shape[1:])) ** 0.5 if len(shape) > 1 else 0.1, shape)
            if layer_type == "BatchNorm":
                values = {0: values, 1: np.abs(values) + 0.5, 2: np.ones(shape)}[i]
            blob.data[...] = values
    net.save(str(weights))
    return model, weights


def blob_digest(weights_file: pathlib.Path) -> str:
    """One line per layer of a caffemodel: its blobs' shapes and a hash of each blob's bytes."""
    net = caffe_pb2.NetParameter.FromString(weights_file.read_bytes())
    lines = []
    for layer in net.layer:
        if layer.blobs:
            blobs = " ".join(f"{'x'.join(map(str, b.shape.dim))}:{hashlib.sha256(b.SerializeToString()).hexdigest()[:16]}"
                             for b in layer.blobs)
            lines.append(f"{layer.name} {blobs}")
    return "\n".join(lines) + "\n"


def _text(net: caffe_pb2.NetParameter) -> str:
    return text_format.MessageToString(net)


def synthetic_record(model: pathlib.Path, calibration_record: pathlib.Path, out: pathlib.Path) -> None:
    """A complete record for every layer calibration quantizes: its scale_w and offset_w as
    calibration wrote them; scale_d, offset_d and shift_bit from formulas of the layer's position."""
    float_net = caffe.Net(str(model), caffe.TEST)
    records = record.read_record(str(calibration_record))
    for k, (name, rec) in enumerate(sorted(records.items())):
        if not rec.scale_w:
            continue
        c = float_net.blobs[float_net.top_names[name][0]].data.shape[1]
        rec.scale_d = 0.01 * (k + 2)
        rec.offset_d = -100 + 7 * k
        rec.shift_bit[:] = [1 + (k + i) % 8 for i in range(c)]
    record.write_record(str(out), records)


def pass_outputs(name: str, work: pathlib.Path) -> dict[str, str]:
    """File name -> text of every pass's output on net ``name``, computed under ``work``."""
    model, weights = write_float_model(name, NETS[name], work)
    net, params = model_io.read_prototxt(model), model_io.read_caffemodel(weights)
    out: dict[str, str] = {}

    def add_net(key: str, fused_net: caffe_pb2.NetParameter, fused_params) -> None:
        out[f"{key}.prototxt"] = _text(fused_net)
        blobs = work / f"{key}.caffemodel"
        blobs.write_bytes(model_io.caffemodel_bytes(fused_net.name, fused_params))
        out[f"{key}.weights.txt"] = blob_digest(blobs)

    retrain_fused, retrain_params, _ = fuse_for_retraining(net, params)
    add_net("fuse_retraining", retrain_fused, retrain_params)
    calibration_fused, calibration_params, _ = fuse_batchnorm(net, params)
    add_net("fuse_calibration", calibration_fused, calibration_params)

    config, retrain_model, retrain_weights = work / "retrain.json", work / "retrain.prototxt", work / "retrain.caffemodel"
    amct_retrain.create_quant_retrain_config(str(config), str(model), str(weights))
    amct_retrain.create_quant_retrain_model(str(model), str(weights), str(config), str(retrain_model),
                                            str(retrain_weights), str(work / "retrain_record.txt"))
    out["retrain_config.json"] = config.read_text()
    out["retrain.prototxt"] = retrain_model.read_text()
    out["retrain.weights.txt"] = blob_digest(retrain_weights)
    retrained = model_io.read_prototxt(retrain_model)
    out["strip.prototxt"] = _text(strip_quant_layers(retrained, find_quantized_layers(retrained, str(retrain_model))))

    calibration_config, calibration_record = work / "calibration.json", work / "calibration_record.txt"
    amct_retrain.create_quant_config(str(calibration_config), str(model), str(weights), batch_num=2)
    graph = amct_retrain.init(str(calibration_config), str(model), str(weights), str(calibration_record))
    amct_retrain.quantize_model(graph, str(work / "calibration.prototxt"), str(work / "calibration.caffemodel"))
    out["calibration_config.json"] = calibration_config.read_text()
    out["calibration.prototxt"] = (work / "calibration.prototxt").read_text()
    out["calibration_record.txt"] = calibration_record.read_text()

    export_record = work / "export_record.txt"
    synthetic_record(model, calibration_record, export_record)
    save_path = str(work / "export" / name)
    amct_retrain.convert_model(str(model), str(weights), str(export_record), save_path)
    files = output_files(save_path)
    for role in ("fake_quant_model", "deploy_model", "quant_info"):
        out[pathlib.Path(files[role]).name.replace(name + "_", "export_")] = pathlib.Path(files[role]).read_text()
    for role in ("fake_quant_weights", "deploy_weights"):
        out[f"export_{role}.txt"] = blob_digest(pathlib.Path(files[role]))
    deploy = model_io.read_prototxt(files["deploy_model"])
    out["reference.prototxt"] = _text(reference_net(deploy, files["deploy_weights"]))
    return {key: text.replace(os.fspath(work), WORK) for key, text in out.items()}
