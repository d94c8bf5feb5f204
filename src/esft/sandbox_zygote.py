"""The program that runs inside the bubblewrap sandbox (standard library only; never imported by esft).

:mod:`esft.sandbox` starts it as ``python -I -S -c <this file's source>`` as PID 1 of the sandbox's
PID namespace. It runs only code the host sends (never model text) and forks one process per job; the
model's code runs in that process, after the job's limits are in place:

1. Start: read the settings frame, extend ``sys.path`` by the bound package folders, drop to the
   unprivileged uid/gid if started as root (which clears every capability), ignore the signals a job
   could send, import the preloaded modules, answer ``{"ready": true}``.
2. ``prepare`` frames: exec host-written code in the shared namespace (e.g. build a grader once).
3. ``run`` frames: fork. The job process points stdin/stdout/stderr at /dev/null, closes every other
   descriptor but its result pipe, enters an empty work folder, sets rlimits (CPU seconds, address
   space, file size, open files, no processes, no core), installs the seccomp filter
   (:mod:`esft.seccomp`), then execs ``code`` (if any) in a copy of the shared namespace and calls
   ``func(*args)``. Its result is one JSON document on the pipe. This process reads at most
   ``max_output`` bytes of it, kills the job at its wall-clock deadline, empties the work folder and
   answers one JSON line.

Frames from the host: 8-byte big-endian length, then a pickle (host to sandbox only: the host is
trusted; nothing from the sandbox is ever unpickled).
"""

import json
import os
import pickle
import resource
import select
import shutil
import signal
import struct
import sys
import time

WORK_ROOT = "/esft-work"  # esft.sandbox.WORK


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
    if os.getuid() == 0:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # all uids non-zero: the kernel clears every capability


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


def job_process(job, shared, result_fd, settings):
    """Runs in the forked child: limits, filter, then the job. Never returns."""
    status = {"ok": False, "error": "job did not finish"}
    try:
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
        # From here on, everything is the model's: its code, or host code called on its output.
        namespace = dict(shared)
        if job.get("code") is not None:
            exec(compile(job["code"], "<model>", "exec"), namespace)
        fn = namespace.get(job["func"])
        if not callable(fn):
            raise NameError("no function " + job["func"])
        value = fn(*job["args"])
        status = {"ok": True, "value": json.loads(json.dumps(value, default=to_json))}
    except BaseException as e:  # noqa: BLE001 - every failure of model code is a failed job
        status = {"ok": False, "error": type(e).__name__ + ": " + str(e)[:200]}
    try:
        data = json.dumps(status).encode()
        while data:
            data = data[os.write(result_fd, data) :]
    finally:
        os._exit(0)


def clear_workdir(limit=20000):
    """Empty the work root; False if it holds more than ``limit`` entries or cannot be emptied."""
    count = 0
    for root, dirs, files in os.walk(WORK_ROOT):
        count += len(dirs) + len(files)
        if count > limit:
            return False
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o700)  # so a job's unreadable folder is still removed
    for entry in os.listdir(WORK_ROOT):
        path = os.path.join(WORK_ROOT, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    return not os.listdir(WORK_ROOT)


def run_job(job, shared, settings, counter):
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
    limit = int(job["max_output"])
    chunks, size, error = [], 0, None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            error = "timeout"
            break
        ready, _, _ = select.select([r], [], [], left)
        if not ready:
            continue
        chunk = os.read(r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            error = "output too large"
            break
    os.close(r)
    if error:
        os.kill(pid, signal.SIGKILL)
    _, wait_status = os.waitpid(pid, 0)
    if error is None:
        try:
            status = json.loads(b"".join(chunks).decode("utf-8"))
            if not isinstance(status, dict):
                raise ValueError
        except ValueError:
            code = os.waitstatus_to_exitcode(wait_status)
            why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            status = {"ok": False, "error": f"no result ({why})"}
    else:
        status = {"ok": False, "error": error}
    return status


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
        status = run_job(frame, shared, settings, counter)
        clean = clear_workdir()
        reply({**status, "retire": not clean})
        if not clean:
            return  # a job left more than can be cleaned quickly: the host starts a fresh sandbox


if __name__ == "__main__":
    main()
