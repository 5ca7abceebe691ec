"""Mixed precision: a weight bit width per layer under a budget, from each layer's sensitivity.

:func:`search_mixed_precision` measures, for every quantizable layer with weights and every
candidate width b, how much the model's output suffers when that layer alone is quantized with
b-bit weights (post-training calibration on the model's TEST batches, then a
:class:`~amct_retrain.auto_calibration.SensitivityBase`; default: 1 - cosine similarity of the
last quantized layer's output to the float model's). The predicted loss of an assignment is the
sum of its layers' sensitivities. Starting from every layer at the widest candidate, it narrows,
one step at a time, the layer whose narrowing costs the least predicted loss per weight bit saved,
until the weights fit the budget: an average weight width (weighted by the layers' weight counts)
or a weight size in bytes. It writes a retrain config (:func:`create_quant_retrain_config`'s,
with ``num_bits`` in every layer's ``retrain_weight_config``) that
:func:`~amct_retrain.retrain.create_quant_retrain_model` takes, and ``mixed_precision.json``
beside it (the sensitivities, the widths chosen, their average and size).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from amct_retrain import calibration, numerics
from amct_retrain.auto_calibration import CosineSimilaritySensitivity, SensitivityBase, quant_info
from amct_retrain.config import ConfigError, create_quant_config, create_quant_retrain_config, read_config_json
from amct_retrain.errors import ArgumentError
from amct_retrain.fileio import atomic_write, check_outputs_are_not_inputs
from amct_retrain.graph import model_io
from amct_retrain.saved_models import output_files

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class MixedPrecision:
    """The search's result: ``bits`` layer -> weight bit width; ``weights`` layer -> weight count;
    ``sensitivity`` layer -> {bit width: sensitivity}; the average width, the weight size in bytes
    (each layer's weights packed at its width) and the predicted loss (the sum of the chosen
    sensitivities)."""
    bits: dict[str, int]
    weights: dict[str, int]
    sensitivity: dict[str, dict[int, float]]
    average_bits: float
    size_bytes: int
    predicted_loss: float


def weight_size_bytes(bits: Mapping[str, int], weights: Mapping[str, int]) -> int:
    """Bytes of the layers' weights packed at their widths: sum of ceil(count * bits / 8)."""
    return sum(math.ceil(weights[name] * b / 8) for name, b in bits.items())


def average_bits(bits: Mapping[str, int], weights: Mapping[str, int]) -> float:
    """The weight-count-weighted average width of ``bits``."""
    return sum(weights[name] * b for name, b in bits.items()) / sum(weights[name] for name in bits)


def assign_bits(sensitivity: Mapping[str, Mapping[int, float]], weights: Mapping[str, int],
                budget_bits: float) -> dict[str, int]:
    """Layer -> width with ``sum(weights * width) <= budget_bits`` and a small summed sensitivity.

    Greedy: all layers at their widest candidate, then repeatedly the one narrowing step (a layer to
    its next narrower candidate) with the least sensitivity increase per weight bit saved.

    Raises:
        ArgumentError: even the narrowest widths exceed the budget.
    """
    candidates = {name: sorted(s, reverse=True) for name, s in sensitivity.items()}
    bits = {name: c[0] for name, c in candidates.items()}
    narrowest = sum(weights[name] * c[-1] for name, c in candidates.items())
    if narrowest > budget_bits:
        raise ArgumentError(f"the budget of {budget_bits:.0f} weight bits is below what the narrowest widths need "
                            f"({narrowest} bits, every layer at its narrowest candidate)")

    def step_cost(name: str) -> float:
        b = bits[name]
        narrower = candidates[name][candidates[name].index(b) + 1]
        return (sensitivity[name][narrower] - sensitivity[name][b]) / (weights[name] * (b - narrower))

    while sum(weights[name] * b for name, b in bits.items()) > budget_bits:
        movable = [name for name in bits if bits[name] != candidates[name][-1]]
        name = min(movable, key=lambda n: (step_cost(n), n))
        bits[name] = candidates[name][candidates[name].index(bits[name]) + 1]
    return bits


def _last_output(model_file: str, layers: Sequence[str]) -> str:
    """The output blob of the last of ``layers`` in the net: the blob every trial's loss is measured on."""
    net = model_io.read_prototxt(model_file)
    last = [layer for layer in net.layer if layer.name in layers][-1]
    return last.top[0]


def _calibrate_one(model_file: str, weights_file: str, base: dict, layer: str, num_bits_w: int,
                   num_bits_d: int, folder: str) -> str:
    """Calibrate ``model_file`` with only ``layer`` quantized (weights ``num_bits_w``, activations
    ``num_bits_d``) under ``folder``: the save path of its fake-quant model."""
    import caffe  # pycaffe only where a net is run

    os.makedirs(folder)
    data = json.loads(json.dumps(base))
    for name, entry in data.items():
        if isinstance(entry, dict):
            entry["quant_enable"] = name == layer
    data[layer]["activation_quant_params"]["num_bits"] = num_bits_d
    data[layer]["weight_quant_params"]["num_bits"] = num_bits_w
    config = os.path.join(folder, "calibration.json")
    with open(config, "w", encoding="utf-8") as f:
        json.dump(data, f)
    graph = calibration.init(config, model_file, weights_file, os.path.join(folder, "record.txt"))
    files = [os.path.join(folder, name) for name in ("calibration.prototxt", "calibration.caffemodel")]
    calibration.quantize_model(graph, *files)
    net = caffe.Net(files[0], caffe.TEST, weights=files[1])
    for _ in range(graph.config.batch_num):
        net.forward()
    save_path = os.path.join(folder, "model")
    calibration.save_model(graph, "Fakequant", save_path)
    return save_path


def search_mixed_precision(model_file: str, weights_file: str, config_file: str, *,
                           average_weight_bits: float | None = None, size_bytes: int | None = None,
                           candidate_bits: Sequence[int] = (4, 8), activation_bits: int = 8, batch_num: int = 1,
                           sensitivity: SensitivityBase | None = None) -> MixedPrecision:
    """Choose each quantizable layer's weight width under a budget and write the retrain config.

    Args:
        model_file, weights_file: the float model (its TEST phase reads the calibration data) and weights.
        config_file: the retrain config to write (JSON); ``mixed_precision.json`` goes beside it.
        average_weight_bits: the budget as an average width over all weights (e.g. 5.0), or
        size_bytes: the budget as the weights' size packed at their widths. Exactly one of the two.
        candidate_bits: the widths a layer may take (2..8).
        activation_bits: every layer's activation width, in the trials and the config.
        batch_num: TEST batches each trial calibrates on.
        sensitivity: how a trial's model is scored (default :class:`CosineSimilaritySensitivity`).

    Returns:
        The :class:`MixedPrecision` written.

    Raises:
        ArgumentError: no or both budgets, a width outside 2..8, or a budget no assignment meets.
        ConfigError, ModelError: as the calibration and config functions raise them.
    """
    if (average_weight_bits is None) == (size_bytes is None):
        raise ArgumentError("search_mixed_precision: give exactly one budget, average_weight_bits or size_bytes")
    for b in (*candidate_bits, activation_bits):
        try:
            numerics.bit_width(b)
        except numerics.NumericsError as err:
            raise ArgumentError(f"search_mixed_precision: {err}") from None
    report_file = os.path.join(os.path.dirname(os.path.abspath(config_file)), "mixed_precision.json")
    check_outputs_are_not_inputs({"model file": model_file, "weights file": weights_file},
                                 {"config file": config_file, "report": report_file})
    sensitivity = sensitivity or CosineSimilaritySensitivity()
    with tempfile.TemporaryDirectory(prefix="amct_mixed_precision_") as work:
        base_file = os.path.join(work, "calibration.json")
        create_quant_config(base_file, model_file, weights_file, batch_num=batch_num)
        base = read_config_json(base_file, "calibration config")
        params = model_io.read_caffemodel(weights_file)
        layers = [name for name, entry in base.items() if isinstance(entry, dict) and params.get(name)]
        if not layers:
            raise ConfigError(f"{model_file}: no quantizable layer with weights: nothing to give a bit width")
        weights = {name: int(params[name][0].size) for name in layers}
        measured_at = _last_output(model_file, layers)
        scores: dict[str, dict[int, float]] = {}
        for name in layers:
            scores[name] = {}
            for b in sorted(set(candidate_bits)):
                folder = os.path.join(work, f"{len(scores)}_{b}")
                save_path = _calibrate_one(model_file, weights_file, base, name, b, activation_bits, folder)
                files = output_files(save_path)
                info = {name: {**quant_info(save_path)[name], "output_blob": measured_at}}
                scores[name][b] = sensitivity.compute(model_file, weights_file, files["fake_quant_model"],
                                                      files["fake_quant_weights"], info)[name]
                shutil.rmtree(folder)
                LOG.info("layer '%s' at %d weight bits: sensitivity %.6g", name, b, scores[name][b])
    total = sum(weights.values())
    budget = average_weight_bits * total if average_weight_bits is not None else size_bytes * 8
    bits = assign_bits(scores, weights, budget)
    result = MixedPrecision(bits, weights, scores, average_bits(bits, weights), weight_size_bytes(bits, weights),
                            sum(scores[name][b] for name, b in bits.items()))
    create_quant_retrain_config(config_file, model_file, weights_file)
    data = read_config_json(config_file, "retrain config")
    for name, entry in data.items():
        if isinstance(entry, dict) and entry.get("retrain_enable"):
            entry.setdefault("retrain_data_config", {})["num_bits"] = activation_bits
            if name in bits:
                entry.setdefault("retrain_weight_config", {})["num_bits"] = bits[name]
    atomic_write(config_file, json.dumps(data, indent=2).encode())
    atomic_write(report_file, json.dumps({
        "budget_weight_bits": budget, "activation_bits": activation_bits, "measured_at": measured_at,
        "bits": bits, "weights": weights, "average_bits": result.average_bits, "size_bytes": result.size_bytes,
        "predicted_loss": result.predicted_loss,
        "sensitivity": {name: {str(b): s for b, s in by_bits.items()} for name, by_bits in scores.items()}},
        indent=2).encode())
    LOG.info("mixed precision: %s (average %.3f weight bits, %d bytes), retrain config %s",
             bits, result.average_bits, result.size_bytes, config_file)
    return result
