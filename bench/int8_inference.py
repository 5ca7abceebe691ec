"""Inference latency, in one run: the float model in Caffe, the float model exported to ONNX
and the INT8 (QDQ) model in onnxruntime, as milliseconds per batch and ratios.

Nets: the digits demo's LeNet (450 test images in one batch) and ResNet-50 (bench/scale.py;
batch 1, 224x224x3, BatchNorm folded, factors from one TEST pass on random data).

    .venv/bin/python bench/int8_inference.py [--repeats 20]
"""
import argparse
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("GLOG_minloglevel", "2")
import caffe  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from amct_retrain.export import export_onnx  # noqa: E402
from bench.scale import float_resnet50, quantize_resnet50  # noqa: E402
from samples import digits_demo  # noqa: E402


def best_ms(run, repeats: int) -> float:
    """The fastest of ``repeats`` calls (after one warm-up), in milliseconds."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def latencies(float_model: str, float_weights: str, deploy_prefix: str, out: pathlib.Path,
              repeats: int) -> tuple[float, float, float]:
    net = caffe.Net(float_model, caffe.TEST, weights=float_weights)
    net.forward()
    x = net.blobs["data"].data.copy()
    first = list(net._layer_names)[1]
    caffe_ms = best_ms(lambda: net.forward(start=first), repeats)
    onnx_ms = []
    for tag, model, weights in (("float", float_model, float_weights),
                                ("int8", f"{deploy_prefix}_deploy_model.prototxt",
                                 f"{deploy_prefix}_deploy_weights.caffemodel")):
        onnx_file = str(out / f"{pathlib.Path(deploy_prefix).name}_{tag}.onnx")
        export_onnx(model, weights, onnx_file)
        session = onnxruntime.InferenceSession(onnx_file)
        feed = {session.get_inputs()[0].name: x.astype(np.float32)}
        onnx_ms.append(best_ms(lambda: session.run(None, feed), repeats))
    return caffe_ms, onnx_ms[0], onnx_ms[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per model (default %(default)s)")
    args = parser.parse_args()
    caffe.set_mode_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        digits_demo.run(out / "digits")
        resnet_model, resnet_weights, _ = float_resnet50(out)
        _, _, resnet_prefix = quantize_resnet50(out, resnet_model, resnet_weights)
        rows = {
            "digits LeNet, batch 450": latencies(
                str(out / "digits" / "float.prototxt"), str(out / "digits" / "float_iter_600.caffemodel"),
                str(out / "digits" / "result" / "digits"), out, args.repeats),
            "ResNet-50, batch 1": latencies(str(resnet_model), str(resnet_weights), resnet_prefix, out,
                                            args.repeats),
        }
    print(f"{'net':<28}{'Caffe float':>12}{'ORT float':>11}{'ORT INT8':>10}"
          f"{'ORT float/Caffe':>17}{'ORT INT8/ORT float':>20}   (ms per batch)")
    for name, (caffe_ms, float_ms, int8_ms) in rows.items():
        print(f"{name:<28}{caffe_ms:>12.2f}{float_ms:>11.2f}{int8_ms:>10.2f}"
              f"{float_ms / caffe_ms:>17.3f}{int8_ms / float_ms:>20.3f}")


if __name__ == "__main__":
    main()
