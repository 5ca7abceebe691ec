"""Milliseconds per training iteration, float vs quantization-aware (QAT), in one run.

Nets: the digits demo's LeNet (batch 64, 1x8x8) and a conv net of 5 convolutions of 64
channels on 32x32x3 inputs (batch 32). Both are made quantization-aware with the public
API; the ratio QAT / float is what the fake-quant layers cost. Aim: <= 1.10 on the conv net.

    .venv/bin/python bench/qat_overhead.py [--iters 20]
"""
import argparse
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("GLOG_minloglevel", "2")
import caffe  # noqa: E402

import amct_retrain  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from samples.digits_demo import NET as DIGITS_NET  # noqa: E402

CONV_LAYER = """layer {{ name: "conv{i}" type: "Convolution" bottom: "{bottom}" top: "conv{i}"
  convolution_param {{ num_output: 64 kernel_size: 3 pad: 1 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "relu{i}" type: "ReLU" bottom: "conv{i}" top: "conv{i}" }}
"""
CONV_NET = """name: "conv5x64"
layer {{ name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param {{ shape {{ dim: 32 dim: 3 dim: 32 dim: 32 }} shape {{ dim: 32 }}
    data_filler {{ type: "gaussian" std: 1 }} data_filler {{ type: "constant" value: 1 }} }} }}
{convs}layer {{ name: "pool" type: "Pooling" bottom: "conv5" top: "pool" pooling_param {{ pool: AVE global_pooling: true }} }}
layer {{ name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" inner_product_param {{ num_output: 10 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }}
"""
SOLVER = """net: "{net}"
test_iter: 1
test_interval: 100000
test_initialization: false
base_lr: 0.001
momentum: 0.9
lr_policy: "fixed"
display: 0
max_iter: 100000
solver_mode: CPU
"""


def conv_net() -> str:
    convs = "".join(CONV_LAYER.format(i=i, bottom="data" if i == 1 else f"conv{i - 1}") for i in range(1, 6))
    return CONV_NET.format(convs=convs)


def digits_net(out: pathlib.Path) -> str:
    from samples.digits_demo import write_digits
    n_test = write_digits(out)
    return DIGITS_NET.format(out=out, test_batch=n_test)


ROUNDS = 5


def solver_for(model: pathlib.Path, weights: pathlib.Path):
    solver_file = model.with_suffix(".solver.prototxt")
    solver_file.write_text(SOLVER.format(net=model))
    solver = caffe.get_solver(str(solver_file))
    solver.net.copy_from(str(weights))
    solver.step(3)  # warm-up (and IFMR initialisation of the clips)
    return solver


def ms_per_iter(solver, iters: int) -> float:
    start = time.perf_counter()
    solver.step(iters)
    return (time.perf_counter() - start) * 1000 / iters


def measure(name: str, net_text: str, out: pathlib.Path, iters: int) -> tuple[float, float]:
    """(float, QAT) ms per iteration: the best of ROUNDS rounds, the two nets taking turns, so
    that a slow spell of this shared machine hits both alike."""
    model, weights = out / f"{name}.prototxt", out / f"{name}.caffemodel"
    model.write_text(net_text)
    caffe.Net(str(model), caffe.TRAIN).save(str(weights))
    config = out / f"{name}.json"
    amct_retrain.create_quant_retrain_config(str(config), str(model), str(weights))
    qat_model, qat_weights = out / f"{name}_qat.prototxt", out / f"{name}_qat.caffemodel"
    amct_retrain.create_quant_retrain_model(str(model), str(weights), str(config), str(qat_model),
                                            str(qat_weights), str(out / f"{name}_record.txt"))
    solvers = (solver_for(model, weights), solver_for(qat_model, qat_weights))
    rounds = [[ms_per_iter(solver, iters) for solver in solvers] for _ in range(ROUNDS)]
    return min(r[0] for r in rounds), min(r[1] for r in rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per net and round (default %(default)s)")
    args = parser.parse_args()
    caffe.set_mode_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        rows = [("digits LeNet, batch 64", *measure("digits", digits_net(out), out, args.iters)),
                ("5 conv x 64 ch, 32x32x3, batch 32", *measure("conv5x64", conv_net(), out, args.iters))]
    print(f"{'net':<36}{'float ms/iter':>15}{'QAT ms/iter':>13}{'QAT/float':>11}")
    for name, float_ms, qat_ms in rows:
        print(f"{name:<36}{float_ms:>15.2f}{qat_ms:>13.2f}{qat_ms / float_ms:>11.3f}")


if __name__ == "__main__":
    main()
