"""INT8 inference in onnxruntime, in one run: the float model exported to ONNX, the standard
INT8 export (QDQ that onnxruntime fuses into integer kernels), the exact INT8 export (the
deploy model's integer arithmetic bit for bit), and onnxruntime's own ``quantize_static`` of the
same float ONNX model with uint8 and with int8 activations (QDQ, per-channel int8 weights,
MinMax calibration on the same inputs); milliseconds per batch and ratios to float, with the op
counts of the graph onnxruntime optimizes each model into.

Nets: ResNet-50 (bench/scale.py; 224x224x3, BatchNorm folded, factors from one TEST pass on
random data) at batch 1 and 8, and the digits demo's LeNet (its 450 test images in one batch).
Sessions: CPU, ``intra_op_num_threads`` 2 (no spinning), all graph optimizations. Every round runs each model
once, in turn (interleaved rounds), so that a slow spell of a shared machine hits all of them;
the tables show the fastest round of each and the median of the per-round ratios to float,
of wall-clock time and of the process's CPU time (steadier when other processes load the
machine).

    .venv/bin/python bench/int8_inference.py [--rounds 7]
"""
import argparse
import collections
import logging
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("GLOG_minloglevel", "2")
import h5py  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnxruntime import quantization  # noqa: E402
from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from amct_retrain.export import export_onnx  # noqa: E402
from bench.scale import float_resnet50, quantize_resnet50  # noqa: E402
from samples import digits_demo  # noqa: E402

THREADS = 2
#: Op types shown in the op-count column (the rest are summed as "other").
SHOWN_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd", "QLinearConcat", "Conv", "FusedConv", "Gemm",
             "ConvInteger", "MatMulInteger", "QuantizeLinear", "DequantizeLinear")


class _Feeds(quantization.CalibrationDataReader):
    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self._feeds = iter([{name: b} for b in batches])

    def get_next(self):
        return next(self._feeds, None)


def onnx_models(out: pathlib.Path, tag: str, float_model: str, float_weights: str, deploy_prefix: str,
                calibration: list[np.ndarray]) -> dict[str, pathlib.Path]:
    """The five ONNX models of one net, by column name."""
    files = {name: out / f"{tag}_{name.replace(' ', '_')}.onnx" for name in (
        "float", "standard INT8", "exact INT8", "ORT static u8", "ORT static s8")}
    export_onnx(float_model, float_weights, files["float"])
    deploy = (f"{deploy_prefix}_deploy_model.prototxt", f"{deploy_prefix}_deploy_weights.caffemodel")
    export_onnx(*deploy, files["standard INT8"], mode="standard")
    export_onnx(*deploy, files["exact INT8"], mode="exact")
    name = onnx.load(str(files["float"])).graph.input[0].name
    # onnxruntime's recommended pre-processing first: it folds the BatchNorm layers into the
    # convolutions, as the deploy model has them.
    prepared = out / f"{tag}_float_prepared.onnx"
    quant_pre_process(str(files["float"]), str(prepared), skip_symbolic_shape=True)
    for column, activations in (("ORT static u8", quantization.QuantType.QUInt8),
                                ("ORT static s8", quantization.QuantType.QInt8)):
        quantization.quantize_static(str(prepared), str(files[column]), _Feeds(name, calibration),
                                     quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                                     activation_type=activations, weight_type=quantization.QuantType.QInt8)
    return files


def session(onnx_file: pathlib.Path, optimized: pathlib.Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # the NCHWc warning when the optimized graph is saved
    # Idle pool threads sleep instead of spinning: five live sessions' spinning threads on a
    # shared 2-core machine would otherwise slow whichever model runs (the small LeNet most).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])


def op_counts(onnx_file: pathlib.Path) -> str:
    optimized = onnx_file.with_suffix(".optimized.onnx")
    session(onnx_file, optimized)
    counts = collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    shown = [f"{op} {counts.pop(op)}" for op in SHOWN_OPS if op in counts]
    return ", ".join(shown + [f"other {sum(counts.values())}"])


def interleaved_ms(files: dict[str, pathlib.Path], x: np.ndarray,
                   rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Milliseconds per batch of each model, wall-clock and this process's CPU time, one run
    per model per round (after a warm-up). CPU time (the pool threads sleep when idle) is what
    other processes' load disturbs least: they take cores away, not work."""
    sessions = {name: session(f) for name, f in files.items()}
    feeds = {name: {s.get_inputs()[0].name: x} for name, s in sessions.items()}
    for name, s in sessions.items():
        s.run(None, feeds[name])
    wall: dict[str, list[float]] = {name: [] for name in sessions}
    cpu: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            s.run(None, feeds[name])
            wall[name].append((time.perf_counter() - start) * 1000)
            cpu[name].append((time.process_time() - start_cpu) * 1000)
    return wall, cpu


def median_ratios(times: dict[str, list[float]]) -> dict[str, float]:
    """Median over the rounds of each model's time over float's in the same round."""
    return {name: float(np.median(np.array(t) / np.array(times["float"]))) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default %(default)s)")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's per-tensor warnings
    load_before = os.getloadavg()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        digits_demo.run(out / "digits")
        with h5py.File(out / "digits" / "test.h5") as f:
            digits = f["data"][...].astype(np.float32)
        resnet_model, resnet_weights, _ = float_resnet50(out)
        _, _, resnet_prefix = quantize_resnet50(out, resnet_model, resnet_weights)
        images = [rng.normal(size=(1, 3, 224, 224)).astype(np.float32) for _ in range(4)]
        nets = {
            "ResNet-50": onnx_models(out, "resnet50", str(resnet_model), str(resnet_weights), resnet_prefix,
                                     images),
            "digits LeNet": onnx_models(out, "digits", str(out / "digits" / "float.prototxt"),
                                        str(out / "digits" / "float_iter_600.caffemodel"),
                                        str(out / "digits" / "result" / "digits"), [digits]),
        }
        ops = {(net, name): op_counts(f) for net, files in nets.items() for name, f in files.items()}
        for net, batch, x in (("ResNet-50", 1, images[0]),
                              ("ResNet-50", 8, rng.normal(size=(8, 3, 224, 224)).astype(np.float32)),
                              ("digits LeNet", len(digits), digits)):
            wall, cpu = interleaved_ms(nets[net], x, args.rounds)
            rows.append((f"{net}, batch {batch}", {name: min(t) for name, t in wall.items()}, median_ratios(wall),
                         median_ratios(cpu)))
    load_after = os.getloadavg()
    columns = list(rows[0][1])
    print(f"onnxruntime {ort.__version__}, {THREADS} threads, {args.rounds} interleaved rounds; load average "
          f"(1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after, on {os.cpu_count()} CPUs")
    print(f"{'ms per batch (fastest round)':<28}" + "".join(f"{c:>16}" for c in columns))
    for label, best, *_ in rows:
        print(f"{label:<28}" + "".join(f"{best[c]:>16.1f}" for c in columns))
    for title, column in (("ratio to float (median)", 2), ("ratio, CPU time (median)", 3)):
        print(f"{title:<28}")
        for row in rows:
            print(f"{row[0]:<28}" + "".join(f"{row[column][c]:>16.3f}" for c in columns))
    print("op counts of the graphs onnxruntime optimizes the models into:")
    for (net, name), counts in ops.items():
        print(f"  {net:<14}{name:<15}{counts}")


if __name__ == "__main__":
    main()
