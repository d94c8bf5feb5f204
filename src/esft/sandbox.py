"""Run untrusted, model-written Python in a separate, locked-down process.

Used by tasks whose model output is code (ARC-AGI: the model writes ``transform(grid)``). The code is
hostile by assumption. Layers, each independent of the others:

- a fresh ``python -I -S`` process (isolated mode: no user site, no environment variables), in its
  own session and an empty temporary working directory that is deleted afterwards;
- resource limits set before the code starts: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS),
  file size (RLIMIT_FSIZE), open files, and no core dumps; plus a wall-clock timeout after which the
  whole process group is killed;
- an audit hook (PEP 578) installed before the code runs that refuses process creation (fork, exec,
  spawn, subprocess, os.system), every socket operation, native-code loading (ctypes, cffi), signals
  to other processes, and any file access outside the temp directory except reading the Python
  installation itself (so ``import`` of the standard library and installed packages still works);
- a network namespace of its own when ``unshare`` is available to this user (no interfaces at all).

Whatever happens (exception, timeout, limit, refused operation, garbage output), the caller gets a
``SandboxResult`` with ``ok=False`` and the run scores 0; the host is left as it was.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

MAX_OUTPUT_BYTES = 4 * 1024 * 1024

# The child-side runner. It reads {"code", "func", "args"} from stdin, installs the audit hook, then
# execs the code and calls the function. Only the final JSON line on the real stdout counts.
_RUNNER = r"""
import json, os, sys
request = json.loads(sys.stdin.read())
out = os.fdopen(os.dup(1), "w")
devnull = open(os.devnull, "w")
sys.stdout = sys.stderr = devnull
WORK = os.path.realpath(os.getcwd())
READ_OK = tuple(os.path.realpath(p) for p in request["read_prefixes"])
BLOCKED_PREFIXES = ("subprocess.", "socket.", "ctypes.", "_posixsubprocess", "os.exec", "os.posix_spawn",
                    "os.spawn", "os.fork", "os.forkpty", "os.system", "os.kill", "os.killpg", "signal.pthread_kill",
                    "pty.", "cffi", "sys.setrecursionlimit", "resource.setrlimit", "os.setuid", "os.setgid",
                    "winreg.", "urllib.", "http.", "ftplib.", "smtplib.", "webbrowser.")
BLOCKED_IMPORTS = {"ctypes", "_ctypes", "cffi", "socket", "_socket", "subprocess", "_posixsubprocess",
                   "multiprocessing", "_multiprocessing", "pty", "signal", "resource", "mmap", "ssl", "select"}
PATH_EVENTS = {"open", "os.listdir", "os.scandir", "os.remove", "os.rmdir", "os.rename", "os.mkdir",
               "os.chmod", "os.chown", "os.symlink", "os.link", "os.truncate", "os.utime", "shutil.rmtree",
               "shutil.copyfile", "shutil.move", "os.chdir", "glob.glob", "os.walk"}
WRITE_EVENTS = PATH_EVENTS - {"open", "os.listdir", "os.scandir", "glob.glob", "os.walk"}

def inside(path, roots):
    try:
        p = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else "")
    except Exception:
        return False
    return any(p == r or p.startswith(r + os.sep) for r in roots)

def hook(event, args):
    if event.startswith(BLOCKED_PREFIXES):
        raise PermissionError("sandbox: " + event)
    if event == "import" and args and str(args[0]).split(".")[0] in BLOCKED_IMPORTS:
        raise PermissionError("sandbox: import " + str(args[0]))
    if event in PATH_EVENTS:
        if not args or isinstance(args[0], int):
            return
        path = args[0]
        if inside(path, (WORK,)):
            return
        writing = event in WRITE_EVENTS or (event == "open" and len(args) > 1 and args[1] and any(c in str(args[1]) for c in "wax+"))
        if writing or not inside(path, READ_OK):
            raise PermissionError("sandbox: " + event + " " + str(path))

import math, itertools, collections, functools, copy, re  # common helpers, imported before the hook
sys.addaudithook(hook)
result = {"ok": False}
try:
    namespace = {"__name__": "__sandbox__"}
    exec(compile(request["code"], "<model>", "exec"), namespace)
    fn = namespace.get(request["func"])
    if not callable(fn):
        raise NameError("no function " + request["func"])
    value = fn(*request["args"])
    result = {"ok": True, "value": json.loads(json.dumps(value))}
except BaseException as e:
    result = {"ok": False, "error": type(e).__name__ + ": " + str(e)[:200]}
out.write("\n" + json.dumps(result) + "\n")
out.flush()
os._exit(0)
"""


@dataclass
class SandboxResult:
    ok: bool
    value: Any = None
    error: str = ""


@functools.cache
def _netns_prefix() -> tuple[str, ...]:
    """``unshare`` arguments that give the child an empty network namespace, if this user may."""
    exe = shutil.which("unshare")
    if not exe:
        return ()
    for args in ((exe, "-n"), (exe, "-r", "-n")):
        try:
            if subprocess.run([*args, "true"], capture_output=True, timeout=5).returncode == 0:
                return args
        except (OSError, subprocess.SubprocessError):
            continue
    return ()


def _limits(cpu_s: int, memory_mb: int) -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    if os.getuid() != 0:  # root ignores RLIMIT_NPROC; the audit hook refuses fork for everyone
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))


def run_untrusted(
    code: str,
    func: str,
    args: list[Any],
    timeout_s: float = 5.0,
    cpu_s: int = 5,
    memory_mb: int = 512,
) -> SandboxResult:
    """Define ``code`` and call ``func(*args)`` in the sandbox; JSON-serialisable result or failure."""
    work = tempfile.mkdtemp(prefix="esft-sandbox-")
    read_prefixes = sorted({sys.prefix, sys.base_prefix, os.path.dirname(os.__file__)})
    request = json.dumps({"code": code, "func": func, "args": args, "read_prefixes": read_prefixes})
    cmd = [*_netns_prefix(), sys.executable, "-I", "-S", "-c", _RUNNER]
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=work,
            env={"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"},
            start_new_session=True,
            preexec_fn=lambda: _limits(cpu_s, memory_mb),
        )
        try:
            stdout, _ = proc.communicate(request.encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return SandboxResult(False, error="timeout")
        finally:
            _kill_group(proc)
        if len(stdout) > MAX_OUTPUT_BYTES:
            return SandboxResult(False, error="output too large")
        lines = stdout.decode("utf-8", "replace").strip().splitlines()
        if not lines:
            return SandboxResult(False, error=f"no result (exit code {proc.returncode})")
        try:
            result = json.loads(lines[-1])
        except json.JSONDecodeError:
            return SandboxResult(False, error="malformed result")
        if not isinstance(result, dict) or not result.get("ok"):
            return SandboxResult(
                False, error=str(result.get("error", "failed")) if isinstance(result, dict) else "failed"
            )
        return SandboxResult(True, value=result.get("value"))
    except OSError as e:
        return SandboxResult(False, error=f"could not start sandbox: {e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
