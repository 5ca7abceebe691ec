"""Fixtures shared by the Caffe tests; without pycaffe, `-m "not caffe"` runs the pure tests.

pycaffe is imported by the fixtures that use it, not here, so that the tests not marked ``caffe``
run on a machine with only ``pip install -r requirements.txt``.
"""
import importlib.util
import os
import re

import pytest

import amct_retrain

# Tests read Caffe's INFO log of child processes ("Finetuning from", "lr = "): keep it on,
# whatever a sample imported during collection would set.
os.environ["GLOG_minloglevel"] = "0"

CAFFE_MODULE = re.compile(r"^pytestmark = pytest\.mark\.caffe\b", re.MULTILINE)  # every test of the module


def _without_caffe_deselected(config) -> bool:
    """pycaffe is not installed and the run deselects the caffe tests (``-m "not caffe"``)."""
    return "not caffe" in " ".join((config.getoption("markexpr") or "").split()) \
        and importlib.util.find_spec("caffe") is None


def pytest_ignore_collect(collection_path, config):
    # A module whose every test is marked caffe imports pycaffe at the top: without pycaffe it cannot
    # be collected, and -m "not caffe" would deselect all of it anyway. Anything else still fails
    # loudly: a test not marked caffe that needs pycaffe is an error on such a machine.
    if collection_path.suffix == ".py" and collection_path.name.startswith("test_") \
            and _without_caffe_deselected(config):
        return bool(CAFFE_MODULE.search(collection_path.read_text(encoding="utf-8")))
    return None


def pytest_report_header(config):
    if _without_caffe_deselected(config):
        return "pycaffe is not installed: the test modules marked caffe as a whole are not collected"
    return None


@pytest.fixture
def model(tmp_path):
    """(model_file, weights_file, record_file) of the test net with master weights filled."""
    from tests import nets

    record_file = tmp_path / "record.txt"
    model_file = nets.write_net(nets.quant_net(record_file), tmp_path / "quant.prototxt")
    weights_file = tmp_path / "init.caffemodel"
    nets.init_weights(model_file, weights_file)
    return model_file, weights_file, record_file


RETRAIN_ITERS = 20


@pytest.fixture(scope="session")
def retrained(tmp_path_factory):
    """A float net made quantization-aware, trained 20 iterations, TEST at the end, saved."""
    import caffe

    from amct_retrain.saver import output_files
    from tests import nets

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
