"""analyze(): per-layer cosine / SQNR / clipping / weight ranges, its files, CLI and TensorBoard."""
import html.parser
import json
import math
import os
import pathlib
import shutil
import subprocess

import caffe
import numpy as np
import pytest
from caffe.proto import caffe_pb2
from google.protobuf import text_format

import amct_retrain
from amct_retrain import cli, numerics, record, tensorboard
from amct_retrain.analysis import metrics, report
from amct_retrain.saver import output_files
from tests import analysis_check, nets
from tests.test_tensorboard import CAFFE

# --------------------------------------------------------------------------- metrics (numpy only)


def test_output_stats_over_batches_equal_numpy_on_the_concatenation():
    rng = np.random.default_rng(0)
    refs = [rng.normal(0, 1, (2, 3, 4, 4)).astype(np.float32) for _ in range(3)]
    tests = [(r + rng.normal(0, 0.1, r.shape)).astype(np.float32) for r in refs]
    steps = np.array([0.5, 1.0, 2.0])
    stats = metrics.OutputStats(steps)
    for r, t in zip(refs, tests):
        stats.add(r, t)
    f = np.concatenate([r.ravel() for r in refs]).astype(np.float64)
    q = np.concatenate([t.ravel() for t in tests]).astype(np.float64)
    assert math.isclose(stats.cosine, f @ q / np.linalg.norm(f) / np.linalg.norm(q), rel_tol=1e-12)
    assert math.isclose(stats.sqnr_db, 10 * np.log10((f @ f) / ((q - f) @ (q - f))), rel_tol=1e-12)
    per_channel = max(float((np.abs(t.astype(np.float64) - r) / steps.reshape(1, 3, 1, 1)).max())
                      for r, t in zip(refs, tests))
    assert stats.max_diff_steps == per_channel, "largest difference must be counted in each channel's step"


def test_exact_and_zero_outputs():
    stats = metrics.OutputStats(np.ones(1))
    stats.add(np.ones((2, 1)), np.ones((2, 1)))
    assert stats.sqnr_db == math.inf and stats.cosine == pytest.approx(1.0)
    zero = metrics.OutputStats(np.ones(1))
    zero.add(np.zeros((2, 1)), np.zeros((2, 1)))
    assert zero.cosine is None, "cosine of a zero vector is undefined, not NaN"
    assert metrics.sqnr_db(0.0, 1.0) == -math.inf


def test_activation_stats_count_what_fake_quantize_clips():
    scale_d, offset_d = np.float32(0.05), -100
    x = np.random.default_rng(1).normal(0, 4, (4, 1000)).astype(np.float32)
    stats = metrics.ActivationStats(float(scale_d), offset_d)
    for part in x:
        stats.add(part)
    fq = numerics.fake_quantize_activation(x, scale_d, offset_d)
    lo, hi = fq.min(), fq.max()  # the grid's ends, as the fake-quant layer outputs them
    assert stats.bounds == (float(lo), float(hi)), f"clip bounds {stats.bounds} vs the grid's ends {lo}, {hi}"
    assert stats.clipped_below == np.mean(x < lo) and stats.clipped_above == np.mean(x > hi)
    assert stats.counts.sum() + stats.outside_edges == x.size, "histogram loses values"
    assert stats.min == x.min() and stats.max == x.max()


def test_weight_channel_stats_read_the_codes_and_grid():
    w = np.random.default_rng(2).normal(0, 1, (3, 2, 3, 3)).astype(np.float32)
    scale_w = numerics.arq_scale(w, 0)
    fake = numerics.arq_fake_quantize(w, scale_w, 0)
    stats = metrics.weight_channel_stats(fake, scale_w, 0)
    codes = numerics.arq_quantize(w, scale_w, 0).reshape(3, -1)
    assert stats["code_min"] == codes.min(axis=1).tolist() and stats["code_max"] == codes.max(axis=1).tolist()
    assert all(max(-lo, hi) in (127, 128) for lo, hi in zip(stats["code_min"], stats["code_max"])), \
        "ARQ puts each channel's largest weight on the grid's end"
    np.testing.assert_allclose(stats["grid_max"], 127 * scale_w.astype(np.float64))


def _synthetic_layer(name, sqnr, weights=True):
    act = metrics.ActivationStats(0.1, -128)
    act.add(np.linspace(-1, 30, 500, dtype=np.float32))
    w = np.random.default_rng(6).normal(0, 1, (3, 4)).astype(np.float32)
    scale_w = numerics.arq_scale(w, 0)
    return {"name": name, "type": "InnerProduct" if weights else "Pooling", "bit_width": 8, "cosine": 0.9,
            "sqnr_db": sqnr, "max_diff_output_steps": 2.0, "shift_bit": [1, 2, 3],
            "activation": {"scale_d": 0.1, "offset_d": -128, "clip_min": act.bounds[0], "clip_max": act.bounds[1],
                           "min": act.min, "max": act.max, "clipped_below": act.clipped_below,
                           "clipped_above": act.clipped_above,
                           "histogram": {"edges": act.edges.tolist(), "counts": act.counts.tolist()}},
            "weights": metrics.weight_channel_stats(numerics.arq_fake_quantize(w, scale_w, 0), scale_w, 0)
            if weights else None}


def test_report_files_hold_exact_layers_as_null_and_layers_without_weights(tmp_path):
    analysis = {"version": 1, "iterations": 1, "models": {"float_model": "<a & b>.prototxt"},
                "layers": [_synthetic_layer("fc<1>", 12.5), _synthetic_layer("pool", math.inf, weights=False)]}
    files = report.write_outputs(analysis, str(tmp_path / "out"))
    data = json.loads(pathlib.Path(files["json"]).read_text())
    assert [layer["sqnr_db"] for layer in data["layers"]] == [12.5, None], "an exact output must be null in JSON"
    page = pathlib.Path(files["html"]).read_text()
    assert page.count('<tr class="layer">') == 2 and "fc&lt;1&gt;" in page and "&lt;a &amp; b&gt;" in page
    assert page.count("data:image/png;base64,") == 1 + 2 + 1, "SQNR bars, 2 histograms, 1 weight plot"
    assert "http" not in page.replace("http-equiv", ""), "the page must not load anything"


# --------------------------------------------------------------------------- on real Caffe models


@pytest.fixture(scope="module")
def analysed(retrained, tmp_path_factory):
    """analyze() on the retrained session model (DummyData: random batches both nets must share)."""
    out = tmp_path_factory.mktemp("analysis")
    model, weights = retrained["tmp"] / "float.prototxt", retrained["tmp"] / "float.caffemodel"
    analysis = amct_retrain.analyze(str(model), str(weights), str(retrained["fake_quant_model"]),
                                    str(retrained["fake_quant_weights"]), 3, str(out / "report"),
                                    log_dir=str(out / "tb"))
    return {**retrained, "analysis": analysis, "out": out / "report", "tb": out / "tb", "model": model,
            "weights": weights}


@pytest.mark.caffe
def test_cosine_sqnr_and_clipping_equal_an_independent_numpy_computation(analysed):
    # DummyData refills every forward: analyze can only match numpy if both nets saw one batch.
    # The independent run replays analyze's 3 batches: the same seed gives the same DummyData draws.
    caffe.set_random_seed(0)
    again = amct_retrain.analyze(str(analysed["model"]), str(analysed["weights"]), str(analysed["fake_quant_model"]),
                                 str(analysed["fake_quant_weights"]), 3, str(analysed["out"].parent / "again"))
    caffe.set_random_seed(0)
    kept = analysis_check.layer_blobs(analysed["model"], analysed["weights"], analysed["fake_quant_model"],
                                      analysed["fake_quant_weights"], analysed["quant_info"], [None] * 3)
    analysis_check.assert_analysis_matches(again, analysis_check.expected_metrics(kept, analysed["fake_quant_model"]),
                                           "retrained DummyData net")


@pytest.mark.caffe
def test_json_holds_every_quantized_layer_with_weights_shift_n_and_bits(analysed):
    data = json.loads((analysed["out"] / "analysis.json").read_text())
    assert [layer["name"] for layer in data["layers"]] == [layer["name"] for layer in analysed["analysis"]["layers"]]
    records = record.read_record(analysed["record"])
    assert {layer["name"] for layer in data["layers"]} == set(nets.QUANTIZED)
    fake = caffe.Net(str(analysed["fake_quant_model"]), caffe.TEST, weights=str(analysed["fake_quant_weights"]))
    for layer in data["layers"]:
        rec, w = records[layer["name"]], layer["weights"]
        assert layer["shift_bit"] == list(rec.shift_bit), f"{layer['name']}: shift-N differs from the record"
        assert layer["bit_width"] == 8
        np.testing.assert_allclose(np.unique(w["scale_w"]), np.unique(np.asarray(rec.scale_w, np.float64)),
                                   rtol=2e-7, err_msg=f"{layer['name']}: scale_w differs from the record")
        weights = fake.params[layer["name"]][0].data
        per_channel = weights.reshape(weights.shape[0], -1)
        assert w["min"] == per_channel.min(axis=1).tolist() and w["max"] == per_channel.max(axis=1).tolist()
        assert all(lo >= -128 and hi <= 127 for lo, hi in zip(w["code_min"], w["code_max"]))
        act = layer["activation"]
        assert act["clip_min"] <= 0 <= act["clip_max"] and act["min"] <= act["max"]


@pytest.mark.caffe
def test_sqnr_and_cosine_reach_tensorboard(analysed):
    scalars = tensorboard.read_scalars(analysed["tb"])
    for layer in analysed["analysis"]["layers"]:
        assert scalars[f"{layer['name']}/sqnr_db"] == [(0, pytest.approx(layer["sqnr_db"], rel=1e-6))]
        assert scalars[f"{layer['name']}/cosine"] == [(0, pytest.approx(layer["cosine"], rel=1e-6))]


@pytest.mark.caffe
def test_console_table_lists_layers_worst_first(analysed, caplog):
    text = report.console_table(analysed["analysis"]["layers"])
    lines = text.splitlines()
    assert len(lines) == 1 + len(nets.QUANTIZED), text
    assert [line.split()[1] for line in lines[1:]] == [layer["name"] for layer in analysed["analysis"]["layers"]]


@pytest.mark.caffe
def test_cli_analyze_feeds_an_input_net_from_npz(tmp_path, analysed, capsys):
    """An Input-layer net: the float and fake-quant models with DummyData swapped for an Input
    layer; the CLI splits the .npz into --iterations batches."""
    files = input_models(tmp_path, analysed)
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "inputs.npz", data=rng.normal(0, 1, (8, 6, 8, 8)).astype(np.float32),
             target=rng.normal(0, 1, (8, 10)).astype(np.float32))
    code = cli.main(["analyze", "--model", files["model"], "--weights", str(analysed["weights"]),
                     "--fake-quant-model", files["fake_model"], "--fake-quant-weights",
                     str(analysed["fake_quant_weights"]), "--output-dir", str(tmp_path / "out"),
                     "--iterations", "2", "--inputs", str(tmp_path / "inputs.npz")])
    assert code == 0, capsys.readouterr().err
    analysis = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert analysis["iterations"] == 2 and len(analysis["layers"]) == len(nets.QUANTIZED)
    code = cli.main(["analyze", "--model", files["model"], "--weights", str(analysed["weights"]),
                     "--fake-quant-model", files["fake_model"], "--fake-quant-weights",
                     str(analysed["fake_quant_weights"]), "--output-dir", str(tmp_path / "out2"),
                     "--iterations", "3", "--inputs", str(tmp_path / "inputs.npz")])
    err = capsys.readouterr().err
    assert code == 2 and "inputs.npz" in err and "'data'" in err, f"uneven split must be an error naming it: {err}"
    assert not (tmp_path / "out2" / "analysis.json").exists()


@pytest.mark.caffe
def test_bad_arguments_are_errors_naming_what_is_wrong(tmp_path, analysed):
    args = [str(analysed["model"]), str(analysed["weights"]), str(analysed["fake_quant_model"]),
            str(analysed["fake_quant_weights"])]
    with pytest.raises(amct_retrain.AnalysisError, match="iterations"):
        amct_retrain.analyze(*args, 0, str(tmp_path / "a"))
    with pytest.raises(amct_retrain.ModelError, match="no quantized layer"):
        amct_retrain.analyze(args[0], args[1], args[0], args[1], 1, str(tmp_path / "b"))
    with pytest.raises(amct_retrain.ModelError, match="missing.caffemodel"):
        amct_retrain.analyze(args[0], str(tmp_path / "missing.caffemodel"), *args[2:], 1, str(tmp_path / "c"))
    with pytest.raises(amct_retrain.AnalysisError, match="'label'.*not an input"):
        amct_retrain.analyze(*args, 1, str(tmp_path / "d"), inputs=[{"label": np.zeros(3)}])
    assert not any((tmp_path / d).exists() and os.listdir(tmp_path / d) for d in "abcd"), "no output on error"


def input_models(tmp_path, analysed) -> dict[str, str]:
    """The float and the fake-quant prototxt of ``analysed`` with their DummyData layer replaced
    by an Input layer (blobs data and target): a deploy-style net the user must feed."""
    shapes = {"data": (4, 6, 8, 8), "target": (4, 10)}
    files = {}
    for key, source in (("model", analysed["model"]), ("fake_model", analysed["fake_quant_model"])):
        net = text_format.Parse(source.read_text() if hasattr(source, "read_text") else open(source).read(),
                                caffe_pb2.NetParameter())
        data = next(layer for layer in net.layer if layer.type == "DummyData")
        data.ClearField("dummy_data_param")
        data.type = "Input"
        for top in data.top:
            data.input_param.shape.add(dim=shapes[top])
        files[key] = str(tmp_path / f"{key}_input.prototxt")
        with open(files[key], "w") as f:
            f.write(text_format.MessageToString(net))
    return files


@pytest.mark.caffe
def test_input_net_fed_by_a_callable_equals_numpy_and_unfed_is_an_error(tmp_path, analysed):
    files = input_models(tmp_path, analysed)
    rng = np.random.default_rng(4)
    batches = [{"data": rng.normal(0, 1, (4, 6, 8, 8)).astype(np.float32),
                "target": rng.normal(0, 1, (4, 10)).astype(np.float32)} for _ in range(2)]
    analysis = amct_retrain.analyze(files["model"], str(analysed["weights"]), files["fake_model"],
                                    str(analysed["fake_quant_weights"]), 2, str(tmp_path / "out"),
                                    inputs=lambda i: batches[i])
    kept = analysis_check.layer_blobs(files["model"], analysed["weights"], files["fake_model"],
                                      analysed["fake_quant_weights"], analysed["quant_info"], batches)
    analysis_check.assert_analysis_matches(analysis, analysis_check.expected_metrics(kept, files["fake_model"]),
                                           "Input net fed by a callable")
    with pytest.raises(amct_retrain.AnalysisError, match="input blob 'data'.*pass inputs="):
        amct_retrain.analyze(files["model"], str(analysed["weights"]), files["fake_model"],
                             str(analysed["fake_quant_weights"]), 1, str(tmp_path / "unfed"))
    with pytest.raises(amct_retrain.AnalysisError, match="2 batches given"):
        amct_retrain.analyze(files["model"], str(analysed["weights"]), files["fake_model"],
                             str(analysed["fake_quant_weights"]), 3, str(tmp_path / "short"), inputs=batches)


# --------------------------------------------------------------------------- the page in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--enable-logging=stderr", "--v=0")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (tools/setup.sh "
                                                             "installs it; run make setup): no browser test")
DECODED_IMAGES = """<script>window.addEventListener("load", () => document.body.setAttribute("data-decoded",
  [...document.images].filter(i => i.complete && i.naturalWidth > 0).length));</script>"""


class _Rows(html.parser.HTMLParser):
    """The layer names of the report's ``tr.layer`` rows, and the body's attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.rows, self.body, self._in_row, self._cell = [], {}, False, 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.body = attrs
        if tag == "tr" and attrs.get("class") == "layer":
            self._in_row, self._cell = True, 0
        if tag == "td" and self._in_row:
            self._cell += 1

    def handle_endtag(self, tag):
        if tag == "tr":
            self._in_row = False

    def handle_data(self, data):
        if self._in_row and self._cell == 2 and data.strip():
            self.rows.append(data.strip())


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"  # a fresh profile every run
    return subprocess.run([CHROMIUM, *BROWSER_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=180)


def _console_messages(run: subprocess.CompletedProcess) -> list[str]:
    """What the page wrote to its console (console.* calls and uncaught errors), from Chrome's log."""
    return [line for line in run.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.caffe
@needs_chromium
def test_report_loads_without_console_errors_one_row_per_layer(analysed, tmp_path):
    page = analysed["out"] / "report.html"
    run = _chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", page.as_uri())
    assert run.returncode == 0, f"chromium failed: {run.stderr[-2000:]}"
    assert _console_messages(run) == [], f"the report logged to the console: {_console_messages(run)}"
    rows = _Rows()
    rows.feed(run.stdout)
    assert rows.rows == [layer["name"] for layer in analysed["analysis"]["layers"]], \
        f"rows of the rendered table {rows.rows}, ranked layers {[la['name'] for la in analysed['analysis']['layers']]}"
    # The console check can fail: a page with an error is caught.
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>console.error('broken'); missing();</script></body></html>")
    assert len(_console_messages(_chromium(tmp_path, "--dump-dom", bad.as_uri()))) == 2, \
        "chromium's log does not show console errors: the check above proves nothing"


@pytest.mark.caffe
@needs_chromium
def test_report_images_decode_and_render(analysed, tmp_path):
    import matplotlib.image

    page = analysed["out"] / "report.html"
    images = 1 + sum(1 + (layer["weights"] is not None) for layer in analysed["analysis"]["layers"])
    probe = tmp_path / "probe.html"  # the report plus a script counting the images the browser decoded
    probe.write_text(page.read_text().replace("</body>", DECODED_IMAGES + "</body>"))
    rows = _Rows()
    rows.feed(_chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()).stdout)
    assert rows.body.get("data-decoded") == str(images), f"decoded {rows.body.get('data-decoded')} of {images} images"
    shot = tmp_path / "shot.png"
    run = _chromium(tmp_path, "--window-size=1000,3000", "--hide-scrollbars", f"--screenshot={shot}", page.as_uri())
    assert run.returncode == 0 and shot.exists(), f"no screenshot: {run.stderr[-2000:]}"
    pixels = (matplotlib.image.imread(shot)[..., :3] * 255).round().astype(int)
    assert pixels.std() > 10, "the screenshot is blank"
    bars = np.all(np.abs(pixels - (31, 119, 180)) <= 3, axis=-1)  # the plots' bar colour, in no CSS of the page
    assert bars.sum() > 5000, f"only {bars.sum()} pixels of the plots' bars: the images did not render"


# --------------------------------------------------------------------------- an LMDB Data model

LMDB_NET = """name: "digits_lmdb"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ scale: 0.0625 mean_value: 4 mirror: true crop_size: 6 }}
  data_param {{ source: "{train_source}" batch_size: 32 backend: LMDB }} }}
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ scale: 0.0625 mean_value: 4 crop_size: 6 }}
  data_param {{ source: "{source}" batch_size: 50 backend: LMDB }} }}
"""
LMDB_INPUT = """name: "digits_lmdb"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 50 dim: 1 dim: 6 dim: 6 } shape { dim: 50 } } }
"""
LMDB_BODY = """layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" batch_norm_param { use_global_stats: true } }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "ip1" type: "InnerProduct" bottom: "conv1" top: "ip1"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }
"""


def _lmdb_model(tmp_path) -> dict:
    """Digits (uint8 8 x 8) in an LMDB read by TRAIN and TEST Data layers with transform_param, a
    Conv + BatchNorm + Scale; weights from fillers (through an Input twin, so that no net of this
    process opens the LMDB), BatchNorm statistics set; calibrated in a child `caffe test`."""
    import lmdb
    from sklearn.datasets import load_digits

    digits = load_digits()
    source = tmp_path / "digits_lmdb"
    env = lmdb.open(str(source), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i, (image, label) in enumerate(zip(digits.images[:100], digits.target[:100])):
            datum = caffe_pb2.Datum(channels=1, height=8, width=8, data=image.astype(np.uint8).tobytes(),
                                    label=int(label))
            txn.put(f"{i:08d}".encode(), datum.SerializeToString())
    env.close()
    model, twin, weights = tmp_path / "float.prototxt", tmp_path / "twin.prototxt", tmp_path / "float.caffemodel"
    # A TRAIN source of its own: the probes of this Caffe build both phases in one process, and its
    # data reader aborts when two nets read one LMDB.
    shutil.copytree(source, tmp_path / "digits_train_lmdb")
    model.write_text(LMDB_NET.format(source=source, train_source=tmp_path / "digits_train_lmdb") + LMDB_BODY)
    twin.write_text(LMDB_INPUT + LMDB_BODY)
    net = caffe.Net(str(twin), caffe.TEST)
    rng = np.random.default_rng(5)
    net.params["bn1"][0].data[...] = rng.normal(0, 0.2, 8)
    net.params["bn1"][1].data[...] = rng.uniform(0.5, 2.0, 8)
    net.params["bn1"][2].data[...] = 1.0
    net.save(str(weights))
    del net
    config, record_file = tmp_path / "calibration.json", tmp_path / "record.txt"
    amct_retrain.create_quant_config(str(config), str(model), str(weights), batch_num=1)
    graph = amct_retrain.init(str(config), str(model), str(weights), str(record_file))
    amct_retrain.quantize_model(graph, str(tmp_path / "calibration.prototxt"), str(tmp_path / "calibration.caffemodel"))
    run = subprocess.run([CAFFE, "test", f"-model={tmp_path / 'calibration.prototxt'}",
                          f"-weights={tmp_path / 'calibration.caffemodel'}", "-iterations=1"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, f"calibration in caffe test failed:\n{run.stderr[-3000:]}"
    amct_retrain.save_model(graph, "Fakequant", str(tmp_path / "result" / "m"))
    return {"model": model, "weights": weights, **output_files(str(tmp_path / "result" / "m"))}


@pytest.mark.caffe
def test_lmdb_data_model_with_folded_batchnorm_equals_numpy(tmp_path):
    """The float net reads the LMDB (transform_param applied); the fake-quant net gets its
    batches: one LMDB reader in the process. conv1's float output is the one after scale1."""
    files = _lmdb_model(tmp_path)
    analysis = amct_retrain.analyze(str(files["model"]), str(files["weights"]), files["fake_quant_model"],
                                    files["fake_quant_weights"], 2, str(tmp_path / "analysis"))
    assert json.loads(pathlib.Path(files["quant_info"]).read_text())["fused_layers"]["conv1"]["removed"] == \
        ["bn1", "scale1"], "the test needs conv1 folded with bn1 and scale1"
    # The independent run: the fake-quant model with its Data layer made an Input (one LMDB reader).
    fake = text_format.Parse(pathlib.Path(files["fake_quant_model"]).read_text(), caffe_pb2.NetParameter())
    fed = text_format.Parse(LMDB_INPUT, caffe_pb2.NetParameter())
    fed.layer.extend(layer for layer in fake.layer if layer.type != "Data")
    (tmp_path / "fed.prototxt").write_text(text_format.MessageToString(fed))
    kept = analysis_check.layer_blobs(files["model"], files["weights"], tmp_path / "fed.prototxt",
                                      files["fake_quant_weights"], files["quant_info"], [None, None])
    analysis_check.assert_analysis_matches(analysis, analysis_check.expected_metrics(kept, files["fake_quant_model"]),
                                           "LMDB Data model")
    conv1 = next(layer for layer in analysis["layers"] if layer["name"] == "conv1")
    assert conv1["cosine"] > 0.99, f"calibrated conv1 (BatchNorm folded) far from float: {conv1['cosine']}"
