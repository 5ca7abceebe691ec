"""Tests for amct_retrain.record (scale/offset record file, contract section 2)."""

import multiprocessing as mp
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from google.protobuf import text_format

from amct_retrain import record
from amct_retrain.record import (
    RecordFileError,
    SingleLayerRecord,
    create_empty_record,
    layer_record_complete,
    read_record,
    update_layer_record,
    write_record,
)

CONTRACT_EXAMPLE = """\
record { key: "conv1" value { scale_d: 0.0123 offset_d: -128
         scale_w: 0.0041 scale_w: 0.0038  offset_w: 0 offset_w: 0
         shift_bit: 3 shift_bit: 4  channels: 3 height: 224 width: 224 } }
"""


def f32_bits(values):
    return np.asarray(values, dtype=np.float32).view(np.uint32).tolist()


def test_parses_contract_example(tmp_path):
    p = tmp_path / "record.txt"
    p.write_text(CONTRACT_EXAMPLE)
    recs = read_record(p)
    assert list(recs) == ["conv1"], f"expected only conv1, got {list(recs)}"
    r = recs["conv1"]
    assert r.scale_d == np.float32(0.0123), f"scale_d {r.scale_d!r} != float32(0.0123)"
    assert r.offset_d == -128, f"offset_d {r.offset_d}"
    assert f32_bits(r.scale_w) == f32_bits([0.0041, 0.0038]), f"scale_w {list(r.scale_w)}"
    assert list(r.offset_w) == [0, 0], f"offset_w {list(r.offset_w)}"
    assert list(r.shift_bit) == [3, 4], f"shift_bit {list(r.shift_bit)}"
    assert (r.channels, r.height, r.width) == (3, 224, 224), f"chw {(r.channels, r.height, r.width)}"
    assert not r.HasField("skip_fusion"), "skip_fusion is absent in the example but reported present"
    assert layer_record_complete(r), "the contract example should be a complete layer record"


def test_written_text_style_and_sorted_keys(tmp_path):
    p = tmp_path / "record.txt"
    for name in ["pool1", "conv1", "fc"]:
        update_layer_record(p, name, scale_w=[0.5, 0.25])
    text = p.read_text()
    positions = [text.index(f'key: "{k}"') for k in ["conv1", "fc", "pool1"]]
    assert positions == sorted(positions), f"keys not written in sorted order:\n{text}"
    assert "scale_w: 0.5\n" in text and "scale_w: 0.25\n" in text, f"repeated fields not written unpacked:\n{text}"


def test_float32_third_round_trips_bit_exact(tmp_path):
    p = tmp_path / "record.txt"
    v = np.float32(1 / 3) * np.float32(0.01)
    update_layer_record(p, "conv1", scale_d=v, scale_w=[v, np.nextafter(v, np.float32(1))])
    r = read_record(p)["conv1"]
    assert f32_bits([r.scale_d]) == f32_bits([v]), f"scale_d {r.scale_d!r} is not bit-identical to {v!r}"
    assert f32_bits(r.scale_w) == f32_bits([v, np.nextafter(v, np.float32(1))]), (
        f"scale_w {list(r.scale_w)} not bit-identical to the written float32 values"
    )


f32 = st.floats(width=32, allow_nan=False, allow_infinity=True)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scale_d=f32, scale_w=st.lists(f32, min_size=0, max_size=16))
def test_float32_round_trip_property(tmp_path, scale_d, scale_w):
    p = tmp_path / "record.txt"
    rec = SingleLayerRecord(scale_d=scale_d)
    rec.scale_w.extend(scale_w)
    write_record(p, {"layer": rec})
    back = read_record(p)["layer"]
    assert f32_bits([back.scale_d]) == f32_bits([scale_d]), f"scale_d {scale_d!r} came back as {back.scale_d!r}"
    assert f32_bits(back.scale_w) == f32_bits(scale_w), f"scale_w {scale_w!r} came back as {list(back.scale_w)!r}"


def test_update_keeps_other_layers_and_replaces_repeated(tmp_path):
    p = tmp_path / "record.txt"
    update_layer_record(p, "conv1", scale_d=0.5, offset_d=-3, scale_w=[1.0, 2.0], offset_w=[0, 0], shift_bit=[1, 2])
    update_layer_record(p, "conv2", scale_d=0.25)
    update_layer_record(p, "conv1", shift_bit=[7])
    recs = read_record(p)
    assert set(recs) == {"conv1", "conv2"}, f"layers after updates: {set(recs)}"
    c1 = recs["conv1"]
    assert list(c1.shift_bit) == [7], f"shift_bit should be replaced, not appended: {list(c1.shift_bit)}"
    assert (c1.scale_d, c1.offset_d, list(c1.scale_w)) == (0.5, -3, [1.0, 2.0]), f"conv1 lost fields: {c1}"
    assert recs["conv2"].scale_d == 0.25, f"conv2 changed: {recs['conv2']}"


def test_update_accepts_numpy_and_none_clears(tmp_path):
    p = tmp_path / "record.txt"
    update_layer_record(
        p, "conv1",
        scale_d=np.float32(0.1), offset_d=np.int32(-128),
        scale_w=np.array([0.1, 0.2], np.float32), offset_w=np.zeros(2, np.int8),
        shift_bit=np.array([3, 4], np.uint8), channels=np.int64(3), height=224, width=224,
        skip_fusion=np.bool_(True),
    )
    r = read_record(p)["conv1"]
    assert layer_record_complete(r), f"numpy inputs did not give a complete record: {r}"
    assert r.skip_fusion is True and r.channels == 3, f"numpy scalars stored wrongly: {r}"
    update_layer_record(p, "conv1", shift_bit=None, skip_fusion=None)
    r = read_record(p)["conv1"]
    assert len(r.shift_bit) == 0 and not r.HasField("skip_fusion"), f"None did not clear the fields: {r}"


def test_shift_bit_presence(tmp_path):
    p = tmp_path / "record.txt"
    update_layer_record(p, "conv1", scale_d=0.5, offset_d=0, scale_w=[1.0], offset_w=[0])
    r = read_record(p)["conv1"]
    assert len(r.shift_bit) == 0, f"unsearched shift_bit should be empty, got {list(r.shift_bit)}"
    assert not layer_record_complete(r), "record without shift_bit reported complete"
    assert not r.HasField("channels"), "channels never set but reported present"
    update_layer_record(p, "conv1", shift_bit=[0], channels=0)
    r = read_record(p)["conv1"]
    assert list(r.shift_bit) == [0], f"shift_bit 0 not kept distinct from unset: {list(r.shift_bit)}"
    assert r.HasField("channels"), "channels=0 written but read back as absent"
    assert layer_record_complete(r), f"record with shift_bit [0] should be complete: {r}"


def test_layer_record_complete_lengths():
    r = SingleLayerRecord(scale_d=1.0, offset_d=0)
    r.scale_w.extend([1.0, 2.0])
    r.offset_w.extend([0, 0])
    r.shift_bit.extend([1])
    assert not layer_record_complete(r), "mismatched shift_bit length reported complete"
    r.shift_bit.append(2)
    assert layer_record_complete(r), "consistent record reported incomplete"
    r.ClearField("offset_d")
    assert not layer_record_complete(r), "record without offset_d reported complete"


def test_per_tensor_record_has_one_scale_and_a_shift_per_channel():
    r = SingleLayerRecord(scale_d=1.0, offset_d=0, scale_w=[0.5], offset_w=[0], shift_bit=[1, 2, 3])
    assert layer_record_complete(r), "per-tensor scale_w with per-channel shift_bit reported incomplete"
    r.offset_w.append(0)
    assert not layer_record_complete(r), "offset_w longer than scale_w reported complete"


def _worker(path, worker_id, n_updates, barrier):
    barrier.wait()  # start together to maximise interleaving
    for i in range(n_updates):
        update_layer_record(path, f"w{worker_id}_l{i}", scale_d=float(worker_id) + i / 100, shift_bit=[i])


def test_concurrent_updates_lose_nothing(tmp_path):
    p = str(tmp_path / "record.txt")
    create_empty_record(p)
    n_procs, n_updates = 4, 10
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(n_procs)
    procs = [ctx.Process(target=_worker, args=(p, w, n_updates, barrier)) for w in range(n_procs)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert all(proc.exitcode == 0 for proc in procs), f"worker exit codes {[proc.exitcode for proc in procs]}"
    recs = read_record(p)
    expected = {f"w{w}_l{i}" for w in range(n_procs) for i in range(n_updates)}
    assert set(recs) == expected, f"lost layers: {sorted(expected - set(recs))}"
    for w in range(n_procs):
        for i in range(n_updates):
            r = recs[f"w{w}_l{i}"]
            assert list(r.shift_bit) == [i], f"w{w}_l{i} has shift_bit {list(r.shift_bit)}"
    stray = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert not stray, f"temp files left behind: {stray}"


def test_parse_error_names_file_and_line(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_text('record {\n  key: "conv1"\n  garbage here\n}\n')
    with pytest.raises(RecordFileError) as ei:
        read_record(p)
    msg = str(ei.value)
    assert f"{p}:3:" in msg, f"parse error should read '{p}:3:COL: ...', got: {msg}"


def test_a_value_outside_a_record_entry_is_a_parse_error(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_text("{ { scale_d: 1 } }\n")  # the fast parser once read it as an entry's value: AttributeError
    with pytest.raises(RecordFileError) as ei:
        read_record(p)
    assert f"{p}:1:" in str(ei.value), f"parse error should name {p}:1:COL, got: {ei.value}"


def test_missing_file_and_duplicate_keys_and_empty(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(RecordFileError, match="nope.txt"):
        read_record(missing)

    dup = tmp_path / "dup.txt"
    dup.write_text('record { key: "conv1" }\nrecord { key: "conv1" value { scale_d: 1 } }\n')
    with pytest.raises(RecordFileError) as ei:
        read_record(dup)
    assert "conv1" in str(ei.value) and "dup.txt" in str(ei.value), f"duplicate-key error: {ei.value}"

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert read_record(empty) == {}, "an empty file should be an empty record"

    create_empty_record(empty)
    assert read_record(empty) == {}, "create_empty_record should give an empty record"


def test_unknown_or_bad_field_leaves_file_untouched(tmp_path):
    p = tmp_path / "record.txt"
    update_layer_record(p, "conv1", scale_d=0.5)
    before = p.read_bytes()
    with pytest.raises(TypeError, match="scael_d"):
        update_layer_record(p, "conv1", scael_d=1.0)
    with pytest.raises(TypeError, match="offset_w"):
        update_layer_record(p, "conv1", offset_w=[0.5])  # float for an int field
    with pytest.raises(ValueError, match="shift_bit"):
        update_layer_record(p, "conv1", shift_bit=[-1])  # uint32 out of range
    with pytest.raises(TypeError):
        write_record(p, {"conv1": {"scale_d": 1.0}})  # not a SingleLayerRecord
    assert p.read_bytes() == before, "a rejected update modified the record file"


def test_failed_replace_keeps_old_content_and_no_temp_files(tmp_path, monkeypatch):
    p = tmp_path / "record.txt"
    update_layer_record(p, "conv1", scale_d=0.5)
    before = p.read_bytes()
    listing = sorted(os.listdir(tmp_path))

    def boom(*args, **kwargs):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(record.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        update_layer_record(p, "conv2", scale_d=0.25)
    with pytest.raises(OSError, match="simulated"):
        create_empty_record(p)
    assert p.read_bytes() == before, "failed write changed the record file"
    assert sorted(os.listdir(tmp_path)) == listing, f"stray files after failed write: {os.listdir(tmp_path)}"


def test_plain_parser_agrees_with_text_format_on_written_records():
    """The fast path must read exactly what text_format reads, for every file write_record makes."""
    rng = np.random.default_rng(5)
    records = {f"layer{i}": SingleLayerRecord(
        scale_d=float(np.float32(rng.uniform(1e-4, 1))), offset_d=int(rng.integers(-128, 128)),
        scale_w=[float(v) for v in rng.uniform(1e-5, 1e-2, 7).astype(np.float32)], offset_w=[0] * 7,
        shift_bit=[int(v) for v in rng.integers(1, 17, 7)], channels=3, skip_fusion=bool(i % 2))
        for i in range(5)}
    text = record.format_record(records)
    fast = record._parse_plain(text)
    assert fast is not None, "the plain parser gave up on a file write_record wrote"
    slow = record.ScaleOffsetRecord()
    text_format.Parse(text, slow)
    assert fast == slow, "the plain parser reads a record differently from text_format"
    assert record._parse_plain(text.replace("scale_d", "# a comment\n  scale_d", 1)) is None, \
        "a file with a comment must go to text_format"


def test_deferred_writes_give_the_file_of_the_updates_one_by_one(tmp_path):
    one_by_one, deferred_file = tmp_path / "a.txt", tmp_path / "b.txt"
    updates = [("conv1", {"scale_d": 0.5, "offset_d": 3}), ("fc", {"shift_bit": [3, 4]}),
               ("conv1", {"scale_w": [0.25, 0.125], "offset_d": None}), ("a", {"skip_fusion": True})]
    for path in (one_by_one, deferred_file):
        record.update_layer_record(path, "kept", scale_d=2.0)
    for layer, fields in updates:
        record.update_layer_record(one_by_one, layer, **fields)
    deferred = record.deferred_writes(deferred_file)
    first, last = deferred.join(), deferred.join()
    for layer, fields in updates:
        deferred.update(layer, **fields)
    assert deferred.layer("conv1").scale_w == [0.25, 0.125] and not deferred.layer("conv1").HasField("offset_d")
    assert deferred.layer("kept").scale_d == 2.0 and deferred.layer("nothing") is None
    with deferred.forward_pass(first):
        pass
    assert set(record.read_record(one_by_one)) > set(_read_file_layers(deferred_file)), \
        "a writer other than the last one wrote the pending updates"
    with deferred.forward_pass(last):
        pass
    assert deferred_file.read_bytes() == one_by_one.read_bytes()


def test_a_pass_that_raises_leaves_the_record_as_it_was(tmp_path):
    path = tmp_path / "r.txt"
    record.update_layer_record(path, "conv1", scale_d=2.0)
    before = path.read_bytes()
    deferred = record.deferred_writes(path)
    first, last = deferred.join(), deferred.join()
    with deferred.forward_pass(first):
        deferred.update("conv1", scale_d=0.5)
    with pytest.raises(RuntimeError), deferred.forward_pass(last):
        deferred.update("fc", shift_bit=[3])
        raise RuntimeError("a layer failed in the pass")
    deferred.flush()  # what process exit would write
    assert path.read_bytes() == before, "a failed pass wrote part of its updates"


def test_deferred_writes_are_checked_at_once_and_flushed_by_a_read(tmp_path):
    path = tmp_path / "r.txt"
    deferred = record.deferred_writes(path)
    with pytest.raises(TypeError, match="unknown record field 'scale'"):
        deferred.update("conv1", scale=1.0)
    deferred.update("conv1", scale_d=0.5)
    assert not path.exists()
    assert record.read_record(path)["conv1"].scale_d == 0.5, "read_record did not write the pending update"


def _read_file_layers(path) -> set[str]:
    text = path.read_text()
    return {line.split('"')[1] for line in text.splitlines() if line.strip().startswith("key:")}
