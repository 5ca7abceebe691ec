"""Calibration observers: the TEST passes of post-training calibration measure the factors.

Both layers sit in place on a blob and leave its data as it is (the calibration model computes
the float model). In the TEST phase each keeps a copy of the ``batch_num`` batches it sees, then
computes its factors once and writes them into the record file; later forward passes and the
TRAIN phase pass through untouched.
"""
import logging

import caffe
import numpy as np

from amct_retrain import kernels, numerics, record
from amct_retrain.errors import LayerParamError
from amct_retrain.feeding import check_fed
from amct_retrain.layer_specs import ACTIVATION_OBSERVER, SHIFT_N_OBSERVER

LOG = logging.getLogger("amct_retrain.layers")  # not __name__ (amct_retrain_layers.*): under the package logger
TEST = 1
IFMR_KEYS = ("min_percentile", "max_percentile", "search_start", "search_end", "search_step")


class _Observer(caffe.Layer):
    """In place, data unchanged; keeps copies of the first ``batch_num`` TEST batches and calls
    ``complete(batches)`` with them once all are in."""

    def _configure(self, p: dict, layer_type: str) -> None:
        self.layer_name = p["name"]
        if p["batch_num"] < 1:
            raise LayerParamError(f"{layer_type} layer '{self.layer_name}': param_str key 'batch_num' must be "
                                  f">= 1, got {p['batch_num']}")
        self.batch_num = p["batch_num"]
        self.count, self.kept = 0, []
        # The record is written once per forward pass, by the net's last observer.
        self.record_writes = record.deferred_writes(p["record_file"])
        self.writer_token = self.record_writes.join()

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        if self.phase != TEST:
            return
        with self.record_writes.forward_pass(self.writer_token):
            self._observe(bottom[0].data)

    def _observe(self, x: np.ndarray) -> None:
        if self.count >= self.batch_num:
            return
        numerics.check_finite(x, f"calibration layer '{self.layer_name}' input")
        self.kept.append(x.copy())  # the blob is rewritten by the next forward pass
        self.count += 1
        self.seen(self.count)
        if self.count == self.batch_num:
            self.complete(self.kept)
            self.kept = []

    def backward(self, top, propagate_down, bottom):
        pass  # in place and the identity: the top diff already is the bottom diff

    def seen(self, count: int) -> None:
        """Called after each kept batch with the number kept so far."""

    def complete(self, batches: list[np.ndarray]) -> None:
        raise NotImplementedError


class ActivationObserver(_Observer):
    """IFMR over the ``batch_num`` batches of the quantized layers' common input (one search on
    their concatenation); writes ``scale_d`` and ``offset_d`` of every layer it serves. With
    ``symmetric``, the range found, [min, max], is widened to [-a, a], a = max(-min, max), which
    gives offset_d 0. Records the batches seen per served layer in the record's forward-pass file,
    for the saver's message when calibration ran too few passes."""

    def setup(self, bottom, top):
        p = ACTIVATION_OBSERVER.parse(self.param_str)
        self._configure(p, "ActivationObserver")
        where = f"ActivationObserver layer '{self.layer_name}'"
        if not p["layers"] or not all(isinstance(name, str) for name in p["layers"]):
            raise LayerParamError(f"{where}: param_str key 'layers' must be a non-empty list of layer names")
        for key, value in p["ifmr"].items():
            if key not in IFMR_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
                raise LayerParamError(f"{where}: param_str key 'ifmr' holds {key!r}: {value!r}; "
                                      f"expected numbers for {', '.join(IFMR_KEYS)}")
        self.served, self.record_file = p["layers"], p["record_file"]
        self.ifmr, self.symmetric, self.num_bits = p["ifmr"], p["symmetric"], p["num_bits_d"]

    def seen(self, count: int) -> None:
        record.note_forward_passes(self.record_file, self.served, count)

    def complete(self, batches: list[np.ndarray]) -> None:
        check_fed(batches, f"calibration of layer(s) {', '.join(self.served)} (ActivationObserver "
                           f"'{self.layer_name}')", "calibration")
        scale_d, offset_d = kernels.activation_factors(batches, self.ifmr, self.symmetric, self.num_bits)
        for layer in self.served:
            self.record_writes.update(layer, scale_d=scale_d, offset_d=offset_d, num_bits_d=self.num_bits)
        LOG.debug("%s: scale_d %r offset_d %d written for %s", self.layer_name, float(scale_d), offset_d,
                  ", ".join(self.served))


class ShiftNObserver(_Observer):
    """The per-channel shift-N search of a quantized layer over its ``batch_num`` output batches,
    with ``deq = scale_d * scale_w`` from the record: scale_d written by the layer's
    ActivationObserver in the same forward pass (it runs earlier), scale_w by quantize_model. A
    convolution with a 1 x 1 output and per-channel scales (a "global conv") gets the unified
    scale_w (contract section 3), written back with the shift_bit."""

    def setup(self, bottom, top):
        p = SHIFT_N_OBSERVER.parse(self.param_str)
        self._configure(p, "ShiftNObserver")
        self.quantized_layer, self.record_file = p["quantized_layer"], p["record_file"]

    def complete(self, batches: list[np.ndarray]) -> None:
        rec = self.record_writes.layer(self.quantized_layer)
        if rec is None or not rec.HasField("scale_d") or not rec.scale_w:
            raise record.RecordFileError(
                f"ShiftNObserver layer '{self.layer_name}': {self.record_file} holds no scale_d / scale_w of layer "
                f"'{self.quantized_layer}': its ActivationObserver must run before it in the same TEST pass and "
                "quantize_model must have written its scale_w")
        scale_d, scale_w = np.float32(rec.scale_d), np.asarray(rec.scale_w, np.float32)
        y = batches[0]
        global_conv = numerics.is_global_conv(y.shape, len(scale_w))
        if global_conv:
            scale_w = numerics.unify_global_conv_scales(scale_d, scale_w)
        deq = np.broadcast_to(numerics.deq_scales(scale_d, scale_w), (y.shape[1],))
        errors = sum(kernels.accumulate_shift_errors(batch, deq) for batch in batches)
        shift_bits = numerics.choose_shift_bits(errors)
        self.record_writes.update(self.quantized_layer, shift_bit=shift_bits,
                                   **({"scale_w": scale_w} if global_conv else {}))
        LOG.debug("%s: shift_bit %s written for %s", self.layer_name, shift_bits.tolist(), self.quantized_layer)
