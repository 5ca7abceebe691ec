"""Which of the project's Caffe fixes the Caffe on the Python path has, checked at start-up.

The project's build (tools/caffe/patch_caffe.py) fixes three things the pinned Caffe gets wrong;
a user's own Caffe (``AMCT_CAFFE=/path/to/caffe``) may lack them. Each is checked in the Caffe
tree pycaffe was imported from (``<root>/python/caffe``), the same way for either Caffe:

* ``weights``: ``caffe train -weights`` copies the weights into the nets when the command-line
  tool has upstream's "Finetuning from" branch (``build/tools/caffe.bin``; else its source);
* ``protobuf_2gb``: ``src/caffe/util/io.cpp`` caps protobuf files at 512 MB
  (``SetTotalBytesLimit(536870912)``) or reads up to 2 GB;
* ``lmdb_two_nets``: ``src/caffe/data_reader.cpp`` is the fork's reader shared by every Data
  layer of one source, the project's fixed one, or absent (upstream Caffe 1.0: a reader per layer).

What cannot be told (no source tree, no tool) is reported as possibly missing. :func:`report`
logs, once per process tree, every fix the Caffe lacks, in plain words and with the workaround;
importing :mod:`amct_retrain.caffe_proto` (the first use of Caffe's schema) calls it.
"""
import functools
import logging
import mmap
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

LOG = logging.getLogger(__name__)
# Set once the report is made, so that the Caffe processes the toolkit starts (Python layers,
# probes) do not repeat it.
REPORTED_ENV = "AMCT_CAFFE_REPORTED"


def _read(root: str, relative: str) -> str | None:
    path = os.path.join(root, relative)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def caffe_tool(root: str, name: str) -> str | None:
    """Path of one of Caffe's command-line tools in the tree ``root`` (Makefile: ``name.bin``,
    CMake: ``name``), or None."""
    for candidate in (f"{name}.bin", name):
        path = os.path.join(root, "build", "tools", candidate)
        if os.path.isfile(path):
            return path
    return None


def _has_weights_fix(root: str) -> bool | None:
    tool = caffe_tool(root, "caffe")
    if tool is not None:
        with open(tool, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return data.find(b"Finetuning from") >= 0
    source = _read(root, "tools/caffe.cpp")
    return None if source is None else "CopyLayers(solver.get(), FLAGS_weights)" in source


def _has_protobuf_fix(root: str) -> bool | None:
    source = _read(root, "src/caffe/util/io.cpp")
    if source is None:
        return None
    limits = re.findall(r"SetTotalBytesLimit\(\s*([^,)]+)", source)
    if not limits:
        return None
    return all(limit.strip() in ("2147483647", "INT_MAX", "kProtoReadBytesLimit") for limit in limits)


def _has_lmdb_fix(root: str) -> bool | None:
    if not os.path.isdir(os.path.join(root, "src", "caffe")):
        return None
    source = _read(root, "src/caffe/data_reader.cpp")
    if source is None:
        return True  # no shared reader: every Data layer opens its own cursor (upstream Caffe 1.0)
    return "one body (reading thread and cursor) per reader" in source  # tools/caffe/patch_caffe.py's


@dataclass(frozen=True)
class Fix:
    name: str
    problem: str       # what goes wrong without it, in plain words
    workaround: str
    check: Callable[[str], bool | None]   # Caffe tree -> has the fix (None: cannot tell)


FIXES = (
    Fix("weights",
        "`caffe train -weights FILE` ignores FILE: training starts from the net's fillers, not from FILE",
        "retrain with `amct-retrain train --solver S --weights FILE` or amct_retrain.solver.train(S, FILE), "
        "which load the weights through pycaffe; do not use `caffe train -weights` with this Caffe",
        _has_weights_fix),
    Fix("protobuf_2gb",
        "a weights file over 512 MB (VGG-16, FCN-8s) aborts Caffe as it reads it (the pinned fork caps "
        "protobuf files at 512 MB where upstream Caffe reads up to 2 GB)",
        "rebuild this Caffe with src/caffe/util/io.cpp's SetTotalBytesLimit raised to 2147483647 (as "
        "tools/caffe/patch_caffe.py does), or use the project's Caffe (run setup without AMCT_CAFFE)",
        _has_protobuf_fix),
    Fix("lmdb_two_nets",
        "two nets reading one LMDB in one process hang or abort (data_reader.cpp: Check failed: "
        "new_queue_pairs_.size() == 0); accuracy_based_auto_calibration holds the float and the fake-quant "
        "net at once, so it fails on models whose Data layer reads an LMDB",
        "give the second net's Data layer a source of its own (a copy of the LMDB: the fork shares one reader "
        "per layer name and source), or use HDF5Data layers, or Input layers fed from Python",
        _has_lmdb_fix),
)


@dataclass(frozen=True)
class CaffeBuild:
    root: str                        # the Caffe tree pycaffe was imported from
    fixed: dict[str, bool | None]    # fix name -> has it (None: cannot tell)

    def missing(self) -> list[Fix]:
        """The fixes this Caffe lacks or may lack."""
        return [fix for fix in FIXES if not self.fixed[fix.name]]


def caffe_root() -> str:
    """The Caffe tree that ``import caffe`` gives (pycaffe is its ``python/caffe``)."""
    import caffe

    return os.path.normpath(os.path.join(os.path.dirname(caffe.__file__), "..", ".."))


@functools.cache
def inspect() -> CaffeBuild:
    """What the Caffe that ``import caffe`` gives has of the project's fixes."""
    root = caffe_root()
    return CaffeBuild(root, {fix.name: fix.check(root) for fix in FIXES})


def report() -> None:
    """Log a warning for each fix the Caffe lacks (once per process tree; nothing for the project's Caffe)."""
    if os.environ.get(REPORTED_ENV):
        return
    build = inspect()
    os.environ[REPORTED_ENV] = "1"
    for fix in build.missing():
        how = "may lack (cannot tell from its files)" if build.fixed[fix.name] is None else "lacks"
        LOG.warning("the Caffe at %s %s the project's fix '%s': %s. Workaround: %s.",
                    build.root, how, fix.name, fix.problem, fix.workaround)
