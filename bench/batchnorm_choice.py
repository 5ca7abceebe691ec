"""How retraining treats BatchNorm: the figures behind "fold first".

The digits LeNet with BatchNorm + Scale after both convolutions is trained in float, then
retrained quantization-aware twice from the same float weights:
  fold first  - Conv+BN+Scale folded before retraining (the toolkit's default): the deploy
                model has no BatchNorm, and the retrained layer is exactly the deployed one;
  keep frozen - the BatchNorm kept (skip_fusion) with its statistics frozen, after the
                quantized convolution: exact parity too, but the deploy model keeps a float
                BatchNorm + Scale between DeQuant and the next Quant.
(Keeping BatchNorm with batch statistics and folding at save would re-quantize weights the
retraining never saw: no exact parity, so it is not a candidate.)

    .venv/bin/python bench/batchnorm_choice.py [--float-iters 600] [--retrain-iters 300]
"""
import argparse
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("GLOG_minloglevel", "2")
import caffe  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import amct_retrain  # noqa: E402
from amct_retrain import record  # noqa: E402
from amct_retrain import solver as amct_solver  # noqa: E402
from amct_retrain.saver import output_files  # noqa: E402
from samples import digits_demo  # noqa: E402

# In digits_demo.NET's str.format syntax (doubled braces); @ is the layer index.
BN = """layer {{ name: "bn@" type: "BatchNorm" bottom: "conv@" top: "conv@" }}
layer {{ name: "scale@" type: "Scale" bottom: "conv@" top: "conv@" scale_param {{ bias_term: true }} }}
layer {{ name: "relu@" type: "ReLU" bottom: "conv@" top: "conv@" }}"""


def retrain(out: pathlib.Path, model: pathlib.Path, weights: pathlib.Path, iters: int, keep_bn: bool) -> float:
    out.mkdir(parents=True)
    config, record_file = out / "config.json", out / "record.txt"
    if keep_bn:
        record.write_record(record_file, {c: record.SingleLayerRecord(skip_fusion=True) for c in ("conv1", "conv2")})
    amct_retrain.create_quant_retrain_config(str(config), str(model), str(weights))
    files = [str(out / n) for n in ("retrain.prototxt", "retrain.caffemodel")]
    amct_retrain.create_quant_retrain_model(str(model), str(weights), str(config), *files, str(record_file))
    solver_file = out / "solver.prototxt"
    amct_solver.create_solver(str(solver_file), files[0], max_iter=iters, test_iter=1,
                              snapshot_prefix=str(out / "retrained"))
    digits_demo.caffe_train(solver_file, out / "retrain.log", pathlib.Path(files[1]))
    save_path = str(out / "result" / "digits")
    amct_retrain.save_quant_retrain_model(files[0], str(out / f"retrained_iter_{iters}.caffemodel"), "Both",
                                          save_path, str(record_file))
    deploy_types = open(output_files(save_path)["deploy_model"]).read().count('type: "BatchNorm"')
    print(f"  {'keep frozen' if keep_bn else 'fold first'}: BatchNorm layers left in the deploy model: {deploy_types}")
    return digits_demo.test_accuracy(output_files(save_path)["fake_quant_model"],
                                     output_files(save_path)["fake_quant_weights"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--float-iters", type=int, default=600)
    parser.add_argument("--retrain-iters", type=int, default=300)
    args = parser.parse_args()
    caffe.set_mode_cpu()
    original = digits_demo.NET
    digits_demo.NET = original.replace('layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}',
                                       BN.replace("@", "1")).replace(
        'layer {{ name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }}', BN.replace("@", "2"))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = pathlib.Path(tmp)
            model, weights = digits_demo.train_float(out / "float", args.float_iters)
            rows = {"float (BatchNorm)": digits_demo.test_accuracy(model, weights)}
            for keep in (False, True):
                name = "keep frozen" if keep else "fold first"
                rows[f"INT8 retrained, {name}"] = retrain(out / name.replace(" ", "_"), model, weights,
                                                          args.retrain_iters, keep)
    finally:
        digits_demo.NET = original
    for label, acc in rows.items():
        print(f"{label:<34}{acc:>8.4f}")


if __name__ == "__main__":
    main()
