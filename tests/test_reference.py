"""The integer reference executor against the fake-quant model in Caffe: the parity gate."""
import json

import caffe
import numpy as np
import pytest

from amct_retrain import record
from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.graph.model_io import ModelError
from amct_retrain.reference import ReferenceExecutor, parity_in_output_steps, saved_model_parity
from amct_retrain.saver import output_files
from samples import digits_demo
from tests import nets

pytestmark = pytest.mark.caffe


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    accuracies = digits_demo.run(out, float_iters=300, retrain_iters=100)
    return out, accuracies, output_files(str(out / "result" / "digits"))


def test_digits_reference_executor_matches_fake_quant_within_one_step(digits):
    out, accuracies, files = digits
    fake = caffe.Net(files["fake_quant_model"], caffe.TEST, weights=files["fake_quant_weights"])
    reference = ReferenceExecutor(files["deploy_model"], files["deploy_weights"])
    acc_ref = float(reference.net.forward()["accuracy"])
    fake.forward()  # the whole test set in one batch: fills every blob
    info = json.load(open(files["quant_info"]))["quantized_layers"]
    worst = parity_in_output_steps(fake, reference.net, info, record.read_record(out / "record.txt"))
    assert max(worst.values()) <= 1.0, f"largest difference in output steps per layer: {worst}"
    assert abs(acc_ref - accuracies["INT8 fake-quant, retrained"]) <= 0.005, \
        f"integer executor accuracy {acc_ref} vs fake-quant {accuracies}"
    agree = np.mean(fake.blobs["ip2"].data.argmax(1) == reference.net.blobs["ip2"].data.argmax(1))
    assert agree >= 0.995, f"top-1 agreement of the integer executor with the fake-quant model: {agree}"


def test_deploy_blobs_that_contradict_the_record_are_errors_naming_the_layer(digits, tmp_path):
    _, _, files = digits
    net = caffe_pb2.NetParameter.FromString(open(files["deploy_weights"], "rb").read())
    dequant = next(layer for layer in net.layer if layer.name == "conv2_dequant_layer")
    packed = np.array(dequant.blobs[0].uint64_data, np.uint64)
    packed[0] = np.uint64(0xFF800000)  # float32 -inf as the deq of channel 0
    del dequant.blobs[0].uint64_data[:]
    dequant.blobs[0].uint64_data.extend(packed.tolist())
    bad = tmp_path / "bad_deploy.caffemodel"
    bad.write_bytes(net.SerializeToString())
    with pytest.raises(ModelError, match="conv2_dequant_layer"):
        ReferenceExecutor(files["deploy_model"], str(bad))
    net = caffe_pb2.NetParameter.FromString(open(files["deploy_weights"], "rb").read())
    conv = next(layer for layer in net.layer if layer.name == "ip1")
    del conv.blobs[1].int32_data[-1]
    bad.write_bytes(net.SerializeToString())
    with pytest.raises(ModelError, match="layer 'ip1'"):
        ReferenceExecutor(files["deploy_model"], str(bad))


def test_grouped_and_biasless_layers_match_fake_quant_within_one_step(retrained):
    """The small test net: grouped conv without bias, conv with bias, InnerProduct."""
    worst = saved_model_parity(retrained["save_path"], str(retrained["record"]))
    assert set(worst) == set(nets.QUANTIZED) and max(worst.values()) <= 1.0, \
        f"largest difference in output steps per layer: {worst}"


def test_deploy_dequant_without_shift_bit_is_an_error_naming_the_layer(digits, tmp_path):
    _, _, files = digits
    net = caffe_pb2.NetParameter.FromString(open(files["deploy_weights"], "rb").read())
    dequant = next(layer for layer in net.layer if layer.name == "ip2_dequant_layer")
    packed = np.array(dequant.blobs[0].uint64_data, np.uint64) & np.uint64(0xFFFFFFFF)  # shift_bit bits cleared
    del dequant.blobs[0].uint64_data[:]
    dequant.blobs[0].uint64_data.extend(packed.tolist())
    bad = tmp_path / "no_shift.caffemodel"
    bad.write_bytes(net.SerializeToString())
    with pytest.raises(ModelError, match="ip2_dequant_layer.*shift_bit"):
        ReferenceExecutor(files["deploy_model"], str(bad))
