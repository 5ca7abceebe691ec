"""Scale: create_quant_retrain_model and save_quant_retrain_model on a ResNet-50-size net
(about 25 M parameters), each against what pycaffe takes to load and save the same float net.
Aim: each ratio <= 3.

    .venv/bin/python bench/scale.py
"""
import os
import pathlib
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


def float_resnet50(out: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, int]:
    """ResNet-50 prototxt and caffemodel (fillers, BatchNorm statistics mean 0 / variance 1 where
    the fillers leave 0) under ``out``; returns them and the parameter count."""
    model, weights = out / "resnet50.prototxt", out / "resnet50.caffemodel"
    model.write_text(resnet50())
    net = caffe.Net(str(model), caffe.TEST)
    for name, blobs in net.params.items():
        if name.startswith("bn_"):
            blobs[1].data[...], blobs[2].data[...] = 1.0, 1.0
    net.save(str(weights))
    return model, weights, sum(b.data.size for blobs in net.params.values() for b in blobs)


def quantize_resnet50(out: pathlib.Path, model: pathlib.Path, weights: pathlib.Path) -> tuple[float, float, str]:
    """create_quant_retrain_model, one TEST pass (IFMR clips, shift-N record), and
    save_quant_retrain_model; returns (create seconds, save seconds, save_path)."""
    config = out / "config.json"
    amct_retrain.create_quant_retrain_config(str(config), str(model), str(weights))
    files = {n: out / n for n in ("retrain.prototxt", "retrain.caffemodel", "record.txt")}
    create = timed(lambda: amct_retrain.create_quant_retrain_model(
        str(model), str(weights), str(config), *(str(p) for p in files.values())))
    retrain = caffe.Net(str(files["retrain.prototxt"]), caffe.TEST, weights=str(files["retrain.caffemodel"]))
    retrain.blobs["data"].data[...] = np.random.default_rng(0).normal(size=retrain.blobs["data"].data.shape)
    retrain.forward()
    retrain.save(str(out / "tested.caffemodel"))
    del retrain
    save_path = str(out / "result" / "resnet50")
    save = timed(lambda: amct_retrain.save_quant_retrain_model(
        str(files["retrain.prototxt"]), str(out / "tested.caffemodel"), "Both", save_path, str(files["record.txt"])))
    return create, save, save_path


def main() -> None:
    caffe.set_mode_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        model, weights, params = float_resnet50(out)
        baseline = timed(lambda: caffe.Net(str(model), caffe.TEST, weights=str(weights)).save(str(out / "copy.caffemodel")))
        create, save, save_path = quantize_resnet50(out, model, weights)
        quantized = len(record.read_record(out / "record.txt"))
    print(f"ResNet-50: {params / 1e6:.1f} M parameters, {quantized} quantized layers")
    print(f"{'step':<32}{'seconds':>9}{'ratio to pycaffe load+save':>29}")
    print(f"{'pycaffe load + save (float)':<32}{baseline:>9.2f}{1.0:>29.2f}")
    print(f"{'create_quant_retrain_model':<32}{create:>9.2f}{create / baseline:>29.2f}")
    print(f"{'save_quant_retrain_model (Both)':<32}{save:>9.2f}{save / baseline:>29.2f}")


if __name__ == "__main__":
    main()
