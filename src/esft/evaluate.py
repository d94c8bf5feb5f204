"""Evaluate an engine on a task split: mean reward, per-part means, task metrics, per-sample rows."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from esft.engines.base import Engine, Sampling
from esft.tasks.base import Scores, Task


def evaluate(
    engine: Engine,
    task: Task,
    split: str = "test",
    limit: int = 0,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    progress: bool = True,
    sampling: Sampling | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Completions for the first ``limit`` rows (0 = all) of ``split``, scored by the task.

    Greedy by default (one completion per prompt: accuracy is pass@1). With ``sampling``, K sampled
    completions per prompt; the summary adds ``mean@K`` (share of correct samples) and ``pass@K``
    (share of prompts with at least one correct sample), where correct means the ``answer`` part is 1.

    Returns (summary, samples): summary holds ``reward``, ``reward/<part>``, task metrics (e.g.
    ``accuracy``), ``completion_tokens`` and ``reward_failures``; samples hold one dict per completion.
    """
    rows = task.split(split)
    if limit:
        rows = rows[:limit]
    k = sampling.samples if sampling is not None else 1
    max_new = max_new_tokens or task.max_new_tokens
    samples: list[dict[str, Any]] = []
    tokens = failures = 0
    totals: list[float] = []
    texts: list[str] = []
    parts: dict[str, list[float]] = {}
    bar = tqdm(
        total=len(rows), desc=f"eval {task.name}/{split}", unit="prompt", disable=not progress, leave=False
    )
    step = max(1, batch_size // k)
    for start in range(0, len(rows), step):
        batch = rows[start : start + step]
        gens = engine.generate([r["prompt"] for r in batch], max_new, sampling)
        scored_rows = [row for row in batch for _ in range(k)]  # prompt-major, as the engine returns
        scores = task.score(scored_rows, [g.text for g in gens], [g.token_ids for g in gens])
        failures += scores.failures
        totals += scores.total
        texts += scores.completions
        for name, values in scores.parts.items():
            parts.setdefault(name, []).extend(values)
        for i, (row, g) in enumerate(zip(scored_rows, gens, strict=True)):
            tokens += g.num_tokens
            samples.append(
                {
                    "index": start + i // k,
                    "sample": i % k,
                    "prompt": row["prompt"],
                    "completion": g.text,
                    "completion_tokens": g.num_tokens,
                    "truncated": g.truncated,
                    "reward": scores.total[i],
                    "parts": {name: values[i] for name, values in scores.parts.items()},
                    # columns reward functions added with log_extra (TRL's completions table)
                    **{
                        f"extra/{col}": vals[i]
                        for col, vals in scores.extra.items()
                        if len(vals) == len(scored_rows)
                    },
                    **{key: v for key, v in row.items() if key != "prompt"},
                }
            )
        bar.update(len(batch))
    bar.close()
    summary = task.summary(Scores(total=totals, parts=parts, failures=failures, completions=texts))
    if k > 1 and "answer" in parts:
        correct = [v >= 1.0 for v in parts["answer"]]
        summary[f"mean@{k}"] = sum(correct) / max(len(correct), 1)
        per_prompt = [any(correct[j * k : (j + 1) * k]) for j in range(len(rows))]
        summary[f"pass@{k}"] = sum(per_prompt) / max(len(rows), 1)
    summary["completion_tokens"] = tokens / max(len(samples), 1)
    summary["reward_failures"] = failures
    summary["samples"] = len(samples)
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
