"""LMDB data with the project's Caffe: pycaffe's Datum helpers under numpy 2, an LMDB written as
Caffe's docs show, and several nets reading one LMDB in one process (issue 9, items 1 and 4)."""
import json

import caffe
import lmdb
import numpy as np
import pytest
from google.protobuf import text_format

from amct_retrain.caffe_proto import caffe_pb2
from tests.lmdb_data import data_layer, run_child, write_lmdb

pytestmark = pytest.mark.caffe

RECORDS = 7  # record i: a 1x2x2 uint8 image of value 10 * i, label i


@pytest.fixture
def source(tmp_path):
    images = (10 * np.arange(RECORDS, dtype=np.uint8))[:, None, None, None] * np.ones((1, 2, 2), np.uint8)
    return write_lmdb(tmp_path / "records_lmdb", images, range(RECORDS))


HEAD = """layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: %d weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
""" % RECORDS


def one_data_layer_net(tmp_path, source, batch):
    model = tmp_path / "one_source.prototxt"
    model.write_text(data_layer(source, batch, scale=0.5) + HEAD)
    return model


def train_val_net(tmp_path, source, train_batch, test_batch):
    """A train_val.prototxt whose TRAIN and TEST Data layers share name and source (a common setup)."""
    model = tmp_path / "train_val.prototxt"
    model.write_text(data_layer(source, train_batch, 0.5, "TRAIN") + data_layer(source, test_batch, 0.5, "TEST") + HEAD)
    return model


# Forwards the nets of a scenario alternately; prints, per net, each batch's labels and data[:, 0, 0, 0].
ALTERNATE = r"""
import json, sys
import caffe
scenario, model, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
caffe.set_mode_cpu()

def batch(net):
    return {"label": net.blobs["label"].data.tolist(), "data": net.blobs["data"].data[:, 0, 0, 0].tolist()}

seen = {}
def run(nets, rounds):
    for _ in range(rounds):
        for name, (net, step) in nets.items():
            step()
            seen.setdefault(name, []).append(batch(net))

if scenario == "two TEST nets":
    a, b = caffe.Net(model, caffe.TEST), caffe.Net(model, caffe.TEST)
    run({"a": (a, a.forward), "b": (b, b.forward)}, rounds)
    del a  # its reader goes; b's keeps the LMDB open and reads on; a new net c starts from the first record
    c = caffe.Net(model, caffe.TEST)
    run({"b": (b, b.forward), "c": (c, c.forward)}, rounds)
elif scenario == "a TRAIN and a TEST net":
    train, test = caffe.Net(model, caffe.TRAIN), caffe.Net(model, caffe.TEST)
    run({"train": (train, train.forward), "test": (test, test.forward)}, rounds)
elif scenario == "a solver's train and test nets":
    solver = caffe.get_solver(model)
    test = solver.test_nets[0]
    run({"train": (solver.net, lambda: solver.step(1)), "test": (test, test.forward)}, rounds)
print(json.dumps(seen))
"""


def expected_batches(batch_size, rounds, first_batch=0):
    """The labels and data Caffe's Data layer gives in batches from the first record on, wrapping."""
    out = []
    for r in range(first_batch, first_batch + rounds):
        labels = [(r * batch_size + j) % RECORDS for j in range(batch_size)]
        out.append({"label": [float(v) for v in labels], "data": [0.5 * 10 * v for v in labels]})
    return out


def check(seen, name, batch_size, rounds, first_batch=0):
    got = seen[name][-rounds:] if first_batch else seen[name][:rounds]
    assert got == expected_batches(batch_size, rounds, first_batch), \
        f"net {name!r} did not read the records in order from the first one:\n{json.dumps(got)}"


def test_two_test_nets_of_one_prototxt_each_read_the_lmdb_from_the_start(tmp_path, source):
    model = one_data_layer_net(tmp_path, source, batch=3)
    rounds = 4  # 12 records of 7: both wrap around
    seen = json.loads(run_child(ALTERNATE, "two TEST nets", str(model), str(rounds)))
    check(seen, "a", 3, rounds)
    check(seen, "b", 3, 2 * rounds)  # b went on reading after a was deleted
    check(seen, "c", 3, rounds)      # a net made later starts from the first record


def test_a_train_and_a_test_net_on_one_lmdb_read_independently(tmp_path, source):
    model = train_val_net(tmp_path, source, train_batch=3, test_batch=2)
    seen = json.loads(run_child(ALTERNATE, "a TRAIN and a TEST net", str(model), "5"))
    check(seen, "train", 3, 5)
    check(seen, "test", 2, 5)


def test_a_solvers_train_and_test_nets_on_one_lmdb(tmp_path, source):
    model = train_val_net(tmp_path, source, train_batch=3, test_batch=2)
    solver = tmp_path / "solver.prototxt"
    solver.write_text(f'net: "{model}"\ntest_iter: 1\ntest_interval: 1000\ntest_initialization: false\n'
                      'base_lr: 0.01\nlr_policy: "fixed"\nmax_iter: 100\ndisplay: 0\nsolver_mode: CPU\n')
    seen = json.loads(run_child(ALTERNATE, "a solver's train and test nets", str(solver), "4"))
    check(seen, "train", 3, 4)
    check(seen, "test", 2, 4)


def test_array_to_datum_and_back_round_trip_under_numpy_2():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 4, 5), dtype=np.uint8)
    datum = caffe.io.array_to_datum(image, 7)
    assert (datum.channels, datum.height, datum.width, datum.label) == (3, 4, 5, 7)
    assert datum.data == image.tobytes(), "a uint8 image is stored as Datum.data bytes"
    back = caffe.io.datum_to_array(caffe_pb2.Datum.FromString(datum.SerializeToString()))
    assert back.dtype == np.uint8 and np.array_equal(back, image)
    back[0, 0, 0] ^= 1  # a writable array of its own, as numpy 1's fromstring gave
    floats = rng.normal(size=(2, 3, 3)).astype(np.float32)
    back = caffe.io.datum_to_array(caffe.io.array_to_datum(floats))
    assert np.array_equal(back, floats.astype(float)), "a float image is stored as Datum.float_data"


def test_lmdb_written_as_caffes_docs_show_round_trips_and_feeds_a_data_layer(tmp_path):
    """Caffe's docs: Datum via caffe.io.array_to_datum, keys '%08d', one lmdb write transaction."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 3, 4, 4), dtype=np.uint8)
    labels = [3, 1, 4, 1, 5]
    path = write_lmdb(tmp_path / "docs_lmdb", images, labels)
    env = lmdb.open(str(path), readonly=True)
    with env.begin() as txn:
        records = [(key.decode(), caffe_pb2.Datum.FromString(value)) for key, value in txn.cursor()]
    env.close()
    assert [key for key, _ in records] == [f"{i:08d}" for i in range(5)]
    for (_, datum), image, label in zip(records, images, labels):
        assert datum.label == label and np.array_equal(caffe.io.datum_to_array(datum), image)
    model = tmp_path / "read.prototxt"
    model.write_text(data_layer(path, 5, scale=1 / 255))
    net = caffe.Net(str(model), caffe.TEST)
    net.forward()
    assert np.array_equal(net.blobs["label"].data, labels)
    np.testing.assert_allclose(net.blobs["data"].data, images / 255, rtol=1e-6,
                               err_msg="Caffe's Data layer did not read the images pycaffe wrote")


TEST_BATCH, TEST_ITER = 90, 5  # the 450 test digits

AUTO_CALIBRATION = r"""
import sys
import amct_retrain
from amct_retrain.auto_calibration import OutputBlobEvaluator
model, weights, config, record, save_dir, test_iter = sys.argv[1:7]
evaluator = OutputBlobEvaluator("accuracy", test_iter=int(test_iter), batch_num=1, max_loss=0.01)
amct_retrain.accuracy_based_auto_calibration(model, weights, evaluator, config, record, save_dir)
"""


@pytest.fixture(scope="module")
def digits_lmdb_model(tmp_path_factory):
    """A LeNet on the digits (uint8 0..16 in LMDBs, scaled by transform_param), trained with `caffe train`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from samples import digits_demo

    out = tmp_path_factory.mktemp("digits_lmdb")
    digits = load_digits()
    x = digits.images.astype(np.uint8)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.25, random_state=0,
                                                        stratify=digits.target)
    train, test = write_lmdb(out / "train_lmdb", x_train, y_train), write_lmdb(out / "test_lmdb", x_test, y_test)
    # The digits demo's LeNet with its HDF5Data layers replaced by Data layers on the LMDBs.
    demo = text_format.Parse(digits_demo.NET.format(out=out, test_batch=TEST_BATCH), caffe_pb2.NetParameter())
    data = text_format.Parse(data_layer(train, 64, 1 / 16, "TRAIN") + data_layer(test, TEST_BATCH, 1 / 16, "TEST"),
                             caffe_pb2.NetParameter())
    net = caffe_pb2.NetParameter(name="digits_lmdb")
    net.layer.extend(list(data.layer) + [layer for layer in demo.layer if layer.type != "HDF5Data"])
    model = out / "float.prototxt"
    model.write_text(text_format.MessageToString(net))
    solver = out / "solver.prototxt"
    solver.write_text(f'net: "{model}"\ntest_iter: {TEST_ITER}\ntest_interval: 200\nbase_lr: 0.01\nmomentum: 0.9\n'
                      f'lr_policy: "fixed"\nmax_iter: 200\nsnapshot: 200\nsnapshot_prefix: "{out}/float"\n'
                      'display: 0\nsolver_mode: CPU\nrandom_seed: 3\n')
    digits_demo.caffe_train(solver, out / "train.log")
    return model, out / "float_iter_200.caffemodel"


def test_auto_calibration_of_an_lmdb_model_holds_float_and_fake_quant_nets_at_once(tmp_path, digits_lmdb_model):
    """The sensitivity runs the float and the fake-quant net side by side on the same TEST LMDB."""
    import amct_retrain

    model, weights = digits_lmdb_model
    config = tmp_path / "config.json"
    amct_retrain.create_quant_config(str(config), str(model), str(weights))
    save_dir = tmp_path / "auto"
    run_child(AUTO_CALIBRATION, str(model), str(weights), str(config), str(tmp_path / "record.txt"), str(save_dir),
              str(TEST_ITER), timeout=300)
    history = json.loads((save_dir / "history.json").read_text())
    sensitivity = json.loads((save_dir / "sensitivity.json").read_text())
    assert set(sensitivity) == {"conv1", "conv2", "ip1", "ip2"} and all(np.isfinite(list(sensitivity.values()))), sensitivity
    assert history["original_metric"] > 0.8, f"the float LMDB model did not learn: {history['original_metric']}"
    assert history["accepted_trial"] is not None, f"no trial passed: {history['trials']}"
    accepted = history["trials"][history["accepted_trial"]]
    assert accepted["loss"] <= 0.01 and accepted["quantized_layers"], accepted
