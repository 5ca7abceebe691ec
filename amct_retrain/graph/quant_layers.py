"""LayerParameter builders for the fake-quant Python layers that the toolkit inserts.

One place knows the layers' module paths, blob order, param names and param_str keys,
so the model builder, the saver and the tests cannot disagree about them.
"""
import json
from collections.abc import Sequence

from amct_retrain.caffe_proto import caffe_pb2

LAYERS_MODULE = "amct_retrain_layers"
ULQ_TYPE = ("activation", "ActivationULQ")
ARQ_TYPE = ("weight", "WeightARQ")
SHIFT_N_TYPE = ("shift_n", "ShiftNSearch")


def ulq_layer_name(quantized_layer: str) -> str:
    """Name of the ActivationULQ layer that quantizes ``quantized_layer``'s input."""
    return f"{quantized_layer}_ulq"


def arq_layer_name(quantized_layer: str) -> str:
    """Name of the WeightARQ layer that owns ``quantized_layer``'s weights."""
    return f"{quantized_layer}_arq"


def shift_n_layer_name(quantized_layer: str) -> str:
    """Name of the ShiftNSearch layer on ``quantized_layer``'s output."""
    return f"{quantized_layer}_shift_n"


def clip_param_names(ulq_name: str) -> tuple[str, str, str]:
    """Param names of an ActivationULQ layer's (clip_max, clip_min, clip_state) blobs."""
    return f"{ulq_name}/clip_max", f"{ulq_name}/clip_min", f"{ulq_name}/clip_state"


def weight_param_names(arq_name: str) -> tuple[str, str]:
    """Param names of a WeightARQ layer's (fake-quant weights, master weights) blobs."""
    return f"{arq_name}/fake_quant_weights", f"{arq_name}/master_weights"


def weight_scale_param_name(arq_name: str) -> str:
    """Param name of a WeightARQ layer's last blob: the scale_w of its last forward."""
    return f"{arq_name}/scale_w"


def python_layer(name: str, module_class: tuple[str, str], bottom: str, top: str,
                  params: dict, log_dir: str | None = None) -> caffe_pb2.LayerParameter:
    layer = caffe_pb2.LayerParameter(name=name, type="Python", bottom=[bottom], top=[top])
    layer.python_param.module = f"{LAYERS_MODULE}.{module_class[0]}"
    layer.python_param.layer = module_class[1]
    # log_dir only when given: the param_str of a layer that does not log stays as it was.
    log_key = {"log_dir": log_dir} if log_dir else {}
    layer.python_param.param_str = json.dumps({"name": name, **params, **log_key}, sort_keys=True)
    return layer


def _param(layer: caffe_pb2.LayerParameter, name: str = "", lr_mult: float | None = None,
           decay_mult: float | None = None) -> None:
    spec = layer.param.add()
    if name:
        spec.name = name
    if lr_mult is not None:
        spec.lr_mult = lr_mult
    if decay_mult is not None:
        spec.decay_mult = decay_mult


def ulq_layer(name: str, bottom: str, top: str, clip_min: float | None = None,
              clip_max: float | None = None, fixed_min: bool = False,
              clip_lr_mult: float = 1.0, log_dir: str | None = None) -> caffe_pb2.LayerParameter:
    """ActivationULQ from ``bottom`` to a new blob ``top`` (never in place: its backward needs x).

    The clips learn with ``clip_lr_mult`` and no weight decay (decay would shrink the range
    for no reason); the third blob, the clip state (ready flag, last valid pair), never learns.
    With ``log_dir``, the layer logs its clips to TensorBoard there while training.
    """
    layer = python_layer(name, ULQ_TYPE, bottom, top,
                          {"clip_min": clip_min, "clip_max": clip_max, "fixed_min": fixed_min}, log_dir)
    clip_max_name, clip_min_name, clip_state_name = clip_param_names(name)
    _param(layer, clip_max_name, clip_lr_mult, 0.0)
    _param(layer, clip_min_name, clip_lr_mult, 0.0)
    _param(layer, clip_state_name, 0.0, 0.0)
    return layer


def arq_layer(name: str, blob: str, weight_shape: Sequence[int], channel_axis: int | None,
              master_lr_mult: float = 1.0, master_decay_mult: float = 1.0,
              log_dir: str | None = None, activation_quantizer: str | None = None,
              conv: dict | None = None) -> caffe_pb2.LayerParameter:
    """WeightARQ in place on ``blob``, the quantized layer's input.

    Blob 0 (fake-quant weights) learns with lr_mult 1 so the quantized layer computes a
    weight gradient, and decay 0; the quantized layer's own weight param must be set with
    :func:`share_fake_quant_weights`. The master weights take the original layer's lr/decay.
    With ``log_dir``, the layer logs its weight scales to TensorBoard there while training.
    With ``activation_quantizer`` (the ActivationULQ feeding a per-channel Convolution) and the
    convolution's geometry ``conv`` (:func:`~amct_retrain.graph.caffe_params.conv_geometry` as a
    dict), blob 2 shares that quantizer's clip state, so that when the output is 1 x 1 (a "global
    conv") the weights train on the unified scale the deploy model uses (contract section 3).
    """
    params = {"weight_shape": list(weight_shape), "channel_axis": channel_axis}
    if activation_quantizer is not None:
        params.update(activation_quantizer=activation_quantizer, conv=conv)
    layer = python_layer(name, ARQ_TYPE, blob, blob, params, log_dir)
    fake_quant_name, master_name = weight_param_names(name)
    _param(layer, fake_quant_name, 1.0, 0.0)
    _param(layer, master_name, master_lr_mult, master_decay_mult)
    if activation_quantizer is not None:
        _param(layer, clip_param_names(activation_quantizer)[2])
    _param(layer, weight_scale_param_name(name), 0.0, 0.0)
    return layer


def share_fake_quant_weights(quantized: caffe_pb2.LayerParameter, arq_name: str) -> None:
    """Make ``quantized``'s weight blob (param 0) the ARQ layer's fake-quant blob, in place."""
    if not quantized.param:
        quantized.param.add()
    spec = quantized.param[0]
    spec.name = weight_param_names(arq_name)[0]
    spec.lr_mult, spec.decay_mult = 1.0, 0.0


def shift_n_layer(name: str, blob: str, quantized_layer: str, ulq_name: str, arq_name: str | None,
                  weight_shape: Sequence[int] | None, channel_axis: int | None, record_file: str,
                  batch_num: int = 1, log_dir: str | None = None,
                  fused: dict | None = None, scale_w: Sequence[float] | None = None) -> caffe_pb2.LayerParameter:
    """ShiftNSearch in place on ``blob``, the quantized layer's output; it reads the clip state
    and the WeightARQ's current scale_w through shared params and writes ``quantized_layer``'s record entry
    (with ``log_dir``, also its mean shift_bit to TensorBoard there). ``fused`` ({"kind",
    "removed"}) tells the saver which BatchNorm/Scale layers were folded into the layer.
    A layer without weights (AVE Pooling) gives its fixed ``scale_w`` instead of ``arq_name`` and
    ``weight_shape``: the layer then shares only the clip state."""
    fixed = scale_w is not None
    if fixed == (arq_name is not None):
        raise ValueError(f"shift_n_layer '{name}': give either arq_name (weights) or scale_w (no weights)")
    params = {"quantized_layer": quantized_layer, "activation_quantizer": ulq_name, "record_file": record_file,
              "batch_num": batch_num, "channel_axis": channel_axis, "fused": fused}
    if fixed:
        params["scale_w"] = [float(v) for v in scale_w]
    else:
        params["weight_shape"] = list(weight_shape)
    layer = python_layer(name, SHIFT_N_TYPE, blob, blob, params, log_dir)
    shared = clip_param_names(ulq_name)[2:] + (() if fixed else (weight_scale_param_name(arq_name),))
    for param_name in shared:
        _param(layer, param_name)
    return layer


ACTIVATION_OBSERVER_TYPE = ("calibration", "ActivationObserver")
SHIFT_N_OBSERVER_TYPE = ("calibration", "ShiftNObserver")


def activation_observer_name(owner: str) -> str:
    """Name of the calibration observer of the input of ``owner`` (and of the layers sharing it)."""
    return f"{owner}_activation_observer"


def shift_n_observer_name(quantized_layer: str) -> str:
    """Name of the calibration observer on ``quantized_layer``'s output."""
    return f"{quantized_layer}_shift_n_observer"


def activation_observer_layer(name: str, blob: str, served: Sequence[str], record_file: str, batch_num: int,
                              ifmr: dict, symmetric: bool) -> caffe_pb2.LayerParameter:
    """ActivationObserver in place on ``blob``, the float input of the quantized layers ``served``:
    after ``batch_num`` TEST batches it writes their scale_d / offset_d (IFMR with the
    :func:`~amct_retrain.numerics.ifmr_search` arguments ``ifmr``; ``symmetric``: offset_d 0)."""
    return python_layer(name, ACTIVATION_OBSERVER_TYPE, blob, blob, {
        "layers": list(served), "record_file": record_file, "batch_num": batch_num, "ifmr": ifmr,
        "symmetric": symmetric})


def shift_n_observer_layer(name: str, blob: str, quantized_layer: str, record_file: str,
                           batch_num: int) -> caffe_pb2.LayerParameter:
    """ShiftNObserver in place on ``blob``, ``quantized_layer``'s output: after ``batch_num`` TEST
    batches it writes the layer's shift_bit (and a global conv's unified scale_w)."""
    return python_layer(name, SHIFT_N_OBSERVER_TYPE, blob, blob, {
        "quantized_layer": quantized_layer, "record_file": record_file, "batch_num": batch_num})


FAKE_QUANT_TYPE = ("fixed", "FakeQuantActivation")
REQUANT_TYPE = ("fixed", "Requantize")


def fake_quant_activation_layer(name: str, bottom: str, top: str, scale_d: float,
                                offset_d: int) -> caffe_pb2.LayerParameter:
    """The saved fake-quant model's fixed activation quantizer (not in place)."""
    return python_layer(name, FAKE_QUANT_TYPE, bottom, top,
                         {"scale_d": float(scale_d), "offset_d": int(offset_d)})


def requantize_layer(name: str, blob: str, deq: Sequence[float],
                     shift_bit: Sequence[int]) -> caffe_pb2.LayerParameter:
    """The saved fake-quant model's int16 requantisation, in place on the layer's output."""
    return python_layer(name, REQUANT_TYPE, blob, blob,
                         {"deq": [float(d) for d in deq], "shift_bit": [int(n) for n in shift_bit]})


def python_layer_class(layer: caffe_pb2.LayerParameter) -> str | None:
    """The class name of one of the toolkit's Python layers, else None."""
    if layer.type == "Python" and layer.python_param.module.startswith(LAYERS_MODULE + "."):
        return layer.python_param.layer
    return None


def layer_params(layer: caffe_pb2.LayerParameter) -> dict:
    """The JSON param_str of one of the toolkit's Python layers."""
    return json.loads(layer.python_param.param_str)
