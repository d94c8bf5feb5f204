"""Worker loss (driver side): replacing a dead or hung worker and rebuilding it where the others are.

A worker that dies loses only its in-flight unit, which goes back to the front of the queue for the
others (``scheduling.py``). A replacement starts at once and is rebuilt from the newest checkpoint plus
the updates since (the seed log; ``--resume``'s mechanism) while the others work; its checksum must
match before it takes work. The run ends with the weights it would have had without the failure. A
worker that stops answering without dying is treated the same once it passes the hang limit
(``calls.py``): it is killed, and its unit re-queued.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm

from esft.distributed.calls import Calls, DistributedError, _first_line, _Slot, _WorkerDied


class Recovery:
    """Replaces the workers of ``calls`` that die, from the pool's source (``source``, a model folder or
    a checkpoint of iteration ``source_iteration``), the run's ``checkpoints`` and the updates since."""

    def __init__(
        self,
        calls: Calls,
        actor: Any,
        spec: dict[str, Any],
        source: str,
        source_iteration: int,
        checkpoints: Callable[[], dict[int, Any]] | None,
        log: Callable[[str], None],
        max_replacements: int,
    ) -> None:
        self.calls = calls
        self.actor = actor  # the Worker class as a Ray actor with its resources (cluster.start_workers)
        self.spec = spec  # the workers' spec; the pool's min_new_tokens setter updates it in place
        self.source, self.source_iteration = source, source_iteration
        self.checkpoints, self.log = checkpoints, log
        self.updates: list[dict[str, Any]] = []  # every update broadcast since the source (seed-log rows)
        self.init_args: list[Any] | None = None
        self.replaced = 0
        self.max_replacements = max_replacements

    def _rebuild_candidates(self) -> tuple[list[tuple[str, list[dict[str, Any]]]], str]:
        """Where a replacement loads from: the newest checkpoint of this run plus the updates after it,
        else the pool's own source plus every update since (also the fallback on a node that cannot see
        the run folder). Returns (candidates, description)."""
        now = self.source_iteration + len(self.updates)
        ckpts = self.checkpoints() if self.checkpoints is not None else {}
        usable = [i for i in ckpts if self.source_iteration < i <= now]
        fallback = (self.source, list(self.updates))
        if not usable:
            kind = "checkpoint" if self.source_iteration else "base model"
            return [fallback], f"{kind} {self.source_iteration} + {len(self.updates)} seed-log update(s)"
        c = max(usable)
        entries = self.updates[c - self.source_iteration :]
        return [(str(ckpts[c]), entries), fallback], f"checkpoint {c} + {len(entries)} seed-log update(s)"

    def replace(self, dead: _WorkerDied, when: str, lost: str = "") -> None:
        """Start a replacement for a dead worker; it builds in the background (``slot.building``)."""
        calls, old = self.calls, dead.slot
        if calls.closed or calls.slots[old.index] is not old:  # closing, or replaced already
            return
        calls.kill(old)
        if self.replaced >= self.max_replacements:
            raise DistributedError(
                f"Ray workers died {self.replaced + 1} times; giving up (last: worker {old.index} {when}: "
                f"{_first_line(dead.cause)}); the seed log and newest checkpoint are intact: --resume"
            )
        self.replaced += 1
        candidates, described = self._rebuild_candidates()
        new = _Slot(old.index, self.actor.remote(self.spec, old.index, None), incarnation=old.incarnation + 1)
        new.building = calls.call(new, "build", candidates, self.init_args, len(self.updates))
        calls.slots[old.index] = new
        hung = isinstance(dead.cause, TimeoutError)
        _warn(
            f"esft: Ray worker {old.index} {'hung' if hung else 'died'} {when} ({_first_line(dead.cause)})"
            + (f"; {lost} re-queued to the others" if lost else "")
            + f"; starting a replacement, rebuilt from {described}"
        )

    def finish_build(self, slot: _Slot) -> None:
        """Check a replacement's report (weights agree with the pool's) and let it take work."""
        report = self.calls.get(slot.building, slot)
        slot.building = None
        slot.node, slot.host = report["node"], report["host"]
        expected = self.calls.digests.get(report["updates"])
        if expected is not None and report["checksum"] != expected:
            raise DistributedError(
                f"replacement Ray worker {slot.index} rebuilt from {report['source']} holds different weights "
                f"than the others (checksum {report['checksum']} != {expected}); the checkpoint or the seed "
                "log does not reproduce the run on that node (a different device or library version?)"
            )
        self.log(
            f"esft: replacement Ray worker {slot.index} ready on {report['host']} in {report['seconds']:.1f} s "
            f"(rebuilt from {report['source']} + {report['replayed']} update(s); weights match)"
        )


def _warn(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)
