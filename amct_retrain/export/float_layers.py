"""Caffe's float layers as ONNX operators, for both exports (each checked against Caffe in the tests),
and the exact export's integer accumulator of each quantizable type (``EXACT_ACCUMULATORS``).

Every converter reads its bottoms from the :class:`Graph` and writes its tops, keeping Caffe's
semantics including its defaults; parameters ONNX cannot express raise a ModelError naming the
layer. Shapes stay symbolic where Caffe's parameters allow (the batch axis always).
"""
import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
from onnx import TensorProto

from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.export.graph import Graph, blob_count
from amct_retrain.graph.caffe_params import conv_geometry, pool_geometry
from amct_retrain.graph.model_io import ModelError
from amct_retrain.layer_types import QUANTIZABLE_RULES, weight_shape_mismatch

Converter = Callable[[Graph, caffe_pb2.LayerParameter, list[np.ndarray]], None]

_P = caffe_pb2.PoolingParameter
_E = caffe_pb2.EltwiseParameter
_R = caffe_pb2.ReductionParameter
_LRN = caffe_pb2.LRNParameter


def check_weight_shape(g: Graph, layer: caffe_pb2.LayerParameter, shape: Sequence[int]) -> None:
    """The weight blob's shape fits the layer: output channels and, for convolutions, the kernel."""
    wrong = weight_shape_mismatch(layer, shape)
    if wrong is not None:
        raise ModelError(f"{g.where(layer)}: {wrong}")


def linear_input(g: Graph, layer: caffe_pb2.LayerParameter, x: str) -> str:
    """``x`` as the layer's operator takes it: an InnerProduct's flattened from axis 1 to 2-D."""
    if layer.type != "InnerProduct" or g.rank(x) == 2:
        return x
    axis = layer.inner_product_param.axis
    if axis % g.rank(x) != 1:
        raise ModelError(f"{g.where(layer)}: axis {axis} is not supported (only axis 1, Caffe's default)")
    return g.op("Flatten", [x], rank=2, axis=1)


def check_conv_2d(g: Graph, layer: caffe_pb2.LayerParameter) -> None:
    p = layer.convolution_param
    if p.axis != 1 or len(p.kernel_size) > 2 or len(p.stride) > 2 or len(p.pad) > 2 or len(p.dilation) > 2:
        raise ModelError(f"{g.where(layer)}: only 2-D convolution over axis 1 is supported")


def conv_attrs(layer: caffe_pb2.LayerParameter) -> dict:
    """Conv / ConvTranspose / ConvInteger attributes of a (De)Convolution layer."""
    geo = conv_geometry(layer)
    return {"kernel_shape": list(geo.kernel), "strides": list(geo.stride), "dilations": list(geo.dilation),
            "pads": [geo.pad[0], geo.pad[1], geo.pad[0], geo.pad[1]], "group": geo.group}


def linear(g: Graph, layer: caffe_pb2.LayerParameter, x: str, weights: str, bias: str | None, out: str) -> None:
    """The Conv / ConvTranspose / Gemm node of a (float or quantized) layer, into ``out``."""
    operands = [linear_input(g, layer, x), weights] + ([bias] if bias else [])
    if layer.type == "InnerProduct":
        g.op("Gemm", operands, out, transB=0 if layer.inner_product_param.transpose else 1)
        return
    check_conv_2d(g, layer)
    g.op("Conv" if layer.type == "Convolution" else "ConvTranspose", operands, out, **conv_attrs(layer))


def output_rank(g: Graph, layer: caffe_pb2.LayerParameter, x: str) -> int:
    return 2 if layer.type == "InnerProduct" else g.rank(x)


def bias_term(layer: caffe_pb2.LayerParameter) -> bool:
    """Whether a Convolution / Deconvolution / InnerProduct layer has a bias blob."""
    return QUANTIZABLE_RULES[layer.type].weight_param(layer).bias_term


def _float_linear(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    blob_count(g, layer, params, 1 + bias_term(layer))
    check_weight_shape(g, layer, params[0].shape)
    x = g.bottoms(layer)[0]
    bias = g.const("bias", params[1].reshape(-1)) if len(params) > 1 else None
    linear(g, layer, x, g.const("weights", params[0]), bias, g.top(layer, output_rank(g, layer, x)))


def _same_rank(op_type: str, **attrs) -> Converter:
    """A one-input layer that keeps its input's shape."""
    def convert(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
        x = g.bottoms(layer)[0]
        g.op(op_type, [x], g.top(layer, g.rank(x)), **attrs)
    return convert


def _relu(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    slope = layer.relu_param.negative_slope
    x = g.bottoms(layer)[0]
    out = g.top(layer, g.rank(x))
    if slope:
        g.op("LeakyRelu", [x], out, alpha=float(slope))
    else:
        g.op("Relu", [x], out)


def _prelu(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    blob_count(g, layer, params, 1)
    x = g.bottoms(layer)[0]
    rank = g.rank(x)
    # One slope per channel (axis 1), or one for all: broadcast over the axes after the channels.
    slope = params[0].reshape((-1,) + (1,) * (rank - 2))
    g.op("PRelu", [x, g.const("slope", slope)], g.top(layer, rank))


def _elu(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    _same_rank("Elu", alpha=float(layer.elu_param.alpha))(g, layer, params)


def _affine(g: Graph, x: str, scale: float, shift: float, out: str | None = None) -> str:
    """``x * scale + shift``, leaving out a factor 1 and a term 0 as Caffe does."""
    if scale != 1:
        x = g.op("Mul", [x, g.const("scale", np.float32(scale))], None if shift else out)
    if shift:
        x = g.op("Add", [x, g.const("shift", np.float32(shift))], out)
    return x if x == out or out is None else g.op("Identity", [x], out)


def _power(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    p = layer.power_param
    x = g.bottoms(layer)[0]
    out = g.top(layer, g.rank(x))
    if p.power == 1:
        _affine(g, x, p.scale, p.shift, out)
    else:
        g.op("Pow", [_affine(g, x, p.scale, p.shift), g.const("power", np.float32(p.power))], out)


def _exp(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    # Caffe: y = base^(shift + scale*x) as exp(x * scale*ln(base)) * base^shift.
    p = layer.exp_param
    log_base = 1.0 if p.base == -1 else math.log(p.base)
    outer = 1.0 if p.shift == 0 else math.exp(p.shift) if p.base == -1 else p.base ** p.shift
    x = g.bottoms(layer)[0]
    out = g.top(layer, g.rank(x))
    y = g.op("Exp", [_affine(g, x, np.float32(log_base * p.scale), 0)], out if outer == 1 else None)
    if outer != 1:
        g.op("Mul", [y, g.const("outer_scale", np.float32(outer))], out)


def _log(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    # Caffe: y = log(shift + scale*x) / ln(base).
    p = layer.log_param
    base_scale = 1.0 if p.base == -1 else 1 / math.log(p.base)
    x = g.bottoms(layer)[0]
    out = g.top(layer, g.rank(x))
    y = g.op("Log", [_affine(g, x, p.scale, p.shift)], out if base_scale == 1 else None)
    if base_scale != 1:
        g.op("Mul", [y, g.const("base_scale", np.float32(base_scale))], out)


def _threshold(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    x = g.bottoms(layer)[0]
    above = g.op("Greater", [x, g.const("threshold", np.float32(layer.threshold_param.threshold))])
    g.op("Cast", [above], g.top(layer, g.rank(x)), to=1)  # 1: FLOAT


def _softmax(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    # Opset 13+ Softmax normalises over the one axis, as Caffe does.
    _same_rank("Softmax", axis=layer.softmax_param.axis)(g, layer, params)


def _lrn(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    p = layer.lrn_param
    x = g.bottoms(layer)[0]
    out = g.top(layer, g.rank(x))
    if p.norm_region == _LRN.ACROSS_CHANNELS:
        # ONNX LRN is Caffe's: x / (k + alpha/n * sum of squares over n channels)^beta.
        g.op("LRN", [x], out, size=p.local_size, alpha=float(p.alpha), beta=float(p.beta), bias=float(p.k))
        return
    # WITHIN_CHANNEL, as Caffe composes it: x * (1 + alpha * AVE pool of x^2 over n x n)^-beta
    # (the pool pads by (n-1)/2 and divides by n*n everywhere; Caffe ignores k here).
    pad = (p.local_size - 1) // 2
    mean_sq = g.op("AveragePool", [g.op("Mul", [x, x])], kernel_shape=[p.local_size] * 2, strides=[1, 1],
                   pads=[pad] * 4, count_include_pad=1)
    norm = g.op("Pow", [_affine(g, mean_sq, p.alpha, 1.0), g.const("power", np.float32(-p.beta))])
    g.op("Mul", [x, norm], out)


def _pool_pair(p: caffe_pb2.PoolingParameter, single: str, h: str, w: str) -> list[int]:
    """Caffe's pooling geometry: explicit _h/_w win over the one value for both."""
    if p.HasField(h) or p.HasField(w):
        return [getattr(p, h), getattr(p, w)]
    return [getattr(p, single)] * 2


def _pooling(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    p = layer.pooling_param
    if p.pool not in (_P.MAX, _P.AVE):
        # STOCHASTIC: Caffe's CPU forward is NOT_IMPLEMENTED, so there is no reference to follow.
        raise ModelError(f"{g.where(layer)}: pool method {_P.PoolMethod.Name(p.pool)} is not supported (MAX, AVE)")
    pool_node(g, layer, g.bottoms(layer)[0], g.top(layer, 4))


def pool_node(g: Graph, layer: caffe_pb2.LayerParameter, x: str, out: str) -> None:
    """The pooling node of a (float or quantized) Pooling layer, from ``x`` into ``out``."""
    p = layer.pooling_param
    method = p.pool
    if p.global_pooling:
        g.op("GlobalMaxPool" if method == _P.MAX else "GlobalAveragePool", [x], out)
        return
    pad = _pool_pair(p, "pad", "pad_h", "pad_w")
    # With ceil_mode, onnxruntime drops a last window that starts in the right padding, as
    # Caffe does; and Caffe's AVE divisor, the window clipped to the padded input, is
    # onnxruntime's count_include_pad. (Caffe keeps a window starting past an unpadded input,
    # kernel < stride: an empty window, -FLT_MAX or a negative divisor; ONNX drops it.)
    attrs = {"kernel_shape": _pool_pair(p, "kernel_size", "kernel_h", "kernel_w"),
             "strides": _pool_pair(p, "stride", "stride_h", "stride_w"), "pads": pad + pad,
             "ceil_mode": int(p.ceil_mode)}
    if method == _P.AVE:
        g.op("AveragePool", [x], out, count_include_pad=1, **attrs)
    else:
        g.op("MaxPool", [x], out, **attrs)


def _eltwise(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    p = layer.eltwise_param
    xs = g.bottoms(layer, 2, None)
    out = g.top(layer, g.rank(xs[0]))
    if p.operation == _E.SUM:
        if p.coeff and len(p.coeff) != len(xs):
            raise ModelError(f"{g.where(layer)}: {len(p.coeff)} coeff values for {len(xs)} bottoms")
        coeffs = list(p.coeff) or [1.0] * len(xs)
        terms = [x if c == 1 else g.op("Mul", [x, g.const("coeff", np.float32(c))]) for x, c in zip(xs, coeffs)]
        g.op("Add" if len(terms) == 2 else "Sum", terms, out)  # Add: what QDQ consumers quantize
    elif p.operation == _E.MAX:
        g.op("Max", xs, out)
    else:  # PROD: Mul is binary in ONNX
        g.op("Mul", [functools.reduce(lambda a, b: g.op("Mul", [a, b]), xs[:-1]), xs[-1]], out)


def _concat(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    p = layer.concat_param
    xs = g.bottoms(layer, 1, None)
    axis = p.concat_dim if p.HasField("concat_dim") else p.axis  # concat_dim: the deprecated spelling
    g.op("Concat", xs, g.top(layer, g.rank(xs[0])), axis=axis)


def _slice(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    p = layer.slice_param
    x = g.bottoms(layer)[0]
    rank = g.rank(x)
    axis = (p.slice_dim if p.HasField("slice_dim") else p.axis) % rank
    tops = list(layer.top)
    if not p.slice_point:  # equal parts
        outs = [g.write(t, layer.name, rank) for t in tops]
        g.op("Split", [x], outputs=outs, axis=axis, num_outputs=len(tops))
        return
    if len(p.slice_point) != len(tops) - 1:
        raise ModelError(f"{g.where(layer)}: {len(p.slice_point)} slice_point values for {len(tops)} tops")
    bounds = [0, *p.slice_point, np.iinfo(np.int64).max]
    for t, start, end in zip(tops, bounds, bounds[1:]):
        g.op("Slice", [x, g.const("start", np.array([start], np.int64)), g.const("end", np.array([end], np.int64)),
                       g.const("axis", np.array([axis], np.int64))], g.write(t, layer.name, rank))


def _split(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    x = g.bottoms(layer)[0]
    for t in layer.top:
        g.op("Identity", [x], g.write(t, layer.name, g.rank(x)))


def _crop(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    # The axes from ``axis`` on take the second bottom's sizes, starting at ``offset``.
    p = layer.crop_param
    x, like = g.bottoms(layer, 2, 2)
    rank = g.rank(x)
    axis = p.axis % rank
    n = rank - axis
    if len(p.offset) not in (0, 1, n):
        raise ModelError(f"{g.where(layer)}: {len(p.offset)} offset values for the {n} cropped axes")
    offsets = np.array(list(p.offset) * n if len(p.offset) == 1 else list(p.offset) or [0] * n, np.int64)
    starts = g.const("start", offsets)
    ends = g.op("Add", [g.op("Shape", [like], start=axis), starts])
    g.op("Slice", [x, starts, ends, g.const("axes", np.arange(axis, rank, dtype=np.int64))], g.top(layer, rank))


def _argmax(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    # Ties: Caffe sorts (value, index) pairs descending, the larger index first; TopK the smaller.
    p = layer.argmax_param
    x = g.bottoms(layer)[0]
    rank = g.rank(x)
    k = g.const("k", np.array([p.top_k], np.int64))
    if p.HasField("axis"):
        axis = p.axis % rank
        values, indices = g.fresh(f"{layer.name}/values"), g.fresh(f"{layer.name}/indices")
        g.op("TopK", [x, k], outputs=[values, indices], axis=axis)
        out = g.top(layer, rank)
        if p.out_max_val:
            g.op("Identity", [values], out)
        else:
            g.op("Cast", [indices], out, to=1)
        return
    # Over everything but the first axis: (N, 1, top_k) indices, or (N, 2, top_k) indices and
    # values, padded with 1-sized axes to the input's rank (at least 3 axes).
    values, indices = g.fresh(f"{layer.name}/values"), g.fresh(f"{layer.name}/indices")
    g.op("TopK", [g.op("Flatten", [x], axis=1), k], outputs=[values, indices], axis=1)
    one = g.const("axis1", np.array([1], np.int64))
    rows = [g.op("Unsqueeze", [g.op("Cast", [indices], to=1), one])]
    if p.out_max_val:
        rows.append(g.op("Unsqueeze", [values, one]))
    out_rank = max(rank, 3)
    out = g.top(layer, out_rank)
    trailing = np.arange(3, out_rank, dtype=np.int64)
    stacked = g.op("Concat", rows, None if trailing.size else out, axis=1) if len(rows) > 1 else rows[0]
    if trailing.size:
        g.op("Unsqueeze", [stacked, g.const("trailing", trailing)], out)
    elif stacked != out:
        g.op("Identity", [stacked], out)


def _shape_slice(g: Graph, x: str, start: int, end: int | None = None) -> str:
    return g.op("Shape", [x], start=start, **({} if end is None else {"end": end}))


def _reshape_to(g: Graph, layer: caffe_pb2.LayerParameter, x: str, head: list[int], tail_from: int | None,
                rank: int) -> None:
    """Reshape to ``head`` (ONNX's 0 copies the input's dimension at the same index and -1 is
    inferred: Caffe's rules) followed by the input's dimensions from ``tail_from`` on."""
    shape = g.const("shape", np.array(head, np.int64))
    if tail_from is not None and tail_from < g.rank(x):
        shape = g.op("Concat", [shape, _shape_slice(g, x, tail_from)], axis=0)
    g.op("Reshape", [x, shape], g.top(layer, rank))


def _flatten(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    p = layer.flatten_param
    x = g.bottoms(layer)[0]
    rank = g.rank(x)
    axis, end = p.axis % rank, p.end_axis % rank
    _reshape_to(g, layer, x, [0] * axis + [-1], end + 1, axis + rank - end)


def _reshape(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    p = layer.reshape_param
    x = g.bottoms(layer)[0]
    rank = g.rank(x)
    start = p.axis if p.axis >= 0 else rank + p.axis + 1  # Caffe's ReshapeLayer
    end = rank if p.num_axes == -1 else start + p.num_axes
    if not 0 <= start <= end <= rank:
        raise ModelError(f"{g.where(layer)}: axis {p.axis} / num_axes {p.num_axes} do not fit a {rank}-axis input")
    dims = list(p.shape.dim)
    _reshape_to(g, layer, x, [0] * start + dims, end, start + len(dims) + rank - end)


def _batch_norm(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    p = layer.batch_norm_param
    if p.HasField("use_global_stats") and not p.use_global_stats:
        raise ModelError(f"{g.where(layer)}: use_global_stats false normalises by the batch's own statistics; "
                         "an inference graph needs the stored ones")
    blob_count(g, layer, params, 3)
    mean, var, factor = params
    # Caffe stores running sums and their weight (0 means no statistics yet: zeros).
    f = float(factor.reshape(-1)[0])
    scale = np.float32(0 if f == 0 else 1 / f)
    x = g.bottoms(layer)[0]
    channels = mean.size
    g.op("BatchNormalization",
         [x, g.const("gamma", np.ones(channels, np.float32)), g.const("beta", np.zeros(channels, np.float32)),
          g.const("mean", mean.reshape(-1) * scale), g.const("var", var.reshape(-1) * scale)],
         g.top(layer, g.rank(x)), epsilon=float(p.eps))


def _broadcast_from(g: Graph, layer: caffe_pb2.LayerParameter, factor, x_rank: int, axis: int) -> str:
    """A scale or bias (a blob array, or a second bottom's tensor) laid over axes ``axis``...
    of an ``x_rank``-axis input: Caffe's alignment, as ONNX's trailing broadcasting."""
    axis %= x_rank
    if isinstance(factor, np.ndarray):
        trailing = x_rank - axis - factor.ndim
        if trailing < 0:
            raise ModelError(f"{g.where(layer)}: blob of shape {factor.shape} does not fit a "
                             f"{x_rank}-axis input from axis {axis}")
        return g.const("factor", factor.reshape(factor.shape + (1,) * trailing))
    rank = g.rank(factor)
    trailing = x_rank - axis - rank
    if trailing < 0:
        raise ModelError(f"{g.where(layer)}: the second bottom has {rank} axes, too many from axis {axis}")
    return g.op("Unsqueeze", [factor, g.const("axes", np.arange(rank, rank + trailing, dtype=np.int64))]) \
        if trailing else factor


def _scale_or_bias(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray], p, op_type: str,
                   with_bias: bool) -> None:
    xs = g.bottoms(layer, 1, 2)
    x, rank = xs[0], g.rank(xs[0])
    blob_count(g, layer, params, (len(xs) == 1) + with_bias)
    factor = xs[1] if len(xs) == 2 else params[0]
    out = g.top(layer, rank)
    y = g.op(op_type, [x, _broadcast_from(g, layer, factor, rank, p.axis)], None if with_bias else out)
    if with_bias:
        g.op("Add", [y, _broadcast_from(g, layer, params[-1], rank, p.axis)], out)


def _scale(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    # One bottom: blob 0 is the scale (blob 1 the bias); two: the second bottom is the scale.
    _scale_or_bias(g, layer, params, layer.scale_param, "Mul", layer.scale_param.bias_term)


def _bias(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    _scale_or_bias(g, layer, params, layer.bias_param, "Add", False)


def _reduction(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    # Caffe reduces every axis from ``axis`` on: the top has the first ``axis`` axes.
    p = layer.reduction_param
    x = g.bottoms(layer)[0]
    rank = g.rank(x)
    axis = p.axis % rank
    op_type = {_R.SUM: "ReduceSum", _R.ASUM: "ReduceL1", _R.SUMSQ: "ReduceSumSquare", _R.MEAN: "ReduceMean"}
    out = g.top(layer, axis)
    y = g.op(op_type[p.operation], [x, g.const("axes", np.arange(axis, rank, dtype=np.int64))],
             None if p.coeff != 1 else out, keepdims=0)
    if p.coeff != 1:
        g.op("Mul", [y, g.const("coeff", np.float32(p.coeff))], out)


def _mvn(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    # Mean (and variance, sqrt(E[(x - mean)^2]) + eps) per sample, or per sample and channel.
    p = layer.mvn_param
    x = g.bottoms(layer)[0]
    rank = g.rank(x)
    axes = g.const("axes", np.arange(1 if p.across_channels else 2, rank, dtype=np.int64))
    out = g.top(layer, rank)
    centred = g.op("Sub", [x, g.op("ReduceMean", [x, axes], keepdims=1)], None if p.normalize_variance else out)
    if p.normalize_variance:
        std = g.op("Sqrt", [g.op("ReduceMean", [g.op("Mul", [centred, centred]), axes], keepdims=1)])
        g.op("Div", [centred, g.op("Add", [std, g.const("eps", np.float32(p.eps))])], out)


def _tile(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    p = layer.tile_param
    x = g.bottoms(layer)[0]
    repeats = np.ones(g.rank(x), np.int64)
    repeats[p.axis % g.rank(x)] = p.tiles
    g.op("Tile", [x, g.const("repeats", repeats)], g.top(layer, g.rank(x)))


def _embed(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    # Row lookup by the bottom's values (Caffe truncates them to integers, as Cast does).
    p = layer.embed_param
    blob_count(g, layer, params, 1 + p.bias_term)
    x = g.bottoms(layer)[0]
    out = g.top(layer, g.rank(x) + 1)
    y = g.op("Gather", [g.const("weights", params[0]), g.op("Cast", [x], to=7)], None if p.bias_term else out)
    if p.bias_term:
        g.op("Add", [y, g.const("bias", params[1].reshape(-1))], out)


def _batch_reindex(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    x, index = g.bottoms(layer, 2, 2)
    g.op("Gather", [x, g.op("Cast", [index], to=7)], g.top(layer, g.rank(x)), axis=0)


def _parameter(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    blob_count(g, layer, params, 1)
    g.op("Identity", [g.const("value", params[0])], g.top(layer, params[0].ndim))


def _silence(g: Graph, layer: caffe_pb2.LayerParameter, params: list[np.ndarray]) -> None:
    g.bottoms(layer, 1, None)  # read: no graph output for them


# --------------------------------------------------------------------------- quantized layers' accumulators
# The exact export's integer form of each quantizable type (export/onnx.py): the int32 accumulator of
# the Quant layer's float codes ``k`` (offset ``offset``: int8 codes are k + offset), the weights'
# zero point ``zero_point`` (the int8 offset, the real value 0), with the layer's int8 ``weights``
# (None without) and ``channels`` output channels.

ExactAccumulator = Callable[[Graph, caffe_pb2.LayerParameter, str, int, str, np.ndarray | None, int], str]


def int8_codes(g: Graph, k: str, offset: int) -> str:
    """The int8 codes k + offset of the Quant layer's float codes ``k``."""
    return g.op("Cast", [g.op("Add", [k, g.const("offset", np.float32(offset))])], to=TensorProto.INT8,
                rank=g.rank(k))


def _matmul_integer(g: Graph, layer: caffe_pb2.LayerParameter, k: str, offset: int, zero_point: str,
                    weights: np.ndarray, channels: int) -> str:
    w = weights if layer.inner_product_param.transpose else weights.T
    return g.op("MatMulInteger", [int8_codes(g, k, offset), g.const("weights_int8", np.ascontiguousarray(w)), zero_point])


def _conv_integer(g: Graph, layer: caffe_pb2.LayerParameter, k: str, offset: int, zero_point: str,
                  weights: np.ndarray, channels: int) -> str:
    check_conv_2d(g, layer)
    return g.op("ConvInteger", [int8_codes(g, k, offset), g.const("weights_int8", weights), zero_point],
                **conv_attrs(layer))


def _spread_for_deconv(g: Graph, layer: caffe_pb2.LayerParameter, k: str, channels: int) -> str:
    """The codes ``stride`` apart with zeros between, padded by ``kernel - 1 - pad`` (cropped
    where negative): what a stride-1 convolution by the flipped kernel turns into the
    Deconvolution. The spreading is a ConvTranspose by a 1x1 kernel of ones, exact."""
    geo = conv_geometry(layer)
    ones = g.const("spread_ones", np.ones((channels, 1, 1, 1), np.float32))
    spread = g.op("ConvTranspose", [k, ones], kernel_shape=[1, 1], strides=list(geo.stride), group=channels)
    pads = [kernel - 1 - pad for kernel, pad in zip(geo.kernel, geo.pad)]
    return g.op("Pad", [spread, g.const("pads", np.array([0, 0, *pads, 0, 0, *pads], np.int64))], rank=4)


def _deconv_integer(g: Graph, layer: caffe_pb2.LayerParameter, k: str, offset: int, zero_point: str,
                    weights: np.ndarray, channels: int) -> str:
    """A ConvInteger of the flipped kernel over the spread codes (group 1, dilation 1)."""
    check_conv_2d(g, layer)
    flipped = np.ascontiguousarray(weights.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
    spread = _spread_for_deconv(g, layer, k, weights.shape[0])
    return g.op("ConvInteger", [int8_codes(g, spread, offset), g.const("flipped_weights_int8", flipped), zero_point],
                kernel_shape=list(flipped.shape[2:]))


def _window_sums_integer(g: Graph, layer: caffe_pb2.LayerParameter, k: str, offset: int, zero_point: str,
                         weights: None, channels: int) -> str:
    """AVE Pooling: the integer window sums, a depthwise convolution by ones (its 1/n is in deq)."""
    geo = pool_geometry(layer)  # quantized: windows that tile the input, no pad
    attrs = {"kernel_shape": list(geo.kernel), "strides": list(geo.stride)}
    return g.op("ConvInteger", [int8_codes(g, k, offset), g.const("window_ones", np.ones(
        (channels, 1, *attrs["kernel_shape"]), np.int8)), zero_point], group=channels, **attrs)


EXACT_ACCUMULATORS: dict[str, ExactAccumulator] = {
    "Convolution": _conv_integer, "Deconvolution": _deconv_integer, "InnerProduct": _matmul_integer,
    "Pooling": _window_sums_integer,
}
"""Quantizable type -> the exact export's integer accumulator (one per entry of QUANTIZABLE_RULES)."""


FLOAT_CONVERTERS: dict[str, Converter] = {
    "Convolution": _float_linear, "Deconvolution": _float_linear, "InnerProduct": _float_linear,
    "ReLU": _relu, "PReLU": _prelu, "ELU": _elu, "Sigmoid": _same_rank("Sigmoid"), "TanH": _same_rank("Tanh"),
    "AbsVal": _same_rank("Abs"), "BNLL": _same_rank("Softplus"), "Power": _power, "Exp": _exp, "Log": _log,
    "Threshold": _threshold, "Dropout": _same_rank("Identity"),  # identity at inference
    "Softmax": _softmax, "LRN": _lrn, "Pooling": _pooling, "Eltwise": _eltwise, "Concat": _concat,
    "Slice": _slice, "Split": _split, "Crop": _crop, "ArgMax": _argmax, "Flatten": _flatten, "Reshape": _reshape,
    "BatchNorm": _batch_norm, "Scale": _scale, "Bias": _bias, "Reduction": _reduction, "MVN": _mvn,
    "Tile": _tile, "Embed": _embed, "BatchReindex": _batch_reindex, "Parameter": _parameter,
    "Silence": _silence,
}
