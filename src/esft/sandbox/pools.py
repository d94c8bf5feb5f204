"""Pools of sandboxes: :class:`SandboxPool` (sandboxes of one profile, replaced when they die or
misbehave), the process-wide pool per profile (closed at exit), and the public helpers
:func:`require_sandbox` and :func:`run_untrusted`."""

from __future__ import annotations

import atexit
import concurrent.futures
import os
import threading
from typing import Any

from esft.errors import ConfigError
from esft.sandbox.box import _Sandbox
from esft.sandbox.config import ARC, INSTALL_HINT, PLAIN, Limits, Profile, SandboxResult, SandboxUnavailable


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
        self,
        code: str | None,
        func: str,
        args: list | tuple,
        limits: Limits = Limits(),  # noqa: B008 - frozen dataclass (defined in esft.sandbox.config)
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
        self,
        jobs: list[tuple[str | None, str, list | tuple]],
        limits: Limits = Limits(),  # noqa: B008 - frozen dataclass (defined in esft.sandbox.config)
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
