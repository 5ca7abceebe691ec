"""LMDB data sets for the tests, written as Caffe's docs show (pycaffe's array_to_datum + lmdb)."""
import pathlib
import subprocess
import sys

import caffe
import lmdb
import numpy as np
import pytest


def write_lmdb(path: pathlib.Path, images: np.ndarray, labels) -> pathlib.Path:
    """``images`` (N, C, H, W; uint8 -> Datum.data bytes, else float_data) with their labels as an
    LMDB at ``path``, keys '00000000', '00000001', ... so that Caffe reads them in order."""
    path = pathlib.Path(path)
    env = lmdb.open(str(path), map_size=max(10 * images.nbytes, 1 << 20))
    with env.begin(write=True) as txn:
        for i, (image, label) in enumerate(zip(images, labels)):
            datum = caffe.io.array_to_datum(image, int(label))
            txn.put(f"{i:08d}".encode("ascii"), datum.SerializeToString())
    env.close()
    return path


def data_layer(source: pathlib.Path, batch_size: int, scale: float = 1.0, phase: str | None = None) -> str:
    """A Data layer named "data" (tops data, label) reading the LMDB ``source``."""
    include = f"include {{ phase: {phase} }}" if phase else ""
    return f"""layer {{ name: "data" type: "Data" top: "data" top: "label" {include}
  transform_param {{ scale: {scale} }}
  data_param {{ source: "{source}" batch_size: {batch_size} backend: LMDB }} }}
"""


def run_child(code: str, *args: str, timeout: float = 180) -> str:
    """Run ``code`` in a child Python (a Caffe abort or hang must fail the test, not end the run);
    returns its stdout; fails the test on a non-zero exit or after ``timeout`` seconds."""
    try:
        run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"the child process hung (killed after {timeout} s); its log ends:\n{err[-3000:]}")
    assert run.returncode == 0, f"the child process failed (exit code {run.returncode}):\n{run.stderr[-3000:]}"
    return run.stdout
