"""Fixtures shared by the Caffe tests; without pycaffe, `-m "not caffe"` runs the pure tests.

pycaffe is imported by the fixtures that use it, not here, so that the tests not marked ``caffe``
run on a machine with only ``pip install -r requirements.txt``.
"""
import importlib.util
import os
import re

import pytest


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
    from tests import nets

    return nets.retrain_float_model(tmp_path_factory.mktemp("saver"), RETRAIN_ITERS)


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
