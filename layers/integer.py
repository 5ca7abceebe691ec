"""IntegerLayer: a deploy model's Quant -> quantized layer -> DeQuant, in integers (the layer type's
hooks in :data:`~amct_retrain.layer_types.QUANTIZABLE_RULES`)."""
import functools

import caffe
import numpy as np

from amct_retrain import kernels, numerics
from amct_retrain.errors import ModelError
from amct_retrain.layer_specs import INTEGER_LAYER
from amct_retrain.layer_types import QUANTIZABLE_RULES
from amct_retrain.saved_models import integer_params, read_deploy_blobs


@functools.lru_cache(maxsize=8)
def _deploy_blobs(weights_file: str):
    return read_deploy_blobs(weights_file)


class IntegerLayer(caffe.Layer):
    """Quant (x * quant_scale + offset -> int8), the integer layer (its type's accumulator) with the
    int32 bias, shift-N into int16, DeQuant (t * deq * 2^N): the target's arithmetic."""

    def setup(self, bottom, top):
        p = INTEGER_LAYER.parse(self.param_str)
        self.layer_name, self.geometry, self.weights_file = p["layer"], p["conv"], p["weights_file"]
        rule = QUANTIZABLE_RULES[p["layer_type"]]
        self.accumulate, self.output_hw = rule.integer_accumulate, rule.integer_output_hw
        self.channel_axis = rule.channel_axis  # the output channels' weight axis
        self.quant_scale, self.quant_offset = np.float32(p["quant_scale"]), p["quant_offset"]
        self.num_bits = p["num_bits_d"]  # the Quant layer's codes: [-2**(b-1), 2**(b-1) - 1]
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
                raise ModelError(f"{self.weights_file}: IntegerLayer '{self.layer_name}': the pooling windows (kernel "
                                 f"{kernel}, stride {stride}) do not tile the input {x.shape}: cannot be quantized")
            if self.deq.size != x.shape[1]:
                raise ModelError(f"{self.weights_file}: IntegerLayer '{self.layer_name}': {self.deq.size} deq_scale "
                                 f"values for {x.shape[1]} channels")
            channels = x.shape[1]
        else:
            self._check_fits(x.shape)
            channels = self.weights.shape[self.channel_axis]
        top[0].reshape(x.shape[0], channels, *self.output_hw(x.shape[2:], self.geometry))

    def _check_fits(self, x_shape: tuple[int, ...]) -> None:
        """The int8 weights and deq_scale fit the input (the matmul would fail, or broadcast wrongly)."""
        w = self.weights.shape
        # The input channels are on the other of the weights' first two axes: InnerProduct (O, K),
        # Convolution (O, C/group, kh, kw), Deconvolution (C, O, kh, kw) (a quantized one has group 1).
        input_axis = 1 - self.channel_axis
        if self.geometry is None:
            inputs, needed = int(np.prod(x_shape[1:])), w[input_axis] if len(w) == 2 else None
        else:
            groups = self.geometry["group"] if self.channel_axis == 0 else 1
            inputs = x_shape[1] if len(x_shape) == 4 else None
            fits_kernel = len(w) == 4 and tuple(w[2:]) == tuple(self.geometry["kernel"])
            needed = w[input_axis] * groups if fits_kernel else None
        channels = w[self.channel_axis] if len(w) > self.channel_axis else None
        if needed is None or inputs != needed or channels != self.deq.size:
            kernel = f", kernel {tuple(self.geometry['kernel'])}" if self.geometry else ""
            raise ModelError(f"{self.weights_file}: layer '{self.layer_name}': int8 weights of shape {w} do not fit "
                             f"the layer's input of shape {tuple(x_shape)}{kernel} and its {self.deq.size} deq_scale "
                             "values: weights of another model?")

    def forward(self, bottom, top):
        x = bottom[0].data
        with numerics.errors_named(f"IntegerLayer '{self.layer_name}'"):
            codes = kernels.activation_codes(x, self.quant_scale, self.quant_offset, self.num_bits)  # q - offset
            with kernels.numpy_blas_single_threaded():
                acc = self.accumulate(codes, self.weights, self.geometry)
            top[0].data[...] = kernels.requantize_accumulator(acc, self.bias, self.deq, self.shift_bit)

    def backward(self, top, propagate_down, bottom):
        raise NotImplementedError(f"IntegerLayer '{self.layer_name}': the reference executor is for inference")
