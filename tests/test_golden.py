"""Golden files: every graph pass's output on small nets, and models saved by today's toolkit.

A failing comparison prints the unified diff against ``tests/golden/``. If the change of output is
intended, run ``python -m tests.golden.regenerate`` and review the diff before committing it.
"""
import difflib
import math

import caffe
import numpy as np
import pytest

from tests.golden import compat
from tests.golden.cases import NETS, PASSES_DIR, blob_digest, pass_outputs
from tests.nets import MASTER_WEIGHTS

pytestmark = pytest.mark.caffe
REGENERATE = "intended? run `python -m tests.golden.regenerate` and review the diff"
MAX_DIFF_LINES = 200


def _diff(expected: str, actual: str, name: str) -> str:
    lines = list(difflib.unified_diff(expected.splitlines(keepends=True), actual.splitlines(keepends=True),
                                      f"golden/{name}", f"now/{name}"))
    more = f"... {len(lines) - MAX_DIFF_LINES} more diff lines\n" if len(lines) > MAX_DIFF_LINES else ""
    return "".join(lines[:MAX_DIFF_LINES]) + more


def _binary_diff(expected: bytes, actual: bytes, name: str, tmp_path) -> str:
    """A caffemodel's difference as the diff of its per-blob digests."""
    digests = []
    for tag, data in (("golden", expected), ("now", actual)):
        (tmp_path / f"{tag}.caffemodel").write_bytes(data)
        digests.append(blob_digest(tmp_path / f"{tag}.caffemodel"))
    return f"{name}: binary file differs ({len(expected)} bytes golden, {len(actual)} now)\n" + _diff(*digests, name)


def _check_files(expected: dict[str, bytes], actual: dict[str, bytes], where: str, tmp_path) -> None:
    __tracebackhide__ = True
    assert sorted(actual) == sorted(expected), f"{where}: files {sorted(actual)}, golden {sorted(expected)}; {REGENERATE}"
    problems = []
    for name in sorted(expected):
        if actual[name] == expected[name]:
            continue
        try:
            problems.append(_diff(expected[name].decode(), actual[name].decode(), f"{where}/{name}"))
        except UnicodeDecodeError:
            problems.append(_binary_diff(expected[name], actual[name], f"{where}/{name}", tmp_path))
    assert not problems, "".join(problems) + REGENERATE


@pytest.mark.parametrize("net", sorted(NETS))
def test_graph_pass_outputs_match_the_golden_files(net, tmp_path):
    folder = PASSES_DIR / net
    expected = {path.name: path.read_bytes() for path in sorted(folder.iterdir())} if folder.is_dir() else {}
    actual = {name: text.encode() for name, text in pass_outputs(net, tmp_path.resolve()).items()}
    _check_files(expected, actual, f"passes/{net}", tmp_path)


def test_a_model_saved_today_saves_again_byte_for_byte(tmp_path):
    expected = {path.name: path.read_bytes() for path in sorted(compat.SAVED_DIR.iterdir())}
    actual = compat.save(tmp_path.resolve())
    _check_files(expected, actual, "compat/saved", tmp_path)


def test_a_model_saved_today_loads_and_gives_the_recorded_outputs():
    outputs = compat.saved_model_outputs(compat.SAVED_DIR)
    expected = np.load(compat.OUTPUTS_FILE)
    assert outputs.shape == expected.shape, f"outputs {outputs.shape}, recorded {expected.shape}"
    for i, model in enumerate(("fake-quant model (Caffe)", "deploy model (integer executor)")):
        worst = float(np.abs(outputs[i] - expected[i]).max())
        assert np.array_equal(outputs[i], expected[i]), f"saved {model}: fc output differs from the recorded one by {worst}"


def test_a_retrained_model_of_today_loads_and_trains_on(tmp_path):
    compat.install_retrained(tmp_path)
    net = caffe.Net(str(tmp_path / "retrain.prototxt"), caffe.TRAIN, weights=str(tmp_path / "snapshot.caffemodel"))
    loss = float(net.forward()["loss"])
    net.backward()
    assert math.isfinite(loss), f"the retrained model's loss is {loss}"
    master = net.params["conv1_arq"][MASTER_WEIGHTS]
    assert np.abs(master.diff).sum() > 0, "no gradient reached conv1's master weights"
