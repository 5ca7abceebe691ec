"""The fixed fake-quant layers of a saved fake-quant model: factors come from the record."""
import caffe
import numpy as np

from amct_retrain import kernels, numerics
from amct_retrain.errors import LayerParamError
from amct_retrain.layer_specs import FAKE_QUANT_ACTIVATION, REQUANTIZE


class FakeQuantActivation(caffe.Layer):
    """``x -> (clamp(rint(x/scale_d) + offset_d) - offset_d) * scale_d``: what the deploy
    model's Quant layer feeds the integer layer, seen in float. Not in place."""

    def setup(self, bottom, top):
        p = FAKE_QUANT_ACTIVATION.parse(self.param_str)
        self.layer_name, self.scale_d, self.offset_d = p["name"], np.float32(p["scale_d"]), p["offset_d"]

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        x = bottom[0].data
        with numerics.errors_named(f"FakeQuantActivation layer '{self.layer_name}'"):
            kernels.fake_quantize_activation(x, self.scale_d, self.offset_d, out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        raise NotImplementedError(f"layer '{self.layer_name}': a saved fake-quant model is for inference")


class Requantize(caffe.Layer):
    """In place on an integer layer's output: recovers the accumulator ``rint(y / deq[c])``,
    shifts it right by shift_bit[c] into int16 and scales back: ``t * deq[c] * 2^N[c]``,
    the value the deploy model's DeQuant layer produces."""

    def setup(self, bottom, top):
        p = REQUANTIZE.parse(self.param_str)
        self.layer_name = p["name"]
        self.deq = np.asarray(p["deq"], np.float32)
        self.shift_bit = np.asarray(p["shift_bit"], np.int64)
        channels = bottom[0].data.shape[1]
        if self.shift_bit.size != channels or self.deq.size not in (1, channels):
            raise LayerParamError(f"Requantize layer '{self.layer_name}': {channels} channels, but "
                                  f"{self.deq.size} deq and {self.shift_bit.size} shift_bit values")

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        with numerics.errors_named(f"Requantize layer '{self.layer_name}'"):
            kernels.requantize_output(bottom[0].data, self.deq, self.shift_bit, out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        raise NotImplementedError(f"layer '{self.layer_name}': a saved fake-quant model is for inference")
