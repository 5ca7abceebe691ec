"""Milliseconds per training iteration, float vs quantization-aware (QAT), in one run; beside
ours, PyTorch's eager QAT on the same nets (bench/torch_qat.py) when given a Python with torch.

Nets: the digits demo's LeNet (batch 64, 1x8x8) and a conv net of 5 convolutions of 64
channels on 32x32x3 inputs (batch 16 and 32). Ours are made quantization-aware with the public
API; the ratio QAT / float is what the fake-quant layers cost. Aims: <= 1.05 on the conv net,
<= 1.25 on the LeNet. Each net is measured in --processes fresh processes; in each, every
round times ours float then QAT (and torch's float then QAT) back to back, a round's ratio is
QAT / float of those runs, and a process's ratio is the median of its rounds'; the bench prints
the median over the processes and their range.

    .venv/bin/python bench/qat_overhead.py [--processes 3] [--rounds 15] [--iters 1] [--min-seconds 0.3]
        [--torch-python VENV/bin/python]

torch (CPU) in its own environment, never a dependency of amct_retrain:
``python3 -m venv /tmp/torch-venv && /tmp/torch-venv/bin/pip install torch==2.13.0 numpy``.
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
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
  dummy_data_param {{ shape {{ dim: {batch} dim: 3 dim: 32 dim: 32 }} shape {{ dim: {batch} }}
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


def conv_net(batch: int) -> str:
    convs = "".join(CONV_LAYER.format(i=i, bottom="data" if i == 1 else f"conv{i - 1}") for i in range(1, 6))
    return CONV_NET.format(convs=convs, batch=batch)


def digits_net(out: pathlib.Path) -> str:
    from samples.digits_demo import write_digits
    n_test = write_digits(out)
    return DIGITS_NET.format(out=out, test_batch=n_test)


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


class TorchSide:
    """bench/torch_qat.py in a Python that has torch, one round per request."""

    def __init__(self, python: str) -> None:
        script = pathlib.Path(__file__).with_name("torch_qat.py")
        # Passive OpenMP threads: torch's would otherwise spin on after each round, into ours.
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
        self.proc = subprocess.Popen([python, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)

    def round(self, net: str, batch: int, iters: int) -> tuple[float, float]:
        self.proc.stdin.write(f"{net} {batch} {iters}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("bench/torch_qat.py stopped (see its error above)")
        float_ms, qat_ms = map(float, line.split())
        return float_ms, qat_ms

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def ours(name: str, net_text: str, out: pathlib.Path) -> tuple:
    """(float solver, QAT solver) of ``net_text`` made quantization-aware with the public API."""
    model, weights = out / f"{name}.prototxt", out / f"{name}.caffemodel"
    model.write_text(net_text)
    caffe.Net(str(model), caffe.TRAIN).save(str(weights))
    config = out / f"{name}.json"
    amct_retrain.create_quant_retrain_config(str(config), str(model), str(weights))
    qat_model, qat_weights = out / f"{name}_qat.prototxt", out / f"{name}_qat.caffemodel"
    amct_retrain.create_quant_retrain_model(str(model), str(weights), str(config), str(qat_model),
                                            str(qat_weights), str(out / f"{name}_record.txt"))
    return solver_for(model, weights), solver_for(qat_model, qat_weights)


NETS = [("digits LeNet, batch 64", "digits", 64), ("5 conv x 64 ch, 32x32x3, batch 16", "conv5x64", 16),
        ("5 conv x 64 ch, 32x32x3, batch 32", "conv5x64", 32)]


def one_process(net: str, batch: int, args: argparse.Namespace) -> list[list[float]]:
    """One process's rounds: per round, ms per iteration of ours (float, then QAT) and, with
    --torch-python, torch's (float, then QAT), timed back to back."""
    caffe.set_mode_cpu()
    torch_side = TorchSide(args.torch_python) if args.torch_python else None
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        net_text = digits_net(out) if net == "digits" else conv_net(batch)
        solvers = ours(f"{net}_{batch}", net_text, out)
        # At least --min-seconds per timed run: ten LeNet iterations (35 ms) were one scheduler hiccup.
        iters = max(args.iters, round(args.min_seconds * 1000 / ms_per_iter(solvers[0], max(args.iters, 3))))
        for _ in range(args.rounds):
            times = [ms_per_iter(solver, iters) for solver in solvers]
            if torch_side is not None:
                times += torch_side.round(net, batch, iters)
            rounds.append(times)
        del solvers
    if torch_side is not None:
        torch_side.close()
    return rounds


def sample(net: str, batch: int, args: argparse.Namespace) -> list[list[float]]:
    """:func:`one_process` in a child process (this script with --child)."""
    cmd = [sys.executable, __file__, "--child", net, str(batch), "--iters", str(args.iters), "--rounds",
           str(args.rounds), "--min-seconds", str(args.min_seconds)]
    if args.torch_python:
        cmd += ["--torch-python", args.torch_python]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=1, help="least timed iterations per run (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=15, help="rounds per process (default %(default)s)")
    parser.add_argument("--processes", type=int, default=3,
                        help="fresh processes per net (default %(default)s)")
    parser.add_argument("--min-seconds", type=float, default=0.3,
                        help="more iterations where --iters would take less (default %(default)s s)")
    parser.add_argument("--torch-python", help="a Python with torch, for PyTorch's eager QAT on the same nets")
    parser.add_argument("--child", nargs=2, metavar=("NET", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_process(args.child[0], int(args.child[1]), args)))
        return
    rows = [(label, [sample(net, batch, args) for _ in range(args.processes)]) for label, net, batch in NETS]
    print(f"load average at the end: {os.getloadavg()[0]:.1f}; per net {args.processes} processes of "
          f"{args.rounds} rounds, each round float then QAT, at least {args.iters} iteration(s) and "
          f"{args.min_seconds} s per run")
    print("QAT/float: the median over the processes of each process's median round ratio "
          "[lowest, highest process]; ms: medians over all runs")
    torch_cols = args.torch_python is not None
    print(f"{'net':<36}{'float ms':>10}{'QAT ms':>9}{'QAT/float':>24}" +
          (f"{'torch float':>13}{'torch QAT':>11}{'torch QAT/float':>24}" if torch_cols else ""))
    for label, processes in rows:
        line = f"{label:<36}" + _columns(processes, 0, 10, 9)
        if torch_cols:
            line += _columns(processes, 2, 13, 11)
        print(line)


def _columns(processes: list[list[list[float]]], first: int, w_float: int, w_qat: int) -> str:
    """Float ms, QAT ms and the ratio columns of the (float, QAT) pair at ``first`` of each round.

    A round's float and QAT runs are timed back to back, so their ratio shares the machine's state
    (on a shared 2-core VM, speed drifts by a third within a minute): the ratio of a process is the
    median of its rounds' ratios, not a ratio of bests taken at different moments."""
    pairs = [[(r[first], r[first + 1]) for r in rounds] for rounds in processes]
    per_process = [statistics.median(q / f for f, q in rounds) for rounds in pairs]
    float_ms = statistics.median(f for rounds in pairs for f, _ in rounds)
    qat_ms = statistics.median(q for rounds in pairs for _, q in rounds)
    spread = f"{statistics.median(per_process):.3f} [{min(per_process):.3f}, {max(per_process):.3f}]"
    return f"{float_ms:>{w_float}.2f}{qat_ms:>{w_qat}.2f}{spread:>24}"


if __name__ == "__main__":
    main()
