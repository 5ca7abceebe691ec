"""The wheel (pyproject.toml): what it holds, and a working toolkit from it in a fresh venv with pycaffe."""
import email.parser
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import caffe
import pytest

from tests.test_caffe_build import PYTHON_LAYER_NET

pytestmark = pytest.mark.caffe
ROOT = pathlib.Path(__file__).resolve().parents[1]
# What a build of the wheel needs from the source tree (built from a copy: no build/ in the tree).
SOURCES = ("pyproject.toml", "README.md", "amct_retrain", "layers", "solver_templates")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp / "dist"), str(source)], capture_output=True, text=True)
    assert run.returncode == 0, f"pip wheel failed:\n{run.stderr[-3000:]}"
    (path,) = (tmp / "dist").glob("amct_retrain-*.whl")
    return path


def test_wheel_holds_every_module_the_layers_and_the_templates(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(ROOT)) for p in (ROOT / "amct_retrain").rglob("*.py")}
    expected |= {"amct_retrain_layers/" + p.name for p in (ROOT / "layers").glob("*.py")}
    expected |= {"amct_retrain/solver_templates/" + p.name for p in (ROOT / "solver_templates").glob("*.prototxt")}
    assert expected - names == set(), f"the wheel lacks {sorted(expected - names)}"
    (dist_info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    archive = zipfile.ZipFile(wheel)
    assert "amct-retrain = amct_retrain.cli:main" in archive.read(f"{dist_info}/entry_points.txt").decode()
    metadata = email.parser.Parser().parsestr(archive.read(f"{dist_info}/METADATA").decode())
    requires = " ".join(metadata.get_all("Requires-Dist"))
    for dependency in ("matplotlib", "numpy", "protobuf", "pydantic", "pyyaml", "tensorboardX", "tqdm", 'onnx>=1.16; extra == "onnx"',
                       'onnxruntime>=1.18; extra == "onnx"'):
        assert dependency in requires, f"the wheel does not declare {dependency}: {requires}"


def test_wheel_installed_in_a_fresh_venv_with_pycaffe_works(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = pathlib.Path(subprocess.run([venv / "bin" / "python", "-c",
                                        "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                       capture_output=True, text=True, check=True).stdout.strip())
    # The fresh venv has pycaffe (its build tree) and the toolkit's dependencies (this venv's
    # site-packages as a plain path: its editable install of the toolkit is not activated).
    pycaffe = pathlib.Path(caffe.__file__).resolve().parents[1]
    (site / "with_pycaffe.pth").write_text(f"{pycaffe}\n{sysconfig.get_paths()['purelib']}\n")
    run = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                          "--no-deps", str(wheel)], capture_output=True, text=True)
    assert run.returncode == 0, f"pip install of the wheel failed:\n{run.stderr[-3000:]}"
    net = tmp_path / "py_layer.prototxt"
    net.write_text(PYTHON_LAYER_NET)
    code = f"""
import amct_retrain, amct_retrain_layers, caffe
from amct_retrain import solver
assert amct_retrain.__file__.startswith({str(site)!r}), amct_retrain.__file__
import amct_retrain.analysis.runner as analysis  # a subpackage, from the wheel
assert analysis.__file__.startswith({str(site)!r}) and amct_retrain.analyze is analysis.analyze, analysis.__file__
assert amct_retrain_layers.__file__.startswith({str(site)!r}), amct_retrain_layers.__file__
for template in ("retrain_sgd", "retrain_adam"):  # the templates, from the installed package data
    solver.create_solver("solver.prototxt", "retrain.prototxt", max_iter=10, test_iter=1, template=template)
    text = open("solver.prototxt").read()
    assert "retrain.prototxt" in text and "max_iter: 10" in text, text
net = caffe.Net({str(net)!r}, caffe.TRAIN)  # clips given: no factor measured from the batch
net.forward()
print("ok", round(float(net.blobs["y"].data.max()), 4))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([venv / "bin" / "python", "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0 and run.stdout.startswith("ok"), f"the installed toolkit failed:\n{run.stderr[-3000:]}"
    run = subprocess.run([venv / "bin" / "amct-retrain", "--help"], capture_output=True, text=True, cwd=tmp_path,
                         env=env)
    assert run.returncode == 0 and "prepare" in run.stdout, f"amct-retrain --help failed:\n{run.stderr[-2000:]}"
