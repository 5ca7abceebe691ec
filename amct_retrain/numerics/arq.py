"""ARQ symmetric weight quantization, the int32 bias and the deq scales."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from amct_retrain.errors import NumericsError
from amct_retrain.numerics.checks import (
    DEFAULT_BITS, INT32_MAX, INT32_MIN, _F32_EPS, BiasOverflowError, _as_f32, _channel_shape, _grid_f32, _norm_axis,
    _per_channel, _positive_scale, bit_width, check_finite,
)


# --------------------------------------------------------------------------- ARQ weights


def arq_scale(w: npt.ArrayLike, channel_axis: int | None, num_bits: int = DEFAULT_BITS) -> npt.NDArray[np.float32]:
    """ARQ symmetric weight scales, ``offset_w = 0``.

    Per channel (or per tensor): ``a`` = the one of max/min with the larger magnitude
    (max on a tie); ``scale_w = a/127`` if ``a > 0`` else ``a/-128`` (float32
    division; at ``num_bits`` b: ``a/(2**(b-1) - 1)`` and ``a/-2**(b-1)``); a scale below
    float32 eps (incl. an all-zero channel) becomes 1.

    Args:
        w: weights (float32), non-empty, finite. Convolution filters are
            (C_out, C_in/g, kh, kw), Deconvolution (C_in, C_out/g, kh, kw).
        channel_axis: 0 for Convolution, 1 for Deconvolution, None for per tensor.
        num_bits: the bit width, 2..8.

    Returns:
        float32 array of shape (w.shape[channel_axis],), or (1,) when None.
    """
    bw = bit_width(num_bits)
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
    scale = np.where(a > 0, a / np.float32(bw.code_max), a / np.float32(bw.code_min)).astype(np.float32)
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


def arq_quantize(w: npt.ArrayLike, scale_w: npt.ArrayLike, channel_axis: int | None,
                 num_bits: int = DEFAULT_BITS) -> npt.NDArray[np.int8]:
    """``clamp(rint(w / scale_w), -128, 127)`` with scale_w broadcast on channel_axis; at
    ``num_bits`` b the clamp is to ``[-2**(b-1), 2**(b-1) - 1]`` (codes held in int8).

    Args:
        w: weights (float32), any shape, finite.
        scale_w: (C,) or (1,) positive float32 scales (from ``arq_scale``).
        channel_axis: the channel axis of w, or None for a per-tensor scale.
        num_bits: the bit width, 2..8.

    Returns:
        int8 array of w's shape.
    """
    w32 = _as_f32(w, "arq_quantize weights")
    s = _weight_scale_b(w32, scale_w, channel_axis)
    return _grid_f32(w32, s, *weight_code_bounds(num_bits)).astype(np.int8)


def weight_code_bounds(num_bits: int = DEFAULT_BITS) -> tuple[np.float32, np.float32]:
    """float32 ``(-2**(b-1), 2**(b-1) - 1)``: the codes of ``num_bits`` b weights."""
    bw = bit_width(num_bits)
    return np.float32(bw.code_min), np.float32(bw.code_max)


def arq_fake_quantize(w: npt.ArrayLike, scale_w: npt.ArrayLike, channel_axis: int | None,
                      num_bits: int = DEFAULT_BITS) -> npt.NDArray[np.float32]:
    """``arq_quantize(w, scale_w, channel_axis, num_bits) * scale_w`` in float32 (w's shape)."""
    w32 = _as_f32(w, "arq_fake_quantize weights")
    s = _weight_scale_b(w32, scale_w, channel_axis)
    k = _grid_f32(w32, s, *weight_code_bounds(num_bits))
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
