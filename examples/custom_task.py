"""A custom esft task in one file: spell a word backwards.

Train on it with
    esft train --task examples/custom_task.py:make_task --task-option words=20 --population 8
or use it from Python with ``esft.tasks.load_task("examples/custom_task.py:make_task")``.

A task is a train/test loader plus reward functions with TRL's signature
``f(prompts, completions, **columns) -> list[float]``; every column of a row (here ``word``) reaches
the reward as a keyword argument. Each reward function is a named part of the total reward.
"""

from __future__ import annotations

import random

from esft.tasks import RewardPart, Task, completion_text

WORDS = ["planet", "garden", "silver", "window", "rocket", "butter", "candle", "forest", "orange", "pencil",
         "marble", "castle", "dragon", "winter", "bridge", "copper", "jungle", "parrot", "violin", "tunnel"]  # fmt: skip


def reversed_word_reward(prompts, completions, word, **kwargs) -> list[float]:
    """1.0 when the completion's first word is the reversed word, else 0."""
    out = []
    for completion, w in zip(completions, word, strict=True):
        text = completion_text(completion).strip().split()
        out.append(1.0 if text and text[0].strip(".,!\"'").lower() == w[::-1] else 0.0)
    return out


def brevity_reward(prompts, completions, **kwargs) -> list[float]:
    """A small bonus for answering in one word."""
    return [1.0 if len(completion_text(c).split()) == 1 else 0.0 for c in completions]


def make_task(words: int = 20, seed: int = 0) -> Task:
    """The factory ``--task examples/custom_task.py:make_task`` calls, with ``--task-option`` values."""
    pool = WORDS[: max(2, min(int(words), len(WORDS)))]
    random.Random(seed).shuffle(pool)
    n_test = max(1, len(pool) // 4)

    def loader(split: str) -> list[dict]:
        chosen = pool[n_test:] if split == "train" else pool[:n_test]
        return [
            {
                "prompt": [{"role": "user", "content": f"Spell '{w}' backwards. Answer with one word."}],
                "word": w,
            }
            for w in chosen
        ]

    return Task(
        name="reverse-word",
        loader=loader,
        rewards=[RewardPart("correct", reversed_word_reward, 1.0), RewardPart("brief", brevity_reward, 0.1)],
        description="spell a word backwards",
        max_new_tokens=16,
    )
