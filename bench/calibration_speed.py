"""Post-training calibration of ResNet-50 (bench/scale.py; batch 8, batch_num 2: 16 generated
images): ours (init, quantize_model, the two TEST passes, save_model "Both") against onnxruntime's
``quantize_static`` (QDQ, MinMax, the same 16 images in the same two batches of 8, on the float
model exported to ONNX), in interleaved rounds of one run. Prints seconds (best and median of the
rounds) and the ratio of the medians. Aim: <= 3.

    .venv/bin/python bench/calibration_speed.py [--rounds 3]
"""
import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ.setdefault("GLOG_minloglevel", "2")
import caffe  # noqa: E402
import numpy as np  # noqa: E402
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import amct_retrain  # noqa: E402
from amct_retrain.export import export_onnx  # noqa: E402
from bench.scale import float_resnet50  # noqa: E402

BATCH, BATCH_NUM = 8, 2


class Batches(CalibrationDataReader):
    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self.feeds = iter([{name: b} for b in batches])

    def get_next(self):
        return next(self.feeds, None)


def ours(out: pathlib.Path, model: pathlib.Path, weights: pathlib.Path, batches: list[np.ndarray]) -> float:
    config, record_file = out / "config.json", out / "record.txt"
    amct_retrain.create_quant_config(str(config), str(model), str(weights), batch_num=BATCH_NUM)
    start = time.perf_counter()
    graph = amct_retrain.init(str(config), str(model), str(weights), str(record_file))
    calib_model, calib_weights = out / "calibration.prototxt", out / "calibration.caffemodel"
    amct_retrain.quantize_model(graph, str(calib_model), str(calib_weights))
    net = caffe.Net(str(calib_model), caffe.TEST, weights=str(calib_weights))
    for x in batches:
        net.blobs["data"].data[...] = x
        net.forward()
    del net
    amct_retrain.save_model(graph, "Both", str(out / "result" / "resnet50"))
    return time.perf_counter() - start


def onnxruntime_static(out: pathlib.Path, onnx_file: pathlib.Path, batches: list[np.ndarray]) -> float:
    start = time.perf_counter()
    quantize_static(str(onnx_file), str(out / "resnet50_int8.onnx"), Batches("data", batches),
                    quant_format=QuantFormat.QDQ)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default %(default)s)")
    args = parser.parse_args()
    caffe.set_mode_cpu()
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(BATCH, 3, 224, 224)).astype(np.float32) for _ in range(BATCH_NUM)]
    times = {"ours": [], "onnxruntime quantize_static": []}
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        model, weights, _ = float_resnet50(out)
        # Batch 8, and BatchNorm in inference form, as calibration's fusion requires.
        model.write_text(model.read_text().replace("dim: 1 dim: 3 dim: 224", f"dim: {BATCH} dim: 3 dim: 224", 1)
                         .replace('type: "BatchNorm"', 'type: "BatchNorm" batch_norm_param { use_global_stats: true }'))
        onnx_file = out / "resnet50.onnx"
        export_onnx(str(model), str(weights), str(onnx_file))
        for i in range(args.rounds):
            run = out / f"round{i}"
            run.mkdir()
            times["ours"].append(ours(run, model, weights, batches))
            times["onnxruntime quantize_static"].append(onnxruntime_static(run, onnx_file, batches))
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(f"ResNet-50, {BATCH_NUM} x {BATCH} images{'':<14}{'best s':>8}{'median s':>10}")
    for name, values in times.items():
        print(f"{name:<38}{min(values):>8.2f}{statistics.median(values):>10.2f}")
    ratio = statistics.median(times["ours"]) / statistics.median(times["onnxruntime quantize_static"])
    print(f"ours / onnxruntime (medians): {ratio:.2f}")


if __name__ == "__main__":
    main()
