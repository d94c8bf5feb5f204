"""The driver side of distributed ES on Ray: a pool of workers that the trainer uses as its engine.

The trainer's loop does not change; the pool takes the engine's place (``worker.py`` is the other side).
``WorkerPool`` composes one module per concern, each of which says more:

- **Start** (``cluster.py``): join ``--ray-address`` or start a local cluster, place the K workers, each
  of which loads the model.
- **Scoring** (``scheduling.py``). ``score_population`` hands the whole population to
  ``WorkerPool.score_population``, which splits it into work units and hands them out dynamically:
  whichever worker is free takes the next unit. A unit is one member or one population batch, so the
  results equal a single-process run for the same seeds, engine and hardware, whatever the number of
  workers.
- **Update** (here and ``calls.py``). ``param_set`` returns a ``RemoteParamSet`` (``es/remote.py``) whose
  calls are broadcast to every worker: each applies the update to its own replica; no weights cross the
  network. Every answer carries a checksum of the worker's weights, and the run stops with an error
  naming the first differing tensor if two workers ever disagree.
- **Evaluation and checkpoints** run on one worker: ``generate`` for evaluation, ``save`` from a worker
  on the driver's own node straight into the run folder (from another node the files are copied over in
  chunks: ``checkpoints.py``). The driver holds no model: a replica there would cost a second copy of the
  model (plus its pristine copy) on an accelerator of the workers' kind, since CPU and CUDA draw
  different noise, and its update would compete with worker 0's. The run folder is the single-process
  trainer's.
- **Worker loss** (``recovery.py``). A worker that dies, or stops answering past the hang limit
  (``--worker-timeout``), loses only its in-flight unit, which is re-queued; a replacement is rebuilt
  from the newest checkpoint plus the updates since, and the run ends with the weights it would have had
  without the failure.

``calls.py`` also counts the pickled bytes of every call and answer (``traffic``); ``traffic_log`` splits
them by update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from esft.distributed.calls import HANG_FACTOR, HANG_FLOOR_S, Calls, DistributedError
from esft.distributed.checkpoints import _checkpoint_iteration
from esft.distributed.checkpoints import save as save_checkpoint
from esft.distributed.cluster import (
    CONNECT_TIMEOUT_S,
    FAULT_ENV,
    PLACEMENT_TIMEOUT_S,
    check_reachable,
    connect,
    import_ray,
    start_workers,
    usable_cpus,
)
from esft.distributed.recovery import Recovery
from esft.distributed.scheduling import Scheduler
from esft.errors import ConfigError
from esft.es.noise import Member
from esft.es.remote import RemoteParamSet

__all__ = [
    "CONNECT_TIMEOUT_S",
    "FAULT_ENV",
    "HANG_FACTOR",
    "HANG_FLOOR_S",
    "PLACEMENT_TIMEOUT_S",
    "DistributedError",
    "WorkerPool",
    "check_reachable",
    "import_ray",
    "usable_cpus",
]


class WorkerPool:
    """K Ray workers used as one engine (see the module docstring). Engine protocol: ``generate``,
    ``save``; ES: ``param_set``, ``score_population``; ``describe_environment`` for environment.json."""

    def __init__(
        self,
        config: Any,
        model_path: str,
        engine_options: dict[str, Any],
        task: Any,
        checkpoints: Callable[[], dict[int, Any]] | None = None,
        log: Callable[[str], None] = print,
        threads: int | None = None,
    ) -> None:
        self.workers = int(getattr(config, "workers", 1) or 1)
        self.threads = threads  # torch threads per worker; None: the worker's share of the CPUs
        self.address = getattr(config, "ray_address", None) or None
        self.gpus_per_worker = float(getattr(config, "gpus_per_worker", 0) or 0)
        self.ray = import_ray(self.workers, self.address)
        if self.workers < 1:
            raise ConfigError(f"workers must be an integer >= 1, got {self.workers}")
        if str(config.device).startswith("cuda") and self.gpus_per_worker <= 0:
            raise ConfigError(
                f"--device {config.device} with Ray workers needs --gpus-per-worker (e.g. 1): "
                "Ray hides the GPUs from a worker that asks for none"
            )
        self.log, self.task = log, task
        self.source = str(model_path)
        self.source_iteration = _checkpoint_iteration(self.source)
        self._params: RemoteParamSet | None = None
        self.calls = Calls(self.ray, float(getattr(config, "worker_timeout", 0) or 0))
        self.traffic_log: list[dict[str, int]] = []  # per update: payload bytes since the previous one
        self._since = dict(self.traffic)

        # usable_cpus is passed from this module's namespace: tests patch pool.usable_cpus
        self.started_ray = connect(self.ray, self.address, self.workers, cpus=usable_cpus)
        try:
            started = start_workers(
                self.calls,
                config,
                engine_options,
                task,
                self.source,
                self.source_iteration,
                self.workers,
                self.gpus_per_worker,
                self.threads,
                log,
            )
        except BaseException:
            self.close()
            raise
        self.driver_node, self.spec = started.driver_node, started.spec
        self.device, self.dtype, self.dtype_reason = started.device, started.dtype, started.dtype_reason
        self.recovery = Recovery(
            self.calls,
            started.actor,
            self.spec,
            self.source,
            self.source_iteration,
            checkpoints,
            log,
            max_replacements=3 * self.workers,
        )
        self.calls.recovery = self.recovery  # broadcasts and single calls replace a worker that dies
        self.scheduler = Scheduler(self.calls, self.recovery)

    @property
    def slots(self):
        """The workers (``calls._Slot``), by index."""
        return self.calls.slots

    @property
    def traffic(self) -> dict[str, int]:
        """Pickled payload bytes sent and received, since start."""
        return self.calls.traffic

    @property
    def updates(self) -> list[dict[str, Any]]:
        """Every update broadcast since the source (seed-log rows)."""
        return self.recovery.updates

    @property
    def init_args(self) -> list[Any] | None:
        """The arguments the workers' ParamSets were built with (None before ``param_set``)."""
        return self.recovery.init_args

    # -- the engine protocol (evaluation, checkpoints, environment) --------------------------------

    def parameters(self) -> dict[str, Any]:
        raise NotImplementedError(
            "the weights live in the Ray workers; use param_set(freeze, noise, rank) for ES and save() to read them"
        )

    def generate(self, prompts: list[Any], max_new_tokens: int, sampling: Any = None) -> list[Any]:
        return self.calls.one("generate", prompts, max_new_tokens, sampling)

    def save(self, path: str | Path) -> None:
        """Write the weights into ``path`` (``checkpoints.save``: from a worker on this node if any)."""
        save_checkpoint(self.calls, self.recovery, path, self.driver_node)

    def describe_environment(self, engine_name: str, model_path: str) -> dict[str, Any]:
        """environment.json as the workers see it; they must all agree (a member's reward must not depend
        on which worker scored it)."""
        answers = self.calls.broadcast("describe", engine_name, model_path)
        first = answers[min(answers)]
        for i, env in sorted(answers.items()):
            diff = [f"{k} {first.get(k)!r} vs {env.get(k)!r}" for k in first if env.get(k) != first.get(k)]
            if diff:
                # esft's own code counts: a commit may change how members are scored (c56a73d did)
                same = (
                    "esft code (the same commit, unmodified), "
                    if env.get("esft") != first.get("esft")
                    else ""
                )
                raise ConfigError(
                    f"Ray workers {min(answers)} and {i} run in different environments ({'; '.join(diff)}): "
                    "a member's reward would depend on which worker scored it; give every worker the same "
                    f"{same}device, libraries and model files"
                )
        return first

    @property
    def min_new_tokens(self) -> int:
        return int(self.spec["min_new_tokens"])

    @min_new_tokens.setter
    def min_new_tokens(self, n: int) -> None:
        self.spec["min_new_tokens"] = int(n)
        self.calls.broadcast("set_min_new_tokens", int(n))

    # -- ES ---------------------------------------------------------------------------------------

    def param_set(
        self,
        freeze: list[str] | tuple[str, ...] = (),
        noise: str = "independent",
        rank: int = 1,
        precision: str = "auto",
        state_dir: str | None = None,
    ):
        """A RemoteParamSet over every worker: building it builds each worker's ParamSet; its update is
        applied by every worker and checked for agreement."""
        self._params = RemoteParamSet(self._call_all, freeze, noise, rank, precision, state_dir)
        return self._params

    def _call_all(self, method: str, *args: Any) -> Any:
        """RemoteParamSet's transport: broadcast, check the replicas agree, answer worker 0's (or the
        lowest surviving worker's) result. Updates are recorded first, so a worker that dies during one
        is rebuilt with it."""
        if method == "esft_init_params":
            self.recovery.init_args = list(args)
        if method == "esft_update":
            self.recovery.updates.append({"members": args[0], "weights": args[1], "alpha": args[2]})
        answers = self.calls.broadcast(method, *args)
        n = len(self.updates)
        self.calls.agree(
            answers, method.removeprefix("esft_").replace("_", " "), n, self.source_iteration + n
        )
        if method == "esft_update":  # an iteration's traffic: its scoring, its update (and evaluation)
            self.traffic_log.append({k: self.traffic[k] - self._since[k] for k in self.traffic})
        if method in ("esft_update", "esft_init_params"):
            self._since = dict(self.traffic)
        return answers[min(answers)]

    def score_population(
        self,
        params: Any,
        task: Any,
        members: list[Member],
        rows: list[dict[str, Any]],
        sigma: float,
        max_new_tokens: int,
        desc: str = "members",
        progress: bool = False,
        state: Any = None,
    ):
        """What ``population.score_population`` computes, with the members spread over the workers (each
        scores with its own task, built from the same settings as ``task``; ``scheduling.py``)."""

        if params is not self._params:
            raise ValueError("score_population needs this pool's param_set()")
        return self.scheduler.score_population(
            params.scheme, members, rows, sigma, max_new_tokens, desc=desc, progress=progress, state=state
        )

    # -- end ----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the workers (and the local Ray cluster, if this pool started it)."""
        if self.calls.closed:
            return
        self.calls.close()
        if self.traffic_log:
            per = {k: sum(t[k] for t in self.traffic_log) / len(self.traffic_log) for k in self.traffic}
            self.log(
                f"esft: Ray pool: {per['sent'] / 1e3:.1f} kB sent and {per['received'] / 1e3:.1f} kB received per "
                f"iteration (payload); {self.scheduler.requeued} member(s) re-queued, {self.recovery.replaced} "
                "worker(s) replaced"
            )
        if self.started_ray:
            with contextlib.suppress(Exception):
                self.ray.shutdown()
