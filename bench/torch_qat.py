"""PyTorch's eager-mode QAT on bench/qat_overhead.py's nets, the other side of that bench.

Run by qat_overhead.py in a separate environment that has torch (never a dependency of
amct_retrain): ``--torch-python /path/to/venv/bin/python``. It reads one command per line on
stdin, ``<net> <batch> <iters>``, and answers ``<float ms/iter> <QAT ms/iter>`` for one round (the
two models take turns within the round, as ours do), so that the calling bench interleaves its
rounds with ours. Nets: "digits" (the digits demo's LeNet on 1x8x8 inputs) and "conv5x64" (5
convolutions of 64 channels with ReLU on 32x32x3, global average pooling, fc 10); SGD with
momentum 0.9, softmax cross-entropy, random data; torch on the CPU with the process's threads.
QAT: ``torch.ao.quantization.prepare_qat`` with the x86 default QAT qconfig (fake-quant with
observers on activations and per-channel weights).
"""
import sys
import time
import warnings

import torch
from torch import nn
from torch.ao import quantization as tq

WARMUP = 3


def digits_net() -> nn.Module:
    return nn.Sequential(tq.QuantStub(), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 64),
                         nn.ReLU(), nn.Linear(64, 10), tq.DeQuantStub())


def conv_net() -> nn.Module:
    layers = [tq.QuantStub()]
    for i in range(5):
        layers += [nn.Conv2d(3 if i == 0 else 64, 64, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10), tq.DeQuantStub())


NETS = {"digits": (digits_net, (1, 8, 8)), "conv5x64": (conv_net, (3, 32, 32))}


class Trainer:
    def __init__(self, model: nn.Module, batch: int, shape: tuple[int, ...]) -> None:
        self.model = model.train()
        self.opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
        self.x = torch.randn(batch, *shape)
        self.y = torch.randint(0, 10, (batch,))
        self.loss = nn.CrossEntropyLoss()
        self.step(WARMUP)

    def step(self, iters: int) -> None:
        for _ in range(iters):
            self.opt.zero_grad(set_to_none=True)
            self.loss(self.model(self.x), self.y).backward()
            self.opt.step()

    def ms_per_iter(self, iters: int) -> float:
        start = time.perf_counter()
        self.step(iters)
        return (time.perf_counter() - start) * 1000 / iters


def trainers(net: str, batch: int) -> tuple[Trainer, Trainer]:
    make, shape = NETS[net]
    torch.manual_seed(0)
    float_model = make()
    qat_model = make()
    qat_model.qconfig = tq.get_default_qat_qconfig("x86")
    tq.prepare_qat(qat_model, inplace=True)
    return Trainer(float_model, batch, shape), Trainer(qat_model, batch, shape)


def main() -> None:
    warnings.filterwarnings("ignore")  # torch.ao.quantization's deprecation notices
    cache = {}
    for line in sys.stdin:
        net, batch, iters = line.split()
        key = (net, int(batch))
        if key not in cache:
            cache[key] = trainers(*key)
        float_ms, qat_ms = (t.ms_per_iter(int(iters)) for t in cache[key])
        print(f"{float_ms} {qat_ms}", flush=True)


if __name__ == "__main__":
    main()
