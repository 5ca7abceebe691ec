"""Fuzzing the readers with hypothesis: any exception but the project's named errors, a crash or a
hang (an example over HANG_S seconds) fails.

The readers: prototxt (the project's model reader), caffemodel, record file, retrain and
calibration config JSON, and the YAML / ``.cfg`` simplified configs (through the config
generators). Inputs are valid files mutated (bytes flipped, inserted, deleted, lines swapped) or
generated from the formats' own keys. Each reader runs a few seconds in the default run and for
minutes under ``pytest -m fuzz`` (``make fuzz``).
"""
import contextlib
import json
import math
import signal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amct_retrain
from amct_retrain import config as cfg
from amct_retrain import record
from amct_retrain.errors import AmctError
from amct_retrain.graph import model_io
from tests import nets

HANG_S = 20
BUDGETS = [pytest.param(40, id="quick"), pytest.param(3000, id="long", marks=pytest.mark.fuzz)]


@contextlib.contextmanager
def no_hang(what: str):
    def alarm(signum, frame):
        raise TimeoutError(f"{what}: no answer after {HANG_S} s (a hang)")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(HANG_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def fuzz(examples: int, strategy, check) -> None:
    """Run ``check(example)`` on ``examples`` examples of ``strategy``; AmctError is the one
    exception allowed."""
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(strategy)
    def run(example):
        with no_hang(repr(example)[:200]):
            try:
                check(example)
            except AmctError:
                pass
    run()


def mutations(valid: bytes, max_edits: int = 6):
    """``valid`` with a few random edits: bytes replaced, inserted, deleted; a truncation; a
    chunk repeated."""
    edit = st.tuples(st.sampled_from(["replace", "insert", "delete", "truncate", "repeat"]),
                     st.integers(0, max(len(valid) - 1, 0)), st.binary(min_size=1, max_size=8))

    def apply(edits):
        data = bytearray(valid)
        for kind, at, chunk in edits:
            at = min(at, len(data))
            if kind == "replace":
                data[at:at + len(chunk)] = chunk
            elif kind == "insert":
                data[at:at] = chunk
            elif kind == "delete":
                del data[at:at + len(chunk) * 4]
            elif kind == "truncate":
                del data[at:]
            else:
                data[at:at] = data[at:at + 40] * (1 + chunk[0] % 4)
        return bytes(data)
    return st.lists(edit, min_size=1, max_size=max_edits).map(apply)


def text_mutations(valid: str, words: list[str]):
    """``valid`` with tokens of its own format swapped in, lines dropped or duplicated, and bytes mutated."""
    lines = valid.splitlines(keepends=True)
    token_edit = st.tuples(st.integers(0, len(valid)), st.sampled_from(words))
    by_tokens = st.lists(token_edit, min_size=1, max_size=4).map(
        lambda edits: _insert_all(valid, edits))
    by_lines = st.lists(st.integers(0, len(lines) - 1), min_size=1, max_size=4).map(
        lambda drop: "".join(line for i, line in enumerate(lines) if i not in drop))
    return st.one_of(by_tokens, by_lines, mutations(valid.encode()), st.text(max_size=300), st.binary(max_size=300))


def _insert_all(text: str, edits) -> str:
    for at, word in sorted(edits, reverse=True):
        text = text[:at] + word + text[at:]
    return text


def _write(path, data) -> str:
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8", errors="surrogateescape")
    else:
        path.write_bytes(data)
    return str(path)


PROTOTXT_WORDS = ['layer {', '}', '{', 'name: "x"', 'type: "Convolution"', 'bottom: "data"', 'top: "conv1"',
                  "num_output: -1", "kernel_size: 99999999999", 'include { phase: TEST }', "layers {",
                  "type: CONVOLUTION", '"', "\\", "#", ":", "input: \"data\"", "nan", "1e999", "\x00"]


@pytest.mark.parametrize("examples", BUDGETS)
def test_prototxt_reader(tmp_path, examples):
    path = tmp_path / "m.prototxt"

    def check(data):
        net = model_io.read_prototxt(_write(path, data))
        assert len(net.layer) > 0, "read_prototxt returned a net without layers"

    fuzz(examples, text_mutations(nets.FLOAT_NET % {"fc": 10}, PROTOTXT_WORDS), check)


@pytest.mark.caffe
@pytest.mark.parametrize("examples", BUDGETS)
def test_caffemodel_reader(tmp_path, examples):
    model, weights = nets.float_model(tmp_path)
    valid = weights.read_bytes()
    path = tmp_path / "fuzzed.caffemodel"

    def check(data):
        params = model_io.read_caffemodel(_write(path, data))
        for name in params:  # converting every blob is part of reading
            for array in params[name]:
                assert array.dtype.kind == "f", f"layer {name}: a {array.dtype} blob"
        probed = model_io.probe_net(model_io.read_prototxt(model), str(model))
        model_io.check_weights_match(model, path, probed.params, params)

    fuzz(examples, st.one_of(mutations(valid), st.binary(max_size=500)), check)


RECORD_TEXT = """record {
  key: "conv1"
  value { scale_d: 0.0123 offset_d: -128 scale_w: 0.0041 scale_w: 0.0038 offset_w: 0 offset_w: 0
          shift_bit: 3 shift_bit: 4 channels: 3 height: 224 width: 224 }
}
record { key: "fc" value { skip_fusion: true } }
"""
RECORD_WORDS = ["record {", "key:", '"conv1"', "value {", "}", "scale_d: nan", "offset_d: 99999999999",
                "shift_bit: -1", "scale_w: 1e99", "skip_fusion: maybe", "# c", '"\\x"', "channels: 4294967296"]


@pytest.mark.parametrize("examples", BUDGETS)
def test_record_reader(tmp_path, examples):
    path = tmp_path / "record.txt"

    def check(data):
        records = record.read_record(_write(path, data))
        record.format_record(records)  # what was read can be written back

    fuzz(examples, text_mutations(RECORD_TEXT, RECORD_WORDS), check)


def json_values():
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-10, 10),
                       st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                       st.sampled_from(["ulq_quantize", "arq_retrain", "ifmr", "arq_quantize", "conv1", "fc"]))
    return st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=12)


def config_mutations(valid: dict):
    """``valid`` (a config dict) with leaves or whole entries replaced by random JSON, keys dropped or
    added; as JSON text, or raw text mutations of that text."""
    paths = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + (k,))
    walk(valid, ())

    def apply(edits):
        data = json.loads(json.dumps(valid))
        for path, value, drop in edits:
            parent = data
            for key in path[:-1]:
                parent = parent.get(key) if isinstance(parent, dict) else None
            if not isinstance(parent, dict) or not path:
                continue
            if drop:
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = value
        return json.dumps(data, allow_nan=True)
    structured = st.lists(st.tuples(st.sampled_from(paths), json_values(), st.booleans()), min_size=1,
                          max_size=3).map(apply)
    return st.one_of(structured, mutations(json.dumps(valid).encode()))


@pytest.fixture(scope="module")
def float_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz_model")
    (tmp / "float.prototxt").write_text(nets.FLOAT_NET % {"fc": 10})
    (tmp / "float.caffemodel").write_bytes(b"")  # the generators check it exists; they do not read it
    return tmp / "float.prototxt", tmp / "float.caffemodel"


@pytest.mark.caffe  # the generators that write the valid configs ask Caffe about the net
@pytest.mark.parametrize("examples", BUDGETS)
@pytest.mark.parametrize("kind", ["retrain", "calibration"])
def test_config_json_readers(tmp_path, float_files, kind, examples):
    model, weights = float_files
    out, path = tmp_path / "valid.json", tmp_path / "config.json"
    create = amct_retrain.create_quant_retrain_config if kind == "retrain" else amct_retrain.create_quant_config
    create(str(out), str(model), str(weights))
    net = model_io.read_prototxt(model)
    load = cfg.load_retrain_config if kind == "retrain" else cfg.load_calibration_config

    def check(data):
        parsed = load(_write(path, data), net)
        for layer in parsed.layers.values():  # what loads is usable: finite numbers
            numbers = [getattr(layer, f) for f in ("clip_min", "clip_max") if getattr(layer, f, None) is not None]
            if hasattr(layer, "ifmr"):
                numbers += list(vars(layer.ifmr).values())
            assert all(math.isfinite(v) for v in numbers), f"non-finite setting loaded: {layer}"

    fuzz(examples, config_mutations(json.loads(out.read_text())), check)


SIMPLIFIED_YAML = {
    "retrain": {"batch_num": 2, "skip_layers": ["conv2"], "skip_layer_types": ["InnerProduct"],
                "retrain_data_quant_config": {"ulq_quantize": {"clip_max_min": {"clip_max": 3.0, "clip_min": -1.0},
                                                               "fixed_min": True}},
                "retrain_weight_quant_config": {"arq_retrain": {"channel_wise": True}},
                "override_layer_types": [{"layer_type": "Convolution",
                                          "retrain_weight_quant_config": {"arq_retrain": {"channel_wise": False}}}],
                "override_layer_configs": [{"layer_name": "conv1", "retrain_data_quant_config": {
                    "ulq_quantize": {"fixed_min": False}}}]},
    "calibration": {"batch_num": 2, "activation_offset": False, "skip_layers": ["conv2"],
                    "common_config": {"ifmr_quantize": {"search_range_start": 0.8, "search_range_end": 1.2,
                                                        "search_step": 0.05, "max_percentile": 0.999,
                                                        "min_percentile": 0.999},
                                      "arq_quantize": {"channel_wise": True}},
                    "override_layer_configs": [{"layer_name": "fc", "calibration_config": {
                        "arq_quantize": {"channel_wise": False}}}]},
}


def _cfg_text(data, indent="") -> str:
    """A simplified config dict as protobuf text (.cfg)."""
    out = []
    for key, value in data.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                out.append(f"{indent}{key} {{\n{_cfg_text(item, indent + '  ')}{indent}}}\n")
            else:
                text = json.dumps(item) if isinstance(item, str) else str(item).lower() if isinstance(item, bool) \
                    else repr(item)
                out.append(f"{indent}{key}: {text}\n")
    return "".join(out)


@pytest.mark.caffe
@pytest.mark.parametrize("examples", BUDGETS)
@pytest.mark.parametrize("kind", ["retrain", "calibration"])
@pytest.mark.parametrize("ext", [".yaml", ".cfg"])
def test_simplified_config_readers(tmp_path, float_files, kind, ext, examples):
    model, weights = float_files
    valid = SIMPLIFIED_YAML[kind]
    text = yaml.safe_dump(valid) if ext == ".yaml" else _cfg_text(valid)
    path, out = tmp_path / f"simplified{ext}", tmp_path / "out.json"
    create = amct_retrain.create_quant_retrain_config if kind == "retrain" else amct_retrain.create_quant_config
    if kind == "retrain":
        create(str(out), str(model), str(weights), str(_write(path, text)))
    else:
        create(str(out), str(model), str(weights), config_defination=str(_write(path, text)))

    def check(data):
        if isinstance(data, dict):
            data = yaml.safe_dump(data) if ext == ".yaml" else _cfg_text(data)
        _write(path, data)
        if kind == "retrain":
            create(str(out), str(model), str(weights), str(path))
        else:
            create(str(out), str(model), str(weights), config_defination=str(path))

    words = sorted({k for d in (valid,) for k in _keys(d)}) + ["{", "}", ":", "-", "[", "]", "nan", "1e999", "&a", "*a"]
    structured = st.builds(lambda edits: _edited(valid, edits),
                           st.lists(st.tuples(st.sampled_from(sorted(_keys(valid))), json_values()), max_size=3))
    fuzz(examples, st.one_of(structured, text_mutations(text, words)), check)


def _keys(data) -> set[str]:
    keys = set()
    for key, value in data.items():
        keys.add(key)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                keys |= _keys(item)
    return keys


def _edited(data, edits):
    """``data`` with each (key, value) of ``edits`` set wherever the key occurs first."""
    data = json.loads(json.dumps(data))
    for key, value in edits:
        stack = [data]
        while stack:
            node = stack.pop()
            if key in node:
                node[key] = value
                break
            for v in node.values():
                stack.extend(i for i in (v if isinstance(v, list) else [v]) if isinstance(i, dict))
    return data
