"""The saved models on disk: the file names under a save_path, and a deploy model's integers read back.

What the saver writes (contract section 1) and what the integer executor (layers/integer.py), the
reference executor and the ONNX export read from a deploy model: every layer's raw blobs, and the int8
weights, int32 bias and packed deq_scale of each quantized layer, checked.
"""
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from amct_retrain import numerics
from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.errors import ModelError
from amct_retrain.graph import model_io
from amct_retrain.layer_types import QUANTIZABLE_RULES, quantizable_layers

LOG = logging.getLogger(__name__)

QUANTIZED_TYPES = tuple(QUANTIZABLE_RULES)


def output_files(save_path: str) -> dict[str, str]:
    """The contract's output names for a save_path prefix such as ``./result/model``."""
    return {"fake_quant_model": f"{save_path}_fake_quant_model.prototxt",
            "fake_quant_weights": f"{save_path}_fake_quant_weights.caffemodel",
            "deploy_model": f"{save_path}_deploy_model.prototxt",
            "deploy_weights": f"{save_path}_deploy_weights.caffemodel",
            "quant_info": f"{save_path}_quant.json"}


DEPLOY_MODEL_SUFFIX = "_deploy_model.prototxt"


def activation_bit_widths(deploy_model_file: str, quant_info_file: str | None = None) -> dict[str, int]:
    """Quantized layer -> the bit width of its Quant layer's codes (``num_bits_d``), from the quant
    info file the saver wrote beside the deploy model (``<prefix>_quant.json`` for
    ``<prefix>_deploy_model.prototxt``, or ``quant_info_file``). The deploy format has no field for
    it (a low-bit layer's codes live in the int8 fields); a layer not listed, or no quant info file
    (a deploy model of another tool), is 8-bit.

    Raises:
        ModelError: the quant info file is given but unreadable, or holds a width outside 2..8.
    """
    path = quant_info_file
    if path is None and deploy_model_file.endswith(DEPLOY_MODEL_SUFFIX):
        path = output_files(deploy_model_file[:-len(DEPLOY_MODEL_SUFFIX)])["quant_info"]
        if not os.path.isfile(path):
            LOG.warning("%s: no quant info file %s beside it: every quantized layer is taken as 8-bit",
                        deploy_model_file, path)
            return {}
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            layers = json.load(f)["quantized_layers"]
        widths = {name: layer.get("num_bits_d", numerics.DEFAULT_BITS) for name, layer in layers.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelError(f"{path}: not a quant info file with 'quantized_layers' ({err})") from None
    for name, bits in widths.items():
        if bits not in numerics.BITS_RANGE or isinstance(bits, bool):
            raise ModelError(f"{path}: layer '{name}' field num_bits_d must be a bit width in 2..8, got {bits!r}")
    return widths


@dataclass(frozen=True)
class IntegerParams:
    """The integers of one quantized layer of a deploy model, validated."""
    weights: np.ndarray | None  # int8, the layer's weight shape; None for a layer without weights
    bias: np.ndarray          # int64 (C,), zeros when the layer has no bias
    deq: np.ndarray           # float32 (C,)
    shift_bit: np.ndarray     # int64 (C,), 1..16


def integer_params(deploy: dict[str, list[caffe_pb2.BlobProto]], layer: str, dequant: str,
                   weights_file: str, with_weights: bool = True) -> IntegerParams:
    """Read and check the int8 weights, int32 bias and packed deq_scale of ``layer``; with
    ``with_weights`` false (AVE Pooling), the layer must have no blobs and only deq_scale is read."""
    where = f"{weights_file}: layer '{layer}'"
    blobs = deploy.get(layer)
    weights = None
    if not with_weights:
        if blobs:
            raise ModelError(f"{where}: has {len(blobs)} blob(s), but a quantized layer of its type has no weights")
        blobs = []
    elif not blobs or not blobs[0].int8_data:
        raise ModelError(f"{where}: no int8 weights (blob 0 int8_data)")
    else:
        shape = tuple(blobs[0].shape.dim)
        if len(blobs[0].int8_data) != int(np.prod(shape)):
            raise ModelError(f"{where}: {len(blobs[0].int8_data)} int8 weights for shape {shape}")
        weights = np.frombuffer(blobs[0].int8_data, np.int8).reshape(shape)
    packed = deploy.get(dequant)
    if not packed or not packed[0].uint64_data:
        raise ModelError(f"{weights_file}: DeQuant layer '{dequant}' of '{layer}' has no deq_scale (uint64_data)")
    try:
        deq, shift_bit, _ = numerics.unpack_deq_scale(np.array(packed[0].uint64_data, np.uint64))
    except numerics.NumericsError as err:
        raise ModelError(f"{weights_file}: DeQuant layer '{dequant}': {err}") from None
    channels = deq.size
    if not (np.all(np.isfinite(deq)) and np.all(deq > 0)):
        raise ModelError(f"{weights_file}: DeQuant layer '{dequant}': deq_scale does not unpack to "
                         f"positive finite scales: {deq[~(np.isfinite(deq) & (deq > 0))][:4]}")
    if np.any(shift_bit < 1) or np.any(shift_bit > 16):
        raise ModelError(f"{weights_file}: DeQuant layer '{dequant}': shift_bit outside 1..16: {shift_bit}")
    bias = np.zeros(channels, np.int64)
    if len(blobs) > 1:
        if len(blobs[1].int32_data) != channels:
            raise ModelError(f"{where}: {len(blobs[1].int32_data)} int32 bias values for {channels} channels")
        bias = np.array(blobs[1].int32_data, np.int64)
    return IntegerParams(weights, bias, deq, shift_bit.astype(np.int64))


def check_quantized_layer(layer: caffe_pb2.LayerParameter, source: str) -> None:
    """Refuse a deploy model's quantized layer that breaks a constraint of its type (a grouped
    Deconvolution, a transposed InnerProduct, ...): the integer executor's arithmetic and the ONNX
    export are written for the layers the quantization rules admit, and nothing else.
    ``source`` names the deploy file in the message."""
    _, broken = quantizable_layers(caffe_pb2.NetParameter(layer=[layer]))
    if layer.name in broken:
        raise ModelError(f"{source}: quantized layer '{layer.name}' ({layer.type}) cannot be "
                         f"quantized: {broken[layer.name]}")


def quantized_triple(layers: Sequence[caffe_pb2.LayerParameter], i: int, source: str
                     ) -> tuple[caffe_pb2.LayerParameter, caffe_pb2.LayerParameter, caffe_pb2.LayerParameter]:
    """The deploy model's ``Quant -> quantized layer -> DeQuant`` starting at the Quant layer
    ``layers[i]``, its quantized layer checked (:func:`check_quantized_layer`); a ModelError naming
    ``source`` if the Quant layer is not followed by a quantized layer and a DeQuant layer."""
    triple = list(layers[i:i + 3])
    if len(triple) < 3 or triple[1].type not in QUANTIZED_TYPES or triple[2].type != "DeQuant":
        raise ModelError(f"{source}: Quant layer '{layers[i].name}' is not followed by a quantized "
                         f"{'/'.join(QUANTIZED_TYPES)} layer and a DeQuant layer")
    check_quantized_layer(triple[1], source)
    return triple[0], triple[1], triple[2]


def read_deploy_blobs(weights_file: str) -> dict[str, list[caffe_pb2.BlobProto]]:
    """Every layer's raw blobs of a deploy caffemodel (int8/int32/uint64 fields kept)."""
    try:
        with open(weights_file, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ModelError(f"{weights_file}: cannot read the deploy weights: {err.strerror}") from None
    return {layer.name: list(layer.blobs) for layer in model_io.parse_caffemodel(data, weights_file).layer}
