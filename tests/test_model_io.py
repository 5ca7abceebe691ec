"""Reading Caffe models in Python: clear errors instead of Caffe's aborts."""
import numpy as np
import pytest

from amct_retrain.graph.model_io import ModelError, array_to_blob, blob_to_array, read_prototxt


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


def test_read_prototxt_rejects_v1_layers(tmp_path):
    model = tmp_path / "v1.prototxt"
    model.write_text('name: "x"\nlayers { name: "conv" type: CONVOLUTION }\n')
    with pytest.raises(ModelError) as e:
        read_prototxt(model)
    assert str(model) in str(e.value) and "V1" in str(e.value), f"message: {e.value}"
