"""Remote calls to the pool's workers (driver side): the slots, byte counting, hang limits, broadcasts and
agreement checks.

- **Traffic.** ``traffic`` counts the pickled bytes of every call and answer (the payload that crosses
  the network).
- **Hang limit.** A worker that stops answering without dying (a hung driver call, a stuck GPU) is
  treated as dead once a scoring unit or an update has taken longer than the hang limit
  (``--worker-timeout``; by default 10x the slowest call so far, at least 300 s).
- **Agreement.** Every update answer carries a checksum of the worker's weights
  (``es.checksum.tensor_checksum``), and the run stops with an error naming the first differing tensor
  if two workers ever disagree.

A worker that dies during a broadcast or a single call is handed to ``recovery`` (``recovery.py``, which
imports this module, so this one reaches it only through the ``Replacer`` protocol).
"""

from __future__ import annotations

import contextlib
import pickle
import time
from dataclasses import dataclass
from typing import Any, Protocol

from esft.errors import EsftError, first_line

HANG_FLOOR_S = 300.0  # the automatic hang limit is never below this
HANG_FACTOR = 10.0  # ... and is this many times the slowest call that came back


class DistributedError(EsftError):
    """The pool cannot go on (workers diverged, or keep dying); the run folder is intact."""


class _WorkerDied(Exception):
    def __init__(self, slot: _Slot, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.slot, self.cause = slot, cause


@dataclass
class _Slot:
    """One worker: its index in the pool, the actor, and the build still running (None once ready)."""

    index: int
    actor: Any
    building: Any = None  # ObjectRef of build(), until the pool has checked its report
    node: str = ""
    host: str = ""
    incarnation: int = 0


class Replacer(Protocol):
    """What the calls need from worker replacement (``recovery.Recovery``)."""

    max_replacements: int

    def replace(self, dead: _WorkerDied, when: str, lost: str = "") -> None: ...

    def finish_build(self, slot: _Slot) -> None: ...


class Calls:
    """The pool's workers (``slots``) and every remote call to them."""

    recovery: Replacer  # set by the pool once the workers have started; replaces a worker that dies

    def __init__(self, ray: Any, worker_timeout: float) -> None:
        self.ray = ray
        self.slots: list[_Slot] = []
        self.traffic = {"sent": 0, "received": 0}  # pickled payload bytes, since start
        self.worker_timeout = worker_timeout
        self.slowest = 0.0  # seconds of the slowest unit or broadcast that came back (the hang limit)
        self.digests: dict[int, str] = {}  # agreed weight checksum after len(pool.updates) == key updates
        self.closed = False

    def count(self, key: str, payload: Any) -> None:
        with contextlib.suppress(Exception):
            self.traffic[key] += len(pickle.dumps(payload, protocol=5))

    def call(self, slot: _Slot, method: str, *args: Any):
        self.count("sent", (method, args))
        return getattr(slot.actor, method).remote(*args)

    def hang_limit(self) -> float | None:
        """Seconds after which a call without an answer counts as hung (None: no limit yet)."""
        if self.worker_timeout > 0:
            return self.worker_timeout
        if self.slowest <= 0:
            return None
        return max(HANG_FLOOR_S, HANG_FACTOR * self.slowest)

    def hung(self, slot: _Slot, waited: float) -> _WorkerDied:
        source = (
            "--worker-timeout" if self.worker_timeout > 0 else f"{HANG_FACTOR:g}x the slowest call so far"
        )
        return _WorkerDied(
            slot, TimeoutError(f"no answer in {waited:.0f} s, the hang limit ({source}); killed")
        )

    def get(self, ref: Any, slot: _Slot, what: str = "", timeout: float | None = None) -> Any:
        """ray.get, counting the answer; a dead worker raises _WorkerDied, a worker-side error its cause
        (a user-facing EsftError stays one line); no answer within ``timeout`` seconds counts as dead."""
        ray = self.ray
        try:
            value = ray.get(ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise self.hung(slot, timeout or 0.0) from None
        except ray.exceptions.RayActorError as e:
            if what:  # while starting: nothing to recover
                raise DistributedError(
                    f"Ray worker {slot.index} died while {what}: {_first_line(e)}"
                ) from None
            raise _WorkerDied(slot, e) from None
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, EsftError):
                raise cause from None
            raise e.as_instanceof_cause() from None
        self.count("received", value)
        return value

    def broadcast(self, method: str, *args: Any) -> dict[int, Any]:
        """``method`` on every worker (each runs it after whatever it has queued); answers by worker.
        A worker that dies is replaced, and its replacement rebuilt to the state after this call."""
        refs = [(slot, self.call(slot, method, *args)) for slot in self.slots]
        answers: dict[int, Any] = {}
        sent = time.perf_counter()
        for slot, ref in refs:
            try:
                if slot.building is not None:  # a replacement: check its rebuild before its answer
                    self.recovery.finish_build(slot)
                    sent = time.perf_counter()  # its answer waited for the rebuild, which has no limit
                timed = method == "esft_update"  # start-up calls (loading, hashing) have no limit
                limit = self.hang_limit() if timed else None
                left = None if limit is None else max(0.0, sent + limit - time.perf_counter())
                answers[slot.index] = self.get(ref, slot, timeout=left)
                if timed:
                    self.slowest = max(self.slowest, time.perf_counter() - sent)
            except _WorkerDied as dead:
                self.recovery.replace(dead, f"during {method}")
        if not answers:
            raise DistributedError(f"every Ray worker died during {method}")
        return answers

    def pick(self, prefer_node: str | None = None) -> _Slot:
        """A worker for a single call: a ready one (on ``prefer_node`` if any), lowest index first."""
        return min(self.slots, key=lambda s: (s.building is not None, s.node != prefer_node, s.index))

    def one(self, method: str, *args: Any) -> Any:
        """``method`` on one worker; a worker that dies is replaced and the call goes to the next."""
        for _ in range(self.recovery.max_replacements + len(self.slots)):
            slot = self.pick()
            try:
                return self.get(self.call(slot, method, *args), slot)
            except _WorkerDied as dead:
                self.recovery.replace(dead, f"during {method}")
        raise DistributedError(f"no Ray worker survived {method}")

    # -- agreement ----------------------------------------------------------------------------------

    def agree(self, answers: dict[int, Any], what: str, updates: int, iteration: int) -> None:
        """Every answer's weight checksum must be the same (and equal the one agreed on before for the
        same number of updates); otherwise the replicas have diverged and the run stops. ``updates``:
        the updates applied since the pool's source; ``iteration``: the run's iteration that makes."""
        digests = {i: a["checksum"] for i, a in answers.items() if isinstance(a, dict) and "checksum" in a}
        if not digests:
            return
        expected = self.digests.get(updates)
        groups: dict[str, list[int]] = {}
        for i, d in sorted(digests.items()):
            groups.setdefault(d, []).append(i)
        if expected is None and len(groups) == 1:
            self.digests[updates] = next(iter(groups))
            return
        if expected is not None and set(groups) == {expected}:
            return
        majority = expected or max(groups, key=lambda d: len(groups[d]))
        odd = sorted(i for d, members in groups.items() if d != majority for i in members)
        good = next((i for d, members in groups.items() if d == majority for i in members), None)
        where = self._first_difference(good, odd[0]) if good is not None else ""
        raise DistributedError(
            f"the Ray workers' weights diverged after {what} (iteration {iteration}): worker(s) "
            f"{', '.join(map(str, odd))} differ from the others{where}. Every worker applies the same update "
            "to the same bits, so a worker has a hardware fault, a different device or library version, or "
            "there is a bug; the seed log and the newest checkpoint are intact: --resume continues from them"
        )

    def _first_difference(self, good: int, bad: int) -> str:
        try:
            a = self.get(self.call(self.slots[good], "esft_checksum"), self.slots[good])
            b = self.get(self.call(self.slots[bad], "esft_checksum"), self.slots[bad])
        except Exception:  # a diagnosis only
            return ""
        names = [n for n in a if a[n] != b.get(n)]
        return f" (first differing tensor: {names[0]}, {len(names)} in all)" if names else ""

    # -- end ----------------------------------------------------------------------------------------

    def kill(self, slot: _Slot) -> None:
        with contextlib.suppress(Exception):
            self.ray.kill(slot.actor, no_restart=True)

    def close(self) -> None:
        """Stop every worker; no replacement starts after this."""
        self.closed = True
        for slot in self.slots:
            self.kill(slot)


def _first_line(e: BaseException) -> str:
    return first_line(e)[:200]
