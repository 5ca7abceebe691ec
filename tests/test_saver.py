"""save_quant_retrain_model after real Caffe retraining: fake-quant and deploy models."""
import json
import os
import pathlib
import struct

import caffe
import numpy as np
import pytest
from google.protobuf import text_format

import amct_retrain
from amct_retrain import numerics, record
from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.graph.model_io import ModelError, read_caffemodel
from amct_retrain.saver import output_files
from tests import nets

pytestmark = pytest.mark.caffe


def _layers(prototxt):
    return {layer.name: layer for layer in text_format.Parse(open(prototxt).read(), caffe_pb2.NetParameter()).layer}


def test_every_quantized_layer_is_complete_in_the_record(retrained):
    records = record.read_record(retrained["record"])
    assert set(records) == set(nets.QUANTIZED), f"record layers {sorted(records)}"
    assert all(record.layer_record_complete(r) for r in records.values()), records


def test_deploy_weights_and_bias_follow_the_fake_quant_model(retrained):
    records = record.read_record(retrained["record"])
    deploy = caffe_pb2.NetParameter.FromString(open(retrained["deploy_weights"], "rb").read())
    deploy_blobs = {layer.name: list(layer.blobs) for layer in deploy.layer}
    fake = read_caffemodel(retrained["fake_quant_weights"])
    trained = read_caffemodel(retrained["snapshot"])
    for name in nets.QUANTIZED:
        rec, axis = records[name], (None if name == "fc" else 0)
        w8_blob = deploy_blobs[name][0]
        w8 = np.frombuffer(w8_blob.int8_data, np.int8).reshape(tuple(w8_blob.shape.dim))
        scale_w = np.asarray(rec.scale_w, np.float32)
        shape = (-1,) + (1,) * (w8.ndim - 1) if axis == 0 else ()
        assert np.array_equal(w8.astype(np.float32) * scale_w.reshape(shape), fake[name][0]), \
            f"{name}: deploy int8 weights x scale_w != fake-quant weights"
        if len(trained[name]) > 1:
            b32 = np.array(deploy_blobs[name][1].int32_data, np.int64)
            expected = np.rint(trained[name][1].astype(np.float64) /
                               (np.float64(np.float32(rec.scale_d)) * scale_w.astype(np.float64)))
            assert np.array_equal(b32, expected), f"{name}: int32 bias != rint(bias / (scale_d * scale_w))"
        dequant = deploy_blobs[f"{name}_dequant_layer"][0]
        deq, shift, offset_w = numerics.unpack_deq_scale(np.array(dequant.uint64_data, np.uint64))
        assert np.array_equal(deq, np.broadcast_to(np.float32(rec.scale_d) * scale_w, deq.shape)), \
            f"{name}: deq_scale does not unpack to scale_d * scale_w"
        assert list(shift) == list(rec.shift_bit) and not offset_w.any(), f"{name}: shift_bit / offset_w"


def test_deploy_model_has_quant_before_and_dequant_after_each_layer(retrained):
    layers = list(_layers(retrained["deploy_model"]).values())
    names = [layer.name for layer in layers]
    records = record.read_record(retrained["record"])
    assert not any(layer.type == "Python" for layer in layers), "deploy model still has Python layers"
    for name in nets.QUANTIZED:
        i = names.index(name)
        quant, dequant = layers[i - 1], layers[i + 1]
        assert quant.type == "Quant" and quant.top[0] == layers[i].bottom[0], f"{name}: no Quant right before"
        assert dequant.type == "DeQuant" and dequant.bottom[0] == layers[i].top[0], f"{name}: no DeQuant after"
        assert quant.quant_param.scale == np.float32(1 / np.float32(records[name].scale_d))
        assert struct.unpack("b", quant.quant_param.offset)[0] == records[name].offset_d
    info = json.load(open(retrained["quant_info"]))
    assert set(info["quantized_layers"]) == set(nets.QUANTIZED), info


def test_fake_quant_model_reproduces_retrained_outputs_within_one_step(retrained, tmp_path):
    """Per layer, on the same input: the saved model adds only the integer requantisation."""
    # The retrain model's TEST passes search shift-N and write its record: into a copy here, so
    # that the session's other tests still read the record the saver used.
    model = tmp_path / "retrain.prototxt"
    model.write_text(pathlib.Path(retrained["model"]).read_text().replace(
        json.dumps(str(retrained["record"]))[1:-1], str(tmp_path / "record.txt")))
    assert str(retrained["record"]) not in model.read_text(), "the record path was not redirected"
    trained = caffe.Net(str(model), caffe.TEST, weights=str(retrained["snapshot"]))
    fake = caffe.Net(retrained["fake_quant_model"], caffe.TEST, weights=retrained["fake_quant_weights"])
    records = record.read_record(retrained["record"])
    info = json.load(open(retrained["quant_info"]))["quantized_layers"]
    worst = {}
    for name in nets.QUANTIZED:
        trained.forward(end=f"{name}_shift_n")
        x, y = trained.blobs[info[name]["input_blob"]].data, trained.blobs[name].data.copy()
        fake.blobs[info[name]["input_blob"]].data[...] = x
        fake.forward(start=info[name]["fake_quant"], end=info[name]["requantize"])
        rec = records[name]
        deq = np.broadcast_to(np.float32(rec.scale_d) * np.asarray(rec.scale_w, np.float32), (y.shape[1],))
        step = (deq.astype(np.float64) * 2.0 ** np.asarray(rec.shift_bit)).reshape((1, -1) + (1,) * (y.ndim - 2))
        acc = numerics.accumulator_from_output(fake.blobs[name].data, deq)
        unsaturated = np.abs(acc / step * deq.reshape(step.shape)) < 32767
        diff = np.abs(fake.blobs[name].data.astype(np.float64) - y) / step
        worst[name] = float(diff[unsaturated].max())
    assert all(v <= 1.0 for v in worst.values()), f"largest difference in output steps per layer: {worst}"


def test_record_missing_a_layer_is_an_error_and_nothing_is_written(retrained):
    records = record.read_record(retrained["record"])
    partial = retrained["tmp"] / "partial_record.txt"
    record.write_record(partial, {k: v for k, v in records.items() if k != "conv2"})
    save_path = str(retrained["tmp"] / "bad" / "model")
    with pytest.raises(ModelError, match="no record of layer 'conv2'"):
        amct_retrain.save_quant_retrain_model(str(retrained["model"]), str(retrained["snapshot"]), "Both",
                                              save_path, str(partial))
    assert not any(os.path.exists(p) for p in output_files(save_path).values()), "partial output"


def test_weights_of_another_iteration_are_refused(retrained):
    """The init caffemodel is not the snapshot the record's TEST pass measured."""
    with pytest.raises(ModelError, match="not match"):
        amct_retrain.save_quant_retrain_model(str(retrained["model"]), str(retrained["weights"]), "Deploy",
                                              str(retrained["tmp"] / "bad2" / "model"), str(retrained["record"]))


def test_unwritable_save_path_is_an_error_naming_it(retrained):
    blocked = retrained["tmp"] / "blocked"
    blocked.write_text("a file where a folder should be")
    with pytest.raises(OSError, match="cannot write output file"):
        amct_retrain.save_quant_retrain_model(str(retrained["model"]), str(retrained["snapshot"]), "Both",
                                              str(blocked / "model"), str(retrained["record"]))
