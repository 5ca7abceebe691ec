"""Bad input by kind (issue 10), beside the corpus of tests/test_bad_inputs.py: Caffe's CHECKs named
by layer, no probe litter, nets with nothing to quantize, duplicate names, a valid config without
batch_num, and the entry points that build Caffe nets refusing a net Caffe cannot build."""
import json
import os

import pytest

import amct_retrain
from amct_retrain import cli, solver
from amct_retrain.errors import ArgumentError, ConfigError, ModelError
from amct_retrain.graph import model_io
from amct_retrain.reference import ReferenceExecutor
from tests import nets

pytestmark = pytest.mark.caffe

FLOAT = nets.FLOAT_NET % {"fc": 10}
INPUT_NET = """name: "deploy_style"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 6 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 } }
"""


def _edit(old, new, text=FLOAT):
    assert old in text, old
    return text.replace(old, new, 1)


CAFFE_REFUSES = [  # (net text, what the message must name)
    (_edit("num_output: 6 kernel_size: 3", "num_output: 2147483647 kernel_size: 3"),
     ["layer 'conv1' (Convolution)", "INT_MAX", "num_output"]),
    (INPUT_NET.replace("dim: 6 dim: 8", "dim: -6 dim: 8"), ["layer 'data' (Input)", "negative dimension"]),
    (_edit("num_output: 6 kernel_size: 3", "num_output: 6 kernel_size: 11"), ["layer 'conv1' (Convolution)", "kernel"]),
    (_edit("num_output: 6 kernel_size: 3", "num_output: 6 kernel_size: 3 group: 4"),
     ["layer 'conv1' (Convolution)", "convolution_param.group"]),
    (_edit('bottom: "pool" top: "fc"', 'bottom: "nope" top: "fc"'), ["layer 'fc'", "nope"]),
    (_edit('name: "relu2" type: "ReLU"', 'name: "relu2" type: "Relu"'), ["layer 'relu2'", "unknown layer type 'Relu'"]),
    (_edit('name: "relu1" type: "ReLU" bottom: "conv1"', 'name: "relu1" type: "ReLU" bottom: "data"'),
     ["layer 'relu1' (ReLU)", "'conv1' produced by multiple sources"]),
]


@pytest.mark.parametrize("text, names", CAFFE_REFUSES, ids=["num_output", "negative_dim", "kernel", "group",
                                                             "dangling_bottom", "unknown_type", "top_twice"])
def test_caffes_checks_name_the_file_phase_and_layer_and_leave_no_temp_file(tmp_path, monkeypatch, text, names):
    model = tmp_path / "m.prototxt"
    model.write_text(text)
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr("tempfile.tempdir", str(tmp))
    with pytest.raises(ModelError) as err:
        model_io.probe_shapes(model)
    message = str(err.value)
    for name in [str(model), "TRAIN phase", *names]:
        assert name in message, f"the message lacks {name!r}: {message}"
    assert list(tmp.iterdir()) == [], f"the probe left files in TMPDIR: {list(tmp.iterdir())}"


def test_create_quant_config_and_retrain_config_refuse_a_net_caffe_cannot_build(tmp_path):
    model, weights = tmp_path / "m.prototxt", tmp_path / "m.caffemodel"
    model.write_text(_edit('bottom: "pool" top: "fc"', 'bottom: "nope" top: "fc"'))
    weights.write_bytes(b"")
    for create in (amct_retrain.create_quant_retrain_config, amct_retrain.create_quant_config):
        with pytest.raises(ModelError, match="layer 'fc'"):
            create(str(tmp_path / "c.json"), str(model), str(weights))
    assert not (tmp_path / "c.json").exists(), "no config may be written for a net Caffe cannot build"


def test_a_net_with_nothing_to_quantize_is_an_error_saying_what_it_has(tmp_path):
    model, weights = tmp_path / "m.prototxt", tmp_path / "m.caffemodel"
    model.write_text("""name: "n"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" pooling_param { pool: MAX kernel_size: 2 } }
layer { name: "relu" type: "ReLU" bottom: "pool" top: "pool" }
""")
    weights.write_bytes(b"")
    for create in (amct_retrain.create_quant_retrain_config, amct_retrain.create_quant_config):
        with pytest.raises(ConfigError) as err:
            create(str(tmp_path / "c.json"), str(model), str(weights))
        for name in (str(model), "nothing to quantize", "MAX Pooling", "ReLU", "quantizable: Convolution", "AVE Pooling"):
            assert name in str(err.value), f"the message lacks {name!r}: {err.value}"


def test_two_layers_of_one_name_in_one_phase_are_refused_but_train_and_test_twins_are_fine(tmp_path):
    model = tmp_path / "m.prototxt"
    model.write_text(_edit('layer { name: "relu2" type: "ReLU"', 'layer { name: "relu1" type: "ReLU"'))
    with pytest.raises(ModelError, match="layer 'relu1'.*both run in the TRAIN phase"):
        model_io.read_prototxt(model)
    twins = FLOAT.replace('layer { name: "data"', 'layer { name: "data" include { phase: TRAIN }', 1)
    twins += twins[twins.index('layer { name: "data"'):twins.index('layer { name: "conv1"')].replace("TRAIN", "TEST")
    model.write_text(twins)
    assert len(model_io.read_prototxt(model).layer) == 9, "a TRAIN and a TEST layer may share a name"


def test_train_and_the_reference_executor_refuse_a_dangling_bottom_without_aborting(tmp_path):
    model, weights = nets.float_model(tmp_path)
    config, files = tmp_path / "config.json", {k: str(tmp_path / v) for k, v in (
        ("model", "retrain.prototxt"), ("weights", "retrain.caffemodel"), ("record", "record.txt"))}
    amct_retrain.create_quant_retrain_config(str(config), str(model), str(weights))
    amct_retrain.create_quant_retrain_model(str(model), str(weights), str(config), files["model"], files["weights"],
                                            files["record"])
    text = open(files["model"]).read()
    assert 'bottom: "pool"' in text
    with open(files["model"], "w") as f:
        f.write(text.replace('bottom: "pool"', 'bottom: "nowhere"', 1))
    solver.create_solver(tmp_path / "solver.prototxt", files["model"], max_iter=2, test_iter=1)
    with pytest.raises(ModelError, match="Unknown bottom blob 'nowhere'"):
        solver.train(tmp_path / "solver.prototxt", files["weights"])
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(FLOAT.replace('bottom: "pool"', 'bottom: "nowhere"', 1))
    with pytest.raises(ModelError, match="Unknown bottom blob 'nowhere'"):
        ReferenceExecutor(str(deploy), str(weights))


def test_save_model_of_something_that_is_not_a_graph_is_an_argument_error(tmp_path):
    with pytest.raises(ArgumentError, match="save_model: graph must be the CalibrationGraph"):
        amct_retrain.save_model("notagraph", "Both", str(tmp_path / "m"))


def test_cli_calibrate_with_a_config_that_leaves_out_batch_num(tmp_path):
    model, weights = nets.float_model(tmp_path)
    config = tmp_path / "calibration.json"
    amct_retrain.create_quant_config(str(config), str(model), str(weights))
    data = json.loads(config.read_text())
    del data["batch_num"]  # optional: 1
    config.write_text(json.dumps(data))
    out = tmp_path / "out"
    assert cli.main(["calibrate", "--model", str(model), "--weights", str(weights), "--config", str(config),
                     "--output-dir", str(out)]) == 0, "a valid config without batch_num must calibrate"
    assert os.path.isfile(out / "result" / "float_deploy_weights.caffemodel"), "no deploy model was saved"


_KILLED_CREATE = """
import os, sys, time
import amct_retrain
def stalled_replace(src, dst):  # every output staged: the process is killed before any rename
    print("staged", flush=True)
    time.sleep(120)
os.replace = stalled_replace
amct_retrain.create_quant_retrain_model(*sys.argv[1:])
"""


def test_temp_files_of_a_killed_create_are_removed_by_the_next_one(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from amct_retrain import fileio

    model, weights = nets.float_model(tmp_path)
    config = tmp_path / "config.json"
    amct_retrain.create_quant_retrain_config(str(config), str(model), str(weights))
    out = tmp_path / "out"
    args = [str(model), str(weights), str(config), str(out / "retrain.prototxt"), str(out / "retrain.caffemodel"),
            str(out / "record.txt")]
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CREATE, *args], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "staged", "the create did not stage its outputs"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    litter = sorted(p.name for p in out.iterdir())
    assert len(litter) == 3 and all(name.endswith(".tmp") for name in litter), f"expected 3 temp files: {litter}"
    past = time.time() - 10 * fileio.STALE_AFTER_S
    for name in litter:
        os.utime(out / name, (past, past))
    amct_retrain.create_quant_retrain_model(*args)
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".lock")) == \
        ["record.txt", "retrain.caffemodel", "retrain.prototxt"], f"left: {sorted(p.name for p in out.iterdir())}"


_SAVER = """
import sys
import amct_retrain
for _ in range(3):
    amct_retrain.save_quant_retrain_model(*sys.argv[1:3], "Both", sys.argv[3], sys.argv[4])
"""


def test_concurrent_saves_to_one_save_path_all_succeed_with_the_same_files(retrained, tmp_path):
    import subprocess
    import sys

    from amct_retrain.saver import output_files

    save_path = str(tmp_path / "shared" / "model")
    args = [str(retrained["model"]), str(retrained["snapshot"]), save_path, str(retrained["record"])]
    savers = [subprocess.Popen([sys.executable, "-c", _SAVER, *args], stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    errors = [saver.communicate(timeout=300)[1] for saver in savers]
    assert [s.returncode for s in savers] == [0, 0], f"a concurrent save failed: {errors}"
    for role, path in output_files(save_path).items():
        with open(path, "rb") as saved, open(retrained[role], "rb") as reference:
            assert saved.read() == reference.read(), f"{role}: concurrent saves wrote another file than one save"
    assert not [p for p in (tmp_path / "shared").iterdir() if p.name.endswith(".tmp")], "temp files left"
