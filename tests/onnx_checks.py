"""Checks shared by the ONNX export tests: the exact export against the project's numerics."""
import struct

import numpy as np
import onnx
import onnxruntime as ort
from caffe.proto import caffe_pb2
from google.protobuf import text_format

from amct_retrain.reference import ReferenceExecutor

#: Random activations fed to each quantized layer (the issue asks for at least a million).
ACTIVATIONS_PER_LAYER = 1_000_000


def session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def boundary_activations(rng: np.random.Generator, n: int, quant_scale: float, offset: int) -> np.ndarray:
    """float32 activations for a Quant layer of multiplier ``quant_scale``: a third spread over
    its range and beyond (clipping), a third within 2 ulps of a rounding tie of x * quant_scale
    (where x * m and x / (1/m) round apart), a third within 2 ulps of a grid point."""
    scale = 1 / np.float64(quant_scale)
    lo, hi = (-128 - offset) * scale, (127 - offset) * scale
    third = n // 3
    spread = rng.uniform(lo - 0.2 * (hi - lo), hi + 0.2 * (hi - lo), n - 2 * third)
    codes = rng.integers(-128 - offset, 128 - offset, 2 * third).astype(np.float64)
    codes[:third] += 0.5
    near = (codes / np.float64(quant_scale)).astype(np.float32)
    ulps = rng.integers(-2, 3, near.size)
    near = np.where(ulps > 0, np.nextafter(near, np.float32(np.inf)), np.where(ulps < 0, np.nextafter(
        near, np.float32(-np.inf)), near))
    x = np.concatenate([spread.astype(np.float32), near])
    rng.shuffle(x)
    return x


def _layer_graph(model: onnx.ModelProto, quant: str, dequant: str) -> onnx.ModelProto:
    """The part of an exact export from a quantized layer's input to its DeQuant output."""
    output = next(n.output[0] for n in model.graph.node if f"{dequant}/output_step" in n.input)
    start = next(n for n in model.graph.node if n.name.startswith(f"{quant}/"))
    return onnx.utils.Extractor(model).extract_model([start.input[0]], [output])


def assert_exact_on_random_activations(deploy_model: str, deploy_weights: str, onnx_file, seed: int = 0) -> dict:
    """Every quantized layer of an exact export, fed ACTIVATIONS_PER_LAYER random activations
    near its rounding boundaries, equals the integer executor (numerics) bit for bit.
    Returns {layer: number of activations compared}."""
    net = text_format.Parse(open(deploy_model).read(), caffe_pb2.NetParameter())
    quants = {layer.top[0]: layer for layer in net.layer if layer.type == "Quant"}
    triples = [(quants[layer.bottom[0]], layer, net.layer[i + 1]) for i, layer in enumerate(net.layer)
               if layer.bottom and layer.bottom[0] in quants]
    executor = ReferenceExecutor(deploy_model, deploy_weights).net
    model = onnx.load(str(onnx_file))
    rng = np.random.default_rng(seed)
    compared = {}
    for quant, layer, dequant in triples:
        integer = f"{layer.name}_integer"
        bottom, top = executor.bottom_names[integer][0], executor.top_names[integer][0]
        per_sample = int(np.prod(executor.blobs[bottom].data.shape[1:]))
        batch = -(-ACTIVATIONS_PER_LAYER // per_sample)
        offset = struct.unpack("b", quant.quant_param.offset)[0]
        x = boundary_activations(rng, batch * per_sample, quant.quant_param.scale, offset).reshape(
            (batch,) + executor.blobs[bottom].data.shape[1:])
        executor.blobs[bottom].reshape(*x.shape)
        executor.blobs[bottom].data[...] = x
        executor.forward(start=integer, end=integer)
        expected = executor.blobs[top].data
        part = _layer_graph(model, quant.name, dequant.name)
        got = session(part).run(None, {part.graph.input[0].name: x})[0]
        assert got.shape == expected.shape, f"{layer.name}: onnx {got.shape}, integer executor {expected.shape}"
        differ = got.view(np.int32) != expected.view(np.int32)
        assert not differ.any(), (
            f"{layer.name}: {int(differ.sum())} of {got.size} outputs differ from the integer executor "
            f"(first at {np.argwhere(differ)[0]}: onnx {got[differ][0]!r}, numerics {expected[differ][0]!r})")
        compared[layer.name] = x.size
    return compared


def fed_like_caffe(fake, session: ort.InferenceSession, blob: str, batches: int) -> tuple[np.ndarray, np.ndarray]:
    """(onnx, Caffe) values of ``blob`` over ``batches`` forwards of the Caffe net ``fake``, whose
    DummyData draws a new ``data`` batch every forward, each fed to the ONNX session too."""
    got, expected = [], []
    for _ in range(batches):
        fake.forward()
        got.append(session.run([blob], {"data": fake.blobs["data"].data})[0])
        expected.append(fake.blobs[blob].data.copy())
    return np.concatenate(got), np.concatenate(expected)
