"""Unit and property tests of amct_retrain.numerics (contract section 3). No Caffe."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from amct_retrain import numerics as nq
from amct_retrain.numerics.ifmr import _ifmr_candidates

F32 = np.float32
TINY = float(np.finfo(np.float32).tiny)
FAST = settings(max_examples=60, deadline=None)

# Finite float32 activations of moderate size (what a layer sees), any 1-3-D shape.
act_arrays = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=12),
    elements=st.floats(-1e3, 1e3, width=32, allow_nan=False, allow_infinity=False))
# Range bounds, including zero, subnormal and tiny values.
bounds = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
    st.floats(-1e-36, 1e-36, allow_nan=False, allow_infinity=False),
    st.just(0.0))


def ordered(a: float, b: float) -> tuple[float, float]:
    return (a, b) if a <= b else (b, a)


def is_positive_normal_f32(s) -> bool:
    return isinstance(s, np.float32) and bool(np.isfinite(s)) and float(s) >= TINY


def assert_on_grid(y: np.ndarray, scale: np.float32, k_lo: int, k_hi: int, what: str) -> None:
    k = np.rint(y.astype(np.float64) / np.float64(scale))
    back = (k.astype(np.float32) * scale).astype(np.float32)
    assert np.array_equal(back, y), f"{what}: values are not integer multiples k*scale of scale {scale!r}"
    assert k.size == 0 or (k.min() >= k_lo and k.max() <= k_hi), \
        f"{what}: grid indices {k.min()}..{k.max()} outside [{k_lo}, {k_hi}]"


# --------------------------------------------------------------------------- constants, finiteness


def test_constants():
    assert (nq.INT8_MIN, nq.INT8_MAX, nq.INT16_MIN, nq.INT16_MAX) == (-128, 127, -32768, 32767), \
        "integer limits are wrong"
    assert list(nq.SHIFT_BITS) == list(range(1, 17)), "SHIFT_BITS must be 1..16"
    assert issubclass(nq.NonFiniteError, nq.NumericsError) and issubclass(nq.BiasOverflowError, nq.NumericsError) \
        and issubclass(nq.NumericsError, ValueError), "error hierarchy is wrong"


def test_check_finite_names_what_and_counts():
    with pytest.raises(nq.NonFiniteError) as ei:
        nq.check_finite(np.array([1.0, np.nan, np.inf, 2.0], dtype=F32), "layer 'conv1' input")
    msg = str(ei.value)
    assert "layer 'conv1' input" in msg, f"message does not name the data: {msg}"
    assert "2 of 4" in msg and "NaN/Inf" in msg, f"message does not count the bad values: {msg}"
    nq.check_finite(np.arange(5), "ints")  # integers are always finite
    nq.check_finite(np.zeros((2, 3), F32), "zeros")


@pytest.mark.parametrize("call", [
    lambda x: nq.quantize_activation(x, 0.1, 0),
    lambda x: nq.fake_quantize_activation(x, 0.1, 0),
    lambda x: nq.ulq_forward(x, -1.0, 1.0),
    lambda x: nq.ifmr_search(x),
    lambda x: nq.arq_scale(x, None),
    lambda x: nq.search_shift_bits(x.reshape(1, -1), [0.1]),
])
def test_nan_input_raises(call):
    x = np.array([0.5, np.nan, 1.0], dtype=F32)
    with pytest.raises(nq.NonFiniteError, match="NaN"):
        call(x)


# --------------------------------------------------------------------------- activation factors


def test_scale_offset_hand_cases():
    s, o = nq.scale_offset_from_range(0.0, 2.55)
    assert s == F32(0.01) and o == -128, f"[0, 2.55] should give (0.01, -128), got ({s!r}, {o})"
    s, o = nq.scale_offset_from_range(-1.0, 1.0)
    # -1/(2/255) = -127.5 and rint(-127.5) = -128 (half to even), so offset = 128 - 128 = 0.
    assert s == F32(2.0 / 255.0) and o == 0, f"[-1, 1] should give (2/255, 0), got ({s!r}, {o})"
    s, o = nq.scale_offset_from_range(-2.55, 0.0)
    assert s == F32(0.01) and o == 127, f"[-2.55, 0] should give (0.01, 127), got ({s!r}, {o})"
    s, o = nq.scale_offset_from_range(0.5, 2.55)  # widened to [0, 2.55]
    assert s == F32(0.01) and o == -128, f"[0.5, 2.55] must widen to contain 0, got ({s!r}, {o})"
    assert isinstance(s, np.float32) and isinstance(o, int), "scale must be np.float32 and offset int"


def test_scale_offset_zero_width_is_widened():
    s, o = nq.scale_offset_from_range(0.0, 0.0)
    assert is_positive_normal_f32(s), f"zero-width range gave a bad scale {s!r}"
    assert s == F32(nq.DEGENERATE_RANGE_WIDTH / 255.0) and o == -128, \
        f"zero-width range should become [0, {nq.DEGENERATE_RANGE_WIDTH}], got ({s!r}, {o})"


def test_scale_offset_errors():
    with pytest.raises(nq.NumericsError, match="reversed"):
        nq.scale_offset_from_range(1.0, -1.0)
    with pytest.raises(nq.NonFiniteError):
        nq.scale_offset_from_range(float("nan"), 1.0)
    with pytest.raises(nq.NumericsError, match="too wide"):
        nq.scale_offset_from_range(-1e300, 1e300)


@FAST
@given(bounds, bounds)
def test_scale_offset_always_valid(a, b):
    lo, hi = ordered(a, b)
    s, o = nq.scale_offset_from_range(lo, hi)
    assert is_positive_normal_f32(s), f"range [{lo!r}, {hi!r}] gave scale {s!r}, not a positive normal float32"
    assert -128 <= o <= 127, f"range [{lo!r}, {hi!r}] gave offset {o} outside int8"
    assert np.isfinite(F32(1) / s), f"1/scale overflows float32 for range [{lo!r}, {hi!r}]"


@FAST
@given(st.floats(0.01, 1e4), st.floats(0.0, 1.0))
def test_scale_offset_grid_covers_range(width, frac_neg):
    lo, hi = -width * frac_neg, width * (1.0 - frac_neg)
    s, o = nq.scale_offset_from_range(lo, hi)
    grid_lo, grid_hi = (-128 - o) * float(s), (127 - o) * float(s)
    tol = float(s) * 0.5 + 1e-6 * width
    assert grid_lo <= lo + tol and grid_hi >= hi - tol, \
        f"grid [{grid_lo}, {grid_hi}] does not cover [{lo}, {hi}] to half a step"
    assert grid_lo <= 0.0 <= grid_hi, "grid must contain 0"


def test_quantize_activation_hand_case():
    x = np.array([0.0, 0.125, 0.375, 0.625, 100.0, -1.0], dtype=F32)
    q = nq.quantize_activation(x, 0.25, -128)
    # x/s = 0, 0.5, 1.5, 2.5, 400, -4  ->  rint (half to even) 0, 0, 2, 2, 400, -4  -> +offset, clamp
    expected = np.array([-128, -128, -126, -126, 127, -128], dtype=np.int8)
    assert q.dtype == np.int8, f"quantize_activation must return int8, got {q.dtype}"
    assert np.array_equal(q, expected), f"expected {expected}, got {q}"


def test_dequantize_no_int8_wraparound():
    q = np.array([-128, 0, 127], dtype=np.int8)
    y = nq.dequantize_activation(q, 0.5, -128)
    assert y.dtype == np.float32, f"dequantize must return float32, got {y.dtype}"
    assert np.array_equal(y, np.array([0.0, 64.0, 127.5], F32)), f"(q + 128) * 0.5 wrong: {y}"


def test_activation_argument_checks():
    with pytest.raises(nq.NumericsError, match="offset_d"):
        nq.quantize_activation(np.zeros(2, F32), 0.1, 128)
    with pytest.raises(nq.NumericsError, match="scale"):
        nq.fake_quantize_activation(np.zeros(2, F32), 0.0, 0)
    with pytest.raises(nq.NumericsError, match="integers"):
        nq.dequantize_activation(np.zeros(2, F32), 0.1, 0)


def test_scalar_input_gives_array():
    y = nq.fake_quantize_activation(F32(0.3), 0.1, 0)
    assert isinstance(y, np.ndarray) and y.shape == (), f"0-d input should give a 0-d array, got {y!r}"


@FAST
@given(act_arrays, st.floats(-50, 0), st.floats(0, 50))
def test_fake_quant_on_grid_idempotent_and_consistent(x, lo, hi):
    s, o = nq.scale_offset_from_range(lo, hi)
    y = nq.fake_quantize_activation(x, s, o)
    assert y.dtype == np.float32 and y.shape == x.shape, "fake quant must keep shape and be float32"
    assert_on_grid(y, s, -128 - o, 127 - o, "fake_quantize_activation")
    y2 = nq.fake_quantize_activation(y, s, o)
    assert np.array_equal(y, y2), "fake quantization is not idempotent"
    q = nq.quantize_activation(x, s, o)
    assert np.array_equal(nq.dequantize_activation(q, s, o), y), \
        "fake_quantize differs from dequantize(quantize())"
    ref = np.clip(np.rint(x / s) + F32(o), -128, 127)
    assert np.array_equal(q.astype(F32), ref), "quantize differs from the literal contract formula"


# --------------------------------------------------------------------------- ULQ


def test_ulq_sanitize_rules():
    last = (-2.0, 3.0)
    assert nq.ulq_sanitize_clips(-1.0, 1.0, None, False) == (-1.0, 1.0), "a valid pair must pass through"
    for bad in [(1.0, 1.0), (2.0, 1.0), (-3.0, -1.0), (0.5, 2.0), (float("nan"), 1.0), (-1.0, float("inf"))]:
        assert nq.ulq_sanitize_clips(*bad, last, False) == last, f"{bad} should fall back to {last}"
        with pytest.raises(nq.NumericsError, match="no earlier valid"):
            nq.ulq_sanitize_clips(*bad, None, False)
    assert nq.ulq_sanitize_clips(-1.0, 1.0, last, True) == (0.0, 1.0), "fixed_min must pin min to 0"
    # min > 0 is invalid: fall back first, then pin.
    assert nq.ulq_sanitize_clips(0.5, 2.0, last, True) == (0.0, 3.0), "fixed_min: fallback before pinning"
    # (-1, 0) pinned would have zero width: fall back.
    assert nq.ulq_sanitize_clips(-1.0, 0.0, last, True) == (0.0, 3.0), "fixed_min: zero width after pinning"
    out = nq.ulq_sanitize_clips(np.array([-1.0], F32), np.array([2.0], F32), None, False)
    assert out == (-1.0, 2.0) and all(type(v) is float for v in out), f"blobs of shape (1,) -> floats, got {out}"


def test_ulq_scale_offset_and_deploy_relation():
    s, o = nq.ulq_scale_offset(-1.0, 1.0)
    assert s == F32(2 / 255) and o == -128, f"[-1, 1]: expected (2/255, -128), got ({s!r}, {o})"
    assert nq.ulq_to_deploy_offset(o) == 0 and nq.ulq_deploy_factors(-1.0, 1.0) == (s, 0), \
        "deploy offset must be -o - 128"
    s, o = nq.ulq_scale_offset(0.0, 6.0)
    assert o == 0 and nq.ulq_deploy_factors(0.0, 6.0)[1] == -128, "fixed_min range: o = 0, offset_d = -128"
    with pytest.raises(nq.NumericsError, match="sanitize"):
        nq.ulq_scale_offset(0.5, 1.0)


def ulq_literal(x: np.ndarray, s: np.float32, o: int) -> np.ndarray:
    lo, hi = F32(o) * s, F32(o + 255) * s
    return (np.rint(np.clip(x, lo, hi) / s) * s).astype(F32)


@FAST
@given(act_arrays, st.floats(-50, 0), st.floats(0, 50))
def test_ulq_forward_matches_literal_and_deploy(x, cmin, cmax):
    assume(cmax > cmin)
    s, o = nq.ulq_scale_offset(cmin, cmax)
    y = nq.ulq_forward(x, cmin, cmax)
    assert np.array_equal(y, ulq_literal(x, s, o)), "ulq_forward differs from the contract formula"
    sd, od = nq.ulq_deploy_factors(cmin, cmax)
    assert np.array_equal(y, nq.fake_quantize_activation(x, sd, od)), \
        "ulq_forward differs from fake_quantize_activation with the deploy factors"
    assert_on_grid(y, s, o, o + 255, "ulq_forward")


# Clips [-31.875, 31.875]: s = 0.25, min/s = -127.5 -> o = -128, grid [-32, 31.75],
# D(min) = (-128 + 127.5)/255 = -0.5/255.
CMIN, CMAX, DMIN = -31.875, 31.875, -0.5 / 255


def test_ulq_backward_inside_hand():
    x = np.array([0.375, -1.125, 1.0, 31.75, -32.0], F32)  # x/s = 1.5, -4.5, 4, 127, -128
    g = np.array([1.0, 2.0, 3.0, 4.0, 5.0], F32)
    gx, gmin, gmax = nq.ulq_backward(x, g, CMIN, CMAX)
    # D(x) = (2 - 1.5)/255, (-4 + 4.5)/255, 0, 0, 0
    expected = (1 * 0.5 + 2 * 0.5) / 255
    assert np.array_equal(gx, g), f"inside (grid ends included) grad_x must be g, got {gx}"
    assert gmax == pytest.approx(expected, rel=1e-12), f"inside dmax: expected {expected}, got {gmax}"
    assert gmin == pytest.approx(-expected, rel=1e-12), f"inside dmin: expected {-expected}, got {gmin}"


def test_ulq_backward_above_hand():
    x = np.array([40.0, 31.875], F32)
    g = np.array([1.0, 2.0], F32)
    gx, gmin, gmax = nq.ulq_backward(x, g, CMIN, CMAX)
    assert np.array_equal(gx, np.zeros(2, F32)), f"above: grad_x must be 0, got {gx}"
    assert gmax == pytest.approx(3 * (DMIN + 1), rel=1e-12), f"above dmax: expected {3 * (DMIN + 1)}, got {gmax}"
    assert gmin == pytest.approx(-3 * DMIN, rel=1e-12), f"above dmin: expected {-3 * DMIN}, got {gmin}"


def test_ulq_backward_below_hand():
    x = np.array([-40.0], F32)
    g = np.array([2.0], F32)
    gx, gmin, gmax = nq.ulq_backward(x, g, CMIN, CMAX)
    assert np.array_equal(gx, np.zeros(1, F32)), f"below: grad_x must be 0, got {gx}"
    assert gmax == pytest.approx(2 * DMIN, rel=1e-12), f"below dmax: expected {2 * DMIN}, got {gmax}"
    assert gmin == pytest.approx(2 * (1 - DMIN), rel=1e-12), f"below dmin: expected {2 * (1 - DMIN)}, got {gmin}"


def test_ulq_backward_types_and_shape_check():
    gx, gmin, gmax = nq.ulq_backward(np.zeros((2, 3), F32), np.ones((2, 3), F32), -1.0, 1.0)
    assert gx.dtype == np.float32 and gx.shape == (2, 3), "grad_x must be float32 of x's shape"
    assert type(gmin) is float and type(gmax) is float, "clip gradients must be python floats"
    with pytest.raises(nq.NumericsError, match="shape"):
        nq.ulq_backward(np.zeros(3, F32), np.zeros(4, F32), -1.0, 1.0)


@FAST
@given(act_arrays, st.floats(-20, 0), st.floats(0.01, 20), st.data())
def test_ulq_backward_zero_outside(x, cmin, cmax, data):
    g = data.draw(hnp.arrays(np.float32, x.shape, elements=st.floats(-10, 10, width=32)))
    s, o = nq.ulq_scale_offset(cmin, cmax)
    lo, hi = F32(o) * s, F32(o + 255) * s
    gx, gmin, gmax = nq.ulq_backward(x, g, cmin, cmax)
    outside = (x < lo) | (x > hi)
    assert np.all(gx[outside] == 0), "grad_x must be exactly 0 outside the clip range"
    assert np.array_equal(gx[~outside], g[~outside]), "grad_x must pass g straight through inside"
    # Per-element reference sum (float64) of the contract's rules.
    r = x / s
    dx = (np.rint(r) - r).astype(np.float64) / 255
    rm = 255 * cmin / (cmax - cmin)
    dm = (np.rint(rm) - rm) / 255
    g64 = g.astype(np.float64)
    above, below = x > hi, x < lo
    inside = ~(above | below)
    ref_max = np.sum(g64 * np.where(inside, dx, np.where(above, dm + 1, dm)))
    ref_min = np.sum(g64 * np.where(inside, -dx, np.where(above, -dm, 1 - dm)))
    assert gmax == pytest.approx(ref_max, rel=1e-9, abs=1e-9), f"dmax {gmax} != reference {ref_max}"
    assert gmin == pytest.approx(ref_min, rel=1e-9, abs=1e-9), f"dmin {gmin} != reference {ref_min}"
    assert nq.fraction_clipped(x, cmin, cmax) == pytest.approx(outside.mean()), "fraction_clipped wrong"


def test_fraction_clipped_hand():
    x = np.array([-40.0, 0.0, 1.0, 31.75, 31.8], F32)
    assert nq.fraction_clipped(x, CMIN, CMAX) == 0.4, "2 of 5 values lie outside [-32, 31.75]"
    assert nq.fraction_clipped(np.zeros(0, F32), CMIN, CMAX) == 0.0, "empty input: 0"


# --------------------------------------------------------------------------- IFMR


def test_ifmr_candidates_are_exact():
    k = _ifmr_candidates(0.70, 1.30, 0.01)
    assert k.size == 61, f"expected 61 candidates, got {k.size}"
    assert k[0] == 0.7 and k[30] == 1.0 and k[60] == 1.3, f"drift in candidates: {k[[0, 30, 60]]}"
    assert np.array_equal(k, np.arange(70, 131) / 100), "candidates must be i/100 exactly"


def ifmr_brute_force(x: np.ndarray) -> tuple[float, float, float]:
    n = x.size
    flat = np.sort(x.reshape(-1))
    dmin = min(float(flat[int(np.floor((n - 1) * 1e-6))]), 0.0)
    dmax = max(float(flat[int(np.ceil((n - 1) * 0.999999))]), 0.0)
    best = None
    for i in range(70, 131):
        m = i / 100 * dmax
        s, o = nq.scale_offset_from_range(dmin, m)
        err = np.mean((nq.fake_quantize_activation(x, s, o).astype(np.float64) - x.astype(np.float64)) ** 2)
        if best is None or err < best[0]:
            best = (err, dmin, m)
    return best


def test_ifmr_matches_brute_force():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 8, 16)) * 3).astype(F32)
    lo, hi = nq.ifmr_search(x)
    err, bmin, bmax = ifmr_brute_force(x)
    assert (lo, hi) == (bmin, bmax), f"IFMR chose [{lo}, {hi}], brute force [{bmin}, {bmax}]"


def test_ifmr_relu_data_and_percentiles():
    rng = np.random.default_rng(1)
    x = np.maximum(rng.standard_normal(5000), 0).astype(F32)
    lo, hi = nq.ifmr_search(x)
    assert lo == 0.0, f"ReLU data must give clip_min 0, got {lo}"
    pmax = float(np.quantile(x, 0.999999, method="higher"))
    assert 0.7 * pmax <= hi <= 1.3 * pmax, f"clip_max {hi} outside [0.7, 1.3] x {pmax}"
    x = np.linspace(-5, 5, 2_000_001).astype(F32)  # large enough that the percentiles are not the extremes
    lo, hi = nq.ifmr_search(x, search_start=1.0, search_end=1.0)
    assert lo == float(np.quantile(x, 1e-6, method="lower")), "min must be numpy's 'lower' quantile"
    assert hi == float(np.quantile(x, 0.999999, method="higher")), "max must be numpy's 'higher' quantile"


def test_ifmr_all_zero_and_errors():
    lo, hi = nq.ifmr_search(np.zeros((3, 4), F32))
    assert np.isfinite(lo) and np.isfinite(hi) and hi > lo, f"all-zero input gave range [{lo}, {hi}]"
    assert (lo, hi) == (0.0, nq.DEGENERATE_RANGE_WIDTH), f"all zeros should widen to [0, 1], got [{lo}, {hi}]"
    lo, hi = nq.ifmr_search(np.full(10, -2.0, F32))
    assert (lo, hi) == (-2.0, 0.0), f"all-negative data should give [-2, 0], got [{lo}, {hi}]"
    with pytest.raises(nq.NumericsError, match="empty"):
        nq.ifmr_search(np.zeros(0, F32))
    with pytest.raises(nq.NumericsError):
        nq.ifmr_search(np.zeros(3, F32), min_percentile=0.9, max_percentile=0.1)


@settings(max_examples=30, deadline=None)
@given(act_arrays)
def test_ifmr_max_within_search_window(x):
    pmax = max(float(np.quantile(x, 0.999999, method="higher")), 0.0)
    pmin = min(float(np.quantile(x, 1e-6, method="lower")), 0.0)
    lo, hi = nq.ifmr_search(x)
    assert lo == pmin, f"clip_min {lo} != percentile min {pmin}"
    s, o = nq.scale_offset_from_range(lo, hi)
    assert is_positive_normal_f32(s), f"IFMR range [{lo}, {hi}] gives a bad scale {s!r}"
    if float(np.float32((pmax - pmin) / 255)) >= TINY:  # not a degenerate (widened) range
        assert 0.7 * pmax <= hi <= 1.3 * pmax, f"clip_max {hi} outside [0.7, 1.3] x {pmax}"


# --------------------------------------------------------------------------- ARQ


def test_arq_hand_cases():
    s = nq.arq_scale(np.array([-0.5, 0.25], F32), None)
    assert s.shape == (1,) and s.dtype == np.float32, f"per-tensor scale must be float32 (1,), got {s!r}"
    assert s[0] == F32(0.5 / 128), f"[-0.5, 0.25]: |min| wins, scale 0.5/128, got {s[0]!r}"
    w = np.zeros((3, 2, 1, 1), F32)
    w[0, :, 0, 0] = [1.27, -0.5]     # max wins: 1.27/127 = 0.01
    w[1, :, 0, 0] = [0.25, -0.25]    # tie: max wins, 0.25/127
    w[2, :, 0, 0] = [0.0, 0.0]       # all zero -> 1
    s = nq.arq_scale(w, 0)
    expected = np.array([F32(1.27) / F32(127), F32(0.25) / F32(127), 1.0], F32)
    assert np.array_equal(s, expected), f"per-channel scales: expected {expected}, got {s}"
    s = nq.arq_scale(np.full((2, 4), 1e-6, F32), None)
    assert s[0] == 1.0, f"a scale below float eps must become 1, got {s[0]!r}"
    deconv = np.zeros((2, 3, 1, 1), F32)
    deconv[:, 1] = 2.54
    s = nq.arq_scale(deconv, 1)
    assert s.shape == (3,) and s[1] == F32(2.54) / F32(127) and s[0] == 1.0, f"Deconvolution axis 1: {s}"
    q = nq.arq_quantize(np.array([-0.5, 0.25, 0.001953125, 0.005859375], F32), F32(0.00390625), None)
    # w/s = -128, 64, 0.5 -> 0, 1.5 -> 2
    assert np.array_equal(q, np.array([-128, 64, 0, 2], np.int8)), f"arq_quantize wrong: {q}"


def test_arq_scale_argument_checks():
    with pytest.raises(nq.NumericsError, match="1 or 3"):
        nq.arq_quantize(np.zeros((3, 2), F32), np.ones(2, F32), 0)
    with pytest.raises(nq.NumericsError, match="channel_axis"):
        nq.arq_scale(np.zeros((3, 2), F32), 2)


@FAST
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=4, max_side=5),
                  elements=st.floats(-10, 10, width=32)), st.sampled_from([None, 0, 1]))
def test_arq_grid_bounds_idempotent(w, axis):
    s = nq.arq_scale(w, axis)
    assert np.all(s >= np.finfo(F32).eps) and s.dtype == np.float32, f"bad scales {s}"
    q = nq.arq_quantize(w, s, axis)
    fq = nq.arq_fake_quantize(w, s, axis)
    sb = s if axis is None else s.reshape([-1 if i == axis else 1 for i in range(w.ndim)])
    assert np.array_equal(fq, (q.astype(F32) * sb).astype(F32)), "arq_fake_quantize != arq_quantize * scale"
    assert np.array_equal(nq.arq_fake_quantize(fq, s, axis), fq), "ARQ fake quantization is not idempotent"
    assert np.array_equal(q.astype(F32), np.clip(np.rint(w / sb), -128, 127)), "arq_quantize != contract formula"
    # The dominant extreme maps to +127 or -128 exactly. When min dominates (scale |min|/128),
    # a max of nearly the same magnitude may reach 128 and clip to 127: one step at most.
    k = np.rint(w / sb)
    assert k.min() >= -128 and k.max() <= 128, f"ARQ scale clips weights by more than one step: {k.min()}..{k.max()}"


# --------------------------------------------------------------------------- bias, deq


def test_quantize_bias_hand_and_broadcast():
    b = nq.quantize_bias(np.array([1.0, -2.5, 0.0125], F32), F32(0.5), np.array([0.5, 1.0, 0.01], F32), "fc")
    # 1/0.25 = 4; -2.5/0.5 = -5; 0.0125/(0.5*float32(0.01)) ~ 2.5 -> 2 (or 3 if below .5)
    expected = np.rint(np.float64(F32(0.0125)) / (0.5 * np.float64(F32(0.01))))
    assert b.dtype == np.int32 and list(b[:2]) == [4, -5] and b[2] == expected, f"bias wrong: {b}"
    b = nq.quantize_bias([1.0, 2.0], 0.25, [0.5], "fc")
    assert list(b) == [8, 16], f"length-1 scale_w must broadcast, got {b}"


def test_quantize_bias_overflow_names_layer():
    with pytest.raises(nq.BiasOverflowError) as ei:
        nq.quantize_bias(np.array([0.0, 1e3], F32), F32(1e-4), np.array([1e-4, 1e-4], F32), "conv5_2")
    msg = str(ei.value)
    assert "conv5_2" in msg and "channel 1" in msg and "skip_layers" in msg, f"unhelpful message: {msg}"
    with pytest.raises(nq.NonFiniteError, match="conv5_2"):
        nq.quantize_bias(np.array([np.nan], F32), 1.0, [1.0], "conv5_2")


def test_deq_scales():
    d = nq.deq_scales(F32(0.1), np.array([0.2, 0.3], F32))
    assert d.dtype == np.float32 and np.array_equal(d, np.array([F32(0.1) * F32(0.2), F32(0.1) * F32(0.3)], F32)), \
        f"deq must be the float32 product, got {d}"
    with pytest.raises(nq.NumericsError, match="positive"):
        nq.deq_scales(F32(TINY), np.array([1e-10], F32))


def test_unify_global_conv_scales():
    sd = F32(0.013)
    sw = np.array([0.003, 0.0041, 0.002], F32)
    new = nq.unify_global_conv_scales(sd, sw)
    deq_max = nq.deq_scales(sd, sw).max()
    assert new.dtype == np.float32 and new.shape == (3,) and np.all(new == new[0]), f"all channels equal: {new}"
    assert np.all(nq.deq_scales(sd, new) == deq_max), "rewritten scale_w must give deq_max back"
    assert new[0] == pytest.approx(float(deq_max) / float(sd), rel=1e-6), "scale_w != deq_max / scale_d"


# --------------------------------------------------------------------------- shift-N


def test_shift_known_answer():
    deq = np.full(2, 2.0**-10, F32)
    y = np.array([[1e6, 1000.0]], np.float64) * 2.0**-10  # accumulators 1e6 and 1000
    n = nq.search_shift_bits(y, deq)
    # 1e6 / 2^N fits int16 from N = 5 (31250, exact); 1000 is exact already at N = 1.
    assert n.dtype == np.uint32 and list(n) == [5, 1], f"expected shifts [5, 1], got {n}"
    assert list(nq.search_shift_bits(np.array([[3e6, 7.0]]) * 2.0**-10, deq[:1])) == [7, 1], \
        "3e6 needs N = 7 (3e6/64 = 46875 is too large), length-1 deq broadcasts"


def test_requantize_hand():
    acc = np.array([[1000, -1000, 3, 5, 10**7, -(10**7)]]).T  # (6, 1): channel axis 1
    t = nq.requantize(acc, [1])
    assert t.dtype == np.int32 and list(t[:, 0]) == [500, -500, 2, 2, 32767, -32768], \
        f"rint half to even and int16 clamp: got {t[:, 0]}"
    out = nq.requantized_output(acc, np.array([0.5], F32), [1])
    assert out.dtype == np.float32 and list(out[:, 0]) == [500.0, -500.0, 2.0, 2.0, 32767.0, -32768.0], \
        f"t * deq * 2^N wrong: {out[:, 0]}"
    with pytest.raises(nq.NumericsError, match="shift_bits"):
        nq.requantize(acc, [17])


def brute_shift(a: np.ndarray) -> int:
    errs = []
    for n in range(1, 17):
        t = np.clip(np.rint(a / 2.0**n), -32768, 32767)
        errs.append(float(np.sum((t * 2.0**n - a) ** 2)))
    return int(np.argmin(errs)) + 1, errs


@FAST
@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)),
                  elements=st.floats(-3e6, 3e6)),
       st.lists(st.sampled_from([2.0**-8, 0.01, 0.5, 3.0]), min_size=1, max_size=1))
def test_shift_is_brute_force_optimum(y, deq_val):
    c = y.shape[1]
    deq = np.full(c, deq_val[0], F32)
    errors = nq.accumulate_shift_errors(y, deq)
    n = nq.search_shift_bits(y, deq)
    assert errors.shape == (16, c) and errors.dtype == np.float64, f"errors shape {errors.shape}"
    for ch in range(c):
        a = y[:, ch, :] / np.float64(deq[ch])
        best, errs = brute_shift(a)
        assert n[ch] == best, f"channel {ch}: chose N={n[ch]}, brute force N={best}"
        assert np.allclose(errors[:, ch], errs, rtol=1e-9, atol=1e-9), f"channel {ch}: per-N errors differ"
    # Accumulating two halves of a batch gives the same choice as the whole batch.
    if y.shape[0] > 1:
        acc = nq.accumulate_shift_errors(y[:1], deq) + nq.accumulate_shift_errors(y[1:], deq)
        assert np.allclose(acc, errors, rtol=1e-12, atol=1e-9), "per-batch errors do not add up"


def test_choose_shift_ties_take_smallest():
    e = np.zeros((16, 2))
    e[:3, 1] = 1.0
    assert list(nq.choose_shift_bits(e)) == [1, 4], "ties must take the smallest N"
    with pytest.raises(nq.NumericsError, match="16"):
        nq.choose_shift_bits(np.zeros((15, 2)))


# --------------------------------------------------------------------------- deq packing


def test_pack_known_value():
    deq = np.array([0.0123, 1.5], F32)
    packed = nq.pack_deq_scale(deq, np.array([3, 16], np.uint32), np.array([0, -2]))
    f0 = struct.unpack("<I", struct.pack("<f", float(deq[0])))[0]
    assert struct.unpack("<I", struct.pack("<f", 1.5))[0] == 0x3FC00000, "struct sanity"
    expected = [f0 | (3 << 32) | (0 << 40), 0x3FC00000 | (16 << 32) | (0xFE << 40)]
    assert packed.dtype == np.uint64 and [int(v) for v in packed] == expected, \
        f"packed {[hex(int(v)) for v in packed]} != expected {[hex(v) for v in expected]}"
    d, s, o = nq.unpack_deq_scale(packed)
    assert d.dtype == np.float32 and s.dtype == np.uint32 and o.dtype == np.int8, "unpack dtypes wrong"
    assert np.array_equal(d, deq) and list(s) == [3, 16] and list(o) == [0, -2], "unpack wrong"
    with pytest.raises(nq.NumericsError, match="48-63"):
        nq.unpack_deq_scale(np.array([1 << 50], np.uint64))


@FAST
@given(st.data())
def test_pack_roundtrip(data):
    c = data.draw(st.integers(1, 8))
    deq = data.draw(hnp.arrays(np.float32, c, elements=st.floats(0, 2.0**100, width=32)))
    shift = data.draw(hnp.arrays(np.uint32, c, elements=st.integers(0, 255)))
    off = data.draw(hnp.arrays(np.int8, c, elements=st.integers(-128, 127)))
    d, s, o = nq.unpack_deq_scale(nq.pack_deq_scale(deq, shift, off))
    assert np.array_equal(d.view(np.uint32), deq.view(np.uint32)), "deq bits changed in the round trip"
    assert np.array_equal(s, shift) and np.array_equal(o, off), "shift/offset changed in the round trip"


def test_errors_named_prefixes_the_caller_and_keeps_the_error_type():
    with pytest.raises(nq.NonFiniteError, match=r"^layer .x.: ulq_forward input: .*NaN"):
        with nq.errors_named("layer 'x'"):
            nq.ulq_forward(np.array([np.nan], np.float32), -1.0, 1.0)


@pytest.mark.parametrize("shape, scales, expected", [
    ((2, 8, 1, 1), 8, True), ((2, 8, 1, 1), 1, False), ((2, 8, 2, 1), 8, False), ((2, 8), 8, False), ((), 8, False)])
def test_a_global_conv_has_a_1x1_output_and_per_channel_scales(shape, scales, expected):
    assert nq.is_global_conv(shape, scales) is expected, f"output {shape} with {scales} scales"


# --------------------------------------------------------------------------- bit widths


@pytest.mark.parametrize("num_bits", range(2, 9))
def test_bit_width_gives_the_signed_code_range_and_the_steps(num_bits):
    bw = nq.bit_width(num_bits)
    assert (bw.code_min, bw.code_max, bw.levels) == (-(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1,
                                                     2 ** num_bits - 1)


@pytest.mark.parametrize("bad", [1, 9, 0, -8, 4.0, True, "8", None])
def test_a_bit_width_outside_2_to_8_is_refused_by_name(bad):
    with pytest.raises(nq.NumericsError, match=r"num_bits.*2\.\.8"):
        nq.bit_width(bad)
    with pytest.raises(nq.NumericsError, match="num_bits"):
        nq.scale_offset_from_range(-1.0, 1.0, bad)


@pytest.mark.parametrize("num_bits", [2, 3, 4, 6, 8])
def test_activation_factors_at_a_bit_width(num_bits):
    bw = nq.bit_width(num_bits)
    s, off = nq.scale_offset_from_range(-1.0, 1.0, num_bits)
    assert s == np.float32(2.0 / bw.levels) and off == 0, "a symmetric range has offset 0 at every width"
    s, off = nq.scale_offset_from_range(0.0, 3.0, num_bits)
    assert s == np.float32(3.0 / bw.levels) and off == bw.code_min, "a ReLU range starts at the lowest code"
    x = np.linspace(-2, 5, 2001, dtype=np.float32)
    q = nq.quantize_activation(x, s, off, num_bits)
    assert q.dtype == np.int8 and (q.min(), q.max()) == (bw.code_min, bw.code_max)
    assert np.array_equal(nq.dequantize_activation(q, s, off, num_bits), nq.fake_quantize_activation(x, s, off, num_bits))
    lo, hi = nq.activation_grid_bounds(s, off, num_bits)
    assert lo == 0 and hi == np.float32(bw.levels) * s
    with pytest.raises(nq.NumericsError, match=f"{num_bits}-bit codes"):
        nq.fake_quantize_activation(x, s, bw.code_max + 1, num_bits)


@pytest.mark.parametrize("num_bits", [2, 4, 8])
@pytest.mark.parametrize("clips", [(-1.0, 1.0), (0.0, 6.0), (-3.7, 0.2)])
def test_ulq_at_a_bit_width_is_the_fixed_quantizer_of_its_deploy_factors(num_bits, clips):
    x = np.linspace(clips[0] * 2 - 1, clips[1] * 2 + 1, 4001, dtype=np.float32)
    y = nq.ulq_forward(x, *clips, num_bits=num_bits)
    scale_d, offset_d = nq.ulq_deploy_factors(*clips, num_bits=num_bits)
    assert y.tobytes() == nq.fake_quantize_activation(x, scale_d, offset_d, num_bits).tobytes()
    assert np.unique(y).size == 2 ** num_bits
    s, o = nq.ulq_scale_offset(*clips, num_bits=num_bits)
    assert s == np.float32((clips[1] - clips[0]) / (2 ** num_bits - 1))
    assert nq.ulq_to_deploy_offset(o, num_bits) == offset_d
    lo, hi = nq.ulq_bounds(s, o, num_bits)
    inside = (x >= lo) & (x <= hi)
    grad_x, _, _ = nq.ulq_backward(x, np.ones_like(x), *clips, num_bits=num_bits)
    assert np.array_equal(grad_x != 0, inside), "straight-through exactly inside the b-bit grid"
    assert nq.fraction_clipped(x, *clips, num_bits=num_bits) == pytest.approx(1 - inside.mean())


def test_ulq_clip_gradient_divides_by_the_steps_of_the_bit_width():
    """Inside the grid the clip gradient is sum(g * (rint(x/s) - x/s)) / L: with the same x/s
    values, a 4-bit grid (L = 15) gives 255/15 = 17 times the 8-bit gradient."""
    s8, _ = nq.ulq_scale_offset(0.0, 255.0)  # s = 1 at 8 bits
    s4, _ = nq.ulq_scale_offset(0.0, 15.0, 4)  # s = 1 at 4 bits
    assert s8 == s4 == 1
    x = np.array([0.3, 1.2, 2.45, 7.9], np.float32)
    g = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    _, gmin8, gmax8 = nq.ulq_backward(x, g, 0.0, 255.0)
    _, gmin4, gmax4 = nq.ulq_backward(x, g, 0.0, 15.0, 4)
    assert gmax4 == pytest.approx(17 * gmax8) and gmin4 == pytest.approx(17 * gmin8)


@pytest.mark.parametrize("num_bits", [2, 4, 8])
def test_arq_at_a_bit_width_uses_the_symmetric_b_bit_range(num_bits):
    bw = nq.bit_width(num_bits)
    w = np.array([[0.5, -0.1, 1.4], [-2.0, 0.3, 1.9]], np.float32)  # row 0: max wins, row 1: min wins
    scale = nq.arq_scale(w, 0, num_bits)
    assert scale.tolist() == [np.float32(1.4) / np.float32(bw.code_max), np.float32(-2.0) / np.float32(bw.code_min)]
    q = nq.arq_quantize(w, scale, 0, num_bits)
    assert q[0].max() == bw.code_max and q[1].min() == bw.code_min
    assert q.max() <= bw.code_max, "1.9 / (2.0 / 2**(b-1)) rounds above the range and is clamped"
    assert np.array_equal(nq.arq_fake_quantize(w, scale, 0, num_bits), q.astype(np.float32) * scale[:, None])


@pytest.mark.parametrize("num_bits", [2, 4])
def test_ifmr_at_a_bit_width_measures_the_error_of_its_own_grid(num_bits):
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal(5000), 0).astype(np.float32)
    lo, hi = nq.ifmr_search(x, num_bits=num_bits)
    s, off = nq.scale_offset_from_range(lo, hi, num_bits)
    mse = float(np.mean((nq.fake_quantize_activation(x, s, off, num_bits).astype(np.float64) - x) ** 2))
    for k in (0.7, 1.0, 1.3):  # candidates of the default grid
        sk, ok = nq.scale_offset_from_range(0.0, k * float(np.max(x)), num_bits)
        other = float(np.mean((nq.fake_quantize_activation(x, sk, ok, num_bits).astype(np.float64) - x) ** 2))
        assert mse <= other * (1 + 1e-12)
    assert hi < nq.ifmr_search(x)[1], "fewer levels clip more of the tail"
