"""Starting a Ray pool (driver side): importing Ray, joining or starting a cluster, placing the workers.

``--ray-address ADDR`` joins a running cluster (checked for a listener first: ``ray.init`` retries an
unreachable address for minutes); without it the pool starts a local cluster on loopback for the run. The
workers are Ray actors (``worker.Worker``) with an equal share of the cluster's CPUs and
``--gpus-per-worker`` GPUs each; every one loads the model, and their weights must agree.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from esft.distributed import INSTALL
from esft.distributed.calls import Calls, DistributedError, _first_line, _Slot
from esft.errors import ConfigError

PLACEMENT_TIMEOUT_S = 120.0  # a worker not running after this long cannot be placed on the cluster
CONNECT_TIMEOUT_S = 3.0  # to reach --ray-address before handing it to ray.init (which retries for minutes)
FAULT_ENV = "ESFT_RAY_FAULT"  # test hook, see worker.parse_fault


def import_ray(workers: int, address: str | None):
    try:
        import ray
    except ImportError:
        what = f"--ray-address {address}" if address else f"--workers {workers}"
        raise ConfigError(f"{what} runs ES on Ray, which is not installed: {INSTALL}") from None
    return ray


def check_reachable(address: str) -> None:
    """Fail in seconds, with a one-line error, if nothing listens at ``address`` (host:port, or
    ray://host:port); ray.init itself retries an unreachable address for minutes."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r} must look like HOST:PORT (e.g. 10.0.0.1:6379) or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise ConfigError(
            f"--ray-address {address}: cannot reach a Ray cluster there ({e.strerror or e}); start one with "
            "`ray start --head` on that machine, or drop --ray-address to start a local one with --workers"
        ) from None


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        return os.cpu_count() or 1


def connect(ray: Any, address: str | None, workers: int, cpus: Callable[[], int] = usable_cpus) -> bool:
    """Join ``address``, reuse a Ray this process already started, or start a local cluster on
    loopback (with ``cpus()`` CPUs, at least one per worker); True if it started Ray (the pool then shuts
    it down at close)."""
    if address:
        check_reachable(address)
    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True, "include_dashboard": False}
    if address:
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError) as e:
            why, chain, cause = _first_line(e), "", e
            while cause is not None:  # Ray wraps the authentication error in a connection error
                chain, cause = chain + str(cause), cause.__cause__ or cause.__context__
            if "AuthToken" in chain or "uthentication" in chain:
                why = (
                    "it requires Ray's token: set RAY_AUTH_MODE=token here, with the cluster's token in "
                    "~/.ray/auth_token or RAY_AUTH_TOKEN (docs/distributed.md)"
                )
            raise ConfigError(f"--ray-address {address}: cannot join the Ray cluster: {why}") from None
        return True
    # Ray announces that it secures its local cluster with a token (it does, here too): not news
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(
        address="local",  # a new cluster for this run, even if `ray start` runs one on this machine
        num_cpus=max(cpus(), workers),
        _node_ip_address="127.0.0.1",  # this run's own cluster: nothing listens beyond loopback
        object_store_memory=256 << 20,  # only seeds, rows and summaries go through it
        **quiet,
    )
    return True


@dataclass
class Started:
    """What ``start_workers`` found out and made."""

    driver_node: str  # the Ray node this process runs on (checkpoints are written by a worker there)
    actor: Any  # the Worker class as a Ray actor with its resources (replacements start from it too)
    spec: dict[str, Any]  # what every worker builds (worker.Worker)
    device: str
    dtype: str
    dtype_reason: str


def start_workers(
    calls: Calls,
    config: Any,
    engine_options: dict[str, Any],
    task: Any,
    source: str,
    source_iteration: int,
    workers: int,
    gpus_per_worker: float,
    threads: int | None,
    log: Callable[[str], None],
) -> Started:
    """Place ``workers`` workers on the cluster (into ``calls.slots``, so closing the pool stops them
    even if this fails), have each load the model at ``source`` and check that they agree."""
    ray, k = calls.ray, workers
    driver_node = ray.get_runtime_context().get_node_id()
    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 1.0)), float(total.get("GPU", 0.0))
    if k * gpus_per_worker > gpus + 1e-9:
        raise ConfigError(
            f"--workers {k} x --gpus-per-worker {gpus_per_worker:g} needs {k * gpus_per_worker:g} "
            f"GPUs; the Ray cluster has {gpus:g}"
        )
    cpu_share = cpus / k
    # a resumed CPU run keeps the thread count it started with (rounding depends on it)
    threads = threads or max(1, int(cpu_share))
    spec = {
        "engine": config.engine,
        "dtype": config.dtype,
        "device": config.device,
        "batch_size": config.batch_size,
        "engine_options": dict(engine_options),
        "min_new_tokens": 0,
        "task": {
            "name": config.task,
            "reward": config.reward,
            "reward_weights": config.reward_weights,
            **dict(config.task_options),
        },
        "threads": threads,
        # a task the settings cannot rebuild (rewards given in Python) travels itself, rows left behind
        "task_object": None if getattr(task, "portable", True) else rewards_only(task),
    }
    from esft.distributed.worker import Worker

    actor = ray.remote(Worker).options(
        num_cpus=cpu_share, num_gpus=gpus_per_worker, max_restarts=0, max_task_retries=0
    )
    fault = os.environ.get(FAULT_ENV)
    tic = time.perf_counter()
    calls.slots = [_Slot(i, actor.remote(spec, i, fault)) for i in range(k)]
    where = [s.actor.where.remote() for s in calls.slots]
    ready, pending = ray.wait(where, num_returns=k, timeout=PLACEMENT_TIMEOUT_S)
    if pending:
        raise DistributedError(
            f"only {len(ready)} of {k} Ray workers started within {PLACEMENT_TIMEOUT_S:.0f} s: each needs "
            f"{cpu_share:g} CPUs and {gpus_per_worker:g} GPUs, and the cluster has {cpus:g} CPUs and "
            f"{gpus:g} GPUs in all (`ray status` shows them by node); lower --workers or --gpus-per-worker"
        )
    for slot, ref in zip(calls.slots, where, strict=True):
        info = calls.get(ref, slot, "starting")
        slot.node, slot.host = info["node"], info["host"]
    builds = [(s, s.actor.build.remote([(source, [])], None, 0)) for s in calls.slots]
    reports = [calls.get(ref, slot, "loading the model") for slot, ref in builds]
    calls.agree(
        {s.index: r for (s, _), r in zip(builds, reports, strict=True)},
        "loading the model",
        updates=0,
        iteration=source_iteration,
    )
    _check_task(task, reports[0])
    device, dtype = reports[0]["device"], reports[0]["dtype"]
    dtype_reason = str(reports[0].get("dtype_reason") or "")
    hosts = sorted({s.host for s in calls.slots})
    log(
        f"esft: {k} Ray worker(s) on {', '.join(hosts)} ({cpu_share:g} CPU, {threads} torch thread(s)"
        f"{f', {gpus_per_worker:g} GPU' if gpus_per_worker else ''} each; device {device}), "
        f"model loaded in {time.perf_counter() - tic:.1f} s"
        + ("" if gpus_per_worker or gpus == 0 else "; the cluster has GPUs: --gpus-per-worker 1 uses them")
    )
    return Started(driver_node, actor, spec, device, dtype, dtype_reason)


def _no_rows(split: str) -> list:
    return []


def rewards_only(task: Any) -> Any:
    """A copy of ``task`` without its rows (workers score the rows the driver sends): what a Ray worker
    receives when settings cannot rebuild the task. Ray pickles it with cloudpickle, so reward functions
    defined in a notebook or a script travel by value; functions of an importable module travel by name
    and must be importable on every node."""
    import dataclasses

    return dataclasses.replace(task, loader=_no_rows, _splits={}, _reported=set())


def _check_task(task: Any, report: dict[str, Any]) -> None:
    mine = [task.name, [[r.name, float(r.weight)] for r in task.rewards]]
    if report["task"] != mine:
        raise ConfigError(
            f"the Ray workers built task {report['task']} from the settings, but this trainer scores "
            f"{mine}; with --workers the task must come from the settings (--task, --reward, "
            "--reward-weights, --task-option), not a Task object"
        )
