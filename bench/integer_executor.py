"""The integer reference executor against Caffe float on ResNet-50 (bench/scale.py), batch 1, in one
run: milliseconds per forward pass, the best of interleaved rounds, and their ratio. Aim: <= 2.
With ``--profile``, the slowest layers of each net (milliseconds, best of the rounds).

    .venv/bin/python bench/integer_executor.py [--rounds 7] [--profile]
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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from amct_retrain.reference import ReferenceExecutor  # noqa: E402
from bench.scale import float_resnet50, quantize_resnet50  # noqa: E402


def forward_ms(net) -> float:
    start = time.perf_counter()
    net.forward()
    return (time.perf_counter() - start) * 1000


def layer_ms(net) -> dict[str, float]:
    """Milliseconds per layer of one forward pass (each layer run alone)."""
    times = {}
    for name in list(net._layer_names):
        start = time.perf_counter()
        net.forward(start=name, end=name)
        times[name] = (time.perf_counter() - start) * 1000
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default %(default)s)")
    parser.add_argument("--profile", action="store_true", help="print the slowest layers of each net")
    args = parser.parse_args()
    caffe.set_mode_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        model, weights, _ = float_resnet50(out)
        _, _, prefix = quantize_resnet50(out, model, weights)
        float_net = caffe.Net(str(model), caffe.TEST, weights=str(weights))
        integer_net = ReferenceExecutor(f"{prefix}_deploy_model.prototxt", f"{prefix}_deploy_weights.caffemodel").net
        x = np.random.default_rng(1).normal(size=float_net.blobs["data"].data.shape)
        nets = {"Caffe float": float_net, "integer executor": integer_net}
        for net in nets.values():
            net.blobs["data"].data[...] = x
            net.forward()  # warm-up
        best = {name: min(forward_ms(net) for _ in range(1)) for name, net in nets.items()}
        for _ in range(args.rounds - 1):
            for name, net in nets.items():
                best[name] = min(best[name], forward_ms(net))
        if args.profile:
            for name, net in nets.items():
                per_layer = layer_ms(net)
                for _ in range(2):
                    per_layer = {k: min(v, t) for (k, v), t in zip(per_layer.items(), layer_ms(net).values())}
                top = sorted(per_layer.items(), key=lambda kv: -kv[1])[:12]
                print(f"{name}: slowest layers (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in top))
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(f"{'ResNet-50, batch 1':<22}{'Caffe float ms':>16}{'integer ms':>12}{'integer/float':>15}")
    print(f"{'':<22}{best['Caffe float']:>16.1f}{best['integer executor']:>12.1f}"
          f"{best['integer executor'] / best['Caffe float']:>15.2f}")


if __name__ == "__main__":
    main()
