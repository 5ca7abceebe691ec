"""Int8 numerics of amct_retrain: contract section 3, in pure numpy.

A package of modules (``checks``: ranges, errors and argument checks; ``activation``:
quantize/dequantize and ULQ; ``ifmr``; ``arq``: weights, bias, deq; ``integer``: accumulators,
shift-N, requantisation, deq_scale packing); every public name is importable from here.

This package is the only place in the project that rounds or clamps. Layers, the
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
  ``[-128 - offset_d, 127 - offset_d]`` (at 8 bits); all activation paths (quantize,
  fake-quantize, ULQ, IFMR) compute ``k = clip(rint(x / scale), k_lo, k_hi)`` in
  float32 and ``k * scale`` in float32, so they agree bit for bit.
* Bit widths: every quantizer takes ``num_bits`` (2..8, default 8, the contract's int8) and reads
  its ranges from one place, :func:`bit_width` (:class:`BitWidth`): ``2**b - 1`` steps between an
  activation grid's ends (ULQ, IFMR, ``scale_offset_from_range``), codes and offsets in
  ``[-2**(b-1), 2**(b-1) - 1]`` (activations and ARQ weights), held in int8 at every b. The int32
  bias and the int16 shift-N requantisation have no bit width of their own: they quantize the
  accumulator, whose step ``scale_d * scale_w`` already carries b, so they are the same functions
  at every b.
* Length-1 per-channel vectors (per-tensor ``scale_w``, hence ``deq``) broadcast
  to the number of channels wherever a per-channel vector is accepted.
"""

from amct_retrain.numerics.checks import (
    NumericsError, INT8_MIN, INT8_MAX, INT16_MIN, INT16_MAX, INT32_MIN, INT32_MAX, SHIFT_BITS, BITS_RANGE,
    DEFAULT_BITS, DEGENERATE_RANGE_WIDTH, NonFiniteError, BiasOverflowError, BitWidth, bit_width, check_finite,
    errors_named,
)
from amct_retrain.numerics.activation import (
    quant_multiplier, scale_offset_from_range, quantize_activation, quant_layer_forward, code_bounds,
    dequantize_activation, fake_quantize_activation, activation_grid_bounds, ulq_sanitize_clips, ulq_scale_offset,
    ulq_to_deploy_offset, ulq_deploy_factors, ulq_bounds, ulq_forward, ulq_backward, ulq_clip_gradients,
    fraction_clipped,
)
from amct_retrain.numerics.ifmr import (
    ifmr_search, ifmr_grids, ifmr_squared_errors, ifmr_code_bounds, ifmr_choice, activation_factors,
)
from amct_retrain.numerics.arq import (
    arq_scale, arq_quantize, weight_code_bounds, arq_fake_quantize, quantize_bias, dequantize_bias,
    average_pool_scale, deq_scales,
)
from amct_retrain.numerics.integer import (
    window_sums, exact_integer_matmul, conv_accumulate, deconv_accumulate, conv_output_hw, accumulate_shift_errors,
    choose_shift_bits, search_shift_bits, accumulator_from_output, requantize, requantized_output, is_global_conv,
    output_steps, unify_global_conv_scales, pack_deq_scale, unpack_deq_scale,
)

__all__ = [
    "NumericsError", "INT8_MIN", "INT8_MAX", "INT16_MIN", "INT16_MAX", "INT32_MIN", "INT32_MAX", "SHIFT_BITS",
    "BITS_RANGE", "DEFAULT_BITS", "DEGENERATE_RANGE_WIDTH", "NonFiniteError", "BiasOverflowError", "BitWidth",
    "bit_width", "check_finite", "errors_named", "quant_multiplier", "scale_offset_from_range",
    "quantize_activation", "quant_layer_forward", "code_bounds", "dequantize_activation",
    "fake_quantize_activation", "activation_grid_bounds", "ulq_sanitize_clips", "ulq_scale_offset",
    "ulq_to_deploy_offset", "ulq_deploy_factors", "ulq_bounds", "ulq_forward", "ulq_backward", "ulq_clip_gradients",
    "fraction_clipped",
    "ifmr_search", "ifmr_grids", "ifmr_squared_errors", "ifmr_code_bounds", "ifmr_choice", "activation_factors",
    "arq_scale", "arq_quantize", "weight_code_bounds", "arq_fake_quantize", "quantize_bias", "dequantize_bias",
    "average_pool_scale", "deq_scales", "window_sums", "exact_integer_matmul", "conv_accumulate",
    "deconv_accumulate", "conv_output_hw", "accumulate_shift_errors", "choose_shift_bits", "search_shift_bits",
    "accumulator_from_output", "requantize", "requantized_output", "is_global_conv", "output_steps",
    "unify_global_conv_scales", "pack_deq_scale", "unpack_deq_scale",
]
