"""The task protocol: a dataset split into train/test, a prompt per row, and reward functions.

Reward functions use TRL's signature ``f(prompts, completions, **columns) -> list[float]`` so that users
can bring TRL reward functions and our rewards work inside TRL. Following TRL, completions are strings
for raw-text prompts and ``[{"role": "assistant", "content": ...}]`` for conversational prompts.
A task's total reward is the weighted sum of its functions; each function is a named *part* that is
logged on its own. A function that raises, or returns a non-finite value, scores 0 for the affected
samples and is counted as a failure: a bad reward never stops a run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from esft.errors import EsftError

RewardFn = Callable[..., list[float | None]]


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
    """Scores for a batch of completions."""

    total: list[float]  # weighted sum of the parts, per sample
    parts: dict[str, list[float]]  # part name -> per-sample value (unweighted)
    failures: int = 0  # samples x parts that raised or returned a non-finite value
    completions: list[str] = field(default_factory=list)  # the scored texts, for task metrics


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
    _splits: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)

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

    def score(self, rows: Sequence[dict[str, Any]], completions: Sequence[str]) -> Scores:
        """Score ``completions`` (plain text) for ``rows``; never raises for a bad reward function."""
        prompts = [row["prompt"] for row in rows]
        trl_completions = [
            c if isinstance(p, str) else [{"role": "assistant", "content": c}]
            for p, c in zip(prompts, completions, strict=True)
        ]
        columns = {k: [row.get(k) for row in rows] for k in rows[0] if k != "prompt"} if rows else {}
        total = [0.0] * len(rows)
        parts: dict[str, list[float]] = {}
        failures = 0
        for part in self.rewards:
            values, failed = _call_reward(part.fn, prompts, trl_completions, columns)
            failures += failed
            parts[part.name] = values
            for i, v in enumerate(values):
                total[i] += part.weight * v
        return Scores(total=total, parts=parts, failures=failures, completions=list(completions))

    def summary(self, scores: Scores) -> dict[str, float]:
        """Mean reward, mean of each part, and the task's own metrics."""
        n = max(len(scores.total), 1)
        out = {"reward": sum(scores.total) / n}
        for name, values in scores.parts.items():
            out[f"reward/{name}"] = sum(values) / n
        if self.metrics is not None:
            out.update(self.metrics(scores))
        return out


def _clean(value: Any) -> tuple[float, bool]:
    """(value as a finite float, ok). None means 'not applicable' in TRL and scores 0 without failing."""
    if value is None:
        return 0.0, True
    try:
        v = float(value)
    except (TypeError, ValueError):
        return 0.0, False
    return (v, True) if math.isfinite(v) else (0.0, False)


def _call_reward(fn: RewardFn, prompts, completions, columns) -> tuple[list[float], int]:
    """Call ``fn`` on the batch; if the batch call fails, score sample by sample to isolate failures."""
    n = len(prompts)
    try:
        raw = fn(prompts=prompts, completions=completions, **columns)
        if raw is None or len(raw) != n:
            raise ValueError("reward function returned the wrong number of values")
        cleaned = [_clean(v) for v in raw]
        return [v for v, _ in cleaned], sum(not ok for _, ok in cleaned)
    except EsftError:
        raise  # the user must change something (e.g. install the sandbox): never hidden as a failure
    except Exception:
        pass
    values, failures = [], 0
    for i in range(n):
        try:
            raw = fn(
                prompts=[prompts[i]], completions=[completions[i]], **{k: [v[i]] for k, v in columns.items()}
            )
            v, ok = _clean(raw[0])
        except EsftError:
            raise
        except Exception:
            v, ok = 0.0, False
        values.append(v)
        failures += not ok
    return values, failures
