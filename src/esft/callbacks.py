"""What a training run tells the outside while it runs: metrics, evaluations, checkpoints, its end.

Both trainers (ES and GRPO) call the same hooks at the same points, so whatever listens (TensorBoard,
experiment trackers, a sweep's pruner, a user's own callback) sees the same metric names for either:

- ``on_train_begin(run)``: the run folder is claimed and its config written (``run.start`` is the
  last iteration already done: 0, or where ``--resume`` continues);
- ``on_log(metrics, step)``: one metrics.jsonl row (the row itself, namespaces train/, es/, perf/);
- ``on_evaluate(scalars, rows, step)``: a periodic evaluation: its scalars (``eval/<metric>``, or
  ``eval/<split>/<metric>`` when both splits are evaluated) and its eval.jsonl rows;
- ``on_checkpoint(path, step)``: a checkpoint folder was written;
- ``on_train_end()``: the run ended, normally or not (called once).

A callback ends training early by setting ``stop`` to a reason (one line, logged): the trainer stops
after the current iteration or step, checkpoints it and ends as it would at its last one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunInfo:
    """The run a callback is attached to."""

    root: Path  # the run folder
    trainer: str  # "es" or "grpo"
    config: dict[str, Any] = field(default_factory=dict)  # the run's config.yaml
    start: int = 0  # iterations (steps) already done when this process started
    # the last iteration whose metrics row (and evaluation) an earlier attempt logged: a resumed GRPO
    # run redoes the steps after its last training state (start) up to these, and trackers that cannot
    # replace a logged step skip them
    logged_through: int = 0
    evaluated_through: int = 0


class Callback:
    """Override the hooks you need; every hook does nothing by default."""

    stop: str | None = None  # set to a reason to end training after the current step

    def on_train_begin(self, run: RunInfo) -> None:
        pass

    def on_log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def on_evaluate(self, scalars: dict[str, float], rows: list[dict[str, Any]], step: int) -> None:
        pass

    def on_checkpoint(self, path: Path, step: int) -> None:
        pass

    def on_train_end(self) -> None:
        pass


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row (what trackers plot), without the step itself."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and k != "iteration" and math.isfinite(v)
    }


class TensorBoardCallback(Callback):
    """Scalars into ``<run>/events`` (TensorBoard); a resumed run drops the events past its start."""

    def __init__(self) -> None:
        self.writer: Any = None

    def on_train_begin(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.root / "events"), purge_step=run.start + 1)

    def on_log(self, metrics: dict[str, Any], step: int) -> None:
        for k, v in scalars(metrics).items():
            self.writer.add_scalar(k, v, step)

    def on_evaluate(self, scalars: dict[str, float], rows: list[dict[str, Any]], step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def on_train_end(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class CallbackList(Callback):
    """Several callbacks as one, called in order; ``on_train_end`` reaches each once."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = list(callbacks)
        self._ended = False

    @property
    def stop(self) -> str | None:  # type: ignore[override]
        return next((cb.stop for cb in self.callbacks if cb.stop), None)

    def on_train_begin(self, run: RunInfo) -> None:
        self._ended = False
        for cb in self.callbacks:
            cb.on_train_begin(run)

    def on_log(self, metrics: dict[str, Any], step: int) -> None:
        for cb in self.callbacks:
            cb.on_log(metrics, step)

    def on_evaluate(self, scalars: dict[str, float], rows: list[dict[str, Any]], step: int) -> None:
        for cb in self.callbacks:
            cb.on_evaluate(scalars, rows, step)

    def on_checkpoint(self, path: Path, step: int) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(path, step)

    def on_train_end(self) -> None:
        if self._ended:
            return
        self._ended = True
        for cb in self.callbacks:
            cb.on_train_end()
