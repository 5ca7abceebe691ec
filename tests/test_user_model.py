"""A Caffe user's own model (tests/user_model.py: LMDB data with transform_param, BatchNorm as a
train_val has it, Concat, LRN, Eltwise, MAX and AVE pooling, Dropout, and its Input-layer deploy
twin) through the toolkit, in real Caffe: each field defect of issue 9 has its test here.

Every test works on its own copy of the prototxts and weights (``user.copy_to``); all nets read
the same LMDBs, two at once where a test holds two nets (see tests/user_model.py).
"""
import gc
import json
import os
import re
import subprocess
import sys

import caffe
import numpy as np
import pytest

import amct_retrain
from amct_retrain import solver, tensorboard
from amct_retrain.auto_calibration import OutputBlobEvaluator
from amct_retrain.errors import DataError, ModelError
from amct_retrain.graph import model_io
from amct_retrain.reference import ReferenceExecutor
from amct_retrain.saved_models import output_files
from tests import user_model

pytestmark = pytest.mark.caffe
BIN = os.path.dirname(sys.executable)
CAFFE = os.path.join(BIN, "caffe")


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """The user model with float weights trained by `caffe train`."""
    return user_model.build(tmp_path_factory.mktemp("user_model"))


@pytest.fixture(autouse=True)
def fresh_writers():
    tensorboard.close_all()
    yield
    tensorboard.close_all()


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """The ``amct-retrain`` console script, as a user runs it; fails the test on a non-zero exit."""
    run = subprocess.run([os.path.join(BIN, "amct-retrain"), *map(str, args)], capture_output=True, text=True,
                         cwd=cwd)
    assert run.returncode == 0, f"amct-retrain {args[0]} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run


def test_accuracy_batches(model_file, weights_file, batches: int) -> list[float]:
    """Accuracy of each TEST batch, by hand: argmax of ip2 against the label blob."""
    net = caffe.Net(str(model_file), caffe.TEST, weights=str(weights_file))
    accuracies = []
    for _ in range(batches):
        net.forward()
        accuracies.append(float(np.mean(net.blobs["ip2"].data.argmax(axis=1) == net.blobs["label"].data)))
    return accuracies


test_accuracy_batches.__test__ = False  # a helper, not a test


def caffe_printed_outputs(log: str) -> dict[str, float]:
    """The last value of each "Test net output #i: name = value" line of a Caffe log."""
    return {name: float(value) for name, value in re.findall(r"Test net output #\d+: (\S+) = ([-+0-9.eE]+)", log)}


# --------------------------------------------------------------------------- 2. evaluator


def test_output_blob_evaluator_returns_the_mean_over_test_batches(user, tmp_path):
    own = user.copy_to(tmp_path / "model")
    by_hand = test_accuracy_batches(own.train_val, own.weights, user_model.TEST_ITER)
    assert np.mean(by_hand) != by_hand[-1], f"the mean is the last batch's, the test cannot tell them: {by_hand}"
    metric = OutputBlobEvaluator("accuracy", test_iter=user_model.TEST_ITER).evaluate(str(own.train_val),
                                                                                      str(own.weights))
    assert metric == pytest.approx(np.mean(by_hand), abs=1e-6), \
        f"evaluate gave {metric}, the mean of the batches is {np.mean(by_hand)} (last batch {by_hand[-1]})"
    with pytest.raises(ModelError, match="no output blob 'acc'"):
        OutputBlobEvaluator("acc").evaluate(str(own.train_val), str(own.weights))


# --------------------------------------------------------------------------- 6. BatchNorm, TEST-phase nets


def calibrate(model, weights, out, batch_num=2, feed=None):
    """Calibration of ``model`` under ``out``; ``feed(net, i)`` sets batch i (None: the net's own data)."""
    out.mkdir(parents=True, exist_ok=True)
    config, record_file = out / "config.json", out / "record.txt"
    amct_retrain.create_quant_config(str(config), str(model), str(weights), batch_num=batch_num)
    graph = amct_retrain.init(str(config), str(model), str(weights), str(record_file))
    amct_retrain.quantize_model(graph, str(out / "calibration.prototxt"), str(out / "calibration.caffemodel"))
    net = caffe.Net(str(out / "calibration.prototxt"), caffe.TEST, weights=str(out / "calibration.caffemodel"))
    for i in range(batch_num):
        if feed is not None:
            feed(net, i)
        net.forward()
    del net
    gc.collect()  # the calibration net's LMDB reader goes before the next net reads the LMDB
    amct_retrain.save_model(graph, "Both", str(out / "result" / "model"))
    return record_file, str(out / "result" / "model")


def test_train_val_batchnorm_with_global_stats_unset_calibrates_and_converts(user, tmp_path):
    own = user.copy_to(tmp_path / "model")
    record_file, save_path = calibrate(own.train_val, own.weights, tmp_path / "calib")
    info = json.loads(open(output_files(save_path)["quant_info"]).read())
    assert info["fused_layers"] == {"conv1": {"kind": "conv_bn", "removed": ["bn1", "scale1"]}}, info["fused_layers"]
    assert set(info["quantized_layers"]) == set(user_model.QUANTIZABLE), \
        f"quantized: {sorted(info['quantized_layers'])}"
    fake = output_files(save_path)
    float_acc = np.mean(test_accuracy_batches(own.train_val, own.weights, user_model.TEST_ITER))
    gc.collect()
    quant_acc = np.mean(test_accuracy_batches(fake["fake_quant_model"], fake["fake_quant_weights"],
                                              user_model.TEST_ITER))
    assert quant_acc >= float_acc - 0.02, f"calibrated accuracy {quant_acc} vs float {float_acc}"
    converted = str(tmp_path / "converted" / "model")
    amct_retrain.convert_model(str(own.train_val), str(own.weights), str(record_file), converted)
    assert open(output_files(converted)["deploy_weights"], "rb").read() == \
        open(fake["deploy_weights"], "rb").read(), "convert_model did not reproduce save_model"

    false = tmp_path / "false.prototxt"
    false.write_text(own.train_val.read_text().replace(
        'type: "BatchNorm" bottom: "conv1" top: "conv1" }',
        'type: "BatchNorm" bottom: "conv1" top: "conv1" batch_norm_param { use_global_stats: false } }'))
    config = tmp_path / "false_config.json"
    amct_retrain.create_quant_config(str(config), str(false), str(own.weights))
    graph = amct_retrain.init(str(config), str(false), str(own.weights), str(tmp_path / "false_record.txt"))
    for call in (lambda: amct_retrain.quantize_model(graph, str(tmp_path / "c.prototxt"),
                                                     str(tmp_path / "c.caffemodel")),
                 lambda: amct_retrain.convert_model(str(false), str(own.weights), str(record_file),
                                                    str(tmp_path / "x" / "m"))):
        with pytest.raises(ModelError) as err:
            call()
        message = str(err.value)
        assert "'bn1'" in message and "use_global_stats: false" in message and "TEST phase too" in message \
            and "TRAIN phase" not in message, f"not the true reason: {message}"
    assert not (tmp_path / "c.prototxt").exists() and not (tmp_path / "x").exists(), "a refused call wrote files"


# --------------------------------------------------------------------------- 5. unfed Input nets


def test_unfed_input_net_is_refused_and_a_fed_one_calibrates(user, tmp_path):
    deploy = user.copy_to(tmp_path / "model")
    with pytest.raises(DataError) as err:
        calibrate(deploy.deploy, deploy.weights, tmp_path / "unfed")
    message = str(err.value)
    assert "conv1" in message and "constant (value 0.0)" in message and "net.blobs['data'].data[...]" in message, \
        f"the error does not name the layer or say how to feed the net: {message}"

    images, labels = user_model.test_set()
    batches = images.reshape(-1, user_model.TEST_BATCH, *images.shape[1:])

    def feed(net, i):
        net.blobs["data"].data[...] = batches[i]

    _, save_path = calibrate(deploy.deploy, deploy.weights, tmp_path / "fed", feed=feed)
    files = output_files(save_path)
    fake = caffe.Net(files["fake_quant_model"], caffe.TEST, weights=files["fake_quant_weights"])
    float_net = caffe.Net(str(deploy.deploy), caffe.TEST, weights=str(deploy.weights))
    hits = {"float": 0, "fake": 0}
    for batch, label in zip(batches, labels.reshape(batches.shape[0], -1)):
        for key, net in (("float", float_net), ("fake", fake)):
            net.blobs["data"].data[...] = batch
            hits[key] += int(np.sum(net.forward()["prob"].argmax(axis=1) == label))
    assert hits["fake"] >= hits["float"] - 0.02 * len(labels), f"fed calibration: correct images {hits}"


def make_quantization_aware(model_file, weights_file, tmp_path):
    """The retrain config and quantization-aware model of ``model_file`` under ``tmp_path``:
    (retrain.prototxt, retrain.caffemodel)."""
    config, model, weights, record_file = (tmp_path / n for n in ("config.json", "retrain.prototxt",
                                                                   "retrain.caffemodel", "record.txt"))
    amct_retrain.create_quant_retrain_config(str(config), str(model_file), str(weights_file))
    amct_retrain.create_quant_retrain_model(str(model_file), str(weights_file), str(config), str(model),
                                            str(weights), str(record_file))
    return model, weights


def test_unfed_input_net_is_refused_in_retraining(user, tmp_path):
    own = user.copy_to(tmp_path / "model")
    model, weights = make_quantization_aware(own.deploy, own.weights, tmp_path)
    net = caffe.Net(str(model), caffe.TEST, weights=str(weights))
    with pytest.raises(DataError, match=r"ActivationULQ layer 'conv1_ulq'.*clips are initialised on \(IFMR\)"
                                        r".*net.blobs\['data'\]"):
        net.forward()
    # Clips already set (a TEST pass after training): batch_num constant TEST batches are refused too.
    images, _ = user_model.test_set()
    net.blobs["data"].data[...] = images[:user_model.TEST_BATCH]
    net.forward()
    net.blobs["data"].data[...] = 0
    with pytest.raises(DataError, match=r"'conv1_ulq'.*each of the 1 TEST batch\(es\) of a shift-N search"):
        net.forward()


# --------------------------------------------------------------------------- 3, 8, 9 and the whole flow


@pytest.fixture(scope="module")
def cli_run(user, tmp_path_factory):
    """The CLI flow of a user: config -> prepare -> train (TensorBoard) -> save, each step a process."""
    tmp = tmp_path_factory.mktemp("cli")
    own = user.copy_to(tmp / "model")
    out, tb = tmp / "retrain", tmp / "tb"
    config = tmp / "config.json"
    runs = {"config": run_cli("config", "--model", own.train_val, "--weights", own.weights, "--output", config)}
    runs["prepare"] = run_cli("prepare", "--model", own.train_val, "--weights", own.weights, "--config", config,
                              "--output-dir", out, "--max-iter", 40, "--test-iter", user_model.TEST_ITER,
                              "--base-lr", 0.001)
    runs["train"] = run_cli("train", "--solver", out / "solver.prototxt", "--weights", out / "retrain.caffemodel",
                            "--log-dir", tb)
    save_path = tmp / "result" / "model"
    runs["save"] = run_cli("save", "--model", out / "retrain.prototxt",
                           "--weights", out / "retrained_iter_40.caffemodel", "--save-path", save_path)
    return {"tmp": tmp, "own": own, "out": out, "tb": tb, "save_path": str(save_path), "runs": runs}


def test_cli_prepare_reports_each_fusion_once(cli_run):
    console = cli_run["runs"]["prepare"].stderr + cli_run["runs"]["prepare"].stdout
    lines = [line for line in console.splitlines() if "bn1" in line]
    assert len(lines) == 1, f"the BatchNorm fold is reported {len(lines)} times: {lines}"


def test_caffe_log_file_of_a_refused_run_is_removed_but_one_caffe_wrote_to_is_kept(tmp_path):
    from amct_retrain.cli import _caffe_log_in

    refused, failed, done = (tmp_path / f"{name}.log" for name in ("refused", "failed", "done"))
    with pytest.raises(ModelError), _caffe_log_in(str(refused)):
        raise ModelError("refused before Caffe ran")
    assert not refused.exists(), "a run refused before Caffe logged anything left an empty log file"
    with pytest.raises(ModelError), _caffe_log_in(str(failed)):
        os.write(2, b"F1201 a Caffe CHECK failed\n")
        raise ModelError("failed in Caffe")
    assert failed.read_text() == "F1201 a Caffe CHECK failed\n", "the log of a run that failed in Caffe was lost"
    with _caffe_log_in(str(done)):
        pass
    assert done.is_file(), "the log of a successful run must stay, even empty"


def test_cli_train_shows_the_bar_and_the_test_means_and_keeps_caffe_log_in_a_file(cli_run):
    run = cli_run["runs"]["train"]
    console = run.stdout + run.stderr
    assert not re.search(r"^[IWE]\d{4} ", console, re.M), f"Caffe's log reached the console:\n{console[-2000:]}"
    assert "retrain: 100%" in console and "40/40" in console, f"no progress bar:\n{console[-2000:]}"
    caffe_log = cli_run["out"] / "caffe_train.log"
    assert caffe_log.is_file() and "Iteration" in caffe_log.read_text(), "Caffe's log is not in caffe_train.log"
    shown = dict(re.findall(r"TEST net #0 at iteration 40, mean of 9 batches: (\S+) = ([-+0-9.eE]+)", console))
    assert set(shown) == {"accuracy", "loss"}, f"the final TEST outputs are not shown:\n{console[-2000:]}"
    assert "without requantizing" in console, "the console does not say whose accuracy that is"
    # The TensorBoard event holds the mean Caffe prints for this snapshot's TEST, not the last batch.
    logged = tensorboard.read_scalars(cli_run["tb"])["test/accuracy"]
    assert [step for step, _ in logged] == [40], f"test/accuracy logged at {logged}"
    test = subprocess.run([CAFFE, "test", f"-model={cli_run['out'] / 'retrain.prototxt'}",
                           f"-weights={cli_run['out'] / 'retrained_iter_40.caffemodel'}",
                           f"-iterations={user_model.TEST_ITER}"], capture_output=True, text=True)
    assert test.returncode == 0, test.stderr[-2000:]
    printed = float(re.findall(r"\] accuracy = ([-+0-9.eE]+)", test.stderr)[-1])
    assert logged[0][1] == pytest.approx(printed, abs=1e-6) and \
        float(shown["accuracy"]) == pytest.approx(printed, abs=1e-6), \
        f"TensorBoard {logged[0][1]}, console {shown['accuracy']}, caffe test prints {printed}"


def test_plain_caffe_train_layers_log_the_test_means_caffe_prints(user, tmp_path):
    """Plain `caffe train` on a model prepared with "log_dir" in the config: the layers log the
    TEST outputs themselves, the means Caffe prints, at the iterations of the TEST passes."""
    own = user.copy_to(tmp_path / "model")
    config, out, tb = tmp_path / "config.json", tmp_path / "retrain", tmp_path / "tb"
    run_cli("config", "--model", own.train_val, "--weights", own.weights, "--output", config)
    config.write_text(json.dumps({**json.loads(config.read_text()), "log_dir": str(tb)}))
    run_cli("prepare", "--model", own.train_val, "--weights", own.weights, "--config", config, "--output-dir", out,
            "--max-iter", 20, "--test-iter", user_model.TEST_ITER)
    solver_file = out / "solver.prototxt"
    text = solver_file.read_text().replace("test_interval: 20", "test_interval: 10")
    solver_file.write_text(text)
    run = subprocess.run([CAFFE, "train", f"-solver={solver_file}", f"-weights={out / 'retrain.caffemodel'}"],
                         capture_output=True, text=True)
    assert run.returncode == 0, f"caffe train failed:\n{run.stderr[-3000:]}"
    printed = re.findall(r"Iteration (\d+), Testing net.*?Test net output #0: accuracy = (\S+)\n.*?"
                         r"Test net output #1: loss = (\S+) \(\* 1 = \S+ loss\)", run.stderr, re.S)
    assert [int(i) for i, *_ in printed] == [10, 20], f"Caffe's TEST lines:\n{run.stderr[-3000:]}"
    scalars = tensorboard.read_scalars(tb)
    for tag, column in (("test/accuracy", 1), ("test/loss", 2)):
        logged = scalars.get(tag, [])
        assert [step for step, _ in logged] == [10, 20], f"{tag} logged at {logged}"
        for (step, value), row in zip(logged, printed):
            assert value == pytest.approx(float(row[column]), rel=1e-5), \
                f"{tag} at {step}: TensorBoard {value}, Caffe printed {row[column]}"
    saved = tmp_path / "result" / "m"
    amct_retrain.save_quant_retrain_model(str(out / "retrain.prototxt"), str(out / "retrained_iter_20.caffemodel"),
                                          "Fakequant", str(saved))
    assert "TestOutputLog" not in open(output_files(str(saved))["fake_quant_model"]).read(), \
        "the saved model keeps the retraining's TestOutputLog"


def assert_integer_executor_equals_fake_quant(files: dict) -> list[dict]:
    """The saver's outputs ``files``: on every TEST batch the integer executor's accuracy and loss
    (a function of every logit) equal the fake-quant model's in Caffe; returns the executor's
    outputs per batch."""
    fake = caffe.Net(files["fake_quant_model"], caffe.TEST, weights=files["fake_quant_weights"])
    fake_out = [{k: v.copy() for k, v in fake.forward().items()} for _ in range(user_model.TEST_ITER)]
    del fake
    gc.collect()  # one net at a time on the copy's test LMDB
    executor = ReferenceExecutor(files["deploy_model"], files["deploy_weights"])
    integer_out = [executor.forward() for _ in range(user_model.TEST_ITER)]
    for i, (f, r) in enumerate(zip(fake_out, integer_out)):
        for name in ("accuracy", "loss"):
            assert np.array_equal(f[name], r[name]), f"batch {i}: {name} {f[name]} (fake-quant) vs {r[name]} (integer)"
    return integer_out


def test_cli_flow_deploy_model_in_the_integer_executor_equals_the_fake_quant_model(cli_run):
    files = output_files(cli_run["save_path"])
    integer_out = assert_integer_executor_equals_fake_quant(files)
    accuracy = np.mean([o["accuracy"] for o in integer_out])
    assert accuracy > 0.9, f"the retrained INT8 model scores {accuracy}"
    deploy_types = [layer.type for layer in model_io.read_prototxt(files["deploy_model"]).layer]
    assert {"LRN", "Concat", "Eltwise", "Dropout"} <= set(deploy_types) and "BatchNorm" not in deploy_types, \
        f"deploy layers {deploy_types}"


def test_cli_flow_exact_onnx_equals_the_fake_quant_model_on_every_test_image(cli_run):
    """Issue 9's "Done when": the exact ONNX export of the retrained deploy model (LMDB data layer,
    folded BatchNorm, Concat, LRN, Eltwise, AVE pooling) bit for bit the fake-quant model on all
    450 test images, in one batch of any size; each quantized layer exact on a million activations."""
    from amct_retrain.export import export_onnx
    from tests import onnx_checks

    files = output_files(cli_run["save_path"])
    onnx_file = cli_run["tmp"] / "user_exact.onnx"
    export_onnx(files["deploy_model"], files["deploy_weights"], onnx_file, mode="exact")
    fake = caffe.Net(files["fake_quant_model"], caffe.TEST, weights=files["fake_quant_weights"])
    images, logits, labels = [], [], []
    for _ in range(user_model.TEST_ITER):  # the LMDB's 450 test images, 50 a batch, in key order
        fake.forward()
        images.append(fake.blobs["data"].data.copy())
        logits.append(fake.blobs["ip2"].data.copy())
        labels.append(fake.blobs["label"].data.copy())
    del fake
    gc.collect()  # one net at a time on the copy's test LMDB
    images, logits, labels = np.concatenate(images), np.concatenate(logits), np.concatenate(labels)
    test_images, test_labels = user_model.test_set()
    assert np.array_equal(labels, test_labels) and np.allclose(images, test_images, atol=1e-6), \
        "the fake-quant model did not read the 450 test images in order"
    session = onnx_checks.session(onnx_file)
    assert [i.shape for i in session.get_inputs()] == [["batch", 1, user_model.CROP, user_model.CROP]], \
        f"graph inputs {[(i.name, i.shape) for i in session.get_inputs()]}: one, the data top, batch symbolic"
    for got in (session.run(["ip2"], {"data": images})[0],
                np.concatenate([session.run(["ip2"], {"data": images[i:i + 7]})[0] for i in range(0, len(images), 7)])):
        same = got.view(np.int32) == logits.view(np.int32)
        assert same.all(), (f"{int((~same.all(1)).sum())} of {len(images)} test images differ from the fake-quant "
                            f"model (largest |diff| {np.abs(got - logits).max():.6g})")
    compared = onnx_checks.assert_exact_on_random_activations(files["deploy_model"], files["deploy_weights"],
                                                              onnx_file)
    assert set(compared) == set(user_model.QUANTIZABLE), f"layers compared: {sorted(compared)}"


def test_rewritten_record_is_explained_and_regenerated(user, tmp_path):
    own = user.copy_to(tmp_path / "model")
    model, weights = make_quantization_aware(own.train_val, own.weights, tmp_path)
    solver_file = tmp_path / "solver.prototxt"
    amct_retrain.create_solver(solver_file, model, max_iter=20, test_iter=user_model.TEST_ITER, snapshot=10,
                               base_lr=0.01)
    amct_retrain.train(solver_file, weights)
    gc.collect()
    earlier = tmp_path / "retrained_iter_10.caffemodel"  # the record is of iteration 20's weights
    with pytest.raises(ModelError) as err:
        amct_retrain.save_quant_retrain_model(str(model), str(earlier), "Both", str(tmp_path / "r" / "m"))
    message = str(err.value)
    pairs = re.findall(r"layer '(\w+)' field (\w+)(?: channel (\d+))?: record (\S+), weights (\S+)", message)
    assert pairs, f"the message does not show what differs:\n{message}"
    assert all(recorded.rstrip(",") != computed for *_, recorded, computed in pairs), f"identical values: {pairs}"
    command = f"amct-retrain record --model {model} --weights {earlier}"
    assert command in message, f"the message does not give the command that regenerates the record:\n{message}"
    assert not (tmp_path / "r").exists(), "a refused save wrote files"
    run_cli(*command.split()[1:])
    amct_retrain.save_quant_retrain_model(str(model), str(earlier), "Both", str(tmp_path / "r" / "m"))
    assert os.path.isfile(output_files(str(tmp_path / "r" / "m"))["deploy_weights"]), "no deploy model after record"


# --------------------------------------------------------------------------- 10. public names


def test_public_names_at_the_top_level():
    from amct_retrain.export import onnx as onnx_export

    for name, function in (("create_solver", solver.create_solver), ("check_solver", solver.check_solver),
                           ("train", solver.train), ("export_onnx", onnx_export.export_onnx)):
        assert getattr(amct_retrain, name) is function, f"amct_retrain.{name} is not {function}"
        assert name in amct_retrain.__all__, f"{name} not in amct_retrain.__all__"
    lazy = subprocess.run([sys.executable, "-c", "import sys, amct_retrain; assert 'onnx' not in sys.modules, "
                           "'onnx imported with amct_retrain'; amct_retrain.export_onnx; assert 'onnx' in sys.modules"],
                          capture_output=True, text=True)
    assert lazy.returncode == 0, f"export_onnx is not imported lazily: {lazy.stderr[-1500:]}"


def test_user_model_retrained_at_w4a4_is_exact_in_the_integer_executor(user, tmp_path):
    """Low-bit retraining on what users' models have (LMDB + transform_param, BatchNorm left as
    train_val has it, LRN, Concat, Eltwise, AVE pooling): the 4-bit deploy model in the integer
    executor gives the fake-quant model's accuracy and loss on every TEST batch."""
    own = user.copy_to(tmp_path / "model")
    config, out, save_path = tmp_path / "config.json", tmp_path / "retrain", tmp_path / "result" / "model"
    assert run_cli("config", "--model", own.train_val, "--weights", own.weights, "--output", config).returncode == 0
    entries = json.loads(config.read_text())
    for entry in entries.values():
        for block in ("retrain_data_config", "retrain_weight_config"):
            if isinstance(entry, dict) and block in entry:
                entry[block]["num_bits"] = 4
    config.write_text(json.dumps(entries))
    for step in (("prepare", "--model", own.train_val, "--weights", own.weights, "--config", config,
                  "--output-dir", out, "--max-iter", 20, "--test-iter", user_model.TEST_ITER, "--base-lr", 0.001),
                 ("train", "--solver", out / "solver.prototxt", "--weights", out / "retrain.caffemodel"),
                 ("save", "--model", out / "retrain.prototxt", "--weights", out / "retrained_iter_20.caffemodel",
                  "--save-path", save_path)):
        done = run_cli(*step)
        assert done.returncode == 0, f"{step[0]} failed:\n{done.stderr[-2000:]}"
    files = output_files(str(save_path))
    widths = {name: (q.get("num_bits_d", 8), q.get("num_bits_w", 8))
              for name, q in json.loads(open(files["quant_info"]).read())["quantized_layers"].items()}
    # AVE Pooling (pool2) has no weights: only its input is 4-bit.
    assert widths and all(w == (4, 4) or (name == "pool2" and w[0] == 4) for name, w in widths.items()), \
        f"bit widths in the quant info file: {widths}"
    assert_integer_executor_equals_fake_quant(files)
