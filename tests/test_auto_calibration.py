"""accuracy_based_auto_calibration on the digits LeNet: the bound holds, the search, its files."""
import hashlib
import json
import logging
import math

import caffe
import numpy as np
import pytest
from google.protobuf import text_format

import amct_retrain
from amct_retrain import record
from amct_retrain.auto_calibration import (BinarySearchStrategy, CosineSimilaritySensitivity, SensitivityBase,
                                           quant_info)
from amct_retrain.graph import model_io
from amct_retrain.graph.saved_nets import quant_layer_names
from amct_retrain.saver import output_files
from samples.auto_calibration_demo import DigitsEvaluator, train_float
from samples import digits_demo
from tests import models

pytestmark = pytest.mark.caffe

LAYERS = ["conv1", "conv2", "ip1", "ip2"]  # the digits net's quantizable layers, in net order


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The trained float digits model and its calibration config (every layer enabled)."""
    out = tmp_path_factory.mktemp("digits")
    model, weights = train_float(out, float_iters=300)
    config = out / "config.json"
    amct_retrain.create_quant_config(str(config), str(model), str(weights))
    return {"model": model, "weights": weights, "config": config}


def quantized_in(model_file: str) -> set[str]:
    """The layers a saved fake-quant model quantizes (those with a FakeQuantActivation before them)."""
    names = {layer.name for layer in model_io.read_prototxt(model_file).layer}
    return {layer for layer in LAYERS if quant_layer_names(layer)["fake_quant"] in names}


class PenalizingEvaluator(DigitsEvaluator):
    """Takes 0.5 off the accuracy of a model that quantizes any of ``penalized`` (None: any layer);
    accepts 5 points of loss, so that only the penalty decides."""

    max_loss = 0.05

    def __init__(self, penalized: set[str] | None) -> None:
        super().__init__()
        self.penalized = set(LAYERS) if penalized is None else penalized

    def evaluate(self, model_file: str, weights_file: str) -> float:
        return super().evaluate(model_file, weights_file) - 0.5 * bool(quantized_in(model_file) & self.penalized)


def auto_calibrate(digits, tmp_path, evaluator, **kwargs):
    save_dir = tmp_path / "auto"
    amct_retrain.accuracy_based_auto_calibration(str(digits["model"]), str(digits["weights"]), evaluator,
                                                 str(digits["config"]), str(tmp_path / "record.txt"),
                                                 str(save_dir), **kwargs)
    history = json.loads((save_dir / "history.json").read_text())
    return save_dir, history


def quantized_by(record_file) -> set[str]:
    """The layers a record gives factors (the others are entries without factors: kept in float)."""
    return {name for name, rec in record.read_record(record_file).items() if record.layer_record_complete(rec)}


def digest(*paths):
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def test_binary_search_finds_the_smallest_passing_k_in_log_trials():
    for n in range(1, 10):
        layers = [f"l{i}" for i in range(n)]
        for threshold in range(1, n + 1):  # leaving the `threshold` most sensitive layers in float passes
            strategy = BinarySearchStrategy()
            strategy.initialize(layers)
            tried, passed = [], []
            while (float_layers := strategy.next_float_layers()) is not None:
                k = len(float_layers)
                assert float_layers == layers[:k], f"n={n}: not the {k} most sensitive layers: {float_layers}"
                tried.append(k)
                strategy.update(k >= threshold)
                if k >= threshold:
                    passed.append(k)
            assert min(passed) == threshold, f"n={n}, threshold {threshold}: found {min(passed)} (tried {tried})"
            assert len(tried) <= math.ceil(math.log2(n)) + 1, f"n={n}: {len(tried)} trials {tried}"


def test_accepted_model_meets_the_bound_and_the_files_agree(digits, tmp_path):
    inputs = digest(digits["model"], digits["weights"], digits["config"])
    evaluator = DigitsEvaluator()
    save_dir, history = auto_calibrate(digits, tmp_path, evaluator)
    assert digest(digits["model"], digits["weights"], digits["config"]) == inputs, "an input file was modified"

    float_accuracy = digits_demo.test_accuracy(digits["model"], digits["weights"])
    assert history["original_metric"] == pytest.approx(float_accuracy), f"float metric not recorded: {history}"
    files = output_files(str(save_dir / digits["model"].stem))
    int8_accuracy = digits_demo.test_accuracy(files["fake_quant_model"], files["fake_quant_weights"])
    ok, loss = evaluator.metric_eval(float_accuracy, int8_accuracy)
    assert ok, f"the saved model loses {loss:.4f} > 0.002 (float {float_accuracy}, INT8 {int8_accuracy})"

    trials = history["trials"]
    accepted = trials[history["accepted_trial"]]
    assert accepted["ok"], f"the accepted trial did not pass: {accepted}"
    assert accepted == min((t for t in trials if t["ok"]), key=lambda t: len(t["float_layers"])), \
        f"the accepted trial is not the passing one with the fewest float layers: {trials}"
    assert trials[0]["float_layers"] == [] and set(trials[0]["quantized_layers"]) == set(LAYERS), \
        f"trial 0 must quantize every layer: {trials[0]}"
    for t in trials:
        assert sorted(t["quantized_layers"] + t["float_layers"]) == sorted(LAYERS), f"layers lost in trial {t}"
    quant_info = json.loads((save_dir / f"{digits['model'].stem}_quant.json").read_text())
    assert set(quant_info["quantized_layers"]) == set(accepted["quantized_layers"]) == quantized_in(
        files["fake_quant_model"]), f"the saved model's layers are not the accepted trial's: {quant_info}"
    assert quantized_by(tmp_path / "record.txt") == set(accepted["quantized_layers"]), \
        "record_file is not the accepted trial's"
    assert (tmp_path / "record.txt").read_text() == (save_dir / f"{digits['model'].stem}_record.txt").read_text(), \
        "record_file differs from the record under save_dir"
    trial_config = json.loads((save_dir / "trials" / f"{accepted['trial']:02d}" / "config.json").read_text())
    assert [n for n in LAYERS if not trial_config[n]["quant_enable"]] == sorted(
        accepted["float_layers"], key=LAYERS.index), "the trial's config does not disable its float layers"

    sensitivity = json.loads((save_dir / "sensitivity.json").read_text())
    assert set(sensitivity) == set(LAYERS), f"sensitivity.json must rank every quantized layer: {sensitivity}"
    assert all(0 <= v <= 2 for v in sensitivity.values()), f"1 - cosine similarity outside [0, 2]: {sensitivity}"


class FixedSensitivity(SensitivityBase):
    """Fixed values; records its calls."""

    def __init__(self, values: dict[str, float]) -> None:
        self.values, self.calls = values, []

    def compute(self, float_model, float_weights, fake_quant_model, fake_quant_weights, layers):
        self.calls.append((float_model, fake_quant_model, sorted(layers)))
        return dict(self.values)


class RecordingStrategy(BinarySearchStrategy):
    def __init__(self) -> None:
        self.ranked, self.proposed, self.outcomes = None, [], []

    def initialize(self, ranked_layers):
        self.ranked = list(ranked_layers)
        super().initialize(ranked_layers)

    def next_float_layers(self):
        layers = super().next_float_layers()
        if layers is not None:
            self.proposed.append(layers)
        return layers

    def update(self, ok):
        self.outcomes.append(ok)
        super().update(ok)


def test_custom_strategy_and_sensitivity_drive_the_search(digits, tmp_path):
    sensitivity = FixedSensitivity({"ip1": 4.0, "conv2": 3.0, "conv1": 2.0, "ip2": 1.0})
    strategy = RecordingStrategy()
    save_dir, history = auto_calibrate(digits, tmp_path, PenalizingEvaluator({"conv2"}),
                                       strategy=strategy, sensitivity=sensitivity)
    assert len(sensitivity.calls) == 1 and sensitivity.calls[0][0] == str(digits["model"]) and \
        sensitivity.calls[0][1].endswith("_fake_quant_model.prototxt") and sensitivity.calls[0][2] == sorted(LAYERS), \
        f"the custom sensitivity was not asked once about the all-quantized model: {sensitivity.calls}"
    assert json.loads((save_dir / "sensitivity.json").read_text()) == sensitivity.values, "sensitivity.json differs"
    assert strategy.ranked == ["ip1", "conv2", "conv1", "ip2"], f"not ranked by the custom values: {strategy.ranked}"
    # Penalty while conv2 is quantized: k = 2 ([ip1, conv2]) passes, k = 1 ([ip1]) fails.
    assert strategy.proposed == [["ip1", "conv2"], ["ip1"]] and strategy.outcomes == [True, False], \
        f"unexpected search: {strategy.proposed} -> {strategy.outcomes}"
    assert [t["float_layers"] for t in history["trials"]] == [[], ["ip1", "conv2"], ["ip1"]], \
        f"history does not list the trials: {history['trials']}"
    accepted = history["trials"][history["accepted_trial"]]
    assert accepted["float_layers"] == ["ip1", "conv2"], f"accepted the wrong trial: {history}"
    files = output_files(str(save_dir / digits["model"].stem))
    assert quantized_in(files["fake_quant_model"]) == {"conv1", "ip2"}, "the saved model is not the accepted trial's"


@pytest.mark.parametrize("kwargs, known", [({"strategy": "Exhaustive"}, "BinarySearch"),
                                           ({"sensitivity": "KL"}, "CosineSimilarity")])
def test_unknown_strategy_or_sensitivity_name_lists_the_known_ones(digits, tmp_path, kwargs, known):
    with pytest.raises(ValueError, match=known) as err:
        auto_calibrate(digits, tmp_path, DigitsEvaluator(), **kwargs)
    assert next(iter(kwargs.values())) in str(err.value), f"the error does not name the unknown value: {err.value}"
    assert not (tmp_path / "auto").exists(), "nothing must be written before the arguments are checked"


def test_wrong_types_are_errors(digits, tmp_path):
    with pytest.raises(TypeError, match="SearchStrategyBase"):
        auto_calibrate(digits, tmp_path, DigitsEvaluator(), strategy=BinarySearchStrategy)  # the class, no instance
    with pytest.raises(TypeError, match="AutoCalibrationEvaluatorBase"):
        auto_calibrate(digits, tmp_path, object())


def test_failure_for_any_quantized_layer_ends_with_every_layer_in_float(digits, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="amct_retrain"):
        save_dir, history = auto_calibrate(digits, tmp_path, PenalizingEvaluator(None))
    trials = history["trials"]
    assert [len(t["float_layers"]) for t in trials] == [0, 2, 3, 4], f"binary search over 4 layers: {trials}"
    assert [t["ok"] for t in trials] == [False, False, False, True], f"unexpected outcomes: {trials}"
    sensitivity = json.loads((save_dir / "sensitivity.json").read_text())
    ranked = sorted(LAYERS, key=lambda n: -sensitivity[n])
    for t in trials:
        assert t["float_layers"] == ranked[:len(t["float_layers"])], \
            f"trial {t['trial']} does not leave the most sensitive layers in float ({sensitivity}): {t}"
    accepted = trials[history["accepted_trial"]]
    assert accepted is trials[-1] and accepted["quantized_layers"] == [], f"not every layer in float: {accepted}"
    assert "no layer" in caplog.text and "can be quantized" in caplog.text, f"no clear warning: {caplog.text}"
    assert quantized_by(tmp_path / "record.txt") == set(), "record_file must give no layer factors"
    files = output_files(str(save_dir / digits["model"].stem))
    assert quantized_in(files["fake_quant_model"]) == set(), "the saved model must quantize no layer"
    assert digits_demo.test_accuracy(files["fake_quant_model"], files["fake_quant_weights"]) == pytest.approx(
        history["original_metric"]), "the saved all-float model must score as the float model"


def test_metric_eval_rejecting_the_float_model_is_a_clear_error(digits, tmp_path):
    class Impossible(DigitsEvaluator):
        def metric_eval(self, original_metric, new_metric):
            return False, 1.0

    with pytest.raises(ValueError, match="even with every layer in float"):
        auto_calibrate(digits, tmp_path, Impossible())


def test_cosine_similarity_is_one_for_identical_outputs_and_handles_zeros():
    from amct_retrain.auto_calibration import _cosine_similarity

    x = np.arange(12, dtype=np.float32).reshape(3, 4) - 5
    assert _cosine_similarity(x, x) == pytest.approx(1.0), "identical arrays must have similarity 1"
    assert _cosine_similarity(x, -x) == pytest.approx(-1.0), "opposite arrays must have similarity -1"
    zero = np.zeros_like(x)
    assert _cosine_similarity(zero, zero) == 1.0, "two zero outputs are identical"
    assert _cosine_similarity(zero, x) == 0.0, "a zero output against a non-zero one is unrelated"


def test_cosine_sensitivity_of_a_fused_resnet_compares_the_same_batch(tmp_path):
    net = models.resnet_net()
    for layer in net.layer:
        if layer.type == "BatchNorm":
            layer.batch_norm_param.use_global_stats = True  # inference form, as fusion needs
    model, weights, config = tmp_path / "resnet.prototxt", tmp_path / "resnet.caffemodel", tmp_path / "config.json"
    model.write_text(text_format.MessageToString(net))
    models.float_weights(model, weights)
    amct_retrain.create_quant_config(str(config), str(model), str(weights))
    graph = amct_retrain.init(str(config), str(model), str(weights), str(tmp_path / "record.txt"))
    amct_retrain.quantize_model(graph, str(tmp_path / "cal.prototxt"), str(tmp_path / "cal.caffemodel"))
    caffe.Net(str(tmp_path / "cal.prototxt"), caffe.TEST, weights=str(tmp_path / "cal.caffemodel")).forward()
    save_path = str(tmp_path / "result" / "resnet")
    amct_retrain.save_model(graph, "Fakequant", save_path)
    files, layers = output_files(save_path), quant_info(save_path)
    assert len(layers) == len(models.quantizable_layer_names(net)), f"not every layer quantized: {list(layers)}"

    sensitivity = CosineSimilaritySensitivity().compute(str(model), str(weights), files["fake_quant_model"],
                                                        files["fake_quant_weights"], layers)
    assert set(sensitivity) == set(layers), f"layers missing: {sensitivity}"
    assert all(0 < v < 0.01 for v in sensitivity.values()), f"implausible INT8 sensitivities: {sensitivity}"
    # DummyData draws a new batch each forward: only when both nets see the float net's batch is
    # a model identical to itself.
    itself = CosineSimilaritySensitivity().compute(str(model), str(weights), str(model), str(weights), layers)
    assert max(itself.values()) < 1e-9, f"the float model differs from itself: not the same batch? {itself}"


INPUT_NET = """name: "input_net"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc"
  inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
"""


def test_cosine_sensitivity_of_a_model_fed_by_input_layers_needs_inputs(tmp_path):
    model, weights = tmp_path / "input.prototxt", tmp_path / "input.caffemodel"
    model.write_text(INPUT_NET)
    caffe.Net(str(model), caffe.TEST).save(str(weights))
    layers = {"conv": {"output_blob": "conv"}, "fc": {"output_blob": "fc"}}
    with pytest.raises(ValueError, match="Input layers") as err:
        CosineSimilaritySensitivity().compute(str(model), str(weights), str(model), str(weights), layers)
    assert "inputs=" in str(err.value), f"the error does not say how to give the data: {err.value}"
    x = np.random.default_rng(0).normal(size=(2, 3, 6, 6)).astype(np.float32)
    itself = CosineSimilaritySensitivity(inputs={"data": x}).compute(str(model), str(weights), str(model),
                                                                      str(weights), layers)
    assert itself == pytest.approx({"conv": 0.0, "fc": 0.0}, abs=1e-9), f"a model differs from itself: {itself}"
