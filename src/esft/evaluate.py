"""Evaluate an engine on a task split: mean reward, per-part means, task metrics, per-sample rows."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from esft.engines.base import Engine
from esft.tasks.base import Scores, Task


def evaluate(
    engine: Engine,
    task: Task,
    split: str = "test",
    limit: int = 0,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy completions for the first ``limit`` rows (0 = all) of ``split``, scored by the task.

    Returns (summary, samples): summary holds ``reward``, ``reward/<part>``, task metrics (e.g.
    ``accuracy``), ``completion_tokens`` and ``reward_failures``; samples hold one dict per row.
    """
    rows = task.split(split)
    if limit:
        rows = rows[:limit]
    max_new = max_new_tokens or task.max_new_tokens
    samples: list[dict[str, Any]] = []
    tokens = failures = 0
    totals: list[float] = []
    texts: list[str] = []
    parts: dict[str, list[float]] = {}
    bar = tqdm(
        total=len(rows), desc=f"eval {task.name}/{split}", unit="prompt", disable=not progress, leave=False
    )
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        gens = engine.generate([r["prompt"] for r in batch], max_new)
        scores = task.score(batch, [g.text for g in gens])
        failures += scores.failures
        totals += scores.total
        texts += scores.completions
        for name, values in scores.parts.items():
            parts.setdefault(name, []).extend(values)
        for i, (row, g) in enumerate(zip(batch, gens, strict=True)):
            tokens += g.num_tokens
            samples.append(
                {
                    "index": start + i,
                    "prompt": row["prompt"],
                    "completion": g.text,
                    "completion_tokens": g.num_tokens,
                    "truncated": g.truncated,
                    "reward": scores.total[i],
                    "parts": {name: values[i] for name, values in scores.parts.items()},
                    **{k: v for k, v in row.items() if k != "prompt"},
                }
            )
        bar.update(len(batch))
    bar.close()
    summary = task.summary(Scores(total=totals, parts=parts, failures=failures, completions=texts))
    summary["completion_tokens"] = tokens / max(len(rows), 1)
    summary["reward_failures"] = failures
    summary["samples"] = len(rows)
    return summary, samples


def format_summary(summary: dict[str, float]) -> str:
    """One readable line: reward first, then metrics, then parts."""
    keys = ["reward"] + [k for k in summary if k not in ("reward",) and not k.startswith("reward/")]
    keys += [k for k in summary if k.startswith("reward/")]
    out = []
    for k in keys:
        v = summary[k]
        out.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(out)
