"""Scale/offset record file (``scale_offset_record_file``), protobuf text format.

The file maps Caffe layer names to their quantization parameters (contract
section 2)::

    record { key: "conv1" value { scale_d: 0.0123 offset_d: -128
             scale_w: 0.0041 scale_w: 0.0038  offset_w: 0 offset_w: 0
             shift_bit: 3 shift_bit: 4  channels: 3 height: 224 width: 224 } }

The schema is built at import time from a ``FileDescriptorProto`` so the repo
needs neither protoc nor a generated ``_pb2`` file.  It is proto2 so optional
scalars have presence (a layer whose data scale is not known yet differs from
one whose scale is 0), and repeated fields are unpacked so the text output
matches the style above.

Writers replace the file atomically (temp file + fsync + ``os.replace``) and
serialize against each other with ``fcntl.flock`` on a sidecar ``<path>.lock``,
so several processes may update different layers of one record concurrently.

Layers that write the record during a forward pass (ShiftNSearch, the calibration observers)
collect their updates in the process's :func:`deferred_writes` of the file, which writes them in
one read-modify-write when the last of them in the net has run (instead of rewriting the whole
file once per layer), and before any :func:`read_record` of the file in this process.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import itertools
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.message import Message

from amct_retrain.fileio import atomic_write, parse_text_proto, read_text_file
from amct_retrain.errors import ModelError, RecordFileError  # noqa: F401 (RecordFileError re-exported)

__all__ = [
    "SingleLayerRecord",
    "ScaleOffsetRecord",
    "RecordFileError",
    "read_record",
    "write_record",
    "update_layer_record",
    "update_layer_records",
    "deferred_writes",
    "DeferredWrites",
    "create_empty_record",
    "layer_record_complete",
    "existing_record",
    "skip_fusion_entries",
    "forward_passes_file",
    "forward_passes_text",
    "read_forward_passes",
    "note_forward_passes",
]

logger = logging.getLogger(__name__)

_PACKAGE = "amct_retrain"
_F = descriptor_pb2.FieldDescriptorProto


def _build_schema() -> tuple[type, type]:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="amct_retrain/scale_offset_record.proto", package=_PACKAGE, syntax="proto2"
    )

    layer = fdp.message_type.add(name="SingleLayerRecord")
    for name, number, label, ftype in [
        ("scale_d", 1, _F.LABEL_OPTIONAL, _F.TYPE_FLOAT),
        ("offset_d", 2, _F.LABEL_OPTIONAL, _F.TYPE_INT32),
        ("scale_w", 3, _F.LABEL_REPEATED, _F.TYPE_FLOAT),
        ("offset_w", 4, _F.LABEL_REPEATED, _F.TYPE_INT32),
        ("shift_bit", 5, _F.LABEL_REPEATED, _F.TYPE_UINT32),
        ("channels", 6, _F.LABEL_OPTIONAL, _F.TYPE_UINT32),
        ("height", 7, _F.LABEL_OPTIONAL, _F.TYPE_UINT32),
        ("width", 8, _F.LABEL_OPTIONAL, _F.TYPE_UINT32),
        ("skip_fusion", 9, _F.LABEL_OPTIONAL, _F.TYPE_BOOL),
    ]:
        layer.field.add(name=name, number=number, label=label, type=ftype)

    top = fdp.message_type.add(name="ScaleOffsetRecord")
    entry = top.nested_type.add(name="MapEntry")
    entry.field.add(name="key", number=1, label=_F.LABEL_OPTIONAL, type=_F.TYPE_STRING)
    entry.field.add(
        name="value", number=2, label=_F.LABEL_OPTIONAL, type=_F.TYPE_MESSAGE,
        type_name=f".{_PACKAGE}.SingleLayerRecord",
    )
    top.field.add(
        name="record", number=1, label=_F.LABEL_REPEATED, type=_F.TYPE_MESSAGE,
        type_name=f".{_PACKAGE}.ScaleOffsetRecord.MapEntry",
    )

    # A private pool: re-importing this module (or another module defining the
    # same names) cannot clash with the process-wide default pool.
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.SingleLayerRecord")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.ScaleOffsetRecord")),
    )


if TYPE_CHECKING:  # the classes are built at import time: what a type checker knows of them
    class _RecordMessage(Message):
        def __init__(self, **fields: Any) -> None: ...
        def __getattr__(self, name: str) -> Any: ...
        def __setattr__(self, name: str, value: Any) -> None: ...

    class SingleLayerRecord(_RecordMessage): ...

    class ScaleOffsetRecord(_RecordMessage): ...
else:
    SingleLayerRecord, ScaleOffsetRecord = _build_schema()

# field name -> (repeated?, accepted numpy dtype kinds)
_FIELDS: dict[str, tuple[bool, str]] = {
    "scale_d": (False, "fiu"),
    "offset_d": (False, "iu"),
    "scale_w": (True, "fiu"),
    "offset_w": (True, "iu"),
    "shift_bit": (True, "iu"),
    "channels": (False, "iu"),
    "height": (False, "iu"),
    "width": (False, "iu"),
    "skip_fusion": (False, "b"),
}


def read_record(path: str | os.PathLike) -> dict[str, SingleLayerRecord]:
    """Read a record file into ``{layer name: SingleLayerRecord}``.

    An empty file is a valid empty record.  Raises :class:`RecordFileError` if
    the file is missing, is not valid protobuf text (``FILE:LINE:COL: message``),
    or holds an entry without a key or the same key twice.  Updates deferred in this
    process (:func:`deferred_writes`) are written first.
    """
    path = os.fspath(path)
    deferred = _DEFERRED.get(os.path.abspath(path))
    if deferred is not None:
        deferred.flush()
    return _read(path, missing_ok=False)


def write_record(path: str | os.PathLike, records: Mapping[str, SingleLayerRecord]) -> None:
    """Atomically replace the record file with ``records`` (keys written in sorted order).

    Either the whole new content is in place afterwards or, on any error, the
    previous file is untouched.  Holds the sidecar lock so that it does not
    interleave with :func:`update_layer_record` in other processes.
    """
    path = os.fspath(path)
    text = format_record(records)  # before taking the lock or touching the disk
    with _locked(path):
        atomic_write(path, text)
    logger.debug("wrote %d layer record(s) to %s", len(records), path)


def update_layer_record(path: str | os.PathLike, layer: str, **fields: Any) -> None:
    """Set fields of one layer's entry, keeping every other layer's entry.

    ``fields`` are ``SingleLayerRecord`` field names: ``scale_d`` (float),
    ``offset_d`` (int), ``scale_w`` (sequence of float), ``offset_w`` and
    ``shift_bit`` (sequences of int), ``channels``, ``height``, ``width`` (int),
    ``skip_fusion`` (bool).  Numpy scalars and 1-D arrays are accepted.
    Repeated fields are replaced, not appended; ``None`` clears a field.
    A missing file is created.  The read-modify-write runs under an exclusive
    ``flock`` on ``path + ".lock"`` and the file is replaced atomically, so
    concurrent updaters in other processes lose nothing.

    Raises ``TypeError`` for an unknown field name or a value of the wrong
    kind, ``ValueError`` for an out-of-range value; the file is then untouched.
    """
    update_layer_records(path, {layer: fields})


def update_layer_records(path: str | os.PathLike, updates: Mapping[str, Mapping[str, Any]]) -> None:
    """:func:`update_layer_record` of several layers, ``{layer: fields}``, in one read-modify-write
    (the same file as the updates one by one, in one write)."""
    path = os.fspath(path)
    patches = {}
    for layer, fields in updates.items():
        if not isinstance(layer, str) or not layer:
            raise TypeError(f"{path}: layer name must be a non-empty str, got {layer!r}")
        patches[layer] = _make_patch(path, layer, fields)  # validate everything before locking
    with _locked(path):
        records = _read(path, missing_ok=True)
        for layer, fields in updates.items():
            _apply(records.setdefault(layer, SingleLayerRecord()), fields, patches[layer])
        atomic_write(path, format_record(records))
    logger.debug("updated %s in %s", ", ".join(f"{layer} ({', '.join(sorted(fields))})"
                                               for layer, fields in updates.items()), path)


def _apply(rec: SingleLayerRecord, fields: Mapping[str, Any], patch: SingleLayerRecord) -> None:
    for name in fields:
        if fields[name] is None:
            rec.ClearField(name)
        elif _FIELDS[name][0]:  # repeated
            getattr(rec, name)[:] = getattr(patch, name)
        else:
            setattr(rec, name, getattr(patch, name))


class DeferredWrites:
    """This process's pending layer updates of one record file (see :func:`deferred_writes`).

    Writers ``join()`` when they are set up and get a token; the latest token stands for the last
    writer of the net built last, which runs after the others in each forward pass and calls
    ``forward_pass(token)`` around its forward: the updates collected in that pass are then written at once.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.pending: dict[str, dict[str, Any]] = {}
        self._tokens = itertools.count(1)
        self.last_token = 0
        self._cache: tuple[tuple[int, int, int], dict[str, SingleLayerRecord]] | None = None

    def join(self) -> int:
        """A token for a new writer; the newest is the last one in forward order."""
        self.last_token = next(self._tokens)
        return self.last_token

    def update(self, layer: str, **fields: Any) -> None:
        """Queue :func:`update_layer_record` ``(path, layer, **fields)``; checked now, written later."""
        if not isinstance(layer, str) or not layer:
            raise TypeError(f"{self.path}: layer name must be a non-empty str, got {layer!r}")
        _make_patch(self.path, layer, fields)
        self.pending.setdefault(layer, {}).update(fields)

    @contextlib.contextmanager
    def forward_pass(self, token: int) -> Iterator[None]:
        """Around each writer's forward: after the last writer's, what is pending is written; a
        forward that raises drops what is pending, so a failed pass leaves the record as it was."""
        try:
            yield
        except BaseException:
            self.pending = {}
            raise
        if token == self.last_token:
            self.flush()

    def flush(self) -> None:
        """Write every pending update in one read-modify-write (nothing if none)."""
        if self.pending:
            updates, self.pending = self.pending, {}
            update_layer_records(self.path, updates)

    def layer(self, name: str) -> SingleLayerRecord | None:
        """``name``'s record as the file holds it with the pending updates applied (None if
        neither has it); the file is parsed again only when it changed."""
        st = os.stat(self.path)
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, _read(self.path, missing_ok=False))
        rec = self._cache[1].get(name)
        if name in self.pending:
            fields = self.pending[name]
            merged = SingleLayerRecord()
            if rec is not None:
                merged.CopyFrom(rec)
            _apply(merged, fields, _make_patch(self.path, name, fields))
            return merged
        return rec


_DEFERRED: dict[str, DeferredWrites] = {}


def deferred_writes(path: str | os.PathLike) -> DeferredWrites:
    """The process-wide :class:`DeferredWrites` of the record file ``path``."""
    path = os.path.abspath(os.fspath(path))
    return _DEFERRED.setdefault(path, DeferredWrites(path))


@atexit.register
def _flush_deferred() -> None:
    # A writer's net deleted before its last writer ran: still written when the process ends.
    for deferred in _DEFERRED.values():
        deferred.flush()


def create_empty_record(path: str | os.PathLike) -> None:
    """Create the record file empty, or empty an existing one, atomically."""
    write_record(path, {})


def layer_record_complete(rec: SingleLayerRecord) -> bool:
    """True if ``rec`` holds everything needed to quantize its layer.

    That is ``scale_d``, ``offset_d``, one ``shift_bit`` per output channel, and
    ``scale_w`` / ``offset_w`` of equal length: one per output channel (channel-wise) or
    one for the whole tensor.
    """
    n, channels = len(rec.scale_w), len(rec.shift_bit)
    return (
        rec.HasField("scale_d")
        and rec.HasField("offset_d")
        and channels > 0
        and n in (1, channels)
        and len(rec.offset_w) == n
    )


def existing_record(record_file: str) -> dict[str, SingleLayerRecord]:
    """The entries of the record file if it exists, else none."""
    return read_record(record_file) if os.path.exists(record_file) else {}


def skip_fusion_entries(records: dict[str, SingleLayerRecord]) -> dict[str, SingleLayerRecord]:
    """The ``skip_fusion`` entries of a record, alone: kept when the record is emptied, and honoured."""
    return {name: SingleLayerRecord(skip_fusion=True) for name, rec in records.items() if rec.skip_fusion}


def forward_passes_file(record_file: str) -> str:
    """The record's sidecar JSON, ``{layer: TEST forward passes its calibration saw}``."""
    return f"{record_file}.forward_passes.json"


def forward_passes_text(counts: Mapping[str, int]) -> str:
    """The text of the forward-pass file holding ``counts`` ({layer: count})."""
    return json.dumps(dict(counts), indent=1, sort_keys=True) + "\n"


def read_forward_passes(record_file: str) -> dict[str, int]:
    """The counts of :func:`forward_passes_file` (empty if the file does not exist)."""
    path = forward_passes_file(record_file)
    if not os.path.exists(path):
        return {}
    try:
        counts = json.loads(read_text_file(path, "forward-pass file", ModelError))
    except json.JSONDecodeError as err:
        raise ModelError(f"{path}: not a forward-pass file (invalid JSON: {err})") from None
    if not isinstance(counts, dict) or not all(isinstance(v, int) for v in counts.values()):
        raise ModelError(f"{path}: not a forward-pass file ({{layer: count}} expected)")
    return counts


def note_forward_passes(record_file: str, layers: Iterable[str], count: int) -> None:
    """Record that the calibration of ``layers`` has seen ``count`` TEST forward passes."""
    counts = read_forward_passes(record_file)
    counts.update(dict.fromkeys(layers, count))
    # Read-modify-write without a lock: only the observers of one net write it, one after another.
    atomic_write(forward_passes_file(record_file), forward_passes_text(counts))


# --------------------------------------------------------------------------- internals


# The plain shape every record file has ("record { key: "x" value { field: number ... } }"),
# parsed without protobuf's pure-Python text parser, which takes seconds for a ResNet's
# per-channel scales. Anything else (comments, other syntax, errors) goes to text_format.
_TOKEN = re.compile(r'\s*(?:(record|key|value)\s*(?=[:{])|([a-z_]+)\s*:\s*([-+0-9.eE]+|true|false)\b|'
                    r'(\{)|(\})|:\s*"((?:[^"\\\n])*)")')


def _parse_plain(text: str) -> ScaleOffsetRecord | None:
    msg, entry, pos, depth = ScaleOffsetRecord(), None, 0, 0
    fields = SingleLayerRecord.DESCRIPTOR.fields_by_name
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            return None if text[pos:].strip() else msg
        pos = m.end()
        word, field, number, opening, closing, key = m.groups()
        if word == "record" and depth == 0:
            entry = msg.record.add()
        elif word in ("key", "value"):
            continue
        elif opening:
            depth += 1
        elif closing:
            depth -= 1
        elif key is not None and entry is not None and depth == 1:
            entry.key = key
        elif field in fields and depth == 2 and entry is not None:
            desc = fields[field]
            value = (number == "true") if desc.type == desc.TYPE_BOOL else (
                float(number) if desc.type == desc.TYPE_FLOAT else int(number))
            target = getattr(entry.value, field)
            if isinstance(target, (int, float, bool)):
                setattr(entry.value, field, value)
            else:
                target.append(value)
        else:
            return None
    return msg if depth == 0 else None


def _read(path: str, missing_ok: bool) -> dict[str, SingleLayerRecord]:
    if missing_ok and not os.path.exists(path):
        return {}
    text = read_text_file(path, "record file", RecordFileError)
    try:
        msg = _parse_plain(text)
    except (ValueError, TypeError):
        msg = None
    if msg is None:
        msg = ScaleOffsetRecord()
        parse_text_proto(path, text, msg, RecordFileError)

    records: dict[str, SingleLayerRecord] = {}
    for i, entry in enumerate(msg.record):
        if not entry.key:
            raise RecordFileError(f"{path}: record entry #{i + 1} has no key (layer name)")
        if entry.key in records:
            raise RecordFileError(f"{path}: duplicate record for layer {entry.key!r}")
        records[entry.key] = entry.value
    return records


def format_record(records: Mapping[str, SingleLayerRecord]) -> str:
    msg = ScaleOffsetRecord()
    for key in sorted(records):
        value = records[key]
        if not isinstance(key, str) or not key:
            raise TypeError(f"record keys must be non-empty str, got {key!r}")
        if not isinstance(value, SingleLayerRecord):
            raise TypeError(f"record for layer {key!r} must be a SingleLayerRecord, got {type(value).__name__}")
        entry = msg.record.add(key=key)
        entry.value.CopyFrom(value)
    # protobuf >= 4 prints floats with the shortest text that round-trips the
    # float32 value exactly, so written scales read back bit-identical.
    return text_format.MessageToString(msg, as_utf8=True)


def _make_patch(path: str, layer: str, fields: Mapping[str, Any]) -> SingleLayerRecord:
    """Convert ``fields`` into a SingleLayerRecord, raising before any file is touched."""
    patch = SingleLayerRecord()
    for name, value in fields.items():
        if name not in _FIELDS:
            raise TypeError(
                f"{path}: unknown record field {name!r} for layer {layer!r}; known: {', '.join(_FIELDS)}"
            )
        if value is None:
            continue
        repeated, kinds = _FIELDS[name]
        arr = np.asarray(value)
        if arr.dtype.kind not in kinds and not (repeated and arr.size == 0):
            raise TypeError(f"{path}: layer {layer!r} field {name!r}: wrong value type {value!r}")
        try:
            if repeated:
                if arr.ndim > 1:
                    raise TypeError(f"{path}: layer {layer!r} field {name!r}: expected 1-D values, got shape {arr.shape}")
                # .tolist() yields Python floats/ints: exact for float32, no numpy types in protobuf.
                getattr(patch, name).extend(arr.reshape(-1).tolist())
            else:
                if arr.ndim != 0:
                    raise TypeError(f"{path}: layer {layer!r} field {name!r}: expected a scalar, got {value!r}")
                setattr(patch, name, arr.item())
        except ValueError as e:  # protobuf range check (e.g. negative shift_bit)
            raise ValueError(f"{path}: layer {layer!r} field {name!r}: {e}") from None
    return patch


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    # The lock lives in a sidecar file because the record itself is replaced
    # (new inode) on every write; the sidecar is never deleted, since unlinking
    # a lock file that others may hold open would break mutual exclusion.
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

