"""TensorBoard scalars: the shared writer cache, reading events back, and the quant layers
logging by themselves under pycaffe and under the `caffe train` binary."""
import json
import os
import subprocess
import sys

import caffe
import numpy as np
import pytest

from amct_retrain import numerics, record, solver, tensorboard
from amct_retrain.graph import quant_layers as ql
from amct_retrain.layer_specs import SHIFT_N_SEARCH
from tests import nets

pytestmark = pytest.mark.caffe
CAFFE = os.path.join(os.path.dirname(sys.executable), "caffe")


@pytest.fixture(autouse=True)
def fresh_writers():
    """Each test starts and ends with no cached writer (files are closed, then read)."""
    tensorboard.close_all()
    yield
    tensorboard.close_all()


def with_log_dir(net, log_dir, log_every=None):
    """``net`` with ``log_dir`` (and ``log_every``) in the param_str of every toolkit layer."""
    for layer in net.layer:
        if ql.python_layer_class(layer):
            params = ql.layer_params(layer)
            params["log_dir"] = str(log_dir)
            if log_every is not None and not SHIFT_N_SEARCH.is_layer(layer):
                params["log_every"] = log_every
            layer.python_param.param_str = json.dumps(params, sort_keys=True)
    return net


def event_files(log_dir):
    return sorted(p.name for p in log_dir.glob("events.out.tfevents.*"))


def test_writer_is_shared_per_folder_and_scalars_read_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    writer = tensorboard.get_writer("runs")
    assert tensorboard.get_writer(tmp_path / "runs") is writer, "one folder, two spellings: two writers"
    tensorboard.log_scalars("runs", {"a/x": 1.5, "a/y": -2.0}, step=3)
    tensorboard.log_scalars(tmp_path / "runs", {"a/x": 2.5}, step=7)
    # Written and flushed at once: readable while the writer is still open.
    scalars = tensorboard.read_scalars(tmp_path / "runs")
    assert scalars == {"a/x": [(3, 1.5), (7, 2.5)], "a/y": [(3, -2.0)]}, f"read back {scalars}"
    assert len(event_files(tmp_path / "runs")) == 1, f"one writer, files {event_files(tmp_path / 'runs')}"


def test_new_writer_after_close_keeps_the_old_file(tmp_path):
    tensorboard.log_scalars(tmp_path, {"t": 1.0}, 0)
    tensorboard.close_all()
    tensorboard.log_scalars(tmp_path, {"t": 2.0}, 1)  # within the same second as the first file
    files = event_files(tmp_path)
    assert len(files) == 2, f"a reopened writer must start its own file, got {files}"
    assert tensorboard.read_scalars(tmp_path)["t"] == [(0, 1.0), (1, 2.0)], "the first file was clobbered"


def test_corrupt_event_file_is_an_error_naming_it(tmp_path):
    tensorboard.log_scalars(tmp_path, {"t": 1.0}, 0)
    path = tmp_path / event_files(tmp_path)[0]
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated or corrupt") as err:
        tensorboard.read_scalars(tmp_path)
    assert str(path) in str(err.value), f"error does not name the file: {err.value}"


def test_layer_log_counts_calls_and_logs_every_nth(tmp_path):
    log = tensorboard.layer_log({"name": "q", "log_dir": str(tmp_path), "log_every": 3}, "ActivationULQ")
    due = [log.count() for _ in range(7)]
    assert due == [True, False, False, True, False, False, True], f"logging calls {due}"
    log.write({"q/v": 1.0})
    assert tensorboard.read_scalars(tmp_path) == {"q/v": [(6, 1.0)]}, "step must be the 0-based call index"
    assert tensorboard.layer_log({"name": "q", "log_dir": None}, "WeightARQ") is None, "no log_dir: no logging"


def test_bad_log_every_in_caffe_names_layer_and_key(tmp_path):
    model = tmp_path / "bad.prototxt"
    params = json.dumps({"name": "q", "log_dir": str(tmp_path), "log_every": 0})
    model.write_text(f"""layer {{ name: "data" type: "DummyData" top: "x"
      dummy_data_param {{ shape {{ dim: 2 dim: 3 }} }} }}
    layer {{ name: "q" type: "Python" bottom: "x" top: "y"
      python_param {{ module: "amct_retrain_layers.activation" layer: "ActivationULQ" param_str: '{params}' }} }}""")
    with pytest.raises(ValueError) as err:
        caffe.Net(str(model), caffe.TEST)
    assert "layer 'q'" in str(err.value) and "'log_every'" in str(err.value), f"unclear error: {err.value}"


def test_stats_are_the_numerics_values():
    x = np.linspace(-3, 5, 101, dtype=np.float32)
    clips = (-1.0, 2.0)
    got = tensorboard.ulq_scalars("l", x, clips)
    scale_d, _ = numerics.ulq_deploy_factors(*clips)
    expected = {"l/clip_min": -1.0, "l/clip_max": 2.0, "l/scale_d": float(scale_d),
                "l/fraction_clipped": numerics.fraction_clipped(x, *clips)}
    assert got == expected, f"ULQ scalars {got} != {expected}"
    assert 0 < got["l/fraction_clipped"] < 1, f"some of x is outside the clips: {got}"
    assert tensorboard.arq_scalars("w", [1.0, 2.0, 6.0]) == {"w/scale_w_min": 1.0, "w/scale_w_mean": 3.0,
                                                            "w/scale_w_max": 6.0}, "ARQ scale stats"
    assert tensorboard.shift_n_scalars("s", [1, 2, 2, 3]) == {"s/shift_bit_mean": 2.0}, "shift-N mean"


def test_builders_put_log_dir_in_param_str_only_when_given(tmp_path):
    plain = ql.ulq_layer("a_ulq", "x", "y")
    assert "log_dir" not in ql.layer_params(plain), "a layer without log_dir must keep its param_str"
    layers = [ql.ulq_layer("a_ulq", "x", "y", log_dir="runs"),
              ql.arq_layer("a_arq", "y", (2, 3), 0, log_dir="runs"),
              ql.shift_n_layer("a_shift_n", "a", "a", "a_ulq", "a_arq", (2, 3), 0, "r.txt", log_dir="runs")]
    for layer in layers:
        assert ql.layer_params(layer)["log_dir"] == "runs", f"{layer.name}: log_dir not in param_str"


def test_caffe_train_layers_log_clips_scales_and_shift_n(tmp_path):
    """Plain `caffe train` (no Python of ours driving it): the layers' own logs reach the files."""
    record_file, log_dir = tmp_path / "record.txt", tmp_path / "tb"
    model = nets.write_net(with_log_dir(nets.quant_net(record_file), log_dir, log_every=5), tmp_path / "q.prototxt")
    weights = tmp_path / "init.caffemodel"
    nets.init_weights(model, weights)
    solver_file = tmp_path / "solver.prototxt"
    solver.create_solver(solver_file, model, max_iter=20, test_iter=1, display=0)
    run = subprocess.run([CAFFE, "train", f"-solver={solver_file}", f"-weights={weights}"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, f"caffe train failed:\n{run.stderr[-3000:]}"
    scalars = tensorboard.read_scalars(log_dir)
    for ulq in ("conv1_ulq", "ip1_ulq"):
        for what in ("clip_min", "clip_max", "scale_d", "fraction_clipped"):
            steps = [s for s, _ in scalars.get(f"{ulq}/{what}", [])]
            assert steps == [0, 5, 10, 15], f"{ulq}/{what}: logged at TRAIN forward calls {steps}, want every 5th"
    for arq in ("conv1_arq", "ip1_arq"):
        assert f"{arq}/scale_w_mean" in scalars, f"no {arq} weight scales in {sorted(scalars)}"
    # The last TEST runs after the last snapshot, just before the process exits: it must be there.
    records = record.read_record(record_file)
    for layer in ("conv1", "ip1"):
        logged = scalars.get(f"{layer}_shift_n/shift_bit_mean")
        assert logged, f"no shift-N logged for {layer}: {sorted(scalars)}"
        expected = float(np.mean(records[layer].shift_bit))
        assert logged[-1][1] == expected, f"{layer}: logged shift-N {logged[-1][1]} != record mean {expected}"
    clip_max = scalars["ip1_ulq/clip_max"]
    assert all(np.isfinite(v) and v > 0 for _, v in clip_max), f"ip1_ulq clip_max {clip_max}"
    # Histograms of each quantizer's input and each layer's master weights, at the same interval.
    histograms = tensorboard.read_histograms(log_dir)
    for tag in ("conv1_ulq/input_activations", "ip1_ulq/input_activations", "conv1_arq/master_weights",
                "ip1_arq/master_weights"):
        steps = [s for s, _ in histograms.get(tag, [])]
        assert steps == [0, 5, 10, 15], f"histogram {tag} logged at {steps}, want every 5th TRAIN call"
    master, activations = histograms["conv1_arq/master_weights"][0][1], histograms["conv1_ulq/input_activations"][0][1]
    assert master.num == np.prod(nets.CONV_WEIGHT_SHAPE), "the histogram must hold every master weight"
    assert activations.num == nets.BATCH * np.prod(nets.IN_SHAPE) and sum(activations.bucket) == activations.num


def test_caffe_train_tests_reads_the_solver_and_the_resume_point_from_the_command_line(tmp_path):
    from caffe.proto import caffe_pb2

    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text("net: 'n.prototxt' test_iter: 9 test_interval: 10 max_iter: 30 test_initialization: false")
    state = tmp_path / "r_iter_10.solverstate"
    state.write_bytes(caffe_pb2.SolverState(iter=10).SerializeToString())
    cmdline = tmp_path / "cmdline"

    def tests_of(*argv):
        cmdline.write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        return tensorboard.caffe_train_tests(str(cmdline))

    fresh = tests_of("/x/caffe.bin", "train", f"-solver={solver_file}", "-weights=w.caffemodel")
    assert fresh.test_iter == 9 and list(fresh.iterations) == [10, 20, 30], "a fresh run tests at 10, 20, 30"
    resumed = tests_of("/x/caffe.bin", "train", "--solver", str(solver_file), "-snapshot", str(state))
    assert list(resumed.iterations) == [10, 20, 30], "a run resumed at 10 tests there first, as Caffe does"
    assert tests_of("/x/caffe.bin", "test", f"-model={solver_file}") is None, "caffe test is not caffe train"
    assert tests_of(sys.executable, "train.py", f"-solver={solver_file}") is None, "pycaffe logs through train()"
