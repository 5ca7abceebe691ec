"""Quantization-aware retraining on the graph shapes of real published models, end to end.

For each net: the retrain config, the quantization-aware model (forward and backward in Caffe),
a few solver steps, the saved fake-quant and deploy models, and the two parity gates: the
fake-quant model reproduces the retrained model's TEST output per quantized layer up to its
int16 requantisation (within one output step), and the integer reference executor reproduces
the fake-quant model (within one output step).

The nets (tests/models.py): the BVLC deploy definitions of the Caffe source tree (AlexNet,
CaffeNet, GoogLeNet, R-CNN; Input layers, batch 2, reduced input size and fc6/fc7 width),
NetSpec-built ResNet-50-, MobileNet- and MLP-style nets with BatchNorm + Scale, and small nets
with an explicit Split, a Concat of quantized branches, phase rules with TRAIN/TEST HDF5 data
layers and a TRAIN-only auxiliary head, and the legacy ``input:`` fields (V2 and V1).
"""
import json
import pathlib
from collections.abc import Callable
from dataclasses import dataclass

import caffe
import numpy as np
import pytest
from caffe.proto import caffe_pb2
from google.protobuf import text_format

import amct_retrain
from amct_retrain import numerics, record
from amct_retrain import solver as amct_solver
from amct_retrain.graph import model_io
from amct_retrain.graph import quant_layers as ql
from amct_retrain.graph.model_io import ModelError
from amct_retrain.reference import ReferenceExecutor, parity_in_output_steps
from amct_retrain.saver import output_files
from amct_retrain.layer_specs import SHIFT_N_SEARCH
from tests import analysis_check, models
from tests.nets import CLIP_MAX, CLIP_MIN, CLIP_STATE, MASTER_WEIGHTS

pytestmark = pytest.mark.caffe

ITERS = 3
BASE_LR = 0.01


@dataclass(frozen=True)
class Case:
    build: Callable[[pathlib.Path], caffe_pb2.NetParameter | str]  # a NetParameter, or prototxt text
    fused: bool = False           # Conv + BatchNorm + Scale: folded before retraining, none left
    kept_batchnorm: bool = False  # FC + BatchNorm + Scale: kept, frozen (retraining folds convolutions only)
    train_only: tuple[str, ...] = ()  # quantizable layers the phase rules keep out of TEST: left in float
    shared: tuple[tuple[str, ...], ...] = ()  # layers reading one blob: one activation quantizer each group


def _phase_rules(tmp: pathlib.Path) -> caffe_pb2.NetParameter:
    train = models.write_hdf5_source(tmp, "train", 24, seed=0)
    test = models.write_hdf5_source(tmp, "test", 24, seed=1)
    return models.phase_rules_net(str(train), str(test))


CASES = {
    "alexnet": Case(lambda tmp: models.published_net("alexnet")),
    "caffenet": Case(lambda tmp: models.published_net("caffenet")),
    "rcnn": Case(lambda tmp: models.published_net("rcnn")),
    "googlenet": Case(lambda tmp: models.published_net("googlenet"),
                      shared=(("inception_3a/1x1", "inception_3a/3x3_reduce", "inception_3a/5x5_reduce"),
                              ("inception_5b/1x1", "inception_5b/3x3_reduce", "inception_5b/5x5_reduce"))),
    "resnet50_style": Case(lambda tmp: models.resnet_net(), fused=True,
                           shared=(("res2a_branch1", "res2a_branch2a"), ("res3a_branch1", "res3a_branch2a"))),
    "mobilenet_style": Case(lambda tmp: models.mobilenet_net(), fused=True),
    "mlp": Case(lambda tmp: models.mlp_net(), kept_batchnorm=True),
    "explicit_split": Case(lambda tmp: models.split_net()),
    "concat_branches": Case(lambda tmp: models.concat_net(), shared=(("branch_1x1", "branch_3x3"),)),
    "phase_rules_hdf5": Case(_phase_rules, train_only=("conv_aux", "fc_aux")),
    "legacy_input_fields": Case(lambda tmp: models.legacy_input_net()),
    "legacy_v1_input_dim": Case(lambda tmp: models.legacy_v1_text()),
}


def _random_inputs(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(0, 1, shape).astype(np.float32) for name, shape in shapes.items()}


def _clips(net: caffe.Net) -> dict[str, tuple[float, float]]:
    return {name: (float(net.params[name][0].data[0]), float(net.params[name][1].data[0]))
            for name in net._layer_names if name.endswith("_ulq")}


@pytest.fixture(scope="module", params=list(CASES))
def qat(request, tmp_path_factory):
    """One net through the whole flow: float weights from Caffe's fillers, config, modified
    model, IFMR on a first batch, ITERS solver steps, the final TEST (record), save 'Both'."""
    name, case = request.param, CASES[request.param]
    tmp = tmp_path_factory.mktemp(name)
    built = case.build(tmp)
    model = tmp / "float.prototxt"
    model.write_text(built if isinstance(built, str) else text_format.MessageToString(built))
    float_net = model_io.read_prototxt(model)  # V1 upgraded, as the toolkit reads it
    shapes = models.input_shapes(float_net)
    train_inputs, test_inputs = _random_inputs(shapes, 1), _random_inputs(shapes, 2)
    weights = tmp / "float.caffemodel"
    models.float_weights(model, weights, train_inputs)
    p = {"model": model, "weights": weights, "config": tmp / "config.json", "modified": tmp / "retrain.prototxt",
         "modified_weights": tmp / "retrain.caffemodel", "record": tmp / "record.txt",
         "solver": tmp / "solver.prototxt"}
    amct_retrain.create_quant_retrain_config(str(p["config"]), str(model), str(weights))
    amct_retrain.create_quant_retrain_model(str(model), str(weights), str(p["config"]), str(p["modified"]),
                                            str(p["modified_weights"]), str(p["record"]))
    amct_solver.create_solver(p["solver"], p["modified"], max_iter=ITERS, test_iter=1, base_lr=BASE_LR,
                              snapshot_prefix=tmp / "retrained", random_seed=1)
    amct_solver.check_solver(p["solver"], p["config"])
    solver = caffe.get_solver(str(p["solver"]))
    solver.net.copy_from(str(p["modified_weights"]))
    models.set_inputs(solver.net, train_inputs)
    models.set_inputs(solver.test_nets[0], test_inputs)
    solver.net.forward()  # IFMR initialises every quantizer's clips on this first batch
    clips_before = _clips(solver.net)
    largest_update = dict.fromkeys(clips_before, 0.0)
    for _ in range(ITERS):
        solver.step(1)  # after a step, a learnable blob's diff holds the update the solver applied
        for ulq in largest_update:
            step = max(abs(float(solver.net.params[ulq][i].diff[0])) for i in (0, 1))
            largest_update[ulq] = max(largest_update[ulq], step)
    solver.solve()  # nothing left to step: the snapshot exists; the final TEST writes the record
    clips_after = _clips(solver.net)
    p["snapshot"] = tmp / f"retrained_iter_{ITERS}.caffemodel"
    save_path = str(tmp / "result" / "model")
    amct_retrain.save_quant_retrain_model(str(p["modified"]), str(p["snapshot"]), "Both", save_path, str(p["record"]))
    return {"name": name, "case": case, "tmp": tmp, "float_net": float_net, "test_inputs": test_inputs,
            "train_inputs": train_inputs, "clips_before": clips_before, "clips_after": clips_after,
            "largest_update": largest_update, **p, **output_files(save_path)}


def _net(path) -> caffe_pb2.NetParameter:
    return text_format.Parse(pathlib.Path(path).read_text(), caffe_pb2.NetParameter())


def _quant_info(qat) -> dict:
    return json.loads(pathlib.Path(qat["quant_info"]).read_text())["quantized_layers"]


def _saved_layers(qat) -> list[str]:
    """The quantizable layers the saved models quantize: all but the TRAIN-only ones."""
    return [n for n in models.quantizable_layer_names(qat["float_net"]) if n not in qat["case"].train_only]


def test_config_lists_exactly_the_quantizable_layers(qat):
    config = json.loads(qat["config"].read_text())
    listed = [key for key in config if key not in ("version", "batch_num")]
    expected = models.quantizable_layer_names(qat["float_net"])
    assert listed == expected, \
        f"{qat['name']}: config lists {listed}, the Convolution/InnerProduct layers are {expected}"
    assert all(config[n]["retrain_enable"] for n in listed), f"{qat['name']}: a layer is not enabled: {config}"


def test_modified_model_runs_forward_and_backward_in_caffe(qat):
    net = caffe.Net(str(qat["modified"]), caffe.TRAIN, weights=str(qat["modified_weights"]))
    models.set_inputs(net, qat["train_inputs"])
    outputs = net.forward()
    assert all(np.all(np.isfinite(v)) for v in outputs.values()), f"{qat['name']}: non-finite outputs {outputs}"
    net.backward()
    no_gradient = [n for n in models.quantizable_layer_names(qat["float_net"])
                   if not net.params[ql.arq_layer_name(n)][MASTER_WEIGHTS].diff.any()]
    assert not no_gradient, f"{qat['name']}: no gradient reached the master weights of {no_gradient}"
    ulqs = [n for n in net._layer_names if n.endswith("_ulq")]
    no_clip_gradient = [u for u in ulqs if not (net.params[u][CLIP_MAX].diff.any() or net.params[u][CLIP_MIN].diff.any())]
    assert ulqs and not no_clip_gradient, f"{qat['name']}: no gradient reached the clips of {no_clip_gradient}"
    not_ready = [u for u in ulqs if net.params[u][CLIP_STATE].data[0] != 1]
    assert not not_ready, f"{qat['name']}: IFMR did not initialise the clips of {not_ready}"


def test_solver_steps_move_the_clips(qat):
    before, after, update = qat["clips_before"], qat["clips_after"], qat["largest_update"]
    assert before, f"{qat['name']}: the modified model has no activation quantizer"
    not_updated = [u for u in before if update[u] == 0]
    assert not not_updated, f"{qat['name']}: the solver applied no update to the clips of {not_updated}"
    # An update below the float32 resolution of a clip cannot move it (AlexNet's conv1: the gradient
    # that reaches the input of the net, through 7 layers of the published N(0, 0.01) weights, is ~1e-8).
    resolvable = [u for u in before if update[u] > max(np.spacing(np.float32(abs(c))) for c in before[u])]
    unmoved = [u for u in resolvable if after[u] == before[u]]
    assert resolvable and not unmoved, \
        f"{qat['name']}: clips unmoved after {ITERS} steps: {unmoved} (before {before}, after {after})"


def _redirected_record(qat) -> pathlib.Path:
    """The retrained model with its ShiftNSearch layers writing to a scratch record, so that
    running it here leaves the record of the solver's final TEST as it is."""
    net = _net(qat["modified"])
    for layer in net.layer:
        if SHIFT_N_SEARCH.is_layer(layer):
            params = ql.layer_params(layer)
            params["record_file"] = str(qat["tmp"] / "scratch_record.txt")
            layer.python_param.param_str = json.dumps(params, sort_keys=True)
    path = qat["tmp"] / "retrain_scratch_record.prototxt"
    path.write_text(text_format.MessageToString(net))
    return path


def test_fake_quant_model_reproduces_the_retrained_model_within_one_output_step(qat):
    """Per quantized layer, on the same input (the retrained TEST net's, read where the layer's
    ActivationULQ reads it: Caffe renames shared blobs to split blobs), where int16 does not
    saturate: the saved model adds only the integer requantisation."""
    records = record.read_record(qat["record"])
    trained = caffe.Net(str(_redirected_record(qat)), caffe.TEST, weights=str(qat["snapshot"]))
    fake = caffe.Net(qat["fake_quant_model"], caffe.TEST, weights=qat["fake_quant_weights"])
    models.set_inputs(trained, qat["test_inputs"])
    models.set_inputs(fake, qat["test_inputs"])
    names = list(trained._layer_names)
    ulq_of = {ql.layer_params(layer)["quantized_layer"]: ql.layer_params(layer)["activation_quantizer"]
              for layer in _net(qat["modified"]).layer if SHIFT_N_SEARCH.is_layer(layer)}
    info = _quant_info(qat)
    worst, saturated, start = {}, {}, None
    for name in sorted(info, key=lambda n: names.index(ql.shift_n_layer_name(n))):
        end = ql.shift_n_layer_name(name)
        trained.forward(start=start, end=end)
        start = names[names.index(end) + 1] if names.index(end) + 1 < len(names) else None
        x = trained.blobs[trained.bottom_names[ulq_of[name]][0]].data
        y = trained.blobs[trained.top_names[name][0]].data.astype(np.float64)
        fake.blobs[fake.bottom_names[info[name]["fake_quant"]][0]].data[...] = x
        fake.forward(start=info[name]["fake_quant"], end=info[name]["requantize"])
        rec = records[name]
        deq = np.broadcast_to(np.float32(rec.scale_d) * np.asarray(rec.scale_w, np.float32), (y.shape[1],))
        shape = (1, -1) + (1,) * (y.ndim - 2)
        step = (deq.astype(np.float64) * np.ldexp(1.0, np.asarray(rec.shift_bit, np.int64))).reshape(shape)
        acc = numerics.accumulator_from_output(fake.blobs[info[name]["output_blob"]].data, deq)
        unsaturated = np.abs(acc * deq.reshape(shape) / step) < 32767
        diff = np.abs(fake.blobs[info[name]["output_blob"]].data.astype(np.float64) - y) / step
        worst[name] = float(diff[unsaturated].max()) if unsaturated.any() else 0.0
        saturated[name] = float(1 - unsaturated.mean())
    print(f"\n{qat['name']}: fake-quant vs retrained, largest difference in output steps: {worst}; "
          f"share saturated: { {k: v for k, v in saturated.items() if v} }")
    assert set(worst) == set(_saved_layers(qat)), f"{qat['name']}: compared {sorted(worst)}"
    assert max(worst.values()) <= 1.0, f"{qat['name']}: largest difference in output steps per layer: {worst}"


def test_reference_executor_matches_the_fake_quant_model(qat):
    fake = caffe.Net(qat["fake_quant_model"], caffe.TEST, weights=qat["fake_quant_weights"])
    models.set_inputs(fake, qat["test_inputs"])
    fake.forward()
    reference = ReferenceExecutor(qat["deploy_model"], qat["deploy_weights"])
    models.set_inputs(reference.net, qat["test_inputs"])
    worst = parity_in_output_steps(fake, reference.net, _quant_info(qat), record.read_record(qat["record"]))
    print(f"\n{qat['name']}: integer executor vs fake-quant, largest difference in output steps: {worst}")
    assert set(worst) == set(_saved_layers(qat)), f"{qat['name']}: compared {sorted(worst)}"
    assert max(worst.values()) <= 1.0, f"{qat['name']}: integer executor vs fake-quant, output steps: {worst}"
    outputs = reference.net.forward()
    assert all(np.all(np.isfinite(v)) for v in outputs.values()), f"{qat['name']}: the integer executor {outputs}"


def test_deploy_model_wraps_each_quantized_layer_and_keeps_no_fused_batchnorm(qat):
    layers = list(_net(qat["deploy_model"]).layer)
    names = [layer.name for layer in layers]
    assert not any(layer.type == "Python" for layer in layers), f"{qat['name']}: Python layers in the deploy model"
    for name in _saved_layers(qat):
        i = names.index(name)
        quant, dequant = layers[i - 1], layers[i + 1]
        assert quant.type == "Quant" and quant.top[0] == layers[i].bottom[0], f"{qat['name']}: no Quant before {name}"
        assert dequant.type == "DeQuant" and dequant.bottom[0] == layers[i].top[0], \
            f"{qat['name']}: no DeQuant after {name}"
    assert set(_quant_info(qat)) == set(_saved_layers(qat)), f"{qat['name']}: quant info {sorted(_quant_info(qat))}"
    records = record.read_record(qat["record"])
    incomplete = [n for n in _saved_layers(qat) if not record.layer_record_complete(records[n])]
    assert not incomplete, f"{qat['name']}: incomplete records {incomplete}"
    float_types = [layer.type for layer in qat["float_net"].layer]
    for key in ("modified", "fake_quant_model", "deploy_model"):
        net = _net(qat[key])
        types = [layer.type for layer in net.layer]
        if qat["case"].fused:
            assert "BatchNorm" in float_types and "Scale" in float_types, f"{qat['name']}: the float net has no BN"
            assert "BatchNorm" not in types and "Scale" not in types, \
                f"{qat['name']}: BatchNorm/Scale left in {key} after Conv+BN+Scale fusion: {types}"
        if qat["case"].kept_batchnorm:
            bns = [layer for layer in net.layer if layer.type == "BatchNorm"]
            assert len(bns) == float_types.count("BatchNorm") and types.count("Scale") == float_types.count("Scale"), \
                f"{qat['name']}: FC+BN+Scale is not folded by retraining, its BatchNorm/Scale must stay in {key}"
            assert all(bn.batch_norm_param.use_global_stats for bn in bns), \
                f"{qat['name']}: BatchNorm not frozen (use_global_stats) in {key}"


def test_deploy_model_keeps_the_inputs_and_holds_int8_weights(qat):
    """The deploy model is fed as the float net is (Input layer or legacy ``input:`` fields);
    its quantized layers hold int8 weights."""
    deploy, float_net = _net(qat["deploy_model"]), qat["float_net"]
    assert list(deploy.input) == list(float_net.input), f"{qat['name']}: legacy input fields {list(deploy.input)}"
    assert models.input_shapes(deploy) == models.input_shapes(float_net), \
        f"{qat['name']}: inputs {models.input_shapes(deploy)} != {models.input_shapes(float_net)}"
    blobs = {layer.name: list(layer.blobs) for layer in
             caffe_pb2.NetParameter.FromString(pathlib.Path(qat["deploy_weights"]).read_bytes()).layer}
    for name in _saved_layers(qat):
        assert blobs[name][0].int8_data, f"{qat['name']}: layer {name} has no int8 weights in the deploy model"


@pytest.mark.parametrize("qat", ["phase_rules_hdf5"], indirect=True)
def test_train_only_layers_in_phase_rules_net(qat):
    """The TRAIN-only auxiliary head is retrained but never runs in TEST: the saved models keep it
    in float with its float weights; the TEST HDF5 layer (batch 12, the TRAIN one has 6) feeds them."""
    names = [layer.name for layer in _net(qat["deploy_model"]).layer]
    deploy_blobs = {layer.name: list(layer.blobs) for layer in
                    caffe_pb2.NetParameter.FromString(pathlib.Path(qat["deploy_weights"]).read_bytes()).layer}
    snapshot = model_io.read_caffemodel(qat["snapshot"])
    fake_weights = model_io.read_caffemodel(qat["fake_quant_weights"])
    for name in qat["case"].train_only:
        assert name in names and f"{name}_quant_layer" not in names, f"{qat['name']}: {name} must stay, in float"
        assert not deploy_blobs[name][0].int8_data, f"{qat['name']}: {name} has int8 weights in the deploy model"
        assert np.array_equal(fake_weights[name][0], snapshot[ql.arq_layer_name(name)][MASTER_WEIGHTS]), \
            f"{qat['name']}: {name} must keep its retrained float (master) weights"
    fake = caffe.Net(qat["fake_quant_model"], caffe.TEST, weights=qat["fake_quant_weights"])
    out = fake.forward()
    assert fake.blobs["data"].data.shape[0] == 12, f"{qat['name']}: TEST batch {fake.blobs['data'].data.shape}"
    assert 0 <= float(out["accuracy"]) <= 1 and np.isfinite(out["loss"]), f"{qat['name']}: TEST outputs {out}"


@pytest.mark.parametrize("qat", ["mobilenet_style"], indirect=True)
def test_global_conv_trains_and_deploys_on_one_unified_weight_scale(qat):
    """MobileNet's classifier, a 1x1 Convolution on the 1x1 pooled map: all channels use the
    largest deq (contract section 3), in the record and in the retrained net's weights."""
    rec = record.read_record(qat["record"])["fc7"]
    assert len(rec.scale_w) == 10 and len(set(rec.scale_w)) == 1, f"fc7: scale_w not unified: {list(rec.scale_w)}"
    trained = caffe.Net(str(_redirected_record(qat)), caffe.TEST, weights=str(qat["snapshot"]))
    trained.forward()
    master, weights = trained.params["fc7_arq"][MASTER_WEIGHTS].data, trained.params["fc7"][0].data
    expected = numerics.arq_fake_quantize(master, np.asarray(rec.scale_w, np.float32), 0)
    assert np.array_equal(weights, expected), "fc7: the retrained net's weights are not on the unified int8 grid"


@pytest.mark.parametrize("qat", [name for name, case in CASES.items() if case.shared], indirect=True)
def test_layers_reading_one_blob_share_one_activation_quantizer(qat):
    """Inception branches, ResNet projection + main branch, concatenated branches: one quantizer
    (one scale_d / offset_d) per blob they read."""
    owners = {ql.layer_params(layer)["quantized_layer"]: ql.layer_params(layer)["activation_quantizer"]
              for layer in _net(qat["modified"]).layer if SHIFT_N_SEARCH.is_layer(layer)}
    records = record.read_record(qat["record"])
    for group in qat["case"].shared:
        assert len({owners[n] for n in group}) == 1, \
            f"{qat['name']}: {group} have quantizers {[owners[n] for n in group]}"
        assert len({(records[n].scale_d, records[n].offset_d) for n in group}) == 1, \
            f"{qat['name']}: {group} record different scale_d/offset_d"


def test_a_test_only_quantized_layer_is_an_error_naming_it_at_save(tmp_path):
    """Caffe snapshots the TRAIN net only: a quantized layer that never runs in TRAIN has no
    retrained weights, and the saver says why instead of blaming the weights file."""
    model = tmp_path / "float.prototxt"
    model.write_text(text_format.MessageToString(models.test_only_net()))
    weights = tmp_path / "float.caffemodel"
    caffe.Net(str(model), caffe.TEST).save(str(weights))  # the TEST net holds every layer's weights
    files = [str(tmp_path / n) for n in ("config.json", "retrain.prototxt", "retrain.caffemodel", "record.txt")]
    amct_retrain.create_quant_retrain_config(files[0], str(model), str(weights))
    amct_retrain.create_quant_retrain_model(str(model), str(weights), *files)
    amct_solver.create_solver(tmp_path / "solver.prototxt", files[1], max_iter=1, test_iter=1,
                              snapshot_prefix=tmp_path / "retrained")
    solver = caffe.get_solver(str(tmp_path / "solver.prototxt"))
    solver.net.copy_from(files[2])
    solver.solve()
    assert "conv_test" in record.read_record(files[3]), "the TEST pass did not record the TEST-only layer"
    with pytest.raises(ModelError, match="'conv_test' never runs in the TRAIN phase") as err:
        amct_retrain.save_quant_retrain_model(files[1], str(tmp_path / "retrained_iter_1.caffemodel"), "Both",
                                              str(tmp_path / "result" / "model"), files[3])
    assert "skip_layers" in str(err.value), f"the error does not say what to do: {err.value}"


def test_analysis_equals_an_independent_numpy_computation(qat, tmp_path):
    """analyze() on the float and the saved fake-quant model: per layer, the cosine, SQNR, output
    steps and clipped shares that plain numpy computes from both models' blobs on the same
    batches (Input nets fed, data layers read once; DummyData replayed from one seed)."""
    batches = [qat["test_inputs"]] if qat["test_inputs"] else [None, None]
    files = [str(qat[k]) for k in ("model", "weights", "fake_quant_model", "fake_quant_weights")]
    caffe.set_random_seed(0)
    analysis = amct_retrain.analyze(*files, len(batches), str(tmp_path / "analysis"),
                                    inputs=batches if qat["test_inputs"] else None)
    caffe.set_random_seed(0)
    kept = analysis_check.layer_blobs(*files, qat["quant_info"], batches)
    analysis_check.assert_analysis_matches(analysis, analysis_check.expected_metrics(kept, qat["fake_quant_model"]),
                                           qat["name"])
    assert (tmp_path / "analysis" / "report.html").stat().st_size > 0
