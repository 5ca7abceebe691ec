"""End to end on the digits demo net (shorter schedule), and the CLI a user drives it with."""
import json
import os
import subprocess
import sys

import caffe
import numpy as np
import pytest

from amct_retrain import cli, record
from samples import digits_demo
from tests import analysis_check, nets

pytestmark = pytest.mark.caffe


def test_digits_retrained_int8_within_one_point_of_float(tmp_path):
    acc = digits_demo.run(tmp_path, float_iters=300, retrain_iters=100)
    assert acc["float"] > 0.9, f"the float model did not learn the digits: {acc}"
    loss = acc["float"] - acc["INT8 fake-quant, retrained"]
    assert loss <= 0.01, f"retrained INT8 loses {loss:.4f} (more than 1 point): {acc}"
    for integer in ("INT8 deploy, integer executor", "INT8 ONNX QDQ, onnxruntime"):
        assert abs(acc[integer] - acc["INT8 fake-quant, retrained"]) <= 0.005, \
            f"{integer} disagrees with the fake-quant model: {acc}"
    records = record.read_record(tmp_path / "record.txt")
    assert set(records) == {"conv1", "conv2", "ip1", "ip2"} and all(
        record.layer_record_complete(r) for r in records.values()), f"incomplete record: {records}"
    for suffix in ("fake_quant_model.prototxt", "fake_quant_weights.caffemodel", "deploy_model.prototxt",
                   "deploy_weights.caffemodel", "quant.json"):
        assert (tmp_path / "result" / f"digits_{suffix}").exists(), f"missing output digits_{suffix}"
    # The demo's per-layer analysis equals numpy on both models' blobs (one HDF5 TEST batch).
    analysis = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    prefix = tmp_path / "result" / "digits"
    files = [tmp_path / "float.prototxt", tmp_path / "float_iter_300.caffemodel",
             f"{prefix}_fake_quant_model.prototxt", f"{prefix}_fake_quant_weights.caffemodel"]
    kept = analysis_check.layer_blobs(*files, f"{prefix}_quant.json", [None])
    analysis_check.assert_analysis_matches(analysis, analysis_check.expected_metrics(kept, files[2]), "digits demo")
    assert (tmp_path / "analysis" / "report.html").stat().st_size > 0, "the demo wrote no report"


def test_cli_runs_the_steps_and_reports_bad_input(tmp_path):
    model, weights = nets.float_model(tmp_path)
    config, out = tmp_path / "config.json", tmp_path / "prep"
    assert cli.main(["config", "--model", str(model), "--weights", str(weights), "--output", str(config)]) == 0
    assert set(json.loads(config.read_text())) >= set(nets.QUANTIZED), "config lacks the quantizable layers"
    assert cli.main(["prepare", "--model", str(model), "--weights", str(weights), "--config", str(config),
                     "--output-dir", str(out), "--max-iter", "6", "--test-iter", "1"]) == 0
    assert cli.main(["train", "--solver", str(out / "solver.prototxt"),
                     "--weights", str(out / "retrain.caffemodel")]) == 0
    assert cli.main(["save", "--model", str(out / "retrain.prototxt"),
                     "--weights", str(out / "retrained_iter_6.caffemodel"),
                     "--save-path", str(tmp_path / "result" / "m")]) == 0
    fake = caffe.Net(str(tmp_path / "result" / "m_fake_quant_model.prototxt"), caffe.TEST,
                     weights=str(tmp_path / "result" / "m_fake_quant_weights.caffemodel"))
    assert np.isfinite(fake.forward()["loss"]), "the saved fake-quant model does not run"
    deploy = ["--model", str(tmp_path / "result" / "m_deploy_model.prototxt"),
              "--weights", str(tmp_path / "result" / "m_deploy_weights.caffemodel")]
    assert cli.main(["reference", *deploy]) == 0
    assert cli.main(["export-onnx", *deploy, "--output", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 0, "export-onnx wrote nothing"
    # Bad input: an error line naming the file, exit code 2, no traceback.
    code = cli.main(["save", "--model", str(model), "--weights", str(weights), "--save-path", str(tmp_path / "x")])
    assert code == 2, "saving a model that was never made quantization-aware must fail"


def test_console_script_help_lists_the_steps():
    script = os.path.join(os.path.dirname(sys.executable), "amct-retrain")
    run = subprocess.run([script, "--help"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    for step in ("config", "prepare", "train", "save", "reference", "export-onnx", "calibrate", "convert",
                 "auto-calibrate", "analyze"):
        assert step in run.stdout, f"--help does not mention the {step} step:\n{run.stdout}"


def test_cli_calibrate_convert_and_auto_calibrate_on_digits(tmp_path):
    model, weights = digits_demo.train_float(tmp_path / "float", 300)
    out = tmp_path / "calib"
    assert cli.main(["calibrate", "--model", str(model), "--weights", str(weights), "--output-dir", str(out)]) == 0
    prefix = out / "result" / "float"
    accuracy = digits_demo.test_accuracy(f"{prefix}_fake_quant_model.prototxt", f"{prefix}_fake_quant_weights.caffemodel")
    assert accuracy >= digits_demo.test_accuracy(model, weights) - 0.02, f"calibrated accuracy {accuracy}"
    assert cli.main(["convert", "--model", str(model), "--weights", str(weights), "--record", str(out / "record.txt"),
                     "--save-path", str(tmp_path / "converted" / "m")]) == 0
    assert (tmp_path / "converted" / "m_deploy_weights.caffemodel").read_bytes() == \
        (out / "result" / "float_deploy_weights.caffemodel").read_bytes(), "convert did not reproduce calibrate"
    assert cli.main(["auto-calibrate", "--model", str(model), "--weights", str(weights),
                     "--config", str(out / "calibration_config.json"), "--record", str(tmp_path / "auto.txt"),
                     "--save-dir", str(tmp_path / "auto")]) == 0
    assert (tmp_path / "auto" / "history.json").exists(), "auto-calibrate wrote no history"
