"""Tasks: datasets with prompts and TRL-signature reward functions.

``load_task(name, **options)`` returns a :class:`Task`; ``reward=`` replaces its rewards with a user
function given as ``module:function`` or ``path/to/file.py:function``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from esft.errors import ConfigError
from esft.tasks import arc, conciseness, countdown, custom, math_tasks, rgym
from esft.tasks.base import RewardPart, Scores, Task, completion_text

TASKS: dict[str, Callable[..., Task]] = {
    "countdown": countdown.load,
    "conciseness": conciseness.load,
    "math": math_tasks.load_math,
    "gsm8k": math_tasks.load_gsm8k,
    "sudoku": rgym.load_sudoku,
    "arc": arc.load,
    "custom": custom.load_custom,
}
RG_PREFIX = "rg:"  # rg:<dataset> builds a task from any reasoning-gym generator

__all__ = [
    "TASKS",
    "RewardPart",
    "Scores",
    "Task",
    "completion_text",
    "import_object",
    "is_task",
    "load_task",
    "parse_task_options",
]


def _is_user_task(name: str) -> bool:
    """``file.py:obj`` or ``package.module:obj`` (a user's Task or Task factory)."""
    module, sep, attr = name.rpartition(":")
    return bool(sep and module and attr) and not name.startswith(RG_PREFIX)


def is_task(name: str) -> bool:
    return name in TASKS or (name.startswith(RG_PREFIX) and len(name) > len(RG_PREFIX)) or _is_user_task(name)


def task_names() -> str:
    return ", ".join(sorted(TASKS)) + ", rg:<reasoning-gym dataset>, path/to/file.py:make_task"


def load_task(
    name: str,
    reward: str | list[str] | None = None,
    reward_weights: list[float] | None = None,
    **options: Any,
) -> Task:
    """Build task ``name`` with its ``options``; ``reward`` (one or several module:function specs)
    optionally replaces its reward functions, and ``reward_weights`` weighs them (or, without
    ``reward``, the task's own parts), as TRL's reward_weights."""
    if not is_task(name):
        raise ConfigError(f"unknown task {name!r}; available: {task_names()}")
    if _is_user_task(name):
        task = custom.task_from_object(name, import_object(name), options)
        return _with_reward(task, reward, reward_weights)
    if name.startswith(RG_PREFIX):
        factory = functools.partial(rgym.load_rg, name[len(RG_PREFIX) :])
        accepted = set(inspect.signature(rgym.load_rg).parameters) - {"dataset"}
    else:
        factory = TASKS[name]
        accepted = set(inspect.signature(factory).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(
            f"task {name!r} has no option {', '.join(unknown)}; its options are: {', '.join(sorted(accepted))}"
        )
    task = factory(**options)
    if name == "custom" and not reward:
        raise ConfigError("task custom needs a reward: --reward my_rewards.py:my_fn")
    return _with_reward(task, reward, reward_weights)


def _with_reward(task: Task, reward: str | list[str] | None, weights: list[float] | None = None) -> Task:
    specs = [reward] if isinstance(reward, str) else list(reward or [])
    if specs:
        functions = []
        for spec in specs:
            fn = import_object(spec)
            if not callable(fn):
                raise ConfigError(f"--reward {spec!r} is not callable")
            functions.append(fn)
        task.rewards = custom.reward_parts(functions)  # two functions of the same name stay two parts
        task.metrics = None
    if not task.rewards:
        raise ConfigError(
            f"task {task.name!r} has no reward functions; add one or pass --reward module:function"
        )
    if weights is not None:
        if len(weights) != len(task.rewards):
            names = ", ".join(p.name for p in task.rewards)
            raise ConfigError(
                f"--reward-weights has {len(weights)} values but the task has {len(task.rewards)} reward "
                f"parts ({names})"
            )
        for part, w in zip(task.rewards, weights, strict=True):
            part.weight = float(w)
    return task


def import_object(spec: str) -> Any:
    """Import ``module:attr`` or ``path/to/file.py:attr``."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{spec!r} is not an import path; use module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py") or "/" in module_name:
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise ConfigError(f"file {module_name!r} (from {spec!r}) does not exist")
            mod_spec = importlib.util.spec_from_file_location(f"esft_user_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"cannot import {module_name!r}: {type(e).__name__}: {e}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{module_name!r} has no attribute {attr!r}") from None


def parse_task_options(items: list[str] | None) -> dict[str, Any]:
    """``--task-option KEY=VALUE`` strings (values parsed as YAML scalars) -> dict."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--task-option {item!r} must look like KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value) if value else None
    return out
