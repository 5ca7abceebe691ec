"""Parity of the integer reference executor with the fake-quant model, per model and layer.

Retrains the digits demo (default schedule) and the 5 x 64-channel conv net of
bench/qat_overhead.py (a few iterations), saves both, and prints, per quantized layer, the
largest |integer executor - fake-quant Caffe model| in output steps (deq * 2^N) on the same
input, as a markdown table for docs/parity.md.

    .venv/bin/python bench/parity_report.py
"""
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("GLOG_minloglevel", "2")
import caffe  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import amct_retrain  # noqa: E402
from amct_retrain import solver as amct_solver  # noqa: E402
from amct_retrain.reference import saved_model_parity  # noqa: E402
from bench.qat_overhead import conv_net  # noqa: E402
from samples import digits_demo  # noqa: E402


def conv5x64(out: pathlib.Path, iters: int = 5) -> dict[str, float]:
    model, weights = out / "conv5x64.prototxt", out / "conv5x64.caffemodel"
    model.write_text(conv_net())
    caffe.Net(str(model), caffe.TRAIN).save(str(weights))
    files = {n: out / f"conv5x64_{n}" for n in ("config.json", "qat.prototxt", "qat.caffemodel", "record.txt",
                                               "solver.prototxt")}
    amct_retrain.create_quant_retrain_config(str(files["config.json"]), str(model), str(weights))
    amct_retrain.create_quant_retrain_model(str(model), str(weights), str(files["config.json"]),
                                            str(files["qat.prototxt"]), str(files["qat.caffemodel"]),
                                            str(files["record.txt"]))
    amct_solver.create_solver(str(files["solver.prototxt"]), str(files["qat.prototxt"]), max_iter=iters,
                              test_iter=1, snapshot_prefix=str(out / "conv5x64_retrained"))
    snapshot = amct_solver.train(str(files["solver.prototxt"]), str(files["qat.caffemodel"]))
    save_path = out / "result" / "conv5x64"
    amct_retrain.save_quant_retrain_model(str(files["qat.prototxt"]), snapshot, "Both", str(save_path),
                                          str(files["record.txt"]))
    return saved_model_parity(str(save_path), str(files["record.txt"]))


def main() -> None:
    caffe.set_mode_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        digits_demo.run(out / "digits")
        rows = {"digits LeNet (make demo)": saved_model_parity(str(out / "digits" / "result" / "digits"),
                                                                str(out / "digits" / "record.txt")),
                "5 conv x 64 ch, 32x32x3": conv5x64(out)}
    print("| model | layer | largest difference (output steps) |\n|---|---|---|")
    for model, layers in rows.items():
        for layer, steps in layers.items():
            print(f"| {model} | {layer} | {steps:g} |")


if __name__ == "__main__":
    main()
