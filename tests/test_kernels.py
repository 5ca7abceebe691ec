"""The compiled kernels against their specification, amct_retrain.numerics: identical codes,
outputs and input gradients (bit for bit), sums within 1e-12 relative; the same errors."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from amct_retrain import kernels, numerics
from amct_retrain.errors import NumericsError

FAST = settings(max_examples=80, deadline=None)
F32 = np.float32

act_arrays = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=9),
    elements=st.floats(-1e3, 1e3, width=32, allow_nan=False, allow_infinity=False))
clip_pairs = st.tuples(st.one_of(st.just(0.0), st.floats(-50, 0)), st.floats(1e-3, 50))


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal values, shapes and dtypes, -0.0 told from 0.0."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def close_sum(kernel: float, spec: float, magnitude: float) -> bool:
    """Within 1e-12 relative of numerics' sum, relative to the larger of it and the summed
    magnitude (a sum that cancels to ~0 is only known that well by numerics itself)."""
    return abs(kernel - spec) <= 1e-12 * max(abs(spec), magnitude, 1e-300)


def edge_values(clip_min: float, clip_max: float) -> np.ndarray:
    """Values at and an ulp around the grid ends and at rounding ties of the ULQ grid."""
    s, o = numerics.ulq_scale_offset(clip_min, clip_max)
    lo, hi = F32(o) * s, F32(o + 255) * s
    ties = (np.arange(o, o + 255, 17, dtype=np.float64) + 0.5) * np.float64(s)
    ends = [lo, hi, np.nextafter(lo, F32(-np.inf)), np.nextafter(lo, F32(np.inf)),
            np.nextafter(hi, F32(np.inf)), np.nextafter(hi, F32(-np.inf)), F32(0), F32(-0.0), -1e-30]
    return np.concatenate([np.asarray(ends, np.float32), ties.astype(np.float32),
                           np.nextafter(ties.astype(np.float32), F32(np.inf)), [hi * 3, lo * 3 - 1]])


# --------------------------------------------------------------------------- ULQ


def ulq_step_forward(x: np.ndarray, clips: tuple[float, float], num_bits: int = 8) -> np.ndarray:
    """UlqLayerKernels' forward of a valid pair (kept as the last valid one too), into NaNs."""
    out = np.full(x.shape, np.nan, np.float32)
    assert kernels.UlqLayerKernels(num_bits, False).forward(x, *clips, clips, out) == clips
    return out


def ulq_step_backward(x: np.ndarray, g: np.ndarray, clips: tuple[float, float],
                      num_bits: int = 8) -> tuple[np.ndarray, float, float]:
    """(grad_x, grad_clip_min, grad_clip_max) of UlqLayerKernels after a forward at ``clips`` (of
    zeros: the backward's own x may hold NaN)."""
    step = kernels.UlqLayerKernels(num_bits, False)
    step.forward(np.zeros_like(x), *clips, clips, np.empty_like(x))
    grad_x = np.full_like(x, np.nan)
    return (grad_x, *step.backward(x, g, grad_x))




@FAST
@given(act_arrays, clip_pairs)
def test_ulq_forward_is_numerics_bit_for_bit(x, clips):
    assert same_bits(ulq_step_forward(x, clips), numerics.ulq_forward(x, *clips))


@pytest.mark.parametrize("clips", [(-1.0, 1.0), (0.0, 6.0), (-3.7, 0.2), (-1e-3, 250.0)])
def test_ulq_forward_and_backward_at_grid_ends_and_rounding_ties(clips):
    x = edge_values(*clips)
    g = np.linspace(-2, 3, x.size, dtype=np.float32)
    assert same_bits(ulq_step_forward(x, clips), numerics.ulq_forward(x, *clips))
    got, spec = ulq_step_backward(x, g, clips), numerics.ulq_backward(x, g, *clips)
    assert same_bits(got[0], spec[0]), "input gradient differs at the clip edges"
    assert got[1:] == pytest.approx(spec[1:], rel=1e-12, abs=1e-12)


@FAST
@given(act_arrays, clip_pairs, st.data())
def test_ulq_backward_gradients_match_numerics(x, clips, data):
    g = data.draw(hnp.arrays(np.float32, x.shape, elements=st.floats(-1e3, 1e3, width=32)))
    got, spec = ulq_step_backward(x, g, clips), numerics.ulq_backward(x, g, *clips)
    assert same_bits(got[0], spec[0])
    magnitude = float(np.abs(g.astype(np.float64)).sum()) * 2  # |D| <= 1 + 1/2
    assert close_sum(got[1], spec[1], magnitude), f"grad_clip_min {got[1]!r} vs numerics {spec[1]!r}"
    assert close_sum(got[2], spec[2], magnitude), f"grad_clip_max {got[2]!r} vs numerics {spec[2]!r}"


def test_ulq_backward_of_many_elements_sums_as_accurately_as_numerics():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(300_001) * 2).astype(np.float32)  # many blocks, a partial last one
    g = rng.standard_normal(x.size).astype(np.float32)
    got, spec = ulq_step_backward(x, g, (-1.5, 3.0)), numerics.ulq_backward(x, g, -1.5, 3.0)
    assert same_bits(got[0], spec[0])
    assert got[1] == pytest.approx(spec[1], rel=1e-12) and got[2] == pytest.approx(spec[2], rel=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_data_raises_numerics_error_and_message(bad):
    x = np.ones(5000, np.float32)
    x[4321] = bad
    g = np.ones_like(x)
    for kernel_call, spec_call in [
            (lambda: kernels.arq_scale(x.reshape(5, -1), 0), lambda: numerics.arq_scale(x.reshape(5, -1), 0)),
            (lambda: arq_step(x.reshape(5, -1), 0), lambda: numerics.arq_scale(x.reshape(5, -1), 0)),
            (lambda: kernels.UlqLayerKernels(8, False).forward(x, -1.0, 1.0, (-1.0, 1.0), np.empty_like(x)),
             lambda: numerics.ulq_forward(x, -1, 1)),
            (lambda: ulq_step_backward(x, g, (-1.0, 1.0)), lambda: numerics.ulq_backward(x, g, -1, 1)),
            (lambda: ulq_step_backward(g, x, (-1.0, 1.0)), lambda: numerics.ulq_backward(g, x, -1, 1)),
            (lambda: kernels.arq_fake_quantize(x, 0.5, None), lambda: numerics.arq_fake_quantize(x, 0.5, None)),
            (lambda: kernels.fake_quantize_activation(x, 0.1, 3),
             lambda: numerics.fake_quantize_activation(x, 0.1, 3)),
            (lambda: kernels.ifmr_search(x), lambda: numerics.ifmr_search(x)),
            (lambda: kernels.accumulate_shift_errors(x.reshape(2, 5, -1), np.ones(5, np.float32)),
             lambda: numerics.accumulate_shift_errors(x.reshape(2, 5, -1), np.ones(5, np.float32)))]:
        with pytest.raises(numerics.NonFiniteError) as got:
            kernel_call()
        with pytest.raises(numerics.NonFiniteError) as spec:
            spec_call()
        assert str(got.value) == str(spec.value)


def test_kernels_write_into_the_given_output_and_refuse_a_wrong_one():
    x = np.linspace(-3, 3, 60, dtype=np.float32).reshape(3, 4, 5)
    out = np.full_like(x, np.nan)
    scale = numerics.arq_scale(x, 1)
    assert same_bits(kernels.arq_fake_quantize(x, scale, 1, out=out), numerics.arq_fake_quantize(x, scale, 1))
    deq, shift = np.full(4, 0.01, np.float32), np.array([0, 1, 2, 3])
    assert same_bits(kernels.requantize_output(x, deq, shift, out=out), requantize_spec(x, deq, shift))
    for wrong in (np.empty((3, 4, 6), np.float32), np.empty(x.shape, np.float64),
                  np.empty((3, 5, 4), np.float32).transpose(0, 2, 1)):
        with pytest.raises(numerics.NumericsError, match="out must be"):
            kernels.arq_fake_quantize(x, scale, 1, out=wrong)


def test_ulq_kernels_refuse_a_bit_width_outside_2_to_8():
    for bad in (1, 9, 4.0, True):
        with pytest.raises(numerics.NumericsError, match="bit width"):
            kernels.UlqLayerKernels(bad, False)
        with pytest.raises(numerics.NumericsError, match="bit width"):
            kernels.fake_quantize_activation(np.ones(3, np.float32), 0.1, 0, num_bits=bad)


@pytest.mark.parametrize("num_bits", [2, 3, 4, 7, 8])
@pytest.mark.parametrize("clips", [(-1.0, 1.0), (0.0, 6.0), (-3.7, 0.2), (-1e-3, 250.0)])
def test_ulq_kernels_are_numerics_at_every_bit_width(num_bits, clips):
    x = np.concatenate([edge_values(*clips), np.linspace(clips[0] * 2 - 1, clips[1] * 2, 3001, dtype=np.float32)])
    g = np.linspace(-2, 3, x.size, dtype=np.float32)
    y = ulq_step_forward(x, clips, num_bits)
    assert same_bits(y, numerics.ulq_forward(x, *clips, num_bits=num_bits))
    s, o = numerics.ulq_scale_offset(*clips, num_bits=num_bits)
    codes = np.unique(np.rint(y / s))
    assert codes.size == 2 ** num_bits and codes[0] == o, f"{num_bits}-bit ULQ grid: {codes.size} codes from {codes[0]}"
    got, spec = (ulq_step_backward(x, g, clips, num_bits),
                 numerics.ulq_backward(x, g, *clips, num_bits=num_bits))
    assert same_bits(got[0], spec[0])
    assert got[1:] == pytest.approx(spec[1:], rel=1e-12, abs=1e-12)


# Clip pairs as a solver leaves them: valid, reversed, positive min, negative max, NaN.
any_clip_pairs = st.tuples(st.one_of(st.floats(-60, 60, width=32), st.just(float("nan"))),
                           st.floats(-60, 60, width=32))


@settings(max_examples=200, deadline=None)
@given(act_arrays, any_clip_pairs, clip_pairs, st.booleans(), st.integers(2, 8), st.data())
def test_ulq_layer_step_is_numerics_sanitise_then_forward_and_backward(x, pair, last, fixed_min, num_bits, data):
    step = kernels.UlqLayerKernels(num_bits, fixed_min)
    want_pair = numerics.ulq_sanitize_clips(*pair, last, fixed_min)
    out = np.full_like(x, np.nan)
    assert step.forward(x, *pair, last, out) == want_pair, "the step sanitised the clips unlike numerics"
    assert step.clips == want_pair
    assert same_bits(out, numerics.ulq_forward(x, *want_pair, num_bits))
    g = data.draw(hnp.arrays(np.float32, x.shape, elements=st.floats(-1e3, 1e3, width=32)))
    grad_x = np.full_like(x, np.nan)
    got = step.backward(x, g, grad_x)
    spec = numerics.ulq_backward(x, g, *want_pair, num_bits)
    assert same_bits(grad_x, spec[0]), "input gradient differs from numerics"
    magnitude = float(np.abs(g.astype(np.float64)).sum()) * 2
    assert close_sum(got[0], spec[1], magnitude) and close_sum(got[1], spec[2], magnitude), \
        f"clip gradients {got} vs numerics {spec[1:]}"


@pytest.mark.parametrize("pair, last, fixed_min", [
    ((0.0, 1e-40), (-1.0, 1.0), False),   # degenerate: numerics widens the range
    ((-1e-39, 0.0), (-1.0, 1.0), False),
    ((3.0, 2.0), (0.0, 1e-41), True),      # invalid, and the last pair is degenerate
    ((-1.0, -0.5), (-2.0, 4.0), True),     # negative max: falls back, min pinned at 0
    ((-2.5, 3.0), (-2.0, 4.0), False)])
def test_ulq_layer_step_at_degenerate_and_fallen_back_pairs_is_numerics(pair, last, fixed_min):
    x = np.concatenate([edge_values(-1.0, 1.0), np.linspace(-3, 5, 999, dtype=np.float32)])
    want_pair = numerics.ulq_sanitize_clips(*pair, last, fixed_min)
    step = kernels.UlqLayerKernels(8, fixed_min)
    out = np.empty_like(x)
    assert step.forward(x, *pair, last, out) == want_pair
    assert same_bits(out, numerics.ulq_forward(x, *want_pair))
    grad_x = np.empty_like(x)
    got = step.backward(x, np.cos(x), grad_x)
    spec = numerics.ulq_backward(x, np.cos(x), *want_pair)
    assert same_bits(grad_x, spec[0]) and got == pytest.approx(spec[1:], rel=1e-12, abs=1e-12)


def test_ulq_layer_step_raises_what_numerics_raises_and_refuses_arrays_it_would_lose():
    x = np.linspace(-2, 2, 40, dtype=np.float32).reshape(4, 10)
    step = kernels.UlqLayerKernels(8, False)
    with pytest.raises(NumericsError, match="no forward pass yet"):
        step.backward(x, x, np.empty_like(x))
    for pair, last in (((1.0, -1.0), (2.0, 1.0)), ((float("nan"), 1.0), (0.5, 0.5))):
        with pytest.raises(NumericsError) as spec:
            numerics.ulq_sanitize_clips(*pair, last, False)
        with pytest.raises(NumericsError) as got:
            step.forward(x, *pair, last, np.empty_like(x))
        assert str(got.value) == str(spec.value)
    for wrong in (np.empty(41, np.float32), np.empty(x.shape, np.float64), np.empty((10, 4), np.float32).T):
        with pytest.raises(NumericsError, match="ulq_forward: needs C-contiguous float32 arrays of 40 values"):
            step.forward(x, -1.0, 1.0, (-1.0, 1.0), wrong)
    step.forward(x, -1.0, 1.0, (-1.0, 1.0), np.empty_like(x))
    with pytest.raises(NumericsError, match="ulq_backward: needs"):
        step.backward(x, np.empty(39, np.float32), np.empty_like(x))


def test_ulq_layer_step_logs_a_fall_back_to_the_last_valid_pair(caplog):
    x = np.ones(8, np.float32)
    with caplog.at_level("DEBUG", logger="amct_retrain.kernels"):
        kernels.UlqLayerKernels(8, False).forward(x, 2.0, 1.0, (-1.0, 3.0), np.empty_like(x))
    assert "ULQ clips (2.0, 1.0) invalid; using last valid (-1.0, 3.0)" in caplog.text


# --------------------------------------------------------------------------- fixed fake quant, ARQ


@FAST
@given(act_arrays, st.floats(1e-4, 10), st.integers(-128, 127))
def test_fake_quantize_activation_is_numerics_bit_for_bit(x, scale, offset):
    assert same_bits(kernels.fake_quantize_activation(x, scale, offset),
                     numerics.fake_quantize_activation(x, scale, offset))


@pytest.mark.parametrize("num_bits", [2, 4, 7, 8])
def test_a_lower_bit_width_keeps_the_codes_on_its_grid(num_bits):
    x = np.linspace(-40, 40, 1001, dtype=np.float32)
    scale, offset = F32(0.05), 1
    y = kernels.fake_quantize_activation(x, scale, offset, num_bits=num_bits)
    assert same_bits(y, numerics.fake_quantize_activation(x, scale, offset, num_bits=num_bits))
    k = np.rint(y / scale) + offset
    half = 2 ** (num_bits - 1)
    assert k.min() == -half and k.max() == half - 1, f"{num_bits}-bit codes span {k.min()}..{k.max()}"
    inside = (x / scale + offset > -half + 1) & (x / scale + offset < half - 2)
    assert same_bits(y[inside], numerics.fake_quantize_activation(x, scale, offset)[inside])
    codes = kernels.activation_codes(x, numerics.quant_multiplier(scale), offset, num_bits)
    assert np.array_equal(codes, numerics.quant_layer_forward(x, numerics.quant_multiplier(scale), offset,
                                                              num_bits).astype(np.float32) - F32(offset))


@pytest.mark.parametrize("num_bits", [2, 4, 8])
def test_arq_kernel_is_numerics_at_every_bit_width(num_bits):
    w = np.random.default_rng(num_bits).standard_normal((6, 3, 3, 3)).astype(np.float32)
    w[1] *= -1  # channels whose extreme is negative too (scale a / -2**(b-1))
    for axis in (0, 1, None):
        scale = numerics.arq_scale(w, axis, num_bits)
        assert same_bits(kernels.arq_scale(w, axis, num_bits), scale)
        fq = kernels.arq_fake_quantize(w, scale, axis, num_bits)
        assert same_bits(fq, numerics.arq_fake_quantize(w, scale, axis, num_bits))
        got, got_scale = arq_step(w, axis, num_bits)
        assert same_bits(got, fq) and same_bits(got_scale, scale)
        codes = numerics.arq_quantize(w, scale, axis, num_bits)
        assert codes.min() >= -2 ** (num_bits - 1) and codes.max() <= 2 ** (num_bits - 1) - 1


@pytest.mark.parametrize("num_bits", [2, 4, 8])
def test_ifmr_kernels_are_numerics_at_every_bit_width(num_bits):
    rng = np.random.default_rng(num_bits)
    x = (np.maximum(rng.standard_normal(20_001), -0.3) * 3).astype(np.float32)
    assert kernels.ifmr_search(x, num_bits=num_bits) == numerics.ifmr_search(x, num_bits=num_bits)
    batches = [x[:10_000].reshape(4, -1), x[10_000:]]
    for symmetric in (False, True):
        assert (kernels.activation_factors(batches, {}, symmetric, num_bits)
                == numerics.activation_factors(batches, {}, symmetric, num_bits=num_bits))


@FAST
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=4, max_side=6),
                  elements=st.floats(-10, 10, width=32)), st.data())
def test_arq_fake_quantize_is_numerics_bit_for_bit(w, data):
    axis = data.draw(st.one_of(st.none(), st.integers(0, w.ndim - 1)))
    scale = numerics.arq_scale(w, axis)
    assert same_bits(kernels.arq_fake_quantize(w, scale, axis), numerics.arq_fake_quantize(w, scale, axis))


@FAST
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=4, max_side=6),
                  elements=st.floats(-10, 10, width=32)), st.data())
def test_arq_scale_is_numerics_bit_for_bit(w, data):
    axis = data.draw(st.one_of(st.none(), st.integers(0, w.ndim - 1)))
    assert same_bits(kernels.arq_scale(w, axis), numerics.arq_scale(w, axis))


def arq_step(w: np.ndarray, axis: int | None, num_bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(fake-quantized weights, scale_w) from ArqLayerKernels.forward, into NaN-filled outputs."""
    step = kernels.ArqLayerKernels(w.shape, axis, num_bits)
    out = np.full(w.shape, np.nan, np.float32)
    scale_out = np.full(w.shape[axis] if axis is not None else 1, np.nan, np.float32)  # WeightARQ's scale_w blob
    assert step.forward(np.ascontiguousarray(w), out, scale_out) is scale_out
    return out, scale_out


@FAST
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=4, max_side=6),
                  elements=st.floats(-10, 10, width=32)), st.data())
def test_arq_layer_step_is_numerics_scale_then_fake_quantize(w, data):
    axis = data.draw(st.one_of(st.none(), st.integers(0, w.ndim - 1)))
    got, scale = arq_step(w, axis)
    assert same_bits(scale, numerics.arq_scale(w, axis)), "scale_w differs from numerics.arq_scale"
    assert same_bits(got, numerics.arq_fake_quantize(w, scale, axis))


def test_arq_layer_step_moves_the_gradient_and_refuses_arrays_it_would_write_past_or_lose():
    rng = np.random.default_rng(3)
    shape = (4, 3, 2, 2)
    fake_quant_grad = rng.standard_normal(shape).astype(np.float32)
    master_grad = rng.standard_normal(shape).astype(np.float32)
    want = master_grad + fake_quant_grad
    step = kernels.ArqLayerKernels(shape, 0, 8)
    step.move_gradient(fake_quant_grad, master_grad)
    assert same_bits(master_grad, want), "master gradient must be its old value plus the fake-quant gradient"
    assert not fake_quant_grad.any(), "the fake-quant gradient must be zeroed"
    w = np.ones(shape, np.float32)
    for wrong in (np.zeros(47, np.float32), np.zeros(shape, np.float64),
                  np.zeros((4, 3, 2, 4), np.float32)[..., ::2]):
        with pytest.raises(NumericsError, match="C-contiguous float32 arrays of 48 values"):
            step.move_gradient(wrong, master_grad)
        with pytest.raises(NumericsError, match="arq_forward"):
            step.forward(w, wrong, np.empty(4, np.float32))
    with pytest.raises(NumericsError, match="arq_forward scale"):
        step.forward(w, np.empty(shape, np.float32), np.empty(3, np.float32))
    bad = w.copy()
    bad[2, 1, 0, 0] = np.nan
    out = np.full(shape, 7.0, np.float32)
    with pytest.raises(numerics.NonFiniteError, match="arq_scale weights"):
        step.forward(bad, out, np.empty(4, np.float32))
    assert (out == 7.0).all(), "NaN master weights must leave the fake-quantized weights as they were"


def test_arq_scale_of_ties_zero_channels_and_tiny_weights_is_numerics():
    w = np.array([[1.0, -1.0], [0.0, -0.0], [1e-9, -2e-9], [127.0, -128.0], [-3.0, 2.0]], np.float32)
    for axis in (0, None):
        assert same_bits(kernels.arq_scale(w, axis), numerics.arq_scale(w, axis)), f"axis {axis}"


def test_arq_fake_quantize_at_rounding_ties_and_the_int8_ends():
    scale = np.array([0.5, 0.25], np.float32)
    w = np.array([[0.25, -0.25, 0.75, 63.5, -64.0, 64.25, -70.0]] * 2, np.float32).T.copy()  # (7, 2), axis 1
    assert same_bits(kernels.arq_fake_quantize(w, scale, 1), numerics.arq_fake_quantize(w, scale, 1))


# --------------------------------------------------------------------------- requantize, shift-N


def requantize_spec(y, deq, shift_bits):
    return numerics.requantized_output(numerics.accumulator_from_output(y, deq), deq, shift_bits)


@FAST
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5)),
                  elements=st.floats(-1e4, 1e4, width=32)), st.data())
def test_requantize_output_is_numerics_bit_for_bit(y, data):
    c = y.shape[1]
    deq = np.asarray(data.draw(st.lists(st.floats(1 / 1024, 1.0, width=32), min_size=c, max_size=c)), np.float32)
    shift_bits = np.asarray(data.draw(st.lists(st.integers(0, 16), min_size=c, max_size=c)))
    assert same_bits(kernels.requantize_output(y, deq, shift_bits), requantize_spec(y, deq, shift_bits))


def test_requantize_output_at_ties_and_the_int16_ends():
    deq = np.array([0.5, 1.0], np.float32)
    acc = np.array([2.0, 6.0, -2.0, -6.0, 65534.0, 65536.0, 2.0 ** 20, -(2.0 ** 20), 1.0, 3.0])
    y = np.stack([acc * 0.5, acc]).astype(np.float32)[None]  # (1, 2, 10): deq * acc
    for shift in ([1, 2], [2, 1], [0, 0]):
        assert same_bits(kernels.requantize_output(y, deq, shift), requantize_spec(y, deq, shift))


@FAST
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 30)),
                  elements=st.floats(-1e5, 1e5, width=32)), st.floats(1 / 1024, 2.0, width=32))
def test_shift_errors_match_numerics_and_pick_the_same_shift(y, deq):
    d = np.full(y.shape[1], deq, np.float32)
    got, spec = kernels.accumulate_shift_errors(y, d), numerics.accumulate_shift_errors(y, d)
    np.testing.assert_allclose(got, spec, rtol=1e-12, atol=0)
    assert np.array_equal(numerics.choose_shift_bits(got), numerics.choose_shift_bits(spec))


def test_shift_errors_of_a_big_blob_match_numerics():
    y = (np.random.default_rng(5).standard_normal((2, 3, 5000)) * 300).astype(np.float32)
    d = np.array([0.01, 0.5, 3.0], np.float32)
    np.testing.assert_allclose(kernels.accumulate_shift_errors(y, d), numerics.accumulate_shift_errors(y, d),
                               rtol=1e-12)


# --------------------------------------------------------------------------- IFMR


@settings(max_examples=40, deadline=None)
@given(act_arrays)
def test_ifmr_search_is_numerics(x):
    assert kernels.ifmr_search(x) == numerics.ifmr_search(x)


@pytest.mark.parametrize("data", ["relu", "gaussian", "zeros", "constant"])
def test_ifmr_search_on_big_inputs_is_numerics(data):
    rng = np.random.default_rng(7)
    x = {"relu": np.maximum(rng.standard_normal(70_001), 0) * 4, "gaussian": rng.standard_normal(50_000),
         "zeros": np.zeros(10_000), "constant": np.full(9000, 2.5)}[data].astype(np.float32)
    options = {"search_start": 0.5, "search_end": 1.5, "search_step": 0.02, "max_percentile": 0.9999}
    assert kernels.ifmr_search(x) == numerics.ifmr_search(x)
    assert kernels.ifmr_search(x, **options) == numerics.ifmr_search(x, **options)
    sq = numerics.ifmr_squared_errors(x, np.array([0.01, 0.02], np.float32), np.array([-128, 0]))
    np.testing.assert_allclose(kernels.ifmr_squared_errors(x, np.array([0.01, 0.02], np.float32),
                                                           np.array([-128, 0])), sq, rtol=1e-12)


@pytest.mark.parametrize("symmetric", [False, True])
def test_activation_factors_are_numerics(symmetric):
    rng = np.random.default_rng(3)
    batches = [(rng.standard_normal((2, 3, 5, 5)) * 3 + 1).astype(np.float32) for _ in range(3)]
    ifmr = {"max_percentile": 0.999, "search_step": 0.02}
    assert kernels.activation_factors(batches, ifmr, symmetric) == numerics.activation_factors(batches, ifmr,
                                                                                             symmetric)


def test_ifmr_search_refuses_what_numerics_refuses():
    for args, kwargs in [((np.zeros(0, np.float32),), {}), ((np.ones(4, np.float32),), {"min_percentile": 0.9,
                                                                                         "max_percentile": 0.1})]:
        with pytest.raises(numerics.NumericsError) as spec:
            numerics.ifmr_search(*args, **kwargs)
        with pytest.raises(numerics.NumericsError, match=str(spec.value)):
            kernels.ifmr_search(*args, **kwargs)


# --------------------------------------------------------------------------- compiled-code cache


def test_a_second_process_loads_the_compiled_kernels_from_the_cache(tmp_path):
    script = textwrap.dedent("""
        import numpy as np
        from amct_retrain import kernels
        x = np.linspace(-3, 3, 100, dtype=np.float32)
        step = kernels.UlqLayerKernels(8, False)
        step.forward(x, -1.0, 2.0, (-1.0, 2.0), np.empty_like(x))
        step.backward(x, x, np.empty_like(x))
        stats = [kernels._ulq_step_forward_kernel.stats, kernels._ulq_step_backward_kernel.stats]
        print(sum(sum(s.cache_hits.values()) for s in stats), sum(sum(s.cache_misses.values()) for s in stats))
    """)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
            for _ in range(2)]
    hits, misses = map(int, runs[1].stdout.split())
    assert (hits, misses) == (2, 0), f"second process: {hits} cache hits, {misses} misses ({runs[1].stderr})"
    assert any((tmp_path / "numba").rglob("*.nbi")), "no numba cache index written"


# --------------------------------------------------------------------------- integer executor


@FAST
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 6)),
                  elements=st.floats(-1e3, 1e3, width=32)), st.floats(1e-3, 100), st.integers(-128, 127))
def test_activation_codes_are_the_quant_layer_codes_minus_the_offset(x, quant_scale, offset):
    spec = numerics.quant_layer_forward(x, quant_scale, offset).astype(np.float32) - F32(offset)
    got = kernels.activation_codes(x, quant_scale, offset)
    assert got.dtype == np.float32 and np.array_equal(got, spec)  # -0.0 is 0 to the multiplication


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_requantize_accumulator_is_numerics_with_the_bias(dtype):
    rng = np.random.default_rng(11)
    acc = rng.integers(-2 ** 20, 2 ** 20, (2, 3, 4, 5)).astype(dtype)
    acc[0, 0, 0, :3] = [0.0, -1.0, 2.0 ** 22]  # zero, a -0 after the shift, the int16 clamp
    bias = np.array([5, -(2 ** 30), 2 ** 31 - 1], np.int64)
    deq, shift_bits = np.array([0.01, 0.5, 2e-6], np.float32), np.array([1, 16, 7])
    spec = numerics.requantized_output(acc.astype(np.float64) + bias.reshape(1, 3, 1, 1), deq, shift_bits)
    assert same_bits(kernels.requantize_accumulator(acc, bias.astype(np.float64), deq, shift_bits), spec)


def test_exact_integer_matmul_is_exact_where_float32_sums_would_round():
    k = 4000  # 4000 * 255 * 128 far beyond 2^24: several float32 chunks
    a = np.full((3, k), 255.0, np.float32)
    a[1] = -255
    a[2, ::2] = 1
    b = np.full((k, 2), -128.0, np.float32)
    b[::3, 1] = 127
    exact = a.astype(np.int64) @ b.astype(np.int64)
    got = numerics.exact_integer_matmul(a, b)
    assert got.dtype == np.float64 and np.array_equal(got, exact)
    small = numerics.exact_integer_matmul(a[:, :100], b[:100])
    assert small.dtype == np.float32 and np.array_equal(small, exact * 0 + a[:, :100].astype(np.int64) @ b[:100])
    with pytest.raises(numerics.NumericsError, match="exact integers"):
        numerics.exact_integer_matmul(np.full((1, 1), 2.0 ** 20, np.float32), np.full((1, 1), 64.0, np.float32))


@pytest.mark.parametrize("geometry", [
    {"kernel": (3, 3), "stride": (1, 1), "pad": (1, 1), "dilation": (1, 1), "group": 1},
    {"kernel": (1, 1), "stride": (1, 1), "pad": (0, 0), "dilation": (1, 1), "group": 1},
    {"kernel": (1, 1), "stride": (2, 2), "pad": (0, 0), "dilation": (1, 1), "group": 2},
    {"kernel": (3, 2), "stride": (2, 1), "pad": (1, 0), "dilation": (2, 1), "group": 2}])
@pytest.mark.parametrize("batch", [1, 3])
def test_conv_accumulate_is_the_int64_convolution(geometry, batch):
    rng = np.random.default_rng(2)
    x = rng.integers(-255, 256, (batch, 4, 7, 6))
    x[0, :, 0] = 255
    w = rng.integers(-128, 128, (6, 4 // geometry["group"], *geometry["kernel"]))
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (geometry[k] for k in ("kernel", "stride", "pad", "dilation"))
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    oh = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    cg, mg = 4 // geometry["group"], 6 // geometry["group"]
    exact = np.zeros((batch, 6, oh, ow), np.int64)
    for m in range(6):
        gi = m // mg
        for i in range(kh):
            for j in range(kw):
                patch = padded[:, gi * cg:(gi + 1) * cg, i * dh:i * dh + sh * (oh - 1) + 1:sh,
                               j * dw:j * dw + sw * (ow - 1) + 1:sw]
                exact[:, m] += np.einsum("nchw,c->nhw", patch, w[m, :, i, j])
    got = numerics.conv_accumulate(x.astype(np.float32), w.astype(np.float32), geometry)
    assert np.array_equal(got, exact), f"max error {np.abs(got - exact).max()}"
