"""Distributed ES on Ray (docs/design.md, "Distributed ES on Ray"; Salimans et al. 2017): seeds out,
rewards back.

``esft train --workers K`` starts a local Ray cluster for the run; ``--ray-address ADDR`` joins a running
one. The trainer's engine is then a ``WorkerPool`` (``pool.py``, the driver side): K Ray actors
(``worker.py``, the actor side), each owning an engine with a full model replica on its own device(s)
and the task. Members are handed out dynamically, every worker applies each update itself, and only
seeds, member lists, shaped weights and scalar summaries cross the network (``docs/distributed.md``).

Ray is optional (``pip install -e '.[ray]'``); nothing here imports it until a pool starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

INSTALL = "pip install -e '.[ray]'"


def requested(config: Any) -> bool:
    """Whether ``config`` asks for Ray workers: ``workers`` > 1, or a ``ray_address`` to join."""
    return int(getattr(config, "workers", 1) or 1) > 1 or bool(getattr(config, "ray_address", None))


def start_pool(
    config: Any,
    model_path: str,
    engine_options: dict[str, Any],
    task: Any,
    checkpoints: Callable[[], dict[int, Any]] | None = None,
    log: Callable[[str], None] = print,
    threads: int | None = None,
):
    """Start (or join) Ray and a pool of ``config.workers`` workers, each holding the model at
    ``model_path``; see ``pool.WorkerPool``. ``threads``: torch threads per worker (default: its share
    of the cluster's CPUs)."""
    from esft.distributed.pool import WorkerPool

    return WorkerPool(
        config, model_path, engine_options, task, checkpoints=checkpoints, log=log, threads=threads
    )
