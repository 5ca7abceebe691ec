"""convert_model: the INT8 models of a float model from a record file, with no calibration run.

1. runs the calibration demo (float digits CNN, calibrated with batch_num 2, saved);
2. converts the same float model with the calibration's record file (convert_model);
3. shows that every file convert_model wrote is identical, byte for byte, to the one
   save_model wrote after calibrating, and runs the converted deploy model in the integer
   reference executor.

A record of your own works the same way: it names each quantizable layer of the (fused) model,
with its factors or, to keep the layer in float, with none (see amct_retrain.calibration).
"""
import argparse
import hashlib
import logging
import os
import pathlib
import sys

os.environ.setdefault("GLOG_minloglevel", "2")  # Caffe's own log goes to the log files, not the console
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `samples` when run as a script
import amct_retrain  # noqa: E402
from amct_retrain.reference import ReferenceExecutor  # noqa: E402
from amct_retrain.saver import output_files  # noqa: E402
from samples import calibration_demo  # noqa: E402


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run(out: pathlib.Path, float_iters: int = 600) -> dict[str, object]:
    """Calibrate, then convert with the calibration's record; returns, per output kind, whether the
    two files are identical, and the converted deploy model's accuracy in the integer executor."""
    calibrated = calibration_demo.run(out, float_iters)
    converted = out / "converted" / "digits"
    amct_retrain.convert_model(str(calibrated["float_model"]), str(calibrated["float_weights"]),
                               str(calibrated["record"]), str(converted))
    saved, made = output_files(str(calibrated["save_path"])), output_files(str(converted))
    deploy = ReferenceExecutor(made["deploy_model"], made["deploy_weights"])
    return {"identical": {kind: sha256(saved[kind]) == sha256(made[kind]) for kind in saved},
            "files": {kind: (saved[kind], made[kind]) for kind in saved},
            "converted deploy accuracy": calibration_demo.mean_accuracy(deploy.net, calibration_demo.BATCH_NUM),
            "calibrated accuracy": calibrated["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/convert_demo", help="output folder (default %(default)s)")
    parser.add_argument("--float-iters", type=int, default=600)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(pathlib.Path(args.out).resolve(), args.float_iters)
    print(f"\n{'output (save_model vs convert_model)':<40}identical")
    for kind, same in result["identical"].items():
        print(f"{kind:<40}{'yes' if same else 'NO'}")
    print(f"\nconverted deploy model, integer executor: accuracy {result['converted deploy accuracy']:.4f}")
    if not all(result["identical"].values()):
        sys.exit("convert_model did not reproduce save_model's files")


if __name__ == "__main__":
    main()
