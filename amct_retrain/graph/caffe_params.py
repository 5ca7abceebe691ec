"""Caffe layer parameters normalised the way Caffe itself reads them."""
from dataclasses import dataclass

from amct_retrain.caffe_proto import caffe_pb2


@dataclass(frozen=True)
class ConvGeometry:
    """2-D convolution geometry: (height, width) pairs and the group count."""
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]
    dilation: tuple[int, int]
    group: int


def _pair(repeated, h: int, w: int, has_hw: bool, default: int) -> tuple[int, int]:
    # Caffe: explicit _h/_w win; else one value for both dims, or one per dim; else the default.
    if has_hw:
        return int(h), int(w)
    values = list(repeated)
    if not values:
        return default, default
    return (int(values[0]), int(values[0])) if len(values) == 1 else (int(values[0]), int(values[1]))


def conv_geometry(layer: caffe_pb2.LayerParameter) -> ConvGeometry:
    """The 2-D geometry of a Convolution or Deconvolution layer."""
    p = layer.convolution_param
    return ConvGeometry(
        kernel=_pair(p.kernel_size, p.kernel_h, p.kernel_w, p.HasField("kernel_h"), 1),
        stride=_pair(p.stride, p.stride_h, p.stride_w, p.HasField("stride_h"), 1),
        pad=_pair(p.pad, p.pad_h, p.pad_w, p.HasField("pad_h"), 0),
        dilation=_pair(p.dilation, 1, 1, False, 1),
        group=int(p.group),
    )


@dataclass(frozen=True)
class PoolGeometry:
    """2-D pooling geometry as Caffe reads ``pooling_param``: (height, width) pairs."""
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]

    @property
    def window(self) -> int:
        """Elements in one full window: the divisor of an AVE pooling without partial windows."""
        return self.kernel[0] * self.kernel[1]


def pool_geometry(layer: caffe_pb2.LayerParameter) -> PoolGeometry:
    """The 2-D geometry of a (non-global) Pooling layer; unlike convolution_param, its fields are
    not repeated, so the one value stands for both dims unless _h/_w are given."""
    p = layer.pooling_param

    def pair(single: str, h: str, w: str) -> tuple[int, int]:
        if p.HasField(h) or p.HasField(w):
            return int(getattr(p, h)), int(getattr(p, w))
        return int(getattr(p, single)), int(getattr(p, single))

    return PoolGeometry(kernel=pair("kernel_size", "kernel_h", "kernel_w"),
                        stride=pair("stride", "stride_h", "stride_w"),
                        pad=pair("pad", "pad_h", "pad_w"))


def pool_windows_tile(layer: caffe_pb2.LayerParameter, in_hw) -> bool:
    """Whether the pooling windows tile an input of ``in_hw`` exactly, so that Caffe's ceil rounding
    adds no partial window (whose divisor would not be the window size)."""
    g = pool_geometry(layer)
    return all(size >= k and (size - k) % s == 0 for size, k, s in zip(in_hw, g.kernel, g.stride))


def _shape_mismatch(shape: tuple[int, ...], ok: bool, expected: str) -> str | None:
    return None if ok else f"weight blob has shape {shape}, the layer needs {expected}"


def inner_product_weight_mismatch(layer: caffe_pb2.LayerParameter, shape: tuple[int, ...]) -> str | None:
    """How an inner product's weight blob of ``shape`` fails to fit ``layer``'s num_output (on
    axis 1 if transposed, else 0), or None if it fits."""
    p = layer.inner_product_param
    ok = len(shape) == 2 and shape[1 if p.transpose else 0] == p.num_output
    return _shape_mismatch(shape, ok, f"(K, num_output {p.num_output})" if p.transpose
                           else f"(num_output {p.num_output}, K)")


def conv_weight_mismatch(layer: caffe_pb2.LayerParameter, shape: tuple[int, ...], transposed: bool) -> str | None:
    """How a 2-D convolution's weight blob of ``shape`` fails to fit ``layer``'s num_output and
    kernel, or None if it fits: (num_output, C/group, kh, kw), or (C, num_output/group, kh, kw)
    ``transposed`` (a deconvolution)."""
    geo = conv_geometry(layer)
    p = layer.convolution_param
    c = 1 if transposed else 0
    per_group = p.num_output // max(geo.group, 1) if transposed else p.num_output
    ok = len(shape) == 4 and shape[c] == per_group and shape[2:] == geo.kernel
    return _shape_mismatch(shape, ok, f"(C, num_output/group {per_group}, {geo.kernel[0]}, {geo.kernel[1]})"
                           if transposed else f"(num_output {per_group}, C/group, {geo.kernel[0]}, {geo.kernel[1]})")
