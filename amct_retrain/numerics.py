"""Int8 numerics of amct_retrain: contract section 3, in pure numpy.

This module is the only place in the project that rounds or clamps. Layers, the
saver and the reference executor call it, so every factor and every fake-quantized
value is computed one way and is bit-reproducible.

Conventions used throughout:

* "round" is round-half-to-even (``np.rint``).
* Scale factors are returned as ``np.float32`` (what Caffe blobs and the record
  file hold); offsets and shift bits are integers.
* Element-wise work on activations and weights is done in float32 with those
  float32 factors: inputs of another dtype are converted to float32 first (Caffe
  computes in float32). Error sums and the bias / shift-N arithmetic, which the
  contract states on exact values, are done in float64.
* An activation grid is ``k * scale`` for integer ``k`` in
  ``[-128 - offset_d, 127 - offset_d]``; all activation paths (quantize,
  fake-quantize, ULQ, IFMR) compute ``k = clip(rint(x / scale), k_lo, k_hi)`` in
  float32 and ``k * scale`` in float32, so they agree bit for bit.
* Length-1 per-channel vectors (per-tensor ``scale_w``, hence ``deq``) broadcast
  to the number of channels wherever a per-channel vector is accepted.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from amct_retrain.errors import NumericsError  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

__all__ = [
    "INT8_MIN", "INT8_MAX", "INT16_MIN", "INT16_MAX", "INT32_MIN", "INT32_MAX",
    "SHIFT_BITS", "DEGENERATE_RANGE_WIDTH",
    "NumericsError", "NonFiniteError", "BiasOverflowError",
    "check_finite", "errors_named", "average_pool_scale", "window_sums", "exact_integer_matmul",
    "conv_accumulate", "deconv_accumulate", "conv_output_hw",
    "scale_offset_from_range", "quantize_activation", "dequantize_activation",
    "fake_quantize_activation", "activation_grid_bounds", "output_steps",
    "ulq_sanitize_clips", "ulq_scale_offset", "ulq_to_deploy_offset", "ulq_deploy_factors",
    "ulq_forward", "ulq_backward", "fraction_clipped",
    "ifmr_search", "ifmr_grids", "ifmr_squared_errors", "ifmr_choice", "activation_factors",
    "arq_scale", "arq_quantize", "arq_fake_quantize",
    "quantize_bias", "deq_scales",
    "accumulate_shift_errors", "choose_shift_bits", "search_shift_bits",
    "requantize", "requantized_output", "is_global_conv", "unify_global_conv_scales",
    "pack_deq_scale", "unpack_deq_scale",
]

INT8_MIN, INT8_MAX = -128, 127
INT16_MIN, INT16_MAX = -32768, 32767
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
SHIFT_BITS = range(1, 17)

#: Width given to an activation range whose scale would not be a positive normal
#: float32 (a layer that saw only zeros). A unit width rather than the smallest
#: normal one keeps ``1/scale_d`` (the Quant layer's parameter) and
#: ``bias / (scale_d * scale_w)`` (the int32 bias) far from overflow for such a layer.
DEGENERATE_RANGE_WIDTH = 1.0

_F32_TINY = float(np.finfo(np.float32).tiny)  # smallest positive normal float32
_F32_MAX = float(np.finfo(np.float32).max)
_F32_EPS = np.float32(np.finfo(np.float32).eps)
# Memory budget (bytes) for broadcasting IFMR candidates against the data.
_IFMR_CHUNK_BYTES = 1 << 26


class NonFiniteError(NumericsError):
    """An array that must be finite holds NaN or Inf values."""


class BiasOverflowError(NumericsError):
    """A quantized bias does not fit int32; the layer must be skipped."""


# --------------------------------------------------------------------------- helpers


def check_finite(x: npt.ArrayLike, what: str) -> None:
    """Raise NonFiniteError if ``x`` holds NaN or Inf.

    Args:
        x: any array-like; integer and boolean arrays are finite by construction.
        what: names the data in the message, e.g. ``"layer 'conv1' input"``.

    Raises:
        NonFiniteError: the message names ``what`` and counts the NaN and Inf values.
    """
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.inexact):
        return
    if np.isfinite(a).all():
        return
    n_nan = int(np.count_nonzero(np.isnan(a)))
    n_inf = int(np.count_nonzero(np.isinf(a)))
    raise NonFiniteError(
        f"{what}: {n_nan + n_inf} of {a.size} values are NaN/Inf "
        f"({n_nan} NaN, {n_inf} Inf); the numbers diverged or the data is corrupt")


@contextlib.contextmanager
def errors_named(who: str) -> Iterator[None]:
    """Prefix ``who`` (e.g. "ActivationULQ layer 'conv1_ulq'") to any NumericsError raised in
    the block, so a caller names itself without checking its arrays a second time."""
    try:
        yield
    except NumericsError as err:
        raise type(err)(f"{who}: {err}") from None


def _scalar(v: npt.ArrayLike, what: str, finite: bool = True) -> float:
    """A python float from a number or a size-1 array (Caffe blobs are (1,)); finite if asked."""
    a = np.asarray(v, dtype=np.float64)
    if a.size != 1:
        raise NumericsError(f"{what}: expected one number, got shape {a.shape}")
    f = float(a.reshape(()))
    if finite and not np.isfinite(f):
        raise NonFiniteError(f"{what}: value is NaN/Inf ({f})")
    return f


def _positive_scale(v: npt.ArrayLike, what: str) -> np.float32:
    """A scale as np.float32, checked positive and finite after the float32 rounding."""
    f = _scalar(v, what)
    s = np.float32(f) if abs(f) <= _F32_MAX else np.float32(np.inf)  # no overflow warning
    if not (np.isfinite(s) and s > 0):
        raise NumericsError(f"{what}: a scale must be a positive finite float32, got {s!r}")
    return s


def _offset_int8(v: npt.ArrayLike, what: str = "offset_d") -> int:
    f = _scalar(v, what)
    if f != round(f) or not INT8_MIN <= f <= INT8_MAX:
        raise NumericsError(f"{what}: must be an integer in [{INT8_MIN}, {INT8_MAX}], got {f!r}")
    return int(f)


def _as_f32(x: npt.ArrayLike, what: str) -> np.ndarray:
    """Check finiteness on the caller's data, then view/convert it as float32."""
    check_finite(x, what)
    return np.asarray(x, dtype=np.float32)


def _norm_axis(axis: int, ndim: int, what: str) -> int:
    if not -ndim <= axis < ndim:
        raise NumericsError(f"{what}: channel_axis {axis} out of range for a {ndim}-D array")
    return axis % ndim


def _per_channel(v: npt.ArrayLike, n: int, what: str) -> np.ndarray:
    """A float32 vector of length ``n`` from length ``n`` or 1 (broadcast), positive finite."""
    a = np.asarray(v, dtype=np.float32).reshape(-1)
    if a.size not in (1, n):
        raise NumericsError(f"{what}: expected 1 or {n} values, got {a.size}")
    bad = ~(np.isfinite(a) & (a > 0))
    if bad.any():
        c = int(np.argmax(bad))
        raise NumericsError(f"{what}: must be positive finite float32 values; entry {c} is {a[c]!r}")
    return np.broadcast_to(a, (n,))


def _int_vector(values: npt.ArrayLike, n: int, lo: int, hi: int, what: str) -> np.ndarray:
    """An int64 vector of length ``n`` (length 1 broadcasts) of integers in [lo, hi]."""
    a = np.asarray(values).reshape(-1)
    if a.size not in (1, n):
        raise NumericsError(f"{what}: expected 1 or {n} values, got {a.size}")
    if not (np.issubdtype(a.dtype, np.integer) or np.all(a == np.round(a))):
        raise NumericsError(f"{what}: must be integers, got {a!r}")
    a = a.astype(np.int64)
    if a.size and (a.min() < lo or a.max() > hi):
        raise NumericsError(f"{what}: must lie in [{lo}, {hi}], got {a.min()}..{a.max()}")
    return np.broadcast_to(a, (n,))


def _shift_vector(shift_bits: npt.ArrayLike, n: int, lo: int, hi: int) -> np.ndarray:
    """Shift bits as an int64 vector of length ``n`` (length 1 broadcasts) in [lo, hi]."""
    return _int_vector(shift_bits, n, lo, hi, "shift_bits")


def _channel_shape(ndim: int, axis: int, n: int) -> tuple[int, ...]:
    """Shape that broadcasts a length-``n`` vector along ``axis`` of an ``ndim``-D array."""
    shape = [1] * ndim
    shape[axis] = n
    return tuple(shape)


def _grid_f32(x32: np.ndarray, scale: npt.ArrayLike, k_lo: npt.ArrayLike,
              k_hi: npt.ArrayLike) -> np.ndarray:
    """``clip(rint(x / scale), k_lo, k_hi)`` in float32 (integer-valued); shapes broadcast.

    Every weight path goes through this one function (activations through
    ``_activation_codes_f32``), which is why they agree bit for bit.
    """
    shape = np.broadcast_shapes(np.shape(x32), np.shape(scale), np.shape(k_lo), np.shape(k_hi))
    k = np.empty(shape, dtype=np.float32)
    np.divide(x32, scale, out=k)
    np.rint(k, out=k)
    np.clip(k, k_lo, k_hi, out=k)
    return k


# --------------------------------------------------------------------------- activations


def quant_multiplier(scale_d: npt.ArrayLike) -> np.ndarray:
    """``float32(1 / scale_d)``: the scale a deploy ``Quant`` layer stores and the target
    multiplies by. Every activation quantization here multiplies by it too (instead of
    dividing by scale_d), so the fake-quant model and the integer model make the same codes
    even for values an ulp from a rounding boundary.

    Args:
        scale_d: positive scale(s), any shape.

    Returns:
        float32 array (0-d for a scalar).
    """
    return np.asarray(1.0 / np.asarray(scale_d, dtype=np.float32).astype(np.float64), dtype=np.float32)


def _activation_codes_f32(x32: np.ndarray, multiplier: npt.ArrayLike, k_lo: npt.ArrayLike,
                          k_hi: npt.ArrayLike) -> np.ndarray:
    """``clip(rint(x * multiplier), k_lo, k_hi)`` in float32 (integer-valued); the multiplier
    is ``quant_multiplier(scale_d)``, the deploy Quant layer's scale."""
    k = np.asarray(np.multiply(x32, multiplier, dtype=np.float32))
    np.rint(k, out=k)
    np.clip(k, k_lo, k_hi, out=k)
    return k


def _widen_range(data_min: float, data_max: float) -> tuple[float, float, np.float32]:
    """Widen [min, max] to contain 0 and to a positive normal float32 scale.

    Returns ``(lo, hi, scale)`` with ``scale = float32((hi - lo) / 255)`` (float64
    division, one rounding to float32). A range whose scale would be below the
    smallest normal float32 (zero width, or all-subnormal data) becomes
    ``[lo, lo + DEGENERATE_RANGE_WIDTH]``.
    """
    lo = min(data_min, 0.0)
    hi = max(data_max, 0.0)
    s64 = (hi - lo) / 255.0
    if not s64 <= _F32_MAX:
        raise NumericsError(f"activation range [{lo!r}, {hi!r}] is too wide for a float32 scale")
    scale = np.float32(s64)
    if not scale >= _F32_TINY:
        logger.debug("degenerate activation range [%r, %r] widened to width %r",
                     lo, hi, DEGENERATE_RANGE_WIDTH)
        hi = lo + DEGENERATE_RANGE_WIDTH
        scale = np.float32((hi - lo) / 255.0)
    return lo, hi, scale


def scale_offset_from_range(data_min: float, data_max: float) -> tuple[np.float32, int]:
    """Asymmetric activation factors from an observed range.

    ``[min, max]`` is widened to contain 0; ``scale_d = float32((max - min) / 255)``
    (float64 arithmetic, one rounding); ``offset_d = -rint(min / scale_d) - 128``
    with ``min / scale_d`` evaluated as ``255 * min / (max - min)`` in float64 (the
    ratio before the scale's float32 rounding, so [-1, 1] gives
    ``-rint(-127.5) - 128 = 0``). If ``scale_d`` would not be a positive
    normal float32 (zero width: a layer that saw only zeros), the range becomes
    ``[min, min + DEGENERATE_RANGE_WIDTH]``, i.e. ``scale_d = float32(1/255)``.

    Args:
        data_min, data_max: the observed range in activation units (python or numpy
            scalars, or size-1 arrays); ``data_min <= data_max``.

    Returns:
        ``(scale_d, offset_d)``: scale_d a positive normal ``np.float32``, offset_d a
        python int in [-128, 127]. A range [0, m] gives offset_d = -128.

    Raises:
        NonFiniteError: a bound is NaN/Inf.
        NumericsError: ``data_min > data_max``, or the range is too wide for float32.
    """
    scale, offset, _ = _range_factors(data_min, data_max)
    return scale, offset


def _range_factors(data_min: npt.ArrayLike, data_max: npt.ArrayLike) -> tuple[np.float32, int, float]:
    """``(scale_d, offset_d, r)`` with ``r = min / scale`` the unrounded ratio (float64)."""
    lo_in = _scalar(data_min, "data_min")
    hi_in = _scalar(data_max, "data_max")
    if lo_in > hi_in:
        raise NumericsError(f"activation range is reversed: min {lo_in!r} > max {hi_in!r}")
    lo, hi, scale = _widen_range(lo_in, hi_in)
    # min/scale_d taken as the exact ratio 255*min/(max-min), not divided by the
    # float32-rounded scale: the offset then does not hinge on that rounding
    # ([-1, 1] gives -rint(-127.5) - 128 = 0, not -1). r lies in [-255, 0].
    r = 255.0 * lo / (hi - lo)
    offset = -int(np.rint(r)) - 128
    return scale, int(np.clip(offset, INT8_MIN, INT8_MAX)), r


def quantize_activation(x: npt.ArrayLike, scale_d: npt.ArrayLike,
                        offset_d: npt.ArrayLike) -> npt.NDArray[np.int8]:
    """``q = clamp(rint(x / scale_d) + offset_d, -128, 127)``, the division done as the target
    does it: a multiplication by ``quant_multiplier(scale_d)``.

    Args:
        x: activations, any shape, converted to float32; must be finite.
        scale_d: positive scale (used as float32).
        offset_d: integer in [-128, 127].

    Returns:
        int8 array of x's shape.
    """
    return quant_layer_forward(x, quant_multiplier(_positive_scale(scale_d, "scale_d")), offset_d)


def quant_layer_forward(x: npt.ArrayLike, quant_scale: npt.ArrayLike,
                        offset_d: npt.ArrayLike) -> npt.NDArray[np.int8]:
    """What a deploy model's ``Quant`` layer computes on the target:
    ``q = clamp(rint(x * quant_scale) + offset_d, -128, 127)``, ``quant_scale`` being the
    layer's float32 ``quant_param.scale`` (= ``quant_multiplier(scale_d)``).

    Args:
        x: activations, any shape, converted to float32; must be finite.
        quant_scale: positive float32 multiplier.
        offset_d: integer in [-128, 127].

    Returns:
        int8 array of x's shape.
    """
    inv = _positive_scale(quant_scale, "quant_scale")
    off = _offset_int8(offset_d)
    # clip(rint(x*inv) + off, -128, 127) == clip(rint(x*inv), -128-off, 127-off) + off exactly:
    # the clipped values are small integers, exact in float32.
    k = _activation_codes_f32(_as_f32(x, "Quant layer input"), inv, np.float32(INT8_MIN - off),
                              np.float32(INT8_MAX - off))
    return (k + np.float32(off)).astype(np.int8)


def dequantize_activation(q: npt.ArrayLike, scale_d: npt.ArrayLike,
                          offset_d: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """``x' = (q - offset_d) * scale_d`` in float32.

    Args:
        q: integer codes (any integer dtype, values in [-128, 127]), any shape.
        scale_d: positive scale (used as float32).
        offset_d: integer in [-128, 127].

    Returns:
        float32 array of q's shape.
    """
    s = _positive_scale(scale_d, "scale_d")
    off = _offset_int8(offset_d)
    qa = np.asarray(q)
    if not np.issubdtype(qa.dtype, np.integer):
        raise NumericsError(f"dequantize_activation: q must be integers, got dtype {qa.dtype}")
    # Subtract in float32 (exact for int8 codes): int8 arithmetic would wrap around.
    k = qa.astype(np.float32) - np.float32(off)
    return np.asarray(k * s, dtype=np.float32)


def fake_quantize_activation(x: npt.ArrayLike, scale_d: npt.ArrayLike,
                             offset_d: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """``dequantize_activation(quantize_activation(x, s, o), s, o)``, bit for bit.

    Args:
        x: activations, any shape, converted to float32; must be finite.
        scale_d: positive scale (used as float32).
        offset_d: integer in [-128, 127].

    Returns:
        float32 array of x's shape; every value is ``k * scale_d`` with integer k in
        ``[-128 - offset_d, 127 - offset_d]``.
    """
    s = _positive_scale(scale_d, "scale_d")
    off = _offset_int8(offset_d)
    x32 = _as_f32(x, "fake_quantize_activation input")
    k = _activation_codes_f32(x32, quant_multiplier(s), np.float32(INT8_MIN - off), np.float32(INT8_MAX - off))
    k *= s
    return k


def activation_grid_bounds(scale_d: npt.ArrayLike, offset_d: npt.ArrayLike) -> tuple[np.float32, np.float32]:
    """The ends of the int8 activation grid of ``(scale_d, offset_d)``, as the float32 values
    ``fake_quantize_activation`` outputs there: ``(-128 - offset_d) * scale_d`` and
    ``(127 - offset_d) * scale_d``. An input outside them is clipped."""
    s = _positive_scale(scale_d, "scale_d")
    off = _offset_int8(offset_d)
    return np.float32(INT8_MIN - off) * s, np.float32(INT8_MAX - off) * s


# --------------------------------------------------------------------------- ULQ


def _valid_clip_pair(cmin: float, cmax: float) -> bool:
    # Contract: invalid if max <= min, max < 0 or min > 0. NaN/Inf clips (a diverged
    # solver) are invalid too; the comparisons below are False for NaN.
    return bool(np.isfinite(cmin) and np.isfinite(cmax) and cmin < cmax and cmax >= 0 and cmin <= 0)


def ulq_sanitize_clips(clip_min: npt.ArrayLike, clip_max: npt.ArrayLike,
                       last_valid: tuple[float, float] | None,
                       fixed_min: bool) -> tuple[float, float]:
    """The clip pair ULQ actually uses this step.

    Rule (contract): if ``max <= min``, ``max < 0``, ``min > 0`` (or a clip is
    NaN/Inf) the pair falls back to ``last_valid``; then, if ``fixed_min``,
    ``min = 0``. With ``fixed_min`` a pair whose max is not above 0 after pinning
    (e.g. (-1, 0) -> (0, 0)) has zero width and also falls back.

    Args:
        clip_min, clip_max: the learnable clip blobs (numbers or size-1 arrays).
        last_valid: the last pair this function returned, or None before the first.
        fixed_min: pin the lower bound at 0.

    Returns:
        ``(clip_min, clip_max)`` as python floats, with min <= 0 <= max and min < max.

    Raises:
        NumericsError: the pair is invalid and there is no valid ``last_valid``.
    """
    cmin = _scalar(clip_min, "clip_min", finite=False)  # NaN/Inf clips fall back below
    cmax = _scalar(clip_max, "clip_max", finite=False)

    def usable(lo: float, hi: float) -> bool:
        return _valid_clip_pair(lo, hi) and (not fixed_min or hi > 0)

    if not usable(cmin, cmax):
        if last_valid is None:
            raise NumericsError(
                f"ULQ clips invalid (clip_min {cmin!r}, clip_max {cmax!r}; need min <= 0 <= max, "
                f"min < max{', max > 0 with fixed_min' if fixed_min else ''}) and no earlier valid pair")
        lmin, lmax = float(last_valid[0]), float(last_valid[1])
        if not usable(lmin, lmax):
            raise NumericsError(f"ULQ last valid clip pair ({lmin!r}, {lmax!r}) is itself invalid")
        logger.debug("ULQ clips (%r, %r) invalid; using last valid (%r, %r)", cmin, cmax, lmin, lmax)
        cmin, cmax = lmin, lmax
    if fixed_min:
        cmin = 0.0
    return cmin, cmax


def ulq_scale_offset(clip_min: npt.ArrayLike, clip_max: npt.ArrayLike) -> tuple[np.float32, int]:
    """ULQ's grid ``s * o .. s * (o + 255)`` from a sanitised clip pair.

    ``s = float32((max - min) / 255)`` and ``o = rint(min / s)`` (``min / s`` as the
    float64 ratio ``255 * min / (max - min)``); this is
    ``scale_offset_from_range`` with ``o = -offset_d - 128`` (see
    ``ulq_to_deploy_offset``), including its widening of a degenerate range.

    Args:
        clip_min, clip_max: a pair from ``ulq_sanitize_clips`` (min <= 0 <= max).

    Returns:
        ``(s, o)``: s a positive normal np.float32, o a python int in [-255, 0].

    Raises:
        NumericsError: the pair does not contain 0 (it was not sanitised).
    """
    cmin = _scalar(clip_min, "clip_min")
    cmax = _scalar(clip_max, "clip_max")
    if not cmin <= 0.0 <= cmax:
        raise NumericsError(
            f"ULQ clips ({cmin!r}, {cmax!r}) do not contain 0: pass them through ulq_sanitize_clips")
    s, offset_d = scale_offset_from_range(cmin, cmax)
    return s, -offset_d - 128


def ulq_to_deploy_offset(o: int) -> int:
    """The deploy ``offset_d`` equivalent to ULQ's grid offset ``o``: ``-o - 128``."""
    o_int = int(o)
    if not -255 <= o_int <= 0:
        raise NumericsError(f"ULQ grid offset o must lie in [-255, 0], got {o!r}")
    return -o_int - 128


def ulq_deploy_factors(clip_min: npt.ArrayLike, clip_max: npt.ArrayLike) -> tuple[np.float32, int]:
    """``(scale_d, offset_d)`` for the record/deploy model from a sanitised ULQ clip pair.

    ``fake_quantize_activation(x, scale_d, offset_d)`` equals ``ulq_forward(x, min, max)``.
    """
    s, o = ulq_scale_offset(clip_min, clip_max)
    return s, ulq_to_deploy_offset(o)


def _ulq_bounds(s: np.float32, o: int) -> tuple[np.float32, np.float32]:
    # The grid ends exactly as the forward pass produces them (k * s in float32).
    return np.float32(o) * s, np.float32(o + 255) * s


def ulq_forward(x: npt.ArrayLike, clip_min: npt.ArrayLike,
                clip_max: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """ULQ forward: ``y = rint(clamp(x, s*o, s*(o+255)) / s) * s``.

    Computed as ``k = clip(rint(x / s), o, o + 255)``, ``y = k * s`` in float32, which
    equals the formula above and ``fake_quantize_activation(x, s, -o - 128)`` bit for bit.

    Args:
        x: activations, any shape, converted to float32; must be finite.
        clip_min, clip_max: a pair from ``ulq_sanitize_clips``.

    Returns:
        float32 array of x's shape.
    """
    s, o = ulq_scale_offset(clip_min, clip_max)
    x32 = _as_f32(x, "ulq_forward input")
    k = _activation_codes_f32(x32, quant_multiplier(s), np.float32(o), np.float32(o + 255))
    k *= s
    return k


def ulq_backward(x: npt.ArrayLike, grad_y: npt.ArrayLike, clip_min: npt.ArrayLike,
                 clip_max: npt.ArrayLike) -> tuple[npt.NDArray[np.float32], float, float]:
    """ULQ backward (contract section 3).

    To x: straight-through where ``s*o <= x <= s*(o+255)``, zero elsewhere. To the
    clips, summed over elements, with ``D(v) = (rint(v/s) - v/s) / 255``:

    * inside: ``dmax += g*D(x)``, ``dmin -= g*D(x)``
    * above:  ``dmax += g*(D(min) + 1)``, ``dmin -= g*D(min)``
    * below:  ``dmax += g*D(min)``, ``dmin += g*(1 - D(min))``

    ``x/s`` for D(x) is the float32 quotient of the forward pass; ``min/s`` for
    D(min) is the float64 ratio ``255 * min / (max - min)`` that also gives the grid
    offset ``o = rint(min/s)`` (see ``scale_offset_from_range``). Sums are accumulated in float64
    (the constant per-region factors are applied to the region's gradient sum).

    Args:
        x: the forward input, any shape (float32); must be finite.
        grad_y: gradient of the loss w.r.t. ``ulq_forward(x, ...)``, x's shape; finite.
        clip_min, clip_max: the same sanitised pair as the forward pass.

    Returns:
        ``(grad_x, grad_clip_min, grad_clip_max)``: grad_x float32 of x's shape, the
        clip gradients python floats.
    """
    s, o = ulq_scale_offset(clip_min, clip_max)
    _, _, rmin = _range_factors(clip_min, clip_max)
    x32 = _as_f32(x, "ulq_backward input")
    g32 = _as_f32(grad_y, "ulq_backward gradient")
    if g32.shape != x32.shape:
        raise NumericsError(f"ulq_backward: grad_y shape {g32.shape} != x shape {x32.shape}")
    lo, hi = _ulq_bounds(s, o)
    above = x32 > hi
    below = x32 < lo
    inside = ~(above | below)

    grad_x = np.where(inside, g32, np.float32(0)).astype(np.float32, copy=False)

    r = x32 / s  # float32, as in the forward pass
    dnum = np.rint(r) - r  # exact in float32 (Sterbenz)
    # float64 sums with one float64 temporary (this runs every iteration): grad_x is g inside
    # and 0 elsewhere. No BLAS call here: numpy's BLAS threads would fight Caffe's for the cores.
    sum_in_d = float(np.multiply(grad_x, dnum, dtype=np.float64).sum()) / 255.0
    sum_above = float(np.sum(g32, where=above, dtype=np.float64))
    sum_below = float(np.sum(g32, where=below, dtype=np.float64))
    d_min = float((np.rint(rmin) - rmin) / 255.0)

    grad_max = sum_in_d + sum_above * (d_min + 1.0) + sum_below * d_min
    grad_min = -sum_in_d - sum_above * d_min + sum_below * (1.0 - d_min)
    return grad_x, float(grad_min), float(grad_max)


def fraction_clipped(x: npt.ArrayLike, clip_min: npt.ArrayLike, clip_max: npt.ArrayLike) -> float:
    """Share of elements of ``x`` outside ULQ's grid ``[s*o, s*(o+255)]`` (0.0 for empty x).

    Args:
        x: activations, any shape (float32); must be finite.
        clip_min, clip_max: a sanitised pair.
    """
    s, o = ulq_scale_offset(clip_min, clip_max)
    x32 = _as_f32(x, "fraction_clipped input")
    if x32.size == 0:
        return 0.0
    lo, hi = _ulq_bounds(s, o)
    n_out = np.count_nonzero(x32 < lo) + np.count_nonzero(x32 > hi)
    return float(n_out) / float(x32.size)


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
                search_step: float = 0.01) -> tuple[float, float]:
    """IFMR activation range search (contract section 3).

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
                                                          search_end, search_step)
    return ifmr_choice(data_min, cand_max, ifmr_squared_errors(x32, scales, offsets) / x32.size)


def ifmr_grids(x: npt.ArrayLike, min_percentile: float, max_percentile: float, search_start: float,
               search_end: float, search_step: float
               ) -> tuple[np.ndarray, float, np.ndarray, np.ndarray, np.ndarray]:
    """IFMR's candidate grids (arguments and checks of :func:`ifmr_search`):
    ``(x32, data_min, cand_max, scales, offsets)`` with x32 the data as flat float32, the candidate
    maxima ``factors * data_max`` (float64), their float32 scales and int64 offsets
    (``scale_offset_from_range(data_min, cand_max[j])``)."""
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
        scales[j], offsets[j] = scale_offset_from_range(data_min, float(m))
    return x32, data_min, cand_max, scales, offsets


def ifmr_squared_errors(x32: np.ndarray, scales: np.ndarray, offsets: np.ndarray) -> npt.NDArray[np.float64]:
    """Per candidate j, ``sum((fake_quantize_activation(x32, scales[j], offsets[j]) - x32)^2)``
    over flat float32 ``x32``, the difference and the sum in float64: float64 (len(scales),)."""
    k_lo = (INT8_MIN - offsets).astype(np.float32)
    k_hi = (INT8_MAX - offsets).astype(np.float32)
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


def ifmr_choice(data_min: float, cand_max: np.ndarray, mse: np.ndarray) -> tuple[float, float]:
    """The range of the candidate with the least ``mse`` (the first on ties: smallest factor),
    widened as :func:`scale_offset_from_range` widens it: ``(clip_min, clip_max)``."""
    best = int(np.argmin(mse))  # first minimum: smallest k on ties
    lo, hi, _ = _widen_range(data_min, float(cand_max[best]))
    logger.debug("IFMR: p_min %r -> candidate %d, range [%r, %r], mse %r", data_min, best, lo, hi, mse[best])
    return float(lo), float(hi)


def activation_factors(batches: Iterable[np.ndarray], ifmr: Mapping[str, float], symmetric: bool,
                       search: Callable[..., tuple[float, float]] = ifmr_search) -> tuple[np.float32, int]:
    """(scale_d, offset_d) of a layer input from the batches calibration observed (any shapes):
    one IFMR search (``search``, by default :func:`ifmr_search`, with the arguments ``ifmr``) over
    all their values; ``symmetric`` widens the range found to [-a, a], a = max(-min, max), so that
    offset_d is 0."""
    clip_min, clip_max = search(np.concatenate([np.ravel(b) for b in batches]), **ifmr)
    if symmetric:
        bound = max(-clip_min, clip_max)
        clip_min, clip_max = -bound, bound
    return scale_offset_from_range(clip_min, clip_max)


# --------------------------------------------------------------------------- ARQ weights


def arq_scale(w: npt.ArrayLike, channel_axis: int | None) -> npt.NDArray[np.float32]:
    """ARQ symmetric weight scales, ``offset_w = 0``.

    Per channel (or per tensor): ``a`` = the one of max/min with the larger magnitude
    (max on a tie); ``scale_w = a/127`` if ``a > 0`` else ``a/-128`` (float32
    division); a scale below float32 eps (incl. an all-zero channel) becomes 1.

    Args:
        w: weights (float32), non-empty, finite. Convolution filters are
            (C_out, C_in/g, kh, kw), Deconvolution (C_in, C_out/g, kh, kw).
        channel_axis: 0 for Convolution, 1 for Deconvolution, None for per tensor.

    Returns:
        float32 array of shape (w.shape[channel_axis],), or (1,) when None.
    """
    w32 = _as_f32(w, "arq_scale weights")
    if w32.size == 0:
        raise NumericsError("arq_scale: empty weights")
    if channel_axis is None:
        mx = np.array([w32.max()], dtype=np.float32)
        mn = np.array([w32.min()], dtype=np.float32)
    else:
        ax = _norm_axis(channel_axis, w32.ndim, "arq_scale")
        others = tuple(i for i in range(w32.ndim) if i != ax)
        mx = np.asarray(w32.max(axis=others), dtype=np.float32).reshape(-1)
        mn = np.asarray(w32.min(axis=others), dtype=np.float32).reshape(-1)
    a = np.where(np.abs(mx) >= np.abs(mn), mx, mn)
    scale = np.where(a > 0, a / np.float32(127), a / np.float32(-128)).astype(np.float32)
    scale[~(scale >= _F32_EPS)] = np.float32(1)  # covers 0 and -0 of all-zero channels
    return scale


def _weight_scale_b(w32: np.ndarray, scale_w: npt.ArrayLike, channel_axis: int | None) -> np.ndarray:
    """scale_w as float32, shaped to broadcast against w32 on channel_axis."""
    if channel_axis is None:
        s = np.asarray(scale_w, dtype=np.float32).reshape(-1)
        if s.size != 1:
            raise NumericsError(f"scale_w: per-tensor quantization takes 1 value, got {s.size}")
        return _per_channel(s, 1, "scale_w").reshape(())
    ax = _norm_axis(channel_axis, w32.ndim, "ARQ")
    c = w32.shape[ax]
    return _per_channel(scale_w, c, "scale_w").reshape(_channel_shape(w32.ndim, ax, c))


def arq_quantize(w: npt.ArrayLike, scale_w: npt.ArrayLike,
                 channel_axis: int | None) -> npt.NDArray[np.int8]:
    """``clamp(rint(w / scale_w), -128, 127)`` with scale_w broadcast on channel_axis.

    Args:
        w: weights (float32), any shape, finite.
        scale_w: (C,) or (1,) positive float32 scales (from ``arq_scale``).
        channel_axis: the channel axis of w, or None for a per-tensor scale.

    Returns:
        int8 array of w's shape.
    """
    w32 = _as_f32(w, "arq_quantize weights")
    s = _weight_scale_b(w32, scale_w, channel_axis)
    return _grid_f32(w32, s, np.float32(INT8_MIN), np.float32(INT8_MAX)).astype(np.int8)


def arq_fake_quantize(w: npt.ArrayLike, scale_w: npt.ArrayLike,
                      channel_axis: int | None) -> npt.NDArray[np.float32]:
    """``arq_quantize(w, scale_w, channel_axis) * scale_w`` in float32 (w's shape)."""
    w32 = _as_f32(w, "arq_fake_quantize weights")
    s = _weight_scale_b(w32, scale_w, channel_axis)
    k = _grid_f32(w32, s, np.float32(INT8_MIN), np.float32(INT8_MAX))
    k *= s
    return k


# --------------------------------------------------------------------------- bias, deq


def quantize_bias(bias: npt.ArrayLike, scale_d: npt.ArrayLike, scale_w: npt.ArrayLike,
                  layer_name: str) -> npt.NDArray[np.int32]:
    """``bias_int32[c] = rint(bias[c] / (scale_d * scale_w[c]))``.

    Computed in float64 from the float32 factors (their product is exact in float64).

    Args:
        bias: (C,) float bias of the layer; finite.
        scale_d: the layer's activation scale (float32).
        scale_w: (C,) or (1,) weight scales (float32); length 1 broadcasts.
        layer_name: for messages.

    Returns:
        int32 array of shape (C,).

    Raises:
        BiasOverflowError: a value falls outside int32; names the layer, the channel
            and the value and says to skip the layer.
    """
    check_finite(bias, f"layer '{layer_name}' bias")
    b = np.asarray(bias, dtype=np.float64).reshape(-1)
    sd = _positive_scale(scale_d, f"layer '{layer_name}' scale_d")
    sw = _per_channel(scale_w, b.size, f"layer '{layer_name}' scale_w")
    r = np.rint(b / (np.float64(sd) * sw.astype(np.float64)))
    bad = (r < INT32_MIN) | (r > INT32_MAX)
    if bad.any():
        c = int(np.argmax(bad))
        raise BiasOverflowError(
            f"layer '{layer_name}': bias of channel {c} ({b[c]!r}) quantizes to {r[c]:.6g}, outside "
            f"int32 [{INT32_MIN}, {INT32_MAX}] ({int(bad.sum())} channel(s) overflow; scale_d "
            f"{float(sd)!r}, scale_w {float(sw[c])!r}); skip this layer (add it to skip_layers)")
    return r.astype(np.int32)


def dequantize_bias(bias_int32: npt.ArrayLike, deq: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """The float bias of a fake-quant layer, ``bias_int32[c] * deq[c]`` rounded once to float32,
    so that every accumulator the fake-quant layer simulates is an integer times deq.

    Args:
        bias_int32: (C,) int32 bias from ``quantize_bias``.
        deq: (C,) or (1,) deq scales.

    Returns:
        float32 (C,).
    """
    b = np.asarray(bias_int32, dtype=np.float64).reshape(-1)
    d = _per_channel(deq, b.size, "deq").astype(np.float64)
    return (b * d).astype(np.float32)


def average_pool_scale(window: int) -> npt.NDArray[np.float32]:
    """The ``scale_w`` of a quantized AVE pooling of ``window`` = kernel_h * kernel_w elements:
    ``[float32(1/window)]``. The integer layer only sums the codes of a window; the division by
    the window size lives in ``deq = scale_d * scale_w``, so the pooling has one fixed "weight scale".

    Raises:
        NumericsError: window < 1.
    """
    if int(window) < 1:
        raise NumericsError(f"pooling window must hold at least one element, got {window}")
    return np.array([1.0 / int(window)], np.float32)


def window_sums(x: npt.ArrayLike, kernel: tuple[int, int], stride: tuple[int, int]) -> npt.NDArray[np.float64]:
    """The sum of each (kernel_h, kernel_w) window, at (stride_h, stride_w) steps, over the last two
    axes of integer-valued ``x`` (N, C, H, W), without padding: the accumulator of an integer AVE
    pooling. float64 sums of int8 codes are exact for any real window.

    Returns:
        float64 (N, C, OH, OW), OH = (H - kernel_h) // stride_h + 1 (likewise OW).
    """
    windows = sliding_window_view(np.asarray(x, np.float64), tuple(kernel), axis=(2, 3))
    return windows[:, :, ::stride[0], ::stride[1]].sum(axis=(4, 5))


#: float32 holds every integer of magnitude up to 2^24 exactly.
_F32_EXACT_INTEGERS = float(2 ** 24)


def exact_integer_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` of integer-valued float arrays a (P, K) and b (K, Q), exact.

    The K axis is cut into chunks in which ``sum_k max|a[:, k]| * max|b[k, :]| < 2^24``: then
    every product and every partial sum of a chunk, in whatever order and with whatever fused
    multiply-adds BLAS uses, is an integer below 2^24, exact in float32. Each chunk is one
    float32 GEMM (twice the speed of float64 and half its memory); chunk results are added in
    float64, exact far beyond any int32 accumulator.

    Returns:
        (P, Q) integer-valued float32 when one chunk covers K, else float64.
    """
    a32 = np.asarray(a, dtype=np.float32)
    b32 = np.asarray(b, dtype=np.float32)
    k = a32.shape[1]
    if k == 0 or a32.shape[0] == 0 or b32.shape[1] == 0:
        return np.zeros((a32.shape[0], b32.shape[1]), np.float32)
    # max |.| as max(max, -min): no |a| temporary as big as the operand (page faults cost here)
    bound = (np.maximum(a32.max(axis=0), -a32.min(axis=0)).astype(np.float64)
             * np.maximum(b32.max(axis=1), -b32.min(axis=1)))
    if bound.max() >= _F32_EXACT_INTEGERS:
        raise NumericsError(f"exact_integer_matmul: a product reaches {bound.max():.3g}, beyond float32's "
                            "exact integers: the operands are not int8-sized codes")
    ends, total, start = [], 0.0, 0
    for i, v in enumerate(bound.tolist()):
        if total + v >= _F32_EXACT_INTEGERS:
            ends.append(i)
            total = 0.0
        total += v
    ends.append(k)
    if len(ends) == 1:
        return a32 @ b32
    out = np.zeros((a32.shape[0], b32.shape[1]))
    for end in ends:
        out += a32[:, start:end] @ b32[start:end]
        start = end
    return out


def conv_accumulate(x: np.ndarray, w: np.ndarray, g: dict) -> np.ndarray:
    """Integer convolution of x (N, C, H, W) by w (M, C/group, KH, KW), both integer-valued
    (int8-sized codes, any float dtype), geometry ``g`` (a ``ConvGeometry.__dict__``): im2col in
    Caffe's layout, (C*KH*KW, N*OH*OW), and one :func:`exact_integer_matmul` per group (a 1 x 1
    convolution of stride 1 multiplies the input itself), so the int32 accumulator comes out
    exactly.

    Returns:
        integer-valued float32 or float64 (N, M, OH, OW).
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g["kernel"], g["stride"], g["pad"], g["dilation"]
    group = g["group"]
    x = np.asarray(x, dtype=np.float32)
    n, c = x.shape[:2]
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else x  # zero codes: x - offset = 0
    windows = sliding_window_view(padded, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]            # (N, C, OH, OW, KH, KW)
    oh, ow = windows.shape[2:4]
    m = w.shape[0]
    out = None
    cg, mg = c // group, m // group
    for gi in range(group):
        # (C/group, KH, KW, N, OH, OW): a view, not a copy, for a 1 x 1 kernel of stride 1 and batch 1
        cols = windows[:, gi * cg:(gi + 1) * cg].transpose(1, 4, 5, 0, 2, 3).reshape(cg * kh * kw, -1)
        acc = exact_integer_matmul(w[gi * mg:(gi + 1) * mg].reshape(mg, -1), cols)
        if out is None:
            out = np.empty((n, m, oh, ow), acc.dtype)
        elif acc.dtype != out.dtype:
            out = out.astype(np.float64)
        out[:, gi * mg:(gi + 1) * mg] = acc.reshape(mg, n, oh, ow).transpose(1, 0, 2, 3)
    return out


def deconv_accumulate(x: np.ndarray, w: np.ndarray, g: dict) -> np.ndarray:
    """Integer transposed convolution (Caffe's Deconvolution, group 1) of x (N, C, H, W) by
    w (C, M, KH, KW), both integer-valued (int8-sized codes), as Caffe computes it: one matmul gives every
    input pixel's contribution to every kernel tap, col2im adds each tap's contributions into
    the output at stride steps, and the pad is cropped from both borders. Exact as in
    :func:`conv_accumulate`: :func:`exact_integer_matmul`, float64 col2im sums."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g["kernel"], g["stride"], g["pad"], g["dilation"]
    n, c, h, wd = x.shape
    m = w.shape[1]
    taps = exact_integer_matmul(x.transpose(0, 2, 3, 1).reshape(-1, c), w.reshape(c, -1))
    taps = taps.reshape(n, h, wd, m, kh, kw)
    taps = taps.transpose(0, 3, 4, 5, 1, 2)                    # (N, M, KH, KW, H, W)
    full = np.zeros((n, m, sh * (h - 1) + dh * (kh - 1) + 1, sw * (wd - 1) + dw * (kw - 1) + 1))
    for i in range(kh):
        for j in range(kw):
            full[:, :, i * dh:i * dh + sh * (h - 1) + 1:sh, j * dw:j * dw + sw * (wd - 1) + 1:sw] += taps[:, :, i, j]
    return full[:, :, ph:full.shape[2] - ph, pw:full.shape[3] - pw]


def conv_output_hw(in_hw, geometry: dict, transposed: bool = False) -> list[int]:
    """Caffe's output height and width of a Convolution, or of a Deconvolution (``transposed``),
    of ``geometry`` (a ``ConvGeometry.__dict__``, as the layers receive it in param_str)."""
    out = []
    for size, pad, k, d, stride in zip(in_hw, geometry["pad"], geometry["kernel"], geometry["dilation"],
                                       geometry["stride"]):
        extent = (k - 1) * d + 1
        out.append(stride * (size - 1) + extent - 2 * pad if transposed else (size + 2 * pad - extent) // stride + 1)
    return out


def deq_scales(scale_d: npt.ArrayLike, scale_w: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """``deq[c] = float32(scale_d * scale_w[c])`` (one rounding of the exact product).

    Args:
        scale_d: activation scale (float32).
        scale_w: (C,) or (1,) weight scales (float32).

    Returns:
        float32 array of shape (C,) (len(scale_w)).

    Raises:
        NumericsError: a product underflows to 0 or overflows.
    """
    sd = _positive_scale(scale_d, "scale_d")
    sw = np.asarray(scale_w, dtype=np.float32).reshape(-1)
    sw = _per_channel(sw, sw.size, "scale_w")
    deq = (sw * sd).astype(np.float32)
    bad = ~(np.isfinite(deq) & (deq > 0))
    if bad.any():
        c = int(np.argmax(bad))
        raise NumericsError(f"deq scale of channel {c} = scale_d {float(sd)!r} * scale_w "
                            f"{float(sw[c])!r} is not a positive finite float32 ({deq[c]!r})")
    return deq


# --------------------------------------------------------------------------- shift-N


def _channels_first_f64(y: npt.ArrayLike, channel_axis: int, what: str) -> tuple[np.ndarray, int]:
    """y as a float64 (C, M) array with the channel axis first, and the axis index."""
    check_finite(y, what)
    ya = np.asarray(y)
    if ya.ndim == 0:
        raise NumericsError(f"{what}: needs at least one axis (the channel axis)")
    ax = _norm_axis(channel_axis, ya.ndim, what)
    c = ya.shape[ax]
    return np.moveaxis(ya, ax, 0).reshape(c, -1).astype(np.float64), ax


def accumulate_shift_errors(y: npt.ArrayLike, deq: npt.ArrayLike,
                            channel_axis: int = 1) -> npt.NDArray[np.float64]:
    """Per-shift, per-channel requantisation error of one batch.

    ``a = y / deq[c]`` (float64); for N in 1..16,
    ``err[N-1, c] = sum((clamp_int16(rint(a / 2^N)) * 2^N - a)^2)`` over every axis
    but the channel axis. Errors of several batches add up; ``choose_shift_bits``
    then picks N.

    Args:
        y: the quantized layer's float output, e.g. (N, C) or (N, C, H, W); finite.
        deq: (C,) or (1,) deq scales (``deq_scales``).
        channel_axis: the channel axis of y (1 for Caffe blobs).

    Returns:
        float64 array of shape (16, C).
    """
    a, _ = _channels_first_f64(y, channel_axis, "shift-N search input")
    c = a.shape[0]
    a /= _per_channel(deq, c, "deq").astype(np.float64)[:, None]
    errors = np.empty((len(SHIFT_BITS), c), dtype=np.float64)
    t = np.empty_like(a)
    for i, n in enumerate(SHIFT_BITS):  # 16 passes; (16, C, M) would cost 16x the memory
        np.multiply(a, 2.0 ** -n, out=t)  # exact: division by a power of two
        np.rint(t, out=t)
        np.clip(t, INT16_MIN, INT16_MAX, out=t)
        t *= 2.0 ** n
        t -= a
        errors[i] = np.einsum("ij,ij->i", t, t)
    return errors


def choose_shift_bits(errors: npt.ArrayLike) -> npt.NDArray[np.uint32]:
    """The smallest N with the least error, per channel.

    Args:
        errors: (16, C) error sums from ``accumulate_shift_errors`` (row i is N = i+1).

    Returns:
        uint32 array of shape (C,) with values in 1..16.
    """
    e = np.asarray(errors, dtype=np.float64)
    if e.ndim != 2 or e.shape[0] != len(SHIFT_BITS):
        raise NumericsError(f"shift errors must have shape (16, C), got {e.shape}")
    check_finite(e, "shift-N error sums")
    # argmin returns the first minimum, i.e. the smallest N on ties.
    return (np.argmin(e, axis=0) + SHIFT_BITS.start).astype(np.uint32)


def search_shift_bits(y: npt.ArrayLike, deq: npt.ArrayLike,
                      channel_axis: int = 1) -> npt.NDArray[np.uint32]:
    """``choose_shift_bits(accumulate_shift_errors(y, deq, channel_axis))``: uint32 (C,)."""
    return choose_shift_bits(accumulate_shift_errors(y, deq, channel_axis))


def accumulator_from_output(y: npt.ArrayLike, deq: npt.ArrayLike,
                            channel_axis: int = 1) -> npt.NDArray[np.float64]:
    """The int32 accumulator a fake-quant layer output stands for: ``rint(y / deq[c])``.

    A layer whose inputs, weights and bias all lie on their grids outputs ``acc * deq`` up
    to float32 summation error; rounding recovers the integer the target accumulates.

    Args:
        y: the layer's float32 output, e.g. (N, C, H, W) or (N, C).
        deq: (C,) or (1,) deq scales.
        channel_axis: the channel axis of y.

    Returns:
        float64 array of y's shape holding integers.
    """
    a = np.asarray(y, dtype=np.float64)
    check_finite(a, "fake-quant layer output")
    ax = _norm_axis(channel_axis, a.ndim, "accumulator_from_output")
    d = _per_channel(deq, a.shape[ax], "deq").astype(np.float64)
    return np.rint(a / d.reshape(_channel_shape(a.ndim, ax, a.shape[ax])))


def requantize(acc: npt.ArrayLike, shift_bits: npt.ArrayLike,
               channel_axis: int = 1) -> npt.NDArray[np.int32]:
    """``t = clamp_int16(rint(acc / 2^N[c]))`` (float64 arithmetic).

    Args:
        acc: integer-valued accumulators (any int or float dtype), e.g. (N, C, H, W).
        shift_bits: (C,) or (1,) shifts in 0..16 (0 = no shift; the search yields 1..16).
        channel_axis: the channel axis of acc.

    Returns:
        int32 array of acc's shape with values in [-32768, 32767].
    """
    check_finite(acc, "requantize accumulator")
    a = np.asarray(acc)
    if a.ndim == 0:
        raise NumericsError("requantize: acc needs at least one axis (the channel axis)")
    ax = _norm_axis(channel_axis, a.ndim, "requantize")
    c = a.shape[ax]
    n = _shift_vector(shift_bits, c, 0, SHIFT_BITS.stop - 1)
    inv = np.ldexp(1.0, -n).reshape(_channel_shape(a.ndim, ax, c))  # exact powers of two
    t = np.rint(a.astype(np.float64) * inv)
    np.clip(t, INT16_MIN, INT16_MAX, out=t)
    return t.astype(np.int32)


def requantized_output(acc: npt.ArrayLike, deq: npt.ArrayLike, shift_bits: npt.ArrayLike,
                       channel_axis: int = 1) -> npt.NDArray[np.float32]:
    """What the fake-quant model outputs: ``t * deq[c] * 2^N[c]`` in float32.

    ``deq * 2^N`` is exact in float32, so the result is ``t`` times it rounded once.

    Args:
        acc: integer-valued accumulators (see ``requantize``).
        deq: (C,) or (1,) deq scales (float32).
        shift_bits: (C,) or (1,) shifts.
        channel_axis: the channel axis of acc.

    Returns:
        float32 array of acc's shape.
    """
    t = requantize(acc, shift_bits, channel_axis)
    ax = _norm_axis(channel_axis, t.ndim, "requantized_output")
    c = t.shape[ax]
    d = _per_channel(deq, c, "deq")
    n = _shift_vector(shift_bits, c, 0, SHIFT_BITS.stop - 1)
    mult = np.ldexp(d, n.astype(np.int32)).astype(np.float32)
    if not np.isfinite(mult).all():
        raise NumericsError("requantized_output: deq * 2^N overflows float32")
    return t.astype(np.float32) * mult.reshape(_channel_shape(t.ndim, ax, c))


def is_global_conv(output_shape: tuple[int, ...], scale_count: int) -> bool:
    """Whether a layer with output ``output_shape`` and ``scale_count`` weight scales is a "global
    conv": per-channel scales and a (N, C, 1, 1) output, where the deploy model gives every channel
    the largest deq (:func:`unify_global_conv_scales`). The channel count is not looked at."""
    return len(output_shape) == 4 and tuple(output_shape[2:]) == (1, 1) and scale_count > 1


def output_steps(deq: npt.ArrayLike, shift_bits: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """float64 (C,): a quantized layer's output quantization step per channel, ``deq * 2^N``
    (what one unit of the int16 requantised output is worth); ``deq`` of length 1 broadcasts."""
    n = np.asarray(shift_bits, np.int64).reshape(-1)
    d = _per_channel(np.asarray(deq, np.float32).reshape(-1), n.size, "deq").astype(np.float64)
    return np.ldexp(d, n)


def unify_global_conv_scales(scale_d: npt.ArrayLike,
                             scale_w: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Rewrite per-channel ``scale_w`` for a "global conv" (output H = W = 1).

    All channels use the largest deq: the returned scale_w is
    ``float32(deq_max / scale_d)`` for every channel. Of that value and its two
    float32 neighbours on each side, the first (nearest) one for which
    ``deq_scales(scale_d, ...)`` reproduces ``deq_max`` exactly is used, so the
    record's scale_w gives back deq_max; if none does, the rounded quotient.

    Args:
        scale_d: activation scale (float32).
        scale_w: (C,) weight scales (float32).

    Returns:
        float32 array of shape (C,), all entries equal.
    """
    sd = _positive_scale(scale_d, "scale_d")
    deq = deq_scales(sd, scale_w)
    deq_max = deq.max()
    w0 = np.float32(float(deq_max) / float(sd))
    chosen = w0
    up, down = w0, w0
    candidates = [w0]
    for _ in range(2):
        up = np.nextafter(up, np.float32(np.inf))
        down = np.nextafter(down, np.float32(0))
        candidates += [up, down]
    for cand in candidates:
        if cand > 0 and np.float32(cand * sd) == deq_max:
            chosen = cand
            break
    return np.full(deq.shape, chosen, dtype=np.float32)


# --------------------------------------------------------------------------- deq packing


def pack_deq_scale(deq: npt.ArrayLike, shift_bits: npt.ArrayLike,
                   offset_w: npt.ArrayLike) -> npt.NDArray[np.uint64]:
    """Pack the DeQuant layer's per-channel ``deq_scale`` words.

    Bits 0-31: the float32 bits of deq[c]; bits 32-39: shift_bit; bits 40-47:
    offset_w as one int8 byte (two's complement); bits 48-63: zero.

    Args:
        deq: (C,) or (1,) float32 deq scales.
        shift_bits: (C,) or (1,) shifts in 0..255.
        offset_w: (C,) or (1,) or a scalar, integers in [-128, 127] (ARQ: 0).

    Returns:
        uint64 array of shape (C,), C the longest of the inputs.
    """
    d = np.asarray(deq, dtype=np.float32).reshape(-1)
    sb = np.asarray(shift_bits).reshape(-1)
    ow = np.asarray(offset_w).reshape(-1)
    c = max(d.size, sb.size, ow.size)
    check_finite(d, "deq scale")
    if d.size not in (1, c):
        raise NumericsError(f"deq: expected 1 or {c} values, got {d.size}")
    ow = _int_vector(ow, c, INT8_MIN, INT8_MAX, "offset_w")
    n = _shift_vector(sb, c, 0, 255)
    bits = np.broadcast_to(d, (c,)).view(np.uint32).astype(np.uint64)
    bits |= n.astype(np.uint64) << np.uint64(32)
    bits |= ow.astype(np.int8).view(np.uint8).astype(np.uint64) << np.uint64(40)
    return bits


def unpack_deq_scale(packed: npt.ArrayLike) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint32],
                                                    npt.NDArray[np.int8]]:
    """Inverse of ``pack_deq_scale``.

    Args:
        packed: (C,) uint64 words.

    Returns:
        ``(deq float32 (C,), shift_bits uint32 (C,), offset_w int8 (C,))``.

    Raises:
        NumericsError: bits 48-63 of a word are set (not a packed deq_scale).
    """
    p = np.asarray(packed, dtype=np.uint64).reshape(-1)
    if (p >> np.uint64(48)).any():
        c = int(np.argmax(p >> np.uint64(48)))
        raise NumericsError(f"packed deq_scale of channel {c} ({int(p[c]):#x}) has bits 48-63 set")
    deq = (p & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32)
    shift = ((p >> np.uint64(32)) & np.uint64(0xFF)).astype(np.uint32)
    offset = ((p >> np.uint64(40)) & np.uint64(0xFF)).astype(np.uint8).view(np.int8)
    return deq, shift, offset
