"""Demo of the fake-quant layers training inside real Caffe on scikit-learn's digits.

1. trains a small LeNet-style float CNN with `caffe train`;
2. inserts ActivationULQ / WeightARQ / ShiftNSearch before and after every Convolution and
   InnerProduct (master weights = the float weights);
3. retrains it quantization-aware with `caffe train -weights`;
4. prints float vs INT8 fake-quant accuracy, the learnt clips and the searched shift-N.

Until the retrain API lands (create_quant_retrain_model & co.), the layer insertion is
spelled out here for a plain chain of layers.
"""
import argparse
import logging
import os
import pathlib
import subprocess
import sys

import caffe
import h5py
import numpy as np
from caffe.proto import caffe_pb2
from google.protobuf import text_format
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from amct_retrain import numerics, record
from amct_retrain.graph import quant_layers as ql

CAFFE = os.path.join(os.path.dirname(sys.executable), "caffe")
NET = """name: "digits_lenet"
layer {{ name: "data" type: "HDF5Data" top: "data" top: "label" include {{ phase: TRAIN }}
  hdf5_data_param {{ source: "{out}/train.txt" batch_size: 64 shuffle: true }} }}
layer {{ name: "data" type: "HDF5Data" top: "data" top: "label" include {{ phase: TEST }}
  hdf5_data_param {{ source: "{out}/test.txt" batch_size: {test_batch} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 16 kernel_size: 3 pad: 1 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param {{ num_output: 32 kernel_size: 3 pad: 1 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "conv2" top: "ip1"
  inner_product_param {{ num_output: 64 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "relu3" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param {{ num_output: 10 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
layer {{ name: "accuracy" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy" include {{ phase: TEST }} }}
"""
SOLVER = """net: "{net}"
test_iter: 1
test_interval: {iters}
test_initialization: false
base_lr: {lr}
momentum: 0.9
weight_decay: 0.0005
lr_policy: "fixed"
display: 100
max_iter: {iters}
snapshot: {iters}
snapshot_prefix: "{prefix}"
solver_mode: CPU
random_seed: 7
"""


def write_digits(out: pathlib.Path) -> int:
    """Digits as HDF5 files for Caffe's HDF5Data layer; returns the test-set size."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    for split, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
        with h5py.File(out / f"{split}.h5", "w") as f:
            f["data"], f["label"] = xs, ys
        (out / f"{split}.txt").write_text(f"{out / split}.h5\n")
    return len(x_test)


def insert_quant_layers(net: caffe_pb2.NetParameter, weights: caffe.Net,
                        record_file: pathlib.Path) -> caffe_pb2.NetParameter:
    """Wrap every Convolution / InnerProduct of a chain net with ULQ, ARQ and shift-N."""
    out = caffe_pb2.NetParameter(name=net.name + "_quant")
    for layer in net.layer:
        if layer.type not in ("Convolution", "InnerProduct"):
            out.layer.add().CopyFrom(layer)
            continue
        name, bottom, top = layer.name, layer.bottom[0], layer.top[0]
        shape = weights.params[name][0].data.shape
        axis = 0 if layer.type == "Convolution" else None
        quantized = caffe_pb2.LayerParameter()
        quantized.CopyFrom(layer)
        quantized.bottom[0] = f"{bottom}_{name}_q"
        ql.share_fake_quant_weights(quantized, f"{name}_arq")
        out.layer.extend([
            ql.ulq_layer(f"{name}_ulq", bottom, quantized.bottom[0], fixed_min=True),
            ql.arq_layer(f"{name}_arq", quantized.bottom[0], shape, axis),
            quantized,
            ql.shift_n_layer(f"{name}_shift_n", top, name, f"{name}_ulq", f"{name}_arq",
                             shape, axis, str(record_file)),
        ])
    return out


def caffe_train(solver: pathlib.Path, weights: pathlib.Path | None, log: pathlib.Path) -> None:
    cmd = [CAFFE, "train", f"-solver={solver}"] + ([f"-weights={weights}"] if weights else [])
    with open(log, "w") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"caffe train failed, see {log}")


def test_accuracy(model: pathlib.Path, weights: pathlib.Path) -> float:
    net = caffe.Net(str(model), caffe.TEST, weights=str(weights))
    return float(net.forward()["accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/layers_demo", help="output folder")
    parser.add_argument("--float-iters", type=int, default=600)
    parser.add_argument("--retrain-iters", type=int, default=300)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    caffe.set_mode_cpu()
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    n_test = write_digits(out)

    float_net = out / "float.prototxt"
    float_net.write_text(NET.format(out=out, test_batch=n_test))
    (out / "float_solver.prototxt").write_text(SOLVER.format(
        net=float_net, iters=args.float_iters, lr=0.01, prefix=out / "float"))
    logging.info("training the float model (%d iterations)", args.float_iters)
    caffe_train(out / "float_solver.prototxt", None, out / "float_train.log")
    float_weights = out / f"float_iter_{args.float_iters}.caffemodel"

    float_params = caffe.Net(str(float_net), caffe.TEST, weights=str(float_weights))
    record_file = out / "record.txt"
    record.create_empty_record(record_file)
    quant_net = out / "quant.prototxt"
    net_param = text_format.Parse(float_net.read_text(), caffe_pb2.NetParameter())
    quant_net.write_text(text_format.MessageToString(insert_quant_layers(net_param, float_params, record_file)))
    quant = caffe.Net(str(quant_net), caffe.TEST)
    for name in ("conv1", "conv2", "ip1", "ip2"):
        quant.params[f"{name}_arq"][1].data[...] = float_params.params[name][0].data
        quant.params[name][1].data[...] = float_params.params[name][1].data
    quant_weights = out / "quant_init.caffemodel"
    quant.save(str(quant_weights))
    before = test_accuracy(quant_net, quant_weights)  # clips from IFMR on the first batch

    (out / "retrain_solver.prototxt").write_text(SOLVER.format(
        net=quant_net, iters=args.retrain_iters, lr=0.001, prefix=out / "retrained"))
    logging.info("retraining quantization-aware with caffe train -weights (%d iterations)", args.retrain_iters)
    caffe_train(out / "retrain_solver.prototxt", quant_weights, out / "retrain.log")
    retrained = out / f"retrained_iter_{args.retrain_iters}.caffemodel"

    rows = [("float", test_accuracy(float_net, float_weights)),
            ("INT8 fake-quant, before retraining", before),
            ("INT8 fake-quant, retrained", test_accuracy(quant_net, retrained))]
    print(f"\n{'model':<36}{'test accuracy':>14}")
    for label, acc in rows:
        print(f"{label:<36}{acc:>14.4f}")
    trained = caffe.Net(str(quant_net), caffe.TEST, weights=str(retrained))
    print(f"\n{'layer':<8}{'clip_min':>10}{'clip_max':>10}{'scale_d':>12}  shift_bit (first 8 channels)")
    records = record.read_record(record_file)
    for name in ("conv1", "conv2", "ip1", "ip2"):
        clip_max, clip_min = (trained.params[f"{name}_ulq"][i].data[0] for i in (0, 1))
        scale_d, _ = numerics.ulq_deploy_factors(*numerics.ulq_sanitize_clips(clip_min, clip_max, None, True))
        print(f"{name:<8}{clip_min:>10.4f}{clip_max:>10.4f}{scale_d:>12.6f}  {list(records[name].shift_bit)[:8]}")
    print(f"\nmodels, logs and the record file are in {out}")


if __name__ == "__main__":
    main()
