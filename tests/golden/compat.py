"""The saved-format compatibility case: a retrained model as the toolkit saves it today.

``tests/golden/compat/`` holds a small net retrained a few iterations (its quantization-aware
prototxt, the solver's snapshot, the record its last TEST pass wrote) and what
``save_quant_retrain_model`` made of them (the ``saved/`` files), plus the outputs of the saved
fake-quant model and of the deploy model in the integer executor on a fixed input. Later versions
must load these files and save them again byte for byte. ``python -m tests.golden.regenerate``
rewrites ``saved/`` and the outputs from the committed snapshot; only ``--retrain`` retrains (and
so replaces the "saved today" files: do that only when the saved format changes on purpose).
"""
import os
import pathlib
import shutil

import caffe
import numpy as np

import amct_retrain
from amct_retrain.reference import ReferenceExecutor
from amct_retrain.saver import output_files
from tests.golden.cases import GOLDEN_DIR, WORK, write_float_model

COMPAT_DIR = GOLDEN_DIR / "compat"
SAVED_DIR = COMPAT_DIR / "saved"
OUTPUTS_FILE = COMPAT_DIR / "outputs.npy"
RETRAINED = ("retrain.prototxt", "snapshot.caffemodel", "record.txt")  # what retraining left
SAVE_NAME = "compat"
ITERATIONS = 4

# Conv + BatchNorm + Scale (fused for retraining), two convolutions sharing one input, Concat,
# AVE Pooling, a Deconvolution and an InnerProduct.
NET = """name: "compat"
layer { name: "data" type: "DummyData" top: "data" top: "target"
  dummy_data_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } shape { dim: 2 dim: 5 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2a" type: "Convolution" bottom: "conv1" top: "conv2a"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "conv2b" type: "Convolution" bottom: "conv1" top: "conv2b"
  convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "concat" type: "Concat" bottom: "conv2a" bottom: "conv2b" top: "concat" }
layer { name: "pool" type: "Pooling" bottom: "concat" top: "pool" pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "deconv" type: "Deconvolution" bottom: "pool" top: "deconv"
  convolution_param { num_output: 3 kernel_size: 2 stride: 2 } }
layer { name: "relu2" type: "ReLU" bottom: "deconv" top: "deconv" }
layer { name: "fc" type: "InnerProduct" bottom: "deconv" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "fc" bottom: "target" top: "loss" }
"""


def _solver_text(model: pathlib.Path, prefix: pathlib.Path) -> str:
    return (f'net: "{model}"\ntest_iter: 1\ntest_interval: {ITERATIONS}\ntest_initialization: false\n'
            f'base_lr: 0.01\nmomentum: 0.9\nlr_policy: "fixed"\ndisplay: 0\nmax_iter: {ITERATIONS}\n'
            f'snapshot: {ITERATIONS}\nsnapshot_prefix: "{prefix}"\nsolver_mode: CPU\nrandom_seed: 1\n')


def retrain(work: pathlib.Path) -> dict[str, bytes]:
    """Retrain NET under ``work`` (TEST at the end); the RETRAINED files, ``$WORK`` for ``work``."""
    model, weights = write_float_model(SAVE_NAME, NET, work)
    config, retrain_model = work / "config.json", work / "retrain.prototxt"
    amct_retrain.create_quant_retrain_config(str(config), str(model), str(weights))
    amct_retrain.create_quant_retrain_model(str(model), str(weights), str(config), str(retrain_model),
                                            str(work / "retrain.caffemodel"), str(work / "record.txt"))
    solver_file = work / "solver.prototxt"
    solver_file.write_text(_solver_text(retrain_model, work / "snap"))
    solver = caffe.get_solver(str(solver_file))
    solver.net.copy_from(str(work / "retrain.caffemodel"))
    solver.solve()
    shutil.copyfile(work / f"snap_iter_{ITERATIONS}.caffemodel", work / "snapshot.caffemodel")
    return {name: _normalized(work / name, work) for name in RETRAINED}


def _normalized(path: pathlib.Path, work: pathlib.Path) -> bytes:
    data = path.read_bytes()
    return data if path.suffix == ".caffemodel" else data.replace(os.fsencode(work), WORK.encode())


def install_retrained(work: pathlib.Path) -> None:
    """The committed RETRAINED files into ``work``, ``$WORK`` replaced by ``work``."""
    for name in RETRAINED:
        data = (COMPAT_DIR / name).read_bytes()
        if not name.endswith(".caffemodel"):
            data = data.replace(WORK.encode(), os.fsencode(work))
        (work / name).write_bytes(data)


def save(work: pathlib.Path) -> dict[str, bytes]:
    """The committed retrained model saved (``Both``) under ``work``: saved file name -> bytes
    (``$WORK`` for ``work`` in the text files)."""
    install_retrained(work)
    save_path = work / "saved" / SAVE_NAME
    amct_retrain.save_quant_retrain_model(str(work / "retrain.prototxt"), str(work / "snapshot.caffemodel"), "Both",
                                          str(save_path), str(work / "record.txt"))
    return {pathlib.Path(path).name: _normalized(pathlib.Path(path), work) for path in output_files(str(save_path)).values()}


def fixed_input() -> np.ndarray:
    """float32 (2, 3, 8, 8): the input the saved models' outputs are recorded for."""
    return np.random.default_rng(7).normal(0.0, 1.0, (2, 3, 8, 8)).astype(np.float32)


def saved_model_outputs(saved_dir: pathlib.Path) -> np.ndarray:
    """float32 (2, batch, 5): the ``fc`` output of the saved fake-quant model (Caffe), then of the
    deploy model (integer executor), on :func:`fixed_input`, from the saved files in ``saved_dir``."""
    files = output_files(str(saved_dir / SAVE_NAME))
    x = fixed_input()
    fake = caffe.Net(files["fake_quant_model"], caffe.TEST, weights=files["fake_quant_weights"])
    fake.blobs["data"].data[...] = x
    fake.forward(start=fake._layer_names[1])  # after the DummyData layer
    reference = ReferenceExecutor(files["deploy_model"], files["deploy_weights"]).net
    reference.blobs["data"].data[...] = x
    reference.forward(start=reference._layer_names[1])
    return np.stack([fake.blobs["fc"].data, reference.blobs["fc"].data])
