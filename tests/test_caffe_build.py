"""The project's Caffe build: its two source patches take effect, and the deploy schema exists."""
import os
import re
import struct
import subprocess
import sys

import caffe
import numpy as np
import pytest
from caffe.proto import caffe_pb2

from amct_retrain.graph.model_io import length_delimited_field

pytestmark = pytest.mark.caffe
CAFFE = os.path.join(os.path.dirname(sys.executable), "caffe")

TINY_NET = """name: "tiny"
layer { name: "data" type: "DummyData" top: "x" top: "t"
  dummy_data_param { shape { dim: 1 dim: 4 } shape { dim: 1 dim: 1 }
                     data_filler { type: "constant" value: 1 } data_filler { type: "constant" value: 0 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
  inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 10 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
"""


def _tiny_net_with_weights(tmp_path, value: float):
    model = tmp_path / "tiny.prototxt"
    model.write_text(TINY_NET)
    net = caffe.Net(str(model), caffe.TEST)
    net.params["ip"][0].data[...] = value
    net.params["ip"][1].data[...] = 0
    weights = tmp_path / "tiny.caffemodel"
    net.save(str(weights))
    return model, weights


def test_caffe_train_weights_flag_takes_effect_in_train_and_test_nets(tmp_path):
    model, weights = _tiny_net_with_weights(tmp_path, 0.5)
    solver = tmp_path / "solver.prototxt"
    solver.write_text(f'net: "{model}"\ntest_iter: 1\ntest_interval: 1\nbase_lr: 0\nlr_policy: "fixed"\n'
                      f'max_iter: 1\nsnapshot: 1\nsnapshot_prefix: "{tmp_path}/snap"\nsolver_mode: CPU\n')
    run = subprocess.run([CAFFE, "train", f"-solver={solver}", f"-weights={weights}"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    # The TEST net: y = 4 * 0.5 = 2, loss = 2^2 / 2 = 2 with the given weights (random otherwise).
    test_losses = re.findall(r"Test net output #0: loss = ([\d.e+-]+)", run.stderr)
    assert test_losses and all(float(v) == pytest.approx(2.0) for v in test_losses), \
        f"TEST net did not get the -weights values: test losses {test_losses}"
    snap = caffe.Net(str(model), str(tmp_path / "snap_iter_1.caffemodel"), caffe.TEST)
    assert np.all(snap.params["ip"][0].data == 0.5), \
        f"TRAIN net did not start from -weights: {snap.params['ip'][0].data}"


def test_weights_file_over_512_mb_loads(tmp_path):
    """Upstream reads protobuf files up to 2 GB; this fork aborted above 512 MB (VGG-16)."""
    model, weights = _tiny_net_with_weights(tmp_path, 0.25)
    # Append an extra layer with a 600 MB blob: Caffe must parse the whole file, then ignore
    # the layer the net lacks. Concatenated protobuf messages merge, so this is a valid file.
    n = 150 * 2 ** 20
    blob = length_delimited_field(5, np.zeros(n, np.float32).tobytes())          # BlobProto.data, packed
    layer = length_delimited_field(1, b"padding") + length_delimited_field(7, blob)               # LayerParameter.name, .blobs
    big = tmp_path / "big.caffemodel"
    with open(big, "wb") as f:
        f.write(weights.read_bytes())
        f.write(length_delimited_field(100, layer))                                # NetParameter.layer
    assert big.stat().st_size > 600 * 10 ** 6
    code = ("import caffe, sys; n = caffe.Net(sys.argv[1], sys.argv[2], caffe.TEST); "
            "assert (n.params['ip'][0].data == 0.25).all(); print('loaded')")
    run = subprocess.run([sys.executable, "-c", code, str(model), str(big)], capture_output=True, text=True)
    assert run.returncode == 0 and "loaded" in run.stdout, \
        f"Caffe could not read a 600 MB weights file:\n{run.stderr[-2000:]}"


def test_schema_carries_deploy_fields_with_original_numbers():
    blob_fields = caffe_pb2.BlobProto.DESCRIPTOR.fields_by_name
    layer_fields = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
    assert (blob_fields["int8_data"].number, blob_fields["int32_data"].number,
            blob_fields["uint64_data"].number) == (10, 11, 12)
    assert (layer_fields["quant_param"].number, layer_fields["dequant_param"].number) == (208, 200000)
    layer = caffe_pb2.LayerParameter(name="q", type="Quant")
    layer.quant_param.scale = 1 / 0.02
    layer.quant_param.offset = struct.pack("b", -128)
    blob = layer.blobs.add()
    blob.int8_data = np.array([-128, 0, 127], np.int8).tobytes()
    blob.int32_data.extend([-(2 ** 31), 2 ** 31 - 1])
    blob.uint64_data.append(2 ** 64 - 1)
    again = caffe_pb2.LayerParameter.FromString(layer.SerializeToString())
    assert again == layer, "deploy fields do not survive a serialisation round trip"
    assert struct.unpack("b", again.quant_param.offset)[0] == -128


# A net whose one layer is a toolkit's Python layer (amct_retrain_layers), fed a constant.
PYTHON_LAYER_NET = """layer { name: "data" type: "DummyData" top: "x"
  dummy_data_param { shape { dim: 2 dim: 3 } data_filler { type: "constant" value: 0.3 } } }
layer { name: "q" type: "Python" bottom: "x" top: "y"
  python_param { module: "amct_retrain_layers.activation" layer: "ActivationULQ"
                 param_str: '{"name": "q", "clip_min": -1.0, "clip_max": 1.0}' } }
"""


def test_caffe_wrapper_runs_python_layers_without_user_environment(tmp_path):
    model = tmp_path / "py.prototxt"
    model.write_text(PYTHON_LAYER_NET)
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}
    run = subprocess.run([CAFFE, "time", f"-model={model}", "-iterations=1"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, f"caffe could not run the toolkit's Python layer:\n{run.stderr[-2000:]}"
