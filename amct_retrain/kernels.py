"""Fused, compiled (numba) versions of the per-element hot paths of :mod:`amct_retrain.numerics`.

numerics stays the specification: every function here has the signature and the result of the
numerics function of the same name, and each layer step the results of the numerics functions it
names (codes, outputs and input gradients bit for bit; float64 sums compensated, so within 1e-12
relative of numerics' pairwise sums; tests/test_kernels.py checks both), but makes one pass over the data instead of numpy's five to twelve. The scalar work
(factors from clips, checks of the factors) is numerics' own, but for one exception: the quant
layers' steps (:class:`UlqLayerKernels`, :class:`ArqLayerKernels`) do a layer's call in one
compiled call, ULQ's clip sanitising and grid included, as compiled twins of numerics' scalar
code tested bit for bit against it. A NaN/Inf in the data is counted in the same pass and then
reported by :func:`numerics.check_finite`, with its message.

Threading: the kernels are single-threaded (no ``parallel=True``), so there is no thread pool
to spin against Caffe's OpenBLAS threads, which keep the cores busy in the layers around them:
numba's default (OpenMP) layer had measured QAT/float 1.17 on the 5-conv net where a
non-spinning one gave 1.05, and one thread already makes a ULQ backward pass over 2 M values
cost a few milliseconds (about 17x less than the numpy specification).

Compiled code is cached (``cache=True``) in ``__pycache__`` beside this file, or, when that is
not writable (an installed package), in numba's per-user cache directory; the first process
compiles (a few seconds), later ones (``caffe train`` included) load it in milliseconds.

Kernels take the bit width ``num_bits`` (2..8, default 8) where numerics does, with its meaning
(:func:`numerics.bit_width`): the grid has ``2**num_bits`` codes and ULQ's ``D(v)`` divides by
``2**num_bits - 1``.
"""
from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Mapping

import numba
import numpy as np
import numpy.typing as npt
from threadpoolctl import ThreadpoolController

from amct_retrain import numerics
from amct_retrain.numerics import DEFAULT_BITS, NumericsError
from amct_retrain.numerics.activation import _ulq_grid_ratio
from amct_retrain.numerics.arq import _weight_scale_b
from amct_retrain.numerics.checks import (_F32_EPS, _F32_MAX, _F32_TINY, _norm_axis, _offset_code, _per_channel,
                                          _positive_scale, _shift_vector)

__all__ = ["UlqLayerKernels", "fake_quantize_activation", "arq_fake_quantize",
           "arq_scale", "ArqLayerKernels", "requantize_output", "activation_codes", "numpy_blas_single_threaded",
           "requantize_accumulator", "accumulate_shift_errors", "ifmr_search", "ifmr_squared_errors",
           "activation_factors"]

logger = logging.getLogger(__name__)

_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}


def _flat_f32(x: npt.ArrayLike) -> np.ndarray:
    """x as a contiguous float32 array (a view when it already is one), kept in x's shape."""
    return np.ascontiguousarray(x, dtype=np.float32)


def _out_f32(out: np.ndarray | None, like: np.ndarray, what: str) -> np.ndarray:
    """``out`` checked as a C-contiguous float32 array of ``like``'s shape (the kernels write
    through a flat view of it), or a new one. A layer passes its top blob (or its bottom's diff),
    so that a large batch is neither allocated, page-faulted in, nor copied once more per call."""
    if out is None:
        return np.empty(like.shape, np.float32)
    flags = getattr(out, "flags", None)  # one flags object (each access makes one)
    if not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == like.shape
            and flags.c_contiguous and flags.writeable):
        raise NumericsError(f"{what}: out must be a writeable C-contiguous float32 array of shape {like.shape}, "
                            f"got {getattr(out, 'dtype', type(out))} {getattr(out, 'shape', '')}")
    return out


def _raise_non_finite(*named: tuple[npt.ArrayLike, str]) -> None:
    """Raise numerics' NonFiniteError for the first (array, what) pair holding NaN/Inf."""
    for x, what in named:
        numerics.check_finite(x, what)
    raise AssertionError(f"{named[0][1]}: a kernel saw NaN/Inf values that numpy does not see")


# --------------------------------------------------------------------------- kernels


@numba.njit(**_JIT)
def _fake_quant_kernel(x, multiplier, scale, k_lo, k_hi, out):
    """out = clip(rint(x * multiplier), k_lo, k_hi) * scale, all float32; returns whether x holds
    NaN/Inf (out is then garbage)."""
    bad = False
    for i in range(x.size):
        v = x[i]
        bad |= (v - v) != (v - v)  # NaN exactly for NaN and Inf; branch-free, so the loop vectorizes
        out[i] = min(max(np.rint(v * multiplier), k_lo), k_hi) * scale
    return bad


# Sums: each block of _BLOCK elements is summed with reassociation allowed (so LLVM vectorizes it
# into lane-wise partial sums, the error of a 256-term pairwise sum at worst), the block sums are
# added with Neumaier's compensation in functions compiled without it. Only "reassoc": no
# reciprocal or contraction flags, so every rounded element-wise step stays as numerics does it.
_BLOCK = 2048
_SUM_JIT = dict(_JIT, fastmath={"reassoc"})


@numba.njit(**_JIT)
def _add_compensated(total, comp, j, value):
    """Neumaier: total[j] + comp[j] becomes the sum with ``value`` to about one rounding."""
    s = total[j]
    t = s + value
    if abs(s) >= abs(value):
        comp[j] += (s - t) + value
    else:
        comp[j] += (value - t) + s
    total[j] = t


@numba.njit(**_SUM_JIT)
def _ulq_backward_block(x, g, scale, lo, hi, grad_x):
    """One block (slices: loops over whole arrays vectorize, index ranges into bigger ones did not)."""
    s_in = s_above = s_below = 0.0
    for i in range(x.size):
        v = x[i]
        gi = g[i]
        above = v > hi
        below = v < lo
        inside = not (above or below)
        gx = gi if inside else np.float32(0.0)
        grad_x[i] = gx
        r = v / scale                              # float32, as in the forward pass
        s_in += np.float64(gx) * np.float64(np.rint(r) - r)  # exact product of two float32
        s_above += np.float64(gi) if above else 0.0
        # + 0 for finite values, NaN for NaN/Inf: the check costs an add, not a branch
        s_below += (np.float64(gi) if below else 0.0) + np.float64((v - v) + (gi - gi))
    return s_in, s_above, s_below


@numba.njit(**_JIT)
def _ulq_backward_kernel(x, g, scale, lo, hi, grad_x):
    """grad_x = g inside [lo, hi], 0 outside; returns (sum of g * (rint(x/s) - x/s) inside, sum of
    g above, sum of g below, whether x or g holds NaN/Inf): three floats, not an array, which
    would cost a small layer more to unpack than its pass."""
    total = np.zeros(3)
    comp = np.zeros(3)
    for start in range(0, x.size, _BLOCK):
        stop = min(start + _BLOCK, x.size)
        s_in, s_above, s_below = _ulq_backward_block(x[start:stop], g[start:stop], scale, lo, hi,
                                                     grad_x[start:stop])
        _add_compensated(total, comp, 0, s_in)
        _add_compensated(total, comp, 1, s_above)
        _add_compensated(total, comp, 2, s_below)
    sums = total + comp
    # A finite float32 sum in float64 cannot overflow: NaN means NaN/Inf seen.
    return sums[0], sums[1], sums[2], sums[2] != sums[2]


@numba.njit(inline="always")
def _float_order_key(u):
    """An int32 that orders as the float32 of bits ``u`` does (NaN aside): its own inverse. Integer
    max/min reductions vectorize, float ones (NaN rules) do not; -0.0 orders below +0.0, which no
    scale sees (a channel whose extremes are zeros gets scale 1)."""
    return u ^ ((u >> 31) & 0x7fffffff)


@numba.njit(**_JIT)
def _arq_scale_kernel(w, eps, code_min, code_max, scale):
    """w (A, C, B) float32, C-contiguous; scale (C,) float32 = numerics.arq_scale's rule on each
    channel's max and min: a = max if |max| >= |min| else min, a/code_max if a > 0 else a/code_min
    (127, -128 at 8 bits), 1 below eps. Returns whether w holds NaN/Inf."""
    bits = w.view(np.int32)
    bad = False
    extremes = np.empty((w.shape[1], 2), np.int32)  # float32 bits of each channel's max, min
    for c in range(w.shape[1]):
        k_max = np.int32(-2147483648)
        k_min = np.int32(2147483647)
        for a in range(w.shape[0]):
            for b in range(w.shape[2]):
                u = bits[a, c, b]
                bad |= (u & 0x7f800000) == 0x7f800000  # exponent all ones: NaN or Inf
                k = _float_order_key(u)
                k_max = max(k_max, k)
                k_min = min(k_min, k)
        extremes[c, 0] = _float_order_key(k_max)
        extremes[c, 1] = _float_order_key(k_min)
    as_float = extremes.view(np.float32)
    for c in range(w.shape[1]):
        mx = as_float[c, 0]
        mn = as_float[c, 1]
        a_ = mx if abs(mx) >= abs(mn) else mn
        s = a_ / code_max if a_ > 0 else a_ / code_min
        scale[c] = s if s >= eps else np.float32(1.0)
    return bad


@numba.njit(**_JIT)
def _arq_kernel(w, scale, code_min, code_max, out):
    """w, out (A, C, B) float32, scale (C,): out = clip(rint(w / scale[c]), code_min, code_max) * scale[c];
    returns whether w holds NaN/Inf."""
    bad = False
    for a in range(w.shape[0]):
        for c in range(w.shape[1]):
            s = scale[c]
            for b in range(w.shape[2]):
                v = w[a, c, b]
                bad |= (v - v) != (v - v)
                out[a, c, b] = min(max(np.rint(v / s), code_min), code_max) * s
    return bad


@numba.njit(inline="always")
def _dequantized_shift(acc, inv, m):
    """float32(t) * m with t = clip_int16(rint(acc * inv)) (float64; -0 becomes 0, as numerics'
    int32 t does)."""
    t = min(max(np.rint(acc * inv), -32768.0), 32767.0) + 0.0
    return np.float32(t) * m


@numba.njit(**_JIT)
def _requantize_kernel(y, deq, inv_shift, mult, out):
    """y, out (N, C, M) float32; per channel c: acc = rint(y / deq[c]) (float64),
    out = _dequantized_shift(acc, inv_shift[c], mult[c]); returns whether y holds NaN/Inf."""
    bad = False
    for n in range(y.shape[0]):
        for c in range(y.shape[1]):
            d, inv, m = np.float64(deq[c]), inv_shift[c], mult[c]
            for j in range(y.shape[2]):
                v = np.float64(y[n, c, j])
                bad |= (v - v) != (v - v)
                out[n, c, j] = _dequantized_shift(np.rint(v / d), inv, m)
    return bad


@numba.njit(**_JIT)
def _requantize_accumulator_kernel(acc, bias, inv_shift, mult, out):
    """acc (N, C, M) integer-valued float32/float64, bias (C,) float64, out (N, C, M) float32:
    out = _dequantized_shift(acc + bias[c], inv_shift[c], mult[c])."""
    for n in range(acc.shape[0]):
        for c in range(acc.shape[1]):
            b, inv, m = bias[c], inv_shift[c], mult[c]
            for j in range(acc.shape[2]):
                out[n, c, j] = _dequantized_shift(np.float64(acc[n, c, j]) + b, inv, m)


@numba.njit(**_SUM_JIT)
def _shift_errors_block(a, step):
    """sum over a of (clip_int16(rint(a / step)) * step - a)^2 (step a power of two)."""
    total = 0.0
    for i in range(a.size):
        t = min(max(np.rint(a[i] / step), -32768.0), 32767.0)
        e = t * step - a[i]
        total += e * e
    return total


@numba.njit(**_JIT)
def _shift_errors_kernel(y, deq, errors):
    """y (N, C, M) float32, deq (C,) float64; errors (16, C) float64 += per shift N the sum over
    n, j of (clip_int16(rint(a / 2^N)) * 2^N - a)^2, a = y / deq[c]; returns whether y holds
    NaN/Inf."""
    n_shift = errors.shape[0]
    total = np.zeros(n_shift)
    comp = np.zeros(n_shift)
    a = np.empty(min(_BLOCK, y.shape[2]))
    bad = False
    for c in range(y.shape[1]):
        d = deq[c]
        total[:] = 0.0
        comp[:] = 0.0
        for n in range(y.shape[0]):
            for start in range(0, y.shape[2], _BLOCK):
                stop = min(start + _BLOCK, y.shape[2])
                block = a[:stop - start]
                for j in range(start, stop):
                    v = np.float64(y[n, c, j])
                    bad |= (v - v) != (v - v)
                    block[j - start] = v / d
                step = 1.0
                for i in range(n_shift):
                    step *= 2.0
                    _add_compensated(total, comp, i, _shift_errors_block(block, step))
        for i in range(n_shift):
            errors[i, c] += total[i] + comp[i]
    return bad


@numba.njit(**_SUM_JIT)
def _ifmr_block(x, multiplier, scale, k_lo, k_hi):
    """sum over x of (clip(rint(x * multiplier), k_lo, k_hi) * scale - x)^2, the difference in
    float64."""
    total = 0.0
    for i in range(x.size):
        v = x[i]
        e = np.float64(min(max(np.rint(v * multiplier), k_lo), k_hi) * scale) - np.float64(v)
        total += e * e
    return total


@numba.njit(**_JIT)
def _ifmr_errors_kernel(x, multipliers, scales, k_lo, k_hi):
    """Per candidate j, the sum over x of (clip(rint(x * multipliers[j]), k_lo[j], k_hi[j]) *
    scales[j] - x)^2: float64 (len(scales),). Block by block, every candidate on a block while
    it is in the cache."""
    total = np.zeros(scales.size)
    comp = np.zeros(scales.size)
    for start in range(0, x.size, _BLOCK):
        block = x[start:start + _BLOCK]
        for j in range(scales.size):
            _add_compensated(total, comp, j, _ifmr_block(block, multipliers[j], scales[j], k_lo[j], k_hi[j]))
    return total + comp


# --------------------------------------------------------------------------- numerics' functions


def fake_quantize_activation(x: npt.ArrayLike, scale_d: npt.ArrayLike, offset_d: npt.ArrayLike,
                             num_bits: int = DEFAULT_BITS, out: np.ndarray | None = None) -> npt.NDArray[np.float32]:
    """:func:`numerics.fake_quantize_activation`, fused: float32 of x's shape (into ``out`` if given)."""
    bw = numerics.bit_width(num_bits)
    s = _positive_scale(scale_d, "scale_d")
    off = _offset_code(offset_d, bw)
    x32 = _flat_f32(x)
    out = _out_f32(out, x32, "fake_quantize_activation")
    bad = _fake_quant_kernel(x32.reshape(-1), numerics.quant_multiplier(s)[()], s, *numerics.code_bounds(bw, off),
                             out.reshape(-1))
    if bad:
        _raise_non_finite((x, "fake_quantize_activation input"))
    return out


def _ulq_grid(clip_min: float, clip_max: float, num_bits: int) -> tuple[np.float32, np.float32, np.float32,
                                                                         np.float32, np.float32, np.float32, float]:
    """``(s, multiplier, k_lo, k_hi, lo, hi, rmin)`` of ULQ's grid for a sanitised clip pair, by
    numerics: where the compiled step hands over (a degenerate range, which numerics widens)."""
    levels = numerics.bit_width(num_bits).levels
    s, o, rmin = _ulq_grid_ratio(clip_min, clip_max, num_bits)
    lo, hi = numerics.ulq_bounds(s, o, num_bits)
    return s, numerics.quant_multiplier(s)[()], np.float32(o), np.float32(o + levels), lo, hi, rmin


def _weights_3d(w32: np.ndarray, channel_axis: int | None, what: str) -> np.ndarray:
    """Weights as a contiguous (A, C, B) view, C the channel axis (1 for per tensor)."""
    if channel_axis is None or w32.ndim == 0:
        return w32.reshape(1, 1, -1)
    ax = _norm_axis(channel_axis, w32.ndim, what)
    return np.ascontiguousarray(w32).reshape(math.prod(w32.shape[:ax]), w32.shape[ax], -1)


def arq_scale(w: npt.ArrayLike, channel_axis: int | None, num_bits: int = DEFAULT_BITS) -> npt.NDArray[np.float32]:
    """:func:`numerics.arq_scale`, fused: float32 (C,) or (1,), bit for bit, in one pass."""
    codes = numerics.weight_code_bounds(num_bits)
    w32 = _flat_f32(w)
    if w32.size == 0:
        raise NumericsError("arq_scale: empty weights")
    w3 = _weights_3d(w32, channel_axis, "arq_scale")
    scale = np.empty(w3.shape[1], np.float32)
    if _arq_scale_kernel(w3, _F32_EPS, *codes, scale):
        _raise_non_finite((w, "arq_scale weights"))
    return scale


def arq_fake_quantize(w: npt.ArrayLike, scale_w: npt.ArrayLike, channel_axis: int | None,
                      num_bits: int = DEFAULT_BITS, out: np.ndarray | None = None) -> npt.NDArray[np.float32]:
    """:func:`numerics.arq_fake_quantize`, fused: float32 of w's shape (into ``out`` if given)."""
    codes = numerics.weight_code_bounds(num_bits)
    w32 = _flat_f32(w)
    s = _weight_scale_b(w32, scale_w, channel_axis).reshape(-1)
    w3 = _weights_3d(w32, channel_axis, "ARQ")
    out = _out_f32(out, w32, "arq_fake_quantize")
    if _arq_kernel(w3, np.ascontiguousarray(s), *codes, out.reshape(w3.shape)):
        _raise_non_finite((w, "arq_fake_quantize weights"))
    return out


# --------------------------------------------------------------------------- one layer's step
# A quant layer's per-call work on a small net is mostly Python around the pass (argument checks,
# the clip pair's scalar factors, one call per kernel), run cold after every C++ layer. These
# compiled steps do a layer's forward or backward in one call; the clip pair's sanitising and grid
# are compiled twins of numerics' (tests/test_kernels.py checks them bit for bit), and what they
# do not handle (no valid pair: an error; a degenerate range: widened) they leave to numerics.

_GRID_SIZE = 7  # (s, multiplier, k_lo, k_hi, lo, hi, rmin) in float64, the float32 values exactly
_PAIR_KEPT, _PAIR_FELL_BACK, _PAIR_TO_NUMERICS = 0, 1, 2


@numba.njit(inline="always")
def _valid_pair(cmin, cmax, fixed_min):
    """numerics' _valid_clip_pair, and a max above 0 with fixed_min (ulq_sanitize_clips' rule)."""
    return (math.isfinite(cmin) and math.isfinite(cmax) and cmin < cmax and cmax >= 0 and cmin <= 0
            and (not fixed_min or cmax > 0))


@numba.njit(**_JIT)
def _ulq_step_grid(clip_min, clip_max, last_min, last_max, fixed_min, levels, code_min, grid):
    """numerics.ulq_sanitize_clips(clip_min, clip_max, (last_min, last_max), fixed_min), then the
    grid of that pair (numerics._ulq_grid_ratio, ulq_bounds, quant_multiplier) into ``grid``.
    Returns (status, clip_min, clip_max): _PAIR_TO_NUMERICS where numerics raises or widens."""
    status = _PAIR_KEPT
    if not _valid_pair(clip_min, clip_max, fixed_min):
        if not _valid_pair(last_min, last_max, fixed_min):
            return _PAIR_TO_NUMERICS, clip_min, clip_max
        status, clip_min, clip_max = _PAIR_FELL_BACK, last_min, last_max
    if fixed_min:
        clip_min = 0.0
    lo = min(clip_min, 0.0)  # numerics._widen_range
    hi = max(clip_max, 0.0)
    s64 = (hi - lo) / levels
    if not s64 <= _F32_MAX:
        return _PAIR_TO_NUMERICS, clip_min, clip_max
    s = np.float32(s64)
    if not s >= _F32_TINY:
        return _PAIR_TO_NUMERICS, clip_min, clip_max
    r = np.float64(levels) * lo / (hi - lo)  # numerics._range_factors
    offset = min(max(-np.rint(r) + code_min, code_min), -code_min - 1)
    o = code_min - offset
    grid[0] = s
    grid[1] = np.float32(1.0 / np.float64(s))
    grid[2] = np.float32(o)
    grid[3] = np.float32(o + levels)
    grid[4] = np.float32(o) * s
    grid[5] = np.float32(o + levels) * s
    grid[6] = r
    return status, clip_min, clip_max


@numba.njit(**_JIT)
def _ulq_step_forward_kernel(x, clip_min, clip_max, last_min, last_max, fixed_min, levels, code_min, grid, out):
    """The clip pair's grid (:func:`_ulq_step_grid`), then ULQ's pass over x into out (skipped
    where numerics must decide). Returns (status, clip_min, clip_max, whether x holds NaN/Inf)."""
    status, clip_min, clip_max = _ulq_step_grid(clip_min, clip_max, last_min, last_max, fixed_min, levels,
                                                code_min, grid)
    bad = False
    if status != _PAIR_TO_NUMERICS:
        bad = _fake_quant_kernel(x, np.float32(grid[1]), np.float32(grid[0]), np.float32(grid[2]),
                                 np.float32(grid[3]), out)
    return status, clip_min, clip_max, bad


@numba.njit(**_JIT)
def _ulq_step_backward_kernel(x, g, grid, grad_x):
    """:func:`_ulq_backward_kernel` on a grid of :func:`_ulq_step_grid`."""
    return _ulq_backward_kernel(x, g, np.float32(grid[0]), np.float32(grid[4]), np.float32(grid[5]), grad_x)


@numba.njit(**_JIT)
def _arq_step_kernel(w, eps, code_min, code_max, scale, out):
    """:func:`_arq_scale_kernel` into scale, then (finite weights only) :func:`_arq_kernel` into out."""
    if _arq_scale_kernel(w, eps, code_min, code_max, scale):
        return True
    return _arq_kernel(w, scale, code_min, code_max, out)


@numba.njit(**_JIT)
def _move_gradient_kernel(src, dst):
    for i in range(src.size):
        dst[i] += src[i]
        src[i] = 0.0


_F32_DTYPE = np.dtype(np.float32)


def _blob_arrays(what: str, size: int, *arrays: np.ndarray) -> None:
    """Refuse what is not a C-contiguous float32 array of ``size`` values, as pycaffe's blob
    arrays are: a step writes through flat views, so a copy would lose its output, and a
    short array would be written past its end."""
    for a in arrays:
        if not (type(a) is np.ndarray and a.dtype is _F32_DTYPE and a.size == size and a.flags.c_contiguous):
            raise NumericsError(f"{what}: needs C-contiguous float32 arrays of {size} values, got "
                                f"{getattr(a, 'dtype', type(a))} {getattr(a, 'shape', '')}")


class UlqLayerKernels:
    """ActivationULQ's forward and backward pass (contract section 3), one compiled call each.

    ``forward`` sanitises the clip pair (:func:`numerics.ulq_sanitize_clips`), computes its grid
    and fake-quantizes; ``backward`` uses the grid of the last forward. Arrays are pycaffe's blob
    arrays (C-contiguous float32, any shape); outputs are bit for bit numerics' ulq_forward and
    ulq_backward's input gradient, clip gradients within 1e-12 relative of numerics' sums.
    """

    __slots__ = ("num_bits", "fixed_min", "_levels", "_code_min", "_grid", "clips")

    def __init__(self, num_bits: int, fixed_min: bool) -> None:
        bw = numerics.bit_width(num_bits)
        self.num_bits, self.fixed_min = bw.bits, bool(fixed_min)
        self._levels, self._code_min = float(bw.levels), float(bw.code_min)
        self._grid = np.zeros(_GRID_SIZE)
        #: The sanitised (clip_min, clip_max) of the last forward: python floats.
        self.clips: tuple[float, float] | None = None

    def forward(self, x: np.ndarray, clip_min: float, clip_max: float, last_valid: tuple[float, float],
                out: np.ndarray) -> tuple[float, float]:
        """``out = numerics.ulq_forward(x, *pair, num_bits)`` (x's shape, float32) for ``pair =
        numerics.ulq_sanitize_clips(clip_min, clip_max, last_valid, fixed_min)``; returns the pair.

        Raises:
            NumericsError: numerics' errors (no valid pair; NaN/Inf in x, with its message); arrays
                that are not C-contiguous float32 of one size.
        """
        _blob_arrays("ulq_forward", x.size, x, out)
        xf, of = x.reshape(-1), out.reshape(-1)
        status, cmin, cmax, bad = _ulq_step_forward_kernel(xf, clip_min, clip_max, last_valid[0], last_valid[1],
                                                           self.fixed_min, self._levels, self._code_min, self._grid, of)
        if status == _PAIR_TO_NUMERICS:  # raises, or widens a degenerate range
            cmin, cmax = numerics.ulq_sanitize_clips(clip_min, clip_max, last_valid, self.fixed_min)
            grid = _ulq_grid(cmin, cmax, self.num_bits)
            self._grid[:] = grid
            bad = _fake_quant_kernel(xf, grid[1], grid[0], grid[2], grid[3], of)
        elif status == _PAIR_FELL_BACK:
            logger.debug("ULQ clips (%r, %r) invalid; using last valid (%r, %r)", clip_min, clip_max, cmin, cmax)
        if bad:
            _raise_non_finite((x, "ulq_forward input"))
        self.clips = (cmin, cmax)
        return cmin, cmax

    def backward(self, x: np.ndarray, grad_y: np.ndarray, grad_x: np.ndarray) -> tuple[float, float]:
        """ULQ's gradients at the last forward's pair: the input gradient into ``grad_x`` (x's
        shape), and ``(grad_clip_min, grad_clip_max)`` returned (python floats).

        Raises:
            NumericsError: NaN/Inf in x or grad_y (numerics' message); no forward yet; arrays that
                are not C-contiguous float32 of one size.
        """
        if self.clips is None:
            raise NumericsError("ulq_backward: no forward pass yet, so no clip pair")
        _blob_arrays("ulq_backward", x.size, x, grad_y, grad_x)
        sum_in, sum_above, sum_below, bad = _ulq_step_backward_kernel(x.reshape(-1), grad_y.reshape(-1), self._grid,
                                                                      grad_x.reshape(-1))
        if bad:
            _raise_non_finite((x, "ulq_backward input"), (grad_y, "ulq_backward gradient"))
        return numerics.ulq_clip_gradients(sum_in, sum_above, sum_below, self._grid.item(6), self.num_bits)


class ArqLayerKernels:
    """WeightARQ's forward (:func:`numerics.arq_scale`, then :func:`numerics.arq_fake_quantize`
    with that scale, in one compiled call) and its straight-through backward, for weights of one
    shape and channel axis. Arrays are pycaffe's blob arrays (C-contiguous float32)."""

    __slots__ = ("_codes", "_shape3", "_size")

    def __init__(self, weight_shape: tuple[int, ...], channel_axis: int | None, num_bits: int) -> None:
        self._codes = numerics.weight_code_bounds(num_bits)
        self._shape3 = _weights_3d(np.empty(weight_shape, np.float32), channel_axis, "ARQ").shape
        self._size = math.prod(weight_shape)

    def forward(self, master: np.ndarray, out: np.ndarray, scale_out: np.ndarray) -> np.ndarray:
        """``scale_out = arq_scale(master)`` (float32 (C,) or (1,)) and ``out =
        arq_fake_quantize(master, scale_out)`` (the weights' shape); returns scale_out.

        Raises:
            NumericsError: NaN/Inf in the master weights (numerics' message), out left as it was;
                arrays of the wrong size or layout.
        """
        _blob_arrays("arq_forward", self._size, master, out)
        _blob_arrays("arq_forward scale", self._shape3[1], scale_out)
        if _arq_step_kernel(master.reshape(self._shape3), _F32_EPS, *self._codes, scale_out, out.reshape(self._shape3)):
            _raise_non_finite((master, "arq_scale weights"))
        return scale_out

    def move_gradient(self, fake_quant_grad: np.ndarray, master_grad: np.ndarray) -> None:
        """ARQ's straight-through backward (contract section 3) in one pass, in place:
        ``master_grad += fake_quant_grad``, then ``fake_quant_grad = 0`` (so that a solver sees no
        gradient on the fake-quantized copy)."""
        _blob_arrays("arq_move_gradient", self._size, fake_quant_grad, master_grad)
        _move_gradient_kernel(fake_quant_grad.reshape(-1), master_grad.reshape(-1))


def _channels_3d(y: np.ndarray, what: str) -> np.ndarray:
    """A Caffe blob (N, C, ...) as a contiguous float32 (N, C, M) view."""
    if y.ndim < 2:
        raise NumericsError(f"{what}: needs (N, C, ...) data, got shape {y.shape}")
    return np.ascontiguousarray(y, dtype=np.float32).reshape(y.shape[0], y.shape[1], -1)


def _shift_factors(deq: npt.ArrayLike, shift_bits: npt.ArrayLike, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(deq float32 (C,), 2^-N float64 (C,), deq * 2^N float32 (C,)), checked as numerics checks them."""
    d = _per_channel(deq, c, "deq")
    n = _shift_vector(shift_bits, c, 0, numerics.SHIFT_BITS.stop - 1)
    mult = np.ldexp(d, n.astype(np.int32)).astype(np.float32)
    if not np.isfinite(mult).all():
        raise NumericsError("requantized_output: deq * 2^N overflows float32")
    return np.ascontiguousarray(d), np.ldexp(1.0, -n), mult


@functools.cache
def _numpy_blas() -> ThreadpoolController:
    return ThreadpoolController().select(prefix="libscipy_openblas")


def numpy_blas_single_threaded():
    """Context manager: numpy's own OpenBLAS (the wheel's scipy-openblas, not Caffe's) on one
    thread inside the block. Inside a Caffe net its threads and Caffe's OpenBLAS threads, each
    pool spinning while the other works, slowed the integer executor's GEMMs tenfold on two cores
    (bench/integer_executor.py)."""
    return _numpy_blas().limit(limits=1)


def activation_codes(x: npt.ArrayLike, quant_scale: npt.ArrayLike, offset_d: npt.ArrayLike,
                     num_bits: int = DEFAULT_BITS) -> npt.NDArray[np.float32]:
    """``numerics.quant_layer_forward(x, quant_scale, offset_d, num_bits) - offset_d`` as float32 of
    x's shape: the codes an integer layer multiplies (a Quant layer's int8 minus its offset), fused."""
    bw = numerics.bit_width(num_bits)
    inv = _positive_scale(quant_scale, "quant_scale")
    off = _offset_code(offset_d, bw)
    x32 = _flat_f32(x)
    out = np.empty_like(x32)
    if _fake_quant_kernel(x32.reshape(-1), inv, np.float32(1), *numerics.code_bounds(bw, off), out.reshape(-1)):
        _raise_non_finite((x, "Quant layer input"))
    return out


def requantize_accumulator(acc: np.ndarray, bias: np.ndarray, deq: npt.ArrayLike,
                           shift_bits: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """``numerics.requantized_output(acc + bias[c], deq, shift_bits)`` fused, channel axis 1: the
    DeQuant output of an integer layer's accumulator (N, C, ...), integer-valued float32 or
    float64 without the int32 ``bias`` (C,); float32 of acc's shape."""
    a = np.ascontiguousarray(acc)
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    a3 = a.reshape(a.shape[0], a.shape[1], -1)
    _, inv_shift, mult = _shift_factors(deq, shift_bits, a3.shape[1])
    out = np.empty(a3.shape, np.float32)
    b = np.broadcast_to(np.asarray(bias, np.float64).reshape(-1), (a3.shape[1],))
    _requantize_accumulator_kernel(a3, np.ascontiguousarray(b), inv_shift, mult, out)
    return out.reshape(a.shape)


def requantize_output(y: npt.ArrayLike, deq: npt.ArrayLike, shift_bits: npt.ArrayLike,
                      out: np.ndarray | None = None) -> npt.NDArray[np.float32]:
    """``numerics.requantized_output(numerics.accumulator_from_output(y, deq), deq, shift_bits)``
    fused, channel axis 1: what a Requantize layer outputs (float32 of y's shape)."""
    ya = np.asarray(y)
    y3 = _channels_3d(ya, "requantize_output")
    d, inv_shift, mult = _shift_factors(deq, shift_bits, y3.shape[1])
    out = _out_f32(out, ya, "requantize_output")
    bad = _requantize_kernel(y3, d, inv_shift, mult, out.reshape(y3.shape))
    if bad:
        _raise_non_finite((ya, "fake-quant layer output"))
    return out


def accumulate_shift_errors(y: npt.ArrayLike, deq: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """:func:`numerics.accumulate_shift_errors` with channel axis 1, fused: float64 (16, C)."""
    ya = np.asarray(y)
    y3 = _channels_3d(ya, "shift-N search input")
    c = y3.shape[1]
    d = _per_channel(deq, c, "deq").astype(np.float64)
    errors = np.zeros((len(numerics.SHIFT_BITS), c))
    if _shift_errors_kernel(y3, d, errors):
        _raise_non_finite((ya, "shift-N search input"))
    return errors


def ifmr_search(x: npt.ArrayLike, min_percentile: float = 1e-6, max_percentile: float = 0.999999,
                search_start: float = 0.70, search_end: float = 1.30,
                search_step: float = 0.01, num_bits: int = DEFAULT_BITS) -> tuple[float, float]:
    """:func:`numerics.ifmr_search` with the candidates' squared errors summed in one pass over
    the data (every candidate per element) instead of one numpy pass per candidate."""
    x32, data_min, cand_max, scales, offsets = numerics.ifmr_grids(x, min_percentile, max_percentile, search_start,
                                                                   search_end, search_step, num_bits)
    return numerics.ifmr_choice(data_min, cand_max, ifmr_squared_errors(x32, scales, offsets, num_bits) / x32.size,
                                num_bits)


def activation_factors(batches: Iterable[np.ndarray], ifmr: Mapping[str, float],
                       symmetric: bool, num_bits: int = DEFAULT_BITS) -> tuple[np.float32, int]:
    """:func:`numerics.activation_factors` with the fused :func:`ifmr_search`."""
    return numerics.activation_factors(batches, ifmr, symmetric, search=ifmr_search, num_bits=num_bits)


def ifmr_squared_errors(x32: np.ndarray, scales: np.ndarray, offsets: np.ndarray,
                        num_bits: int = DEFAULT_BITS) -> npt.NDArray[np.float64]:
    """:func:`numerics.ifmr_squared_errors`, fused: float64 (len(scales),)."""
    k_lo, k_hi = numerics.ifmr_code_bounds(offsets, num_bits)
    return _ifmr_errors_kernel(np.ascontiguousarray(x32.reshape(-1), dtype=np.float32),
                               numerics.quant_multiplier(scales), scales.astype(np.float32), k_lo, k_hi)
