"""A user's own Caffe (AMCT_CAFFE): the toolkit on an unpatched build of the pinned Caffe.

The stand-in for a user's Caffe is the same sdist built with only the compiler fixes
(tools/caffe/build_caffe.sh ... build-only): no deploy fields in its caffe_pb2, none of the
project's behaviour fixes. It is cached like the main build (built only when absent, a few
minutes on 2 cores). The retrain flow, the saver and the integer executor run against it in a
child process, whose pycaffe is that build's.
"""
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.caffe
ROOT = pathlib.Path(__file__).resolve().parents[1]


def unpatched_caffe_dir() -> pathlib.Path:
    """The cache folder of the unpatched build, keyed like setup's: recipe, numpy pin, Python."""
    recipe = hashlib.sha256()
    for path in sorted((ROOT / "tools" / "caffe").iterdir()):
        recipe.update(path.read_bytes())
    numpy_pin = next(line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("numpy"))
    recipe.update(f"{numpy_pin}\npython{sys.version_info[0]}.{sys.version_info[1]}\nbuild-only\n".encode())
    cache = pathlib.Path(os.environ.get("AMCT_CACHE", pathlib.Path.home() / ".cache" / "amct_retrain"))
    return cache / f"caffe-unpatched-{recipe.hexdigest()[:16]}"


@pytest.fixture(scope="module")
def unpatched_caffe() -> pathlib.Path:
    directory = unpatched_caffe_dir()
    if not (directory / "BUILD_OK").is_file():
        run = subprocess.run(["bash", str(ROOT / "tools" / "caffe" / "build_caffe.sh"), str(directory), sys.executable,
                              "build-only"], capture_output=True, text=True)
        assert run.returncode == 0, f"the unpatched Caffe did not build:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    return directory / "src"


USER_CAFFE_FLOW = r"""
import json, logging, pathlib, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
import caffe
from caffe.proto import caffe_pb2 as pycaffe_pb2
import amct_retrain
from amct_retrain import caffe_build
from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.graph import model_io
from amct_retrain.reference import saved_model_parity
from tests import nets

tmp = pathlib.Path(sys.argv[1])
files = nets.retrain_and_save(tmp, nets.FLOAT_NET % {"fc": 10}, "small", 4)
deploy = caffe_pb2.NetParameter.FromString(open(files["deploy_weights"], "rb").read())
quant = [layer for layer in model_io.read_prototxt(files["deploy_model"]).layer if layer.type == "Quant"]
print(json.dumps({
    "caffe_root": caffe_build.caffe_root(),
    "fixed": caffe_build.inspect().fixed,
    "own_module": caffe_pb2 is not pycaffe_pb2,
    "pycaffe_has_int8_data": "int8_data" in pycaffe_pb2.BlobProto.DESCRIPTOR.fields_by_name,
    "int8_weights": sum(len(b.int8_data) for layer in deploy.layer for b in layer.blobs),
    "quant_scales": [layer.quant_param.scale for layer in quant],
    "parity_in_output_steps": saved_model_parity(files["save_path"], str(files["record"])),
}))
"""


def test_retrain_saver_and_integer_executor_on_an_unpatched_caffe(unpatched_caffe, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "AMCT_CAFFE_REPORTED"}
    env["PYTHONPATH"] = f"{unpatched_caffe / 'python'}:{ROOT}"
    run = subprocess.run([sys.executable, "-c", USER_CAFFE_FLOW, str(tmp_path)], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=600)
    assert run.returncode == 0, f"the toolkit failed on the unpatched Caffe:\n{run.stderr[-4000:]}"
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["caffe_root"] == str(unpatched_caffe), f"the child ran another Caffe: {out['caffe_root']}"
    assert not out["pycaffe_has_int8_data"] and out["own_module"], \
        "the unpatched caffe_pb2 has no deploy fields: the toolkit must use a module of its own"
    assert out["int8_weights"] > 0 and len(out["quant_scales"]) == 3 and all(s > 0 for s in out["quant_scales"]), out
    worst = out["parity_in_output_steps"]
    assert set(worst) == {"conv1", "conv2", "fc"} and max(worst.values()) <= 1.0, \
        f"integer executor vs fake-quant model, largest difference in output steps: {worst}"
    # The start-up check names each missing fix, in plain words, with its workaround.
    assert out["fixed"] == {"weights": False, "protobuf_2gb": False, "lmdb_two_nets": False}, out["fixed"]
    for name in ("weights", "protobuf_2gb", "lmdb_two_nets"):
        warning = re.search(rf"WARNING the Caffe at \S+ lacks the project's fix '{name}': (.*)", run.stderr)
        assert warning and "Workaround: " in warning.group(1), f"no start-up warning for '{name}':\n{run.stderr[-3000:]}"
    assert run.stderr.count("lacks the project's fix 'weights'") == 1, "the report is made once per process tree"


def test_the_projects_caffe_has_every_fix_and_reports_nothing():
    from amct_retrain import caffe_build
    from amct_retrain.caffe_proto import caffe_pb2
    from caffe.proto import caffe_pb2 as pycaffe_pb2

    build = caffe_build.inspect()
    assert build.fixed == {"weights": True, "protobuf_2gb": True, "lmdb_two_nets": True}, build
    assert caffe_pb2 is pycaffe_pb2, "the project's Caffe has the deploy fields: its own caffe_pb2 is used"
    env = {k: v for k, v in os.environ.items() if k != "AMCT_CAFFE_REPORTED"}
    run = subprocess.run([sys.executable, "-c", "import amct_retrain.caffe_proto"], capture_output=True, text=True,
                         env=env)
    assert run.returncode == 0 and "lacks the project's fix" not in run.stderr, run.stderr
