"""ShiftNSearch: TEST-phase search of the per-channel shift-N of the integer requantisation."""
import logging

import caffe
import numpy as np

from amct_retrain import kernels, numerics, record, tensorboard
from amct_retrain.errors import LayerParamError
from amct_retrain.layer_specs import LAST_MAX, LAST_MIN, SHIFT_N_SEARCH, shares_memory

LOG = logging.getLogger("amct_retrain.layers")  # not __name__ (amct_retrain_layers.*): under the package logger
# Shared (by param name) with the ActivationULQ and WeightARQ layers that own them.
CLIP_STATE, WEIGHT_SCALE = (SHIFT_N_SEARCH.blob(name, {"scale_w"}) for name in ("clip_state", "scale_w"))
TEST = 1


class ShiftNSearch(caffe.Layer):
    """In place on the quantized layer's output (an observer must be in place, or Caffe's
    automatic split fails when a ReLU later rewrites the blob in place).

    In the TEST phase it sums the shift-N errors of ``batch_num`` batches computed with the
    current factors (scale_d from the clips ActivationULQ used, scale_w as WeightARQ computed it from the master weights), then
    writes ``scale_d``, ``offset_d``, ``scale_w``, ``offset_w``, ``shift_bit`` of its layer into
    the record file. Factors that differ from the ones being accumulated (the net trained in
    between) start a new search, so every TEST pass searches once with no knowledge of test_iter.
    With a ``log_dir`` in param_str, each record write also logs the mean shift_bit to
    TensorBoard (step: the index of the TEST forward call that completed the search).
    """

    def setup(self, bottom, top):
        p = SHIFT_N_SEARCH.parse(self.param_str)
        self.layer_name = p["name"]
        if p["batch_num"] < 1:
            raise LayerParamError(f"ShiftNSearch layer '{self.layer_name}': param_str key 'batch_num' "
                                  f"must be >= 1, got {p['batch_num']}")
        self.quantized_layer, self.record_file = p["quantized_layer"], p["record_file"]
        self.batch_num, self.channel_axis = p["batch_num"], p["channel_axis"]
        self.num_bits_d, self.num_bits_w = p["num_bits_d"], p["num_bits_w"]
        # Exactly one of weight_shape (ARQ of the shared master weights) and scale_w (fixed).
        if (p["weight_shape"] is None) == (p["scale_w"] is None):
            raise LayerParamError(f"ShiftNSearch layer '{self.layer_name}': param_str needs exactly one of "
                                  "'weight_shape' and 'scale_w'")
        self.fixed_scale_w = None if p["scale_w"] is None else np.asarray(p["scale_w"], np.float32)
        self.in_place: bool | None = None  # known at the first reshape, once the top has memory
        self.blobs.add_blob(3)
        if self.fixed_scale_w is None:  # WeightARQ's scale_w blob: one per channel, or one
            shape, axis = p["weight_shape"], p["channel_axis"]
            self.blobs.add_blob(shape[axis] if axis is not None else 1)
        self.factors_key = None
        self.errors = None
        self.batches = 0
        self.log = tensorboard.layer_log(p, "ShiftNSearch")
        # The record is written once per TEST forward pass, by the net's last ShiftNSearch.
        self.record_writes = record.deferred_writes(self.record_file)
        self.writer_token = self.record_writes.join()

    def reshape(self, bottom, top):
        # Placed in place, where the top already is the bottom: then nothing to do, every call.
        if not self.in_place:
            top[0].reshape(*bottom[0].data.shape)
            if self.in_place is None:
                self.in_place = shares_memory(bottom[0], top[0])

    def forward(self, bottom, top):
        if self.phase != TEST:
            return
        with self.record_writes.forward_pass(self.writer_token):
            self._search(bottom[0].data)

    def _search(self, y: np.ndarray) -> None:
        if self.log is not None:
            self.log.count()
        factors = self._current_factors(y)
        key = (factors[0], factors[1], factors[2].tobytes())
        if key != self.factors_key:
            self.factors_key, self.errors, self.batches = key, None, 0
        if self.batches >= self.batch_num:
            return
        scale_d, offset_d, scale_w = factors
        deq = np.broadcast_to(numerics.deq_scales(scale_d, scale_w), (y.shape[1],))
        errors = kernels.accumulate_shift_errors(y, deq)
        self.errors = errors if self.errors is None else self.errors + errors
        self.batches += 1
        if self.batches == self.batch_num:
            shift_bits = numerics.choose_shift_bits(self.errors)
            self.record_writes.update(
                self.quantized_layer, scale_d=scale_d, offset_d=offset_d,
                scale_w=scale_w, offset_w=np.zeros(len(scale_w), np.int32), shift_bit=shift_bits,
                num_bits_d=self.num_bits_d, num_bits_w=self.num_bits_w)
            LOG.debug("layer %s: shift_bit %s for %s", self.quantized_layer,
                     shift_bits.tolist(), self.record_file)
            if self.log is not None:
                self.log.write(tensorboard.shift_n_scalars(self.layer_name, shift_bits))

    def backward(self, top, propagate_down, bottom):
        pass  # in place: the top diff already is the bottom diff

    def _current_factors(self, y: np.ndarray) -> tuple[np.float32, int, np.ndarray]:
        """(scale_d, offset_d, scale_w): scale_w has one value per channel, or one per tensor."""
        # The pair ActivationULQ used in this very forward pass (it runs before this layer).
        state = self.blobs[CLIP_STATE].data
        scale_d, offset_d = numerics.ulq_deploy_factors(float(state[LAST_MIN]), float(state[LAST_MAX]),
                                                        self.num_bits_d)
        if self.fixed_scale_w is not None:
            return scale_d, offset_d, self.fixed_scale_w
        scale_w = self.blobs[WEIGHT_SCALE].data.copy()  # what WeightARQ used in this forward pass
        if numerics.is_global_conv(y.shape, len(scale_w)):
            scale_w = numerics.unify_global_conv_scales(scale_d, scale_w)
        return scale_d, offset_d, scale_w
