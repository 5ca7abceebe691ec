"""Fixtures shared by the Caffe tests."""
import os

import pytest

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
