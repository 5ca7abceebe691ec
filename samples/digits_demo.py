"""The main demo: a LeNet-style CNN on scikit-learn's digits, retrained to INT8 in real Caffe.

1. writes the digits as HDF5 files for Caffe's HDF5Data layer;
2. trains the float model with `caffe train`;
3. creates the retrain config and the quantization-aware model (amct_retrain API);
4. measures the fake-quant model before retraining (clips from IFMR on the first batch);
5. retrains with a generated solver through `caffe train -weights`;
6. saves the fake-quant and deploy models, runs the deploy model with the integer reference
   executor and, exported to ONNX, in onnxruntime, and prints every accuracy;
7. analyses the retrained fake-quant model layer by layer against the float model
   (``analysis/report.html`` and ``analysis/analysis.json``).
"""
import argparse
import logging
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("GLOG_minloglevel", "2")  # Caffe's own log goes to the log files, not the console
import caffe  # noqa: E402
import h5py  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import onnxruntime  # noqa: E402

import amct_retrain  # noqa: E402
from amct_retrain import solver as amct_solver  # noqa: E402
from amct_retrain.export import export_onnx  # noqa: E402
from amct_retrain.reference import ReferenceExecutor  # noqa: E402

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
FLOAT_SOLVER = """net: "{net}"
test_iter: 1
test_interval: {iters}
base_lr: 0.01
momentum: 0.9
weight_decay: 0.0005
lr_policy: "fixed"
display: 0
max_iter: {iters}
snapshot: {iters}
snapshot_prefix: "{prefix}"
solver_mode: CPU
random_seed: 7
"""


def write_digits(out: pathlib.Path) -> int:
    """The digits (8x8, scaled to [0, 1]) as HDF5 train/test files; returns the test-set size."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    for split, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
        with h5py.File(out / f"{split}.h5", "w") as f:
            f["data"], f["label"] = xs, ys
        (out / f"{split}.txt").write_text(f"{out / split}.h5\n")
    return len(x_test)


def caffe_train(solver: pathlib.Path, log: pathlib.Path, weights: pathlib.Path | None = None) -> None:
    """`caffe train`, the binary a user runs; its log goes to ``log``."""
    cmd = [CAFFE, "train", f"-solver={solver}"] + ([f"-weights={weights}"] if weights else [])
    with open(log, "w") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise RuntimeError(f"caffe train failed, see {log}")


def test_accuracy(model: pathlib.Path | str, weights: pathlib.Path | str) -> float:
    """Top-1 accuracy on the whole test set (one TEST batch)."""
    net = caffe.Net(str(model), caffe.TEST, weights=str(weights))
    return float(net.forward()["accuracy"])


def train_float(out: pathlib.Path, float_iters: int, test_batches: int = 1) -> tuple[pathlib.Path, pathlib.Path]:
    """The digits data and the float model trained with `caffe train` under ``out``: (model file,
    weights file). The TEST phase reads the test set in ``test_batches`` equal batches."""
    out.mkdir(parents=True, exist_ok=True)
    n_test = write_digits(out)
    if n_test % test_batches:
        raise ValueError(f"{n_test} test images do not split into {test_batches} equal batches")
    model = out / "float.prototxt"
    model.write_text(NET.format(out=out, test_batch=n_test // test_batches))
    (out / "float_solver.prototxt").write_text(FLOAT_SOLVER.format(net=model, iters=float_iters, prefix=out / "float"))
    logging.info("training the float model with caffe train (%d iterations)", float_iters)
    caffe_train(out / "float_solver.prototxt", out / "float_train.log")
    return model, out / f"float_iter_{float_iters}.caffemodel"


def run(out: pathlib.Path, float_iters: int = 600, retrain_iters: int = 300) -> dict[str, float]:
    """The whole demo; returns the test accuracy of each model."""
    caffe.set_mode_cpu()
    float_model, float_weights = train_float(out, float_iters)

    config, record = out / "retrain_config.json", out / "record.txt"
    retrain_model, retrain_weights = out / "retrain.prototxt", out / "retrain.caffemodel"
    amct_retrain.create_quant_retrain_config(str(config), str(float_model), str(float_weights))
    amct_retrain.create_quant_retrain_model(str(float_model), str(float_weights), str(config),
                                            str(retrain_model), str(retrain_weights), str(record))

    # Before retraining: one TEST pass initialises the clips (IFMR) and searches shift-N.
    before = caffe.Net(str(retrain_model), caffe.TEST, weights=str(retrain_weights))
    before.forward()
    before_weights = out / "before_retrain.caffemodel"
    before.save(str(before_weights))
    before_path = out / "before_retrain" / "digits"
    amct_retrain.save_quant_retrain_model(str(retrain_model), str(before_weights), "Fakequant",
                                          str(before_path), str(record))

    solver_file = out / "retrain_solver.prototxt"
    amct_solver.create_solver(str(solver_file), str(retrain_model), max_iter=retrain_iters, test_iter=1,
                              base_lr=0.001, snapshot_prefix=str(out / "retrained"))
    amct_solver.check_solver(str(solver_file), str(config))
    logging.info("retraining quantization-aware with caffe train -weights (%d iterations)", retrain_iters)
    caffe_train(solver_file, out / "retrain.log", retrain_weights)
    retrained = out / f"retrained_iter_{retrain_iters}.caffemodel"
    save_path = out / "result" / "digits"
    amct_retrain.save_quant_retrain_model(str(retrain_model), str(retrained), "Both", str(save_path), str(record))
    deploy_model, deploy_weights = f"{save_path}_deploy_model.prototxt", f"{save_path}_deploy_weights.caffemodel"
    onnx_file = f"{save_path}_int8.onnx"
    export_onnx(deploy_model, deploy_weights, onnx_file)
    with h5py.File(out / "test.h5") as f:
        x_test, y_test = f["data"][...], f["label"][...]
    logits = onnxruntime.InferenceSession(onnx_file).run(["ip2"], {"data": x_test})[0]
    amct_retrain.analyze(str(float_model), str(float_weights), f"{save_path}_fake_quant_model.prototxt",
                         f"{save_path}_fake_quant_weights.caffemodel", 1, str(out / "analysis"))
    return {
        "float": test_accuracy(float_model, float_weights),
        "INT8 fake-quant, before retraining": test_accuracy(f"{before_path}_fake_quant_model.prototxt",
                                                            f"{before_path}_fake_quant_weights.caffemodel"),
        "INT8 fake-quant, retrained": test_accuracy(f"{save_path}_fake_quant_model.prototxt",
                                                    f"{save_path}_fake_quant_weights.caffemodel"),
        "INT8 deploy, integer executor": float(ReferenceExecutor(deploy_model, deploy_weights).forward()["accuracy"]),
        "INT8 ONNX QDQ, onnxruntime": float(np.mean(logits.argmax(axis=1) == y_test)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/digits_demo", help="output folder (default %(default)s)")
    parser.add_argument("--float-iters", type=int, default=600)
    parser.add_argument("--retrain-iters", type=int, default=300)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = pathlib.Path(args.out).resolve()
    accuracies = run(out, args.float_iters, args.retrain_iters)
    print(f"\n{'model':<38}{'test accuracy':>14}")
    for label, acc in accuracies.items():
        print(f"{label:<38}{acc:>14.4f}")
    print(f"\nfake-quant and deploy models: {out / 'result'}; logs, record and solver: {out}")
    print(f"per-layer analysis (float vs fake-quant): {out / 'analysis' / 'report.html'}")


if __name__ == "__main__":
    main()
