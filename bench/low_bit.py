"""Low-bit quantization: post-training calibration against retraining at W8A8, W4A8, W4A4, W2A8.

For each model (the digits LeNet of samples/digits_demo.py and the user model of
tests/user_model.py: LMDB Data layers, BatchNorm, Concat, LRN, AVE pooling) it trains the float
model with `caffe train`, then at each bit width (weights W, activations A):
  calibration - create_quant_config with ``num_bits`` in activation_quant_params and
                weight_quant_params, init / quantize_model / the TEST passes / save_model;
  retraining  - create_quant_retrain_config with ``num_bits`` in retrain_data_config and
                retrain_weight_config, the clips started from that calibration's record, `caffe
                train -weights` with the generated solver, save_quant_retrain_model;
and prints the top-1 test accuracy of the float model, the calibrated and the retrained
fake-quant models, and the retrained deploy model run by the integer executor, side by side.
With ``--mixed-budgets``, the digits LeNet is also retrained with the weight widths (4 or 8 per
layer, activations 8) that the mixed-precision search (amct_retrain.mixed_precision) chooses for
each average-weight-bits budget, the same way.

    .venv/bin/python bench/low_bit.py [--models digits user] [--widths W8A8 W4A8 W4A4 W2A8]
                                      [--retrain-iters 600] [--base-lr 0.001] [--mixed-budgets 5 6]
"""
import argparse
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile

os.environ.setdefault("GLOG_minloglevel", "2")
import caffe  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import amct_retrain  # noqa: E402
from amct_retrain import solver as amct_solver  # noqa: E402
from amct_retrain.mixed_precision import search_mixed_precision  # noqa: E402
from amct_retrain.reference import ReferenceExecutor  # noqa: E402
from amct_retrain.saver import output_files  # noqa: E402
from samples import digits_demo  # noqa: E402
from tests import user_model  # noqa: E402

LOG = logging.getLogger("bench.low_bit")


class Model:
    """A float model to quantize: its train_val prototxt, weights, and TEST batches per pass over the test set."""

    def __init__(self, name: str, model: pathlib.Path, weights: pathlib.Path, test_batches: int) -> None:
        self.name, self.model, self.weights, self.test_batches = name, model, weights, test_batches


def digits_model(out: pathlib.Path, float_iters: int) -> Model:
    model, weights = digits_demo.train_float(out, float_iters, test_batches=2)
    return Model("digits LeNet", model, weights, 2)


def user(out: pathlib.Path, float_iters: int) -> Model:
    built = user_model.build(out, float_iters)
    return Model("user model", built.train_val, built.weights, user_model.TEST_ITER)


MODELS = {"digits": (digits_model, 600), "user": (user, user_model.FLOAT_ITERS)}


def accuracy(net: caffe.Net, batches: int) -> float:
    """Mean top-1 accuracy over ``batches`` TEST batches (the whole test set)."""
    return sum(float(net.forward()["accuracy"]) for _ in range(batches)) / batches


def fake_quant_accuracy(save_path: str, batches: int) -> float:
    files = output_files(save_path)
    return accuracy(caffe.Net(files["fake_quant_model"], caffe.TEST, weights=files["fake_quant_weights"]), batches)


def with_bits(config_file: pathlib.Path, blocks: tuple[str, str], bits: tuple[int, int]) -> None:
    """Set ``num_bits`` in the activation and weight blocks of every layer entry of a JSON config
    (a layer without weights, AVE Pooling, has no weight block in a calibration config)."""
    data = json.loads(config_file.read_text())
    for entry in data.values():
        if isinstance(entry, dict):
            for block, b in zip(blocks, bits):
                if block in entry:
                    entry[block]["num_bits"] = b
    config_file.write_text(json.dumps(data, indent=2))


def calibrate(m: Model, out: pathlib.Path, w: int, a: int) -> tuple[float, pathlib.Path]:
    """(calibrated fake-quant accuracy, its record file)."""
    out.mkdir(parents=True)
    config, record_file = out / "calibration.json", out / "record.txt"
    amct_retrain.create_quant_config(str(config), str(m.model), str(m.weights), batch_num=m.test_batches)
    with_bits(config, ("activation_quant_params", "weight_quant_params"), (a, w))
    graph = amct_retrain.init(str(config), str(m.model), str(m.weights), str(record_file))
    files = [str(out / n) for n in ("calibration.prototxt", "calibration.caffemodel")]
    amct_retrain.quantize_model(graph, *files)
    net = caffe.Net(files[0], caffe.TEST, weights=files[1])
    for _ in range(m.test_batches):
        net.forward()
    save_path = str(out / "result" / "model")
    amct_retrain.save_model(graph, "Fakequant", save_path)
    return fake_quant_accuracy(save_path, m.test_batches), record_file


def uniform_config(m: Model, out: pathlib.Path, w: int, a: int) -> pathlib.Path:
    """The retrain config of every layer at W``w``A``a``."""
    out.mkdir(parents=True)
    config = out / "retrain.json"
    amct_retrain.create_quant_retrain_config(str(config), str(m.model), str(m.weights))
    with_bits(config, ("retrain_data_config", "retrain_weight_config"), (a, w))
    return config


def retrain(m: Model, out: pathlib.Path, config: pathlib.Path, calibration_record: pathlib.Path, iters: int,
            base_lr: float) -> tuple[float, float]:
    """(retrained fake-quant accuracy, its deploy model's accuracy in the integer executor) of
    ``config``'s retraining, the clips started from ``calibration_record``'s ranges."""
    record_file = out / "record.txt"
    shutil.copyfile(calibration_record, record_file)
    files = [str(out / n) for n in ("retrain.prototxt", "retrain.caffemodel")]
    amct_retrain.create_quant_retrain_model(str(m.model), str(m.weights), str(config), *files, str(record_file))
    solver_file = out / "solver.prototxt"
    amct_solver.create_solver(str(solver_file), files[0], max_iter=iters, test_iter=m.test_batches, base_lr=base_lr,
                              snapshot_prefix=str(out / "retrained"))
    digits_demo.caffe_train(solver_file, out / "retrain.log", pathlib.Path(files[1]))
    save_path = str(out / "result" / "model")
    amct_retrain.save_quant_retrain_model(files[0], str(out / f"retrained_iter_{iters}.caffemodel"), "Both",
                                          save_path, str(record_file))
    deploy = output_files(save_path)
    integer = ReferenceExecutor(deploy["deploy_model"], deploy["deploy_weights"]).net
    return fake_quant_accuracy(save_path, m.test_batches), accuracy(integer, m.test_batches)


def width(text: str) -> tuple[int, int]:
    """'W4A8' -> (4, 8)."""
    w, a = text.upper().removeprefix("W").split("A")
    return int(w), int(a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--widths", nargs="+", default=["W8A8", "W4A8", "W4A4", "W2A8"])
    parser.add_argument("--retrain-iters", type=int, default=600)
    parser.add_argument("--base-lr", type=float, default=0.001)
    parser.add_argument("--mixed-budgets", nargs="*", type=float, default=[],
                        help="average weight bits budgets of the mixed-precision search (digits LeNet)")
    parser.add_argument("--out", help="keep the files here (default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    caffe.set_mode_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(args.out).resolve() if args.out else pathlib.Path(tmp)
        rows, mixed, built = [], [], {}
        for key in args.models:
            build, float_iters = MODELS[key]
            m = built[key] = build(root / key / "float", float_iters)
            float_acc = accuracy(caffe.Net(str(m.model), caffe.TEST, weights=str(m.weights)), m.test_batches)
            for text in args.widths:
                w, a = width(text)
                calibrated, record_file = calibrate(m, root / key / text / "calibration", w, a)
                out = root / key / text / "retraining"
                retrained, integer = retrain(m, out, uniform_config(m, out, w, a), record_file, args.retrain_iters,
                                             args.base_lr)
                rows.append((m.name, text, float_acc, calibrated, retrained, integer))
                print(f"{m.name:<14}{text:<6}{float_acc:>8.4f}{calibrated:>12.4f}{retrained:>11.4f}{integer:>10.4f}",
                      flush=True)
        if args.mixed_budgets:
            m = built.get("digits") or digits_model(root / "digits" / "float", MODELS["digits"][1])
            _, record_file = calibrate(m, root / "digits" / "mixed_calibration", 8, 8)  # activation ranges
            for budget in args.mixed_budgets:
                out = root / "digits" / f"mixed_{budget:g}"
                out.mkdir(parents=True)
                found = search_mixed_precision(str(m.model), str(m.weights), str(out / "retrain.json"),
                                               average_weight_bits=budget, batch_num=m.test_batches)
                retrained, integer = retrain(m, out, out / "retrain.json", record_file, args.retrain_iters,
                                             args.base_lr)
                mixed.append((budget, found, retrained, integer))
                print(f"mixed {budget:g}: {found.bits} -> {retrained:.4f} / {integer:.4f}", flush=True)
    print(f"\nretraining: {args.retrain_iters} iterations, base_lr {args.base_lr}, clips from the calibration")
    print(f"{'model':<14}{'bits':<6}{'float':>8}{'calibrated':>12}{'retrained':>11}{'integer':>10}"
          f"{'calib-float':>13}{'retr-float':>12}")
    for name, text, float_acc, calibrated, retrained, integer in rows:
        print(f"{name:<14}{text:<6}{float_acc:>8.4f}{calibrated:>12.4f}{retrained:>11.4f}{integer:>10.4f}"
              f"{calibrated - float_acc:>+13.4f}{retrained - float_acc:>+12.4f}")
    if mixed:
        print("\nmixed precision, digits LeNet: activations 8 bits, weights 4 or 8 bits per layer")
        print(f"{'budget':>8}{'avg bits':>10}{'bytes':>8}{'predicted':>11}{'retrained':>11}{'integer':>9}  weight bits")
        for budget, found, retrained, integer in mixed:
            print(f"{budget:>8g}{found.average_bits:>10.3f}{found.size_bytes:>8}{found.predicted_loss:>11.5f}"
                  f"{retrained:>11.4f}{integer:>9.4f}  {found.bits}")

if __name__ == "__main__":
    main()
