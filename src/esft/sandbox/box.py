"""One running sandbox: a bwrap process whose PID 1 runs :mod:`esft.sandbox.zygote`, the framing of
the host<->PID 1 protocol (pickled frames to PID 1, bounded JSON lines and raw payloads back), one job
at a time, and killing the whole sandbox."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import pickle
import select
import signal
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

from esft.sandbox import seccomp
from esft.sandbox.binds import _package_paths
from esft.sandbox.command import bwrap_command
from esft.sandbox.config import INSTALL_HINT, NOBODY, WORK, Limits, Profile, SandboxResult, SandboxUnavailable
from esft.sandbox.results import loads_bounded, parse_result

MAX_HEADER_BYTES = 64 * 1024  # PID 1's own answer lines
_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="esft-sandbox-spawner")


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


def _vm_size(pid: int | None) -> int:
    """Virtual size of PID 1 (host view): the job's address-space limit is this plus its memory_mb."""
    if not pid:
        return 1 << 30
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 1 << 30
