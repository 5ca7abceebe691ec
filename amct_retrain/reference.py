"""Integer reference executor of deploy models: what the target computes, run on this machine.

Every ``Quant -> Convolution/Deconvolution/InnerProduct/Pooling -> DeQuant`` triple of a deploy
model becomes one ``IntegerLayer`` (layers/integer.py): the Quant layer's scale and offset make int8
codes, int8 x int8 products accumulate with the int32 bias (an AVE Pooling sums the codes of each
window; its 1/n is in deq), the accumulator is shifted by the channel's shift_bit into int16 and
dequantized with the unpacked deq_scale. Everything else runs
in Caffe, in float, as the deploy model says.
"""
import json
import os
import struct
import tempfile
from collections.abc import Iterator

import numpy as np
from google.protobuf import text_format

from amct_retrain import numerics, record
from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.graph import model_io
from amct_retrain.graph import quant_layers as ql
from amct_retrain.graph.netgraph import rebuilt, with_phase_rules_of
from amct_retrain.layer_specs import INTEGER_LAYER
from amct_retrain.layer_types import QUANTIZABLE_RULES
from amct_retrain.saved_models import (activation_bit_widths, integer_params, output_files, quantized_triple,
                                       read_deploy_blobs)


def reference_net(deploy_net: caffe_pb2.NetParameter, weights_file: str,
                  num_bits_d: dict[str, int] | None = None) -> caffe_pb2.NetParameter:
    """Graph pass: each Quant -> layer -> DeQuant triple of ``deploy_net`` becomes one
    IntegerLayer reading its integers from ``weights_file``; other layers stay. ``num_bits_d``:
    quantized layer -> the bit width of its Quant layer's codes (8 where absent)."""
    deploy = read_deploy_blobs(weights_file)
    layers = list(deploy_net.layer)

    def executed() -> Iterator[caffe_pb2.LayerParameter]:
        i = 0
        while i < len(layers):
            quant = layers[i]
            if quant.type != "Quant":
                yield quant
                i += 1
                continue
            _, layer, dequant = quantized_triple(layers, i, weights_file)  # validated now, not inside Caffe
            rule = QUANTIZABLE_RULES[layer.type]
            integer_params(deploy, layer.name, dequant.name, weights_file, rule.has_weights)
            yield from with_phase_rules_of(layer, ql.python_layer(
                f"{layer.name}_integer", INTEGER_LAYER, quant.bottom[0], dequant.top[0], {
                    "layer": layer.name, "layer_type": layer.type, "dequant": dequant.name,
                    "weights_file": os.path.abspath(weights_file),
                    "quant_scale": float(quant.quant_param.scale),
                    "quant_offset": struct.unpack("b", quant.quant_param.offset)[0], "conv": rule.geometry(layer),
                    **ql.bits_params((num_bits_d or {}).get(layer.name))}))
            i += 3
    return rebuilt(deploy_net, executed())


def output_steps(rec: record.SingleLayerRecord) -> np.ndarray:
    """float64 (C,): a quantized layer's output quantization step per channel, deq * 2^N."""
    return numerics.output_steps(numerics.deq_scales(rec.scale_d, np.asarray(rec.scale_w, np.float32)),
                                 rec.shift_bit)


def parity_in_output_steps(fake, reference, quant_info: dict,
                           records: dict[str, record.SingleLayerRecord]) -> dict[str, float]:
    """Per quantized layer: the largest |integer executor - fake-quant model| in output steps,
    each layer fed the same input (what the fake-quant net's last forward gave it).

    ``fake`` is the saved fake-quant model and ``reference`` a ReferenceExecutor's net (pycaffe);
    ``quant_info`` the ``quantized_layers`` of the saver's quant info JSON. Inputs are taken from
    the blob each layer really reads (Caffe renames a shared blob to split outputs).
    """
    worst = {}
    for name, layer in quant_info.items():
        x = fake.blobs[fake.bottom_names[layer["fake_quant"]][0]].data
        fake.forward(start=layer["fake_quant"], end=layer["requantize"])
        integer = f"{name}_integer"
        reference.blobs[reference.bottom_names[integer][0]].data[...] = x
        reference.forward(start=integer, end=integer)
        y_fake, y_ref = fake.blobs[layer["output_blob"]].data, reference.blobs[layer["output_blob"]].data
        step = output_steps(records[name]).reshape((1, -1) + (1,) * (y_fake.ndim - 2))
        worst[name] = float((np.abs(y_ref.astype(np.float64) - y_fake) / step).max())
    return worst


def saved_model_parity(save_path: str, record_file: str) -> dict[str, float]:
    """:func:`parity_in_output_steps` of the models ``save_quant_retrain_model`` (or the
    calibration's ``save_model``) wrote under ``save_path``, on one batch of the fake-quant
    model's own TEST data layers."""
    import caffe

    files = output_files(save_path)
    fake = caffe.Net(files["fake_quant_model"], caffe.TEST, weights=files["fake_quant_weights"])
    fake.forward()
    reference = ReferenceExecutor(files["deploy_model"], files["deploy_weights"], files["quant_info"])
    with open(files["quant_info"], encoding="utf-8") as f:
        info = json.load(f)["quantized_layers"]
    return parity_in_output_steps(fake, reference.net, info, record.read_record(record_file))


class ReferenceExecutor:
    """A deploy model run with integer arithmetic where the target would (TEST phase).

    ``net`` is the pycaffe net: ``net.forward()`` reads the model's data layers, or set
    input blobs and call ``net.forward(start=...)``. The bit widths of the Quant layers' codes come
    from the quant info file (``quant_info_file``, by default the one beside the deploy model:
    :func:`~amct_retrain.saved_models.activation_bit_widths`).
    """

    def __init__(self, deploy_model_file: str, deploy_weights_file: str, quant_info_file: str | None = None) -> None:
        import caffe  # pycaffe only where a net is run

        bits = activation_bit_widths(os.fspath(deploy_model_file), quant_info_file)
        net = reference_net(model_io.read_prototxt(deploy_model_file), deploy_weights_file, bits)
        # Caffe builds it in a child first: a net it cannot build (or integers that do not fit a
        # layer's input) is a ModelError naming the layer, not an abort of this process.
        model_io.probe_net(net, os.fspath(deploy_model_file), phases=("TEST",))
        with tempfile.TemporaryDirectory(prefix="amct_reference_") as tmp:
            path = os.path.join(tmp, "reference.prototxt")
            with open(path, "w", encoding="utf-8") as f:
                f.write(text_format.MessageToString(net))
            self.net = caffe.Net(path, caffe.TEST, weights=os.fspath(deploy_weights_file))

    def forward(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Run the whole net (inputs, if given, are copied into the named input blobs)."""
        for name, value in inputs.items():
            self.net.blobs[name].reshape(*value.shape)
            self.net.blobs[name].data[...] = value
        return {k: v.copy() for k, v in self.net.forward().items()}
