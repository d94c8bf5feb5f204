"""Evaluate an engine on a task split: mean reward, per-part means, task metrics, per-sample rows."""

from __future__ import annotations

import math
from collections.abc import Callable
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


EVAL_EXAMPLES = 8  # completions kept per periodic evaluation (eval.jsonl "examples"), first rows


def periodic_eval(
    engine: Engine,
    task: Task,
    eval_split: str,
    limit: int,
    max_new_tokens: int,
    batch_size: int,
    step: int,
    store: Any,
    callbacks: Any,
    log: Callable[[str], None],
    progress: bool = False,
) -> list[dict[str, Any]]:
    """A trainer's periodic evaluation at iteration/step ``step``: greedy, on ``eval_split`` (train, test
    or both), one eval.jsonl row per split with the first completions as examples, its scalars to the
    run's callbacks (``esft.callbacks``: TensorBoard, trackers) and a log line. ES and GRPO both call
    this, so their eval.jsonl rows mean the same thing."""
    splits = ["train", "test"] if eval_split == "both" else [eval_split]
    rows = []
    scalars: dict[str, float] = {}
    for split in splits:
        summary, samples = evaluate(engine, task, split, limit, max_new_tokens, batch_size, progress)
        examples = [
            {"prompt": prompt_text(s["prompt"]), "completion": s["completion"], "reward": s["reward"]}
            for s in samples[:EVAL_EXAMPLES]
        ]
        row = {"iteration": step, "split": split, **summary, "examples": examples}
        store.append_eval(row)
        prefix = "eval" if len(splits) == 1 else f"eval/{split}"
        for k, v in summary.items():
            if isinstance(v, int | float) and math.isfinite(v):
                scalars[f"{prefix}/{k}"] = float(v)
        log(f"eval ({split}) @ iter {step}: {format_summary(summary)}")
        rows.append(row)
    callbacks.on_evaluate(scalars, rows, step)
    return rows


def prompt_text(prompt: Any) -> str:
    """The last user message of a chat prompt, or the raw prompt."""
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1] if users else prompt[-1].get("content", ""))
    return str(prompt)
