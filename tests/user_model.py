"""A Caffe user's own model, as a user brings it to the toolkit.

``train_val.prototxt``: LMDB ``Data`` layers for TRAIN and TEST (scikit-learn's digits, upscaled
to 18 x 18, written as ``caffe_pb2.Datum`` records) with ``transform_param`` scale, mean_value,
mirror (TRAIN) and crop; Conv + BatchNorm + Scale with ``use_global_stats`` unset, as a
train_val file has it (batch statistics in TRAIN, the stored ones in TEST); two branches joined
by Concat; LRN; an Eltwise shortcut; MAX and AVE pooling; Dropout; InnerProduct; SoftmaxWithLoss
and a TEST-only Accuracy. ``deploy.prototxt`` is its twin fed by an ``Input`` layer.

The float weights come from ``caffe train`` (the binary, in a child process).

Two pycaffe nets in one process must not read one LMDB at the same time with the pinned Caffe
(its shared data reader aborts, ``data_reader.cpp``): :meth:`UserModel.copy_to` gives a test its
own copy of the LMDBs, so that each net a test holds reads its own. Once the Caffe build gives
every net its own reader of a shared source, tests can use one copy for every net.
"""
import os
import pathlib
import shutil
import subprocess
import sys
from dataclasses import dataclass

import lmdb
import numpy as np
from caffe.proto import caffe_pb2
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from amct_retrain.solver import create_solver

CAFFE = os.path.join(os.path.dirname(sys.executable), "caffe")
SIZE, CROP = 18, 16               # stored image side, the crop the nets see
SCALE, MEAN = 1 / 256, 33.0       # transform_param: (pixel - mean_value) * scale
TRAIN_BATCH, TEST_BATCH = 64, 50  # the 450 test images are 9 TEST batches
TEST_ITER = 9
FLOAT_ITERS = 300

DATA = """layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ scale: {scale!r} mean_value: {mean!r} mirror: true crop_size: {crop} }}
  data_param {{ source: "{train}" batch_size: {train_batch} backend: LMDB }} }}
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ scale: {scale!r} mean_value: {mean!r} crop_size: {crop} }}
  data_param {{ source: "{test}" batch_size: {test_batch} backend: LMDB }} }}
"""
INPUT = """layer {{ name: "data" type: "Input" top: "data"
  input_param {{ shape {{ dim: {batch} dim: 1 dim: {crop} dim: {crop} }} }} }}
"""
BODY = """layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 16 kernel_size: 3 pad: 1 bias_term: false weight_filler { type: "xavier" } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2a" type: "Convolution" bottom: "conv1" top: "conv2a"
  convolution_param { num_output: 8 kernel_size: 1 weight_filler { type: "xavier" } } }
layer { name: "relu2a" type: "ReLU" bottom: "conv2a" top: "conv2a" }
layer { name: "conv2b" type: "Convolution" bottom: "conv1" top: "conv2b"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "relu2b" type: "ReLU" bottom: "conv2b" top: "conv2b" }
layer { name: "concat" type: "Concat" bottom: "conv2a" bottom: "conv2b" top: "concat" }
layer { name: "norm" type: "LRN" bottom: "concat" top: "norm" lrn_param { local_size: 3 alpha: 0.0001 beta: 0.75 } }
layer { name: "shortcut" type: "Eltwise" bottom: "conv1" bottom: "norm" top: "shortcut" }
layer { name: "pool1" type: "Pooling" bottom: "shortcut" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv3" type: "Convolution" bottom: "pool1" top: "conv3"
  convolution_param { num_output: 32 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "relu3" type: "ReLU" bottom: "conv3" top: "conv3" }
layer { name: "pool2" type: "Pooling" bottom: "conv3" top: "pool2"
  pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
  inner_product_param { num_output: 64 weight_filler { type: "xavier" } } }
layer { name: "relu4" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "drop1" type: "Dropout" bottom: "ip1" top: "ip1" dropout_param { dropout_ratio: 0.3 } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
"""
HEAD = """layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy" include { phase: TEST } }
"""
DEPLOY_HEAD = 'layer { name: "prob" type: "Softmax" bottom: "ip2" top: "prob" }\n'
QUANTIZABLE = ("conv1", "conv2a", "conv2b", "conv3", "pool2", "ip1", "ip2")


def digits_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images, labels), "test": ...}: uint8 (N, 1, 18, 18) images (the 8 x 8 digits
    scaled to 0..255, upscaled 2x and padded by 1), int labels; 1347 train, 450 test."""
    digits = load_digits()
    pixels = np.clip(np.rint(digits.images * (255 / 16)), 0, 255).astype(np.uint8)
    images = np.pad(np.kron(pixels, np.ones((2, 2), np.uint8)), ((0, 0), (1, 1), (1, 1)))[:, None]
    x_train, x_test, y_train, y_test = train_test_split(images, digits.target, test_size=0.25, random_state=0,
                                                        stratify=digits.target)
    return {"train": (x_train, y_train), "test": (x_test, y_test)}


def write_lmdb(path: pathlib.Path, images: np.ndarray, labels: np.ndarray) -> None:
    """uint8 (N, C, H, W) images and their labels as an LMDB of ``caffe_pb2.Datum``, keys in order."""
    env = lmdb.open(str(path), map_size=1 << 28)
    with env.begin(write=True) as txn:
        for i, (image, label) in enumerate(zip(images, labels)):
            c, h, w = image.shape
            datum = caffe_pb2.Datum(channels=c, height=h, width=w, data=image.tobytes(), label=int(label))
            txn.put(f"{i:08d}".encode(), datum.SerializeToString())
    env.close()


def transformed(images: np.ndarray) -> np.ndarray:
    """What the TEST Data layer makes of ``images``: the centre crop, (x - mean) * scale, float32."""
    off = (SIZE - CROP) // 2
    crop = images[:, :, off:off + CROP, off:off + CROP].astype(np.float32)
    return ((crop - np.float32(MEAN)) * np.float32(SCALE)).astype(np.float32)


def train_val_text(train_source: pathlib.Path, test_source: pathlib.Path) -> str:
    data = DATA.format(scale=SCALE, mean=MEAN, crop=CROP, train=train_source, test=test_source,
                       train_batch=TRAIN_BATCH, test_batch=TEST_BATCH)
    return 'name: "user_digits"\n' + data + BODY + HEAD


def deploy_text(batch: int = TEST_BATCH) -> str:
    return 'name: "user_digits"\n' + INPUT.format(batch=batch, crop=CROP) + BODY + DEPLOY_HEAD


@dataclass(frozen=True)
class UserModel:
    """The user's files: train_val and deploy prototxts, the float weights, the LMDBs they read."""
    folder: pathlib.Path
    train_val: pathlib.Path
    deploy: pathlib.Path
    weights: pathlib.Path
    train_lmdb: pathlib.Path
    test_lmdb: pathlib.Path

    def copy_to(self, folder: pathlib.Path) -> "UserModel":
        """The same model and weights under ``folder``, reading its own copies of the LMDBs."""
        folder.mkdir(parents=True, exist_ok=True)
        train_lmdb, test_lmdb = folder / "train_lmdb", folder / "test_lmdb"
        shutil.copytree(self.train_lmdb, train_lmdb)
        shutil.copytree(self.test_lmdb, test_lmdb)
        train_val, deploy = folder / "train_val.prototxt", folder / "deploy.prototxt"
        weights = folder / "float.caffemodel"
        train_val.write_text(train_val_text(train_lmdb, test_lmdb))
        shutil.copyfile(self.deploy, deploy)
        shutil.copyfile(self.weights, weights)
        return UserModel(folder, train_val, deploy, weights, train_lmdb, test_lmdb)


def build(folder: pathlib.Path, iters: int = FLOAT_ITERS) -> UserModel:
    """The LMDBs, both prototxts and the float weights trained by ``caffe train`` under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    split = digits_split()
    train_lmdb, test_lmdb = folder / "train_lmdb", folder / "test_lmdb"
    write_lmdb(train_lmdb, *split["train"])
    write_lmdb(test_lmdb, *split["test"])
    train_val, deploy = folder / "train_val.prototxt", folder / "deploy.prototxt"
    train_val.write_text(train_val_text(train_lmdb, test_lmdb))
    deploy.write_text(deploy_text())
    solver = folder / "float_solver.prototxt"
    create_solver(solver, train_val, max_iter=iters, test_iter=TEST_ITER, base_lr=0.01,
                  snapshot_prefix=folder / "float", random_seed=3)  # SGD, momentum 0.9, TEST at the end
    log = folder / "float_train.log"
    with open(log, "w") as f:
        if subprocess.run([CAFFE, "train", f"-solver={solver}"], stdout=f, stderr=subprocess.STDOUT).returncode:
            raise RuntimeError(f"caffe train of the user model failed, see {log}")
    return UserModel(folder, train_val, deploy, folder / f"float_iter_{iters}.caffemodel", train_lmdb, test_lmdb)


def test_set() -> tuple[np.ndarray, np.ndarray]:
    """The TEST phase's images as the Data layer feeds them (float32 (450, 1, 16, 16)) and labels."""
    images, labels = digits_split()["test"]
    return transformed(images), labels
