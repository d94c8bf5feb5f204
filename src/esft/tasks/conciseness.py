"""Conciseness (Qiu et al. 2025, section 4.2): answer in as few characters as the reference answer.

Reward: R = -|len(y) - len(s)| for completion y and reference answer s (characters). The paper's data:
2 training prompts and 8 evaluation prompts (shipped in ``tasks/data``). Evaluation also reports the
normalised reward (R + 2000) / 2000 used in the paper's figures.

Prompts are raw text by default, as in the paper's code (``prompt_format="chat"`` wraps the question in
the model's chat template instead). Only the completion is measured, never the prompt.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from esft.errors import ConfigError
from esft.tasks.base import RewardPart, Scores, Task, completion_text
from esft.tasks.data_files import read_rows

DATA = files("esft.tasks") / "data"


def conciseness_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """-|len(completion) - len(answer)| in characters (TRL signature)."""
    return [-abs(len(completion_text(c)) - len(str(a))) for c, a in zip(completions, answer, strict=True)]


def normalised(scores: Scores) -> dict[str, float]:
    lengths = scores.parts.get("length", [])
    if not lengths:
        return {}
    return {"normalized_reward": sum((r + 2000.0) / 2000.0 for r in lengths) / len(lengths)}


def load(data_file: str | None = None, test_file: str | None = None, prompt_format: str = "raw") -> Task:
    """The conciseness task. Options: ``data_file``/``test_file`` (JSON/JSONL rows with ``question`` and
    ``answer``), ``prompt_format`` (``raw`` or ``chat``)."""
    if prompt_format not in ("raw", "chat"):
        raise ConfigError(f"conciseness prompt_format must be raw or chat, not {prompt_format!r}")

    def row(r: dict[str, Any]) -> dict[str, Any]:
        q = str(r["question"])
        prompt = q if prompt_format == "raw" else [{"role": "user", "content": q}]
        return {"prompt": prompt, "question": q, "answer": str(r["answer"])}

    def loader(split: str) -> list[dict[str, Any]]:
        path = (data_file if split == "train" else test_file) or str(DATA / f"conciseness_{split}.jsonl")
        return [row(r) for r in read_rows(path, required=("question", "answer"))]

    return Task(
        name="conciseness",
        loader=loader,
        rewards=[RewardPart("length", conciseness_reward, 1.0)],
        description="Conciseness: reward = -|len(completion) - len(reference)|",
        metrics=normalised,
        max_new_tokens=100,
        options={"data_file": data_file, "test_file": test_file, "prompt_format": prompt_format},
    )
