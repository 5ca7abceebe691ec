"""Integer arithmetic of the quantized layers: exact accumulators (matmul, convolution,
deconvolution, window sums), shift-N search and requantisation, the global-conv rule and the
DeQuant layer's deq_scale packing."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from amct_retrain.errors import NumericsError
from amct_retrain.numerics.checks import (
    INT16_MAX, INT16_MIN, INT8_MAX, INT8_MIN, SHIFT_BITS, _channel_shape, _int_vector, _norm_axis, _per_channel,
    _positive_scale, _shift_vector, check_finite,
)
from amct_retrain.numerics.arq import deq_scales

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
    out: np.ndarray | None = None
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
    assert out is not None  # group >= 1
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


def conv_output_hw(in_hw: Sequence[int], geometry: dict, transposed: bool = False) -> list[int]:
    """Caffe's output height and width of a Convolution, or of a Deconvolution (``transposed``),
    of ``geometry`` (a ``ConvGeometry.__dict__``, as the layers receive it in param_str)."""
    out = []
    for size, pad, k, d, stride in zip(in_hw, geometry["pad"], geometry["kernel"], geometry["dilation"],
                                       geometry["stride"]):
        extent = (k - 1) * d + 1
        out.append(stride * (size - 1) + extent - 2 * pad if transposed else (size + 2 * pad - extent) // stride + 1)
    return out



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
