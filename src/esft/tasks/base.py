"""The task protocol: a dataset split into train/test, a prompt per row, and reward functions.

Reward functions use TRL's signature ``f(prompts, completions, **columns) -> list[float]`` so that users
can bring TRL reward functions and our rewards work inside TRL. Following TRL, completions are strings
for raw-text prompts and ``[{"role": "assistant", "content": ...}]`` for conversational prompts.
A task's total reward is the weighted sum of its functions; each function is a named *part* that is
logged on its own. They receive what TRL's GRPOTrainer passes (``completion_ids``, ``trainer_state``,
``log_extra``, ``log_metric``, every dataset column), may be async, and may return None for "not
applicable" (left out of means, as TRL does). A function that raises, or returns a non-finite value,
scores 0 for the affected samples and is counted as a failure, its first error logged: a bad reward
never stops a run.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from esft.errors import EsftError

RewardFn = Callable[..., list[float | None]]
logger = logging.getLogger("esft.rewards")


def completion_text(completion: Any) -> str:
    """The text of a completion in either TRL format (string, or list of messages)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return "" if completion is None else str(completion)


@dataclass
class RewardPart:
    name: str
    fn: RewardFn
    weight: float = 1.0


@dataclass
class Scores:
    """Scores for a batch of completions.

    A reward function may return None for a sample ("not applicable", as in TRL): that part is NaN
    there and left out of means; a sample where every part is NaN has a NaN total and adds nothing."""

    total: list[float]  # weighted sum of the parts, per sample (NaN-aware; NaN if no part applied)
    parts: dict[str, list[float]]  # part name -> per-sample value (unweighted; NaN = not applicable)
    failures: int = 0  # samples x parts that raised or returned a non-number
    completions: list[str] = field(default_factory=list)  # the scored texts, for task metrics
    logged: dict[str, list[float]] = field(default_factory=dict)  # log_metric(name, value) calls
    extra: dict[str, list[Any]] = field(default_factory=dict)  # log_extra(column, values) columns


@dataclass
class TrainerState:
    """What TRL's GRPOTrainer passes as ``trainer_state`` (the fields reward functions read): for ES
    ``global_step`` is the iteration."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0


def answer_accuracy(scores: Scores) -> dict[str, float]:
    """Share of samples whose ``answer`` part is 1 (tasks with a 1/0 answer part use it as metrics)."""
    values = scores.parts.get("answer", [])
    return {"accuracy": sum(v >= 1.0 for v in values) / len(values)} if values else {}


@dataclass
class Task:
    """A dataset with prompts and rewards. Rows are dicts holding ``prompt`` plus the reward columns.

    ``loader(split)`` returns the rows of ``train`` or ``test``; it is called lazily and cached, since
    some generated splits take seconds to build and most commands need only one of them.
    """

    name: str
    loader: Callable[[str], list[dict[str, Any]]]
    rewards: list[RewardPart]
    description: str = ""
    max_new_tokens: int = 256  # default completion limit for this task
    # Extra evaluation metrics computed from Scores (e.g. accuracy from the answer part).
    metrics: Callable[[Scores], dict[str, float]] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    # False when the rewards exist only in this process (Python functions given to esft.ESTrainer):
    # settings cannot rebuild the task, so Ray workers receive the task itself (pickled by Ray)
    portable: bool = True
    _splits: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)
    _reported: set[str] = field(default_factory=set, repr=False)  # parts whose first failure was logged

    def split(self, name: str) -> list[dict[str, Any]]:
        if name not in ("train", "test"):
            from esft.errors import ConfigError

            raise ConfigError(f"unknown split {name!r}; use train or test")
        if name not in self._splits:
            self._splits[name] = self.loader(name)
        return self._splits[name]

    @property
    def train(self) -> list[dict[str, Any]]:
        return self.split("train")

    @property
    def test(self) -> list[dict[str, Any]]:
        return self.split("test")

    def score(
        self,
        rows: Sequence[dict[str, Any]],
        completions: Sequence[str],
        completion_ids: Sequence[Sequence[int]] | None = None,
        state: TrainerState | None = None,
    ) -> Scores:
        """Score ``completions`` (plain text) for ``rows``; never raises for a bad reward function.

        Reward functions get what GRPOTrainer passes: ``prompts``, ``completions``, ``completion_ids``,
        every dataset column, ``trainer_state``, ``log_extra`` and ``log_metric``. Async functions are
        awaited. The first failure of each part is logged with its message."""
        prompts = [row["prompt"] for row in rows]
        trl_completions = [
            c if isinstance(p, str) else [{"role": "assistant", "content": c}]
            for p, c in zip(prompts, completions, strict=True)
        ]
        ids = [list(x) for x in completion_ids] if completion_ids is not None else [[] for _ in completions]
        columns = {k: [row.get(k) for row in rows] for k in rows[0] if k != "prompt"} if rows else {}
        logged: dict[str, list[float]] = {}
        extra: dict[str, list[Any]] = {}

        def log_metric(name: str, value: float) -> None:
            logged.setdefault(str(name), []).append(float(value))

        def log_extra(column: str, values: list) -> None:
            extra.setdefault(str(column), []).extend(values)

        context = {
            "completion_ids": ids,
            "trainer_state": state or TrainerState(),
            "log_metric": log_metric,
            "log_extra": log_extra,
        }
        total = [0.0] * len(rows)
        applied = [False] * len(rows)
        parts: dict[str, list[float]] = {}
        failures = 0
        for part in self.rewards:
            values, failed, error = _call_reward(part.fn, prompts, trl_completions, columns, context)
            if error and part.name not in self._reported:
                self._reported.add(part.name)
                logger.warning(
                    "reward %r failed (first failure, later ones are only counted): %s", part.name, error
                )
            failures += failed
            parts[part.name] = values
            for i, v in enumerate(values):
                if not math.isnan(v):
                    total[i] += part.weight * v
                    applied[i] = True
        total = [t if ok else math.nan for t, ok in zip(total, applied, strict=True)]
        return Scores(
            total=total,
            parts=parts,
            failures=failures,
            completions=list(completions),
            logged=logged,
            extra=extra,
        )

    def summary(self, scores: Scores) -> dict[str, float]:
        """Mean reward, mean of each part (both over the samples where they apply; NaN if none), the
        task's own metrics, and the means of values reward functions logged with log_metric."""
        out = {"reward": nanmean(scores.total)}
        for name, values in scores.parts.items():
            out[f"reward/{name}"] = nanmean(values)
        if self.metrics is not None:
            out.update(self.metrics(scores))
        for name, values in scores.logged.items():
            out[f"logged/{name}"] = nanmean(values)
        return out


def nanmean(values: Sequence[float]) -> float:
    """Mean of the non-NaN values; NaN if there are none."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _clean(value: Any) -> tuple[float, bool]:
    """(value as a float, ok). None means "not applicable" in TRL: NaN, not a failure. Anything that is
    not a finite number is a failure and scores 0."""
    if value is None:
        return math.nan, True
    if isinstance(value, bool):
        return float(value), True
    try:
        v = float(value)
    except (TypeError, ValueError):
        return 0.0, False
    return (v, True) if math.isfinite(v) else (0.0, False)


def _invoke(fn: RewardFn, **kwargs: Any) -> Any:
    """Call ``fn``; await it if it is async (as GRPOTrainer does)."""
    out = fn(**kwargs)
    if inspect.isawaitable(out):
        out = _run_coroutine(out)
    return out


def _run_coroutine(coro: Any) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # called from inside a running loop (e.g. a notebook): run it on a fresh loop in a thread
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, coro).result()


def _call_reward(fn: RewardFn, prompts, completions, columns, context) -> tuple[list[float], int, str]:
    """Call ``fn`` on the batch; if the batch call fails, score sample by sample to isolate failures.
    Returns (values, failures, first error message or "")."""
    n = len(prompts)
    first_error = ""
    try:
        raw = _invoke(fn, prompts=prompts, completions=completions, **columns, **context)
        if raw is None or len(raw) != n:
            got = "None" if raw is None else f"{len(raw)} values"
            raise ValueError(f"returned {got} for {n} completions")
        cleaned = [_clean(v) for v in raw]
        bad = [raw[i] for i, (_, ok) in enumerate(cleaned) if not ok]
        if bad:
            first_error = f"returned {bad[0]!r}, not a finite number"
        return [v for v, _ in cleaned], len(bad), first_error
    except EsftError:
        raise  # the user must change something (e.g. install the sandbox): never hidden as a failure
    except Exception as e:
        first_error = f"{type(e).__name__}: {e}"
    values, failures = [], 0
    for i in range(n):
        one = {k: [v[i]] for k, v in columns.items()}
        one_context = {**context, "completion_ids": [context["completion_ids"][i]]}
        try:
            raw = _invoke(fn, prompts=[prompts[i]], completions=[completions[i]], **one, **one_context)
            v, ok = _clean(raw[0])
        except EsftError:
            raise
        except Exception:
            v, ok = 0.0, False
        values.append(v)
        failures += not ok
    return values, failures, first_error
