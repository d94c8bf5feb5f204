"""Scoring a population on a Ray pool (driver side): work units, handed out dynamically.

``WorkerPool.score_population`` splits the population into work units and hands them out dynamically:
whichever worker is free takes the next unit (``ray.wait``). A unit is one member, or, with low-rank
noise on a population-batching engine, one population batch: exactly the members that one process would
generate in one batch (``HFEngine.members_per_batch``). Every member is therefore generated in the same
batch layout as in the single-process trainer, so its reward does not depend on which worker scored it,
and the results equal a single-process run for the same seeds, engine and hardware, whatever the number
of workers. Completions stay on the workers; a unit returns per-member task summaries, counters and
timers. A unit whose worker dies or hangs goes back to the front of the queue (``recovery.py``).

Timers: each unit's generate / score / noise seconds are summed over units and divided by the number of
workers, so the metrics' time split adds up to wall-clock time and tokens/s is the pool's throughput.
"""

from __future__ import annotations

import pickle
import time
from collections import deque
from typing import Any

from tqdm.auto import tqdm

from esft.distributed.calls import Calls, DistributedError, _Slot, _WorkerDied
from esft.distributed.recovery import Recovery
from esft.es.noise import Member, NoiseScheme
from esft.population import Population


class Scheduler:
    """Hands work units to the workers of ``calls``; ``recovery`` replaces those that die."""

    def __init__(self, calls: Calls, recovery: Recovery) -> None:
        self.calls, self.recovery = calls, recovery
        self._chunk: dict[int, int | None] = {}
        self.requeued = 0

    def units(self, members: list[Member], n_prompts: int, scheme: NoiseScheme) -> list[list[int]]:
        """Work units as lists of member indices: one member each, or consecutive population batches."""
        if scheme != NoiseScheme.LOWRANK:
            return [[i] for i in range(len(members))]
        if n_prompts not in self._chunk:
            self._chunk[n_prompts] = self.calls.one("members_per_batch", n_prompts)
        per = self._chunk[n_prompts] or len(members)
        return [list(range(i, min(i + per, len(members)))) for i in range(0, len(members), per)]

    def score_population(
        self,
        scheme: NoiseScheme,
        members: list[Member],
        rows: list[dict[str, Any]],
        sigma: float,
        max_new_tokens: int,
        desc: str = "members",
        progress: bool = False,
        state: Any = None,
    ) -> Population:
        """``members`` (perturbed with ``scheme``) scored on ``rows`` by whichever workers are free."""
        calls = self.calls
        ray = calls.ray
        units = self.units(members, len(rows), scheme)
        wire = [[int(m.seed), int(m.sign)] for m in members]
        rows_ref = ray.put(rows)
        rows_bytes = len(pickle.dumps(rows, protocol=5))
        fetched: set[int] = set()  # workers that read this iteration's rows (once each)
        queue: deque[int] = deque(range(len(units)))
        results: list[Any] = [None] * len(units)
        running: dict[Any, tuple[_Slot, int | None]] = {}  # ObjectRef -> (worker, unit; None: a build)
        started: dict[Any, float] = {}  # ObjectRef of a unit -> when it was handed out
        idle: deque[_Slot] = deque()
        for slot in calls.slots:
            if slot.building is not None:
                running[slot.building] = (slot, None)
            else:
                idle.append(slot)
        bar = tqdm(total=len(members), desc=desc, unit="member", leave=False, disable=not progress)
        try:
            while queue or any(u is not None for _, u in running.values()):
                while queue and idle:
                    slot, u = idle.popleft(), queue.popleft()
                    if slot.index not in fetched:
                        calls.traffic["sent"] += rows_bytes
                        fetched.add(slot.index)
                    ref = calls.call(
                        slot, "score", [wire[i] for i in units[u]], rows_ref, sigma, max_new_tokens, state
                    )
                    running[ref] = (slot, u)
                    started[ref] = time.perf_counter()
                if not running:
                    raise DistributedError("no Ray worker is left to score the population")
                limit = calls.hang_limit()
                timeout = None
                if limit is not None and started:
                    timeout = max(0.0, min(started.values()) + limit - time.perf_counter())
                ready, _ = ray.wait(list(running), num_returns=1, timeout=timeout)
                if ready:
                    done = ready[0]
                else:  # the unit handed out longest ago may have run past the hang limit
                    done = min(started, key=started.__getitem__)
                    if limit is None or time.perf_counter() - started[done] < limit:
                        continue
                slot, u = running.pop(done)
                began = started.pop(done, None)
                try:
                    if not ready:
                        raise calls.hung(slot, time.perf_counter() - began)
                    if u is None:
                        self.recovery.finish_build(slot)
                    else:
                        results[u] = calls.get(done, slot)
                        calls.slowest = max(calls.slowest, time.perf_counter() - began)
                        bar.update(len(units[u]))
                except _WorkerDied as dead:
                    lost = ""
                    if u is not None:
                        queue.appendleft(u)
                        self.requeued += len(units[u])
                        lost = f"its in-flight member(s) {', '.join(str(i) for i in units[u])}" + (
                            f" of iteration {state.global_step}" if state is not None else ""
                        )
                    fetched.discard(slot.index)
                    self.recovery.replace(
                        dead, "while scoring" if u is not None else "while being rebuilt", lost
                    )
                    running[calls.slots[slot.index].building] = (calls.slots[slot.index], None)
                    continue
                idle.append(slot)
        finally:
            bar.close()
        pop = Population()
        for part in results:
            pop.summaries += part.summaries
            pop.completions += part.completions
            pop.tokens += part.tokens
            pop.truncated += part.truncated
            pop.failures += part.failures
            for k, v in part.timer.items():
                pop.timer[k] = pop.timer.get(k, 0.0) + v
        for k in pop.timer:
            pop.timer[k] /= len(calls.slots)
        return pop
