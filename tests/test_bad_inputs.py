"""The bad-input corpus (tests/bad_inputs/cases.py) over the public calls and CLI steps.

Each case runs in a worker process separate from pytest's (two workers, each running many cases,
so that a C++ abort fails one case, not the run): the call must raise an AmctError whose
message names the file (and layer / field where the case says), leave its inputs unchanged and
write no output and no temp file. The test prints handled / total.
"""
import json
import os
import pathlib
import queue
import subprocess
import sys
import threading
import time

import pytest

from tests.bad_inputs import assets as corpus_assets
from tests.bad_inputs.cases import all_cases
from tests.bad_inputs.worker import _snapshot

pytestmark = pytest.mark.caffe

WORKERS = 2
CASE_TIMEOUT_S = 120
REPO = pathlib.Path(__file__).resolve().parents[1]


class _Worker:
    """One worker process; restarted after a case that kills it."""

    def __init__(self, assets: pathlib.Path, work: pathlib.Path) -> None:
        self.assets, self.work = assets, work
        self.start()

    def start(self) -> None:
        env = dict(os.environ, GLOG_minloglevel="2", PYTHONPATH=str(REPO))
        self.log = open(self.work / "worker.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.bad_inputs.worker", str(self.assets),
                                      str(self.work)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, cwd=REPO, env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self.lines), daemon=True).start()
        ready = self.lines.get(timeout=CASE_TIMEOUT_S)
        assert ready is not None and "ready" in json.loads(ready), f"worker did not start: {ready}"

    @staticmethod
    def _read(proc, lines) -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def run(self, index: int, name: str) -> dict:
        self.proc.stdin.write(f"{index}\n")
        self.proc.stdin.flush()
        try:
            line = self.lines.get(timeout=CASE_TIMEOUT_S)
        except queue.Empty:
            line, hung = None, True
        else:
            hung = False
        if line is None:
            if hung:
                self.proc.kill()
            code = self.proc.wait()
            self.log.close()
            self.start()
            return {"index": index, "name": name, "ok": False, "error": "crash",
                    "detail": f"the worker {'hung' if hung else 'died'} (exit {code})"}
        return json.loads(line)

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


def test_every_bad_input_is_a_named_error_with_no_output(tmp_path):
    assets = corpus_assets.build(tmp_path / "assets")
    assets_before = _snapshot(assets)
    cases = all_cases()
    assert len(cases) >= 100, f"the corpus has {len(cases)} cases"
    todo: queue.Queue = queue.Queue()
    for index, case in enumerate(cases):
        todo.put((index, case.name))
    results: list[dict] = []
    started = time.monotonic()

    def drive(number: int) -> None:
        work = tmp_path / f"worker{number}"
        work.mkdir()
        worker = _Worker(assets, work)
        try:
            while True:
                try:
                    index, name = todo.get_nowait()
                except queue.Empty:
                    return
                results.append(worker.run(index, name))
        finally:
            worker.stop()

    threads = [threading.Thread(target=drive, args=(n,)) for n in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    failed = sorted((r for r in results if not r["ok"]), key=lambda r: r["index"])
    print(f"\nbad-input corpus: {len(results) - len(failed)} / {len(cases)} handled "
          f"({len(failed)} not, {elapsed:.0f} s with {WORKERS} workers)")
    slowest = sorted(results, key=lambda r: -r.get("seconds", 0))[:5]
    print("  slowest: " + ", ".join(f"{r['name']} {r.get('seconds', 0):.1f} s" for r in slowest))
    for r in failed:
        print(f"  NOT HANDLED {r['name']}: {r.get('error')}: {r.get('message', '')[:300]} {r.get('detail', '')}")
    assert len(results) == len(cases), "some cases did not run"
    assert _snapshot(assets) == assets_before, "a case modified the shared assets"
    assert not failed, f"{len(failed)} of {len(cases)} bad inputs not handled cleanly: " + \
        "; ".join(f"{r['name']} ({r.get('error')}: {r.get('detail', '')[:200]})" for r in failed)
