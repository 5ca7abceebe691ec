"""The pure modules type-check under mypy (pyproject.toml's [tool.mypy] lists them)."""
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _mypy(*args: str) -> subprocess.CompletedProcess:
    mypy = shutil.which("mypy", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("mypy")
    assert mypy is not None, "mypy is not installed (requirements.txt pins it; run make setup)"
    return subprocess.run([mypy, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_mypy_is_clean_on_the_pure_modules():
    done = _mypy()  # the files of [tool.mypy]
    assert done.returncode == 0, f"mypy found problems:\n{done.stdout}{done.stderr}"


def test_mypy_sees_a_type_error_with_the_project_settings(tmp_path):
    """The settings check something: a wrong call into the config package is reported."""
    probe = tmp_path / "probe.py"
    probe.write_text("from amct_retrain.config.common import config_error\n"
                     "from amct_retrain.record import SingleLayerRecord\n\n\n"
                     "def f() -> SingleLayerRecord:\n"
                     "    config_error(1, 'message')\n"
                     "    return 3\n")
    done = _mypy("--config-file", str(ROOT / "pyproject.toml"), str(probe))
    assert done.returncode == 1, f"mypy passed a wrong call:\n{done.stdout}{done.stderr}"
    assert 'Argument 1 to "config_error" has incompatible type "int"' in done.stdout, done.stdout
    assert 'Incompatible return value type (got "int", expected "SingleLayerRecord")' in done.stdout, done.stdout
