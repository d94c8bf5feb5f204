"""Jobs against the sandbox itself and against each other: nothing outlives the host or its deadline,
no job changes what later jobs run under, and no result can hurt the host that reads it. Each test
asserts that the attack failed (the call returned EPERM, PID 1's state is unchanged, the host got a
bounded failure), not only that the job did not return a grid."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from esft import sandbox
from esft.sandbox import Limits, SandboxPool, SandboxResult, seccomp
from esft.tasks import arc, rgym

pytestmark = pytest.mark.usefixtures("needs_bwrap")

LIMITS = Limits(timeout_s=2, cpu_s=2, memory_mb=256)
GRID = [[1, 2], [3, 4]]
FLIP = "def transform(g):\n    return [row[::-1] for row in g]\n"


@pytest.fixture
def one():
    """A fresh pool of one sandbox, so a test can look at its PID 1."""
    p = SandboxPool(sandbox.ARC, workers=1)
    yield p
    p.close()


def run(p: SandboxPool, code: str, limits: Limits = LIMITS) -> SandboxResult:
    return p.run(code, "transform", [GRID], limits)


def all_gone(pids, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while not all(gone(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def gone(pid: int) -> bool:
    """No such process, or only its zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def pid1_state(pid: int) -> tuple:
    """PID 1 as the host sees it: limits, nice, CPUs, scheduling policy."""
    limits = Path(f"/proc/{pid}/limits").read_text()
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    status = Path(f"/proc/{pid}/status").read_text()
    cpus = next(line for line in status.splitlines() if line.startswith("Cpus_allowed_list"))
    return limits, stat[16], stat[38], cpus  # nice, policy


def flip_scores(n: int = 4) -> list[float]:
    """n correct ARC programs scored through the task's reward, as a training batch would be."""
    arc._CACHE.clear()
    completions = [f"```python\n{FLIP}# member {i}\n```" for i in range(n)]
    expected = [[row[::-1] for row in GRID]] * n
    return arc.arc_test_reward(None, completions, test_input=[GRID] * n, test_output=expected)


# -- nothing outlives its deadline or the host ------------------------------------------------------


def test_a_job_that_closes_its_pipe_is_killed_at_its_deadline(one):
    code = "import os, time\ndef transform(g):\n    os.closerange(3, 1024)\n    time.sleep(60)\n"
    t = time.monotonic()
    result = run(one, code)
    took = time.monotonic() - t
    assert not result.ok and result.error == "timeout"
    assert took < LIMITS.timeout_s + 1.5, took
    pid1 = one._all[0].pid1
    assert Path(f"/proc/{pid1}/task/{pid1}/children").read_text().split() == []
    assert run(one, FLIP).value == [[2, 1], [4, 3]]


def test_kill_takes_pid_1_and_its_jobs():
    p = SandboxPool(sandbox.ARC, workers=1)
    assert run(p, FLIP).ok
    box = p._all[0]
    pid1, bwrap = box.pid1, box.proc.pid
    p.close()
    assert all_gone([pid1, bwrap])


HOST = """
import sys, threading, time
sys.path[:0] = {path!r}
from esft import sandbox
p = sandbox.SandboxPool(sandbox.ARC, workers=1)
assert p.run("def f():\\n    return 1\\n", "f", []).ok
box = p._all[0]
threading.Thread(
    target=p.run,
    args=("import time\\ndef f():\\n    time.sleep(120)\\n", "f", [], sandbox.Limits(timeout_s=100, cpu_s=5)),
    daemon=True,
).start()
time.sleep(1.0)
print(box.pid1, box.proc.pid, flush=True)
time.sleep(600)
"""


def test_nothing_outlives_a_killed_host():
    """The host dies (SIGKILL, no clean-up) while a job sleeps: bwrap, PID 1 and the job all go.
    Without re-arming the parent-death signal after PID 1's uid change, PID 1 and the job lived on."""
    host = subprocess.Popen(
        [sys.executable, "-c", HOST.format(path=sys.path)], stdout=subprocess.PIPE, text=True
    )
    try:
        pid1, bwrap = map(int, host.stdout.readline().split())
        job = int(Path(f"/proc/{pid1}/task/{pid1}/children").read_text().split()[0])
        assert not gone(job)
    finally:
        host.kill()
        host.wait()
    assert all_gone([bwrap, pid1, job]), "a sandbox process outlived its host"


# -- no job changes what the next one runs under --------------------------------------------------

IOPRIO = (
    "import ctypes\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.syscall(251, {who}, (3 << 13) | 7) != 0:  # ioprio_set(..., IOPRIO_CLASS_IDLE)\n"
    "    raise OSError(ctypes.get_errno(), 'ioprio_set')"
)
SABOTAGE = {
    # what a job tried on PID 1 (pid 1 inside the sandbox, or its process group / user)
    "prlimit PID 1": "import resource\nresource.prlimit(1, resource.RLIMIT_NOFILE, (4, 4))",
    "prlimit PID 1 CPU": "import resource\nresource.prlimit(1, resource.RLIMIT_CPU, (1, 1))",
    "nice PID 1": "import os\nos.setpriority(os.PRIO_PROCESS, 1, 19)",
    "nice the process group": "import os\nos.setpriority(os.PRIO_PGRP, 0, 19)",
    "nice the user": "import os\nos.setpriority(os.PRIO_USER, os.getuid(), 19)",
    "pin PID 1": "import os\nos.sched_setaffinity(1, {0})",
    "idle-schedule PID 1": "import os\nos.sched_setscheduler(1, os.SCHED_IDLE, os.sched_param(0))",
    "sched_setparam PID 1": "import os\nos.sched_setparam(1, os.sched_param(0))",
    "ioprio PID 1": IOPRIO.format(who="1, 1"),  # IOPRIO_WHO_PROCESS, pid 1
    "ioprio the process group": IOPRIO.format(who="2, 0"),  # IOPRIO_WHO_PGRP, own group
}


@pytest.mark.parametrize("name", sorted(SABOTAGE))
def test_a_job_cannot_change_pid_1(one, name):
    body = textwrap.indent(SABOTAGE[name], "    ")
    result = run(one, f"def transform(g):\n{body}\n    return g\n")
    assert not result.ok and result.error.startswith(("PermissionError", "OSError: [Errno 1]")), result
    assert "[Errno 1]" in result.error  # EPERM: the call was refused, not failed on its arguments
    pid1 = one._all[0].pid1
    before = pid1_state(pid1)
    assert flip_scores_in(one) == [1.0] * 4
    assert pid1_state(pid1) == before and one._all[0].pid1 == pid1


def flip_scores_in(p: SandboxPool) -> list[float]:
    return [1.0 if run(p, FLIP).value == [[2, 1], [4, 3]] else 0.0 for _ in range(4)]


def test_a_sandbox_whose_state_changed_during_a_job_is_retired(one):
    """Whatever the route (none is known: the filter and the kernel refuse a job's calls on PID 1),
    PID 1 compares its own limits and scheduling before and after every job. Here the host renices
    PID 1 while a job runs: the sandbox retires, and the next jobs run in a fresh one."""
    assert run(one, FLIP).ok
    pid1 = one._all[0].pid1
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        slow = ex.submit(run, one, "import time\ndef transform(g):\n    time.sleep(1)\n    return g\n")
        time.sleep(0.5)
        os.setpriority(os.PRIO_PROCESS, pid1, 5)
        result = slow.result()
    assert not result.ok and "changed the sandbox" in result.error, result
    assert all_gone([pid1])
    assert flip_scores_in(one) == [1.0] * 4 and one._all[0].pid1 != pid1


def test_the_kernel_refuses_what_the_filter_would_let_through(one, monkeypatch):
    """PID 1 keeps real and saved uid 0: even without the filter's self-only checks, the kernel
    refuses a job's prlimit on PID 1 (its uids differ)."""
    build = seccomp.build_filter
    monkeypatch.setattr(sandbox.box.seccomp, "build_filter", lambda: build(self_only=False))
    result = run(
        one, "import resource\ndef transform(g):\n    resource.prlimit(1, resource.RLIMIT_NOFILE, (4, 4))\n"
    )
    assert not result.ok and result.error.startswith("PermissionError: [Errno 1]"), result
    assert flip_scores_in(one) == [1.0] * 4


def test_a_job_the_sandbox_failed_runs_again_in_a_fresh_one(one):
    """A job whose set-up fails (before any model code) is not the model's fault: the sandbox is
    retired and the job runs once more in a fresh one (here set-up fails in both, as the host-written
    preparation breaks every sandbox)."""
    one.prepare("import resource\nresource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))\n")
    pids = []
    real = sandbox.box._Sandbox.run

    def spy(self, *a, **k):
        pids.append(self.pid1)
        return real(self, *a, **k)

    sandbox.box._Sandbox.run = spy
    try:
        result = run(one, FLIP)
    finally:
        sandbox.box._Sandbox.run = real
    assert not result.ok and result.error.startswith("job set-up failed: ValueError"), result
    assert len(set(pids)) == 2 and all_gone(pids)


# -- results that would hurt the host -------------------------------------------------------------

RAW = "import os\ndef transform(g):\n    data = {data}\n    for fd in range(3, 64):\n        try:\n            os.write(fd, data)\n        except OSError:\n            pass\n    os._exit(0)\n"


@pytest.mark.parametrize(
    "data,why",
    [
        ("b'[' * 5000", "nested"),
        ("b'{\"ok\": true, \"value\": ' + b'[' * 1000 + b']' * 1000 + b'}'", "nested"),
        ("b'[' + b'[],' * 1_000_000 + b'[]]'", "too large"),
        ('b\'{"ok": true, "value": 1e999}\'', "non-finite"),
        ('b\'{"ok": true, "value": NaN}\'', "NaN"),
        ('b\'{"ok": true, "value": Infinity}\'', "Infinity"),
        ("b'{\"ok\": true, \"value\": ' + b'9' * 4300 + b'}'", "digits"),
        ("b'{\"ok\": true, \"value\": ' + b'9' * 5000 + b'}'", "digits"),
        ("b'\\xff\\xfe'", "unreadable"),
        ("b'[1, 2]'", "not a status"),
    ],
)
def test_hostile_raw_results_fail_in_bounds(one, data, why):
    result = run(one, RAW.format(data=data))
    assert not result.ok and why in result.error, result
    assert len(one._all) == 1 and one._all[0].alive()  # no sandbox lost or left outside the pool


def test_deep_results_never_raise_and_leave_no_sandbox_behind():
    """One batch with two programs that answer with 1000-deep JSON, in a pool of two: before, the
    host's parser raised RecursionError to the caller and left sandboxes outside the pool."""
    p = SandboxPool(sandbox.ARC, workers=2)
    try:
        deep = RAW.format(data="b'{\"ok\": true, \"value\": ' + b'[' * 1000 + b']' * 1000 + b'}'")
        jobs = [(deep, "transform", [GRID]), (FLIP, "transform", [GRID])] * 2
        results = p.run_many(jobs, LIMITS)
        assert [r.ok for r in results] == [False, True, False, True]
        assert len(p._all) <= 2 and all(b.alive() for b in p._all)
    finally:
        p.close()


def test_run_untrusted_never_raises_for_what_the_job_does():
    deep = RAW.format(data="b'[' * 100000")
    result = sandbox.run_untrusted(deep, "transform", [GRID], timeout_s=2, cpu_s=2, memory_mb=256)
    assert isinstance(result, SandboxResult) and not result.ok


def test_results_are_bounded_in_the_job_too(one):
    deep = "def transform(g):\n    x = []\n    for _ in range(2000):\n        x = [x]\n    return x\n"
    assert "nested deeper" in run(one, deep).error
    many = "def transform(g):\n    return [0] * 200_000\n"
    assert "more than" in run(one, many).error
    assert "ValueError" in run(one, "def transform(g):\n    return float('inf')\n").error


def test_a_del_flood_fails_without_restarting_the_sandbox(one):
    """Characters JSON escapes six-fold (0x7f) once pushed the re-encoded answer past the host's cap."""
    assert run(one, FLIP).ok
    pid1 = one._all[0].pid1
    result = run(one, "def transform(g):\n    return chr(127) * 200_000\n")
    assert not result.ok and result.error == "output too large"
    raw = run(one, RAW.format(data="b'{\"ok\": true, \"value\": \"' + b'\\x7f' * 200_000 + b'\"}'"))
    assert raw.ok and raw.value == "\x7f" * 200_000  # forwarded as is, never re-encoded
    assert one._all[0].pid1 == pid1


def test_arc_keeps_only_grids(one):
    arc._CACHE.clear()
    programs = [
        "def transform(g):\n    return [[0] * 31]\n",  # too wide
        "def transform(g):\n    return [[10]]\n",  # not a colour
        "def transform(g):\n    return [[True]]\n",
        "def transform(g):\n    return [[[]] * 3] * 3\n",
        "import numpy as np\ndef transform(g):\n    return [list(np.array(r)[::-1]) for r in g]\n",  # numpy ints
        "import numpy as np\ndef transform(g):\n    return np.fliplr(np.array(g))\n",
    ]
    got = arc.run_programs([(code, [GRID]) for code in programs])
    assert got == [[None], [None], [None], [None], [[[2, 1], [4, 3]]], [[[2, 1], [4, 3]]]]
    assert all(v is None or arc.is_grid(v) for values in arc._CACHE.values() for v in values)


# -- weak spots ---------------------------------------------------------------------------------

SYSCALL = "import ctypes\ndef transform(g):\n    libc = ctypes.CDLL(None, use_errno=True)\n    return [libc.syscall({nr}, {args}), ctypes.get_errno()]\n"


@pytest.mark.parametrize(
    "name,nr,args",
    [
        ("sync", 162, "0"),
        ("syncfs", 306, "0"),
        ("memfd_create", 319, "b'x', 0"),
        ("inotify_init1", 294, "0"),
    ],
)
def test_host_wide_calls_are_refused(one, name, nr, args):
    result = run(one, SYSCALL.format(nr=nr, args=args))
    assert result.ok and result.value == [-1, errno.EPERM], (name, result)


def test_memfd_cannot_hold_memory_outside_the_limit(one):
    code = "import os\ndef transform(g):\n    fd = os.memfd_create('x')\n    os.ftruncate(fd, 900 << 20)\n    return g\n"
    result = run(one, code)
    assert not result.ok and result.error.startswith("PermissionError"), result


@pytest.mark.parametrize(
    "mess",
    [
        "os.symlink('/', 'root')\n    os.symlink('/esft-work', 'work')",
        "for _ in range(1100):\n        os.mkdir('d')\n        os.chdir('d')",
        "for _ in range(300):\n        os.mkdir('x' * 250)\n        os.chdir('x' * 250)",  # past PATH_MAX
        "os.mkdir('locked')\n    open('locked/f', 'w').close()\n    os.chmod('locked', 0)",
    ],
    ids=["links", "deep", "long-path", "unreadable"],
)
def test_cleanup_survives_what_a_job_leaves(one, mess):
    assert run(one, FLIP).ok
    pid1 = one._all[0].pid1
    result = run(one, f"import os\ndef transform(g):\n    {mess}\n    return [[1]]\n")
    assert result.ok, result
    assert one._all[0].pid1 == pid1 and one._all[0].alive(), "clean-up crashed PID 1"
    listing = run(one, "import os\ndef transform(g):\n    return os.listdir('/esft-work')\n")
    assert listing.ok and len(listing.value) == 1  # only this job's own folder


def test_a_huge_int_scores_zero_without_raising():
    big = 10**400
    assert rgym.as_score(SandboxResult(True, value=big)) == 0.0
    assert rgym.as_score(SandboxResult(True, value=float("inf"))) == 0.0
    assert rgym.as_score(SandboxResult(True, value=float("nan"))) == 0.0
    assert rgym.as_score(SandboxResult(True, value=True)) == 0.0
    assert rgym.as_score(SandboxResult(True, value=0.5)) == 0.5
    assert rgym.as_score(SandboxResult(True, value=7)) == 1.0
