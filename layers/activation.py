"""ActivationULQ: fake quantization of activations (2 to 8 bits) with learnable clips (ULQ)."""
import caffe
import numpy as np

from amct_retrain import kernels, numerics, tensorboard
from amct_retrain.errors import LayerParamError
from amct_retrain.feeding import is_constant, unfed_error
from amct_retrain.layer_specs import ACTIVATION_ULQ, LAST_MAX, LAST_MIN, READY

CLIP_MAX, CLIP_MIN, CLIP_STATE = (ACTIVATION_ULQ.blob(name) for name in ("clip_max", "clip_min", "clip_state"))
TRAIN, TEST = 0, 1


class ActivationULQ(caffe.Layer):
    """Fake-quantizes bottom[0] onto the ``num_bits_d`` grid of [clip_min, clip_max] (not in place).

    Blobs (saved in the caffemodel): 0 ``clip_max``, 1 ``clip_min`` (shape (1,), learnable,
    contract ULQ gradients), 2 ``clip_state`` (shape (3,), never learnt): [ready, min, max]
    where ready = 0 asks for IFMR initialisation on the first batch seen (TRAIN or TEST), and
    (min, max) is the pair the last forward used, i.e. the last valid pair that an invalid
    solver update falls back to. Kept in a blob, not in Python, so the TEST net (which shares
    the TRAIN net's blobs), ShiftNSearch, snapshots and the saver all see the same pair.
    Blob data is read afresh every call: Caffe re-points shared blobs' memory between nets.
    With a ``log_dir`` in param_str, every ``log_every``-th TRAIN forward call logs the clips,
    scale_d and the share of the input clipped, and a histogram of the input, to TensorBoard
    (step: the call's index).
    """

    def setup(self, bottom, top):
        p = ACTIVATION_ULQ.parse(self.param_str)
        self.layer_name, self.fixed_min, self.num_bits = p["name"], p["fixed_min"], p["num_bits_d"]
        self.where = f"ActivationULQ layer '{self.layer_name}'"  # error prefixes, formatted once
        self.where_backward = f"{self.where} (backward)"
        if len(bottom) != 1 or len(top) != 1:
            raise LayerParamError(f"ActivationULQ layer '{self.layer_name}': needs 1 bottom and 1 top")
        given = [p["clip_min"] is not None, p["clip_max"] is not None]
        if any(given) and not all(given):
            raise LayerParamError(f"ActivationULQ layer '{self.layer_name}': param_str keys "
                                  "'clip_min' and 'clip_max' must be given together")
        if all(given) and p["clip_min"] >= p["clip_max"]:
            raise LayerParamError(f"ActivationULQ layer '{self.layer_name}': param_str key 'clip_min' "
                                  f"({p['clip_min']}) must be below 'clip_max' ({p['clip_max']})")
        self.blobs.add_blob(1)
        self.blobs.add_blob(1)
        self.blobs.add_blob(3)
        # The Blob objects stay for the layer's life (Caffe re-points their memory, not them):
        # held here, so that a call does not look them up again.
        self.clip_max_blob, self.clip_min_blob, self.state_blob = (self.blobs[i] for i in (CLIP_MAX, CLIP_MIN,
                                                                                            CLIP_STATE))
        if all(given):
            self.clip_max_blob.data[0] = p["clip_max"]
            self.clip_min_blob.data[0] = p["clip_min"]
            self.state_blob.data[...] = (1.0, p["clip_min"], p["clip_max"])
        self.ulq = kernels.UlqLayerKernels(self.num_bits, self.fixed_min)
        # A layer's bottom and top Blobs are fixed for the net's life (their memory is not).
        self.bottom_blob, self.top_blob = bottom[0], top[0]
        self.top_shape: tuple[int, ...] | None = None
        self.scratch: np.ndarray | None = None  # the unused input gradient without propagate_down
        self.log = tensorboard.layer_log(p, "ActivationULQ")
        self.batch_num = p["batch_num"]
        self.constant_test_values: list[float] = []  # of the consecutive constant TEST batches so far

    @property
    def clips(self) -> tuple[float, float] | None:
        """The sanitised (clip_min, clip_max) the last forward quantized with (python floats)."""
        return self.ulq.clips

    def reshape(self, bottom, top):
        # Caffe calls this before every forward: only a new input shape has work to do (the top
        # is this layer's own, reshaped by nothing else).
        shape = self.bottom_blob.data.shape
        if shape != self.top_shape:
            self.top_blob.reshape(*shape)
            self.top_shape = shape

    def forward(self, bottom, top):
        x = self.bottom_blob.data
        state = self.state_blob.data
        last = state.tolist()  # [ready, min, max] as python floats, in one call
        ready = last[READY] >= 0.5
        if self.phase == TEST or not ready:  # a ready TRAIN batch: no factor comes from it alone
            self._check_fed(x, ready)
        with numerics.errors_named(self.where):
            clip_min_blob, clip_max_blob = self.clip_min_blob.data, self.clip_max_blob.data
            if not ready:
                clip_min, clip_max = kernels.ifmr_search(x, num_bits=self.num_bits)
                clip_min_blob[0], clip_max_blob[0] = clip_min, clip_max
                state[...] = (1.0, clip_min, clip_max)
                last = state.tolist()  # as the blob holds them (float32)
            clips = self.ulq.forward(x, clip_min_blob.item(0), clip_max_blob.item(0), (last[LAST_MIN], last[LAST_MAX]),
                                     self.top_blob.data)
            state[LAST_MIN:LAST_MAX + 1] = clips
        if self.log is not None and self.phase == TRAIN and self.log.count():
            self.log.write(tensorboard.ulq_scalars(self.layer_name, x, clips, self.num_bits))
            self.log.write_histograms(tensorboard.ulq_histograms(self.layer_name, x))

    def _check_fed(self, x, ready: bool) -> None:
        """Refuse a constant input where factors come from it: the batch IFMR initialises the
        clips on (``ready`` false), and ``batch_num`` consecutive TEST batches (a shift-N search,
        the record)."""
        if not is_constant(x):
            self.constant_test_values = []
            return
        where = self.where
        value = float(x.ravel()[0]) if x.size else 0.0
        if not ready:
            raise unfed_error(where, "the batch its clips are initialised on (IFMR)", [value])
        if self.phase == TEST:
            self.constant_test_values.append(value)
            if len(self.constant_test_values) >= self.batch_num:
                raise unfed_error(where, f"each of the {self.batch_num} TEST batch(es) of a shift-N search",
                                  self.constant_test_values)

    def backward(self, top, propagate_down, bottom):
        x = self.bottom_blob.data
        # The input gradient goes straight into the bottom's diff; without propagate_down into
        # a scratch buffer (the clip gradients need the pass all the same).
        if propagate_down[0]:
            grad_x = self.bottom_blob.diff
        else:
            if self.scratch is None or self.scratch.shape != x.shape:
                self.scratch = np.empty(x.shape, np.float32)
            grad_x = self.scratch
        with numerics.errors_named(self.where_backward):
            grad_min, grad_max = self.ulq.backward(x, self.top_blob.diff, grad_x)
        self.clip_max_blob.diff[0] += grad_max
        if not self.fixed_min:
            self.clip_min_blob.diff[0] += grad_min
