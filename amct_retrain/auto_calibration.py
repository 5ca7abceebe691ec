"""Accuracy-based automatic calibration: quantize as many layers as the user's accuracy bound allows.

:func:`accuracy_based_auto_calibration` evaluates the float model, calibrates every layer the
calibration config enables (post-training calibration, :mod:`amct_retrain.calibration`) and
evaluates the fake-quant model. If the user's ``metric_eval`` rejects it, the quantized layers
are ranked by a :class:`SensitivityBase` (default: 1 - cosine similarity of each layer's output
to the float model's) and a :class:`SearchStrategyBase` (default: binary search) chooses which
of the most sensitive layers to leave in float; every trial re-calibrates from scratch with a
copy of the config in which those layers have ``quant_enable: false``.

Layout of ``save_dir`` (``<name>`` is the model file's name without its extension)::

    <name>_fake_quant_model.prototxt, <name>_fake_quant_weights.caffemodel,
    <name>_deploy_model.prototxt, <name>_deploy_weights.caffemodel, <name>_quant.json
                        the accepted trial's models (published as soon as a trial becomes the best)
    <name>_record.txt   its record, also copied to ``record_file``
    sensitivity.json    layer -> sensitivity in the all-quantized model (higher = more sensitive);
                        always computed, used to rank the layers when that model fails
    history.json        the float metric and every trial: layers kept in float, metric, loss, ok
    trials/NN/          each trial's config, record, model definitions and quant info; its
                        weights are deleted once the trial is evaluated (they are published if
                        it is the best)
"""
from __future__ import annotations

import abc
import copy
import glob
import json
import logging
import numbers
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from amct_retrain import calibration, numerics, record
from amct_retrain.config import load_calibration_config, read_config_json
from amct_retrain.errors import ArgumentError, InputMissingError, ModelError, OutputPathError
from amct_retrain.fileio import atomic_write, check_outputs_are_not_inputs, staged_outputs
from amct_retrain.graph import model_io
from amct_retrain.record import existing_record, skip_fusion_entries
from amct_retrain.saved_models import output_files

LOG = logging.getLogger(__name__)

# Every trial saves both models: the accepted one is published as it is, without re-calibrating
# (a second calibration on other batches could give other factors than the ones evaluated).
_SAVE_TYPE = "Both"


class AutoCalibrationEvaluatorBase(abc.ABC):
    """What the user supplies: how to calibrate and evaluate a model, and what loss is acceptable.

    Subclass it and implement :meth:`calibration` and :meth:`evaluate`. The default
    :meth:`metric_eval` takes a higher metric as better and accepts a drop of at most
    ``max_loss`` (in the metric's units); override it for other metrics (an error rate, a loss).
    """

    max_loss: float = 0.0

    @abc.abstractmethod
    def calibration(self, model_file: str, weights_file: str) -> None:
        """Run the calibration config's ``batch_num`` forward passes of the modified model
        ``model_file``/``weights_file`` (pycaffe, TEST phase) on calibration data."""

    @abc.abstractmethod
    def evaluate(self, model_file: str, weights_file: str) -> Any:
        """The metric of a model (the float model or a fake-quant model): a number, higher
        better unless :meth:`metric_eval` says otherwise."""

    def metric_eval(self, original_metric: Any, new_metric: Any) -> tuple[bool, float]:
        """(whether ``new_metric`` is acceptable, its loss against ``original_metric``).

        Default: loss = original - new; acceptable when loss <= ``max_loss``."""
        loss = float(original_metric) - float(new_metric)
        return loss <= self.max_loss, loss


# --------------------------------------------------------------------------- sensitivity


class OutputBlobEvaluator(AutoCalibrationEvaluatorBase):
    """An evaluator for models whose TEST phase reads its own data and outputs a scalar metric
    blob (Caffe's ``Accuracy`` layer, say): the metric is that blob's mean over ``test_iter``
    TEST batches; calibration runs ``batch_num`` TEST batches; higher is better, and a loss
    of at most ``max_loss`` (in the metric's units) is accepted."""

    def __init__(self, metric_blob: str, test_iter: int = 1, batch_num: int = 1, max_loss: float = 0.0) -> None:
        self.metric_blob, self.test_iter, self.batch_num, self.max_loss = metric_blob, test_iter, batch_num, max_loss

    def calibration(self, model_file: str, weights_file: str) -> None:
        import caffe

        net = caffe.Net(model_file, caffe.TEST, weights=weights_file)
        for _ in range(self.batch_num):
            net.forward()

    def evaluate(self, model_file: str, weights_file: str) -> float:
        import caffe

        net = caffe.Net(model_file, caffe.TEST, weights=weights_file)
        outputs = (net.forward() for _ in range(self.test_iter))
        metrics = []
        # net.forward() returns views of the output blobs, which the next forward overwrites:
        # each batch's metric is read before the next batch runs.
        for out in outputs:
            if self.metric_blob not in out:
                raise ModelError(f"{model_file}: has no output blob '{self.metric_blob}' (outputs: {sorted(out)})")
            metrics.append(float(out[self.metric_blob].ravel()[0]))
        return float(np.mean(metrics))


class SensitivityBase(abc.ABC):
    """Ranks the quantized layers: which ones the fake-quant model suffers most from."""

    @abc.abstractmethod
    def compute(self, float_model: str, float_weights: str, fake_quant_model: str, fake_quant_weights: str,
                layers: Mapping[str, Mapping[str, str]]) -> dict[str, float]:
        """Sensitivity of every layer in ``layers`` (higher = more sensitive).

        ``fake_quant_model``/``fake_quant_weights`` are the model with every layer of ``layers``
        quantized; ``layers`` is its quant info file's ``quantized_layers``: layer name ->
        ``input_blob``, ``output_blob`` and the names of the layers inserted around it.
        """


def _cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays of equal shape, in float64; two zero arrays are
    identical (1), a zero array against a non-zero one unrelated (0)."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    if norms == 0:
        return 1.0 if not a.any() and not b.any() else 0.0
    return float(np.dot(a, b) / norms)


def _source_layers(net) -> list[str]:
    """The leading layers of a pycaffe net that read no blob (data and Input layers)."""
    sources = []
    for name in net._layer_names:
        if net.bottom_names[name]:
            break
        sources.append(name)
    return sources


class CosineSimilaritySensitivity(SensitivityBase):
    """Sensitivity = 1 - cosine similarity between a layer's output in the fake-quant model and
    the same blob in the float model, both run once in the TEST phase on the same batch.

    The batch is what the float model's data layers produce (the fake-quant model is fed that
    batch, not its own data layers' next one), or ``inputs`` (blob name -> array) for models
    whose inputs are ``Input`` layers. The outputs compared are the blobs after the whole
    forward pass, so an in-place ReLU after the layer acts on both sides alike. The error of a
    layer includes what the quantized layers before it passed on, as the deployed model sees it.
    """

    def __init__(self, inputs: Mapping[str, np.ndarray] | None = None) -> None:
        self.inputs = dict(inputs) if inputs is not None else None

    def _run(self, net, sources: list[str], batch: Mapping[str, np.ndarray]) -> None:
        """Forward ``net`` from its first layer after ``sources`` with ``batch`` in its input blobs."""
        for blob, value in batch.items():
            net.blobs[blob].reshape(*value.shape)
            net.blobs[blob].data[...] = value
        net.forward(start=net._layer_names[len(sources)])

    def _batch(self, net, sources: list[str], model_file: str) -> dict[str, np.ndarray]:
        """The batch both nets see: ``inputs``, or one run of ``net``'s data layers."""
        if self.inputs is not None:
            return self.inputs
        inputs = [name for name, layer in zip(net._layer_names, net.layers)
                  if name in sources and layer.type == "Input"]
        if inputs:
            raise ModelError(f"{model_file}: layers {inputs} are Input layers: no data to compare the models on; "
                             "give CosineSimilaritySensitivity(inputs={blob: array}) or a data layer")
        net.forward(end=sources[-1])
        return {top: net.blobs[top].data.copy() for name in sources for top in net.top_names[name]}

    def compute(self, float_model: str, float_weights: str, fake_quant_model: str, fake_quant_weights: str,
                layers: Mapping[str, Mapping[str, str]]) -> dict[str, float]:
        import caffe  # pycaffe only where a net is run

        float_net = caffe.Net(float_model, caffe.TEST, weights=float_weights)
        fake_net = caffe.Net(fake_quant_model, caffe.TEST, weights=fake_quant_weights)
        sources, fake_sources = _source_layers(float_net), _source_layers(fake_net)
        if not sources or sources != fake_sources:
            raise ModelError(f"{float_model} / {fake_quant_model}: the models must start with the same data "
                             f"layers (float: {sources}, fake-quant: {fake_sources})")
        batch = self._batch(float_net, sources, float_model)
        self._run(float_net, sources, batch)
        self._run(fake_net, sources, batch)
        sensitivity = {}
        for name, info in layers.items():
            blob = info["output_blob"]
            if blob not in float_net.blobs:
                raise ModelError(f"{float_model}: has no blob '{blob}' (the output of quantized layer '{name}')")
            outputs = float_net.blobs[blob].data, fake_net.blobs[blob].data
            for what, out in zip(("float", "fake-quant"), outputs):
                numerics.check_finite(out, f"output '{blob}' of layer '{name}' in the {what} model")
            sensitivity[name] = 1.0 - _cosine_similarity(*outputs)
        return sensitivity


# --------------------------------------------------------------------------- search strategies


class SearchStrategyBase(abc.ABC):
    """Chooses the layers to leave in float, one trial at a time.

    The driver calls :meth:`initialize` once with the quantized layers, most sensitive first,
    after the trial with every layer quantized failed; then, until :meth:`next_float_layers`
    returns None, it runs the proposed trial and reports whether it passed with :meth:`update`.
    The driver accepts, among the trials that passed, the one with the fewest float layers.
    """

    @abc.abstractmethod
    def initialize(self, ranked_layers: Sequence[str]) -> None:
        """Start a search over ``ranked_layers`` (most sensitive first)."""

    @abc.abstractmethod
    def next_float_layers(self) -> list[str] | None:
        """The layers to leave in float in the next trial, or None when the search is over."""

    @abc.abstractmethod
    def update(self, ok: bool) -> None:
        """The outcome of the trial last proposed."""


class BinarySearchStrategy(SearchStrategyBase):
    """The smallest k such that leaving the k most sensitive layers in float passes.

    Assumes the outcome is monotonic in k (if k float layers pass, so do k + 1): then
    ceil(log2(n)) trials find k, plus one when no k < n passes (the trial with every layer in
    float). k = 0 is the all-quantized trial the driver ran before the search.
    """

    def initialize(self, ranked_layers: Sequence[str]) -> None:
        self._ranked = list(ranked_layers)
        self._failed = 0            # the largest k known to fail
        self._passed: int | None = None  # the smallest k known to pass
        self._proposed: int | None = None

    def next_float_layers(self) -> list[str] | None:
        hi = len(self._ranked) if self._passed is None else self._passed
        if hi - self._failed > 1:
            k = (self._failed + hi) // 2
        elif self._passed is None and hi > self._failed:
            k = hi  # every smaller k failed: all layers in float is the one left to try
        else:
            k = None
        self._proposed = k
        return None if k is None else self._ranked[:k]

    def update(self, ok: bool) -> None:
        if self._proposed is None:
            raise RuntimeError("BinarySearchStrategy.update: no trial was proposed")
        if ok:
            self._passed = self._proposed
        else:
            self._failed = self._proposed
        self._proposed = None


STRATEGIES: dict[str, type[SearchStrategyBase]] = {"BinarySearch": BinarySearchStrategy}
SENSITIVITIES: dict[str, type[SensitivityBase]] = {"CosineSimilarity": CosineSimilaritySensitivity}


def _resolve(value: Any, known: Mapping[str, type], base: type, what: str) -> Any:
    """An instance of ``base``: ``value`` itself, or a new one of the class named ``value``."""
    if isinstance(value, base):
        return value
    if isinstance(value, str):
        if value not in known:
            raise ArgumentError(f"unknown {what} {value!r}; known: {', '.join(sorted(known))} "
                             f"(or an instance of {base.__name__})")
        return known[value]()
    raise ArgumentError(f"{what} must be a name ({', '.join(sorted(known))}) or an instance of {base.__name__}, "
                    f"got {type(value).__name__}")


# --------------------------------------------------------------------------- the driver


@dataclass
class Trial:
    """One calibration of the model with ``float_layers`` left in float."""
    index: int
    float_layers: list[str]
    quantized_layers: list[str]   # as the trial's quant info file lists them
    metric: Any
    loss: float
    ok: bool
    directory: str          # trials/NN under save_dir

    def as_json(self) -> dict[str, Any]:
        return {"trial": self.index, "float_layers": self.float_layers, "quantized_layers": self.quantized_layers,
                "metric": _json_number(self.metric), "loss": float(self.loss), "ok": bool(self.ok),
                "directory": self.directory}


def _json_number(value: Any) -> Any:
    """A metric as JSON: a number as float, anything else (a dict of scores, ...) as its repr."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return repr(value)


def _better(trial: Trial, best: Trial | None) -> bool:
    """Whether ``trial`` beats ``best``: it passed, with fewer float layers, or as few and less loss."""
    if not trial.ok:
        return False
    if best is None:
        return True
    return (len(trial.float_layers), trial.loss) < (len(best.float_layers), best.loss)


class _AutoCalibration:
    """The state of one accuracy_based_auto_calibration run (files, evaluator, trials)."""

    def __init__(self, model_file: str, weights_file: str, evaluator: AutoCalibrationEvaluatorBase,
                 config_file: str, record_file: str, save_dir: str) -> None:
        self.model_file, self.weights_file = model_file, weights_file
        self.evaluator, self.config_file, self.record_file = evaluator, config_file, record_file
        self.save_dir = save_dir
        self.name = os.path.splitext(os.path.basename(model_file))[0]
        self.config = read_config_json(config_file, "calibration config")
        # The user's record may opt layers out of BatchNorm fusion: every trial's record starts with that.
        self.skip_fusion = skip_fusion_entries(existing_record(record_file))
        self.trials: list[Trial] = []
        self.best: Trial | None = None
        self.original_metric: Any = None
        self.layers: dict[str, dict[str, str]] = {}   # quantized layers of the all-quantized trial

    # ---- files

    def save_path(self, directory: str) -> str:
        return os.path.join(directory, self.name)

    def final_record(self) -> str:
        return os.path.join(self.save_dir, f"{self.name}_record.txt")

    def _trial_config(self, float_layers: Sequence[str]) -> dict[str, Any]:
        """The user's config with ``float_layers`` disabled (the user's file is never written)."""
        config = copy.deepcopy(self.config)
        for name in float_layers:
            if not isinstance(config.get(name), dict):
                raise ArgumentError(f"{self.config_file}: has no entry for layer '{name}'")
            config[name]["quant_enable"] = False
        return config

    def write_history(self) -> None:
        history = {"model_file": os.path.abspath(self.model_file),
                   "original_metric": _json_number(self.original_metric),
                   "trials": [t.as_json() for t in self.trials],
                   "accepted_trial": None if self.best is None else self.best.index}
        atomic_write(os.path.join(self.save_dir, "history.json"), json.dumps(history, indent=2) + "\n")

    def publish(self, trial: Trial) -> None:
        """Copy ``trial``'s models and record to ``save_dir`` and its record to ``record_file``,
        all or none; the published quant info names the published record."""
        source, target = output_files(self.save_path(trial.directory)), output_files(self.save_path(self.save_dir))
        with open(os.path.join(trial.directory, "record.txt"), encoding="utf-8") as f:
            record_text = f.read()
        with staged_outputs() as out:
            for key, path in source.items():
                if key == "quant_info":
                    with open(path, encoding="utf-8") as f:
                        info = json.load(f)
                    info["record_file"] = os.path.abspath(self.final_record())
                    out.write(target[key], json.dumps(info, indent=2))
                else:
                    with open(path, "rb") as f:
                        out.write(target[key], f.read())
            out.write(self.final_record(), record_text)
            out.write(self.record_file, record_text)
        LOG.info("auto calibration: published trial %d (%d layer(s) in float) to %s",
                 trial.index, len(trial.float_layers), self.save_dir)

    # ---- trials

    def calibrate(self, index: int, float_layers: list[str]) -> Trial:
        """Calibrate and evaluate the model with ``float_layers`` left in float, in trials/NN/."""
        directory = os.path.join(self.save_dir, "trials", f"{index:02d}")
        config, record_file = os.path.join(directory, "config.json"), os.path.join(directory, "record.txt")
        modified_model = os.path.join(directory, "modified_model.prototxt")
        modified_weights = os.path.join(directory, "modified_weights.caffemodel")
        atomic_write(config, json.dumps(self._trial_config(float_layers), indent=4) + "\n")
        record.write_record(record_file, self.skip_fusion)
        graph = calibration.init(config, self.model_file, self.weights_file, record_file)
        calibration.quantize_model(graph, modified_model, modified_weights)
        self.evaluator.calibration(modified_model, modified_weights)
        calibration.save_model(graph, _SAVE_TYPE, self.save_path(directory))
        files = output_files(self.save_path(directory))
        metric = self.evaluator.evaluate(files["fake_quant_model"], files["fake_quant_weights"])
        ok, loss = self.evaluator.metric_eval(self.original_metric, metric)
        return Trial(index, float_layers, list(quant_info(self.save_path(directory))), metric, float(loss), bool(ok),
                     directory)

    def trial(self, float_layers: list[str]) -> Trial:
        """Run, log, record and (if it is the best so far) publish one trial."""
        index = len(self.trials)
        trial = self.calibrate(index, float_layers)
        self.trials.append(trial)
        LOG.info("auto calibration trial %d: %d layer(s) quantized, in float %s: metric %s, loss %.6g, %s",
                 index, len(trial.quantized_layers), float_layers, trial.metric, trial.loss,
                 "ok" if trial.ok else "rejected")
        if _better(trial, self.best):
            self.best = trial
            self.publish(trial)
        self.write_history()
        return trial

    def rank(self, sensitivity: SensitivityBase, first: Trial) -> list[str]:
        """The layers ``first`` (the all-quantized trial) quantized, most sensitive first (net
        order among equals); writes sensitivity.json."""
        self.layers = quant_info(self.save_path(first.directory))
        files = output_files(self.save_path(first.directory))
        values = sensitivity.compute(self.model_file, self.weights_file, files["fake_quant_model"],
                                     files["fake_quant_weights"], self.layers)
        bad = [name for name in self.layers
               if not isinstance(values.get(name), numbers.Real) or not np.isfinite(values[name])]
        if bad:
            raise ArgumentError(f"{type(sensitivity).__name__}.compute gave no finite number for layers {bad}: {values}")
        atomic_write(os.path.join(self.save_dir, "sensitivity.json"),
                     json.dumps({name: float(values[name]) for name in self.layers}, indent=2) + "\n")
        return sorted(self.layers, key=lambda name: -values[name])  # stable: net order among equals

    def conclude(self, strategy_name: str) -> None:
        """Say which trial was accepted; raise if none passed."""
        best = self.best
        if best is None:
            every_float = next((t for t in self.trials if not t.quantized_layers), None)
            raise RuntimeError(
                f"even with every layer in float the model fails metric_eval (metric {every_float.metric}, float "
                f"{self.original_metric}): the BatchNorm fusion or the evaluator changes the float model's metric"
                if every_float is not None else
                f"{strategy_name} ended with no trial that passed metric_eval ({len(self.trials)} trials, "
                f"see {os.path.join(self.save_dir, 'history.json')})")
        if not best.quantized_layers:
            LOG.warning("auto calibration: no layer of %s can be quantized within metric_eval's bound: the saved "
                        "models under %s are the float model (BatchNorm fused), with no quantized layer",
                        self.model_file, self.save_dir)
            return
        LOG.info("auto calibration: accepted trial %d: %d of %d layers quantized, in float %s; metric %s "
                 "(float %s, loss %.6g)", best.index, len(best.quantized_layers), len(self.layers),
                 best.float_layers, best.metric, self.original_metric, best.loss)

    def prune(self, trial: Trial) -> None:
        """Delete a trial's weights (the big files) once nothing needs them any more."""
        for path in glob.glob(os.path.join(trial.directory, "*.caffemodel")):
            os.remove(path)


def quant_info(save_path: str) -> dict[str, dict[str, str]]:
    """The ``quantized_layers`` of the quant info file saved under ``save_path``, in net order."""
    with open(output_files(save_path)["quant_info"], encoding="utf-8") as f:
        return json.load(f)["quantized_layers"]


def _check_files(model_file: str, weights_file: str, config_file: str, record_file: str, save_dir: str) -> None:
    """The inputs exist and are valid (Caffe builds the net in a child process, the weights fit it,
    the config fits the net), and no output would overwrite an input, before any evaluation."""
    for path, what in ((model_file, "model file"), (weights_file, "weights file"), (config_file, "config file")):
        if not os.path.isfile(path):
            raise InputMissingError(f"{path}: {what} does not exist")
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise OutputPathError(f"{save_dir}: save_dir is a file, not a folder")
    inputs = {"model file": model_file, "weights file": weights_file, "config file": config_file}
    name = os.path.splitext(os.path.basename(model_file))[0]
    outputs = {"record file": record_file, "history file": os.path.join(save_dir, "history.json"),
               "sensitivity file": os.path.join(save_dir, "sensitivity.json"),
               "published record": os.path.join(save_dir, f"{name}_record.txt"),
               **{f"published {role}": path for role, path in output_files(os.path.join(save_dir, name)).items()}}
    check_outputs_are_not_inputs(inputs, outputs)
    trials = os.path.realpath(os.path.join(save_dir, "trials"))
    for role, path in inputs.items():
        if os.path.realpath(path).startswith(trials + os.sep):
            raise OutputPathError(f"{path}: the {role} is inside {trials}, which every run replaces: inputs are never "
                                  "overwritten")
    net = model_io.read_prototxt(model_file)
    probed = model_io.probe_net(net, model_file)
    model_io.check_weights_match(model_file, weights_file, probed.params, model_io.read_caffemodel(weights_file))
    load_calibration_config(config_file, net)


def accuracy_based_auto_calibration(model_file: str, weights_file: str,
                                    model_evaluator: AutoCalibrationEvaluatorBase, config_file: str,
                                    record_file: str, save_dir: str,
                                    strategy: str | SearchStrategyBase = "BinarySearch",
                                    sensitivity: str | SensitivityBase = "CosineSimilarity") -> None:
    """Calibrate ``model_file`` to INT8, leaving in float the fewest layers that keep the
    evaluator's ``metric_eval`` satisfied.

    Args:
        model_file, weights_file: the float model (prototxt, caffemodel); never modified.
        model_evaluator: calibrates and evaluates models, and judges the loss.
        config_file: the calibration config (:func:`amct_retrain.calibration.create_quant_config`);
            only the layers it enables are candidates; never modified (trials use copies).
        record_file: receives the accepted trial's record; if it exists, its ``skip_fusion``
            entries are honoured in every trial.
        save_dir: receives the accepted models, the record, ``sensitivity.json``,
            ``history.json`` and the trials' folders (see the module's docstring).
        strategy: 'BinarySearch' or a :class:`SearchStrategyBase` instance.
        sensitivity: 'CosineSimilarity' or a :class:`SensitivityBase` instance.

    The accepted trial is the passing one with the fewest layers in float; its models are in
    ``save_dir`` and its record in ``record_file``. When no layer can be quantized (only the
    trial with every layer in float passes) a warning says so, and the saved models are the
    float model (BatchNorm fused) with no quantized layer.

    Raises:
        ArgumentError (a ValueError and a TypeError): an unknown strategy or sensitivity name (the
            message lists the known ones), an evaluator, strategy or sensitivity of the wrong type,
            or a ``metric_eval`` that rejects the float model's own metric (then even every layer in
            float fails: nothing can pass).
        ModelError, ConfigError, OutputPathError, InputMissingError: an input Caffe cannot build,
            weights that do not fit it, a config that is not JSON or does not fit the net, an
            output (record_file, the published files) that is an input; before anything runs.
        RuntimeError: no trial passed: even every layer in float failed (the BatchNorm fusion or
            the evaluator changed the float model's metric), or a custom strategy ended early.
    """
    strategy = _resolve(strategy, STRATEGIES, SearchStrategyBase, "strategy")
    sensitivity = _resolve(sensitivity, SENSITIVITIES, SensitivityBase, "sensitivity")
    if not isinstance(model_evaluator, AutoCalibrationEvaluatorBase):
        raise ArgumentError("model_evaluator must be an AutoCalibrationEvaluatorBase, got "
                            f"{type(model_evaluator).__name__}")
    model_file, weights_file, config_file, record_file, save_dir = map(
        os.fspath, (model_file, weights_file, config_file, record_file, save_dir))
    _check_files(model_file, weights_file, config_file, record_file, save_dir)
    # Folders of an earlier run's trials would mix with this run's (history.json lists this run's).
    shutil.rmtree(os.path.join(save_dir, "trials"), ignore_errors=True)
    os.makedirs(save_dir, exist_ok=True)
    auto = _AutoCalibration(model_file, weights_file, model_evaluator, config_file, record_file, save_dir)

    auto.original_metric = model_evaluator.evaluate(model_file, weights_file)
    LOG.info("auto calibration: float model metric %s", auto.original_metric)
    ok, _ = model_evaluator.metric_eval(auto.original_metric, auto.original_metric)
    if not ok:
        raise ArgumentError(f"metric_eval rejects the float model's own metric ({auto.original_metric}): even with "
                         "every layer in float no trial can pass; check the evaluator's metric_eval")

    first = auto.trial([])
    ranked = auto.rank(sensitivity, first)
    auto.prune(first)  # after the sensitivity, which runs its fake-quant model
    if not first.ok:
        LOG.info("auto calibration: the model with all %d layers quantized fails; searching (%s) over %s, "
                 "most sensitive first", len(ranked), type(strategy).__name__, ranked)
        strategy.initialize(ranked)
        while (float_layers := strategy.next_float_layers()) is not None:
            unknown = sorted(set(float_layers) - set(ranked))
            if unknown:
                raise ArgumentError(f"{type(strategy).__name__} proposed layers that are not quantized: {unknown}")
            trial = auto.trial(list(float_layers))
            strategy.update(trial.ok)
            auto.prune(trial)
    auto.conclude(type(strategy).__name__)
