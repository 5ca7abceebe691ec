"""The net-graph module: Caffe's phase rules (known and unknown level/stages), blob versions, the rebuild."""
import pytest
from google.protobuf import text_format

from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.graph.netgraph import (NET_INPUT, NOT_WRITTEN, BlobGraph, BlobVersion, phase_key, rebuilt,
                                         runs_in_phase, uses_stages_or_levels, with_phase_rules_of)

pytestmark = pytest.mark.caffe  # caffe_pb2 is the built Caffe's

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def _layer(rules: str) -> caffe_pb2.LayerParameter:
    return text_format.Parse(f'name: "l" type: "ReLU" {rules}', caffe_pb2.LayerParameter())


def _state(text: str) -> caffe_pb2.NetState:
    return text_format.Parse(text, caffe_pb2.NetState())


@pytest.mark.parametrize("rules, train, test", [
    ("", True, True),
    ("include { phase: TEST }", False, True),
    ("exclude { phase: TEST }", True, False),
    ("include { phase: TRAIN } include { phase: TEST }", True, True),
    # include rules win: Caffe ignores the excludes of a layer with includes
    ("include { phase: TRAIN } exclude { phase: TRAIN }", True, False),
])
def test_phase_only_rules_decide_alone(rules, train, test):
    layer = _layer(rules)
    for state in (None, _state("stage: 'x' level: 3")):
        assert (runs_in_phase(layer, TRAIN, state), runs_in_phase(layer, TEST, state)) == (train, test), \
            f"{rules!r} with state {state}: phase-only rules do not depend on level and stages"
    assert not uses_stages_or_levels(layer)


@pytest.mark.parametrize("rules, state, runs", [
    ("include { phase: TEST stage: 'deploy' }", "", False),
    ("include { phase: TEST stage: 'deploy' }", "stage: 'deploy'", True),
    ("include { phase: TEST not_stage: 'deploy' }", "stage: 'deploy'", False),
    ("include { min_level: 2 }", "level: 1", False),
    ("include { max_level: 2 }", "level: 1", True),
    ("exclude { phase: TEST stage: 'deploy' }", "stage: 'deploy'", False),
    ("exclude { phase: TEST stage: 'deploy' }", "", True),
])
def test_a_known_state_is_caffes_state_meets_rule(rules, state, runs):
    assert runs_in_phase(_layer(rules), TEST, _state(state)) is runs, f"{rules!r} in TEST with state {state!r}"


@pytest.mark.parametrize("rules, runs", [
    ("include { phase: TEST stage: 'deploy' }", True),   # may hold: the solver's test_state may add the stage
    ("include { phase: TRAIN stage: 'deploy' }", False),  # the phase alone excludes it
    ("exclude { phase: TEST stage: 'deploy' }", True),   # only an exclude that surely holds excludes
    ("exclude { phase: TEST }", False),
])
def test_an_unknown_state_asks_whether_the_layer_may_run(rules, runs):
    layer = _layer(rules)
    assert runs_in_phase(layer, TEST) is runs, f"{rules!r} in TEST with unknown level and stages"
    assert uses_stages_or_levels(layer) == ("stage" in rules)


def test_inserted_layers_take_the_phase_rules_and_keys_compare_them():
    served = _layer("include { phase: TRAIN }")
    added = with_phase_rules_of(served, caffe_pb2.LayerParameter(name="a"), caffe_pb2.LayerParameter(name="b"))
    assert [phase_key(a) for a in added] == [phase_key(served)] * 2
    assert phase_key(served) != phase_key(_layer("exclude { phase: TRAIN }")), "include and exclude differ"


NET = """
input: "x" input_shape { dim: 1 dim: 1 dim: 2 dim: 2 }
layer { name: "a" type: "ReLU" bottom: "x" top: "y" }
layer { name: "b" type: "ReLU" bottom: "y" top: "y" }
layer { name: "c" type: "Eltwise" bottom: "y" bottom: "y" top: "z" }
layer { name: "d" type: "ReLU" bottom: "w" top: "v" }
"""


def test_blob_versions_follow_in_place_writes():
    net = text_format.Parse(NET, caffe_pb2.NetParameter())
    g = BlobGraph(net)
    assert g.reads == [[BlobVersion("x", NET_INPUT)], [BlobVersion("y", 0)], [BlobVersion("y", 1)] * 2,
                       [BlobVersion("w", NOT_WRITTEN)]]
    assert g.sole_reader(BlobVersion("y", 0)) == 1, "layer b alone reads a's y"
    assert g.sole_reader(BlobVersion("y", 1)) is None, "layer c reads b's y twice"
    assert g.first_reader(BlobVersion("y", 1)) == 2


def test_rebuilt_keeps_the_nets_fields_and_leaves_it_alone():
    net = text_format.Parse(NET, caffe_pb2.NetParameter())
    before = net.SerializeToString()
    out = rebuilt(net, (layer for layer in net.layer if layer.name != "b"))
    assert [layer.name for layer in out.layer] == ["a", "c", "d"] and list(out.input) == ["x"]
    assert net.SerializeToString() == before, "the input net was modified"
