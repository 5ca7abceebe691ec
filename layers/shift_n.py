"""ShiftNSearch: TEST-phase search of the per-channel shift-N of the integer requantisation."""
import logging

import caffe
import numpy as np

from amct_retrain import numerics, record
from amct_retrain_layers.params import Key, LayerParamError, parse_param_str

LOG = logging.getLogger("amct_retrain.layers")
PARAMS = {
    "name": Key((str,), required=True),
    "quantized_layer": Key((str,), required=True),
    "record_file": Key((str,), required=True),
    "batch_num": Key((int,), default=1),
    "weight_shape": Key((list,), required=True),
    "channel_axis": Key((int, type(None))),
    "fixed_min": Key((bool,), default=False),
}
# Shared (by param name) with the ActivationULQ and WeightARQ layers that own them.
CLIP_MAX, CLIP_MIN, MASTER_WEIGHTS = 0, 1, 2
TEST = 1


class ShiftNSearch(caffe.Layer):
    """In place on the quantized layer's output (an observer must be in place, or Caffe's
    automatic split fails when a ReLU later rewrites the blob in place).

    In the TEST phase it sums the shift-N errors of ``batch_num`` batches computed with the
    current factors (scale_d from the clips, scale_w from ARQ of the master weights), then
    writes ``scale_d``, ``offset_d``, ``scale_w``, ``offset_w``, ``shift_bit`` of its layer into
    the record file. Factors that differ from the ones being accumulated (the net trained in
    between) start a new search, so every TEST pass searches once with no knowledge of test_iter.
    """

    def setup(self, bottom, top):
        p = parse_param_str(self.param_str, PARAMS, "ShiftNSearch")
        self.layer_name = p["name"]
        if p["batch_num"] < 1:
            raise LayerParamError(f"ShiftNSearch layer '{self.layer_name}': param_str key 'batch_num' "
                                  f"must be >= 1, got {p['batch_num']}")
        self.quantized_layer, self.record_file = p["quantized_layer"], p["record_file"]
        self.batch_num, self.channel_axis, self.fixed_min = p["batch_num"], p["channel_axis"], p["fixed_min"]
        self.blobs.add_blob(1)
        self.blobs.add_blob(1)
        self.blobs.add_blob(*p["weight_shape"])
        self.last_valid_clips = None
        self.factors_key = None
        self.errors = None
        self.batches = 0

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        if self.phase != TEST:
            return
        y = bottom[0].data
        factors = self._current_factors(y)
        key = (factors[0], factors[1], factors[2].tobytes())
        if key != self.factors_key:
            self.factors_key, self.errors, self.batches = key, None, 0
        if self.batches >= self.batch_num:
            return
        scale_d, offset_d, scale_w = factors
        deq = np.broadcast_to(numerics.deq_scales(scale_d, scale_w), (y.shape[1],))
        errors = numerics.accumulate_shift_errors(y, deq, channel_axis=1)
        self.errors = errors if self.errors is None else self.errors + errors
        self.batches += 1
        if self.batches == self.batch_num:
            shift_bits = numerics.choose_shift_bits(self.errors)
            record.update_layer_record(
                self.record_file, self.quantized_layer, scale_d=scale_d, offset_d=offset_d,
                scale_w=scale_w, offset_w=np.zeros(len(scale_w), np.int32), shift_bit=shift_bits)
            LOG.debug("layer %s: shift_bit %s written to %s", self.quantized_layer,
                     shift_bits.tolist(), self.record_file)

    def backward(self, top, propagate_down, bottom):
        pass  # in place: the top diff already is the bottom diff

    def _current_factors(self, y: np.ndarray) -> tuple[np.float32, int, np.ndarray]:
        """(scale_d, offset_d, scale_w): scale_w has one value per channel, or one per tensor."""
        # The same sanitisation as ActivationULQ, so both see the same pair of clips.
        self.last_valid_clips = numerics.ulq_sanitize_clips(
            float(self.blobs[CLIP_MIN].data[0]), float(self.blobs[CLIP_MAX].data[0]),
            self.last_valid_clips, self.fixed_min)
        scale_d, offset_d = numerics.ulq_deploy_factors(*self.last_valid_clips)
        scale_w = numerics.arq_scale(self.blobs[MASTER_WEIGHTS].data, self.channel_axis)
        if y.ndim == 4 and y.shape[2:] == (1, 1) and len(scale_w) > 1:
            scale_w = numerics.unify_global_conv_scales(scale_d, scale_w)
        return scale_d, offset_d, scale_w
