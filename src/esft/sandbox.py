"""Run untrusted code (model-written programs, graders that evaluate model text) under OS isolation.

The boundary is the operating system, provided by bubblewrap (``bwrap``), never checks inside Python:

- **Namespaces.** Each sandbox is a ``bwrap`` process with its own mount, PID, network (no interfaces
  at all), IPC, UTS and cgroup namespaces, ``--die-with-parent``, and a new session. Started as
  root, bubblewrap builds the namespaces with root's right to bind any path; the program inside then
  drops to the unprivileged ``nobody`` uid/gid, which clears every capability. (A user namespace made
  by root would map the sandbox user onto host root: exempt from RLIMIT_NPROC and owner of every root
  file.) Started by any other user, bubblewrap adds a user namespace and drops all capabilities.
- **A filesystem of almost nothing.** The root is an empty tmpfs. Read-only binds: the Python binary,
  its standard library (with its ``site-packages`` hidden under an empty tmpfs), the system library
  folders the interpreter links against, and only the packages a profile names (numpy for ARC; for
  reasoning-gym graders, the packages it imports). No home, no task data, no other site-packages,
  no /proc, a minimal /dev. The work folder ``/esft-work`` is a tmpfs capped in size.
- **One process per job.** The sandbox's PID 1 (:mod:`esft.sandbox_zygote`) runs only host-written
  code. For each job it forks; the job process sets rlimits (CPU seconds, address space, file size,
  open files, no processes, no core dumps), installs a seccomp filter (:mod:`esft.seccomp`: no
  exec, fork, signals to others, ptrace, sockets, mounts, IPC, io_uring ...), and only then runs model
  code. Jobs cannot reach one another: PID 1 ignores their signals, the work folder is emptied after
  each job, and nothing else in the sandbox is writable.
- **The host reads bounded output.** PID 1 forwards each job's raw result (at most
  ``Limits.max_output_bytes``) behind a header line of its own, never parsing it; the host parses it
  as JSON (never pickle) only after checking its nesting depth, with NaN, infinities and ints of more
  than 18 digits refused. Each job has a wall-clock deadline that PID 1 enforces even when the job
  closed its pipe, and the host a deadline on each answer; a sandbox that misbehaves is killed with
  its whole PID namespace (PID 1 included, through a pidfd) and started afresh.
- **No job can hurt another.** The seccomp filter lets a job change limits, priority and scheduling
  only of itself (never of PID 1, which shares its uid), PID 1 compares its own state before and
  after every job, and a sandbox whose state changed, whose clean-up failed or whose job could not
  be set up is retired; a job that failed in set-up (before any model code ran) is run again once in
  a fresh sandbox, so one member's program cannot lower the others' scores.
- **Nothing outlives the host.** bubblewrap's ``--die-with-parent`` is re-armed in PID 1 after its
  uid change (which clears it), and the kernel kills every job when PID 1 dies.

If bubblewrap is missing or cannot create namespaces here, :func:`require_sandbox` raises a one-line
:class:`~esft.errors.ConfigError` that says how to install it: there is no unsandboxed fallback.

Sandboxes are started lazily, one per profile and worker, and reused across calls (starting one costs
the interpreter start-up plus the profile's imports; a job costs a ``fork``): see docs/benchmarks.md.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import functools
import importlib
import importlib.metadata
import json
import math
import os
import pickle
import re
import select
import shutil
import signal
import site
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esft import seccomp
from esft.errors import ConfigError

MAX_HEADER_BYTES = 64 * 1024  # PID 1's own answer lines
MAX_INT_DIGITS = 18
WORK = "/esft-work"  # the jobs' tmpfs inside the sandbox (esft.sandbox_zygote.WORK_ROOT)
NOBODY = 65534
INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap)"
)
ZYGOTE_SOURCE = (Path(__file__).parent / "sandbox_zygote.py").read_text()
_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="esft-sandbox-spawner")


@dataclass
class SandboxResult:
    ok: bool
    value: Any = None
    error: str = ""
    retry: bool = False  # the sandbox failed before the job's code ran: not the job's fault


@dataclass(frozen=True)
class Limits:
    """Per-job limits. ``timeout_s`` is wall clock; ``cpu_s`` is CPU time (RLIMIT_CPU)."""

    timeout_s: float = 5.0
    cpu_s: int = 5
    memory_mb: int = 512
    file_mb: int = 16
    max_output_bytes: int = 256 * 1024  # the job's JSON result
    max_depth: int = 16  # nesting of the result
    max_items: int = 100_000  # values in the result


@dataclass(frozen=True)
class Profile:
    """What a sandbox preloads and may see: ``packages`` are import names whose distributions are
    bound read-only; ``preload`` are imported by PID 1 before the first job."""

    name: str
    packages: tuple[str, ...] = ()
    preload: tuple[str, ...] = ()
    work_mb: int = 64


ARC = Profile("arc", packages=("numpy",), preload=("numpy",))
PLAIN = Profile("plain")


class SandboxUnavailable(ConfigError):
    """bubblewrap is missing or cannot start a sandbox here."""


# --------------------------------------------------------------------------------------------------
# What the sandbox can see


def _ldd_paths(binary: str) -> list[str]:
    try:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    paths = []
    for line in out.splitlines():
        parts = line.split()
        for p in parts:
            if p.startswith("/"):
                paths.append(p)
    return paths


def _site_dirs() -> list[str]:
    dirs = set(site.getsitepackages())
    with contextlib.suppress(Exception):
        dirs.add(site.getusersitepackages())
    for p in sys.path:
        if p.endswith(("site-packages", "dist-packages")):
            dirs.add(p)
    return sorted(os.path.realpath(d) for d in dirs if os.path.isdir(d))


@functools.cache
def _package_paths(packages: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(paths to bind, sys.path entries) for what importing ``packages`` loads from site-packages.

    The imports run in a clean child interpreter, so only their own dependencies count. Each loaded
    top-level entry is bound, plus the other top-level files of its distribution (e.g. ``numpy.libs``
    with numpy's bundled shared libraries) and its metadata folder."""
    if not packages:
        return (), ()
    code = (
        "import sys, json\n"
        "before = set(sys.modules)\n"
        f"for n in {list(packages)!r}: __import__(n)\n"
        "new = [m for k, m in list(sys.modules.items()) if k not in before]\n"
        "print(json.dumps([getattr(m, '__file__', None) or '' for m in new]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_child_env()
    )
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1:] or ["no output"]  # the exception line
        raise ConfigError(f"cannot import {', '.join(packages)} for the sandbox: {tail[0]}")
    sites = _site_dirs()
    tops: dict[str, str] = {}  # top-level entry -> its site-packages folder
    for file in json.loads(out.stdout.strip().splitlines()[-1]):
        real = os.path.realpath(file) if file else ""
        for s in sites:
            if real.startswith(s + os.sep):
                tops[os.path.relpath(real, s).split(os.sep)[0]] = s
    dist_of = importlib.metadata.packages_distributions()
    binds = {os.path.join(s, top) for top, s in tops.items()}
    for top, s in tops.items():
        for dist_name in dist_of.get(top.split(".")[0], []):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                for f in importlib.metadata.distribution(dist_name).files or []:
                    first = f.parts[0]
                    if first not in ("..", "__pycache__") and os.path.exists(os.path.join(s, first)):
                        binds.add(os.path.join(s, first))
    return tuple(sorted(binds)), tuple(sorted(set(tops.values())))


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "HOME", "VIRTUAL_ENV")}
    env.setdefault("PATH", "/usr/bin:/bin")
    return env


def _link_chain(path: str) -> tuple[list[tuple[str, str]], str]:
    """The symlinks met while resolving ``path`` as (target, link) pairs, and the real path."""
    links: list[tuple[str, str]] = []
    queue = list(Path(path).parts[1:])
    cur = "/"
    for _ in range(256):
        if not queue:
            break
        comp = queue.pop(0)
        if comp in ("", "."):
            continue
        if comp == "..":
            cur = os.path.dirname(cur)
            continue
        nxt = os.path.join(cur, comp)
        if os.path.islink(nxt):
            target = os.readlink(nxt)
            links.append((target, nxt))
            if os.path.isabs(target):
                cur, queue = "/", list(Path(target).parts[1:]) + queue
            else:
                queue = list(Path(target).parts) + queue
            continue
        cur = nxt
    return links, cur


@functools.cache
def _system_binds() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(read-only binds, symlinks) for the interpreter, its stdlib and the shared libraries it links.

    Everything is bound at its real path; the symlinks on the way (``/lib64`` -> ``usr/lib64``, the
    ELF interpreter's own link) are recreated, so the paths compiled into binaries still resolve."""
    wanted = [sys.executable, _stdlib()]
    for lib in _ldd_paths(os.path.realpath(sys.executable)):
        wanted.append(os.path.dirname(lib))  # the library's folder: extension modules link more from it
        wanted.append(lib)
    if os.path.exists("/etc/ld.so.cache"):
        wanted.append("/etc/ld.so.cache")
    binds: set[str] = set()
    links: dict[str, str] = {}
    for path in wanted:
        chain, real = _link_chain(path)
        for target, link in chain:
            links[link] = target
        if os.path.exists(real):
            binds.add(real)
    # a path inside another bound folder needs no bind of its own
    binds = {b for b in binds if not _under(b, [o for o in binds if o != b])}
    return tuple(sorted(binds)), tuple(sorted(links.items()))


def _stdlib() -> str:
    """The standard library folder of the base interpreter (not a venv's), lib-dynload inside it."""
    return os.path.realpath(os.path.dirname(os.__file__))


def _hidden_dirs(binds: tuple[str, ...]) -> list[str]:
    """Package folders that a system bind would expose (the base interpreter's site-packages, a
    distribution's dist-packages): each is covered by an empty tmpfs."""
    hidden = set()
    for bound in binds:
        if not os.path.isdir(bound):
            continue
        for pattern in ("site-packages", "dist-packages", "*/site-packages", "*/dist-packages"):
            hidden.update(os.path.realpath(p) for p in Path(bound).glob(pattern) if p.is_dir())
    hidden.update(s for s in _site_dirs() if _under(s, list(binds)))
    return sorted(hidden)


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def bwrap_command(profile: Profile, info_fd: int) -> list[str]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(
            f"this task runs model output as code (ARC programs, reasoning-gym graders) and needs the "
            f"bubblewrap sandbox (bwrap), not found: {INSTALL_HINT}"
        )
    cmd = [bwrap, "--die-with-parent", "--new-session", "--as-pid-1", "--info-fd", str(info_fd)]
    cmd += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if os.getuid() == 0:
        cmd += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        cmd += ["--unshare-user", "--disable-userns"]
    system, links = _system_binds()
    pkg_binds, _ = _package_paths(profile.packages)
    bound = [*system, *pkg_binds]
    links = tuple((lk, t) for lk, t in links if not _under(lk, bound))
    # bubblewrap makes missing parent folders 0700 (root's): make them traversable for the job's uid
    parents = {str(a) for d in [*bound, *(lk for lk, _ in links), WORK] for a in Path(d).parents}
    for d in sorted(p for p in parents if p != "/" and not _under(p, bound)):
        cmd += ["--perms", "0755", "--dir", d]
    for path in system:
        cmd += ["--ro-bind", path, path]
    for link, target in links:
        cmd += ["--symlink", target, link]
    for d in _hidden_dirs(system):
        cmd += ["--tmpfs", d]
    for p in pkg_binds:
        cmd += ["--ro-bind", p, p]
    # /dev read-only: run without root, bubblewrap's /dev (and its /dev/shm) belongs to the job's uid
    cmd += ["--dev", "/dev", "--remount-ro", "/dev"]
    cmd += ["--size", str(profile.work_mb << 20), "--tmpfs", WORK]
    if os.getuid() == 0:
        cmd += ["--chmod", "0777", WORK]
    cmd += ["--remount-ro", "/", "--chdir", WORK, "--clearenv"]
    cmd += ["--setenv", "PATH", "/nonexistent", "--setenv", "HOME", WORK, "--setenv", "TMPDIR", WORK]
    cmd += ["--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONDONTWRITEBYTECODE", "1"]
    cmd += [os.path.realpath(sys.executable), "-I", "-S", "-B", "-c", ZYGOTE_SOURCE]
    return cmd


# --------------------------------------------------------------------------------------------------
# One running sandbox


class _Sandbox:
    """One bwrap process running the zygote; jobs are sent one at a time."""

    def __init__(self, profile: Profile):
        self.prepared: list[str] = []  # host code already run by prepare()
        self.pid1_fd = None
        self._buf = bytearray()
        info_r, info_w = os.pipe()
        try:
            cmd = bwrap_command(profile, info_w)
            # --die-with-parent is PR_SET_PDEATHSIG, which fires when the *thread* that started
            # bwrap exits: start every sandbox from one long-lived thread, not from a worker thread.
            self.proc = _SPAWNER.submit(
                subprocess.Popen,
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(info_w,),
                start_new_session=True,
                env={"PATH": "/usr/bin:/bin"},
            ).result()
        except OSError as e:
            os.close(info_r)
            raise SandboxUnavailable(f"cannot start bubblewrap ({e}): {INSTALL_HINT}") from None
        finally:
            os.close(info_w)
        _, sys_path = _package_paths(profile.packages)
        settings = {
            "sys_path": list(sys_path),
            "preload": list(profile.preload),
            "env": {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            | {"MPLCONFIGDIR": WORK, "MPLBACKEND": "Agg"},
            "uid": NOBODY,
            "gid": NOBODY,
            "seccomp": seccomp.build_filter(),
        }
        try:
            self._send(settings)
            ready = self._read_line(time.monotonic() + 120)
        except (OSError, TimeoutError, ValueError) as e:
            err = self._stderr_tail()
            self.kill()
            os.close(info_r)
            raise SandboxUnavailable(
                f"bubblewrap could not start a sandbox here ({err or e}); model-written code only runs "
                f"sandboxed: {INSTALL_HINT}, and allow it to create namespaces"
            ) from None
        info = os.read(info_r, 4096)
        os.close(info_r)
        if not isinstance(ready, dict) or not ready.get("ready"):
            self.kill()
            raise SandboxUnavailable(f"sandbox failed to start: {ready!r}")
        self.pid1 = json.loads(info.decode()).get("child-pid") if info else None
        self.pid1_fd: int | None = None
        if self.pid1:
            with contextlib.suppress(OSError):
                self.pid1_fd = os.pidfd_open(self.pid1)  # kill() reaches PID 1 even in its own session
        self.base_vm = _vm_size(self.pid1)

    # framing
    def _send(self, obj: Any) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        assert self.proc.stdin is not None
        self.proc.stdin.write(struct.pack(">Q", len(data)) + data)
        self.proc.stdin.flush()

    def _fill(self, deadline: float) -> None:
        """Read one more chunk from PID 1 into the buffer, waiting until ``deadline``."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("sandbox did not answer in time")
            if select.select([fd], [], [], left)[0]:
                break
        chunk = os.read(fd, 65536)
        if not chunk:
            raise OSError("sandbox exited")
        self._buf += chunk

    def _read_line(self, deadline: float) -> Any:
        """One JSON line written by PID 1 (at most MAX_HEADER_BYTES, parsed with bounds)."""
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_HEADER_BYTES:
                raise ValueError("sandbox answer too large")
            self._fill(deadline)
        line, _, self._buf = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(self._buf)
        if len(line) > MAX_HEADER_BYTES:
            raise ValueError("sandbox answer too large")
        return loads_bounded(line, max_depth=4)

    def _read_exact(self, size: int, deadline: float) -> bytes:
        while len(self._buf) < size:
            self._fill(deadline)
        data, self._buf = bytes(self._buf[:size]), self._buf[size:]
        return data

    def _stderr_tail(self) -> str:
        with contextlib.suppress(Exception):
            assert self.proc.stderr is not None
            if select.select([self.proc.stderr], [], [], 0.5)[0]:
                text = os.read(self.proc.stderr.fileno(), 8192).decode("utf-8", "replace").strip()
                return (text.splitlines() or [""])[-1][-300:]
        return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def prepare(self, code: str) -> None:
        self._send({"op": "prepare", "code": code})
        answer = self._read_line(time.monotonic() + 300)
        if not isinstance(answer, dict) or not answer.get("ok"):
            error = answer.get("error") if isinstance(answer, dict) else answer
            raise RuntimeError(f"sandbox prepare failed: {error}")
        self.prepared.append(code)

    def run(self, code: str | None, func: str, args: list | tuple, limits: Limits) -> SandboxResult:
        """One job. Raises (OSError, TimeoutError, ValueError) when the sandbox itself misbehaved:
        the caller then discards it. ``SandboxResult.retry`` marks a job the sandbox failed before
        any model code ran."""
        job = {
            "op": "run",
            "code": code,
            "func": func,
            "args": list(args),
            "timeout_s": limits.timeout_s,
            "cpu_s": limits.cpu_s,
            "memory_mb": limits.memory_mb,
            "file_mb": limits.file_mb,
            "max_output": limits.max_output_bytes,
            "max_depth": limits.max_depth,
            "max_items": limits.max_items,
        }
        self._send(job | {"base_vm_bytes": self.base_vm})
        # PID 1 kills the job at its deadline, then empties the work folder (bounded): a few
        # seconds of margin, past which the whole sandbox is killed
        deadline = time.monotonic() + limits.timeout_s + 5
        header = self._read_line(deadline)
        if not isinstance(header, dict) or not isinstance(header.get("payload"), int):
            raise ValueError("malformed answer from sandbox")
        size = header["payload"]
        if not 0 <= size <= limits.max_output_bytes:
            raise ValueError("sandbox output too large")
        payload = self._read_exact(size, deadline)
        if header.get("retire"):
            self.kill()  # a changed, unclean or broken sandbox: start afresh next time
        if header.get("error"):
            retry = bool(header.get("setup_failed"))
            return SandboxResult(False, error=str(header["error"])[:300], retry=retry)
        return parse_result(payload, limits)

    def kill(self) -> None:
        """Kill the whole sandbox: PID 1 (which takes its PID namespace with it), then bubblewrap."""
        if self.pid1_fd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.pid1_fd, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.close(self.pid1_fd)
            self.pid1_fd = None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(Exception):
                stream.close()


_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def loads_bounded(data: bytes, max_depth: int) -> Any:
    """JSON from the sandbox, parsed only after its nesting is known to be at most ``max_depth``
    (Python's parser recurses, so deep nesting would raise RecursionError in the host). NaN,
    infinities (also a float literal too large to represent) and ints of more than MAX_INT_DIGITS
    digits are refused. Raises ValueError for anything else than such JSON."""
    depth = 0
    for m in _TOKENS.finditer(data):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                raise ValueError(f"JSON nested deeper than {max_depth}")
        elif c in (b"]", b"}"):
            depth -= 1
    try:
        return json.loads(
            data.decode("utf-8"),
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
    except RecursionError:  # the scan above should make this impossible: still not the caller's problem
        raise ValueError("JSON nested too deeply") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a result")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("a non-finite number is not a result")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an int of more than {MAX_INT_DIGITS} digits is not a result")
    return int(text)


def parse_result(payload: bytes, limits: Limits) -> SandboxResult:
    """The job's result document: ``{"ok": true, "value": ...}`` or ``{"ok": false, "error": ...}``."""
    try:
        status = loads_bounded(payload, max_depth=limits.max_depth + 1)
    except ValueError as e:
        return SandboxResult(False, error=f"unreadable result: {str(e)[:200]}")
    if not isinstance(status, dict) or not isinstance(status.get("ok"), bool):
        return SandboxResult(False, error="unreadable result: not a status")
    if status["ok"]:
        return SandboxResult(True, value=status.get("value"))
    return SandboxResult(False, error=str(status.get("error", "failed"))[:300])


def _vm_size(pid: int | None) -> int:
    """Virtual size of PID 1 (host view): the job's address-space limit is this plus its memory_mb."""
    if not pid:
        return 1 << 30
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 1 << 30


# --------------------------------------------------------------------------------------------------
# Pools of sandboxes


class SandboxPool:
    """``workers`` sandboxes of one profile; jobs go to whichever is free. A sandbox that dies or
    misbehaves fails only its current job and is replaced before the next one."""

    def __init__(self, profile: Profile, workers: int | None = None):
        self.profile = profile
        self.workers = max(1, workers or min(4, os.cpu_count() or 1))
        self._free: list[_Sandbox] = []
        self._prepared: list[str] = []
        self._lock = threading.Lock()
        self._sem = threading.Semaphore(self.workers)
        self._all: list[_Sandbox] = []

    def prepare(self, code: str) -> None:
        """Run host-written ``code`` (never model text) once in each sandbox's PID 1 before its next
        job, e.g. to build a grader once instead of in every job."""
        with self._lock:
            if code not in self._prepared:
                self._prepared.append(code)

    def _take(self) -> _Sandbox:
        with self._lock:
            prepared = list(self._prepared)
            box = None
            while self._free and box is None:
                box = self._free.pop()
                if not box.alive():
                    self._forget(box)
                    box = None
        if box is None:
            box = _Sandbox(self.profile)
            with self._lock:
                self._all.append(box)
        try:
            for code in prepared:
                if code not in box.prepared:
                    box.prepare(code)
        except Exception:
            self._discard(box)
            raise
        return box

    def _forget(self, box: _Sandbox) -> None:
        box.kill()
        if box in self._all:
            self._all.remove(box)

    def _discard(self, box: _Sandbox) -> None:
        with self._lock:
            self._forget(box)

    def run(
        self, code: str | None, func: str, args: list | tuple, limits: Limits = Limits()
    ) -> SandboxResult:
        """Run one job; a result or a failure, never raises for anything the job does (only
        SandboxUnavailable when no sandbox can start). A job the sandbox failed before its code ran
        is run once more in a fresh sandbox."""
        result = self._run_once(code, func, args, limits)
        if result.retry:
            result = self._run_once(code, func, args, limits)
        return result

    def _run_once(self, code: str | None, func: str, args: list | tuple, limits: Limits) -> SandboxResult:
        with self._sem:
            try:
                box = self._take()
            except ConfigError:  # no sandbox can start here (SandboxUnavailable) or a bad profile
                raise
            except Exception as e:  # noqa: BLE001 - a failed preparation fails this job only
                return SandboxResult(False, error=f"sandbox failed to prepare: {str(e)[:200]}")
            keep = False
            try:
                result = box.run(code, func, args, limits)
                keep = box.alive()
                return result
            except Exception as e:  # noqa: BLE001 - a misbehaving sandbox fails this job only
                return SandboxResult(False, error=f"sandbox failed: {str(e)[:200]}")
            finally:
                # every path either returns the sandbox to the pool or kills it
                if keep:
                    with self._lock:
                        self._free.append(box)
                else:
                    self._discard(box)

    def run_many(
        self, jobs: list[tuple[str | None, str, list | tuple]], limits: Limits = Limits()
    ) -> list[SandboxResult]:
        """Run jobs in parallel over the pool's sandboxes; results in job order."""
        if len(jobs) <= 1 or self.workers == 1:
            return [self.run(c, f, a, limits) for c, f, a in jobs]
        with concurrent.futures.ThreadPoolExecutor(self.workers) as ex:
            return list(ex.map(lambda job: self.run(job[0], job[1], job[2], limits), jobs))

    def close(self) -> None:
        with self._lock:
            boxes, self._all, self._free = list(self._all), [], []
        for box in boxes:
            box.kill()


_POOLS: dict[str, SandboxPool] = {}
_POOLS_LOCK = threading.Lock()


def pool(profile: Profile) -> SandboxPool:
    """The process-wide pool for ``profile`` (created on first use, closed at exit)."""
    with _POOLS_LOCK:
        if profile.name not in _POOLS:
            _POOLS[profile.name] = SandboxPool(profile)
        return _POOLS[profile.name]


@atexit.register
def close_all() -> None:
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for p in pools:
        p.close()


def require_sandbox(profile: Profile = PLAIN) -> None:
    """Raise a one-line SandboxUnavailable unless a sandbox of ``profile`` starts and runs a job."""
    result = pool(profile).run("def f():\n    return 1\n", "f", [], Limits(timeout_s=30, cpu_s=10))
    if not result.ok or result.value != 1:
        raise SandboxUnavailable(f"the sandbox does not work here ({result.error}): {INSTALL_HINT}")


def run_untrusted(
    code: str,
    func: str,
    args: list[Any],
    timeout_s: float = 5.0,
    cpu_s: int = 5,
    memory_mb: int = 512,
    profile: Profile = ARC,
) -> SandboxResult:
    """Define ``code`` and call ``func(*args)`` in a sandbox; a JSON result or a failure, never raises
    for anything the code does (raises SandboxUnavailable if no sandbox can start)."""
    return pool(profile).run(code, func, args, Limits(timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb))
