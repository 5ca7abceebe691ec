"""Accuracy-based automatic calibration of the digits LeNet: INT8 within 0.2 points of float.

1. writes the digits and trains the float model with `caffe train` (as samples/digits_demo.py);
2. creates the calibration config (every quantizable layer enabled);
3. runs `accuracy_based_auto_calibration` with an evaluator whose metric is the test accuracy
   and which accepts a loss of at most 0.2 points: layers that cost more stay in float;
4. prints the float and INT8 accuracies and the search's trials (history.json).
"""
import argparse
import json
import logging
import os
import pathlib
import sys

if not __package__:  # run as a script (`python samples/auto_calibration_demo.py`): make `samples` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
os.environ.setdefault("GLOG_minloglevel", "2")  # Caffe's own log goes to the log files, not the console
import caffe  # noqa: E402

import amct_retrain  # noqa: E402
from amct_retrain.saver import output_files  # noqa: E402
from samples.digits_demo import test_accuracy, train_float  # noqa: E402


class DigitsEvaluator(amct_retrain.AutoCalibrationEvaluatorBase):
    """Calibrates on ``batch_num`` TEST batches; the metric is the test accuracy (0..1).

    ``metric_eval`` is the base class's: loss = float accuracy - INT8 accuracy, accepted up
    to ``max_loss``."""

    max_loss = 0.002  # 0.2 points of accuracy (one test image of 450 is 0.22 points)

    def __init__(self, batch_num: int = 1) -> None:
        self.batch_num = batch_num

    def calibration(self, model_file: str, weights_file: str) -> None:
        net = caffe.Net(model_file, caffe.TEST, weights=weights_file)
        for _ in range(self.batch_num):
            net.forward()

    def evaluate(self, model_file: str, weights_file: str) -> float:
        return test_accuracy(model_file, weights_file)


def run(out: pathlib.Path, float_iters: int = 600, evaluator: DigitsEvaluator | None = None) -> dict:
    """The whole demo; returns the accuracies and the search's history."""
    caffe.set_mode_cpu()
    model, weights = train_float(out, float_iters)
    config = out / "calibration_config.json"
    amct_retrain.create_quant_config(str(config), str(model), str(weights))
    save_dir = out / "auto_calibration"
    amct_retrain.accuracy_based_auto_calibration(str(model), str(weights), evaluator or DigitsEvaluator(),
                                                 str(config), str(out / "record.txt"), str(save_dir))
    history = json.loads((save_dir / "history.json").read_text())
    files = output_files(str(save_dir / model.stem))
    int8 = (test_accuracy(files["fake_quant_model"], files["fake_quant_weights"])
            if os.path.exists(files["fake_quant_model"]) else None)  # absent when no layer could be quantized
    return {"float": history["original_metric"], "INT8 fake-quant": int8, "history": history}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/auto_calibration_demo", help="output folder (default %(default)s)")
    parser.add_argument("--float-iters", type=int, default=600)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = pathlib.Path(args.out).resolve()
    result = run(out, args.float_iters)
    history = result["history"]
    print(f"\n{'trial':<7}{'layers in float':<34}{'accuracy':>10}{'loss':>10}  ok")
    for t in history["trials"]:
        layers = ", ".join(t["float_layers"]) or "-"
        print(f"{t['trial']:<7}{layers:<34}{t['metric']:>10.4f}{t['loss']:>10.4f}  {t['ok']}")
    int8 = result["INT8 fake-quant"]
    print(f"\nfloat accuracy {result['float']:.4f}; accepted trial {history['accepted_trial']}: "
          + ("no layer quantized" if int8 is None else f"INT8 fake-quant accuracy {int8:.4f}"))
    print(f"models, record, sensitivity.json and history.json: {out / 'auto_calibration'}")


if __name__ == "__main__":
    main()
