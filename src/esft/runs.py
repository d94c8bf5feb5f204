"""What both trainers (ES: :mod:`esft.trainer`, GRPO: :mod:`esft.grpo`) do with their run folder.

- :func:`claim`: lock the folder before looking at it (a second writer stops there), check it for a
  fresh start or ``--resume`` (:func:`check_resumable`), fail on an empty train split or an unknown
  model before anything is written; the lock is released if any of it fails;
- :func:`run_training`: train under the lock, turn a full disk into a one-line error that says what
  was saved and how to continue, stop the engine's processes and release the lock on every path;
- :func:`record` and :func:`due`: one metrics row to metrics.jsonl and the run's callbacks
  (:mod:`esft.callbacks`: the trackers of :mod:`esft.trackers`, the caller's own), and the cadence of
  checkpoints and evaluations;
- :class:`TrainResult`: what ``train()`` returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from esft.callbacks import Callback, CallbackList
from esft.errors import ConfigError
from esft.models import resolve_model
from esft.runstore import DiskFullError, RunStore, is_disk_full
from esft.tasks import Task
from esft.trackers import trackers_for

# Settings a resumed run may change; anything else would change the trajectory.
RESUMABLE = {
    "iterations",
    "budget_samples",
    "checkpoint_every",
    "keep_checkpoints",
    "pin_checkpoints",
    "stop_when_flat",
    "eval_every",
    "eval_limit",
    "eval_split",
    "output",
    "report_to",  # where metrics are also sent (esft/trackers.py); metrics.jsonl is the same
    # where members are scored (Ray workers give the same results as one process: esft/distributed)
    "workers",
    "ray_address",
    "gpus_per_worker",
    "worker_timeout",
}


@dataclass
class TrainResult:
    run_dir: Path
    iterations: int
    final_checkpoint: Path | None
    eval_history: list[dict[str, Any]] = field(default_factory=list)


TRAINERS = {
    "es": ("an ES", "esft train"),
    "grpo": ("a GRPO", "esft grpo"),
}  # config's trainer -> name, command


def check_resumable(store: RunStore, config: Any, trainer: str) -> None:
    """``--resume``'s checks, for either trainer: ``store`` holds a run of ``trainer`` whose settings are
    ``config``'s except the RESUMABLE ones; otherwise a one-line ConfigError saying what to change."""
    if not store.exists():
        raise ConfigError(f"--resume: {store.root} holds no run to resume; drop --resume to start one")
    saved = store.read_config()
    was = saved.get("trainer", "es")
    if was != trainer:
        have, command = TRAINERS.get(was, (f"a {was}", f"esft {was}"))
        raise ConfigError(
            f"--resume: {store.root} is {have} run, not {TRAINERS[trainer][0]} run; "
            f"continue it with {command} --resume"
        )
    mine, fields = config.to_dict(), type(config).field_names()
    changed = sorted(k for k, v in saved.items() if k in fields and k not in RESUMABLE and v != mine.get(k))
    if changed:
        raise ConfigError(
            f"--resume: {', '.join(changed)} differ from the run in {store.root}; "
            "resume with the original settings (only iterations and logging cadence may change)"
        )


@contextlib.contextmanager
def _unlock_on_failure(store: RunStore) -> Iterator[None]:
    try:
        yield
    except BaseException:
        store.unlock()
        raise


def claim(
    store: RunStore,
    config: Any,
    trainer: str,
    task: Task,
    resume: bool,
    started: Path,
    on_resume: Callable[[], None] | None = None,
) -> str:
    """Lock ``store`` and check it; the resolved model path. A fresh start needs a folder without a run
    (no config and no ``started`` file, the trainer's first log); ``--resume`` one this trainer wrote with
    the same settings, and then ``on_resume`` runs its own checks. Releases the lock if anything fails."""
    store.lock()
    with _unlock_on_failure(store):
        if resume:
            check_resumable(store, config, trainer)
            if on_resume is not None:
                on_resume()
        elif store.exists() or started.exists():
            raise ConfigError(
                f"{store.root} already holds a run; pass --resume to continue it or choose another --output"
            )
        # fail on a bad dataset or model now, before anything is written to the run folder
        if not task.train:
            raise ConfigError(f"task {task.name!r} has an empty train split")
        return resolve_model(config.model)


def run_training(
    store: RunStore,
    body: Callable[[], TrainResult],
    disk_full: Callable[[], str],
    close: Callable[[], None] | None = None,
) -> TrainResult:
    """``body()`` under the run folder's lock. A full disk becomes a one-line DiskFullError with
    ``disk_full()``'s message; ``close()`` (the engine's processes) and the unlock run on every path."""
    store.lock()
    try:
        return body()
    except Exception as e:
        if is_disk_full(e):
            raise DiskFullError(disk_full()) from None
        raise
    finally:
        try:
            if close is not None:
                close()
        finally:
            store.unlock()


def record(store: RunStore, callbacks: Callback, metrics: dict[str, Any], step: int) -> None:
    """One metrics row: appended to metrics.jsonl, then to the callbacks (TensorBoard, trackers)."""
    store.append_metrics(metrics)
    callbacks.on_log(metrics, step)


def callbacks_for(trainer: str, extra: list[Callback] | None, report_to: list[str]) -> CallbackList:
    """The callbacks of a run: the trackers of ``report_to`` (``--report-to``: TensorBoard, W&B, MLflow,
    Trackio; :mod:`esft.trackers`), then the caller's own. A tracker whose package is missing is a
    one-line ConfigError here, before the run folder is touched."""
    return CallbackList([*trackers_for(report_to), *(extra or [])])


def due(step: int, every: int, final: bool) -> bool:
    """Whether a periodic action (checkpoint, evaluation) runs after ``step``: at the final step, and every
    ``every`` steps (0: only at the final one)."""
    return final or (bool(every) and step % every == 0)


def console(progress: bool) -> Callable[[str], None]:
    """The trainers' log: a line above the progress bars, or nothing without ``progress``."""

    def log(msg: str) -> None:
        if progress:
            tqdm.write(msg)

    return log
