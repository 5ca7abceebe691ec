"""Output files: inputs are never outputs (links included), and killed writers leave no lasting litter."""
import os
import signal
import subprocess
import sys
import time

import pytest

from amct_retrain import fileio
from amct_retrain.errors import AmctError, OutputPathError


@pytest.mark.parametrize("kind", ["same path", "relative path", "symlink", "hard link", "symlinked folder"])
def test_an_output_that_is_an_input_is_refused(tmp_path, monkeypatch, kind):
    data = tmp_path / "data" / "model.prototxt"
    data.parent.mkdir()
    data.write_text("layer {}")
    out = {"same path": data, "relative path": "data/model.prototxt", "symlink": tmp_path / "link.prototxt",
           "hard link": tmp_path / "hard.prototxt", "symlinked folder": tmp_path / "alias" / "model.prototxt"}[kind]
    monkeypatch.chdir(tmp_path)
    if kind == "symlink":
        os.symlink(data, out)
    elif kind == "hard link":
        os.link(data, out)
    elif kind == "symlinked folder":
        os.symlink(data.parent, tmp_path / "alias")
    with pytest.raises(OutputPathError) as err:
        fileio.check_outputs_are_not_inputs({"model file": str(data)}, {"config file": str(out)})
    assert isinstance(err.value, AmctError) and "model file" in str(err.value) and str(out) in str(err.value), \
        f"the message must name the output and the input's role: {err.value}"


def test_distinct_and_missing_outputs_pass(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("x")
    b.write_text("x")  # same content, other file
    fileio.check_outputs_are_not_inputs({"in": str(a), "unused": None}, {"out": str(b), "new": str(tmp_path / "c")})


def test_a_folder_as_output_is_refused_and_nothing_is_written(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputPathError, match="folder"):
        with fileio.staged_outputs() as out:
            out.write(tmp_path / "ok.txt", "x")
            out.write(tmp_path / "out", "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "a failed block must leave nothing"


_KILLED_WRITER = """
import sys, time
from amct_retrain import fileio
with fileio.staged_outputs() as out:
    out.write(sys.argv[1], b"x" * 1000)
    print("staged", flush=True)
    time.sleep(60)
"""


def _temp_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_killed_writers_temp_file_is_removed_at_the_next_write_and_a_live_ones_is_kept(tmp_path):
    target = tmp_path / "model_deploy_weights.caffemodel"
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "staged", "the writer did not stage its output"
        (staged,) = _temp_files(tmp_path)
        past = time.time() - 10 * fileio.STALE_AFTER_S
        os.utime(tmp_path / staged, (past, past))
        fileio.atomic_write(tmp_path / "other.json", "{}")  # a concurrent write to the same folder
        assert _temp_files(tmp_path) == [staged], "the temp file of a live writer (locked) must be kept"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert _temp_files(tmp_path) == [staged], "the killed writer leaves its temp file"
    assert not target.exists(), "a killed writer must not publish its output"
    fileio.atomic_write(tmp_path / "other.json", "{}")
    assert _temp_files(tmp_path) == [], "the next write to the folder removes a killed writer's temp file"


def test_young_and_foreign_temp_files_are_left_alone(tmp_path):
    young = tmp_path / ".model.prototxt.0123456789ab.tmp"   # a writer may be about to lock it
    young.write_text("x")
    soon = time.time() + 60  # young whatever the machine's load makes of the next lines
    os.utime(young, (soon, soon))
    foreign = tmp_path / ".model.prototxt.tmp"               # not this module's naming
    foreign.write_text("x")
    past = time.time() - 100
    os.utime(foreign, (past, past))
    fileio.atomic_write(tmp_path / "out.txt", "y")
    assert young.exists() and foreign.exists(), "only old, unlocked temp files of the module's naming are removed"


def test_concurrent_writers_of_one_folder_all_publish(tmp_path):
    script = ("import sys\nfrom amct_retrain import fileio\n"
              "for i in range(40):\n"
              "    with fileio.staged_outputs() as out:\n"
              "        out.write(f'{sys.argv[1]}_{i}.a', b'a' * 100000)\n"
              "        out.write(f'{sys.argv[1]}_{i}.b', b'b' * 100000)\n")
    writers = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"w{n}")]) for n in range(3)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0], "a concurrent writer failed"
    names = {p.name for p in tmp_path.iterdir()}
    assert len(names) == 3 * 40 * 2 and not _temp_files(tmp_path), f"outputs missing or litter: {len(names)}"


_FULL_DISK_WRITER = """
import resource, signal, sys
from amct_retrain import fileio
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
try:
    with fileio.staged_outputs() as out:
        out.write(sys.argv[1] + ".small", b"s" * 100)
        out.write(sys.argv[1] + ".big", b"b" * 100000)
except OSError as err:
    print("refused", err.errno, err)
"""


def test_a_write_that_fails_half_way_publishes_nothing_and_leaves_no_temp_file(tmp_path):
    prefix = tmp_path / "model"
    (tmp_path / "model.small").write_bytes(b"old")
    run = subprocess.run([sys.executable, "-c", _FULL_DISK_WRITER, str(prefix)], capture_output=True, text=True)
    assert run.stdout.startswith("refused") and str(prefix) in run.stdout, f"no clean OSError: {run.stdout} {run.stderr}"
    assert (tmp_path / "model.small").read_bytes() == b"old", "an earlier output was replaced by a failed write"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.small"], "a failed write left files"
