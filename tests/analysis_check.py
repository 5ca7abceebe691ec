"""An independent computation of what analyze() reports, for the tests: both models run with
pycaffe's named forward(start, end) on the same batches, every blob kept, metrics in plain numpy.

It reads the saver's quant info file (``<save_path>_quant.json``) for the quantized layers and the
BatchNorm / Scale layers folded into them, where analyze() reads the fake-quant prototxt only.
"""
import json
import math
import pathlib

import caffe
import numpy as np
from caffe.proto import caffe_pb2
from google.protobuf import text_format


def _layer_params(model_file) -> dict[str, dict]:
    net = text_format.Parse(pathlib.Path(model_file).read_text(), caffe_pb2.NetParameter())
    return {layer.name: json.loads(layer.python_param.param_str) for layer in net.layer if layer.type == "Python"}


def layer_blobs(float_model, float_weights, fake_model, fake_weights, quant_info_file, batches):
    """Per quantized layer: {"float": float outputs, "fake": fake-quant outputs, "input": the
    fake-quant net's input to it}, each a list over ``batches`` (a list of {blob: array} to feed
    the float net's inputs, or of None for nets reading their own data layers)."""
    info = json.loads(pathlib.Path(quant_info_file).read_text())
    quantized, fused = info["quantized_layers"], info["fused_layers"]
    ref = caffe.Net(str(float_model), caffe.TEST, weights=str(float_weights))
    fake = caffe.Net(str(fake_model), caffe.TEST, weights=str(fake_weights))
    ref_names, fake_names = list(ref._layer_names), list(fake._layer_names)
    # The float output: after the layer, or after the last BatchNorm/Scale folded into it.
    stops = {}
    for name in quantized:
        after = [ref_names.index(r) for r in (fused.get(name) or {}).get("removed", [])]
        stops[name] = max([ref_names.index(name), *after])
    sources = [top for layer in ref_names if not ref.bottom_names[layer] for top in ref.top_names[layer]]
    sources += list(ref.inputs)
    first = next(i for i, layer in enumerate(fake_names) if fake.bottom_names[layer])
    kept = {name: {"float": [], "fake": [], "input": []} for name in quantized}
    for batch in batches:
        for blob, value in (batch or {}).items():
            ref.blobs[blob].reshape(*value.shape)
            ref.blobs[blob].data[...] = value
        start = 0
        for name in sorted(quantized, key=stops.get):
            ref.forward(start=ref_names[start], end=ref_names[stops[name]])
            kept[name]["float"].append(ref.blobs[ref.top_names[ref_names[stops[name]]][0]].data.copy())
            start = stops[name] + 1
        for blob in sources:
            fake.blobs[blob].reshape(*ref.blobs[blob].data.shape)
            fake.blobs[blob].data[...] = ref.blobs[blob].data
        start = first
        for name in sorted(quantized, key=lambda n: fake_names.index(quantized[n]["fake_quant"])):
            fq, rq = fake_names.index(quantized[name]["fake_quant"]), fake_names.index(quantized[name]["requantize"])
            if fq > start:
                fake.forward(start=fake_names[start], end=fake_names[fq - 1])
            kept[name]["input"].append(fake.blobs[fake.bottom_names[fake_names[fq]][0]].data.copy())
            fake.forward(start=fake_names[fq], end=fake_names[rq])
            kept[name]["fake"].append(fake.blobs[quantized[name]["output_blob"]].data.copy())
            start = rq + 1
    return kept


def expected_metrics(kept: dict, fake_model) -> dict[str, dict]:
    """Per layer: cosine, SQNR (dB), the largest |fake - float| in output steps and the shares
    clipped below / above, from the kept blobs with plain numpy."""
    params = _layer_params(fake_model)
    out = {}
    for name, blobs in kept.items():
        f = np.concatenate([b.ravel() for b in blobs["float"]]).astype(np.float64)
        q = np.concatenate([b.ravel() for b in blobs["fake"]]).astype(np.float64)
        x = np.concatenate([b.ravel() for b in blobs["input"]])
        fq, rq = params[f"{name}_fake_quant"], params[f"{name}_requantize"]
        s, o = np.float32(fq["scale_d"]), fq["offset_d"]
        lo, hi = np.float32(-128 - o) * s, np.float32(127 - o) * s
        steps = np.asarray(rq["deq"], np.float64) * 2.0 ** np.asarray(rq["shift_bit"], np.float64)
        diff = max(float((np.abs(qb.astype(np.float64) - fb) /
                          np.broadcast_to(steps, (fb.shape[1],)).reshape((1, -1) + (1,) * (fb.ndim - 2))).max())
                   for fb, qb in zip(blobs["float"], blobs["fake"]))
        err = float(np.sum((q - f) ** 2))
        out[name] = {"cosine": float(f @ q / (np.linalg.norm(f) * np.linalg.norm(q))),
                     "sqnr_db": math.inf if err == 0 else 10 * math.log10(float(f @ f) / err),
                     "max_diff_output_steps": diff,
                     "clipped_below": float(np.mean(x < lo)), "clipped_above": float(np.mean(x > hi)),
                     "min": float(x.min()), "max": float(x.max())}
    return out


def assert_analysis_matches(analysis: dict, expected: dict[str, dict], what: str) -> None:
    """analyze()'s per-layer numbers equal the independent ones (float64 sums in another order)."""
    layers = {layer["name"]: layer for layer in analysis["layers"]}
    assert set(layers) == set(expected), f"{what}: analysed layers {sorted(layers)}, quantized {sorted(expected)}"
    for name, e in expected.items():
        got = layers[name]
        assert math.isclose(got["cosine"], e["cosine"], rel_tol=1e-9), \
            f"{what}: layer {name}: cosine {got['cosine']!r}, numpy says {e['cosine']!r}"
        sqnr = math.inf if got["sqnr_db"] is None else got["sqnr_db"]  # JSON: null for exact
        assert sqnr == e["sqnr_db"] or math.isclose(sqnr, e["sqnr_db"], rel_tol=1e-9, abs_tol=1e-9), \
            f"{what}: layer {name}: SQNR {sqnr!r} dB, numpy says {e['sqnr_db']!r}"
        diff, want = got["max_diff_output_steps"], e["max_diff_output_steps"]
        assert math.isclose(diff, want, rel_tol=1e-9), f"{what}: layer {name}: max diff {diff} steps, numpy says {want}"
        act = got["activation"]
        for key in ("clipped_below", "clipped_above", "min", "max"):
            assert math.isclose(act[key], e[key], rel_tol=1e-12, abs_tol=1e-15), \
                f"{what}: layer {name}: activation {key} {act[key]!r}, numpy says {e[key]!r}"
    sqnrs = [math.inf if layer["sqnr_db"] is None else layer["sqnr_db"] for layer in analysis["layers"]]
    assert sqnrs == sorted(sqnrs), f"{what}: layers not ranked worst (lowest SQNR) first: {sqnrs}"
