"""Tasks from reasoning-gym's procedural generators: ``rg:<dataset>`` and 4x4 Mini Sudoku.

``rg:<dataset>`` (e.g. ``rg:leg_counting``) turns any reasoning-gym generator into a task: the model
thinks in <think> tags and answers in <answer> tags; the reward is the generator's own
``score_answer`` on the last <answer> (weight 1) plus 0.1 x the format score used for Countdown.

``sudoku`` is the paper's 4x4 Mini Sudoku (Qiu et al. 2025, appendix): reasoning-gym's ``mini_sudoku``
puzzles with fixed-seed, disjoint train/test splits (paper: 800/200) and the same reward layout.
"""

from __future__ import annotations

import functools
from typing import Any

from esft.errors import ConfigError
from esft.tasks.base import RewardPart, Task, answer_accuracy, completion_text
from esft.tasks.countdown import PREFILL, SYSTEM  # the same think/answer prompt style
from esft.tasks.extract import format_score, last_answer_tag

INSTRUCTION = (
    "\n\nShow your work in <think> </think> tags. And return only the final answer in "
    "<answer> </answer> tags."
)


@functools.cache
def _scorer(dataset: str):
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(dataset)


def rg_answer_reward(prompts, completions, rg_dataset, rg_entry, **kwargs) -> list[float]:
    """reasoning-gym's own score of the last <answer> (TRL signature)."""
    out = []
    for c, name, entry in zip(completions, rg_dataset, rg_entry, strict=True):
        answer = last_answer_tag(completion_text(c))
        out.append(0.0 if answer is None else float(_scorer(name)(answer, entry)))
    return out


def rg_format_reward(prompts, completions, **kwargs) -> list[float]:
    """<think>...</think>\\n<answer>...</answer> format score (TRL signature)."""
    return [format_score(completion_text(c)) for c in completions]


def _generate(dataset: str, seed: int, train_size: int, test_size: int, config: dict) -> dict[str, list]:
    """Disjoint splits (by question text) from one seeded generator run."""
    import reasoning_gym

    try:
        ds = reasoning_gym.create_dataset(
            dataset, size=int((train_size + test_size) * 1.2) + 8, seed=seed, **config
        )
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise ConfigError(f"reasoning-gym cannot build {dataset!r}: {e}") from None
    seen, items = set(), []
    for entry in ds:
        if entry["question"] not in seen:
            seen.add(entry["question"])
            items.append(entry)
        if len(items) == train_size + test_size:
            break
    return {"train": items[:train_size], "test": items[train_size : train_size + test_size]}


def _task(name: str, dataset: str, seed: int, train_size: int, test_size: int, config: dict | None) -> Task:
    cache: dict[str, dict] = {}

    def loader(split: str) -> list[dict[str, Any]]:
        if "splits" not in cache:
            cache["splits"] = _generate(
                dataset, int(seed), int(train_size), int(test_size), dict(config or {})
            )
        return [
            {
                "prompt": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": entry["question"] + INSTRUCTION},
                    {"role": "assistant", "content": PREFILL},
                ],
                "rg_dataset": dataset,
                "rg_entry": entry,
                "answer": entry["answer"],
            }
            for entry in cache["splits"][split]
        ]

    return Task(
        name=name,
        loader=loader,
        rewards=[RewardPart("answer", rg_answer_reward, 1.0), RewardPart("format", rg_format_reward, 0.1)],
        description=f"reasoning-gym {dataset}: reward = score_answer + 0.1 x format",
        metrics=answer_accuracy,
        max_new_tokens=1024,
        options={"seed": seed, "train_size": train_size, "test_size": test_size, "config": config},
    )


def load_rg(
    dataset: str, seed: int = 42, train_size: int = 1000, test_size: int = 200, config: dict | None = None
) -> Task:
    """Any reasoning-gym generator. Options: ``seed``, ``train_size``, ``test_size``, ``config`` (the
    generator's own settings, e.g. {"min_animals": 2})."""
    import reasoning_gym.factory as factory

    if dataset not in factory.DATASETS:
        close = sorted(n for n in factory.DATASETS if dataset[:4] in n)[:5]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"reasoning-gym has no dataset {dataset!r}{hint}")
    return _task(f"rg:{dataset}", dataset, seed, train_size, test_size, config)


def load_sudoku(seed: int = 42, train_size: int = 800, test_size: int = 200) -> Task:
    """4x4 Mini Sudoku (paper: 800 train / 200 test). Options: ``seed``, ``train_size``, ``test_size``."""
    return _task("sudoku", "mini_sudoku", seed, train_size, test_size, None)
