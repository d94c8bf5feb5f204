"""User-defined tasks: a data file plus a reward, or a Task built in a Python file.

1. ``--task custom --data rows.jsonl --reward my_rewards.py:fn``: rows hold ``prompt`` (a string, or
   a list of chat messages) plus any columns the reward reads; an optional ``split`` column (else a
   fixed 90/10 split). Without ``--reward`` there is nothing to optimise, so it is an error.
2. ``--task path/to/file.py:make_task`` (or ``package.module:make_task``): the object is a
   :class:`~esft.tasks.base.Task`, or a callable that takes the ``--task-option`` values as keyword
   arguments and returns one. See ``examples/custom_task.py``.
3. In Python (``esft.api``, TRL's shape): rows already in memory (a ``datasets.Dataset``'s) plus reward
   functions, :func:`task_from_rows`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from esft.errors import ConfigError, DataError
from esft.tasks.base import RewardPart, Task
from esft.tasks.data_files import file_split, read_rows


def check_prompts(rows: Sequence[dict[str, Any]], where: str) -> None:
    """Each row holds a ``prompt`` that is a string or a list of chat messages (TRL's two formats);
    otherwise a one-line DataError naming ``where`` and the first bad row."""
    for i, r in enumerate(rows, start=1):
        if "prompt" not in r:
            raise DataError(f"{where}: row {i} has no 'prompt'")
        p = r["prompt"]
        if not (isinstance(p, str) or (isinstance(p, list) and all(isinstance(m, dict) for m in p))):
            raise DataError(f"{where}: row {i}: 'prompt' must be a string or a list of chat messages")


def reward_parts(functions: Sequence[Callable[..., Any]]) -> list[RewardPart]:
    """TRL-signature reward functions as the task's parts, named like TRL names them (``__name__``;
    a second function of the same name gets ``_`` appended, so both stay separate parts), weight 1."""
    parts: list[RewardPart] = []
    for fn in functions:
        name = getattr(fn, "__name__", None) or type(fn).__name__
        while name in {p.name for p in parts}:
            name += "_"
        parts.append(RewardPart(name, fn, 1.0))
    return parts


def task_from_rows(
    train: list[dict[str, Any]],
    test: list[dict[str, Any]],
    rewards: list[RewardPart],
    name: str = "custom",
    description: str = "",
) -> Task:
    """A task over rows held in memory (``prompt`` + the columns the rewards read); its completion
    limit defaults to 256 tokens, TRL's ``max_completion_length``."""
    splits = {"train": train, "test": test}
    return Task(
        name=name,
        loader=lambda split: splits[split],
        rewards=rewards,
        description=description or f"{len(train)} train rows, {len(test)} test rows (in memory)",
        max_new_tokens=256,
    )


def load_custom(data_file: str | None = None, test_file: str | None = None, seed: int = 42) -> Task:
    """Rows from ``data_file`` (``prompt`` + reward columns); the reward comes from ``--reward``."""
    if not data_file:
        raise ConfigError(
            "task custom needs a data file: --data rows.jsonl (rows with 'prompt' + your columns)"
        )

    def read(path: str) -> list[dict[str, Any]]:
        rows = read_rows(path, required=("prompt",))
        check_prompts(rows, path)
        return rows

    def loader(split: str) -> list[dict[str, Any]]:
        return file_split(split, data_file, test_file, seed, read)

    return Task(
        name="custom",
        loader=loader,
        rewards=[],
        description=f"rows from {data_file}",
        options={"data_file": data_file, "test_file": test_file, "seed": seed},
    )


def task_from_object(spec: str, obj: Any, options: dict[str, Any]) -> Task:
    """A Task from a user object: a Task instance, or a factory called with ``options``."""
    if isinstance(obj, Task):
        if options:
            raise ConfigError(f"{spec} is a Task instance and takes no --task-option")
        return obj
    if callable(obj):
        try:
            task = obj(**options)
        except TypeError as e:
            raise ConfigError(f"{spec} cannot be called as a task factory: {e}") from None
        if isinstance(task, Task):
            return task
        raise ConfigError(f"{spec} returned {type(task).__name__}, not an esft Task")
    raise ConfigError(f"{spec} is neither an esft Task nor a function returning one")
