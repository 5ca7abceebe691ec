"""The quantizable Caffe layer types: one :class:`QuantRule` per type holds everything the toolkit
knows about it, so that a new quantizable type is one entry plus its hooks (docs/architecture.md).

Per type: which layers of the type are quantized at all and under which constraints (the config
readers and model builders check them), whether it has weights and on which axis their output
channels lie, the message holding its ``bias_term`` / ``axis`` (the BatchNorm fusions), its window
geometry (what the integer executor receives in param_str), the fixed scale_w of a type without
weights, whether its per-channel scales may need the "global conv" unification during retraining,
the integer executor's hooks (accumulator and output size), the weight shape a layer needs, and
what Caffe's CHECK messages mean for it. Besides this table, only the BatchNorm fusion patterns
(graph/fuse.py) and the ONNX converters (export/float_layers.py) name a quantizable type
(tests/test_type_names.py holds it).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from amct_retrain import numerics
from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.graph.caffe_params import (conv_geometry, conv_weight_mismatch, inner_product_weight_mismatch,
                                             pool_geometry, pool_windows_tile)

__all__ = ["Constraint", "ShapeConstraint", "QuantRule", "QUANTIZABLE_RULES", "TILING_CONSTRAINT",
           "shape_constraint_broken", "layers_by_name", "rule_for", "quantizable_layers", "weight_shape_mismatch",
           "WEIGHT_LAYER_TYPES", "layer_kind", "quantized_kinds"]


@dataclass(frozen=True)
class Constraint:
    """One requirement a layer of a quantizable type must meet to be quantized.

    ``text`` is what the user reads when it is broken, so it states the requirement
    (e.g. ``"inner_product_param.transpose must be false"``).
    """

    text: str
    check: Callable[[caffe_pb2.LayerParameter], bool]  # True when the layer meets it


@dataclass(frozen=True)
class ShapeConstraint:
    """A requirement that only the layer's input (H, W) shows: checked by the model builders."""

    text: str
    check: Callable[[caffe_pb2.LayerParameter, tuple[int, ...]], bool]  # (layer, input H W): True when met


@dataclass(frozen=True)
class QuantRule:
    """How the backend quantizes one Caffe layer type.

    ``applies`` selects the layers of the type the rule is about at all; the others
    are plain float layers, silently (a later MAX Pooling must not warn like a
    broken AVE Pooling).  ``constraints`` are checked on the selected layers; a
    broken one leaves the layer in float with a warning, or is an error if the user
    named the layer.  ``channel_axis`` is the weight axis of the output channels
    (None: no weights).

    The hooks: ``weight_param(layer)`` the message with ``bias_term`` and ``axis`` (None: no
    weights); ``geometry(layer)`` the window geometry as a dict, None without windows;
    ``fixed_scale_w(layer)`` the float32 scale_w of a type without weights; ``global_conv``: a
    per-channel layer of the type may have a 1 x 1 output (a "global conv", contract section 3),
    so its WeightARQ shares its ActivationULQ's clip state; ``integer_accumulate(x, w, geometry)``
    the integer executor's int32 accumulator of integer-valued float64 inputs x (N, C, H, W) and
    weights w (None without weights); ``integer_output_hw(in_hw, geometry)`` its output (H, W),
    empty for a flat (N, C) output; ``weight_shape_mismatch(layer, shape)`` how a weight blob of
    ``shape`` fails to fit the layer (None: it fits); ``check_hints``: (a piece of a Caffe CHECK
    message, what it means for a layer of the type), for the errors of the net probe;
    ``kind(layer)`` how a message names a layer of the type (None: by its type), ``quantized_kind``
    how it names the layers of the type that are quantized (None: the type).
    """

    layer_type: str
    constraints: tuple[Constraint, ...] = ()
    shape_constraint: ShapeConstraint | None = None
    has_weights: bool = True
    channel_wise_allowed: bool = False
    channel_wise_default: bool = False
    channel_axis: int | None = None
    applies: Callable[[caffe_pb2.LayerParameter], bool] | None = None
    weight_param: Callable[[caffe_pb2.LayerParameter], Any] | None = None
    geometry: Callable[[caffe_pb2.LayerParameter], dict | None] = lambda layer: None
    fixed_scale_w: Callable[[caffe_pb2.LayerParameter], np.ndarray] | None = None
    global_conv: bool = False
    # (x, w, geometry) and (in_hw, geometry): w is None exactly without weights, geometry None without windows.
    integer_accumulate: Callable[[np.ndarray, Any, Any], np.ndarray] | None = None
    integer_output_hw: Callable[[tuple[int, ...], Any], list[int]] | None = None
    weight_shape_mismatch: Callable[[caffe_pb2.LayerParameter, tuple[int, ...]], str | None] | None = None
    check_hints: tuple[tuple[str, str], ...] = ()
    kind: Callable[[caffe_pb2.LayerParameter], str] | None = None
    quantized_kind: str | None = None


def _conv_filter_is_4d(layer: caffe_pb2.LayerParameter) -> bool:
    # Caffe's filter has 2 + num_spatial_axes dims.  A 2-D net gives at most two
    # values per spatial field; three kernel/pad/stride/dilation values mean an N-D
    # (3-D) convolution.  A single kernel_size on a 5-D input cannot be told apart
    # from the prototxt alone; shape checks belong to the graph passes.
    p = layer.convolution_param
    return all(len(field) <= 2 for field in (p.kernel_size, p.pad, p.stride, p.dilation))


def _window_output_hw(in_hw: tuple[int, ...], g: dict) -> list[int]:
    """Output (H, W) of pooling windows that tile the input (no padding, no partial window)."""
    return [(size - k) // s + 1 for size, k, s in zip(in_hw, g["kernel"], g["stride"])]


_FILTER_4D = Constraint("filter is not 4-D (only 2-D convolutions are quantizable)", _conv_filter_is_4d)
# Caffe's output-size CHECK of a layer with a window.
_WINDOW_HINTS = (("shape[i] >= 0", "the kernel (kernel_size, dilation) is larger than the padded input"),)

TILING_CONSTRAINT = ("the pooling windows must tile the input exactly "
                     "((H - kernel_h) % stride_h == 0 and (W - kernel_w) % stride_w == 0)")
"""The constraint of a quantized AVE Pooling that needs the input shape (see the Pooling rule)."""

QUANTIZABLE_RULES: dict[str, QuantRule] = {
    "Convolution": QuantRule(
        layer_type="Convolution",
        constraints=(_FILTER_4D,),
        channel_wise_allowed=True,
        channel_wise_default=True,
        channel_axis=0,
        weight_param=lambda l: l.convolution_param,
        geometry=lambda l: conv_geometry(l).__dict__,
        global_conv=True,
        integer_accumulate=numerics.conv_accumulate,
        integer_output_hw=numerics.conv_output_hw,
        weight_shape_mismatch=lambda l, shape: conv_weight_mismatch(l, shape, transposed=False),
        check_hints=_WINDOW_HINTS,
    ),
    # Weights (C_in, C_out/group, kh, kw): the output channels are axis 1.  The constraints are
    # the target's (contract section 4); with groups, axis 1 would hold only C_out/group channels.
    "Deconvolution": QuantRule(
        layer_type="Deconvolution",
        constraints=(
            Constraint("convolution_param.group must be 1", lambda l: l.convolution_param.group == 1),
            Constraint("convolution_param.dilation must be 1",
                       lambda l: all(d == 1 for d in l.convolution_param.dilation)),
            _FILTER_4D,
        ),
        channel_wise_allowed=True,
        channel_wise_default=True,
        channel_axis=1,
        weight_param=lambda l: l.convolution_param,
        geometry=lambda l: conv_geometry(l).__dict__,
        integer_accumulate=numerics.deconv_accumulate,
        integer_output_hw=lambda in_hw, g: numerics.conv_output_hw(in_hw, g, transposed=True),
        weight_shape_mismatch=lambda l, shape: conv_weight_mismatch(l, shape, transposed=True),
        check_hints=_WINDOW_HINTS,
    ),
    # No weights: the integer layer sums the int8 codes of each window and the 1/n of the average
    # moves into deq (scale_w = [1/n]). That is exact only when every window holds n inputs: no
    # padding, no global pooling (its window is the whole input, unknown here), and windows that
    # tile the input (checked on the input shape by the model builders, ``shape_constraint``).
    # MAX pooling is not quantized at all, silently (``applies``).
    "Pooling": QuantRule(
        layer_type="Pooling",
        constraints=(
            Constraint("pooling_param.global_pooling must be false", lambda l: not l.pooling_param.global_pooling),
            Constraint("pooling_param.pad must be 0", lambda l: pool_geometry(l).pad == (0, 0)),
        ),
        shape_constraint=ShapeConstraint(TILING_CONSTRAINT, pool_windows_tile),
        has_weights=False,
        applies=lambda l: l.pooling_param.pool == caffe_pb2.PoolingParameter.AVE,
        geometry=lambda l: pool_geometry(l).__dict__,
        fixed_scale_w=lambda l: numerics.average_pool_scale(pool_geometry(l).window),
        integer_accumulate=lambda x, w, g: numerics.window_sums(x, g["kernel"], g["stride"]),
        integer_output_hw=_window_output_hw,
        check_hints=_WINDOW_HINTS,
        kind=lambda l: f"{caffe_pb2.PoolingParameter.PoolMethod.Name(l.pooling_param.pool)} Pooling",
        quantized_kind="AVE Pooling",
    ),
    "InnerProduct": QuantRule(
        layer_type="InnerProduct",
        constraints=(
            Constraint("inner_product_param.transpose must be false", lambda l: not l.inner_product_param.transpose),
            Constraint("inner_product_param.axis must be 1", lambda l: l.inner_product_param.axis == 1),
        ),
        channel_wise_allowed=False,
        channel_wise_default=False,
        channel_axis=0,
        weight_param=lambda l: l.inner_product_param,
        integer_accumulate=lambda x, w, g: numerics.exact_integer_matmul(x.reshape(x.shape[0], -1),
                                                                        w.reshape(w.shape[0], -1).T),
        integer_output_hw=lambda in_hw, g: [],
        weight_shape_mismatch=inner_product_weight_mismatch,
    ),
}
"""Quantizable Caffe layer types -> their :class:`QuantRule`.  Add an entry to support a type."""

WEIGHT_LAYER_TYPES = frozenset(layer_type for layer_type, rule in QUANTIZABLE_RULES.items() if rule.has_weights)
"""The quantizable types with weights: the layers whose weights the toolkit quantizes and checks."""


def layer_kind(layer: caffe_pb2.LayerParameter) -> str:
    """``layer``'s type as messages name it: its rule's ``kind`` (a Pooling by its method, "MAX Pooling")."""
    rule = QUANTIZABLE_RULES.get(layer.type)
    return rule.kind(layer) if rule is not None and rule.kind is not None else layer.type


def quantized_kinds() -> str:
    """The quantized layers' kinds for a message: "Convolution, ..., AVE Pooling"."""
    return ", ".join(rule.quantized_kind or layer_type for layer_type, rule in QUANTIZABLE_RULES.items())


def weight_shape_mismatch(layer: caffe_pb2.LayerParameter, shape: Iterable[int]) -> str | None:
    """How a weight blob of ``shape`` fails to fit ``layer``, a layer of a quantizable type with weights
    (its output channels and, for convolutions, the kernel), or None if it fits."""
    mismatch = QUANTIZABLE_RULES[layer.type].weight_shape_mismatch
    assert mismatch is not None, f"{layer.type} has no weights"  # callers check WEIGHT_LAYER_TYPES
    return mismatch(layer, tuple(shape))


def shape_constraint_broken(layer: caffe_pb2.LayerParameter, bottom_shape: Iterable[int]) -> str | None:
    """The broken constraint of a quantizable ``layer`` that only its input shape (N, C, H, W)
    shows, else None: a Pooling whose windows do not tile the input."""
    rule = QUANTIZABLE_RULES.get(layer.type)
    in_hw = tuple(bottom_shape)[2:]
    if rule is not None and rule.shape_constraint is not None and not rule.shape_constraint.check(layer, in_hw):
        return f"{rule.shape_constraint.text}, input {in_hw}"
    return None


def layers_by_name(net: caffe_pb2.NetParameter) -> dict[str, caffe_pb2.LayerParameter]:
    """Layer name -> layer, in net order. A net may list one name several times under different
    include{phase} rules (TRAIN and TEST data layers); the first definition stands for the name."""
    layers: dict[str, caffe_pb2.LayerParameter] = {}
    for layer in net.layer:
        if layer.name and layer.name not in layers:
            layers[layer.name] = layer
    return layers


def rule_for(layer: caffe_pb2.LayerParameter) -> QuantRule | None:
    """The rule of ``layer``'s type if layers like it are quantized (AVE, not MAX Pooling), else None."""
    rule = QUANTIZABLE_RULES.get(layer.type)
    if rule is None or (rule.applies is not None and not rule.applies(layer)):
        return None
    return rule


def _broken_constraints(layer: caffe_pb2.LayerParameter, rule: QuantRule) -> str | None:
    broken = [c.text for c in rule.constraints if not c.check(layer)]
    return "; ".join(broken) if broken else None


def quantizable_layers(net: caffe_pb2.NetParameter) -> tuple[list[str], dict[str, str]]:
    """Find the layers the backend can quantize.

    Returns ``(names, broken)``: ``names`` are the quantizable layer names in net
    order, each once; ``broken`` maps each layer of a quantizable type that breaks
    a constraint to the broken constraint(s) as text.  The caller decides whether a
    broken layer is a warning (found automatically) or an error (named by the user).
    """
    names: list[str] = []
    broken: dict[str, str] = {}
    for name, layer in layers_by_name(net).items():
        rule = rule_for(layer)
        if rule is None:
            continue
        why = _broken_constraints(layer, rule)
        if why is None:
            names.append(name)
        else:
            broken[name] = why
    return names, broken
