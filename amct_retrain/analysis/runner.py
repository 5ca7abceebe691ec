"""analyze(): the float and the fake-quant model on the same TEST batches, layer by layer.

How the two nets get identical batches: the float net reads its own data layers (LMDB Data,
HDF5Data, DummyData, ...) or the inputs the user feeds; the fake-quant net is built with each
of its data layers replaced by an Input layer, and each batch the float net's data layers
produced is copied into it. Only one net ever opens a data source, so this works for every
data layer type (with a user's own Caffe too, whose Data layers may not share an LMDB between
two nets), and for DummyData, whose random batches two nets would otherwise draw apart.

Outputs are read right after the layer that writes them (an in-place ReLU later rewrites the
blob); inputs right before the fake-quant layer reads them. For a layer whose BatchNorm and
Scale were folded into it, the float output is the one after the folded Scale.
"""
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from google.protobuf import text_format
from tqdm import tqdm

from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain import numerics, tensorboard
from amct_retrain.analysis import metrics
from amct_retrain.errors import AnalysisError, ArgumentError, LayerParamError, ModelError, OutputPathError
from amct_retrain.fileio import check_outputs_are_not_inputs
from amct_retrain.graph import model_io
from amct_retrain.graph.saved_nets import quant_layer_names
from amct_retrain.graph.netgraph import rebuilt, runs_in_phase, with_phase_rules_of
from amct_retrain.layer_specs import FAKE_QUANT_ACTIVATION, REQUANTIZE
from amct_retrain.layer_types import QUANTIZABLE_RULES

LOG = logging.getLogger(__name__)
Batch = Mapping[str, np.ndarray]
Inputs = Callable[[int], Batch] | Sequence[Batch] | None
FOLDED_TYPES = ("BatchNorm", "Scale")


@dataclass(frozen=True)
class FakeQuantLayer:
    """One quantized layer of a saved fake-quant model, as its FakeQuantActivation and
    Requantize layers describe it."""
    name: str
    type: str
    input_blob: str       # what FakeQuantActivation reads (the float-valued input)
    output_blob: str
    scale_d: float
    offset_d: int
    deq: np.ndarray       # float32 (C,) or (1,)
    shift_bit: np.ndarray  # int64 (C,)
    bit_width: int

    @property
    def scale_w(self) -> np.ndarray:
        """float32 (C,) or (1,): deq / scale_d (equal to the record's scale_w up to float32 rounding)."""
        return (self.deq.astype(np.float64) / self.scale_d).astype(np.float32)


def fake_quant_layers(net: caffe_pb2.NetParameter, model_file: str) -> dict[str, FakeQuantLayer]:
    """The quantized layers of a saved fake-quant model, in net order: each layer ``L`` that
    has a ``L_fake_quant`` FakeQuantActivation and a ``L_requantize`` Requantize layer."""
    python = {layer.name: layer for layer in net.layer if layer.type == "Python"}
    found = {}
    for layer in net.layer:
        names = quant_layer_names(layer.name)
        fq, rq = python.get(names["fake_quant"]), python.get(names["requantize"])
        if fq is None or rq is None or fq.python_param.layer != "FakeQuantActivation":
            continue
        try:
            fq_params = FAKE_QUANT_ACTIVATION.parse(fq.python_param.param_str)
            rq_params = REQUANTIZE.parse(rq.python_param.param_str)
            found[layer.name] = FakeQuantLayer(
                layer.name, layer.type, fq.bottom[0], layer.top[0], float(np.float32(fq_params["scale_d"])),
                int(fq_params["offset_d"]), np.asarray(rq_params["deq"], np.float32),
                np.asarray(rq_params["shift_bit"], np.int64), int(fq_params["num_bits_d"]))
        except (LayerParamError, ValueError, KeyError, TypeError) as err:
            raise ModelError(f"{model_file}: layer '{fq.name}' or '{rq.name}': param_str does not describe "
                             f"a fake-quant layer ({err!r})") from None
    if not found:
        raise ModelError(f"{model_file}: no quantized layer (no FakeQuantActivation + Requantize pair): "
                         "pass the fake-quant model that save_quant_retrain_model or save_model wrote")
    return found


def fed_net(net: caffe_pb2.NetParameter, shapes: Mapping[str, tuple[int, ...]], model_file: str
            ) -> caffe_pb2.NetParameter:
    """Graph pass: every layer without bottoms that may run in TEST (the data layers) becomes
    an Input layer of the same name and tops, with ``shapes`` (blob -> shape) of its tops."""
    def fed(layer: caffe_pb2.LayerParameter) -> caffe_pb2.LayerParameter:
        if layer.bottom or not runs_in_phase(layer, caffe_pb2.TEST):
            return layer
        missing = [top for top in layer.top if top not in shapes]
        if missing:
            raise ModelError(f"{model_file}: data layer '{layer.name}' produces blob '{missing[0]}', which the "
                             "float model's TEST net has no data layer or input for: not the same model?")
        (data,) = with_phase_rules_of(layer, caffe_pb2.LayerParameter(name=layer.name, type="Input", top=layer.top))
        for top in layer.top:
            data.input_param.shape.add(dim=shapes[top])
        return data
    return rebuilt(net, (fed(layer) for layer in net.layer))


def _net(net_param: caffe_pb2.NetParameter, weights_file: str):
    import caffe

    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as f:
        f.write(text_format.MessageToString(net_param))
    try:
        return caffe.Net(f.name, caffe.TEST, weights=weights_file)
    finally:
        os.unlink(f.name)


def _checked_net(model_file: str, weights_file: str, net_param: caffe_pb2.NetParameter | None = None):
    """The TEST net of ``net_param`` (default: read from ``model_file``) with ``weights_file``,
    checked in a child process first, so a mismatch is a ModelError, not a Caffe abort."""
    if not os.path.isfile(weights_file):
        raise ModelError(f"{weights_file}: weights file does not exist")
    net_param = net_param if net_param is not None else model_io.read_prototxt(model_file)
    # Only the TEST net is built here; a failed CHECK is named by phase and layer.
    shapes = model_io.probe_net(net_param, model_file, phases=("TEST",)).params
    model_io.check_weights_match(model_file, weights_file, shapes, model_io.read_caffemodel(weights_file))
    return _net(net_param, weights_file)


def _forward_with_actions(net, actions: Mapping[int, list[Callable[[], None]]]) -> None:
    """Run the whole net; ``actions[i]`` are called just before layer i runs (i equal to the
    number of layers: after the last)."""
    start, last = 0, len(net.layers) - 1
    for stop in sorted(actions):
        if stop > start:
            net._forward(start, stop - 1)
        for action in actions[stop]:
            action()
        start = stop
    if start <= last:
        net._forward(start, last)


def _copy_blob(net, blob: str, into: dict[str, np.ndarray], key: str) -> Callable[[], None]:
    def action() -> None:
        into[key] = net.blobs[blob].data.copy()
    return action


def _source_blobs(net) -> dict[int, list[str]]:
    """Layer index -> the tops of the float TEST net's layers without bottoms (data layers)."""
    names = list(net._blob_names)
    return {i: [names[t] for t in net._top_ids(i)] for i in range(len(net.layers)) if not list(net._bottom_ids(i))}


def _comparison_points(float_net, layers: Mapping[str, FakeQuantLayer], fake_layer_names: set[str],
                       model_file: str) -> dict[str, tuple[int, str]]:
    """Quantized layer -> (index of the float layer after which its float output is ready,
    that output's blob): the layer itself, or the last BatchNorm / Scale folded into it."""
    names = list(float_net._layer_names)
    blob_names = list(float_net._blob_names)
    points = {}
    for name in layers:
        if name not in names:
            raise ModelError(f"{model_file}: has no layer '{name}' in its TEST net, which the fake-quant model "
                             "quantizes: pass the float model the fake-quant model was made from")
        i = names.index(name)
        while (i + 1 < len(names) and names[i + 1] not in fake_layer_names
               and float_net.layers[i + 1].type in FOLDED_TYPES):
            i += 1
        points[name] = (i, blob_names[float_net._top_ids(i)[0]])
    return points


def _batch(inputs: Inputs, iteration: int) -> Batch | None:
    if inputs is None:
        return None
    if callable(inputs):
        return inputs(iteration)
    if iteration >= len(inputs):
        raise AnalysisError(f"inputs: {len(inputs)} batches given, iteration {iteration + 1} needs one more")
    return inputs[iteration]


def _feed(net, batch: Batch | None, model_file: str) -> None:
    """Copy ``batch`` (blob -> array) into the float net's input blobs (reshaped to fit)."""
    wanted = list(net.inputs)
    batch = batch or {}
    for name in batch:
        if name not in wanted:
            raise AnalysisError(f"inputs: blob '{name}' is not an input of {model_file} "
                                f"(its Input layers / input fields: {wanted or 'none'})")
    for name in wanted:
        if name not in batch:
            raise AnalysisError(f"{model_file}: input blob '{name}' (an Input layer or input field) has no "
                                "data: pass inputs= (a callable iteration -> {blob: array}, or a list of "
                                "{blob: array}), or --inputs FILE.npz on the command line")
        value = np.asarray(batch[name], np.float32)
        net.blobs[name].reshape(*value.shape)
        net.blobs[name].data[...] = value


def _compare_output(layer: FakeQuantLayer, ref: np.ndarray, test: np.ndarray, stats: metrics.OutputStats,
                    model_file: str) -> None:
    if ref.shape != test.shape:
        raise ModelError(f"{model_file}: the float output of layer '{layer.name}' has shape {ref.shape}, the "
                         f"fake-quant one {test.shape}: pass the float model the fake-quant model was made from")
    stats.add(ref, test)


def _layer_result(layer: FakeQuantLayer, out: metrics.OutputStats, act: metrics.ActivationStats,
                  weights: dict | None) -> dict:
    return {
        "name": layer.name, "type": layer.type, "bit_width": layer.bit_width,
        "input_blob": layer.input_blob, "output_blob": layer.output_blob,
        "cosine": out.cosine, "sqnr_db": out.sqnr_db, "max_diff_output_steps": out.max_diff_steps,
        "output_elements": out.elements,
        "activation": {
            "scale_d": layer.scale_d, "offset_d": layer.offset_d,
            "clip_min": act.bounds[0], "clip_max": act.bounds[1], "min": act.min, "max": act.max,
            "clipped_below": act.clipped_below, "clipped_above": act.clipped_above, "elements": act.elements,
            "histogram": {"edges": act.edges.tolist(), "counts": act.counts.tolist(),
                          "outside_edges": act.outside_edges}},
        "shift_bit": layer.shift_bit.tolist(),
        "weights": weights,
    }


def _check_paths(inputs: Mapping[str, object], output_dir: object, log_dir: object) -> None:
    """Before any work: the input paths (role -> path) are paths and the output folders are
    folder paths, not files."""
    for role, path in inputs.items():
        if not isinstance(path, (str, os.PathLike)):
            raise ArgumentError(f"{role} must be a path, got {type(path).__name__} {path!r}")
    for role, folder in (("output_dir", output_dir), ("log_dir", log_dir)):
        if folder is None and role == "log_dir":
            continue
        if not isinstance(folder, (str, os.PathLike)) or (role == "output_dir" and not os.fspath(folder)):
            raise OutputPathError(f"{role} must be a folder path, got {folder!r}")
        if os.fspath(folder) and os.path.exists(folder) and not os.path.isdir(folder):
            raise OutputPathError(f"{os.fspath(folder)}: {role} is a file, not a folder")


def _rank_key(layer: dict) -> tuple[float, float]:
    """Worst first: lowest SQNR, then lowest cosine (an undefined cosine sorts as worst)."""
    cosine = layer["cosine"]
    return layer["sqnr_db"], -np.inf if cosine is None else cosine


def analyze(model_file: str, weights_file: str, fake_quant_model_file: str, fake_quant_weights_file: str,
            iterations: int, output_dir: str, inputs: Inputs = None, log_dir: str | None = None,
            log_step: int = 0) -> dict:
    """Run the float and the fake-quant model on the same ``iterations`` TEST batches and
    report, per quantized layer, what quantization does to it.

    Args:
        model_file, weights_file: the float model (as given to create_quant_retrain_model or
            init), TEST phase.
        fake_quant_model_file, fake_quant_weights_file: the fake-quant model the saver wrote.
        iterations: TEST batches (>= 1).
        output_dir: gets ``analysis.json`` and ``report.html`` (created if missing).
        inputs: for nets fed by Input layers / input fields: a callable ``iteration ->
            {blob: array}``, or a sequence of such dicts, one per iteration. Nets with data
            layers read their own data.
        log_dir: if given, each layer's ``<layer>/sqnr_db`` and ``<layer>/cosine`` are logged
            to TensorBoard there at step ``log_step``.

    Returns:
        The analysis (what ``analysis.json`` holds): ``layers``, ranked worst first, each with
        ``cosine``, ``sqnr_db`` (dB; ``inf`` when exact), ``max_diff_output_steps``, the
        ``activation`` range, clips and clipped shares, ``shift_bit`` per channel, the
        ``bit_width`` and per-channel ``weights`` ranges against ``scale_w`` (None for a
        layer without weights).

    Raises (before anything is written):
        AnalysisError: bad ``iterations`` or ``inputs``.
        OutputPathError: ``output_dir`` or ``log_dir`` is a file, or an output file is one of
            the four inputs (also through a symbolic or hard link).
        ModelError: a model Caffe cannot build (Caffe builds each TEST net in a child process
            first; the message names the file and the layer), weights that do not fit it, a
            fake-quant model without quantized layers, or models that do not belong together.
    """
    from amct_retrain.analysis import report

    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise AnalysisError(f"iterations must be a positive int, got {iterations!r}")
    input_files = {"float model file": model_file, "float weights file": weights_file,
                   "fake-quant model file": fake_quant_model_file, "fake-quant weights file": fake_quant_weights_file}
    _check_paths(input_files, output_dir, log_dir)
    output_files = report.output_files(os.fspath(output_dir))
    check_outputs_are_not_inputs(input_files, {"analysis file": output_files["json"],
                                               "report file": output_files["html"]})
    fake_param = model_io.read_prototxt(fake_quant_model_file)
    layers = fake_quant_layers(fake_param, fake_quant_model_file)
    float_net = _checked_net(model_file, weights_file)
    sources = _source_blobs(float_net)
    batch = _batch(inputs, 0)
    _feed(float_net, batch, model_file)
    shapes = {blob: float_net.blobs[blob].data.shape for blob in
              [*float_net.inputs, *(b for tops in sources.values() for b in tops)]}
    fake_net = _checked_net(fake_quant_model_file, fake_quant_weights_file, fed_net(fake_param, shapes,
                                                                                    fake_quant_model_file))
    points = _comparison_points(float_net, layers, {layer.name for layer in fake_param.layer}, model_file)
    fake_names = list(fake_net._layer_names)
    outputs = {name: metrics.OutputStats(numerics.output_steps(q.deq, q.shift_bit)) for name, q in layers.items()}
    activations = {name: metrics.ActivationStats(q.scale_d, q.offset_d, q.bit_width) for name, q in layers.items()}

    fed: dict[str, np.ndarray] = {}
    reference: dict[str, np.ndarray] = {}
    float_actions: dict[int, list] = {0: [_copy_blob(float_net, b, fed, b) for b in float_net.inputs]}
    for i, tops in sources.items():
        float_actions.setdefault(i + 1, []).extend(_copy_blob(float_net, b, fed, b) for b in tops)
    for name, (i, blob) in points.items():
        float_actions.setdefault(i + 1, []).append(_copy_blob(float_net, blob, reference, name))
    fake_actions: dict[int, list] = {}
    for name, q in layers.items():
        names = quant_layer_names(name)
        fake_actions.setdefault(fake_names.index(names["fake_quant"]), []).append(
            lambda q=q: activations[q.name].add(fake_net.blobs[q.input_blob].data))
        fake_actions.setdefault(fake_names.index(names["requantize"]) + 1, []).append(
            lambda q=q: _compare_output(q, reference[q.name], fake_net.blobs[q.output_blob].data, outputs[q.name],
                                        model_file))

    for iteration in tqdm(range(iterations), desc="analysis", unit="batch", disable=iterations < 2):
        if iteration:
            _feed(float_net, _batch(inputs, iteration), model_file)
        _forward_with_actions(float_net, float_actions)
        for blob, value in fed.items():
            fake_net.blobs[blob].reshape(*value.shape)
            fake_net.blobs[blob].data[...] = value
        _forward_with_actions(fake_net, fake_actions)

    results = []
    for name, q in layers.items():
        weights = None
        rule = QUANTIZABLE_RULES.get(q.type)
        if rule is not None and rule.has_weights:
            axis = rule.channel_axis
            weights = {"channel_axis": axis,
                       **metrics.weight_channel_stats(fake_net.params[name][0].data, q.scale_w, axis)}
        results.append(_layer_result(q, outputs[name], activations[name], weights))
    results.sort(key=_rank_key)
    analysis = {"version": 1, "iterations": iterations,
                "models": {"float_model": os.path.abspath(model_file), "float_weights": os.path.abspath(weights_file),
                           "fake_quant_model": os.path.abspath(fake_quant_model_file),
                           "fake_quant_weights": os.path.abspath(fake_quant_weights_file)},
                "layers": results}
    if log_dir:
        tensorboard.log_scalars(log_dir, tensorboard.analysis_scalars(results), log_step)
    report.write_outputs(analysis, output_dir)
    return analysis
