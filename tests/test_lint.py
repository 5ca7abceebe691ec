"""The tree is clean under the project's ruff rule set (pyproject.toml's [tool.ruff])."""
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_ruff_check_is_clean():
    ruff = shutil.which("ruff", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff is not None, "ruff is not installed (requirements.txt pins it; run make setup)"
    done = subprocess.run([ruff, "check", "amct_retrain", "layers", "tests", "samples", "bench", "tools"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"ruff check found problems:\n{done.stdout}{done.stderr}"
