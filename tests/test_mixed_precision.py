"""The mixed-precision search: the greedy assignment under a budget (pure), and the whole search on a
real Caffe net writing a retrain config that create_quant_retrain_model takes."""
import json

import caffe
import pytest

import amct_retrain
from amct_retrain import record
from amct_retrain.errors import ArgumentError
from amct_retrain.mixed_precision import assign_bits, average_bits, search_mixed_precision, weight_size_bytes
from tests import nets

WEIGHTS = {"a": 1000, "b": 1000, "c": 2000}


def test_the_budget_narrows_the_least_sensitive_weights_first():
    sensitivity = {"a": {8: 0.0, 4: 0.30}, "b": {8: 0.0, 4: 0.01}, "c": {8: 0.0, 4: 0.05}}
    assert assign_bits(sensitivity, WEIGHTS, 8 * 4000) == {"a": 8, "b": 8, "c": 8}, "a budget of 8 bits narrows none"
    # 7 bits on average: narrowing b saves 4000 bits for 0.01, c 8000 for 0.05 (more per bit)
    assert assign_bits(sensitivity, WEIGHTS, 7 * 4000) == {"a": 8, "b": 4, "c": 8}
    five = assign_bits(sensitivity, WEIGHTS, 5 * 4000)
    assert five == {"a": 8, "b": 4, "c": 4} and average_bits(five, WEIGHTS) == 5.0
    assert weight_size_bytes(five, WEIGHTS) == (8000 + 4000 + 8000) // 8
    with pytest.raises(ArgumentError, match="narrowest"):
        assign_bits(sensitivity, WEIGHTS, 3.9 * 4000)


def test_three_candidates_step_through_the_middle_one():
    sensitivity = {"a": {8: 0.0, 4: 0.02, 2: 0.5}, "b": {8: 0.0, 4: 0.04, 2: 0.06}}
    bits = assign_bits(sensitivity, {"a": 100, "b": 100}, 6 * 200)
    assert bits == {"a": 4, "b": 8}
    assert assign_bits(sensitivity, {"a": 100, "b": 100}, 3 * 200) == {"a": 4, "b": 2}


@pytest.mark.caffe
def test_the_search_writes_a_retrain_config_the_retraining_takes(tmp_path):
    model, weights = nets.float_model(tmp_path)
    config = tmp_path / "mixed" / "config.json"
    config.parent.mkdir()
    result = search_mixed_precision(str(model), str(weights), str(config), average_weight_bits=6)
    assert set(result.bits) == set(nets.QUANTIZED) and result.average_bits <= 6
    assert set(result.bits.values()) <= {4, 8} and 4 in result.bits.values()
    # (DummyData draws new random batches: which width scores worse on a layer is not stable here)
    assert all(set(by_bits) == {4, 8} and min(by_bits.values()) >= 0 for by_bits in result.sensitivity.values())
    assert result.bits == assign_bits(result.sensitivity, result.weights, 6 * sum(result.weights.values()))
    assert result.predicted_loss == pytest.approx(sum(result.sensitivity[n][b] for n, b in result.bits.items()))
    data = json.loads(config.read_text())
    assert {name: data[name]["retrain_weight_config"]["num_bits"] for name in nets.QUANTIZED} == result.bits
    report = json.loads((config.parent / "mixed_precision.json").read_text())
    assert report["bits"] == result.bits
    files = [tmp_path / n for n in ("retrain.prototxt", "retrain.caffemodel", "record.txt")]
    amct_retrain.create_quant_retrain_model(str(model), str(weights), str(config), *map(str, files))
    net = caffe.Net(str(files[0]), caffe.TEST, weights=str(files[1]))
    net.forward()
    widths = {name: record.bit_widths(rec)[1] for name, rec in record.read_record(files[2]).items()}
    assert widths == result.bits, "the retrained model's TEST pass records other weight widths"


@pytest.mark.caffe
def test_the_cli_step_writes_the_config_or_says_why_not(tmp_path, capsys):
    from amct_retrain.cli import main

    model, weights = nets.float_model(tmp_path)
    config = tmp_path / "config.json"
    args = ["mixed-precision", "--model", str(model), "--weights", str(weights), "--output", str(config)]
    assert main([*args, "--average-bits", "3"]) == 2
    assert "narrowest" in capsys.readouterr().err and not config.exists()
    assert main([*args, "--size-bytes", "100000"]) == 0  # more than a byte per weight: all at 8 bits
    report = json.loads((tmp_path / "mixed_precision.json").read_text())
    assert report["bits"] == dict.fromkeys(nets.QUANTIZED, 8), report["bits"]
    assert report["size_bytes"] == sum(report["weights"].values())
    assert json.loads(config.read_text())["fc"]["retrain_weight_config"]["num_bits"] == 8
