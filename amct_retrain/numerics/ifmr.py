"""IFMR, the activation range search of calibration and of ULQ's clip initialisation."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import numpy.typing as npt

from amct_retrain.errors import NumericsError
from amct_retrain.numerics.activation import (
    _activation_codes_f32, _widen_range, quant_multiplier, scale_offset_from_range,
)
from amct_retrain.numerics.checks import DEFAULT_BITS, _as_f32, bit_width

logger = logging.getLogger(__name__)

# Memory budget (bytes) for broadcasting IFMR candidates against the data.
_IFMR_CHUNK_BYTES = 1 << 26

# --------------------------------------------------------------------------- IFMR


def _ifmr_candidates(start: float, end: float, step: float) -> np.ndarray:
    """Factors ``start, start+step, ..., <= end`` (float64) without accumulated drift.

    When ``1/step`` and ``start/step`` are integers (the default 0.70..1.30 by 0.01),
    each factor is ``integer / integer`` (0.7 is 70/100, 1.0 is exactly 1.0);
    otherwise ``start + i*step`` with integer i.
    """
    if not (step > 0 and 0 < start <= end and np.isfinite(end)):
        raise NumericsError(f"IFMR search needs 0 < start <= end and step > 0, got "
                            f"start {start!r}, end {end!r}, step {step!r}")
    n = int(np.floor((end - start) / step + 1e-9)) + 1
    i = np.arange(n, dtype=np.float64)
    denom = round(1.0 / step)
    first = round(start * denom) if denom > 0 else 0
    if (denom > 0 and abs(1.0 / step - denom) <= 1e-9 * denom
            and abs(start * denom - first) <= 1e-9 * max(1.0, abs(first))):
        return (first + i) / denom
    return start + i * step


def ifmr_search(x: npt.ArrayLike, min_percentile: float = 1e-6, max_percentile: float = 0.999999,
                search_start: float = 0.70, search_end: float = 1.30,
                search_step: float = 0.01, num_bits: int = DEFAULT_BITS) -> tuple[float, float]:
    """IFMR activation range search (contract section 3), for a ``num_bits`` grid.

    Percentiles follow numpy's ``"lower"`` method for the min and ``"higher"`` for the
    max (index ``floor/ceil((n - 1) * q)`` of the sorted data, found with
    ``np.partition``: no full sort), so the range is never narrower than the linear
    interpolation would give. ``max = max(p_max, 0)``, ``min = min(p_min, 0)``. For
    each factor k of ``search_start, +search_step, ..., search_end`` (61 by default)
    the candidate range ``[min, k*max]`` gives factors via
    ``scale_offset_from_range``; the mean squared error of
    ``fake_quantize_activation(x)`` against x (float64 sums) picks the best; ties go
    to the first (smallest k).

    Args:
        x: a batch of activations, any shape, converted to float32; finite, non-empty.
        min_percentile, max_percentile: quantiles in [0, 1], min < max.
        search_start, search_end, search_step: the factor grid for the max.
        num_bits: the bit width of the grid whose error is measured, 2..8.

    Returns:
        ``(clip_min, clip_max)`` python floats with clip_min <= 0 < clip_max, such that
        ``scale_offset_from_range(clip_min, clip_max)`` gives the chosen factors.
        A degenerate range (e.g. all-zero input) is returned widened as that
        function widens it: all zeros give ``(0.0, DEGENERATE_RANGE_WIDTH)``.

    Raises:
        NonFiniteError: x holds NaN/Inf.
        NumericsError: x is empty or a search parameter is invalid.
    """
    x32, data_min, cand_max, scales, offsets = ifmr_grids(x, min_percentile, max_percentile, search_start,
                                                          search_end, search_step, num_bits)
    return ifmr_choice(data_min, cand_max, ifmr_squared_errors(x32, scales, offsets, num_bits) / x32.size,
                       num_bits)


def ifmr_grids(x: npt.ArrayLike, min_percentile: float, max_percentile: float, search_start: float,
               search_end: float, search_step: float, num_bits: int = DEFAULT_BITS
               ) -> tuple[np.ndarray, float, np.ndarray, np.ndarray, np.ndarray]:
    """IFMR's candidate grids (arguments and checks of :func:`ifmr_search`):
    ``(x32, data_min, cand_max, scales, offsets)`` with x32 the data as flat float32, the candidate
    maxima ``factors * data_max`` (float64), their float32 scales and int64 offsets
    (``scale_offset_from_range(data_min, cand_max[j], num_bits)``)."""
    if not 0.0 <= min_percentile < max_percentile <= 1.0:
        raise NumericsError(f"IFMR needs 0 <= min_percentile < max_percentile <= 1, got "
                            f"{min_percentile!r}, {max_percentile!r}")
    factors = _ifmr_candidates(search_start, search_end, search_step)
    x32 = _as_f32(x, "ifmr_search input").reshape(-1)
    n = x32.size
    if n == 0:
        raise NumericsError("ifmr_search: empty input")
    # Same virtual index as np.quantile(method="lower"/"higher").
    i_lo = int(np.floor((n - 1) * min_percentile))
    i_hi = int(np.ceil((n - 1) * max_percentile))
    part = np.partition(x32, [i_lo, i_hi])
    data_min = min(float(part[i_lo]), 0.0)
    data_max = max(float(part[i_hi]), 0.0)

    cand_max = factors * data_max
    scales = np.empty(factors.size, dtype=np.float32)
    offsets = np.empty(factors.size, dtype=np.int64)
    for j, m in enumerate(cand_max):  # 61 scalar factor computations
        scales[j], offsets[j] = scale_offset_from_range(data_min, float(m), num_bits)
    return x32, data_min, cand_max, scales, offsets


def ifmr_squared_errors(x32: np.ndarray, scales: np.ndarray, offsets: np.ndarray,
                        num_bits: int = DEFAULT_BITS) -> npt.NDArray[np.float64]:
    """Per candidate j, ``sum((fake_quantize_activation(x32, scales[j], offsets[j], num_bits) - x32)^2)``
    over flat float32 ``x32``, the difference and the sum in float64: float64 (len(scales),)."""
    k_lo, k_hi = ifmr_code_bounds(offsets, num_bits)
    n = x32.size
    x64 = x32.astype(np.float64)
    sq = np.empty(scales.size, dtype=np.float64)
    chunk = max(1, _IFMR_CHUNK_BYTES // (16 * n))  # (c, n) float32 grid + float64 error
    for j0 in range(0, scales.size, chunk):
        sl = slice(j0, j0 + chunk)
        y = _activation_codes_f32(x32[None, :], quant_multiplier(scales[sl, None]), k_lo[sl, None],
                                  k_hi[sl, None])
        y *= scales[sl, None]  # identical element-wise ops to fake_quantize_activation
        d = y - x64  # float64
        np.square(d, out=d)
        sq[sl] = d.sum(axis=1)
    return sq


def ifmr_code_bounds(offsets: np.ndarray, num_bits: int = DEFAULT_BITS) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``(code_min - offsets, code_max - offsets)`` of int candidates' offsets: the code ranges
    of their ``num_bits`` grids."""
    bw = bit_width(num_bits)
    return (bw.code_min - offsets).astype(np.float32), (bw.code_max - offsets).astype(np.float32)


def ifmr_choice(data_min: float, cand_max: np.ndarray, mse: np.ndarray,
                num_bits: int = DEFAULT_BITS) -> tuple[float, float]:
    """The range of the candidate with the least ``mse`` (the first on ties: smallest factor),
    widened as :func:`scale_offset_from_range` widens it at ``num_bits``: ``(clip_min, clip_max)``."""
    best = int(np.argmin(mse))  # first minimum: smallest k on ties
    lo, hi, _ = _widen_range(data_min, float(cand_max[best]), bit_width(num_bits).levels)
    logger.debug("IFMR: p_min %r -> candidate %d, range [%r, %r], mse %r", data_min, best, lo, hi, mse[best])
    return float(lo), float(hi)


def activation_factors(batches: Iterable[np.ndarray], ifmr: Mapping[str, float], symmetric: bool,
                       search: Callable[..., tuple[float, float]] = ifmr_search,
                       num_bits: int = DEFAULT_BITS) -> tuple[np.float32, int]:
    """(scale_d, offset_d) of a layer input from the batches calibration observed (any shapes), at
    ``num_bits``: one IFMR search (``search``, by default :func:`ifmr_search`, with the arguments
    ``ifmr``) over all their values; ``symmetric`` widens the range found to [-a, a],
    a = max(-min, max), so that offset_d is 0 at every b (``rint(-L/2) = -2**(b-1)``, half to even)."""
    clip_min, clip_max = search(np.concatenate([np.ravel(b) for b in batches]), **ifmr, num_bits=num_bits)
    if symmetric:
        bound = max(-clip_min, clip_max)
        clip_min, clip_max = -bound, bound
    return scale_offset_from_range(clip_min, clip_max, num_bits)
