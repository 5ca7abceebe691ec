"""Rewrite the golden files: ``python -m tests.golden.regenerate [--retrain]``.

Rewrites every pass output under ``tests/golden/passes/`` and the compatibility case's saved files
and outputs from its committed retrained snapshot. ``--retrain`` first retrains the compatibility
net (new snapshot and record): only when the saved format changes on purpose, since the committed
snapshot stands for the models users saved with earlier versions. Review the diff before committing.
"""
import argparse
import pathlib
import shutil
import tempfile

import numpy as np

from tests.golden import compat
from tests.golden.cases import NETS, PASSES_DIR, pass_outputs


def _work() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="amct_golden_")


def write_pass_files() -> None:
    for name in NETS:
        with _work() as work:
            outputs = pass_outputs(name, pathlib.Path(work).resolve())
        folder = PASSES_DIR / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for file_name, text in outputs.items():
            (folder / file_name).write_text(text)
        print(f"{folder}: {len(outputs)} files")


def write_compat_files(retrain: bool) -> None:
    compat.COMPAT_DIR.mkdir(exist_ok=True)
    if retrain or not all((compat.COMPAT_DIR / name).exists() for name in compat.RETRAINED):
        with _work() as work:
            for file_name, data in compat.retrain(pathlib.Path(work).resolve()).items():
                (compat.COMPAT_DIR / file_name).write_bytes(data)
    with _work() as work:
        saved = compat.save(pathlib.Path(work).resolve())
    shutil.rmtree(compat.SAVED_DIR, ignore_errors=True)
    compat.SAVED_DIR.mkdir()
    for file_name, data in saved.items():
        (compat.SAVED_DIR / file_name).write_bytes(data)
    np.save(compat.OUTPUTS_FILE, compat.saved_model_outputs(compat.SAVED_DIR))
    print(f"{compat.COMPAT_DIR}: {len(saved)} saved files and {compat.OUTPUTS_FILE.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retrain", action="store_true", help="retrain the compatibility net first")
    args = parser.parse_args()
    write_pass_files()
    write_compat_files(args.retrain)


if __name__ == "__main__":
    main()
