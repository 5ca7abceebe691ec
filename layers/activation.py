"""ActivationULQ: int8 fake quantization of activations with learnable clips (ULQ)."""
import caffe
import numpy as np

from amct_retrain import numerics
from amct_retrain_layers.params import NUMBER, Key, LayerParamError, parse_param_str

PARAMS = {
    "name": Key((str,), required=True),
    "clip_max": Key(NUMBER + (type(None),)),
    "clip_min": Key(NUMBER + (type(None),)),
    "fixed_min": Key((bool,), default=False),
}
CLIP_MAX, CLIP_MIN, CLIPS_READY = 0, 1, 2


class ActivationULQ(caffe.Layer):
    """Fake-quantizes bottom[0] onto the int8 grid of [clip_min, clip_max] (not in place).

    Blobs (each shape (1,), saved in the caffemodel): 0 ``clip_max``, 1 ``clip_min``
    (both learnable, contract ULQ gradients), 2 ``clips_ready`` (1.0 once the clips hold a
    range; 0.0 asks for IFMR initialisation on the first batch seen, TRAIN or TEST).
    Blob data is read afresh every call: Caffe re-points shared blobs between nets.
    """

    def setup(self, bottom, top):
        p = parse_param_str(self.param_str, PARAMS, "ActivationULQ")
        self.layer_name, self.fixed_min = p["name"], p["fixed_min"]
        if len(bottom) != 1 or len(top) != 1:
            raise LayerParamError(f"ActivationULQ layer '{self.layer_name}': needs 1 bottom and 1 top")
        given = [p["clip_min"] is not None, p["clip_max"] is not None]
        if any(given) and not all(given):
            raise LayerParamError(f"ActivationULQ layer '{self.layer_name}': param_str keys "
                                  "'clip_min' and 'clip_max' must be given together")
        if all(given) and p["clip_min"] >= p["clip_max"]:
            raise LayerParamError(f"ActivationULQ layer '{self.layer_name}': param_str key 'clip_min' "
                                  f"({p['clip_min']}) must be below 'clip_max' ({p['clip_max']})")
        for _ in range(3):
            self.blobs.add_blob(1)
        if all(given):
            self.blobs[CLIP_MAX].data[0] = p["clip_max"]
            self.blobs[CLIP_MIN].data[0] = p["clip_min"]
            self.blobs[CLIPS_READY].data[0] = 1.0
        self.last_valid_clips = None
        self.clips = None

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        x = bottom[0].data
        numerics.check_finite(x, f"ActivationULQ layer '{self.layer_name}' input")
        if self.blobs[CLIPS_READY].data[0] < 0.5:
            clip_min, clip_max = numerics.ifmr_search(x)
            self.blobs[CLIP_MIN].data[0], self.blobs[CLIP_MAX].data[0] = clip_min, clip_max
            self.blobs[CLIPS_READY].data[0] = 1.0
        self.clips = numerics.ulq_sanitize_clips(
            float(self.blobs[CLIP_MIN].data[0]), float(self.blobs[CLIP_MAX].data[0]),
            self.last_valid_clips, self.fixed_min)
        self.last_valid_clips = self.clips
        top[0].data[...] = numerics.ulq_forward(x, *self.clips)

    def backward(self, top, propagate_down, bottom):
        grad_x, grad_min, grad_max = numerics.ulq_backward(bottom[0].data, top[0].diff, *self.clips)
        if propagate_down[0]:
            bottom[0].diff[...] = grad_x
        self.blobs[CLIP_MAX].diff[0] += grad_max
        if not self.fixed_min:
            self.blobs[CLIP_MIN].diff[0] += grad_min
