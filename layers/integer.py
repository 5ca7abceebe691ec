"""IntegerLayer: a deploy model's Quant -> Convolution/Deconvolution/InnerProduct/Pooling -> DeQuant, in integers."""
import functools

import caffe
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from amct_retrain import numerics
from amct_retrain.config import QUANTIZABLE_RULES
from amct_retrain.errors import ModelError
from amct_retrain.graph.caffe_params import conv_output_hw
from amct_retrain.reference import integer_params, read_deploy_blobs
from amct_retrain_layers.params import NUMBER, Key, parse_param_str

PARAMS = {
    "name": Key((str,), required=True),
    "layer": Key((str,), required=True),
    "layer_type": Key((str,), required=True),
    "dequant": Key((str,), required=True),
    "weights_file": Key((str,), required=True),
    "quant_scale": Key(NUMBER, required=True),
    "quant_offset": Key((int,), required=True),
    "conv": Key((dict, type(None))),
}


@functools.lru_cache(maxsize=8)
def _deploy_blobs(weights_file: str):
    return read_deploy_blobs(weights_file)


def _conv_accumulate(x: np.ndarray, w: np.ndarray, g: dict) -> np.ndarray:
    """Integer convolution of x (N, C, H, W) by w (M, C/group, KH, KW), both integer-valued
    float64: im2col + one matmul per group. float64 sums of int8 x int9 products are exact
    far beyond any real layer's size, so BLAS gives the int32 accumulator exactly."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g["kernel"], g["stride"], g["pad"], g["dilation"]
    group = g["group"]
    n, c = x.shape[:2]
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))  # zero in integer terms: x - offset = 0
    windows = sliding_window_view(padded, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]            # (N, C, OH, OW, KH, KW)
    oh, ow = windows.shape[2:4]
    m = w.shape[0]
    out = np.empty((n, m, oh, ow))
    cg, mg = c // group, m // group
    for gi in range(group):
        cols = windows[:, gi * cg:(gi + 1) * cg].transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, -1)
        kernel = w[gi * mg:(gi + 1) * mg].reshape(mg, -1)
        out[:, gi * mg:(gi + 1) * mg] = (cols @ kernel.T).reshape(n, oh, ow, mg).transpose(0, 3, 1, 2)
    return out


def _deconv_accumulate(x: np.ndarray, w: np.ndarray, g: dict) -> np.ndarray:
    """Integer transposed convolution (Caffe's Deconvolution, group 1) of x (N, C, H, W) by
    w (C, M, KH, KW), both integer-valued float64, as Caffe computes it: one matmul gives every
    input pixel's contribution to every kernel tap, col2im adds each tap's contributions into
    the output at stride steps, and the pad is cropped from both borders. Exact as in
    ``_conv_accumulate``: integer float64 sums."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g["kernel"], g["stride"], g["pad"], g["dilation"]
    n, c, h, wd = x.shape
    m = w.shape[1]
    taps = (x.transpose(0, 2, 3, 1).reshape(-1, c) @ w.reshape(c, -1)).reshape(n, h, wd, m, kh, kw)
    taps = taps.transpose(0, 3, 4, 5, 1, 2)                    # (N, M, KH, KW, H, W)
    full = np.zeros((n, m, sh * (h - 1) + dh * (kh - 1) + 1, sw * (wd - 1) + dw * (kw - 1) + 1))
    for i in range(kh):
        for j in range(kw):
            full[:, :, i * dh:i * dh + sh * (h - 1) + 1:sh, j * dw:j * dw + sw * (wd - 1) + 1:sw] += taps[:, :, i, j]
    return full[:, :, ph:full.shape[2] - ph, pw:full.shape[3] - pw]


class IntegerLayer(caffe.Layer):
    """Quant (x * quant_scale + offset -> int8), integer Convolution / Deconvolution /
    InnerProduct with the int32 bias, shift-N into int16, DeQuant (t * deq * 2^N): the target's
    arithmetic."""

    def setup(self, bottom, top):
        p = parse_param_str(self.param_str, PARAMS, "IntegerLayer")
        self.layer_name, self.geometry, self.weights_file = p["layer"], p["conv"], p["weights_file"]
        self.transposed = p["layer_type"] == "Deconvolution"
        rule = QUANTIZABLE_RULES[p["layer_type"]]
        # AVE Pooling: no weights; the accumulator is the sum of each window's codes.
        self.pooling = not rule.has_weights
        self.channel_axis = rule.channel_axis  # the output channels' weight axis
        self.quant_scale, self.quant_offset = np.float32(p["quant_scale"]), p["quant_offset"]
        params = integer_params(_deploy_blobs(p["weights_file"]), p["layer"], p["dequant"], p["weights_file"],
                                rule.has_weights)
        self.weights = None if self.pooling else params.weights.astype(np.float64)
        self.bias, self.deq, self.shift_bit = params.bias.astype(np.float64), params.deq, params.shift_bit

    def reshape(self, bottom, top):
        x = bottom[0].data
        if self.pooling:
            kernel, stride = self.geometry["kernel"], self.geometry["stride"]
            if x.ndim != 4 or any(size < k or (size - k) % s for size, k, s in zip(x.shape[2:], kernel, stride)):
                # A partial window would need another divisor than the one in deq.
                raise ModelError(f"{self.weights_file}: IntegerLayer '{self.layer_name}': the pooling windows (kernel "
                                 f"{kernel}, stride {stride}) do not tile the input {x.shape}: cannot be quantized")
            if self.deq.size != x.shape[1]:
                raise ModelError(f"{self.weights_file}: IntegerLayer '{self.layer_name}': {self.deq.size} deq_scale "
                                 f"values for {x.shape[1]} channels")
            top[0].reshape(*x.shape[:2], *((size - k) // s + 1 for size, k, s in zip(x.shape[2:], kernel, stride)))
            return
        self._check_fits(x.shape)
        channels = self.weights.shape[self.channel_axis]
        if self.geometry is None:
            top[0].reshape(x.shape[0], channels)
        else:
            top[0].reshape(x.shape[0], channels, *conv_output_hw(x.shape[2:], self.geometry, self.transposed))

    def _check_fits(self, x_shape: tuple[int, ...]) -> None:
        """The int8 weights and deq_scale fit the input (the matmul would fail, or broadcast wrongly)."""
        w = self.weights.shape
        if self.geometry is None:
            inputs, needed = int(np.prod(x_shape[1:])), w[1] if len(w) == 2 else None
        else:
            group = self.geometry["group"]
            inputs = x_shape[1] if len(x_shape) == 4 else None
            needed = (w[0] if self.transposed else w[1] * group) if len(w) == 4 else None
            if len(w) == 4 and tuple(w[2:]) != tuple(self.geometry["kernel"]):
                needed = None
        channels = w[self.channel_axis] if len(w) > self.channel_axis else None
        if needed is None or inputs != needed or channels != self.deq.size:
            kernel = f", kernel {tuple(self.geometry['kernel'])}" if self.geometry else ""
            raise ModelError(f"{self.weights_file}: layer '{self.layer_name}': int8 weights of shape {w} do not fit "
                             f"the layer's input of shape {tuple(x_shape)}{kernel} and its {self.deq.size} deq_scale "
                             "values: weights of another model?")

    def forward(self, bottom, top):
        x = bottom[0].data
        with numerics.errors_named(f"IntegerLayer '{self.layer_name}'"):
            q = numerics.quant_layer_forward(x, self.quant_scale, self.quant_offset)
        xi = q.astype(np.float64) - self.quant_offset
        if self.pooling:
            acc = numerics.window_sums(xi, self.geometry["kernel"], self.geometry["stride"])
        elif self.geometry is None:
            acc = xi.reshape(xi.shape[0], -1) @ self.weights.reshape(self.weights.shape[0], -1).T
        elif self.transposed:
            acc = _deconv_accumulate(xi, self.weights, self.geometry)
        else:
            acc = _conv_accumulate(xi, self.weights, self.geometry)
        acc += self.bias.reshape((1, -1) + (1,) * (acc.ndim - 2))
        top[0].data[...] = numerics.requantized_output(acc, self.deq, self.shift_bit)

    def backward(self, top, propagate_down, bottom):
        raise NotImplementedError(f"IntegerLayer '{self.layer_name}': the reference executor is for inference")
