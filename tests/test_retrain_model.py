"""create_quant_retrain_model on real Caffe nets: structure, weights, and bad input."""
import hashlib
import json

import caffe
import numpy as np
import pytest
from caffe.proto import caffe_pb2
from google.protobuf import text_format

import amct_retrain
from amct_retrain import numerics, record
from amct_retrain.graph.model_io import ModelError
from amct_retrain.reference import ReferenceExecutor, parity_in_output_steps
from tests import nets
from tests.nets import CLIP_STATE, MASTER_WEIGHTS, QUANTIZED, float_model

pytestmark = pytest.mark.caffe

def digest(*paths):
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


@pytest.fixture
def prepared(tmp_path):
    model, weights = float_model(tmp_path)
    config = tmp_path / "config.json"
    amct_retrain.create_quant_retrain_config(str(config), str(model), str(weights))
    out = tmp_path / "out"  # does not exist yet: must be created
    paths = dict(model=model, weights=weights, config=config, modified_model=out / "retrain.prototxt",
                 modified_weights=out / "retrain.caffemodel", record=out / "record.txt")
    return paths


def create(p):
    amct_retrain.create_quant_retrain_model(str(p["model"]), str(p["weights"]), str(p["config"]),
                                            str(p["modified_model"]), str(p["modified_weights"]), str(p["record"]))


def test_modified_model_wraps_each_layer_and_trains_in_caffe(prepared):
    p = prepared
    before = digest(p["model"], p["weights"], p["config"])
    create(p)
    assert digest(p["model"], p["weights"], p["config"]) == before, "an input file was modified"
    net_param = text_format.Parse(p["modified_model"].read_text(), caffe_pb2.NetParameter())
    names = [layer.name for layer in net_param.layer]
    for layer in QUANTIZED:
        i = names.index(layer)
        assert names[i - 2:i + 2] == [f"{layer}_ulq", f"{layer}_arq", layer, f"{layer}_shift_n"], \
            f"{layer} is not wrapped by ULQ, ARQ and shift-N: {names}"
    assert p["record"].exists() and p["record"].read_text() == "", "the record file must start empty"
    arq = net_param.layer[names.index("conv1_arq")]
    assert (arq.param[MASTER_WEIGHTS].lr_mult, arq.param[MASTER_WEIGHTS].decay_mult) == (2, 0.5), "conv1's lr/decay must move to its master weights"

    floats = caffe.Net(str(p["model"]), caffe.TEST, weights=str(p["weights"]))
    net = caffe.Net(str(p["modified_model"]), caffe.TRAIN, weights=str(p["modified_weights"]))
    for layer in QUANTIZED:
        w = floats.params[layer][0].data
        assert np.array_equal(net.params[f"{layer}_arq"][MASTER_WEIGHTS].data, w), f"{layer}: master weights != float weights"
        axis = None if layer == "fc" else 0
        expected = numerics.arq_fake_quantize(w, numerics.arq_scale(w, axis), axis)
        assert np.array_equal(net.params[layer][0].data, expected), f"{layer}: weights are not ARQ(float)"
        if len(floats.params[layer]) > 1:
            assert np.array_equal(net.params[layer][1].data, floats.params[layer][1].data), f"{layer}: bias changed"
        assert net.params[f"{layer}_ulq"][CLIP_STATE].data[0] == 0, f"{layer}: no clips configured, IFMR must run"
    net.forward()
    net.backward()
    assert net.params["conv1_arq"][MASTER_WEIGHTS].diff.any(), "no gradient reached conv1's master weights"
    assert all(net.params[f"{layer}_ulq"][CLIP_STATE].data[0] == 1 for layer in QUANTIZED), "IFMR did not initialise clips"


def test_weights_of_another_model_are_an_error_naming_layer_and_shapes(prepared, tmp_path):
    p = prepared
    _, other_weights = float_model(tmp_path, fc=5, tag="other")
    p["weights"] = other_weights
    with pytest.raises(ModelError) as err:
        create(p)
    msg = str(err.value)
    assert "'fc'" in msg and "(5, 32)" in msg and "(10, 32)" in msg, f"unclear shape error: {msg}"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "partial output left behind"


def test_weights_missing_a_layer_is_an_error_naming_it(prepared, tmp_path):
    p = prepared
    weights = caffe_pb2.NetParameter.FromString(p["weights"].read_bytes())
    kept = [layer for layer in weights.layer if layer.name != "conv2"]
    del weights.layer[:]
    weights.layer.extend(kept)
    p["weights"] = tmp_path / "missing.caffemodel"
    p["weights"].write_bytes(weights.SerializeToString())
    with pytest.raises(ModelError, match="no weights for layer 'conv2'"):
        create(p)


def test_net_caffe_cannot_build_is_an_error_not_a_crash(prepared, tmp_path):
    p = prepared
    broken = tmp_path / "broken.prototxt"
    broken.write_text(p["model"].read_text().replace('bottom: "pool"', 'bottom: "nowhere"'))
    p["model"] = broken
    with pytest.raises(ModelError, match="nowhere"):
        create(p)
    assert not p["modified_model"].exists() and not p["record"].exists(), "partial output left behind"


def test_output_that_is_an_input_is_refused(prepared):
    p = prepared
    p["modified_weights"] = p["weights"]
    before = digest(p["weights"])
    with pytest.raises(ValueError, match="inputs are never overwritten"):
        create(p)
    assert digest(p["weights"]) == before


BRANCHED_NET = """name: "branched"
layer { name: "data" type: "DummyData" top: "data" top: "target"
  dummy_data_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } shape { dim: 4 dim: 5 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "branch_a" type: "Convolution" bottom: "data" top: "a"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "branch_b" type: "Convolution" bottom: "data" top: "b"
  convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "xavier" } } }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" }
layer { name: "relu" type: "ReLU" bottom: "sum" top: "sum" }
layer { name: "fc" type: "InnerProduct" bottom: "sum" top: "fc"
  inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "fc" bottom: "target" top: "loss" }
"""


def test_layers_reading_one_blob_share_one_activation_quantizer(tmp_path):
    model = tmp_path / "branched.prototxt"
    model.write_text(BRANCHED_NET)
    weights = tmp_path / "branched.caffemodel"
    caffe.Net(str(model), caffe.TEST).save(str(weights))
    config, modified, modified_weights, record_file = (tmp_path / n for n in
                                                       ("c.json", "m.prototxt", "m.caffemodel", "r.txt"))
    amct_retrain.create_quant_retrain_config(str(config), str(model), str(weights))
    amct_retrain.create_quant_retrain_model(str(model), str(weights), str(config), str(modified),
                                            str(modified_weights), str(record_file))
    layers = text_format.Parse(modified.read_text(), caffe_pb2.NetParameter()).layer
    ulqs = [layer for layer in layers if layer.python_param.layer == "ActivationULQ"]
    assert [layer.bottom[0] for layer in ulqs] == ["data", "sum"], \
        f"expected one quantizer on 'data' shared by both branches, got {[(q.name, q.bottom[0]) for q in ulqs]}"
    by_name = {layer.name: layer for layer in layers}
    assert by_name["branch_a"].bottom[0] == by_name["branch_b"].bottom[0] == ulqs[0].top[0], "branches not shared"
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(nets.solver_text(modified, tmp_path / "snap", max_iter=4))
    solver = caffe.get_solver(str(solver_file))
    solver.net.copy_from(str(modified_weights))
    solver.solve()
    records = record.read_record(record_file)
    assert records["branch_a"].scale_d == records["branch_b"].scale_d and \
        records["branch_a"].offset_d == records["branch_b"].offset_d, "sharers must share scale_d/offset_d"
    save_path = str(tmp_path / "result" / "branched")
    amct_retrain.save_quant_retrain_model(str(modified), str(tmp_path / "snap_iter_4.caffemodel"), "Both",
                                          save_path, str(record_file))
    fake = caffe.Net(f"{save_path}_fake_quant_model.prototxt", caffe.TEST,
                     weights=f"{save_path}_fake_quant_weights.caffemodel")
    assert np.isfinite(fake.forward()["loss"]), "the saved fake-quant model of the branched net does not run"
    reference = ReferenceExecutor(f"{save_path}_deploy_model.prototxt", f"{save_path}_deploy_weights.caffemodel")
    info = json.loads(open(f"{save_path}_quant.json").read())["quantized_layers"]
    worst = parity_in_output_steps(fake, reference.net, info, record.read_record(record_file))
    assert max(worst.values()) <= 1.0, f"integer executor vs fake-quant, output steps per layer: {worst}"


BN_NET = """name: "bn"
layer { name: "data" type: "DummyData" top: "data" top: "target"
  dummy_data_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } shape { dim: 2 dim: 4 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 5 kernel_size: 3 bias_term: false weight_filler { type: "xavier" } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc" inner_product_param { num_output: 4 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "fc" bottom: "target" top: "loss" }
"""


def _bn_model(tmp_path):
    model = tmp_path / "bn.prototxt"
    model.write_text(BN_NET)
    net = caffe.Net(str(model), caffe.TEST)
    rng = np.random.default_rng(3)
    net.params["bn1"][0].data[...] = rng.normal(0, 1, 5)
    net.params["bn1"][1].data[...] = rng.uniform(0.5, 2, 5)
    net.params["bn1"][2].data[...] = 1.0
    net.params["scale1"][0].data[...] = rng.uniform(0.5, 1.5, 5)
    net.params["scale1"][1].data[...] = rng.normal(0, 0.1, 5)
    weights = tmp_path / "bn.caffemodel"
    net.save(str(weights))
    config = tmp_path / "c.json"
    amct_retrain.create_quant_retrain_config(str(config), str(model), str(weights))
    return net, model, weights, config


def test_conv_batchnorm_scale_is_folded_before_retraining(tmp_path):
    floats, model, weights, config = _bn_model(tmp_path)
    out = {n: tmp_path / n for n in ("m.prototxt", "m.caffemodel", "r.txt")}
    amct_retrain.create_quant_retrain_model(str(model), str(weights), str(config), *(str(p) for p in out.values()))
    types = [layer.type for layer in text_format.Parse(out["m.prototxt"].read_text(), caffe_pb2.NetParameter()).layer]
    assert "BatchNorm" not in types and "Scale" not in types, f"BatchNorm/Scale left in the retrain model: {types}"
    net = caffe.Net(str(out["m.prototxt"]), caffe.TEST, weights=str(out["m.caffemodel"]))
    gamma = floats.params["scale1"][0].data / np.sqrt(floats.params["bn1"][1].data + 1e-5)
    expected_w = floats.params["conv1"][0].data * gamma[:, None, None, None]
    expected_b = floats.params["scale1"][1].data - floats.params["bn1"][0].data * gamma
    assert np.allclose(net.params["conv1_arq"][MASTER_WEIGHTS].data, expected_w, rtol=1e-6), "folded weights are not w*gamma/sigma"
    assert np.allclose(net.params["conv1"][1].data, expected_b, rtol=1e-5, atol=1e-6), "folded bias is wrong"


def test_skip_fusion_in_an_existing_record_keeps_the_batchnorm(tmp_path):
    _, model, weights, config = _bn_model(tmp_path)
    record_file = tmp_path / "r.txt"
    record.write_record(record_file, {"conv1": record.SingleLayerRecord(skip_fusion=True)})
    amct_retrain.create_quant_retrain_model(str(model), str(weights), str(config), str(tmp_path / "m.prototxt"),
                                            str(tmp_path / "m.caffemodel"), str(record_file))
    layers = text_format.Parse((tmp_path / "m.prototxt").read_text(), caffe_pb2.NetParameter()).layer
    bn = [layer for layer in layers if layer.type == "BatchNorm"]
    assert len(bn) == 1 and bn[0].batch_norm_param.use_global_stats, "skip_fusion BatchNorm must stay, frozen"
    assert record.read_record(record_file)["conv1"].skip_fusion, "the skip_fusion entry was lost"
    caffe.Net(str(tmp_path / "m.prototxt"), caffe.TRAIN, weights=str(tmp_path / "m.caffemodel")).forward()


def test_quant_info_reports_the_batchnorm_folded_before_retraining(tmp_path):
    _, model, weights, config = _bn_model(tmp_path)
    files = [str(tmp_path / n) for n in ("m.prototxt", "m.caffemodel", "r.txt")]
    amct_retrain.create_quant_retrain_model(str(model), str(weights), str(config), *files)
    tested = caffe.Net(files[0], caffe.TEST, weights=files[1])
    tested.forward()  # one TEST pass: IFMR clips and the record, as after training
    tested.save(str(tmp_path / "tested.caffemodel"))
    save_path = str(tmp_path / "result" / "bn")
    amct_retrain.save_quant_retrain_model(files[0], str(tmp_path / "tested.caffemodel"), "Both", save_path, files[2])
    info = json.loads(open(f"{save_path}_quant.json").read())
    assert info["fused_layers"] == {"conv1": {"kind": "conv_bn", "removed": ["bn1", "scale1"]}}, \
        f"quant info fused_layers: {info['fused_layers']}"
