"""One writer per run folder: a second `esft train` on a folder in use stops with a one-line error
naming the holder; the lock dies with its process, so a killed run resumes at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esft.errors import ConfigError
from esft.runstore import RunStore


def _cli(model: Path, out: Path, iterations: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "esft", "train", "--model", str(model), "--output", str(out),
            "--task", "conciseness", "--population", "2", "--max-new-tokens", "4", "--seed", "1",
            "--iterations", str(iterations), "--quiet", *extra]  # fmt: skip


def test_second_writer_is_refused_and_a_killed_run_resumes(tiny_model, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(_cli(tiny_model, out, 100000), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (out / "seedlog.jsonl").exists():  # running and past its first iteration
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "first run did not start"
            time.sleep(0.2)
        second = subprocess.run(_cli(tiny_model, out, 100000, "--resume"), capture_output=True, text=True)
        assert second.returncode != 0
        err = second.stderr.strip()
        assert "in use by pid" in err and str(first.pid) in err and "\n" not in err
        assert first.poll() is None  # the first writer carries on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    log = [line for line in (out / "seedlog.jsonl").read_text().splitlines() if line.strip()]
    done = len(log)
    # killed with SIGKILL: the lock went with the process, so a resume starts immediately
    third = subprocess.run(_cli(tiny_model, out, done + 1, "--resume"), capture_output=True, text=True)
    assert third.returncode == 0, third.stderr[-2000:]
    iterations = [json.loads(x)["iteration"] for x in (out / "seedlog.jsonl").read_text().splitlines()]
    assert iterations == list(range(1, len(iterations) + 1))  # one contiguous log, no duplicates


def test_lock_is_exclusive_between_processes(tmp_path):
    store = RunStore(tmp_path / "r")
    store.lock()
    try:
        code = (
            "import sys\nfrom esft.runstore import RunStore\nfrom esft.errors import ConfigError\n"
            f"try:\n    RunStore({str(tmp_path / 'r')!r}).lock()\nexcept ConfigError as e:\n"
            "    print(e); sys.exit(3)\n"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode == 3 and f"pid {os.getpid()}" in r.stdout
    finally:
        store.unlock()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0


def test_lock_message_without_holder_info(tmp_path):
    store = RunStore(tmp_path / "r")
    store.lock()
    other = RunStore(tmp_path / "r")
    with pytest.raises(ConfigError, match="is in use"):
        other.lock()  # a second open file description in the same process conflicts too
    store.unlock()
    other.lock()
    other.unlock()
