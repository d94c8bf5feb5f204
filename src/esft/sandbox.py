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
- **The host reads bounded output.** Results come back as JSON (never pickle), at most
  ``MAX_OUTPUT_BYTES`` per job, with a wall-clock deadline on each job and a hard deadline on the
  sandbox; a sandbox that misbehaves is killed with its whole PID namespace and started afresh.

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
import os
import pickle
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

MAX_OUTPUT_BYTES = 4 * 1024 * 1024
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


@dataclass(frozen=True)
class Limits:
    """Per-job limits. ``timeout_s`` is wall clock; ``cpu_s`` is CPU time (RLIMIT_CPU)."""

    timeout_s: float = 5.0
    cpu_s: int = 5
    memory_mb: int = 512
    file_mb: int = 16


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
    cmd += ["--dev", "/dev", "--size", str(profile.work_mb << 20), "--tmpfs", WORK]
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
        self.base_vm = _vm_size(self.pid1)

    # framing
    def _send(self, obj: Any) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        assert self.proc.stdin is not None
        self.proc.stdin.write(struct.pack(">Q", len(data)) + data)
        self.proc.stdin.flush()

    def _read_line(self, deadline: float, limit: int = MAX_OUTPUT_BYTES + 4096) -> Any:
        """One JSON line from PID 1, read in bounded chunks; the sandbox is killed past the limit."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = bytearray()
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("sandbox did not answer in time")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise OSError("sandbox exited")
            buf += chunk
            if len(buf) > limit:
                raise ValueError("sandbox output too large")
        line, _, rest = bytes(buf).partition(b"\n")
        if rest.strip():
            raise ValueError("unexpected output from sandbox")
        return json.loads(line.decode("utf-8"))

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
        if not answer.get("ok"):
            raise RuntimeError(f"sandbox prepare failed: {answer.get('error')}")
        self.prepared.append(code)

    def run(self, code: str | None, func: str, args: list | tuple, limits: Limits) -> SandboxResult:
        job = {
            "op": "run",
            "code": code,
            "func": func,
            "args": list(args),
            "timeout_s": limits.timeout_s,
            "cpu_s": limits.cpu_s,
            "memory_mb": limits.memory_mb,
            "file_mb": limits.file_mb,
            "max_output": MAX_OUTPUT_BYTES,
        }
        self._send(job | {"base_vm_bytes": self.base_vm})
        answer = self._read_line(time.monotonic() + limits.timeout_s + 15)
        if not isinstance(answer, dict):
            raise ValueError("malformed answer")
        if answer.get("retire"):
            self.kill()  # the job left its work folder too full to clean: start afresh next time
        if answer.get("ok") is True:
            return SandboxResult(True, value=answer.get("value"))
        return SandboxResult(False, error=str(answer.get("error", "failed"))[:300])

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(Exception):
                stream.close()


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
                    box.kill()
                    box = None
        if box is None:
            box = _Sandbox(self.profile)
            with self._lock:
                self._all.append(box)
        try:
            for code in prepared:
                if code not in box.prepared:
                    box.prepare(code)
        except (OSError, TimeoutError, ValueError, RuntimeError):
            self._discard(box)
            raise
        return box

    def _give(self, box: _Sandbox) -> None:
        with self._lock:
            self._free.append(box)

    def _discard(self, box: _Sandbox) -> None:
        box.kill()
        with self._lock:
            if box in self._all:
                self._all.remove(box)

    def run(
        self, code: str | None, func: str, args: list | tuple, limits: Limits = Limits()
    ) -> SandboxResult:
        with self._sem:
            try:
                box = self._take()
            except (OSError, TimeoutError, ValueError, RuntimeError) as e:
                return SandboxResult(False, error=f"sandbox failed to prepare: {e}")
            try:
                result = box.run(code, func, args, limits)
            except (OSError, TimeoutError, ValueError) as e:
                self._discard(box)
                return SandboxResult(False, error=f"sandbox failed: {e}")
            if box.alive():
                self._give(box)
            else:
                self._discard(box)
            return result

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
