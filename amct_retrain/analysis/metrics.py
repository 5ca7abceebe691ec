"""Per-layer measures of what quantization does, accumulated batch by batch (pure numpy).

Every accumulator keeps float64 sums or fixed-size histograms only, so an analysis over many
batches needs the memory of one batch. The quantization grid itself (clip bounds, codes,
output steps) comes from :mod:`amct_retrain.numerics`.
"""
import math
from dataclasses import dataclass, field

import numpy as np

from amct_retrain import numerics

HISTOGRAM_BINS = 100
HISTOGRAM_MARGIN = 0.1  # the histogram spans clips and first batch, widened by this share


def cosine_similarity(sum_ref_test: float, sum_ref_sq: float, sum_test_sq: float) -> float | None:
    """``<ref, test> / (|ref| |test|)`` from the three sums; None when a vector is all zeros."""
    if sum_ref_sq == 0.0 or sum_test_sq == 0.0:
        return None
    return sum_ref_test / (math.sqrt(sum_ref_sq) * math.sqrt(sum_test_sq))


def sqnr_db(sum_ref_sq: float, sum_error_sq: float) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum ref^2 / sum (test - ref)^2)`` in dB:
    ``inf`` for an exact output, ``-inf`` for a zero reference with a non-zero error."""
    if sum_error_sq == 0.0:
        return math.inf
    if sum_ref_sq == 0.0:
        return -math.inf
    return 10.0 * math.log10(sum_ref_sq / sum_error_sq)


@dataclass
class OutputStats:
    """A quantized layer's output in the fake-quant model against the float model's.

    ``steps``: float64 (C,) output step per channel (``deq * 2^N``), channel axis 1.
    """
    steps: np.ndarray
    elements: int = 0
    sum_ref_test: float = 0.0
    sum_ref_sq: float = 0.0
    sum_test_sq: float = 0.0
    sum_error_sq: float = 0.0
    max_diff_steps: float = 0.0

    def add(self, ref: np.ndarray, test: np.ndarray) -> None:
        """Add one batch: ``ref`` the float output, ``test`` the fake-quant output, same shape."""
        r, t = np.asarray(ref, np.float64).ravel(), np.asarray(test, np.float64).ravel()
        e = t - r
        self.elements += r.size
        self.sum_ref_test += float(r @ t)
        self.sum_ref_sq += float(r @ r)
        self.sum_test_sq += float(t @ t)
        self.sum_error_sq += float(e @ e)
        shape = (1, -1) + (1,) * (np.ndim(ref) - 2)
        diff = np.abs(e.reshape(np.shape(ref))) / self.steps.reshape(shape)
        self.max_diff_steps = max(self.max_diff_steps, float(diff.max(initial=0.0)))

    @property
    def cosine(self) -> float | None:
        return cosine_similarity(self.sum_ref_test, self.sum_ref_sq, self.sum_test_sq)

    @property
    def sqnr_db(self) -> float:
        return sqnr_db(self.sum_ref_sq, self.sum_error_sq)


@dataclass
class ActivationStats:
    """A quantized layer's input in the fake-quant model against the grid it is clipped
    to (``numerics.activation_grid_bounds`` of its ``scale_d`` / ``offset_d`` / ``num_bits``)."""
    scale_d: float
    offset_d: int
    num_bits: int = numerics.DEFAULT_BITS
    elements: int = 0
    below: int = 0
    above: int = 0
    min: float = math.inf
    max: float = -math.inf
    edges: np.ndarray | None = None   # float64 (HISTOGRAM_BINS + 1,), fixed by the first batch
    counts: np.ndarray | None = None  # int64 (HISTOGRAM_BINS,); values outside the edges are not in it
    outside_edges: int = 0
    bounds: tuple[float, float] = field(init=False)

    def __post_init__(self) -> None:
        lo, hi = numerics.activation_grid_bounds(self.scale_d, self.offset_d, self.num_bits)
        self.bounds = (float(lo), float(hi))

    def add(self, x: np.ndarray) -> None:
        """Add one batch of the layer's input (any shape, float32)."""
        x = np.asarray(x, np.float32).ravel()
        if x.size == 0:
            return
        lo, hi = np.float32(self.bounds[0]), np.float32(self.bounds[1])
        self.elements += x.size
        self.below += int(np.count_nonzero(x < lo))
        self.above += int(np.count_nonzero(x > hi))
        self.min, self.max = min(self.min, float(x.min())), max(self.max, float(x.max()))
        if self.edges is None:
            start, end = min(self.bounds[0], self.min), max(self.bounds[1], self.max)
            margin = HISTOGRAM_MARGIN * (end - start)
            self.edges = np.linspace(start - margin, end + margin, HISTOGRAM_BINS + 1)
            self.counts = np.zeros(HISTOGRAM_BINS, np.int64)
        counts, _ = np.histogram(x, self.edges)
        self.counts += counts
        self.outside_edges += x.size - int(counts.sum())

    @property
    def clipped_below(self) -> float:
        """Share of the inputs below the grid (clipped to its lowest code)."""
        return self.below / self.elements if self.elements else 0.0

    @property
    def clipped_above(self) -> float:
        """Share of the inputs above the grid (clipped to its highest code)."""
        return self.above / self.elements if self.elements else 0.0


def weight_channel_stats(weights: np.ndarray, scale_w: np.ndarray, channel_axis: int) -> dict[str, list]:
    """Per output channel of fake-quantized ``weights`` (values on the grid ``k * scale_w``):
    the weight range, the int8 codes used and the grid's range ``[-128, 127] * scale_w``.

    ``scale_w``: (C,) or (1,) (per tensor: every channel on one grid); ``channel_axis``: the
    weights' output-channel axis (0, or 1 for Deconvolution).
    """
    w = np.moveaxis(np.asarray(weights, np.float32), channel_axis, 0)
    per_channel = scale_w.size > 1
    codes = numerics.arq_quantize(w, scale_w, 0 if per_channel else None).reshape(w.shape[0], -1)
    flat = w.reshape(w.shape[0], -1)
    scales = np.broadcast_to(np.asarray(scale_w, np.float64), (w.shape[0],))
    return {"scale_w": scales.tolist(), "min": flat.min(axis=1).tolist(), "max": flat.max(axis=1).tolist(),
            "code_min": codes.min(axis=1).tolist(), "code_max": codes.max(axis=1).tolist(),
            "grid_min": (numerics.INT8_MIN * scales).tolist(), "grid_max": (numerics.INT8_MAX * scales).tolist()}
