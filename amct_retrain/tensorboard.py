"""TensorBoard scalars and histograms of a retraining run, shared by ``solver.train`` and the fake-quant layers.

One event file per log folder per process: :func:`get_writer` caches a writer per folder, so
``train()`` and the layers of the train and test nets that log into the same folder share it.

Events are written synchronously and flushed on every call, with tensorboardX's own event
writer and protos rather than its ``SummaryWriter``: ``SummaryWriter`` hands events to a
background thread through a queue that its ``flush()`` does not drain, and the ``caffe``
binary never finalizes the Python it embeds, so neither that thread nor ``atexit`` would
write the end of a ``caffe train`` run (its last TEST, the shift-N search). A few scalars
every N iterations cost one small write each.

Tags are ``<layer>/<quantity>``; the stats functions below are the only place that names
them, so ``train()`` and the layers log the same series under the same tags.
"""
import atexit
import itertools
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.record_writer import masked_crc32c
from tensorboardX.summary import make_histogram

from amct_retrain import numerics

LOG = logging.getLogger(__name__)
LAYER_LOG_EVERY = 10
"""Default of the layers' ``log_every`` param_str key: log on forward calls 0, 10, 20, ..."""
HISTOGRAM_BINS = 64
"""Bins of the histograms of activations and master weights."""

_SERIAL = itertools.count()
_WRITERS: dict[str, "ScalarWriter"] = {}
_WRITERS_LOCK = threading.Lock()


class ScalarWriter:
    """Appends scalar summaries to a new event file in ``log_dir`` (created if missing)."""

    def __init__(self, log_dir: str) -> None:
        os.makedirs(log_dir, exist_ok=True)
        # tensorboardX names event files by the second and the host only: the pid and a
        # serial keep two writers of one folder (two processes, or close and reopen) apart.
        self._events = EventsWriter(os.path.join(log_dir, "events"), f".{os.getpid()}.{next(_SERIAL)}")
        self.log_dir = log_dir

    def add_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Write ``{tag: value}`` as one event at ``step`` and flush it to the file."""
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value))
                                 for tag, value in scalars.items()])
        self._events.write_event(Event(wall_time=time.time(), step=int(step), summary=summary))
        self._events.flush()

    def add_histograms(self, values: Mapping[str, npt.ArrayLike], step: int) -> None:
        """Write a histogram of each ``{tag: array}`` (``HISTOGRAM_BINS`` equal bins over its
        range) as one event at ``step`` and flush it to the file."""
        summary = Summary(value=[Summary.Value(tag=tag, histo=make_histogram(np.asarray(v, np.float64).ravel(),
                                                                             HISTOGRAM_BINS))
                                 for tag, v in values.items()])
        self._events.write_event(Event(wall_time=time.time(), step=int(step), summary=summary))
        self._events.flush()

    def close(self) -> None:
        """Close the event file."""
        self._events.close()


def get_writer(log_dir: str | os.PathLike) -> ScalarWriter:
    """The process's writer for ``log_dir`` (one per absolute path), created on first use."""
    key = os.path.abspath(log_dir)
    with _WRITERS_LOCK:
        writer = _WRITERS.get(key)
        if writer is None:
            writer = _WRITERS[key] = ScalarWriter(key)
            LOG.info("TensorBoard scalars go to %s", key)
    return writer


def log_scalars(log_dir: str | os.PathLike, scalars: Mapping[str, float], step: int) -> None:
    """Write ``{tag: value}`` at ``step`` into ``log_dir``'s event file, flushed."""
    get_writer(log_dir).add_scalars(scalars, step)


def close_all() -> None:
    """Close every cached writer (run at exit); a later :func:`get_writer` starts a new file."""
    with _WRITERS_LOCK:
        writers = list(_WRITERS.values())
        _WRITERS.clear()
    for writer in writers:
        writer.close()


atexit.register(close_all)


def _tfrecords(path: Path) -> Iterator[bytes]:
    """The payloads of a TFRecord file: each record is a u64 length, the masked crc32c of
    those 8 bytes, the payload and the payload's masked crc32c (all little-endian)."""
    data, pos = path.read_bytes(), 0
    while pos < len(data):
        header = data[pos:pos + 8]
        length = struct.unpack("<Q", header)[0] if len(header) == 8 else 0
        header_crc, payload_crc = data[pos + 8:pos + 12], data[pos + 12 + length:pos + 16 + length]
        payload = data[pos + 12:pos + 12 + length]
        if (len(payload_crc) != 4 or struct.unpack("<I", header_crc)[0] != masked_crc32c(header)
                or struct.unpack("<I", payload_crc)[0] != masked_crc32c(payload)):
            raise ValueError(f"{path}: truncated or corrupt event record at byte {pos}")
        yield payload
        pos += 16 + length


def read_scalars(log_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in ``log_dir``: ``{tag: [(step, value), ...]}`` in file
    (name) order, then write order. Needs neither TensorFlow nor TensorBoard.

    Raises:
        ValueError: a truncated or corrupt event file; the message names it.
    """
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        for payload in _tfrecords(path):
            event = Event.FromString(payload)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


# --------------------------------------------------------------------------- what is logged


def ulq_scalars(layer: str, x: npt.ArrayLike, clips: tuple[float, float],
                num_bits: int = numerics.DEFAULT_BITS) -> dict[str, float]:
    """An ActivationULQ layer's clips, ``scale_d`` and the share of its input it clipped.

    Args:
        layer: the ULQ layer's name (the tag prefix).
        x: the layer's input (bottom) of the batch it quantized, any shape.
        clips: the sanitised ``(clip_min, clip_max)`` it quantized that batch with.
        num_bits: the bit width of its grid.
    """
    scale_d, _ = numerics.ulq_deploy_factors(*clips, num_bits)
    return {f"{layer}/clip_min": clips[0], f"{layer}/clip_max": clips[1], f"{layer}/scale_d": float(scale_d),
            f"{layer}/fraction_clipped": numerics.fraction_clipped(x, *clips, num_bits)}


def arq_scalars(layer: str, scale_w: npt.ArrayLike) -> dict[str, float]:
    """Min, mean and max of a WeightARQ layer's weight scales (one per channel, or one)."""
    scale_w = np.asarray(scale_w, dtype=np.float64)
    return {f"{layer}/scale_w_min": scale_w.min(), f"{layer}/scale_w_mean": scale_w.mean(),
            f"{layer}/scale_w_max": scale_w.max()}


def shift_n_scalars(layer: str, shift_bits: Sequence[int]) -> dict[str, float]:
    """The mean shift_bit over the channels of a ShiftNSearch layer's quantized layer."""
    return {f"{layer}/shift_bit_mean": float(np.mean(shift_bits))}


# --------------------------------------------------------------------------- caffe train


@dataclass
class CaffeTrainTests:
    """The TEST passes of the running ``caffe train``: batches per pass and their iterations."""
    test_iter: int
    iterations: Iterator[int]


def _flag(argv: Sequence[str], name: str) -> str | None:
    """The value of gflags flag ``name`` in ``argv`` (``-name=v``, ``--name=v``, ``-name v``)."""
    for i, arg in enumerate(argv):
        for prefix in (f"-{name}", f"--{name}"):
            if arg.startswith(prefix + "="):
                return arg[len(prefix) + 1:]
            if arg == prefix and i + 1 < len(argv):
                return argv[i + 1]
    return None


def caffe_train_tests(cmdline: str = "/proc/self/cmdline") -> CaffeTrainTests | None:
    """The TEST passes of this process when it is ``caffe train -solver FILE`` (the layers of
    the nets it trains run in it): ``test_iter`` of the first test net and the iterations of the
    passes, as ``Solver::Solve`` runs them (every ``test_interval`` from the start iteration,
    the one of ``-snapshot`` when resuming, to ``max_iter``; iteration 0 only with
    ``test_initialization``). None in any other process (pycaffe), without a TEST phase, or
    with several test nets.
    """
    from amct_retrain.caffe_proto import caffe_pb2  # the layers' process has pycaffe
    from google.protobuf import text_format

    try:
        with open(cmdline, "rb") as f:
            argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    if len(argv) < 2 or not os.path.basename(argv[0]).startswith("caffe") or argv[1] != "train":
        return None
    solver_file = _flag(argv, "solver")
    if not solver_file:
        return None
    with open(solver_file, encoding="utf-8") as f:
        param = text_format.Parse(f.read(), caffe_pb2.SolverParameter())
    if len(param.test_iter) != 1 or param.test_interval <= 0:
        return None  # no TEST, or several test nets (which one a layer is in is unknown)
    start = 0
    snapshot = _flag(argv, "snapshot")
    if snapshot and not snapshot.endswith(".h5"):
        state = caffe_pb2.SolverState()
        with open(snapshot, "rb") as f:
            state.ParseFromString(f.read())
        start = state.iter
    first = start + (-start) % param.test_interval
    iterations = (i for i in range(first, param.max_iter + 1, param.test_interval)
                  if i > 0 or param.test_initialization)
    return CaffeTrainTests(param.test_iter[0], iterations)


# --------------------------------------------------------------------------- layers


class LayerLog:
    """When a Python layer logs: on its forward calls 0, ``every``, 2*``every``, ...

    The step of an event is the 0-based index of the forward call counted so far; a call
    that does not log costs one increment and one modulo.
    """

    def __init__(self, log_dir: str, every: int = 1) -> None:
        self.log_dir, self.every, self.calls = log_dir, every, 0

    def count(self) -> bool:
        """Count one forward call; True if this call is one to log."""
        self.calls += 1
        return (self.calls - 1) % self.every == 0

    def write(self, scalars: Mapping[str, float]) -> None:
        """Log ``scalars`` at the step of the last counted call."""
        log_scalars(self.log_dir, scalars, self.calls - 1)

    def write_histograms(self, values: Mapping[str, npt.ArrayLike]) -> None:
        """Log histograms of ``values`` at the step of the last counted call."""
        log_histograms(self.log_dir, values, self.calls - 1)


def layer_log(params: Mapping[str, Any], layer_type: str) -> LayerLog | None:
    """The LayerLog asked for by a layer's parsed param_str (keys ``log_dir``, optional
    ``log_every``), or None when it has no ``log_dir``.

    Raises:
        ValueError: ``log_every`` is below 1; the message names the layer and the key.
    """
    if not params.get("log_dir"):
        return None
    every = params.get("log_every", 1)
    if every < 1:
        raise ValueError(f"{layer_type} layer '{params['name']}': param_str key 'log_every' "
                         f"must be >= 1, got {every}")
    return LayerLog(params["log_dir"], every)


# --------------------------------------------------------------------------- histograms and analysis


def log_histograms(log_dir: str | os.PathLike, values: Mapping[str, npt.ArrayLike], step: int) -> None:
    """Write a histogram of each ``{tag: array}`` at ``step`` into ``log_dir``'s event file, flushed."""
    get_writer(log_dir).add_histograms(values, step)


def read_histograms(log_dir: str | os.PathLike) -> dict[str, list[tuple[int, Any]]]:
    """Every histogram of the event files in ``log_dir``: ``{tag: [(step, HistogramProto), ...]}``
    in file (name) order, then write order (``min``, ``max``, ``num``, ``sum``, ``bucket``, ...)."""
    histograms: dict[str, list[tuple[int, Any]]] = {}
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        for payload in _tfrecords(path):
            event = Event.FromString(payload)
            for value in event.summary.value:
                if value.HasField("histo"):
                    histograms.setdefault(value.tag, []).append((event.step, value.histo))
    return histograms


def ulq_histograms(layer: str, x: npt.ArrayLike) -> dict[str, npt.ArrayLike]:
    """An ActivationULQ layer's input activations (the batch it quantized)."""
    return {f"{layer}/input_activations": x}


def arq_histograms(layer: str, master: npt.ArrayLike) -> dict[str, npt.ArrayLike]:
    """A WeightARQ layer's float master weights."""
    return {f"{layer}/master_weights": master}


def analysis_scalars(layers: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per analysed layer (``analyze()``'s ``layers``): its output's SQNR (dB) and cosine
    similarity against the float model (an undefined cosine is left out)."""
    scalars = {}
    for layer in layers:
        scalars[f"{layer['name']}/sqnr_db"] = layer["sqnr_db"]
        if layer["cosine"] is not None:
            scalars[f"{layer['name']}/cosine"] = layer["cosine"]
    return scalars
