"""LayerParameter builders for the fake-quant Python layers that the toolkit inserts.

The layers' module paths, blob order and param_str keys are their specs
(:mod:`amct_retrain.layer_specs`); these builders write layers that follow them.
"""
import json
from collections.abc import Mapping, Sequence

from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.layer_specs import (ACTIVATION_OBSERVER, ACTIVATION_ULQ, FAKE_QUANT_ACTIVATION, LAYERS_MODULE,
                                      REQUANTIZE, SHIFT_N_OBSERVER, SHIFT_N_SEARCH, TEST_OUTPUT_LOG, WEIGHT_ARQ,
                                      LayerSpec, param_name)
from amct_retrain.numerics import DEFAULT_BITS

TEST_OUTPUT_LOG_NAME = "amct_test_output_log"


def bits_params(num_bits_d: int | None = None, num_bits_w: int | None = None) -> dict[str, int]:
    """The param_str keys of the bit widths given that are not 8 (absent means 8, so an 8-bit
    layer's param_str is what it was before there were bit widths)."""
    given = {"num_bits_d": num_bits_d, "num_bits_w": num_bits_w}
    return {key: int(bits) for key, bits in given.items() if bits is not None and bits != DEFAULT_BITS}


def ulq_layer_name(quantized_layer: str) -> str:
    """Name of the ActivationULQ layer that quantizes ``quantized_layer``'s input."""
    return f"{quantized_layer}_ulq"


def arq_layer_name(quantized_layer: str) -> str:
    """Name of the WeightARQ layer that owns ``quantized_layer``'s weights."""
    return f"{quantized_layer}_arq"


def shift_n_layer_name(quantized_layer: str) -> str:
    """Name of the ShiftNSearch layer on ``quantized_layer``'s output."""
    return f"{quantized_layer}_shift_n"


def python_layer(name: str, spec: LayerSpec, bottom: str, top: str,
                 params: dict, log_dir: str | None = None) -> caffe_pb2.LayerParameter:
    """A ``spec`` layer named ``name``; ``params``: its param_str keys but name and log_dir."""
    # log_dir only when given: the param_str of a layer that does not log stays as it was.
    params = {"name": name, **params, **({"log_dir": log_dir} if log_dir else {})}
    unknown = set(params) - set(spec.keys)
    if unknown:
        raise ValueError(f"{spec.layer_class} '{name}': param_str keys {sorted(unknown)} are not in its spec")
    layer = caffe_pb2.LayerParameter(name=name, type="Python", bottom=[bottom], top=[top])
    layer.python_param.module = spec.python_module
    layer.python_param.layer = spec.layer_class
    layer.python_param.param_str = json.dumps(params, sort_keys=True)
    return layer


def _add_params(layer: caffe_pb2.LayerParameter, spec: LayerSpec, owners: Mapping[str, str],
                multipliers: Mapping[str, tuple[float, float]]) -> None:
    """One ``param`` per blob of ``spec`` in blob order: the blobs in ``owners`` (blob -> owning
    layer) exist and are named ``<owner>/<blob>``; ``multipliers``: blob -> (lr_mult, decay_mult),
    unset for the others."""
    for blob in spec.blob_names(owners.keys()):
        param = layer.param.add(name=param_name(owners[blob], blob))
        if blob in multipliers:
            param.lr_mult, param.decay_mult = multipliers[blob]


def ulq_layer(name: str, bottom: str, top: str, clip_min: float | None = None,
              clip_max: float | None = None, fixed_min: bool = False,
              clip_lr_mult: float = 1.0, log_dir: str | None = None,
              batch_num: int = 1, num_bits_d: int = DEFAULT_BITS) -> caffe_pb2.LayerParameter:
    """ActivationULQ from ``bottom`` to a new blob ``top`` (never in place: its backward needs x).

    The clips learn with ``clip_lr_mult`` and no weight decay (decay would shrink the range
    for no reason); the third blob, the clip state (ready flag, last valid pair), never learns.
    With ``log_dir``, the layer logs its clips to TensorBoard there while training.
    ``num_bits_d``: the bit width of its grid.
    """
    layer = python_layer(name, ACTIVATION_ULQ, bottom, top,
                         {"clip_min": clip_min, "clip_max": clip_max, "fixed_min": fixed_min,
                          "batch_num": batch_num, **bits_params(num_bits_d)}, log_dir)
    _add_params(layer, ACTIVATION_ULQ, dict.fromkeys(ACTIVATION_ULQ.blobs, name),
                {"clip_max": (clip_lr_mult, 0.0), "clip_min": (clip_lr_mult, 0.0), "clip_state": (0.0, 0.0)})
    return layer


def arq_layer(name: str, blob: str, weight_shape: Sequence[int], channel_axis: int | None,
              master_lr_mult: float = 1.0, master_decay_mult: float = 1.0,
              log_dir: str | None = None, activation_quantizer: str | None = None,
              conv: dict | None = None, num_bits_w: int = DEFAULT_BITS,
              num_bits_d: int = DEFAULT_BITS) -> caffe_pb2.LayerParameter:
    """WeightARQ in place on ``blob``, the quantized layer's input.

    Blob 0 (fake-quant weights) learns with lr_mult 1 so the quantized layer computes a
    weight gradient, and decay 0; the quantized layer's own weight param must be set with
    :func:`share_fake_quant_weights`. The master weights take the original layer's lr/decay.
    With ``log_dir``, the layer logs its weight scales to TensorBoard there while training.
    With ``activation_quantizer`` (the ActivationULQ feeding a per-channel Convolution) and the
    convolution's geometry ``conv`` (:func:`~amct_retrain.graph.caffe_params.conv_geometry` as a
    dict), blob 2 shares that quantizer's clip state, so that when the output is 1 x 1 (a "global
    conv") the weights train on the unified scale the deploy model uses (contract section 3).
    ``num_bits_w``: the weights' bit width; ``num_bits_d``: that quantizer's (for the unified scale).
    """
    params = {"weight_shape": list(weight_shape), "channel_axis": channel_axis, **bits_params(num_bits_w=num_bits_w)}
    if activation_quantizer is not None:
        params.update(activation_quantizer=activation_quantizer, conv=conv, **bits_params(num_bits_d))
    layer = python_layer(name, WEIGHT_ARQ, blob, blob, params, log_dir)
    owners = dict.fromkeys(("fake_quant_weights", "master_weights", "scale_w"), name)
    if activation_quantizer is not None:
        owners["clip_state"] = activation_quantizer
    _add_params(layer, WEIGHT_ARQ, owners, {"fake_quant_weights": (1.0, 0.0),
                                            "master_weights": (master_lr_mult, master_decay_mult),
                                            "scale_w": (0.0, 0.0)})
    return layer


def share_fake_quant_weights(quantized: caffe_pb2.LayerParameter, arq_name: str) -> None:
    """Make ``quantized``'s weight blob (param 0) the ARQ layer's fake-quant blob, in place."""
    if not quantized.param:
        quantized.param.add()
    spec = quantized.param[0]
    spec.name = param_name(arq_name, "fake_quant_weights")
    spec.lr_mult, spec.decay_mult = 1.0, 0.0


def shift_n_layer(name: str, blob: str, quantized_layer: str, ulq_name: str, arq_name: str | None,
                  weight_shape: Sequence[int] | None, channel_axis: int | None, record_file: str,
                  batch_num: int = 1, log_dir: str | None = None,
                  fused: dict | None = None, scale_w: Sequence[float] | None = None, num_bits_d: int = DEFAULT_BITS,
                  num_bits_w: int = DEFAULT_BITS) -> caffe_pb2.LayerParameter:
    """ShiftNSearch in place on ``blob``, the quantized layer's output; it reads the clip state
    and the WeightARQ's current scale_w through shared params and writes ``quantized_layer``'s record entry
    (with ``log_dir``, also its mean shift_bit to TensorBoard there). ``fused`` ({"kind",
    "removed"}) tells the saver which BatchNorm/Scale layers were folded into the layer.
    A layer without weights (AVE Pooling) gives its fixed ``scale_w`` instead of ``arq_name`` and
    ``weight_shape``: the layer then shares only the clip state. ``num_bits_d`` / ``num_bits_w``: the
    layer's bit widths, which it writes into the record."""
    fixed = scale_w is not None
    if fixed == (arq_name is not None):
        raise ValueError(f"shift_n_layer '{name}': give either arq_name (weights) or scale_w (no weights)")
    params = {"quantized_layer": quantized_layer, "activation_quantizer": ulq_name, "record_file": record_file,
              "batch_num": batch_num, "channel_axis": channel_axis, "fused": fused,
              **bits_params(num_bits_d, None if fixed else num_bits_w)}
    if fixed:
        params["scale_w"] = [float(v) for v in scale_w]
    else:
        params["weight_shape"] = list(weight_shape)
    layer = python_layer(name, SHIFT_N_SEARCH, blob, blob, params, log_dir)
    _add_params(layer, SHIFT_N_SEARCH, {"clip_state": ulq_name, **({} if fixed else {"scale_w": arq_name})}, {})
    return layer


def activation_observer_name(owner: str) -> str:
    """Name of the calibration observer of the input of ``owner`` (and of the layers sharing it)."""
    return f"{owner}_activation_observer"


def shift_n_observer_name(quantized_layer: str) -> str:
    """Name of the calibration observer on ``quantized_layer``'s output."""
    return f"{quantized_layer}_shift_n_observer"


def activation_observer_layer(name: str, blob: str, served: Sequence[str], record_file: str, batch_num: int,
                              ifmr: dict, symmetric: bool, num_bits_d: int = DEFAULT_BITS) -> caffe_pb2.LayerParameter:
    """ActivationObserver in place on ``blob``, the float input of the quantized layers ``served``:
    after ``batch_num`` TEST batches it writes their scale_d / offset_d (IFMR with the
    :func:`~amct_retrain.numerics.ifmr_search` arguments ``ifmr`` on a ``num_bits_d`` grid;
    ``symmetric``: offset_d 0)."""
    return python_layer(name, ACTIVATION_OBSERVER, blob, blob, {
        "layers": list(served), "record_file": record_file, "batch_num": batch_num, "ifmr": ifmr,
        "symmetric": symmetric, **bits_params(num_bits_d)})


def shift_n_observer_layer(name: str, blob: str, quantized_layer: str, record_file: str,
                           batch_num: int) -> caffe_pb2.LayerParameter:
    """ShiftNObserver in place on ``blob``, ``quantized_layer``'s output: after ``batch_num`` TEST
    batches it writes the layer's shift_bit (and a global conv's unified scale_w)."""
    return python_layer(name, SHIFT_N_OBSERVER, blob, blob, {
        "quantized_layer": quantized_layer, "record_file": record_file, "batch_num": batch_num})


def fake_quant_activation_layer(name: str, bottom: str, top: str, scale_d: float, offset_d: int,
                                num_bits_d: int = DEFAULT_BITS) -> caffe_pb2.LayerParameter:
    """The saved fake-quant model's fixed activation quantizer (not in place), on a ``num_bits_d`` grid."""
    return python_layer(name, FAKE_QUANT_ACTIVATION, bottom, top,
                        {"scale_d": float(scale_d), "offset_d": int(offset_d), **bits_params(num_bits_d)})


def requantize_layer(name: str, blob: str, deq: Sequence[float],
                     shift_bit: Sequence[int]) -> caffe_pb2.LayerParameter:
    """The saved fake-quant model's int16 requantisation, in place on the layer's output."""
    return python_layer(name, REQUANTIZE, blob, blob,
                        {"deq": [float(d) for d in deq], "shift_bit": [int(n) for n in shift_bit]})


def test_output_log_layer(name: str, outputs: Mapping[str, float], log_dir: str) -> caffe_pb2.LayerParameter:
    """TestOutputLog in place on the TEST net's ``outputs`` (blob -> loss weight), TEST phase only.

    Its tops keep the loss weights the blobs' producers gave them: Caffe takes a blob's loss
    weight from its last writer, and prints and sums the outputs with it."""
    names = list(outputs)
    layer = python_layer(name, TEST_OUTPUT_LOG, names[0], names[0], {"outputs": names}, log_dir)
    layer.bottom[:] = names
    layer.top[:] = names
    if any(outputs.values()):
        layer.loss_weight.extend(outputs.values())
    layer.include.add(phase=caffe_pb2.TEST)
    return layer


def python_layer_class(layer: caffe_pb2.LayerParameter) -> str | None:
    """The class name of one of the toolkit's Python layers, else None."""
    if layer.type == "Python" and layer.python_param.module.startswith(LAYERS_MODULE + "."):
        return layer.python_param.layer
    return None


def layer_params(layer: caffe_pb2.LayerParameter) -> dict:
    """The JSON param_str of one of the toolkit's Python layers."""
    return json.loads(layer.python_param.param_str)
