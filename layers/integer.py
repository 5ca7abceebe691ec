"""IntegerLayer: a deploy model's Quant -> quantized layer -> DeQuant, in integers (the layer type's
hooks in :data:`~amct_retrain.layer_types.QUANTIZABLE_RULES`)."""
import functools

import caffe
import numpy as np

from amct_retrain import kernels, numerics
from amct_retrain.layer_specs import INTEGER_LAYER
from amct_retrain.layer_types import QUANTIZABLE_RULES
from amct_retrain.reference import integer_params, read_deploy_blobs


@functools.lru_cache(maxsize=8)
def _deploy_blobs(weights_file: str):
    return read_deploy_blobs(weights_file)


class IntegerLayer(caffe.Layer):
    """Quant (x * quant_scale + offset -> int8), the integer layer (its type's accumulator) with the
    int32 bias, shift-N into int16, DeQuant (t * deq * 2^N): the target's arithmetic."""

    def setup(self, bottom, top):
        p = INTEGER_LAYER.parse(self.param_str)
        self.layer_name, self.geometry = p["layer"], p["conv"]
        rule = QUANTIZABLE_RULES[p["layer_type"]]
        self.accumulate, self.output_hw = rule.integer_accumulate, rule.integer_output_hw
        self.channel_axis = rule.channel_axis  # the output channels' weight axis
        self.quant_scale, self.quant_offset = np.float32(p["quant_scale"]), p["quant_offset"]
        params = integer_params(_deploy_blobs(p["weights_file"]), p["layer"], p["dequant"], p["weights_file"],
                                rule.has_weights)
        # No weights (AVE Pooling): the accumulator is the sum of each window's codes.
        self.weights = params.weights.astype(np.float32) if rule.has_weights else None  # int8: exact
        self.bias, self.deq, self.shift_bit = params.bias.astype(np.float64), params.deq, params.shift_bit

    def reshape(self, bottom, top):
        x = bottom[0].data
        if self.weights is None:
            kernel, stride = self.geometry["kernel"], self.geometry["stride"]
            if x.ndim != 4 or any(size < k or (size - k) % s for size, k, s in zip(x.shape[2:], kernel, stride)):
                # A partial window would need another divisor than the one in deq.
                raise ValueError(f"IntegerLayer '{self.layer_name}': the pooling windows (kernel {kernel}, stride "
                                 f"{stride}) do not tile the input {x.shape}: cannot be quantized")
            if self.deq.size != x.shape[1]:
                raise ValueError(f"IntegerLayer '{self.layer_name}': {self.deq.size} deq_scale values for "
                                 f"{x.shape[1]} channels")
            channels = x.shape[1]
        else:
            channels = self.weights.shape[self.channel_axis]
        top[0].reshape(x.shape[0], channels, *self.output_hw(x.shape[2:], self.geometry))

    def forward(self, bottom, top):
        x = bottom[0].data
        with numerics.errors_named(f"IntegerLayer '{self.layer_name}'"):
            codes = kernels.activation_codes(x, self.quant_scale, self.quant_offset)  # q - offset
            with kernels.numpy_blas_single_threaded():
                acc = self.accumulate(codes, self.weights, self.geometry)
            top[0].data[...] = kernels.requantize_accumulator(acc, self.bias, self.deq, self.shift_bit)

    def backward(self, top, propagate_down, bottom):
        raise NotImplementedError(f"IntegerLayer '{self.layer_name}': the reference executor is for inference")
