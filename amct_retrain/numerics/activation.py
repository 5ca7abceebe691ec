"""Asymmetric activation quantization (quantize, dequantize, fake-quantize, the deploy Quant
layer) and ULQ, the learnable-clip activation quantizer of retraining (contract section 3)."""

from __future__ import annotations

import logging
import math

import numpy as np
import numpy.typing as npt

from amct_retrain.errors import NumericsError
from amct_retrain.numerics.checks import (
    DEFAULT_BITS, DEGENERATE_RANGE_WIDTH, _F32_MAX, _F32_TINY, BitWidth, _as_f32, _offset_code, _positive_scale, _scalar,
    bit_width,
)

logger = logging.getLogger(__name__)

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
    if type(scale_d) is np.float32:  # the layers' hot path (the same float64 division, one rounding)
        return np.asarray(np.float32(1.0 / float(scale_d)))
    return np.asarray(1.0 / np.asarray(scale_d, dtype=np.float32).astype(np.float64), dtype=np.float32)


def _activation_codes_f32(x32: np.ndarray, multiplier: npt.ArrayLike, k_lo: npt.ArrayLike,
                          k_hi: npt.ArrayLike) -> np.ndarray:
    """``clip(rint(x * multiplier), k_lo, k_hi)`` in float32 (integer-valued); the multiplier
    is ``quant_multiplier(scale_d)``, the deploy Quant layer's scale."""
    k = np.asarray(np.multiply(x32, multiplier, dtype=np.float32))
    np.rint(k, out=k)
    np.clip(k, k_lo, k_hi, out=k)
    return k


def _widen_range(data_min: float, data_max: float, levels: int = 255) -> tuple[float, float, np.float32]:
    """Widen [min, max] to contain 0 and to a positive normal float32 scale.

    Returns ``(lo, hi, scale)`` with ``scale = float32((hi - lo) / levels)`` (float64
    division, one rounding to float32). A range whose scale would be below the
    smallest normal float32 (zero width, or all-subnormal data) becomes
    ``[lo, lo + DEGENERATE_RANGE_WIDTH]``.
    """
    lo = min(data_min, 0.0)
    hi = max(data_max, 0.0)
    s64 = (hi - lo) / levels
    if not s64 <= _F32_MAX:
        raise NumericsError(f"activation range [{lo!r}, {hi!r}] is too wide for a float32 scale")
    scale = np.float32(s64)
    if not scale >= _F32_TINY:
        logger.debug("degenerate activation range [%r, %r] widened to width %r",
                     lo, hi, DEGENERATE_RANGE_WIDTH)
        hi = lo + DEGENERATE_RANGE_WIDTH
        scale = np.float32((hi - lo) / levels)
    return lo, hi, scale


def scale_offset_from_range(data_min: float, data_max: float,
                            num_bits: int = DEFAULT_BITS) -> tuple[np.float32, int]:
    """Asymmetric activation factors from an observed range.

    At ``num_bits`` b other than 8, 255 below is ``2**b - 1`` and 128 is ``2**(b-1)``
    (:class:`~amct_retrain.numerics.checks.BitWidth`): offset_d lies in ``[-2**(b-1), 2**(b-1) - 1]``.

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
        num_bits: the bit width b, 2..8.

    Returns:
        ``(scale_d, offset_d)``: scale_d a positive normal ``np.float32``, offset_d a
        python int in [-128, 127]. A range [0, m] gives offset_d = -128.

    Raises:
        NonFiniteError: a bound is NaN/Inf.
        NumericsError: ``data_min > data_max``, or the range is too wide for float32.
    """
    scale, offset, _ = _range_factors(data_min, data_max, num_bits)
    return scale, offset


def _range_factors(data_min: npt.ArrayLike, data_max: npt.ArrayLike,
                   num_bits: int = DEFAULT_BITS) -> tuple[np.float32, int, float]:
    """``(scale_d, offset_d, r)`` with ``r = min / scale`` the unrounded ratio (float64)."""
    bw = bit_width(num_bits)
    lo_in = _scalar(data_min, "data_min")
    hi_in = _scalar(data_max, "data_max")
    if lo_in > hi_in:
        raise NumericsError(f"activation range is reversed: min {lo_in!r} > max {hi_in!r}")
    lo, hi, scale = _widen_range(lo_in, hi_in, bw.levels)
    # min/scale_d taken as the exact ratio levels*min/(max-min), not divided by the
    # float32-rounded scale: the offset then does not hinge on that rounding
    # ([-1, 1] gives -rint(-127.5) - 128 = 0, not -1). r lies in [-levels, 0].
    r = float(bw.levels) * lo / (hi - lo)
    offset = -round(r) + bw.code_min  # round: half to even, as np.rint (r is finite)
    return scale, min(max(offset, bw.code_min), bw.code_max), r


def quantize_activation(x: npt.ArrayLike, scale_d: npt.ArrayLike, offset_d: npt.ArrayLike,
                        num_bits: int = DEFAULT_BITS) -> npt.NDArray[np.int8]:
    """``q = clamp(rint(x / scale_d) + offset_d, -128, 127)``, the division done as the target
    does it: a multiplication by ``quant_multiplier(scale_d)``. At ``num_bits`` b the clamp is to
    the b-bit codes ``[-2**(b-1), 2**(b-1) - 1]`` (held in int8).

    Args:
        x: activations, any shape, converted to float32; must be finite.
        scale_d: positive scale (used as float32).
        offset_d: integer in [-128, 127] (a b-bit code).
        num_bits: the bit width b, 2..8.

    Returns:
        int8 array of x's shape.
    """
    return quant_layer_forward(x, quant_multiplier(_positive_scale(scale_d, "scale_d")), offset_d, num_bits)


def quant_layer_forward(x: npt.ArrayLike, quant_scale: npt.ArrayLike, offset_d: npt.ArrayLike,
                        num_bits: int = DEFAULT_BITS) -> npt.NDArray[np.int8]:
    """What a deploy model's ``Quant`` layer computes on the target:
    ``q = clamp(rint(x * quant_scale) + offset_d, code_min, code_max)`` (-128, 127 at 8 bits),
    ``quant_scale`` being the layer's float32 ``quant_param.scale`` (= ``quant_multiplier(scale_d)``).

    Args:
        x: activations, any shape, converted to float32; must be finite.
        quant_scale: positive float32 multiplier.
        offset_d: a ``num_bits``-bit code.
        num_bits: the bit width, 2..8.

    Returns:
        int8 array of x's shape.
    """
    bw = bit_width(num_bits)
    inv = _positive_scale(quant_scale, "quant_scale")
    off = _offset_code(offset_d, bw)
    # clip(rint(x*inv) + off, lo, hi) == clip(rint(x*inv), lo-off, hi-off) + off exactly:
    # the clipped values are small integers, exact in float32.
    k = _activation_codes_f32(_as_f32(x, "Quant layer input"), inv, *code_bounds(bw, off))
    return (k + np.float32(off)).astype(np.int8)


def code_bounds(bw: BitWidth, offset_d: int) -> tuple[np.float32, np.float32]:
    """``(code_min - offset_d, code_max - offset_d)`` as float32: the range of ``k = q - offset_d``,
    the codes an integer layer multiplies."""
    return np.float32(bw.code_min - offset_d), np.float32(bw.code_max - offset_d)


def dequantize_activation(q: npt.ArrayLike, scale_d: npt.ArrayLike, offset_d: npt.ArrayLike,
                          num_bits: int = DEFAULT_BITS) -> npt.NDArray[np.float32]:
    """``x' = (q - offset_d) * scale_d`` in float32.

    Args:
        q: integer codes (any integer dtype, values in [-128, 127]), any shape.
        scale_d: positive scale (used as float32).
        offset_d: a ``num_bits``-bit code.
        num_bits: the bit width, 2..8.

    Returns:
        float32 array of q's shape.
    """
    s = _positive_scale(scale_d, "scale_d")
    off = _offset_code(offset_d, bit_width(num_bits))
    qa = np.asarray(q)
    if not np.issubdtype(qa.dtype, np.integer):
        raise NumericsError(f"dequantize_activation: q must be integers, got dtype {qa.dtype}")
    # Subtract in float32 (exact for int8 codes): int8 arithmetic would wrap around.
    k = qa.astype(np.float32) - np.float32(off)
    return np.asarray(k * s, dtype=np.float32)


def fake_quantize_activation(x: npt.ArrayLike, scale_d: npt.ArrayLike, offset_d: npt.ArrayLike,
                             num_bits: int = DEFAULT_BITS) -> npt.NDArray[np.float32]:
    """``dequantize_activation(quantize_activation(x, s, o, b), s, o, b)``, bit for bit.

    Args:
        x: activations, any shape, converted to float32; must be finite.
        scale_d: positive scale (used as float32).
        offset_d: a ``num_bits``-bit code.
        num_bits: the bit width, 2..8.

    Returns:
        float32 array of x's shape; every value is ``k * scale_d`` with integer k in
        ``[code_min - offset_d, code_max - offset_d]`` (-128, 127 at 8 bits).
    """
    bw = bit_width(num_bits)
    s = _positive_scale(scale_d, "scale_d")
    off = _offset_code(offset_d, bw)
    x32 = _as_f32(x, "fake_quantize_activation input")
    k = _activation_codes_f32(x32, quant_multiplier(s), *code_bounds(bw, off))
    k *= s
    return k


def activation_grid_bounds(scale_d: npt.ArrayLike, offset_d: npt.ArrayLike,
                           num_bits: int = DEFAULT_BITS) -> tuple[np.float32, np.float32]:
    """The ends of the ``num_bits`` activation grid of ``(scale_d, offset_d)``, as the float32 values
    ``fake_quantize_activation`` outputs there: ``(code_min - offset_d) * scale_d`` and
    ``(code_max - offset_d) * scale_d``. An input outside them is clipped."""
    bw = bit_width(num_bits)
    s = _positive_scale(scale_d, "scale_d")
    lo, hi = code_bounds(bw, _offset_code(offset_d, bw))
    return lo * s, hi * s


# --------------------------------------------------------------------------- ULQ


def _valid_clip_pair(cmin: float, cmax: float) -> bool:
    # Contract: invalid if max <= min, max < 0 or min > 0. NaN/Inf clips (a diverged
    # solver) are invalid too; the comparisons below are False for NaN.
    return math.isfinite(cmin) and math.isfinite(cmax) and cmin < cmax and cmax >= 0 and cmin <= 0


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

    if not (_valid_clip_pair(cmin, cmax) and (not fixed_min or cmax > 0)):
        if last_valid is None:
            raise NumericsError(
                f"ULQ clips invalid (clip_min {cmin!r}, clip_max {cmax!r}; need min <= 0 <= max, "
                f"min < max{', max > 0 with fixed_min' if fixed_min else ''}) and no earlier valid pair")
        lmin, lmax = float(last_valid[0]), float(last_valid[1])
        if not (_valid_clip_pair(lmin, lmax) and (not fixed_min or lmax > 0)):
            raise NumericsError(f"ULQ last valid clip pair ({lmin!r}, {lmax!r}) is itself invalid")
        logger.debug("ULQ clips (%r, %r) invalid; using last valid (%r, %r)", cmin, cmax, lmin, lmax)
        cmin, cmax = lmin, lmax
    if fixed_min:
        cmin = 0.0
    return cmin, cmax


def ulq_scale_offset(clip_min: npt.ArrayLike, clip_max: npt.ArrayLike,
                     num_bits: int = DEFAULT_BITS) -> tuple[np.float32, int]:
    """ULQ's grid ``s * o .. s * (o + L)`` from a sanitised clip pair, ``L = 2**num_bits - 1``
    steps (255 at 8 bits).

    ``s = float32((max - min) / L)`` and ``o = rint(min / s)`` (``min / s`` as the
    float64 ratio ``L * min / (max - min)``); this is
    ``scale_offset_from_range`` with ``o = -offset_d - 2**(num_bits-1)`` (see
    ``ulq_to_deploy_offset``), including its widening of a degenerate range.

    Args:
        clip_min, clip_max: a pair from ``ulq_sanitize_clips`` (min <= 0 <= max).
        num_bits: the bit width, 2..8.

    Returns:
        ``(s, o)``: s a positive normal np.float32, o a python int in [-L, 0].

    Raises:
        NumericsError: the pair does not contain 0 (it was not sanitised).
    """
    s, o, _ = _ulq_grid_ratio(clip_min, clip_max, num_bits)
    return s, o


def _ulq_grid_ratio(clip_min: npt.ArrayLike, clip_max: npt.ArrayLike, num_bits: int) -> tuple[np.float32, int, float]:
    """:func:`ulq_scale_offset`'s ``(s, o)`` and ``min / s`` unrounded (for D(min)), from one
    ``_range_factors`` call: what ULQ's forward and backward pass need of a clip pair."""
    cmin = _scalar(clip_min, "clip_min")
    cmax = _scalar(clip_max, "clip_max")
    if not cmin <= 0.0 <= cmax:
        raise NumericsError(
            f"ULQ clips ({cmin!r}, {cmax!r}) do not contain 0: pass them through ulq_sanitize_clips")
    s, offset_d, rmin = _range_factors(cmin, cmax, num_bits)
    return s, bit_width(num_bits).code_min - offset_d, rmin


def ulq_to_deploy_offset(o: int, num_bits: int = DEFAULT_BITS) -> int:
    """The deploy ``offset_d`` equivalent to ULQ's grid offset ``o``: ``-o - 2**(num_bits-1)``
    (``-o - 128`` at 8 bits)."""
    bw = bit_width(num_bits)
    o_int = int(o)
    if not -bw.levels <= o_int <= 0:
        raise NumericsError(f"ULQ grid offset o must lie in [{-bw.levels}, 0] at {bw.bits} bits, got {o!r}")
    return bw.code_min - o_int


def ulq_deploy_factors(clip_min: npt.ArrayLike, clip_max: npt.ArrayLike,
                       num_bits: int = DEFAULT_BITS) -> tuple[np.float32, int]:
    """``(scale_d, offset_d)`` for the record/deploy model from a sanitised ULQ clip pair.

    ``fake_quantize_activation(x, scale_d, offset_d, num_bits)`` equals
    ``ulq_forward(x, min, max, num_bits)``.
    """
    s, o = ulq_scale_offset(clip_min, clip_max, num_bits)
    return s, ulq_to_deploy_offset(o, num_bits)


def ulq_bounds(s: np.float32, o: int, num_bits: int = DEFAULT_BITS) -> tuple[np.float32, np.float32]:
    """The ends ``(s*o, s*(o+L))`` of ULQ's grid exactly as the forward pass produces them
    (``k * s`` in float32), ``L = 2**num_bits - 1``."""
    return np.float32(o) * s, np.float32(o + bit_width(num_bits).levels) * s


def ulq_forward(x: npt.ArrayLike, clip_min: npt.ArrayLike, clip_max: npt.ArrayLike,
                num_bits: int = DEFAULT_BITS) -> npt.NDArray[np.float32]:
    """ULQ forward: ``y = rint(clamp(x, s*o, s*(o+L)) / s) * s``, ``L = 2**num_bits - 1``.

    Computed as ``k = clip(rint(x / s), o, o + L)``, ``y = k * s`` in float32, which
    equals the formula above and ``fake_quantize_activation(x, s, -o - 2**(b-1), b)`` bit for bit.

    Args:
        x: activations, any shape, converted to float32; must be finite.
        clip_min, clip_max: a pair from ``ulq_sanitize_clips``.
        num_bits: the bit width b, 2..8.

    Returns:
        float32 array of x's shape.
    """
    levels = bit_width(num_bits).levels
    s, o = ulq_scale_offset(clip_min, clip_max, num_bits)
    x32 = _as_f32(x, "ulq_forward input")
    k = _activation_codes_f32(x32, quant_multiplier(s), np.float32(o), np.float32(o + levels))
    k *= s
    return k


def ulq_backward(x: npt.ArrayLike, grad_y: npt.ArrayLike, clip_min: npt.ArrayLike, clip_max: npt.ArrayLike,
                 num_bits: int = DEFAULT_BITS) -> tuple[npt.NDArray[np.float32], float, float]:
    """ULQ backward (contract section 3), at ``num_bits`` b with ``L = 2**b - 1`` (255 at 8 bits).

    To x: straight-through where ``s*o <= x <= s*(o+L)``, zero elsewhere. To the
    clips, summed over elements, with ``D(v) = (rint(v/s) - v/s) / L``:

    * inside: ``dmax += g*D(x)``, ``dmin -= g*D(x)``
    * above:  ``dmax += g*(D(min) + 1)``, ``dmin -= g*D(min)``
    * below:  ``dmax += g*D(min)``, ``dmin += g*(1 - D(min))``

    ``x/s`` for D(x) is the float32 quotient of the forward pass; ``min/s`` for
    D(min) is the float64 ratio ``L * min / (max - min)`` that also gives the grid
    offset ``o = rint(min/s)`` (see ``scale_offset_from_range``). Sums are accumulated in float64
    (the constant per-region factors are applied to the region's gradient sum).

    Args:
        x: the forward input, any shape (float32); must be finite.
        grad_y: gradient of the loss w.r.t. ``ulq_forward(x, ...)``, x's shape; finite.
        clip_min, clip_max: the same sanitised pair as the forward pass.
        num_bits: the bit width b of the forward pass.

    Returns:
        ``(grad_x, grad_clip_min, grad_clip_max)``: grad_x float32 of x's shape, the
        clip gradients python floats.
    """
    s, o, rmin = _ulq_grid_ratio(clip_min, clip_max, num_bits)
    x32 = _as_f32(x, "ulq_backward input")
    g32 = _as_f32(grad_y, "ulq_backward gradient")
    if g32.shape != x32.shape:
        raise NumericsError(f"ulq_backward: grad_y shape {g32.shape} != x shape {x32.shape}")
    lo, hi = ulq_bounds(s, o, num_bits)
    above = x32 > hi
    below = x32 < lo
    inside = ~(above | below)

    grad_x = np.where(inside, g32, np.float32(0)).astype(np.float32, copy=False)

    r = x32 / s  # float32, as in the forward pass
    dnum = np.rint(r) - r  # exact in float32 (Sterbenz)
    # float64 sums with one float64 temporary (this runs every iteration): grad_x is g inside
    # and 0 elsewhere. No BLAS call here: numpy's BLAS threads would fight Caffe's for the cores.
    sum_in = float(np.multiply(grad_x, dnum, dtype=np.float64).sum())
    sum_above = float(np.sum(g32, where=above, dtype=np.float64))
    sum_below = float(np.sum(g32, where=below, dtype=np.float64))
    return (grad_x, *ulq_clip_gradients(sum_in, sum_above, sum_below, rmin, num_bits))


def ulq_clip_gradients(sum_in: float, sum_above: float, sum_below: float, rmin: float,
                       num_bits: int = DEFAULT_BITS) -> tuple[float, float]:
    """``(grad_clip_min, grad_clip_max)`` of ULQ (contract section 3) from the pass's three float64
    sums: ``sum_in`` of g * (rint(x/s) - x/s) over the inputs inside the grid, ``sum_above`` and
    ``sum_below`` of g over those above and below it; ``rmin`` is min / s unrounded (the third value
    of ``_range_factors``), so that ``D(min) = (rint(rmin) - rmin) / L``."""
    levels = bit_width(num_bits).levels
    sum_in_d = sum_in / levels
    d_min = (float(round(rmin)) - rmin) / levels  # round: half to even, as np.rint, without an array
    grad_max = sum_in_d + sum_above * (d_min + 1.0) + sum_below * d_min
    grad_min = -sum_in_d - sum_above * d_min + sum_below * (1.0 - d_min)
    return float(grad_min), float(grad_max)


def fraction_clipped(x: npt.ArrayLike, clip_min: npt.ArrayLike, clip_max: npt.ArrayLike,
                     num_bits: int = DEFAULT_BITS) -> float:
    """Share of elements of ``x`` outside ULQ's grid ``[s*o, s*(o+L)]`` (0.0 for empty x).

    Args:
        x: activations, any shape (float32); must be finite.
        clip_min, clip_max: a sanitised pair.
        num_bits: the bit width, 2..8 (L = 2**num_bits - 1).
    """
    s, o = ulq_scale_offset(clip_min, clip_max, num_bits)
    x32 = _as_f32(x, "fraction_clipped input")
    if x32.size == 0:
        return 0.0
    lo, hi = ulq_bounds(s, o, num_bits)
    n_out = np.count_nonzero(x32 < lo) + np.count_nonzero(x32 > hi)
    return float(n_out) / float(x32.size)
