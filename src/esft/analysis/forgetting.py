"""Forgetting: held-out tasks evaluated across checkpoints, and sequential training A -> B -> C.

Two views on the same matrix of greedy evaluations (value = the task's ``accuracy`` when it has an
answer part, else its mean ``reward``):

- across one run: rows are the base model and each checkpoint, columns the tasks;
- sequential training: stage 0 is the first run's base, stage k the final checkpoint of the k-th run
  (each run normally starts from the previous one's final checkpoint), columns the tasks.

Forgetting of task j (Chaudhry et al. 2018): the best value before the final stage minus the final
value, F_j = max_{k < K} v_{k,j} - v_{K,j}; positive means the later training lost some of it.
``change`` = v_{K,j} - v_{0,j} is the net effect against the base.

One engine is built from the first model; every other stage's weights are copied into it in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from esft.analysis.tensors import load_weights
from esft.evaluate import evaluate
from esft.tasks.base import Task


def task_value(summary: dict[str, float]) -> tuple[str, float]:
    """(metric name, value): accuracy when the task reports it, else mean reward."""
    if "accuracy" in summary:
        return "accuracy", float(summary["accuracy"])
    return "reward", float(summary["reward"])


@dataclass
class StageMatrix:
    """values[stage][task] for stages in order; metric[task] names what the value is."""

    stages: list[str]
    tasks: list[str]
    values: dict[str, dict[str, float]] = field(default_factory=dict)
    metric: dict[str, str] = field(default_factory=dict)
    summaries: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)

    def forgetting(self) -> dict[str, float | None]:
        """max over earlier stages minus the final stage, per task (None with a single stage)."""
        if len(self.stages) < 2:
            return {t: None for t in self.tasks}
        final = self.stages[-1]
        return {
            t: max(self.values[s][t] for s in self.stages[:-1]) - self.values[final][t] for t in self.tasks
        }

    def change(self) -> dict[str, float]:
        first, final = self.stages[0], self.stages[-1]
        return {t: self.values[final][t] - self.values[first][t] for t in self.tasks}

    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": self.stages,
            "tasks": self.tasks,
            "models": self.models,
            "metric": self.metric,
            "values": self.values,
            "forgetting": self.forgetting(),
            "forgetting_definition": "max over stages before the last of value - value at the last stage",
            "change": self.change(),
            "summaries": self.summaries,
        }


def evaluate_stages(
    engine: Any,
    stages: list[tuple[str, Path | None]],
    tasks: list[Task],
    split: str = "test",
    limit: int = 0,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> StageMatrix:
    """Evaluate every task at every stage. ``stages`` are (label, checkpoint folder); a folder of None
    means the weights ``engine`` holds already (the model it was built from)."""
    matrix = StageMatrix([label for label, _ in stages], [t.name for t in tasks])
    params = engine.parameters()
    bar = tqdm(total=len(stages) * len(tasks), desc="evaluate", unit="eval", disable=not progress)
    for label, folder in stages:
        if folder is not None:
            load_weights(params, Path(folder))
        matrix.models[label] = str(folder) if folder is not None else "(engine's model)"
        matrix.values[label], matrix.summaries[label] = {}, {}
        for task in tasks:
            summary, _ = evaluate(engine, task, split, limit, max_new_tokens, batch_size, False)
            metric, value = task_value(summary)
            matrix.metric[task.name] = metric
            matrix.values[label][task.name] = value
            matrix.summaries[label][task.name] = summary
            bar.update(1)
    bar.close()
    return matrix
