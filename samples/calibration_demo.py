"""Post-training calibration of the digits CNN to INT8 in real Caffe (no retraining).

1. writes the digits as HDF5 files and trains the float model with `caffe train` (as
   digits_demo.py does; the TEST batch is half the test set);
2. creates the calibration config (batch_num 2) and the calibration model (amct_retrain API);
3. runs the calibration model twice in the TEST phase: the two batches of the test HDF5 data
   layer, the whole test set, give the factors;
4. saves the fake-quant and deploy models and prints the float and the INT8 accuracies: the
   fake-quant model in Caffe and the deploy model in the integer reference executor.
"""
import argparse
import logging
import os
import pathlib
import sys

os.environ.setdefault("GLOG_minloglevel", "2")  # Caffe's own log goes to the log files, not the console
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `samples` when run as a script
import caffe  # noqa: E402
from tqdm import tqdm  # noqa: E402

import amct_retrain  # noqa: E402
from amct_retrain.reference import ReferenceExecutor  # noqa: E402
from samples.digits_demo import train_float  # noqa: E402

BATCH_NUM = 2


def mean_accuracy(net: caffe.Net, passes: int) -> float:
    """Top-1 accuracy over ``passes`` TEST batches of ``net``'s data layer."""
    return sum(float(net.forward()["accuracy"]) for _ in range(passes)) / passes


def run(out: pathlib.Path, float_iters: int = 600) -> dict[str, object]:
    """The whole demo; returns the accuracy of each model and the files it wrote."""
    caffe.set_mode_cpu()
    float_model, float_weights = train_float(out, float_iters, test_batches=BATCH_NUM)

    config, record_file = out / "calibration_config.json", out / "record.txt"
    calibration_model, calibration_weights = out / "calibration.prototxt", out / "calibration.caffemodel"
    amct_retrain.create_quant_config(str(config), str(float_model), str(float_weights), batch_num=BATCH_NUM)
    graph = amct_retrain.init(str(config), str(float_model), str(float_weights), str(record_file))
    amct_retrain.quantize_model(graph, str(calibration_model), str(calibration_weights))
    net = caffe.Net(str(calibration_model), caffe.TEST, weights=str(calibration_weights))
    for _ in tqdm(range(BATCH_NUM), desc="calibration", unit="batch"):
        net.forward()
    save_path = out / "result" / "digits"
    amct_retrain.save_model(graph, "Both", str(save_path))

    fake_quant = caffe.Net(f"{save_path}_fake_quant_model.prototxt", caffe.TEST,
                           weights=f"{save_path}_fake_quant_weights.caffemodel")
    deploy = ReferenceExecutor(f"{save_path}_deploy_model.prototxt", f"{save_path}_deploy_weights.caffemodel")
    return {
        "accuracy": {
            "float": mean_accuracy(caffe.Net(str(float_model), caffe.TEST, weights=str(float_weights)), BATCH_NUM),
            "INT8 fake-quant, calibrated": mean_accuracy(fake_quant, BATCH_NUM),
            "INT8 deploy, integer executor": mean_accuracy(deploy.net, BATCH_NUM),
        },
        "float_model": float_model, "float_weights": float_weights, "config": config, "record": record_file,
        "save_path": save_path,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/calibration_demo", help="output folder (default %(default)s)")
    parser.add_argument("--float-iters", type=int, default=600)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = pathlib.Path(args.out).resolve()
    result = run(out, args.float_iters)
    print(f"\n{'model':<38}{'test accuracy':>14}")
    for label, acc in result["accuracy"].items():
        print(f"{label:<38}{acc:>14.4f}")
    print(f"\nfake-quant and deploy models: {out / 'result'}; config, record and logs: {out}")


if __name__ == "__main__":
    main()
