"""Fixtures shared by the Caffe tests."""
import os

import caffe
import pytest

import amct_retrain
from amct_retrain.saver import output_files

# Tests read Caffe's INFO log of child processes ("Finetuning from", "lr = "): keep it on,
# whatever a sample imported during collection would set.
os.environ["GLOG_minloglevel"] = "0"

from tests import nets


@pytest.fixture
def model(tmp_path):
    """(model_file, weights_file, record_file) of the test net with master weights filled."""
    record_file = tmp_path / "record.txt"
    model_file = nets.write_net(nets.quant_net(record_file), tmp_path / "quant.prototxt")
    weights_file = tmp_path / "init.caffemodel"
    nets.init_weights(model_file, weights_file)
    return model_file, weights_file, record_file


RETRAIN_ITERS = 20


@pytest.fixture(scope="session")
def retrained(tmp_path_factory):
    """A float net made quantization-aware, trained 20 iterations, TEST at the end, saved."""
    tmp = tmp_path_factory.mktemp("saver")
    model, weights = nets.float_model(tmp)
    config = tmp / "config.json"
    amct_retrain.create_quant_retrain_config(str(config), str(model), str(weights))
    files = {k: tmp / v for k, v in (("model", "retrain.prototxt"), ("weights", "retrain.caffemodel"),
                                     ("record", "record.txt"))}
    amct_retrain.create_quant_retrain_model(str(model), str(weights), str(config), str(files["model"]),
                                            str(files["weights"]), str(files["record"]))
    solver_file = tmp / "solver.prototxt"
    solver_file.write_text(nets.solver_text(files["model"], tmp / "snap", max_iter=RETRAIN_ITERS))
    solver = caffe.get_solver(str(solver_file))
    solver.net.copy_from(str(files["weights"]))
    solver.solve()
    snapshot = tmp / f"snap_iter_{RETRAIN_ITERS}.caffemodel"
    save_path = str(tmp / "result" / "model")
    amct_retrain.save_quant_retrain_model(str(files["model"]), str(snapshot), "Both", save_path, str(files["record"]))
    return {"tmp": tmp, "snapshot": snapshot, "save_path": save_path, **files, **output_files(save_path)}


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The digits demo (float training, QAT, saved models) and its deploy model's exact ONNX export."""
    from amct_retrain.export import export_onnx
    from samples import digits_demo

    out = tmp_path_factory.mktemp("digits")
    accuracies = digits_demo.run(out, float_iters=300, retrain_iters=100)
    prefix = out / "result" / "digits"
    files = {"out": out, "accuracies": accuracies, "onnx": out / "digits.onnx", "record": out / "record.txt",
             "deploy_model": f"{prefix}_deploy_model.prototxt", "deploy_weights": f"{prefix}_deploy_weights.caffemodel",
             "fake_quant_model": f"{prefix}_fake_quant_model.prototxt",
             "fake_quant_weights": f"{prefix}_fake_quant_weights.caffemodel"}
    export_onnx(files["deploy_model"], files["deploy_weights"], files["onnx"], mode="exact")
    return files
