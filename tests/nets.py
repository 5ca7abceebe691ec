"""Small Caffe nets built on the fly for the tests, with the toolkit's quant layers inserted."""
import pathlib

import caffe
import numpy as np
from google.protobuf import text_format

from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.graph import quant_layers as ql
from amct_retrain.layer_specs import ACTIVATION_ULQ, WEIGHT_ARQ

BATCH, IN_SHAPE, CONV_OUT, IP_OUT = 8, (3, 6, 6), 4, 5
CONV_WEIGHT_SHAPE = (CONV_OUT, IN_SHAPE[0], 3, 3)
IP_WEIGHT_SHAPE = (IP_OUT, CONV_OUT * 4 * 4)
CLIP_MAX, CLIP_MIN, CLIP_STATE = (ACTIVATION_ULQ.blob(blob) for blob in ("clip_max", "clip_min", "clip_state"))
MASTER_WEIGHTS = WEIGHT_ARQ.blob("master_weights")  # the same with or without WeightARQ's optional clip_state


def _layer(text: str) -> caffe_pb2.LayerParameter:
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def quant_net(record_file: str | pathlib.Path, batch_num: int = 1, conv_clips=None,
              ip_fixed_min: bool = True) -> caffe_pb2.NetParameter:
    """DummyData -> ULQ -> ARQ -> conv1 (per channel) -> ShiftN -> ReLU (in place)
    -> ULQ (fixed_min) -> ARQ -> ip1 (per tensor) -> ShiftN -> EuclideanLoss.

    ``conv_clips`` = (clip_min, clip_max) configures conv1's clips; None asks for IFMR.
    """
    net = caffe_pb2.NetParameter(name="quant_test_net")
    data = _layer(f"""name: "data" type: "DummyData" top: "data" top: "target"
        dummy_data_param {{ shape {{ dim: {BATCH} dim: {IN_SHAPE[0]} dim: {IN_SHAPE[1]} dim: {IN_SHAPE[2]} }}
                            shape {{ dim: {BATCH} dim: {IP_OUT} }}
                            data_filler {{ type: "gaussian" std: 1 }} data_filler {{ type: "gaussian" std: 1 }} }}""")
    conv = _layer(f"""name: "conv1" type: "Convolution" bottom: "data_q" top: "conv1"
        convolution_param {{ num_output: {CONV_OUT} kernel_size: 3 }}""")
    relu = _layer('name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1"')
    ip = _layer(f"""name: "ip1" type: "InnerProduct" bottom: "conv1_q" top: "ip1"
        inner_product_param {{ num_output: {IP_OUT} }}""")
    loss = _layer('name: "loss" type: "EuclideanLoss" bottom: "ip1" bottom: "target" top: "loss"')
    clip_min, clip_max = conv_clips or (None, None)
    ql.share_fake_quant_weights(conv, "conv1_arq")
    ql.share_fake_quant_weights(ip, "ip1_arq")
    net.layer.extend([
        data,
        ql.ulq_layer("conv1_ulq", "data", "data_q", clip_min, clip_max),
        ql.arq_layer("conv1_arq", "data_q", CONV_WEIGHT_SHAPE, 0),
        conv,
        ql.shift_n_layer("conv1_shift_n", "conv1", "conv1", "conv1_ulq", "conv1_arq",
                         CONV_WEIGHT_SHAPE, 0, str(record_file), batch_num),
        relu,
        ql.ulq_layer("ip1_ulq", "conv1", "conv1_q", fixed_min=ip_fixed_min),
        ql.arq_layer("ip1_arq", "conv1_q", IP_WEIGHT_SHAPE, None),
        ip,
        ql.shift_n_layer("ip1_shift_n", "ip1", "ip1", "ip1_ulq", "ip1_arq",
                         IP_WEIGHT_SHAPE, None, str(record_file), batch_num),
        loss,
    ])
    return net


def write_net(net: caffe_pb2.NetParameter, path: pathlib.Path) -> pathlib.Path:
    path.write_text(text_format.MessageToString(net))
    return path


def init_weights(model_file: pathlib.Path, weights_file: pathlib.Path, seed: int = 0) -> None:
    """Fill the master weights (as create_quant_retrain_model would, from float weights)."""
    rng = np.random.default_rng(seed)
    net = caffe.Net(str(model_file), caffe.TRAIN)
    for arq, shape in (("conv1_arq", CONV_WEIGHT_SHAPE), ("ip1_arq", IP_WEIGHT_SHAPE)):
        net.params[arq][MASTER_WEIGHTS].data[...] = rng.normal(0, 0.3, shape).astype(np.float32)
    for layer in ("conv1", "ip1"):
        net.params[layer][1].data[...] = rng.normal(0, 0.1, net.params[layer][1].data.shape)
    net.save(str(weights_file))


def solver_text(model_file: pathlib.Path, prefix: pathlib.Path, max_iter: int, test_iter: int = 2,
                base_lr: float = 0.01) -> str:
    """A retraining solver: one net, TEST at the end only, no initial TEST (contract section 5)."""
    return f"""net: "{model_file}"
test_iter: {test_iter}
test_interval: {max_iter}
test_initialization: false
base_lr: {base_lr}
momentum: 0.9
weight_decay: 0.0005
lr_policy: "fixed"
display: 0
max_iter: {max_iter}
snapshot: {max_iter}
snapshot_prefix: "{prefix}"
solver_mode: CPU
random_seed: 1
"""


QUANT_BLOBS = {"conv1_ulq": 3, "conv1_arq": 3, "ip1_ulq": 3, "ip1_arq": 3, "conv1": 2, "ip1": 2}


FLOAT_NET = """name: "small"
layer { name: "data" type: "DummyData" top: "data" top: "target"
  dummy_data_param { shape { dim: 4 dim: 6 dim: 8 dim: 8 } shape { dim: 4 dim: %(fc)d }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" param { lr_mult: 2 decay_mult: 0.5 }
  convolution_param { num_output: 6 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 8 kernel_size: 3 group: 2 bias_term: false weight_filler { type: "xavier" } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool" type: "Pooling" bottom: "conv2" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc"
  inner_product_param { num_output: %(fc)d weight_filler { type: "xavier" } bias_filler { type: "gaussian" } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "fc" bottom: "target" top: "loss" }
"""
QUANTIZED = ("conv1", "conv2", "fc")  # the quantizable layers of FLOAT_NET


def float_model(tmp_path, fc=10, tag="float"):
    model = tmp_path / f"{tag}.prototxt"
    model.write_text(FLOAT_NET % {"fc": fc})
    weights = tmp_path / f"{tag}.caffemodel"
    caffe.Net(str(model), caffe.TEST).save(str(weights))
    return model, weights


def retrain_float_model(tmp: pathlib.Path, iters: int, edit_config=None, name: str = "model") -> dict:
    """FLOAT_NET made quantization-aware (``edit_config(config_file)`` may change its retrain config
    first), ``iters`` solver steps with a TEST at the end, both models saved under
    ``tmp/result/<name>``. Returns the files by role (``model``, ``weights``, ``record``, ``snapshot``,
    ``save_path``, ``tmp`` and the saver's output files)."""
    import amct_retrain
    from amct_retrain.saver import output_files

    model, weights = float_model(tmp)
    config = tmp / "config.json"
    amct_retrain.create_quant_retrain_config(str(config), str(model), str(weights))
    if edit_config is not None:
        edit_config(config)
    files = {k: tmp / v for k, v in (("model", "retrain.prototxt"), ("weights", "retrain.caffemodel"),
                                     ("record", "record.txt"))}
    amct_retrain.create_quant_retrain_model(str(model), str(weights), str(config), str(files["model"]),
                                            str(files["weights"]), str(files["record"]))
    solver_file = tmp / "solver.prototxt"
    solver_file.write_text(solver_text(files["model"], tmp / "snap", max_iter=iters))
    solver = caffe.get_solver(str(solver_file))
    solver.net.copy_from(str(files["weights"]))
    solver.solve()
    snapshot = tmp / f"snap_iter_{iters}.caffemodel"
    save_path = str(tmp / "result" / name)
    amct_retrain.save_quant_retrain_model(str(files["model"]), str(snapshot), "Both", save_path, str(files["record"]))
    return {"tmp": tmp, "snapshot": snapshot, "save_path": save_path, "config": config, **files,
            **output_files(save_path)}


def retrain_and_save(tmp: pathlib.Path, net_text: str, name: str, iters: int, prepare=None) -> dict:
    """``net_text`` (a float net with DummyData) through the whole retraining flow under ``tmp``:
    config, quantization-aware model, ``iters`` solver steps (TEST at the end), both models saved.
    ``prepare(net)`` may set the float net's blobs first. Returns the files by role,
    ``save_path`` and the saver's output files."""
    import amct_retrain
    from amct_retrain.saver import output_files

    model, weights = tmp / f"{name}.prototxt", tmp / f"{name}.caffemodel"
    model.write_text(net_text)
    float_net = caffe.Net(str(model), caffe.TEST)
    if prepare is not None:
        prepare(float_net)
    float_net.save(str(weights))
    files = {"config": tmp / "config.json", "retrain_model": tmp / "retrain.prototxt",
             "retrain_weights": tmp / "retrain.caffemodel", "record": tmp / "record.txt",
             "snapshot": tmp / f"snap_iter_{iters}.caffemodel", "onnx": tmp / f"{name}.onnx"}
    amct_retrain.create_quant_retrain_config(str(files["config"]), str(model), str(weights))
    amct_retrain.create_quant_retrain_model(str(model), str(weights), str(files["config"]),
                                            str(files["retrain_model"]), str(files["retrain_weights"]),
                                            str(files["record"]))
    solver_file = tmp / "solver.prototxt"
    solver_file.write_text(solver_text(files["retrain_model"], tmp / "snap", max_iter=iters))
    solver = caffe.get_solver(str(solver_file))
    solver.net.copy_from(str(files["retrain_weights"]))
    solver.solve()
    save_path = str(tmp / "result" / name)
    amct_retrain.save_quant_retrain_model(str(files["retrain_model"]), str(files["snapshot"]), "Both", save_path,
                                          str(files["record"]))
    return {**files, "save_path": save_path, **output_files(save_path)}


def ops_after(model, tensor: str, count: int = 4) -> list[str]:
    """The op types of the chain of ``count`` nodes that consume ``tensor`` one after the other
    in an ONNX model (the shift-N requantisation after a quantized layer is Div, Round, Q, DQ)."""
    consumers = {t: node for node in model.graph.node for t in node.input}
    chain = []
    while len(chain) < count and tensor in consumers:
        chain.append(consumers[tensor])
        tensor = chain[-1].output[0]
    return [node.op_type for node in chain]
