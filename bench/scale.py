"""Scale: create_quant_retrain_model and save_quant_retrain_model on ResNet-50 (25.6 M
parameters) and VGG-16 (138 M), each against what pycaffe takes to load and save the same float
net, with the peak memory of each. Aims: create and save each <= 2x pycaffe's load + save (median
of interleaved rounds), peak memory <= pycaffe's.

Each step runs in a process of its own, round after round (baseline, create, save, in turn), so
that a slow spell of the machine hits all of them and each process's peak resident memory
is its own: "peak MiB" is the step's process (VmHWM), "probe MiB" the largest child it ran
(create's shape probe builds the net in Caffe in a child process, one phase at a time; its
``ru_maxrss``, which counts what the step held when it forked, so an upper bound).

    .venv/bin/python bench/scale.py [--nets resnet50 vgg16] [--rounds 3]
"""
import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("GLOG_minloglevel", "2")
import caffe  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import amct_retrain  # noqa: E402
from amct_retrain import record  # noqa: E402


def _conv_bn(name: str, bottom: str, out: int, kernel: int, stride: int = 1, relu: bool = True) -> str:
    text = f"""layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}"
  convolution_param {{ num_output: {out} kernel_size: {kernel} stride: {stride} pad: {kernel // 2}
    bias_term: false weight_filler {{ type: "msra" }} }} }}
layer {{ name: "bn_{name}" type: "BatchNorm" bottom: "{name}" top: "{name}" }}
layer {{ name: "scale_{name}" type: "Scale" bottom: "{name}" top: "{name}" scale_param {{ bias_term: true }} }}
"""
    if relu:
        text += f'layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" top: "{name}" }}\n'
    return text


def resnet50() -> str:
    """ResNet-50: 7x7 stem, bottleneck stages [3, 4, 6, 3], global pool, fc 1000 (25.6 M params)."""
    text = ['name: "resnet50"\nlayer { name: "data" type: "Input" top: "data" '
            'input_param { shape { dim: 1 dim: 3 dim: 224 dim: 224 } } }\n',
            _conv_bn("conv1", "data", 64, 7, 2),
            'layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" '
            'pooling_param { pool: MAX kernel_size: 3 stride: 2 } }\n']
    bottom = "pool1"
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=2):
        for block in range(blocks):
            name = f"res{stage}{chr(ord('a') + block)}"
            stride = 2 if block == 0 and stage > 2 else 1
            shortcut = bottom
            if block == 0:
                text.append(_conv_bn(f"{name}_branch1", bottom, width * 4, 1, stride, relu=False))
                shortcut = f"{name}_branch1"
            text.append(_conv_bn(f"{name}_branch2a", bottom, width, 1, stride))
            text.append(_conv_bn(f"{name}_branch2b", f"{name}_branch2a", width, 3))
            text.append(_conv_bn(f"{name}_branch2c", f"{name}_branch2b", width * 4, 1, relu=False))
            text.append(f'layer {{ name: "{name}" type: "Eltwise" bottom: "{shortcut}" bottom: "{name}_branch2c" '
                        f'top: "{name}" }}\nlayer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" top: "{name}" }}\n')
            bottom = name
    text.append(f'layer {{ name: "pool5" type: "Pooling" bottom: "{bottom}" top: "pool5" '
                'pooling_param { pool: AVE global_pooling: true } }\n'
                'layer { name: "fc1000" type: "InnerProduct" bottom: "pool5" top: "fc1000" '
                'inner_product_param { num_output: 1000 weight_filler { type: "xavier" } } }\n')
    return "".join(text)


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def vgg16() -> str:
    """VGG-16 (configuration D): 13 3x3 convolutions in 5 blocks, fc6/fc7 4096, fc8 1000 (138 M
    params), batch 1."""
    text = ['name: "vgg16"\nlayer { name: "data" type: "Input" top: "data" '
            'input_param { shape { dim: 1 dim: 3 dim: 224 dim: 224 } } }\n']
    bottom = "data"
    for block, (convs, width) in enumerate(zip((2, 2, 3, 3, 3), (64, 128, 256, 512, 512)), start=1):
        for i in range(1, convs + 1):
            name = f"conv{block}_{i}"
            text.append(f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
                        f'convolution_param {{ num_output: {width} kernel_size: 3 pad: 1 '
                        f'weight_filler {{ type: "xavier" }} }} }}\n'
                        f'layer {{ name: "relu{block}_{i}" type: "ReLU" bottom: "{name}" top: "{name}" }}\n')
            bottom = name
        text.append(f'layer {{ name: "pool{block}" type: "Pooling" bottom: "{bottom}" top: "pool{block}" '
                    'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n')
        bottom = f"pool{block}"
    for name, width in (("fc6", 4096), ("fc7", 4096), ("fc8", 1000)):
        text.append(f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}" '
                    f'inner_product_param {{ num_output: {width} weight_filler {{ type: "xavier" }} }} }}\n')
        if name != "fc8":
            text.append(f'layer {{ name: "relu_{name}" type: "ReLU" bottom: "{name}" top: "{name}" }}\n')
        bottom = name
    return "".join(text)


NETS = {"resnet50": resnet50, "vgg16": vgg16}


def float_net(out: pathlib.Path, name: str) -> tuple[pathlib.Path, pathlib.Path, int]:
    """``name``'s prototxt and caffemodel (fillers; BatchNorm statistics mean 0 / variance 1 where
    the fillers leave 0) under ``out``; returns them and the parameter count."""
    model, weights = out / f"{name}.prototxt", out / f"{name}.caffemodel"
    model.write_text(NETS[name]())
    net = caffe.Net(str(model), caffe.TEST)
    for layer, blobs in net.params.items():
        if layer.startswith("bn_"):
            blobs[1].data[...], blobs[2].data[...] = 1.0, 1.0
    net.save(str(weights))
    return model, weights, sum(b.data.size for blobs in net.params.values() for b in blobs)


def float_resnet50(out: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, int]:
    """:func:`float_net` of ResNet-50 (the other benches' net)."""
    return float_net(out, "resnet50")


def _retrain_files(out: pathlib.Path) -> dict[str, pathlib.Path]:
    return {n: out / n for n in ("retrain.prototxt", "retrain.caffemodel", "record.txt")}


def create(out: pathlib.Path, model: pathlib.Path, weights: pathlib.Path) -> float:
    """create_quant_retrain_config (untimed) and create_quant_retrain_model: seconds of the latter."""
    config = out / "config.json"
    if not config.exists():
        amct_retrain.create_quant_retrain_config(str(config), str(model), str(weights))
    return timed(lambda: amct_retrain.create_quant_retrain_model(
        str(model), str(weights), str(config), *(str(p) for p in _retrain_files(out).values())))


def test_pass(out: pathlib.Path) -> None:
    """One TEST pass of the modified net on random data (IFMR clips, the shift-N record), saved."""
    files = _retrain_files(out)
    retrain = caffe.Net(str(files["retrain.prototxt"]), caffe.TEST, weights=str(files["retrain.caffemodel"]))
    retrain.blobs["data"].data[...] = np.random.default_rng(0).normal(size=retrain.blobs["data"].data.shape)
    retrain.forward()
    retrain.save(str(out / "tested.caffemodel"))


def save(out: pathlib.Path) -> tuple[float, str]:
    """save_quant_retrain_model (Both) of the tested net: (seconds, save_path)."""
    files = _retrain_files(out)
    save_path = str(out / "result" / "net")
    seconds = timed(lambda: amct_retrain.save_quant_retrain_model(
        str(files["retrain.prototxt"]), str(out / "tested.caffemodel"), "Both", save_path, str(files["record.txt"])))
    return seconds, save_path


def quantize_resnet50(out: pathlib.Path, model: pathlib.Path, weights: pathlib.Path) -> tuple[float, float, str]:
    """create_quant_retrain_model, one TEST pass and save_quant_retrain_model in this process (the
    other benches' deploy model); returns (create seconds, save seconds, save_path)."""
    create_s = create(out, model, weights)
    test_pass(out)
    save_s, save_path = save(out)
    return create_s, save_s, save_path


def _step(name: str, out: pathlib.Path, model: pathlib.Path, weights: pathlib.Path) -> None:
    """One step in this (child) process; prints its seconds and peak memory as JSON. create writes
    into ``out/created`` (each round anew); save reads the model the parent made in ``out/saved``."""
    caffe.set_mode_cpu()
    if name == "baseline":
        seconds = timed(lambda: caffe.Net(str(model), caffe.TEST, weights=str(weights)).save(str(out / "copy.caffemodel")))
    elif name == "create":
        (out / "created").mkdir(exist_ok=True)
        seconds = create(out / "created", model, weights)
    else:
        seconds = save(out / "saved")[0]
    print(json.dumps({"seconds": seconds, "peak_mib": _high_water_mib(),
                      "probe_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def _high_water_mib() -> float:
    """This process's peak resident memory since its exec (VmHWM): unlike ``ru_maxrss``, not
    raised to what the parent held when it forked."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _run_step(name: str, out: pathlib.Path, model: pathlib.Path, weights: pathlib.Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--step", name, str(out), str(model), str(weights)],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"step {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


STEPS = ("baseline", "create", "save")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", choices=sorted(NETS), default=["resnet50", "vgg16"])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default %(default)s)")
    parser.add_argument("--step", nargs=4, help=argparse.SUPPRESS)  # internal: one step in a child
    args = parser.parse_args()
    if args.step:
        _step(args.step[0], *map(pathlib.Path, args.step[1:]))
        return
    caffe.set_mode_cpu()
    rows = []
    for name in args.nets:
        with tempfile.TemporaryDirectory() as tmp:
            out = pathlib.Path(tmp)
            model, weights, params = float_net(out, name)
            saved = out / "saved"  # the retrained model that save writes out, made once, untimed
            saved.mkdir()
            create(saved, model, weights)
            test_pass(saved)
            runs: dict[str, list[dict]] = {step: [] for step in STEPS}
            for _ in range(args.rounds):
                for step in STEPS:
                    runs[step].append(_run_step(step, out, model, weights))
            quantized = len(record.read_record(saved / "record.txt"))
        rows.append((name, params, quantized, runs))
    print(f"load average at the end: {os.getloadavg()[0]:.1f}; median of {args.rounds} interleaved rounds, "
          "each step in its own process")
    print(f"{'net':<30}{'step':<34}{'seconds':>9}{'ratio':>8}{'peak MiB':>10}{'probe MiB':>11}")
    for name, params, quantized, runs in rows:
        label = f"{name} ({params / 1e6:.1f} M, {quantized} q)"
        base = statistics.median(r["seconds"] for r in runs["baseline"])
        for step, title in zip(STEPS, ("pycaffe load + save (float)", "create_quant_retrain_model",
                                       "save_quant_retrain_model (Both)")):
            seconds = statistics.median(r["seconds"] for r in runs[step])
            peak = max(r["peak_mib"] for r in runs[step])
            probe = max(r["probe_mib"] for r in runs[step])
            print(f"{label:<30}{title:<34}{seconds:>9.2f}{seconds / base:>8.2f}{peak:>10.0f}{probe:>11.0f}")
            label = ""


if __name__ == "__main__":
    main()
