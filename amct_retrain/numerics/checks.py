"""Shared pieces of the numerics: the integer ranges, the errors, argument checks and the
float32 grid rounding every weight path uses."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from amct_retrain.errors import NumericsError


INT8_MIN, INT8_MAX = -128, 127
INT16_MIN, INT16_MAX = -32768, 32767
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
SHIFT_BITS = range(1, 17)
#: The bit widths of activations and weights the toolkit quantizes to; 8 is the default and the
#: contract's int8. Every width's codes fit the deploy format's int8 containers.
BITS_RANGE = range(2, 9)
DEFAULT_BITS = 8

#: Width given to an activation range whose scale would not be a positive normal
#: float32 (a layer that saw only zeros). A unit width rather than the smallest
#: normal one keeps ``1/scale_d`` (the Quant layer's parameter) and
#: ``bias / (scale_d * scale_w)`` (the int32 bias) far from overflow for such a layer.
DEGENERATE_RANGE_WIDTH = 1.0

_F32_TINY = float(np.finfo(np.float32).tiny)  # smallest positive normal float32
_F32_MAX = float(np.finfo(np.float32).max)
_F32_EPS = np.float32(np.finfo(np.float32).eps)


class NonFiniteError(NumericsError):
    """An array that must be finite holds NaN or Inf values."""


class BiasOverflowError(NumericsError):
    """A quantized bias does not fit int32; the layer must be skipped."""


# --------------------------------------------------------------------------- bit width


@dataclass(frozen=True)
class BitWidth:
    """The integer ranges of a ``bits``-bit quantization, the one place every quantizer reads them.

    Activations (asymmetric): codes ``q`` and offsets ``offset_d`` in ``[code_min, code_max]``,
    ``scale_d = (max - min) / levels``, ULQ's grid has ``levels`` steps between the clips.
    Weights (ARQ, symmetric): codes in ``[code_min, code_max]``, ``scale_w = a / code_max``
    (a > 0) or ``a / code_min``. At 8 bits: levels 255, codes -128..127 (contract section 3).
    The ranges are fields, computed once: the layers read them on every call.
    """
    bits: int
    #: ``2**bits - 1``: the steps between the ends of the grid.
    levels: int = field(init=False)
    #: ``-2**(bits-1)``: the smallest signed code.
    code_min: int = field(init=False)
    #: ``2**(bits-1) - 1``: the largest signed code.
    code_max: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", 2 ** self.bits - 1)
        object.__setattr__(self, "code_min", -(2 ** (self.bits - 1)))
        object.__setattr__(self, "code_max", 2 ** (self.bits - 1) - 1)


def bit_width(num_bits: int = DEFAULT_BITS) -> BitWidth:
    """The :class:`BitWidth` of ``num_bits``, an int in 2..8.

    Raises:
        NumericsError: num_bits is not an int in 2..8.
    """
    if type(num_bits) is int and num_bits in BITS_RANGE:  # the layers' hot path
        return _bit_widths(num_bits)
    if isinstance(num_bits, bool) or not isinstance(num_bits, (int, np.integer)) or num_bits not in BITS_RANGE:
        raise NumericsError(f"bit width (num_bits) must be an integer in {BITS_RANGE.start}..{BITS_RANGE.stop - 1}, "
                            f"got {num_bits!r}")
    return _bit_widths(int(num_bits))


@functools.cache
def _bit_widths(num_bits: int) -> BitWidth:
    return BitWidth(num_bits)


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


class errors_named:  # noqa: N801 - used as a function: ``with errors_named(who):``
    """Prefix ``who`` (e.g. "ActivationULQ layer 'conv1_ulq'") to any NumericsError raised in
    the block, so a caller names itself without checking its arrays a second time. A class, not a
    contextlib generator: the layers enter one per call, and the generator's entry and exit cost
    more than a small layer's kernel."""
    __slots__ = ("who",)

    def __init__(self, who: str) -> None:
        self.who = who

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is not None and issubclass(exc_type, NumericsError):
            raise exc_type(f"{self.who}: {exc}") from None


def _scalar(v: npt.ArrayLike, what: str, finite: bool = True) -> float:
    """A python float from a number or a size-1 array (Caffe blobs are (1,)); finite if asked."""
    if type(v) is float:  # the layers' hot path: no array round trip
        if finite and not math.isfinite(v):
            raise NonFiniteError(f"{what}: value is NaN/Inf ({v})")
        return v
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


def _offset_code(v: npt.ArrayLike, bw: BitWidth, what: str = "offset_d") -> int:
    """An activation offset checked to be a code of ``bw``: an integer in [code_min, code_max]."""
    f = _scalar(v, what)
    if f != round(f) or not bw.code_min <= f <= bw.code_max:
        raise NumericsError(f"{what}: must be an integer in [{bw.code_min}, {bw.code_max}] "
                            f"({bw.bits}-bit codes), got {f!r}")
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
