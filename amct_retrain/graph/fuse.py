"""Graph pass: fold BatchNorm (+ Scale) layers into the adjacent Convolution, Deconvolution
or InnerProduct (contract section 4), so that quantization sees the weights the target runs.

In inference form a BatchNorm followed by an optional per-channel Scale is one affine map
per channel, ``y = a * x + b``.  :func:`fold_affine` moves that map into a layer's weights
and bias; the four fusions differ only in which layer absorbs it and on which weight axis:

* ``conv_bn``: Convolution + BatchNorm (+ Scale), weights (C_out, C_in/group, kh, kw), axis 0;
* ``deconv_bn``: Deconvolution + BatchNorm (+ Scale), weights (C_in, C_out, kh, kw), axis 1;
* ``fc_bn``: InnerProduct + BatchNorm (+ Scale), weights (C_out, K), axis 0 (1 if transposed);
* ``bn_conv``: BatchNorm (+ Scale) + Convolution, the conv's input axis 1 and its bias.

Every pass takes a ``NetParameter`` and the weights (layer name -> float32 arrays, as
:func:`~amct_retrain.graph.model_io.read_caffemodel` returns them) and returns new ones; the
inputs are never modified (unchanged arrays are shared, not copied).

Design choices (not fixed by the contract):

* Blob names: when a BatchNorm / Scale follows the layer, the layer takes over the *last*
  removed top (``conv1 -> bn1 -> scale1`` becomes ``conv1 -> scale1``), so every consumer
  of the fused output, and any net output of that name, is unchanged; the only blob that
  disappears is the layer's own top, which had no reader but the BatchNorm.  When the
  BatchNorm comes first, the convolution is renamed to read the BatchNorm's bottom.
* Caffe reuses blob names for in-place layers, so adjacency is decided on blob *versions*
  (which write of a name a bottom reads), over the layers of every phase at once: a reader
  in any phase counts, which can only refuse a fusion, never allow a wrong one.
* A candidate that breaks a condition is left as it is, with a warning naming the
  condition; one opted out through ``skip`` is logged at INFO.
* Inference form: the fused models run in the TEST phase (calibration, conversion, the saved
  models) or with frozen statistics (retraining sets ``use_global_stats: true`` first).  There a
  BatchNorm with ``use_global_stats`` unset uses its stored statistics, as Caffe's default is
  ``use_global_stats = (phase == TEST)``: it fuses, as ``true`` does.  ``use_global_stats:
  false`` normalises with each batch's own statistics in every phase, TEST included: no fixed
  affine map exists to fold, so it is an error.
* A bias the layer lacked (``bias_term: false``) is created with Caffe's default
  ``lr_mult`` / ``decay_mult``.
"""
import logging
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np

from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.graph.model_io import ModelError
from amct_retrain.graph.netgraph import NOT_WRITTEN, BlobGraph, BlobVersion, phase_key, rebuilt_per_layer
from amct_retrain.layer_types import QUANTIZABLE_RULES

LOG = logging.getLogger(__name__)

Params = dict[str, list[np.ndarray]]
FusionResult = tuple[caffe_pb2.NetParameter, Params, list["FusedGroup"]]


@dataclass(frozen=True)
class FusedGroup:
    """One fusion, as the quant info file reports it: ``layer`` survives with the folded
    weights, ``removed`` are the BatchNorm (and Scale) layers it absorbed, in net order."""
    kind: str  # "conv_bn", "deconv_bn", "fc_bn" or "bn_conv"
    layer: str
    removed: tuple[str, ...]


def fold_affine(weights: np.ndarray, bias: np.ndarray | None, scale: np.ndarray, shift: np.ndarray,
                axis: int, out_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Fold the per-channel affine ``y = scale * x + shift`` on weight axis ``axis`` into a
    layer computing ``out[o] = sum(weights[..o..] * in) + bias[o]`` (o on ``out_axis``).

    ``axis == out_axis``: the affine follows the layer (Conv/Deconv/FC + BN), so
    ``w' = w * scale`` and ``bias' = scale * bias + shift``.  Otherwise it precedes it on the
    input channels (BN + Conv): ``w' = w * scale`` and ``bias' = bias + sum(w * shift)`` over
    every axis but ``out_axis``, exact only where each output reads whole, unpadded inputs.

    ``scale``, ``shift``: (weights.shape[axis],); ``bias``: (weights.shape[out_axis],) or
    None for none.  Computed in float64, returned as float32 (weights, bias).
    """
    w = np.asarray(weights, dtype=np.float64)
    b = np.zeros(w.shape[out_axis]) if bias is None else np.asarray(bias, dtype=np.float64)
    per_channel = [1] * w.ndim
    per_channel[axis] = -1
    if axis == out_axis:
        new_bias = scale * b + shift
    else:
        new_bias = b + (w * shift.reshape(per_channel)).sum(axis=tuple(i for i in range(w.ndim) if i != out_axis))
    return (w * scale.reshape(per_channel)).astype(np.float32), new_bias.astype(np.float32)


def batchnorm_affine(bn: caffe_pb2.LayerParameter, bn_blobs: list[np.ndarray],
                     scale: caffe_pb2.LayerParameter | None = None,
                     scale_blobs: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(a, b), float64 (C,): inference BatchNorm, then the optional Scale, as ``y = a*x + b``.

    Caffe's BatchNorm blobs: 0 = running mean sum, 1 = running variance sum, 2 = the moving
    average factor s (one value); mean = blob0 / s and var = blob1 / s, both 0 when s == 0
    (as Caffe does).  Scale: blob 0 = gamma, blob 1 = beta when ``scale_param.bias_term``.
    """
    mean_sum, var_sum, factor = (np.asarray(blob, dtype=np.float64).ravel() for blob in bn_blobs[:3])
    inv_factor = 0.0 if factor[0] == 0 else 1.0 / factor[0]
    a = 1.0 / np.sqrt(var_sum * inv_factor + bn.batch_norm_param.eps)
    b = -mean_sum * inv_factor * a
    if scale is not None:
        gamma = np.asarray(scale_blobs[0], dtype=np.float64).ravel()
        beta = np.asarray(scale_blobs[1], dtype=np.float64).ravel() if scale.scale_param.bias_term else 0.0
        a, b = gamma * a, gamma * b + beta
    return a, b


def check_inference_form(bn: caffe_pb2.LayerParameter) -> None:
    """Raise :class:`ModelError` unless the BatchNorm normalises with its stored statistics in
    the TEST phase, where the fused models run (see the module's design choices)."""
    param = bn.batch_norm_param
    if not param.HasField("use_global_stats") or param.use_global_stats:
        return
    raise ModelError(f"BatchNorm layer '{bn.name}': batch_norm_param {{ use_global_stats: false }} normalises "
                     "with each batch's own mean and variance, in the TEST phase too, so it has no fixed "
                     "per-channel scale and shift to fold into a layer; remove the field (Caffe then uses the "
                     "stored statistics in TEST) or set use_global_stats: true, or opt the layer out of fusion "
                     "(skip_fusion)")


def _is_channel_scale(layer: caffe_pb2.LayerParameter) -> bool:
    """A Scale with its own per-channel gamma (not a second bottom) on the channel axis."""
    p = layer.scale_param
    return (layer.type == "Scale" and len(layer.bottom) == 1 and len(layer.top) == 1
            and p.axis == 1 and p.num_axes == 1)


def _chain_refusal(net: caffe_pb2.NetParameter, name_count: Counter, chain: list[int]) -> str | None:
    """Why the layers ``chain`` (the weight layer, BatchNorm, optional Scale) cannot be merged,
    whatever their order: phase rules, name clashes (``name_count``: layers per name), shared
    weights; None if they can."""
    layers = [net.layer[i] for i in chain]
    if any(phase_key(layer) != phase_key(layers[0]) for layer in layers):
        return "the layers have different include/exclude phase rules"
    clashing = [layer.name for layer in layers if name_count[layer.name] > 1]
    if clashing:
        return f"layer name '{clashing[0]}' is not unique in the net"
    shared = [layer.name for layer in layers if any(spec.name for spec in layer.param)]
    if shared:
        return f"layer '{shared[0]}' shares its parameters with another layer (param name)"
    return None


def _blob_used_between(net: caffe_pb2.NetParameter, chain: list[int], name: str, reads_count: bool) -> bool:
    """Whether a layer outside ``chain``, between its first and last layer, writes (or, with
    ``reads_count``, reads) blob ``name``: moving a fused layer's blob across it would be wrong."""
    return any(name in net.layer[i].top or (reads_count and name in net.layer[i].bottom)
               for i in range(min(chain) + 1, max(chain)) if i not in chain)


def _blobs(params: Params, layer: caffe_pb2.LayerParameter, count: int) -> list[np.ndarray]:
    blobs = params.get(layer.name)
    if blobs is None or len(blobs) < count:
        raise ModelError(f"layer '{layer.name}' ({layer.type}): the weights hold "
                         f"{0 if blobs is None else len(blobs)} blobs for it, it needs {count}")
    return blobs


def _weight_param(layer: caffe_pb2.LayerParameter):
    """The message holding ``bias_term`` and ``axis`` of a layer with weights (``QuantRule.weight_param``)."""
    return QUANTIZABLE_RULES[layer.type].weight_param(layer)


def _folded_layer(layer: caffe_pb2.LayerParameter, bn_layers: list[caffe_pb2.LayerParameter], params: Params,
                  axis: int, out_axis: int) -> tuple[caffe_pb2.LayerParameter, list[np.ndarray]]:
    """A copy of the weight layer ``layer`` with the BatchNorm (+ Scale) ``bn_layers`` folded in on
    weight ``axis``, and its new [weights, bias]; checks inference form and channel counts."""
    bn, scale = bn_layers[0], (bn_layers[1] if len(bn_layers) > 1 else None)
    check_inference_form(bn)
    has_bias = _weight_param(layer).bias_term
    blobs = _blobs(params, layer, 2 if has_bias else 1)
    bn_blobs = _blobs(params, bn, 3)
    scale_blobs = _blobs(params, scale, 2 if scale.scale_param.bias_term else 1) if scale else None
    a, b = batchnorm_affine(bn, bn_blobs, scale, scale_blobs)
    channels = blobs[0].shape[axis]
    if a.size != channels:
        raise ModelError(f"layer '{layer.name}' has {channels} channels where BatchNorm '{bn.name}' "
                         f"{'and Scale ' + repr(scale.name) + ' ' if scale else ''}hold {a.size}")
    weights, bias = fold_affine(blobs[0], blobs[1] if has_bias else None, a, b, axis, out_axis)
    folded = caffe_pb2.LayerParameter()
    folded.CopyFrom(layer)
    _weight_param(folded).bias_term = True
    return folded, [weights, bias]


def _rebuild(net: caffe_pb2.NetParameter, params: Params,
             edits: dict[int, tuple[caffe_pb2.LayerParameter, list[np.ndarray]]],
             removed: set[int]) -> tuple[caffe_pb2.NetParameter, Params]:
    """New net and weights: layers ``removed`` dropped, ``edits`` (index -> layer, blobs) applied."""
    new_params = {name: list(blobs) for name, blobs in params.items()}
    for i in removed:
        new_params.pop(net.layer[i].name, None)
    for i, (_, blobs) in edits.items():
        new_params[net.layer[i].name] = blobs
    new_net = rebuilt_per_layer(net, lambda i, layer: [] if i in removed else [edits[i][0] if i in edits else layer])
    return new_net, new_params


def _refuse(kind: str, names: list[str], reason: str) -> None:
    LOG.warning("%s fusion of %s left undone: %s", kind, " + ".join(names), reason)


def _fold_into_producer(net: caffe_pb2.NetParameter, params: Params, skip: Collection[str], kind: str,
                        layer_type: str, out_axis: Callable[[caffe_pb2.LayerParameter], int],
                        refusal: Callable[[caffe_pb2.LayerParameter], str | None]) -> FusionResult:
    """Fold every BatchNorm (+ Scale) that directly follows a ``layer_type`` layer into it.

    ``out_axis(layer)``: the output channel axis of its weights; ``refusal(layer)``: why that
    layer's parameters forbid the fusion, or None.
    """
    graph, name_count = BlobGraph(net), Counter(layer.name for layer in net.layer)
    edits: dict[int, tuple[caffe_pb2.LayerParameter, list[np.ndarray]]] = {}
    removed: set[int] = set()
    groups: list[FusedGroup] = []
    for k, bn in enumerate(net.layer):
        if bn.type != "BatchNorm" or len(bn.bottom) != 1 or len(bn.top) != 1:
            continue
        source = graph.reads[k][0]
        if source.writer < 0 or net.layer[source.writer].type != layer_type:
            continue
        p = source.writer
        layer = net.layer[p]
        chain = [p, k]
        after_bn = graph.sole_reader(BlobVersion(bn.top[0], k))
        if (after_bn is not None and _is_channel_scale(net.layer[after_bn]) and net.layer[after_bn].name not in skip
                and _chain_refusal(net, name_count, [k, after_bn]) is None):
            chain.append(after_bn)
        names = [net.layer[i].name for i in chain]
        kept_blob = net.layer[chain[-1]].top[0]
        if any(name in skip for name in names[:2]):
            LOG.info("%s fusion of %s skipped (skip_fusion)", kind, " + ".join(names))
            continue
        reason = (refusal(layer) or _chain_refusal(net, name_count, chain)
                  or (f"blob '{layer.top[0]}' of layer '{layer.name}' has other readers besides '{bn.name}'"
                      if len(layer.top) != 1 or graph.sole_reader(source) != k else None)
                  or (f"another layer uses blob '{kept_blob}' between '{names[0]}' and '{names[-1]}'"
                      if _blob_used_between(net, chain, kept_blob, reads_count=True) else None))
        if reason:
            _refuse(kind, names, reason)
            continue
        axis = out_axis(layer)
        folded, blobs = _folded_layer(layer, [net.layer[i] for i in chain[1:]], params, axis, axis)
        folded.top[0] = kept_blob
        edits[p] = folded, blobs
        removed.update(chain[1:])
        groups.append(FusedGroup(kind, layer.name, tuple(names[1:])))
    return (*_rebuild(net, params, edits, removed), groups)


def _channel_axis_refusal(layer: caffe_pb2.LayerParameter) -> str | None:
    """BatchNorm normalises axis 1: the layer's output channels must be there."""
    axis = _weight_param(layer).axis
    return f"layer '{layer.name}' has its channels on axis {axis}, BatchNorm normalises axis 1" if axis != 1 else None


def _deconv_refusal(layer: caffe_pb2.LayerParameter) -> str | None:
    group = layer.convolution_param.group
    if group != 1:
        return f"Deconvolution '{layer.name}' has group {group}; only group 1 is folded"
    return _channel_axis_refusal(layer)


def fold_conv_batchnorm(net: caffe_pb2.NetParameter, params: Params, skip: Collection[str] = ()) -> FusionResult:
    """Convolution + BatchNorm (+ Scale) -> the Convolution, weights (C_out, C_in/group, kh, kw)
    scaled on axis 0 (any group, depthwise included) and a bias (created if absent)."""
    return _fold_into_producer(net, params, skip, "conv_bn", "Convolution", lambda layer: 0, _channel_axis_refusal)


def fold_deconv_batchnorm(net: caffe_pb2.NetParameter, params: Params, skip: Collection[str] = ()) -> FusionResult:
    """Deconvolution + BatchNorm (+ Scale) -> the Deconvolution, weights (C_in, C_out, kh, kw)
    scaled on axis 1.  A grouped Deconvolution (weights (C_in, C_out/group, ...)) is left
    unfused with a warning."""
    return _fold_into_producer(net, params, skip, "deconv_bn", "Deconvolution", lambda layer: 1, _deconv_refusal)


def fold_fc_batchnorm(net: caffe_pb2.NetParameter, params: Params, skip: Collection[str] = ()) -> FusionResult:
    """InnerProduct + BatchNorm (+ Scale) -> the InnerProduct, weights (C_out, K) scaled on
    axis 0 ((K, C_out) on axis 1 with ``transpose: true``)."""
    return _fold_into_producer(net, params, skip, "fc_bn", "InnerProduct",
                               lambda layer: 1 if layer.inner_product_param.transpose else 0,
                               _channel_axis_refusal)


def _next_conv_refusal(conv: caffe_pb2.LayerParameter) -> str | None:
    """Why the BatchNorm before ``conv`` cannot move into its weights, or None."""
    p = conv.convolution_param
    if len(conv.bottom) != 1:
        return f"Convolution '{conv.name}' has {len(conv.bottom)} bottoms"
    if p.group != 1:
        return f"Convolution '{conv.name}' has group {p.group}; only group 1 reads every input channel"
    if any(p.pad) or p.pad_h or p.pad_w:
        # The padded border holds zeros, not the BatchNorm's shift: the folded bias would be wrong there.
        return f"Convolution '{conv.name}' pads its input"
    return _channel_axis_refusal(conv)


def fold_batchnorm_into_next_conv(net: caffe_pb2.NetParameter, params: Params,
                                  skip: Collection[str] = ()) -> FusionResult:
    """BatchNorm (+ Scale) + Convolution -> the Convolution reading the BatchNorm's bottom, its
    weights (C_out, C_in, kh, kw) scaled on input axis 1 and the shift summed into its bias.

    Only for a Convolution with group 1 and no padding; others are left unfused.
    """
    graph, name_count = BlobGraph(net), Counter(layer.name for layer in net.layer)
    edits: dict[int, tuple[caffe_pb2.LayerParameter, list[np.ndarray]]] = {}
    removed: set[int] = set()
    groups: list[FusedGroup] = []
    for k, bn in enumerate(net.layer):
        if bn.type != "BatchNorm" or len(bn.bottom) != 1 or len(bn.top) != 1 or graph.reads[k][0].writer == NOT_WRITTEN:
            continue
        chain = [k]
        nxt = graph.sole_reader(BlobVersion(bn.top[0], k))
        if nxt is not None and _is_channel_scale(net.layer[nxt]):
            chain.append(nxt)
            nxt = graph.sole_reader(BlobVersion(net.layer[nxt].top[0], nxt))
        if nxt is None or net.layer[nxt].type != "Convolution":
            continue
        chain.append(nxt)
        conv = net.layer[nxt]
        names = [net.layer[i].name for i in chain]
        if any(name in skip for name in names):
            LOG.info("bn_conv fusion of %s skipped (skip_fusion)", " + ".join(names))
            continue
        source_blob = bn.bottom[0]
        reason = (_next_conv_refusal(conv) or _chain_refusal(net, name_count, chain)
                  or (f"another layer writes blob '{source_blob}' between '{bn.name}' and '{conv.name}'"
                      if _blob_used_between(net, chain, source_blob, reads_count=False) else None))
        if reason:
            _refuse("bn_conv", names, reason)
            continue
        folded, blobs = _folded_layer(conv, [net.layer[i] for i in chain[:-1]], params, 1, 0)
        folded.bottom[0] = source_blob
        edits[nxt] = folded, blobs
        removed.update(chain[:-1])
        groups.append(FusedGroup("bn_conv", conv.name, tuple(names[:-1])))
    return (*_rebuild(net, params, edits, removed), groups)


def fuse_batchnorm(net: caffe_pb2.NetParameter, params: Params, skip: Collection[str] = ()) -> FusionResult:
    """All four fusions; ``skip``: layer names (the records' ``skip_fusion``) never fused.

    The BatchNorms after a layer go first: folding into the producing layer is exact for any
    padding, so only a BatchNorm that no layer before absorbs is moved into the next conv.
    """
    groups: list[FusedGroup] = []
    for fusion in (fold_conv_batchnorm, fold_deconv_batchnorm, fold_fc_batchnorm, fold_batchnorm_into_next_conv):
        net, params, found = fusion(net, params, skip)
        groups.extend(found)
    return net, params, groups


def freeze_batchnorm_statistics(net: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    """A copy of ``net`` whose BatchNorm layers use their stored statistics in every phase
    (``use_global_stats: true``): retraining folds them into the weights before it starts."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    for layer in out.layer:
        if layer.type == "BatchNorm":
            layer.batch_norm_param.use_global_stats = True
    return out


def fuse_for_retraining(net: caffe_pb2.NetParameter, params: Params, skip: Collection[str] = ()) -> FusionResult:
    """The fusions of retraining (contract section 4): Conv+BN+Scale and Deconv+BN+Scale, with
    the BatchNorm statistics frozen, so the layer that is quantized and retrained is the very
    layer the deploy model runs (exact deploy parity)."""
    net = freeze_batchnorm_statistics(net)
    groups: list[FusedGroup] = []
    for fusion in (fold_conv_batchnorm, fold_deconv_batchnorm):
        net, params, found = fusion(net, params, skip)
        groups.extend(found)
    return net, params, groups
