"""Runs bad-input cases (cases.py) in this process, one after the other: reads case indices on
stdin, answers one JSON line per case on stdout. A case that crashes the process (a C++ abort)
ends the worker: the parent counts that case as failed and starts a new worker.

    python -m tests.bad_inputs.worker ASSETS_DIR WORK_DIR
"""
import hashlib
import io
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import time
import traceback


def _snapshot(folder: pathlib.Path) -> dict[str, str]:
    """Relative path -> sha256 (or the link target) of every file under ``folder``."""
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            files[rel] = "link:" + os.readlink(path)
        elif path.is_file() and not path.name.endswith(".lock"):  # the record's lock sidecar
            files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def _files_named(message: str, files: dict[str, str], names: tuple[str, ...]) -> list[str]:
    """The names the message lacks (a role of ``files`` stands for its path)."""
    return [name for name in names if str(files[name] if name in files else name) not in message]


def run_case(case, assets: pathlib.Path, folder: pathlib.Path, tmpdir: pathlib.Path) -> dict:
    from amct_retrain.errors import AmctError
    from tests.bad_inputs.cases import Env

    files = case.prepare(Env(folder, assets))
    before, tmp_before = _snapshot(folder), _snapshot(tmpdir)
    result = {"name": case.name}
    try:
        case.call(files)
    except AmctError as err:
        message = str(err)
        missing = _files_named(message, files, case.names)
        result.update(ok=not missing, error=type(err).__name__, message=message[:600],
                      detail=f"the message lacks {missing}" if missing else "")
    except BaseException as err:  # noqa: BLE001 - anything else is what the corpus hunts
        result.update(ok=False, error=type(err).__name__, message=str(err)[:600],
                      detail="not an AmctError:\n" + "".join(traceback.format_exception(err))[-1500:])
    else:
        result.update(ok=False, error=None, message="", detail="the call raised nothing")
    after, tmp_after = _snapshot(folder), _snapshot(tmpdir)
    changed = sorted(k for k in before if after.get(k) != before[k])
    new = sorted(set(after) - set(before))
    litter = sorted(set(tmp_after) - set(tmp_before))
    if changed or new or litter:
        result["ok"] = False
        result["detail"] += (f" inputs changed: {changed}" if changed else "") + \
                            (f" files written: {new}" if new else "") + (f" left in TMPDIR: {litter}" if litter else "")
    return result


def main() -> None:
    assets, work = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    tmpdir = work / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(tmpdir)  # litter of the calls shows here
    tempfile.tempdir = str(tmpdir)
    logging.basicConfig(level=logging.ERROR, stream=io.StringIO())
    from tests.bad_inputs.cases import all_cases

    cases = all_cases()
    print(json.dumps({"ready": len(cases)}), flush=True)
    for line in sys.stdin:
        index = int(line)
        folder = work / f"case{index:03d}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        started = time.monotonic()
        try:
            result = run_case(cases[index], assets, folder, tmpdir)
        except BaseException as err:  # noqa: BLE001 - a broken case setup
            result = {"name": cases[index].name, "ok": False, "error": type(err).__name__,
                      "detail": "case setup failed:\n" + traceback.format_exc()[-1500:]}
        result.update(index=index, seconds=round(time.monotonic() - started, 2))
        print(json.dumps(result), flush=True)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
