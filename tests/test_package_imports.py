"""`import amct_retrain` is lazy: the pure modules import without pycaffe, the public API on first use."""
import json
import subprocess
import sys

import pytest

import amct_retrain
from tests.test_import_layering import ROOT

PURE_MODULES = ["amct_retrain.errors", "amct_retrain.fileio", "amct_retrain.numerics", "amct_retrain.feeding",
                "amct_retrain.record", "amct_retrain.tensorboard", "amct_retrain.layer_specs"]

# A child Python in which `import caffe` (and caffe.proto) fails, as on a machine without the build.
CHILD = """
import importlib, json, sys

class NoCaffe:
    def find_spec(self, name, path=None, target=None):
        if name == "caffe" or name.startswith("caffe."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, NoCaffe())
out = {"imported": [], "failed": {}}
for module in sys.argv[1:]:
    try:
        importlib.import_module(module)
        out["imported"].append(module)
    except Exception as err:
        out["failed"][module] = f"{type(err).__name__}: {err}"
import amct_retrain
out["dir"] = dir(amct_retrain)
out["error_base"] = amct_retrain.ConfigError.__mro__[1].__name__
try:
    amct_retrain.create_quant_retrain_config
except ModuleNotFoundError as err:
    out["api_needs"] = err.name
out["caffe_loaded"] = sorted(m for m in sys.modules if m == "caffe" or m.startswith("caffe."))
print(json.dumps(out))
"""


def test_pure_modules_import_without_caffe():
    run = subprocess.run([sys.executable, "-c", CHILD, *PURE_MODULES, "amct_retrain.config"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"the child Python failed:\n{run.stderr}"
    out = json.loads(run.stdout.splitlines()[-1])
    assert out["imported"] == PURE_MODULES, f"pure modules that need pycaffe: {out['failed']}"
    # The blocker works: a module that does need Caffe fails, naming it.
    assert "caffe" in out["failed"].get("amct_retrain.config", ""), f"config imported without caffe: {out}"
    assert out["caffe_loaded"] == [], f"caffe modules loaded: {out['caffe_loaded']}"
    assert set(amct_retrain.__all__) <= set(out["dir"]), "dir(amct_retrain) must list the public API"
    assert out["error_base"] == "AmctError"
    assert out["api_needs"].startswith("caffe"), f"the public API should need caffe here: {out}"


@pytest.mark.caffe
def test_public_api_loads_on_first_use():
    import importlib

    for name in amct_retrain.__all__:
        value = getattr(amct_retrain, name)
        home = importlib.import_module(value.__module__)
        assert getattr(home, name) is value, f"amct_retrain.{name} is not {value.__module__}.{name}"
    from amct_retrain import quantize_model

    assert quantize_model is importlib.import_module("amct_retrain.calibration").quantize_model, \
        "from amct_retrain import quantize_model gave another object"

    with pytest.raises(AttributeError, match="no attribute 'not_an_api'"):
        amct_retrain.not_an_api  # noqa: B018
