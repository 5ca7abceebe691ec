"""The fake-quant Python layers inside real Caffe: forward, gradients, training, snapshots, TEST."""
import os
import subprocess
import sys

import caffe
import numpy as np
import pytest

from amct_retrain import numerics, record
from tests import nets
from tests.nets import CLIP_MAX, CLIP_MIN, CLIP_STATE, MASTER_WEIGHTS

pytestmark = pytest.mark.caffe
VENV_BIN = os.path.join(os.path.dirname(sys.executable))


def _ulq_backward_literal(x, g, cmin, cmax):
    """Contract section 3, ULQ backward, written out region by region. The grid ends are the
    float32 values the forward clamps to (s is a float32 factor, as the record stores it): IFMR
    puts clip_min on the smallest input, so that element sits right on the lower end."""
    s = np.float32((np.float64(cmax) - np.float64(cmin)) / 255)
    o = np.rint(cmin / np.float64(s))
    lo, hi = s * np.float32(o), s * np.float32(o + 255)
    s = np.float64(s)
    x, g = x.astype(np.float64), g.astype(np.float64)
    d = lambda v: (np.rint(v / s) - v / s) / 255  # noqa: E731
    inside, above, below = (x >= lo) & (x <= hi), x > hi, x < lo
    dmax = np.sum(g[inside] * d(x[inside])) + np.sum(g[above]) * (d(cmin) + 1) + np.sum(g[below]) * d(cmin)
    dmin = -np.sum(g[inside] * d(x[inside])) - np.sum(g[above]) * d(cmin) + np.sum(g[below]) * (1 - d(cmin))
    return np.where(inside, g, 0.0), dmin, dmax


def weighted_net(model_file, phase):
    """A net of ``model_file`` with master weights filled (a net without weights computes zeros
    after conv1, and a quantizer refuses an input that is constant: an unfed net)."""
    weights_file = model_file.with_suffix(".caffemodel")
    nets.init_weights(model_file, weights_file)
    return caffe.Net(str(model_file), phase, weights=str(weights_file))


def test_activation_forward_is_numerics_bit_for_bit(tmp_path):
    model_file = nets.write_net(nets.quant_net(tmp_path / "r.txt", conv_clips=(-1.5, 2.0)),
                                tmp_path / "m.prototxt")
    net = weighted_net(model_file, caffe.TEST)
    net.forward()
    x, y = net.blobs["data"].data, net.blobs["data_q"].data
    expected = numerics.ulq_forward(x, -1.5, 2.0)
    assert y.dtype == expected.dtype == np.float32
    assert np.array_equal(y, expected), f"ULQ output differs from numerics at {np.sum(y != expected)} elements"
    assert float(net.params["conv1_ulq"][CLIP_STATE].data[0]) == 1.0, "configured clips must mark the layer ready"


def test_quant_layers_follow_a_new_input_shape_after_the_first_forward(tmp_path):
    """The layers reshape their tops only on a new input shape: a net reshaped to another batch
    size must still give numerics' outputs of the new shape."""
    model_file = nets.write_net(nets.quant_net(tmp_path / "r.txt", conv_clips=(-1.5, 2.0)),
                                tmp_path / "m.prototxt")
    net = weighted_net(model_file, caffe.TEST)
    net.forward()
    batch = net.blobs["data"].data.shape[0]
    net.blobs["data"].reshape(batch + 3, *net.blobs["data"].data.shape[1:])
    net.blobs["target"].reshape(batch + 3, *net.blobs["target"].data.shape[1:])
    net.reshape()
    net.blobs["data"].data[...] = np.random.default_rng(5).standard_normal(net.blobs["data"].data.shape)
    net.forward(start="conv1_ulq")
    x, y = net.blobs["data"].data, net.blobs["data_q"].data
    assert y.shape == x.shape == (batch + 3, *x.shape[1:]), f"ULQ top {y.shape} for input {x.shape}"
    assert np.array_equal(y, numerics.ulq_forward(x, -1.5, 2.0)), "ULQ output after the reshape differs from numerics"
    assert net.blobs["conv1"].data.shape[0] == batch + 3 and net.blobs["ip1"].data.shape[0] == batch + 3


def test_ifmr_initialises_clips_on_first_batch(model):
    model_file, weights_file, _ = model
    net = caffe.Net(str(model_file), str(weights_file), caffe.TRAIN)
    assert net.params["conv1_ulq"][CLIP_STATE].data[0] == 0.0, "no clips configured: the layer must wait for IFMR"
    net.forward()
    x = net.blobs["data"].data
    clip_min, clip_max = numerics.ifmr_search(x)
    got = (net.params["conv1_ulq"][CLIP_MIN].data[0], net.params["conv1_ulq"][CLIP_MAX].data[0])
    assert got == (np.float32(clip_min), np.float32(clip_max)), f"clips {got} != IFMR {(clip_min, clip_max)}"
    net.forward()  # a second batch must not re-initialise
    assert (net.params["conv1_ulq"][CLIP_MIN].data[0], net.params["conv1_ulq"][CLIP_MAX].data[0]) == got


def test_clip_and_input_gradients_follow_the_contract(model):
    model_file, weights_file, _ = model
    net = caffe.Net(str(model_file), str(weights_file), caffe.TRAIN)
    net.forward()
    for p in net.params.values():
        for b in p:
            b.diff[...] = 0
    net.backward()
    for ulq, bottom, top in (("conv1_ulq", "data", "data_q"), ("ip1_ulq", "conv1", "conv1_q")):
        layer = net.layers[list(net._layer_names).index(ulq)]
        clip_min, clip_max = layer.clips
        # conv1's bottom 'data' gets no diff (DummyData needs none); check the clips there.
        g = net.blobs[top].diff
        x = net.blobs[bottom].data
        gx, dmin, dmax = _ulq_backward_literal(x, g, clip_min, clip_max)
        got_max, got_min = net.params[ulq][CLIP_MAX].diff[0], net.params[ulq][CLIP_MIN].diff[0]
        assert np.isclose(got_max, dmax, rtol=1e-5, atol=1e-6), f"{ulq}: d clip_max {got_max} != contract {dmax}"
        if ulq == "ip1_ulq":  # fixed_min: the lower clip is pinned, so it gets no gradient
            assert got_min == 0.0, f"{ulq}: fixed_min layer got d clip_min {got_min}"
        else:
            assert np.isclose(got_min, dmin, rtol=1e-5, atol=1e-6), f"{ulq}: d clip_min {got_min} != {dmin}"
    # ip1_ulq's input gradient is straight-through inside the clips; the in-place ReLU then masks it.
    layer = net.layers[list(net._layer_names).index("ip1_ulq")]
    gx, _, _ = _ulq_backward_literal(net.blobs["conv1"].data, net.blobs["conv1_q"].diff, *layer.clips)
    expected = np.where(net.blobs["conv1"].data > 0, gx, 0).astype(np.float32)
    assert np.array_equal(net.blobs["conv1"].diff, expected), "ULQ input gradient is not straight-through"


def _check_trained(net, initial, tag):
    for arq, axis in (("conv1_arq", 0), ("ip1_arq", None)):
        master = net.params[arq][MASTER_WEIGHTS].data
        assert not np.array_equal(master, initial[arq]), f"{tag}: {arq} master weights did not move"
        layer = arq.replace("_arq", "")
        scale = numerics.arq_scale(master, axis)
        expected = numerics.arq_fake_quantize(master, scale, axis)
        assert np.array_equal(net.params[layer][0].data, expected), \
            f"{tag}: {layer} weights are not ARQ(master) on the int8 grid of the current scales"
    for ulq in ("conv1_ulq", "ip1_ulq"):
        clips = (net.params[ulq][CLIP_MIN].data[0], net.params[ulq][CLIP_MAX].data[0])
        assert clips[1] != initial[ulq][1], f"{tag}: {ulq} clip_max did not change: {clips}"


def _initial_state(model_file, weights_file):
    net = caffe.Net(str(model_file), str(weights_file), caffe.TRAIN)
    net.forward()  # IFMR initialisation, as the first training batch does
    return {"conv1_arq": net.params["conv1_arq"][MASTER_WEIGHTS].data.copy(), "ip1_arq": net.params["ip1_arq"][MASTER_WEIGHTS].data.copy(),
            "conv1_ulq": (net.params["conv1_ulq"][CLIP_MIN].data[0], net.params["conv1_ulq"][CLIP_MAX].data[0]),
            "ip1_ulq": (net.params["ip1_ulq"][CLIP_MIN].data[0], net.params["ip1_ulq"][CLIP_MAX].data[0])}


def test_pycaffe_solver_trains_snapshots_and_test_writes_record(model, tmp_path):
    model_file, weights_file, record_file = model
    initial = _initial_state(model_file, weights_file)
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(nets.solver_text(model_file, tmp_path / "snap", max_iter=20))
    solver = caffe.get_solver(str(solver_file))
    solver.net.copy_from(str(weights_file))
    solver.solve()
    net = solver.net
    snapshot = caffe.Net(str(model_file), str(tmp_path / "snap_iter_20.caffemodel"), caffe.TRAIN)
    # Caffe runs the last TEST after the snapshot: the fake-quant weights (derived from the
    # master weights) are recomputed on forward, so compare after one forward of each.
    snapshot.forward()
    net.forward()
    for name, count in nets.QUANT_BLOBS.items():
        assert len(snapshot.params[name]) == count, f"{name}: {len(snapshot.params[name])} blobs in snapshot"
        for i in range(count):
            assert np.array_equal(snapshot.params[name][i].data, net.params[name][i].data), \
                f"{name} blob {i}: the snapshot does not restore the trained value"
    _check_trained(net, initial, "pycaffe")
    records = record.read_record(record_file)
    assert set(records) == {"conv1", "ip1"}, f"record layers: {sorted(records)}"
    assert len(records["conv1"].shift_bit) == nets.CONV_OUT and len(records["ip1"].shift_bit) == nets.IP_OUT
    assert all(record.layer_record_complete(r) for r in records.values()), records
    assert len(records["conv1"].scale_w) == nets.CONV_OUT and len(records["ip1"].scale_w) == 1
    ip_scale_w = numerics.arq_scale(net.params["ip1_arq"][MASTER_WEIGHTS].data, None)
    assert np.float32(records["ip1"].scale_w[0]) == ip_scale_w[0], "record scale_w is not the final ARQ scale"
    assert records["ip1"].offset_d == -128, "fixed_min layer must have offset_d -128"


def test_caffe_binary_trains_quant_layers_and_test_writes_record(model, tmp_path):
    model_file, weights_file, record_file = model
    initial = _initial_state(model_file, weights_file)
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(nets.solver_text(model_file, tmp_path / "snap", max_iter=20))
    run = subprocess.run([os.path.join(VENV_BIN, "caffe"), "train", f"-solver={solver_file}",
                          f"-weights={weights_file}"], capture_output=True, text=True, env=_clean_env())
    assert run.returncode == 0, f"caffe train failed:\n{run.stderr[-3000:]}"
    assert "Finetuning from" in run.stderr, "caffe train ignored -weights"
    snapshot = tmp_path / "snap_iter_20.caffemodel"
    net = caffe.Net(str(model_file), str(snapshot), caffe.TRAIN)
    assert net.params["conv1_ulq"][CLIP_STATE].data[0] == 1.0, "snapshot lost the clips-ready flag"
    net.forward()
    _check_trained(net, initial, "caffe train")
    assert set(record.read_record(record_file)) == {"conv1", "ip1"}, "caffe train's TEST wrote no record"


def _clean_env():
    """The user's environment with nothing of ours: the wrapper must find the venv itself."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/bin:/bin"
    return env


def test_nan_input_stops_with_error_naming_layer(tmp_path):
    model_file = nets.write_net(nets.quant_net(tmp_path / "r.txt", conv_clips=(-1.0, 1.0)),
                                tmp_path / "m.prototxt")
    net = weighted_net(model_file, caffe.TEST)
    net.forward()
    net.blobs["data"].data[0, 0, 0, 0] = np.nan
    with pytest.raises(numerics.NonFiniteError, match="conv1_ulq"):
        net.forward(start="conv1_ulq")


@pytest.mark.parametrize("param_str, fragment", [
    ('{"name": "q", "clip_min": 2.0, "clip_max": 1.0}', "key 'clip_min' (2.0) must be below 'clip_max'"),
    ('{"name": "q", "clip_max": 1.0}', "'clip_min' and 'clip_max' must be given together"),
    ('{"name": "q", "clip_mx": 1.0}', "unknown param_str key 'clip_mx'"),
])
def test_bad_param_str_in_caffe_names_layer_and_key(tmp_path, param_str, fragment):
    model = tmp_path / "bad.prototxt"
    model.write_text(f"""layer {{ name: "data" type: "DummyData" top: "x"
      dummy_data_param {{ shape {{ dim: 2 dim: 3 }} }} }}
    layer {{ name: "q" type: "Python" bottom: "x" top: "y"
      python_param {{ module: "amct_retrain_layers.activation" layer: "ActivationULQ"
                      param_str: '{param_str}' }} }}""")
    with pytest.raises(ValueError) as err:
        caffe.Net(str(model), caffe.TEST)
    assert fragment in str(err.value) and "layer 'q'" in str(err.value), f"unclear error: {err.value}"


def test_invalid_record_file_is_an_error_naming_file_and_line(tmp_path):
    record_file = tmp_path / "record.txt"
    record_file.write_text('record {\n  key: "conv1"\n  value { scale_d: oops }\n}\n')
    model_file = nets.write_net(nets.quant_net(record_file, conv_clips=(-1.0, 1.0)), tmp_path / "m.prototxt")
    net = weighted_net(model_file, caffe.TEST)
    with pytest.raises(record.RecordFileError, match=rf"{record_file}:3:"):
        net.forward()
    assert "oops" in record_file.read_text(), "the invalid record file must be left as it was"


def test_all_zero_weight_channel_gets_scale_one_not_nan(tmp_path):
    model_file = nets.write_net(nets.quant_net(tmp_path / "r.txt", conv_clips=(-1.0, 1.0)),
                                tmp_path / "m.prototxt")
    net = caffe.Net(str(model_file), caffe.TEST)
    master = np.random.default_rng(1).normal(0, 0.3, nets.CONV_WEIGHT_SHAPE).astype(np.float32)
    master[2] = 0
    net.params["conv1_arq"][MASTER_WEIGHTS].data[...] = master
    net.forward()
    assert numerics.arq_scale(master, 0)[2] == 1.0, "all-zero channel must get scale_w 1"
    weights = net.params["conv1"][0].data
    assert np.all(np.isfinite(weights)) and np.all(weights[2] == 0), "all-zero channel must stay zero, finite"
    assert np.all(np.isfinite(net.blobs["conv1"].data)), "non-finite conv output"


def test_shift_n_waits_for_batch_num_batches_and_keeps_other_entries(tmp_path):
    record_file = tmp_path / "record.txt"
    record.update_layer_record(record_file, "other_layer", scale_d=0.5, offset_d=3)
    model_file = nets.write_net(nets.quant_net(record_file, batch_num=2, conv_clips=(-1.0, 1.0)),
                                tmp_path / "m.prototxt")
    net = caffe.Net(str(model_file), caffe.TEST)
    net.params["conv1_arq"][MASTER_WEIGHTS].data[...] = 0.1
    net.forward()
    assert set(record.read_record(record_file)) == {"other_layer"}, "searched before batch_num batches"
    net.forward()
    records = record.read_record(record_file)
    assert set(records) == {"other_layer", "conv1", "ip1"}, f"record layers after 2 batches: {sorted(records)}"
    assert records["other_layer"].scale_d == 0.5 and records["other_layer"].offset_d == 3, "lost another entry"


def test_shift_n_layers_write_the_record_once_per_test_pass(tmp_path, monkeypatch):
    record_file = tmp_path / "record.txt"
    model_file = nets.write_net(nets.quant_net(record_file, batch_num=1, conv_clips=(-1.0, 1.0)),
                                tmp_path / "m.prototxt")
    net = weighted_net(model_file, caffe.TEST)
    writes = []
    real_update = record.update_layer_records
    monkeypatch.setattr(record, "update_layer_records", lambda path, updates: (
        writes.append(sorted(updates)), real_update(path, updates))[1])
    net.forward()
    assert writes == [["conv1", "ip1"]], f"record writes in one TEST pass: {writes}"
    # New conv1 weights: conv1 searches again in the next pass, ip1 (same factors) does not.
    net.params["conv1_arq"][MASTER_WEIGHTS].data[...] = np.linspace(-1, 1, nets.CONV_WEIGHT_SHAPE[0])[:, None, None, None]
    net.forward()
    assert writes == [["conv1", "ip1"], ["conv1"]], f"record writes after two TEST passes: {writes}"
    assert set(record.read_record(record_file)) == {"conv1", "ip1"}


def test_shift_n_does_nothing_in_train_phase(tmp_path):
    record_file = tmp_path / "record.txt"
    model_file = nets.write_net(nets.quant_net(record_file, conv_clips=(-1.0, 1.0)), tmp_path / "m.prototxt")
    weighted_net(model_file, caffe.TRAIN).forward()
    assert not record_file.exists(), "the TRAIN phase must not search shift-N"


def test_nan_master_weights_stop_with_error_naming_layer(tmp_path):
    model_file = nets.write_net(nets.quant_net(tmp_path / "r.txt", conv_clips=(-1.0, 1.0)),
                                tmp_path / "m.prototxt")
    net = caffe.Net(str(model_file), caffe.TEST)
    net.params["conv1_arq"][MASTER_WEIGHTS].data[0, 0, 0, 0] = np.inf
    with pytest.raises(numerics.NonFiniteError, match="conv1_arq"):
        net.forward()


def test_invalid_clips_fall_back_to_last_valid_pair_shared_through_the_blob(tmp_path):
    """A solver update that makes clip_min > 0 must not break the TEST net (which shares the
    TRAIN net's blobs but not its Python objects): the last valid pair lives in a blob."""
    model_file = nets.write_net(nets.quant_net(tmp_path / "r.txt", conv_clips=(-1.0, 1.0)), tmp_path / "m.prototxt")
    train = weighted_net(model_file, caffe.TRAIN)
    train.forward()
    train.params["conv1_ulq"][CLIP_MIN].data[0] = 0.25  # invalid: the range must contain 0
    test = caffe.Net(str(model_file), caffe.TEST)
    test.share_with(train)
    test.forward()
    expected = numerics.ulq_forward(test.blobs["data"].data, -1.0, 1.0)
    assert np.array_equal(test.blobs["data_q"].data, expected), "TEST net did not fall back to the last valid clips"
    assert list(train.params["conv1_ulq"][CLIP_STATE].data) == [1.0, -1.0, 1.0], "clip state lost the last valid pair"
