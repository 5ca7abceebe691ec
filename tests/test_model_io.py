"""Reading Caffe models in Python: clear errors instead of Caffe's aborts."""
import numpy as np
import pytest
from google.protobuf import text_format

from amct_retrain import numerics
from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.graph import model_io
from amct_retrain.graph.model_io import ModelError, array_to_blob, blob_to_array, probe_net, read_prototxt

pytestmark = pytest.mark.caffe  # model_io reads Caffe's protobuf messages (caffe_pb2)


def test_array_blob_round_trip_keeps_shape_and_bits():
    a = np.random.default_rng(0).normal(size=(4, 3, 2, 5)).astype(np.float32)
    back = blob_to_array(array_to_blob(a))
    assert back.shape == a.shape and np.array_equal(back, a), "array_to_blob / blob_to_array lost data"


def test_read_prototxt_missing_file(tmp_path):
    missing = tmp_path / "nope.prototxt"
    with pytest.raises(ModelError) as e:
        read_prototxt(missing)
    assert str(missing) in str(e.value) and "does not exist" in str(e.value), f"message: {e.value}"


def test_read_prototxt_parse_error_has_file_line_col(tmp_path):
    model = tmp_path / "bad.prototxt"
    model.write_text('name: "x"\nlayer { name: "a" type: "ReLU" round_mode: CEIL }\n')
    with pytest.raises(ModelError) as e:
        read_prototxt(model)
    assert str(e.value).startswith(f"{model}:2:"), f"expected FILE:LINE:COL, got: {e.value}"
    assert "round_mode" in str(e.value), f"the unknown field is named: {e.value}"


V1_NET = """name: "v1net"
input: "data"
input_dim: 2
input_dim: 3
input_dim: 8
input_dim: 8
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
layers { name: "fc" type: INNER_PRODUCT bottom: "conv1" top: "fc" inner_product_param { num_output: 3 } }
"""


def test_v1_net_is_upgraded_by_caffe_and_quantized(tmp_path):
    import caffe

    import amct_retrain

    model = tmp_path / "v1.prototxt"
    model.write_text(V1_NET)
    net = read_prototxt(model)
    assert [(layer.name, layer.type) for layer in net.layer] == \
        [("input", "Input"), ("conv1", "Convolution"), ("relu1", "ReLU"), ("fc", "InnerProduct")], \
        f"upgrade gave {net.layer}"
    weights = tmp_path / "v1.caffemodel"
    caffe.Net(str(model), caffe.TEST).save(str(weights))
    config = tmp_path / "c.json"
    amct_retrain.create_quant_retrain_config(str(config), str(model), str(weights))
    amct_retrain.create_quant_retrain_model(str(model), str(weights), str(config), str(tmp_path / "m.prototxt"),
                                            str(tmp_path / "m.caffemodel"), str(tmp_path / "r.txt"))
    modified = caffe.Net(str(tmp_path / "m.prototxt"), caffe.TEST, weights=str(tmp_path / "m.caffemodel"))
    assert "conv1_ulq" in modified.params and "fc_ulq" in modified.params, "V1 layers were not quantized"
    modified.blobs["data"].data[...] = np.random.default_rng(0).normal(size=modified.blobs["data"].data.shape)
    modified.forward()  # fed: an unfed input net is refused


def test_broken_v1_net_is_an_error_naming_the_file(tmp_path):
    model = tmp_path / "bad_v1.prototxt"
    model.write_text('name: "x"\nlayers { name: "conv" type: CONVOLUTION bottom: "nowhere" top: "c" '
                     'convolution_param { num_output: 1 kernel_size: 1 } }\nlayer { name: "new" type: "ReLU" '
                     'bottom: "c" top: "c" }\n')
    with pytest.raises(ModelError) as e:
        read_prototxt(model)
    assert str(model) in str(e.value), f"message: {e.value}"


def test_fast_caffemodel_reader_agrees_with_protobuf(tmp_path):
    import caffe

    from amct_retrain.graph.model_io import CaffemodelParams, read_caffemodel

    model = tmp_path / "v1.prototxt"
    model.write_text(V1_NET)
    net = caffe.Net(str(model), caffe.TEST)
    for blobs in net.params.values():
        for b in blobs:
            b.data[...] = np.random.default_rng(1).normal(size=b.data.shape)
    weights = tmp_path / "w.caffemodel"
    net.save(str(weights))
    fast = read_caffemodel(weights)
    assert isinstance(fast, dict), "a caffemodel pycaffe wrote should take the fast path"
    slow = CaffemodelParams(caffe_pb2.NetParameter.FromString(weights.read_bytes()), str(weights))
    assert list(fast) == list(slow), f"layers differ: {list(fast)} vs {list(slow)}"
    for name in slow:
        for a, b in zip(fast[name], slow[name]):
            assert a.shape == b.shape and np.array_equal(a, b), f"layer {name}: fast reader differs"
    legacy = caffe_pb2.NetParameter()
    layer = legacy.layer.add(name="old")
    blob = layer.blobs.add(num=1, channels=1, height=2, width=3)
    blob.data.extend(range(6))
    old = tmp_path / "legacy.caffemodel"
    old.write_bytes(legacy.SerializeToString())
    params = read_caffemodel(old)
    assert params["old"][0].shape == (2, 3), "a legacy 4-D blob must fall back to protobuf and keep its shape"


def test_upstream_round_mode_is_an_error_that_says_what_to_write(tmp_path):
    model = tmp_path / "pool.prototxt"
    model.write_text('name: "x"\nlayer { name: "p" type: "Pooling" bottom: "a" top: "b"\n'
                     '  pooling_param { pool: MAX kernel_size: 2 round_mode: FLOOR } }\n')
    with pytest.raises(ModelError) as e:
        read_prototxt(model)
    message = str(e.value)
    assert message.startswith(f"{model}:3:") and "ceil_mode: false" in message, f"unhelpful error: {message}"


@pytest.mark.parametrize("layer", [
    'type: "Convolution" convolution_param { num_output: 2 kernel_size: 5 }',
    'type: "Pooling" pooling_param { pool: MAX kernel_size: 5 stride: 1 }',  # not quantized: still its type's hint
])
def test_a_window_larger_than_its_input_is_named_with_its_types_hint(tmp_path, layer):
    net = text_format.Parse('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 '
                            'dim: 3 dim: 3 } } } '
                            f'layer {{ name: "big" {layer} bottom: "data" top: "out" }}', caffe_pb2.NetParameter())
    with pytest.raises(ModelError, match=r"layer 'big'.*larger than the padded input"):
        probe_net(net, str(tmp_path / "net.prototxt"))


@pytest.mark.parametrize("axis", [0, 1, None])
def test_lazy_arq_blobs_write_the_bytes_of_the_eager_arrays_chunk_by_chunk(monkeypatch, axis):
    monkeypatch.setattr(model_io, "_LAZY_CHUNK_BYTES", 64)  # many chunks, one not a whole number of rows
    w = np.random.default_rng(3).normal(size=(7, 5, 3, 2)).astype(np.float32)
    scale = numerics.arq_scale(w, axis)
    eager = {"conv": [numerics.arq_fake_quantize(w, scale, axis), np.arange(7, dtype=np.float32)],
             "deploy": [numerics.arq_quantize(w, scale, axis)]}
    lazy = {"conv": [model_io.arq_weight_blob(w, scale, axis), eager["conv"][1]],
            "deploy": [model_io.arq_weight_blob(w, scale, axis, codes=True)]}
    assert model_io.caffemodel_bytes("n", lazy) == model_io.caffemodel_bytes("n", eager), \
        "a lazily written blob differs from the same values written at once"
    parsed = model_io.parse_caffemodel(model_io.caffemodel_bytes("n", lazy), "lazy")
    assert np.frombuffer(parsed.layer[1].blobs[0].int8_data, np.int8).reshape(w.shape).tolist() == \
        eager["deploy"][0].tolist()
