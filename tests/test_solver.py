"""Solver templates, the contract's solver rules, and train() with TensorBoard, on real Caffe."""
import os
import re
import subprocess
import sys

import caffe
import numpy as np
import pytest
from caffe.proto import caffe_pb2
from google.protobuf import text_format

from amct_retrain import numerics, record, solver, tensorboard
from amct_retrain.graph.model_io import read_caffemodel
from amct_retrain.solver import SolverError
from tests import nets
from tests.nets import CLIP_STATE, MASTER_WEIGHTS

pytestmark = pytest.mark.caffe
CAFFE = os.path.join(os.path.dirname(sys.executable), "caffe")


@pytest.fixture
def config(tmp_path):
    def write(batch_num=1):
        path = tmp_path / "config.json"
        path.write_text(f'{{"version": 1, "batch_num": {batch_num}}}')
        return path
    return write


def read_param(path) -> caffe_pb2.SolverParameter:
    return text_format.Parse(path.read_text(), caffe_pb2.SolverParameter())


# --------------------------------------------------------------------------- check_solver

VALID = """net: "NET"
test_iter: 2
test_interval: 20
test_initialization: false
base_lr: 0.001
lr_policy: "fixed"
max_iter: 20
snapshot: 20
snapshot_prefix: "PREFIX"
"""


@pytest.mark.parametrize("change, field, value, batch_num", [
    ('+train_net: "train.prototxt"', "train_net", '"train.prototxt"', 1),
    ('+test_net: "test.prototxt"', "test_net", '["test.prototxt"]', 1),
    ('+net_param { name: "inline" }', "net_param", "{...}", 1),
    ('-net: "NET"', "net", '"" (not set', 1),
    ('-test_iter: 2', "test_iter", "[]", 1),
    ("", "test_iter", "[2]", 3),
    ("test_interval: 20=>test_interval: 0", "test_interval", "= 0", 1),
    ("-test_interval: 20", "test_interval", "0 (not set", 1),
    ("test_interval: 20=>test_interval: 7", "test_interval", "= 7", 1),
    ("test_initialization: false=>test_initialization: true", "test_initialization", "= true", 1),
    ("-test_initialization: false", "test_initialization", "true (not set; Caffe's default)", 1),
])
def test_check_solver_rejects_each_violation(tmp_path, config, change, field, value, batch_num):
    text = VALID
    if change.startswith("+"):
        text += change[1:] + "\n"
    elif change.startswith("-"):
        text = text.replace(change[1:] + "\n", "")
    elif change:
        old, new = change.split("=>")
        text = text.replace(old, new)
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(text)
    with pytest.raises(SolverError) as err:
        solver.check_solver(solver_file, config(batch_num))
    message = str(err.value)
    assert isinstance(err.value, ValueError), "SolverError must be a ValueError"
    for part in (str(solver_file), f"field '{field}'", value):
        assert part in message, f"{part!r} missing from the error:\n{message}"


def test_check_solver_parse_error_names_file_and_line(tmp_path, config):
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(VALID + "test_intreval: 5\n")
    with pytest.raises(SolverError) as err:
        solver.check_solver(solver_file, config())
    line = VALID.count("\n") + 1
    assert f"{solver_file}:{line}:" in str(err.value) and "test_intreval" in str(err.value), \
        f"parse error does not name FILE:LINE and the field: {err.value}"


def test_check_solver_reads_batch_num_from_config(tmp_path, config):
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(VALID)
    solver.check_solver(solver_file, config(2))  # test_iter 2 covers batch_num 2
    bad = tmp_path / "bad.json"
    bad.write_text('{"batch_num": 0}')
    with pytest.raises(ValueError, match="batch_num") as err:
        solver.check_solver(solver_file, bad)
    assert str(bad) in str(err.value), f"config error does not name the config: {err.value}"


# --------------------------------------------------------------------------- create_solver


def test_create_solver_writes_a_valid_absolute_solver(tmp_path, model, config, monkeypatch):
    model_file, _, _ = model
    monkeypatch.chdir(tmp_path)
    solver.create_solver("out/solver.prototxt", "quant.prototxt", max_iter=30, test_iter=2, base_lr=0.002)
    solver_file = tmp_path / "out" / "solver.prototxt"
    solver.check_solver(solver_file, config(2))
    param = read_param(solver_file)
    assert param.net == str(model_file), f"net path {param.net!r} is not absolute"
    assert param.snapshot_prefix == str(tmp_path / "out" / "retrained"), f"prefix {param.snapshot_prefix!r}"
    assert (param.test_interval, param.snapshot, param.max_iter) == (30, 30, 30), \
        "TEST and the snapshot must come at the last iteration"
    assert not param.test_initialization and param.HasField("test_initialization"), "no initial TEST"
    assert np.float32(param.base_lr) == np.float32(0.002) and param.momentum == np.float32(0.9), "SGD defaults"
    assert param.solver_mode == caffe_pb2.SolverParameter.CPU, "CPU solver"
    assert sorted(os.listdir(tmp_path / "out")) == ["solver.prototxt"], "temp files left behind"


def test_create_solver_overrides_and_adam_template(tmp_path, model):
    model_file, _, _ = model
    solver_file = tmp_path / "s.prototxt"
    solver.create_solver(solver_file, model_file, 40, 1, template="retrain_adam", lr_policy="multistep",
                         stepvalue=[10, 30], gamma=0.5, solver_mode="CPU", random_seed=3)
    param = read_param(solver_file)
    assert param.type == "Adam" and list(param.stepvalue) == [10, 30] and param.random_seed == 3, \
        f"overrides or template not applied:\n{solver_file.read_text()}"


@pytest.mark.parametrize("kwargs, fragment", [
    ({"test_iter": 0}, "field 'test_iter' = [0]"),
    ({"lr_policy": "cosine"}, "field 'lr_policy' = \"cosine\""),
    ({"lr_policy": "step"}, "field 'stepsize' = 0"),
    ({"test_initialization": True}, "field 'test_initialization' = true"),
    ({"snapshot_after_train": False, "snapshot": 7}, "field 'snapshot_after_train' = false"),
    ({"momentun": 0.9}, "unknown solver field 'momentun'"),
    ({"stepvalue": 5}, "field 'stepvalue' = 5"),
])
def test_create_solver_rejects_bad_values_and_writes_nothing(tmp_path, model, kwargs, fragment):
    model_file, _, _ = model
    solver_file = tmp_path / "s.prototxt"
    args = {"test_iter": 1, **kwargs}
    with pytest.raises(SolverError) as err:
        solver.create_solver(solver_file, model_file, 20, **args)
    assert fragment in str(err.value) and str(solver_file) in str(err.value), f"unclear error: {err.value}"
    assert not solver_file.exists(), "a rejected solver must not be written"


def test_unknown_template_lists_the_known_ones(tmp_path, model):
    with pytest.raises(ValueError, match="retrain_sgd") as err:
        solver.create_solver(tmp_path / "s.prototxt", model[0], 10, 1, template="nope")
    assert "'nope'" in str(err.value), f"error does not name the template: {err.value}"


# --------------------------------------------------------------------------- learning rate


@pytest.mark.parametrize("overrides", [
    {"lr_policy": "step", "stepsize": 4, "gamma": 0.5},
    {"lr_policy": "multistep", "stepvalue": [3, 7], "gamma": 0.1},
    {"lr_policy": "exp", "gamma": 0.9},
    {"lr_policy": "inv", "gamma": 0.1, "power": 0.75},
    {"lr_policy": "poly", "power": 2.0},
    {"lr_policy": "sigmoid", "gamma": -0.5, "stepsize": 6},
])
def test_learning_rate_is_the_one_caffe_uses(tmp_path, model, overrides):
    """Caffe logs 'Iteration i, lr = X' for every display iteration: compare with ours."""
    model_file, weights_file, _ = model
    solver_file = tmp_path / "s.prototxt"
    solver.create_solver(solver_file, model_file, 12, 1, base_lr=0.01, display=1, **overrides)
    run = subprocess.run([CAFFE, "train", f"-solver={solver_file}", f"-weights={weights_file}"],
                         capture_output=True, text=True)
    assert run.returncode == 0, f"caffe train failed:\n{run.stderr[-3000:]}"
    logged = {int(i): float(lr) for i, lr in re.findall(r"Iteration (\d+), lr = ([-+.\deE]+)", run.stderr)}
    assert sorted(logged) == list(range(12)), f"Caffe logged lr at {sorted(logged)}"
    param = read_param(solver_file)
    for i, caffe_lr in logged.items():
        ours = solver.learning_rate(param, i)
        assert np.isclose(ours, caffe_lr, rtol=2e-5, atol=0), \
            f"{overrides}: iteration {i} lr {ours} != Caffe's {caffe_lr}"


# --------------------------------------------------------------------------- training


def test_created_solver_runs_unchanged_under_caffe_train(tmp_path, model):
    model_file, weights_file, record_file = model
    solver_file = tmp_path / "run" / "solver.prototxt"
    solver.create_solver(solver_file, model_file, max_iter=20, test_iter=1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run([CAFFE, "train", f"-solver={solver_file}", f"-weights={weights_file}"],
                         capture_output=True, text=True, cwd=elsewhere)
    assert run.returncode == 0, f"caffe train failed:\n{run.stderr[-3000:]}"
    assert "Finetuning from" in run.stderr, "caffe train ignored -weights"
    snapshot = tmp_path / "run" / "retrained_iter_20.caffemodel"
    assert snapshot.is_file(), f"no final snapshot at {snapshot}: {sorted(os.listdir(solver_file.parent))}"
    records = record.read_record(record_file)
    assert set(records) == {"conv1", "ip1"} and all(map(record.layer_record_complete, records.values())), \
        f"the last TEST did not write a complete record: {records}"


def test_train_logs_loss_lr_clips_and_shift_n(tmp_path, model):
    model_file, weights_file, record_file = model
    solver_file = tmp_path / "solver.prototxt"
    log_dir = tmp_path / "tb"
    # A TEST in the middle too, to read Caffe's TEST outputs after step() as well as at the end.
    solver.create_solver(solver_file, model_file, max_iter=20, test_iter=1, display=5, test_interval=10)
    final = solver.train(solver_file, weights_file, log_dir=log_dir)
    assert final == str(tmp_path / "retrained_iter_20.caffemodel") and os.path.isfile(final), f"returned {final}"
    tensorboard.close_all()
    scalars = tensorboard.read_scalars(log_dir)
    steps = {tag: [s for s, _ in values] for tag, values in scalars.items()}
    for tag in ("train/loss", "train/lr", "conv1_ulq/clip_max", "ip1_ulq/clip_max", "conv1_ulq/clip_min",
                "conv1_ulq/scale_d", "conv1_ulq/fraction_clipped", "conv1_arq/scale_w_mean", "ip1_arq/scale_w_max"):
        assert steps.get(tag) == [0, 5, 10, 15], f"{tag}: logged at {steps.get(tag)}, want every display (5)"
    for tag in ("test/loss", "conv1_shift_n/shift_bit_mean", "ip1_shift_n/shift_bit_mean"):
        assert steps.get(tag) == [10, 20], f"{tag}: logged at {steps.get(tag)}, want after each TEST (10, 20)"
    histograms = tensorboard.read_histograms(log_dir)
    for tag in ("conv1_ulq/input_activations", "ip1_ulq/input_activations", "conv1_arq/master_weights"):
        assert [s for s, _ in histograms.get(tag, [])] == [0, 5, 10, 15], f"histogram {tag}: want every display (5)"
    param = read_param(solver_file)
    assert all(v == np.float32(solver.learning_rate(param, s)) for s, v in scalars["train/lr"]), "lr values"
    records = record.read_record(record_file)
    assert scalars["ip1_shift_n/shift_bit_mean"][-1][1] == float(np.mean(records["ip1"].shift_bit)), \
        "the final shift-N logged is not the record's"
    # Fine-tuning started from weights_file: its weight scales, not the fillers' (the master
    # weights have no filler: all zeros, scale 1), moved by one small update at step 0.
    initial = numerics.arq_scale(read_caffemodel(weights_file)["conv1_arq"][MASTER_WEIGHTS], 0)
    logged = scalars["conv1_arq/scale_w_max"][0][1]
    assert np.isclose(logged, initial.max(), rtol=0.05), \
        f"step-0 scale {logged} is not from the weights ({initial.max()})"


def test_train_resumes_from_solverstate_with_clips_and_master_weights(tmp_path, model, monkeypatch):
    model_file, weights_file, _ = model
    solver_file = tmp_path / "solver.prototxt"
    solver.create_solver(solver_file, model_file, max_iter=20, test_iter=1, snapshot=10)
    solver.train(solver_file, weights_file)
    state, weights_10 = tmp_path / "retrained_iter_10.solverstate", tmp_path / "retrained_iter_10.caffemodel"
    assert state.is_file() and weights_10.is_file(), f"no snapshot at 10: {sorted(os.listdir(tmp_path))}"

    at_resume = {}
    get_solver = caffe.get_solver

    def spying_get_solver(path):
        """The real solver, which records its iteration and blobs when the first iteration starts."""
        s = get_solver(path)

        def on_start():
            if not at_resume:
                at_resume["iter"] = s.iter
                at_resume["blobs"] = {name: [b.data.copy() for b in blobs]
                                      for name, blobs in s.net.params.items()}
        s.add_callback(on_start, lambda: None)
        return s

    monkeypatch.setattr(caffe, "get_solver", spying_get_solver)
    final = solver.train(solver_file, snapshot=state, log_dir=tmp_path / "tb")
    assert at_resume.get("iter") == 10, f"resumed at iteration {at_resume.get('iter')}, not 10"
    assert final == str(tmp_path / "retrained_iter_20.caffemodel") and os.path.isfile(final), f"final {final}"
    saved = read_caffemodel(weights_10)
    for name in ("conv1_ulq", "ip1_ulq", "conv1_arq", "ip1_arq"):
        for i, (got, want) in enumerate(zip(at_resume["blobs"][name], saved[name])):
            assert np.array_equal(got, want), f"{name} blob {i} at the resume point differs from the snapshot"
    assert at_resume["blobs"]["conv1_ulq"][CLIP_STATE][0] == 1.0, "the resumed clips must not wait for IFMR again"
    tensorboard.close_all()
    loss_steps = [s for s, _ in tensorboard.read_scalars(tmp_path / "tb")["train/loss"]]
    assert loss_steps[0] == 10, f"the resumed run logged from step {loss_steps[0]}, not 10"


def test_train_rejects_what_caffe_would_abort_on(tmp_path, model):
    model_file, weights_file, _ = model
    solver_file = tmp_path / "solver.prototxt"
    solver.create_solver(solver_file, model_file, max_iter=4, test_iter=1, snapshot_prefix=tmp_path / "snaps" / "r")
    (tmp_path / "snaps").rmdir()
    with pytest.raises(SolverError, match="field 'snapshot_prefix'.*folder does not exist"):
        solver.train(solver_file, weights_file)
    (tmp_path / "snaps").mkdir()
    with pytest.raises(ValueError, match="not both"):
        solver.train(solver_file, weights_file, snapshot=tmp_path / "x.solverstate")
    with pytest.raises(FileNotFoundError, match="x.solverstate"):
        solver.train(solver_file, snapshot=tmp_path / "x.solverstate")
    float_model, float_weights = nets.float_model(tmp_path)  # conv1 of another shape
    with pytest.raises(ValueError, match="layer 'conv1' has blobs of shapes") as err:
        solver.train(solver_file, float_weights)
    assert str(float_weights) in str(err.value), f"error does not name the weights file: {err.value}"


def test_train_checks_test_iter_against_shift_n_batch_num(tmp_path):
    model_file = nets.write_net(nets.quant_net(tmp_path / "r.txt", batch_num=2), tmp_path / "q.prototxt")
    solver_file = tmp_path / "solver.prototxt"
    solver.create_solver(solver_file, model_file, max_iter=4, test_iter=1)
    with pytest.raises(SolverError) as err:
        solver.train(solver_file)
    assert "field 'test_iter' = [1]" in str(err.value) and "ShiftNSearch layer 'conv1_shift_n'" in str(err.value), \
        f"unclear error: {err.value}"
