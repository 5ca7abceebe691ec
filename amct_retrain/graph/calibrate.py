"""Graph pass: add the calibration observers to a (fused) float net.

The calibration model computes exactly what the float model computes: every observer is a Python
layer in place on a blob that passes its data through unchanged and, in the TEST phase, keeps what
it sees until it has the ``batch_num`` batches it needs (``layers/calibration.py``):

* one ActivationObserver per distinct input of the quantized layers: the layers that read the same
  version of the same blob under the same phase rules share it (as they share one ActivationULQ in
  retraining, :func:`~amct_retrain.graph.insert.activation_quantizer_owners`), so they share scale_d;
* one ShiftNObserver on each quantized layer's output, right after the layer, so it runs after
  the activation observer of the same forward pass.

Observers are in place (contract section 6): a blob version that an in-place layer rewrites must
have no other reader, or Caffe's automatic split fails. So an ActivationObserver goes right before
the first layer, quantized or not, that reads the version it observes: from then on every reader of
that version reads the observer's (identical) output instead.
"""
from collections.abc import Mapping

from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.graph import quant_layers as ql
from amct_retrain.graph.netgraph import BlobGraph, rebuilt_per_layer, with_phase_rules_of
from amct_retrain.numerics import DEFAULT_BITS


def insert_calibration_layers(net: caffe_pb2.NetParameter, layers: Mapping[str, Mapping[str, float]],
                              owners: Mapping[str, str], record_file: str, batch_num: int,
                              activation_offset: bool,
                              num_bits_d: Mapping[str, int] | None = None) -> caffe_pb2.NetParameter:
    """A copy of ``net`` with the calibration observers of the quantized ``layers`` (name -> the
    arguments of :func:`~amct_retrain.numerics.ifmr_search` for its input, ``IfmrParams.ifmr_kwargs()``).

    ``owners``: quantized layer -> the quantized layer owning its activation observer (the first
    reader of its input, :func:`~amct_retrain.graph.insert.activation_quantizer_owners`); sharers
    must have equal IFMR settings. ``record_file`` (absolute) receives every factor;
    ``activation_offset`` false makes the activation ranges symmetric; ``num_bits_d``: quantized layer ->
    the bit width of its activations (8 where absent; an observer takes its owner's). Inputs are not modified.
    """
    graph = BlobGraph(net)
    index: dict[str, int] = {}
    for i, layer in enumerate(net.layer):
        if layer.name in layers:
            index.setdefault(layer.name, i)
    observers_before: dict[int, list[caffe_pb2.LayerParameter]] = {}
    for owner in dict.fromkeys(owners.values()):  # owners in net order, each once
        owner_layer = net.layer[index[owner]]
        blob = owner_layer.bottom[0]
        served = [name for name in layers if owners[name] == owner]
        observer = ql.activation_observer_layer(
            ql.activation_observer_name(owner), blob, served, record_file, batch_num,
            layers[owner], symmetric=not activation_offset,
            num_bits_d=(num_bits_d or {}).get(owner, DEFAULT_BITS))
        observers_before.setdefault(graph.first_reader(graph.reads[index[owner]][0]), []).extend(
            with_phase_rules_of(owner_layer, observer))

    def observed(i: int, layer: caffe_pb2.LayerParameter) -> list[caffe_pb2.LayerParameter]:
        out = [*observers_before.get(i, []), layer]
        if index.get(layer.name) == i:
            out += with_phase_rules_of(layer, ql.shift_n_observer_layer(
                ql.shift_n_observer_name(layer.name), layer.top[0], layer.name, record_file, batch_num))
        return out
    return rebuilt_per_layer(net, observed)
