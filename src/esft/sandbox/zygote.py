"""The program that runs inside the bubblewrap sandbox (standard library only; never imported by esft).

:mod:`esft.sandbox` starts it as ``python -I -S -c <this file's source>`` as PID 1 of the sandbox's
PID namespace (:mod:`esft.sandbox.command` reads this file as text). It runs only code the host sends
(never model text) and forks one process per job; the model's code runs in that process, after the
job's limits are in place:

1. Start: read the settings frame, extend ``sys.path`` by the bound package folders, drop to the
   unprivileged uid/gid if started as root (which clears every capability) and re-arm the
   parent-death signal that the uid change cleared (so the sandbox dies with the host), ignore the
   signals a job could send, import the preloaded modules, answer ``{"ready": true}``.
2. ``prepare`` frames: exec host-written code in the shared namespace (e.g. build a grader once).
3. ``run`` frames: fork. The job process points stdin/stdout/stderr at /dev/null, closes every other
   descriptor but its result pipe, enters an empty work folder, sets rlimits (CPU seconds, address
   space, file size, open files, no processes, no core), installs the seccomp filter
   (:mod:`esft.sandbox.seccomp`), writes one ``+`` to its result pipe (set-up done: anything before it
   failing is the sandbox's fault, not the model's), then execs ``code`` (if any) in a copy of the
   shared namespace and calls ``func(*args)``. Its result is one JSON document after the ``+``.
   This process reads at most ``max_output`` bytes of it, kills the job at its wall-clock deadline
   (whether or not the job closed its pipe), checks that the job changed nothing of its own state
   (limits, priority, scheduling), empties the work folder without following links, and answers.

Answers are one JSON line written by this program. A ``run`` answer is a header line
``{"payload": n, "error": ..., "retire": ...}`` followed by the job's n raw bytes, which this
program never parses (the host does, with bounds): hostile output can neither crash PID 1 nor grow
when re-encoded. ``retire`` asks the host to kill this sandbox and start a fresh one.

Frames from the host: 8-byte big-endian length, then a pickle (host to sandbox only: the host is
trusted; nothing from the sandbox is ever unpickled).
"""

import json
import os
import pickle
import resource
import select
import signal
import stat
import struct
import sys
import time

WORK_ROOT = "/esft-work"  # esft.sandbox.WORK (esft.sandbox.config)


def read_frame(stream):
    head = stream.read(8)
    if len(head) < 8:
        return None
    (size,) = struct.unpack(">Q", head)
    return pickle.loads(stream.read(size))


def reply(obj):
    sys.__stdout__.write(json.dumps(obj) + "\n")
    sys.__stdout__.flush()


def drop_privileges(uid, gid):
    """Started as root: act as ``uid`` (files, the jobs' owner) but keep real and saved uid 0.

    Two reasons. The kernel lets a process signal, ``prlimit`` or ``ptrace`` another only if their
    uids match: a job (which sets all three uids to ``uid``) then cannot touch PID 1 even through a
    call the seccomp filter missed. And bubblewrap's monitor (uid 0, no CAP_KILL) may then deliver
    the parent-death signal: it was refused when PID 1 had dropped every uid, so PID 1 and its job
    outlived the host. The capabilities kept (bubblewrap left CAP_SETUID and CAP_SETGID) stay out
    of the effective set, and a job loses them when it drops its real and saved uid."""
    if os.getuid() == 0:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(0, uid, 0)
    # A uid change clears PR_SET_PDEATHSIG, which bwrap's --die-with-parent set: re-arm it after the
    # last change, or this process (and every job) would outlive the host.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
        raise OSError(ctypes.get_errno(), "PR_SET_PDEATHSIG")


def become_job_user():
    """In the job: every uid the unprivileged one (allowed without privilege: it is the effective
    uid already), which clears the capabilities PID 1 kept."""
    uid = os.geteuid()
    if os.getresuid() != (uid, uid, uid):
        os.setresuid(uid, uid, uid)
    if 0 in os.getresuid():
        raise PermissionError("the job still holds uid 0")


def install_seccomp(program):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(program, len(program))
    fprog = SockFprog(len(program) // 8, ctypes.addressof(buf))
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


def to_json(value):
    """numpy arrays and scalars become lists and Python numbers; anything else non-JSON fails."""
    if hasattr(value, "tolist") and type(value).__module__ == "numpy":
        return value.tolist()
    raise TypeError(f"result of type {type(value).__name__} is not JSON")


def check_shape(value, max_depth, max_items):
    """Refuse a result nested deeper than ``max_depth`` or with more than ``max_items`` values
    (checked without recursion, before json.dumps recurses over it)."""
    stack, items = [(value, 0)], 0
    while stack:
        v, depth = stack.pop()
        items += 1
        if items > max_items:
            raise ValueError(f"result has more than {max_items} values")
        if isinstance(v, list | tuple | dict):
            if depth >= max_depth:
                raise ValueError(f"result nested deeper than {max_depth}")
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))


def job_process(job, shared, result_fd, settings):
    """Runs in the forked child: limits, filter, then the job. Never returns."""
    try:
        become_job_user()
        devnull = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        keep = sorted({0, 1, 2, result_fd})
        for lo, hi in zip(keep, [*keep[1:], 1 << 16], strict=True):
            os.closerange(lo + 1, hi)
        os.chdir(job["workdir"])
        cpu = int(job["cpu_s"])
        memory = int(job["base_vm_bytes"]) + (int(job["memory_mb"]) << 20)
        for limit, value in (
            (resource.RLIMIT_CPU, (cpu, cpu + 1)),
            (resource.RLIMIT_AS, (memory, memory)),
            (resource.RLIMIT_FSIZE, (int(job["file_mb"]) << 20,) * 2),
            (resource.RLIMIT_NOFILE, (64, 64)),
            (resource.RLIMIT_NPROC, (0, 0)),
            (resource.RLIMIT_CORE, (0, 0)),
            (resource.RLIMIT_MEMLOCK, (0, 0)),
        ):
            resource.setrlimit(limit, value)
        if settings.get("seccomp"):
            install_seccomp(settings["seccomp"])
        os.write(result_fd, b"+")  # set-up done: what follows is the model's
    except BaseException as e:  # noqa: BLE001 - the sandbox failed the job, not the model
        with _suppress():
            os.write(result_fd, ("!" + type(e).__name__ + ": " + str(e)[:200]).encode())
        os._exit(0)
    status = {"ok": False, "error": "job did not finish"}
    try:
        # From here on, everything is the model's: its code, or host code called on its output.
        namespace = dict(shared)
        if job.get("code") is not None:
            exec(compile(job["code"], "<model>", "exec"), namespace)
        fn = namespace.get(job["func"])
        if not callable(fn):
            raise NameError("no function " + job["func"])
        value = fn(*job["args"])
        check_shape(value, job["max_depth"], job["max_items"])
        text = json.dumps(value, default=to_json, allow_nan=False)
        status = {"ok": True, "value": json.loads(text)}
    except BaseException as e:  # noqa: BLE001 - every failure of model code is a failed job
        status = {"ok": False, "error": type(e).__name__ + ": " + str(e)[:200]}
    try:
        data = json.dumps(status, allow_nan=False).encode()
        while data:
            data = data[os.write(result_fd, data) :]
    finally:
        os._exit(0)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


def own_state():
    """This process's limits, priority and scheduling: what a job must not be able to change."""
    limits = {n: resource.getrlimit(getattr(resource, n)) for n in dir(resource) if n.startswith("RLIMIT_")}
    return (
        limits,
        os.getpriority(os.PRIO_PROCESS, 0),
        sorted(os.sched_getaffinity(0)),
        os.sched_getscheduler(0),
        os.sched_getparam(0).sched_priority,
    )


def clear_workdir(limit=20000):
    """Empty the work root without following links; False if it held more than ``limit`` entries or
    anything went wrong (the host then starts a fresh sandbox). Never raises: iterative, one open
    directory at a time, so neither a deep chain nor a link to ``/`` can crash this process."""
    try:
        return _clear(limit)
    except Exception:  # noqa: BLE001 - whatever a job left, PID 1 survives it
        return False


def _clear(limit):
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    fd = os.open(WORK_ROOT, flags)
    stack = []  # (name of the directory we are in, the names left in its parent)
    removed = 0
    try:
        names = os.listdir(fd)
        while True:
            if names:
                name = names.pop()
                removed += 1
                if removed > limit:
                    return False
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    # a real directory (no other process runs now): make it enterable, then enter
                    os.chmod(name, 0o700, dir_fd=fd)
                    child = os.open(name, flags, dir_fd=fd)
                    os.close(fd)
                    fd = child
                    stack.append((name, names))
                    names = os.listdir(fd)
                else:
                    os.unlink(name, dir_fd=fd)
                continue
            if not stack:
                break
            parent = os.open("..", flags, dir_fd=fd)
            os.close(fd)
            fd = parent
            name, names = stack.pop()
            os.rmdir(name, dir_fd=fd)
        return not os.listdir(fd)
    finally:
        os.close(fd)


def wait_exit(pid, deadline):
    """Wait for ``pid`` until ``deadline``; True if it exited (it is not reaped)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        pidfd = None
    try:
        while True:
            if pidfd is None:
                with _suppress():
                    if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                        return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if pidfd is not None:
                if select.select([pidfd], [], [], left)[0]:
                    return True
            else:
                time.sleep(min(left, 0.01))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def run_job(job, shared, settings, counter):
    """Fork the job, collect its raw output; (output, error, setup_failed). The job is dead and
    reaped when this returns, at the latest at its deadline."""
    workdir = os.path.join(WORK_ROOT, f"job{counter}")
    os.mkdir(workdir, 0o700)
    job = {**job, "workdir": workdir}
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        job_process(job, shared, w, settings)
    os.close(w)
    deadline = time.monotonic() + float(job["timeout_s"])
    limit = int(job["max_output"]) + 1  # the set-up mark
    chunks, size, error = [], 0, None
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                error = "timeout"
                break
            if not select.select([r], [], [], left)[0]:
                continue
            chunk = os.read(r, 65536)
            if not chunk:
                break  # the job exited or closed its pipe: either way it gets only its deadline
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                error = "output too large"
                break
    finally:
        os.close(r)
    if error is not None or not wait_exit(pid, deadline):
        error = error or "timeout"
        os.kill(pid, signal.SIGKILL)
    _, wait_status = os.waitpid(pid, 0)
    out = b"".join(chunks)
    if out[:1] != b"+":
        why = out[1:300].decode("utf-8", "replace") if out[:1] == b"!" else error or _exit_text(wait_status)
        return b"", "job set-up failed: " + why, True
    if error is None and len(out) == 1:
        error = "no result (" + _exit_text(wait_status) + ")"
    return (b"" if error else out[1:]), error, False


def _exit_text(wait_status):
    code = os.waitstatus_to_exitcode(wait_status)
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def main():
    stdin = sys.stdin.buffer
    settings = read_frame(stdin)
    sys.path[:0] = settings["sys_path"]
    os.environ.update(settings["env"])
    drop_privileges(settings["uid"], settings["gid"])
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    shared = {"__name__": "__sandbox__", "__builtins__": __builtins__}
    for name in settings["preload"]:
        __import__(name)
    if settings.get("seccomp"):
        import ctypes  # noqa: F401 - loaded before fork, used by install_seccomp in the job

    reply({"ready": True, "uid": os.getuid()})
    counter = 0
    while True:
        frame = read_frame(stdin)
        if frame is None:
            return
        if frame["op"] == "prepare":
            try:
                exec(compile(frame["code"], "<host>", "exec"), shared)
                reply({"ok": True})
            except Exception as e:
                reply({"ok": False, "error": type(e).__name__ + ": " + str(e)[:200]})
            continue
        counter += 1
        before = own_state()
        out, error, setup_failed = run_job(frame, shared, settings, counter)
        changed = own_state() != before
        clean = clear_workdir()
        retire = setup_failed or changed or not clean
        if changed:
            error = error or "the job changed the sandbox's own limits or scheduling"
        header = {"payload": len(out), "error": error, "setup_failed": setup_failed, "retire": retire}
        sys.__stdout__.buffer.write(json.dumps(header).encode() + b"\n" + out)
        sys.__stdout__.buffer.flush()
        if retire:
            return  # the host starts a fresh sandbox


if __name__ == "__main__":
    main()
