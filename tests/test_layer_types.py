"""The per-type table: every quantizable type has the hooks the graph passes and the integer executor use."""
import numpy as np
import pytest
from google.protobuf import text_format

from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.layer_types import QUANTIZABLE_RULES, shape_constraint_broken

pytestmark = pytest.mark.caffe  # the table reads Caffe's LayerParameter (caffe_pb2)


@pytest.mark.parametrize("layer_type", sorted(QUANTIZABLE_RULES))
def test_every_type_has_its_hooks(layer_type):
    rule = QUANTIZABLE_RULES[layer_type]
    assert rule.integer_accumulate is not None and rule.integer_output_hw is not None, \
        f"{layer_type}: no integer executor hooks"
    assert (rule.weight_param is not None) == rule.has_weights == (rule.channel_axis is not None), \
        f"{layer_type}: a type with weights needs a weight param and a channel axis, one without needs neither"
    assert (rule.fixed_scale_w is None) == rule.has_weights, f"{layer_type}: a type without weights needs a fixed scale_w"
    assert (rule.weight_shape_mismatch is not None) == rule.has_weights, \
        f"{layer_type}: a type with weights says which weight shape its layers need"


def _layer(text: str) -> caffe_pb2.LayerParameter:
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def test_the_pooling_hooks_give_its_geometry_scale_and_window_sums():
    pool = _layer('name: "p" type: "Pooling" pooling_param { pool: AVE kernel_size: 2 stride: 2 }')
    rule = QUANTIZABLE_RULES["Pooling"]
    g = rule.geometry(pool)
    assert rule.fixed_scale_w(pool).tolist() == [np.float32(0.25)], "AVE 2x2: scale_w 1/4"
    x = np.arange(32, dtype=np.float64).reshape(1, 2, 4, 4)
    acc = rule.integer_accumulate(x, None, g)
    assert acc.shape == (1, 2, *rule.integer_output_hw((4, 4), g)) and acc[0, 0, 0, 0] == 0 + 1 + 4 + 5, acc
    assert shape_constraint_broken(pool, (1, 2, 5, 4)) is not None, "a 5-high input is not tiled by 2x2 windows"
    assert shape_constraint_broken(pool, (1, 2, 4, 4)) is None
