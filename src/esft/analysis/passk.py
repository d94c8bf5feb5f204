"""Solution coverage: pass@k from n samples per prompt, and how many *different* correct answers.

pass@k (Chen et al. 2021): with n samples of which c are correct, the probability that a random
k-subset of them holds at least one correct sample is

    pass@k = 1 - C(n - c, k) / C(n, k),

an unbiased estimator of the chance that k fresh samples solve the prompt; averaged over prompts.
Computed stably as 1 - prod_{i = n-c+1}^{n} (1 - k / i) (no huge binomials), and 1 when n - c < k.

Diversity among correct samples: a correct completion's *answer* is the last ``<answer>...</answer>``
or ``\\boxed{...}`` in it, else the whole completion; answers and completions are normalised by
lowercasing and collapsing whitespace. Reported: distinct correct answers / correct samples (pooled;
1 = every correct sample gave a different answer, 1/n = always the same one), the same for whole
completions, and the mean number of distinct correct answers per prompt that has any. A model that
covers more solutions (rather than one mode) keeps pass@k rising with k.

Correct = the task's ``answer`` part is 1 (as ``esft eval``), or, for tasks without one, total reward
>= a threshold the caller gives.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from esft.errors import ConfigError
from esft.tasks.extract import last_answer_tag, last_boxed


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt with ``c`` correct out of ``n`` samples (needs k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def answer_of(completion: str) -> str:
    """The final answer in a completion (see module docstring), normalised."""
    found = last_answer_tag(completion)
    if found is None:
        found = last_boxed(completion)
    return normalize(found if found is not None else completion)


@dataclass
class Coverage:
    """pass@k for k = 1..K and diversity of the correct samples of one model on one task."""

    model: str
    samples: int  # n per prompt
    prompts: int
    pass_at: dict[int, float]
    correct_samples: int
    distinct_correct_answers: int
    distinct_correct_completions: int
    solved_prompts: int  # prompts with at least one correct sample
    per_prompt: list[dict[str, Any]] = field(default_factory=list)

    @property
    def distinct_answer_share(self) -> float:
        return self.distinct_correct_answers / self.correct_samples if self.correct_samples else math.nan

    @property
    def distinct_completion_share(self) -> float:
        return self.distinct_correct_completions / self.correct_samples if self.correct_samples else math.nan

    @property
    def distinct_answers_per_solved(self) -> float:
        return self.distinct_correct_answers / self.solved_prompts if self.solved_prompts else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "samples": self.samples,
            "prompts": self.prompts,
            "pass_at": {str(k): v for k, v in self.pass_at.items()},
            "estimator": "mean over prompts of 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)",
            "correct_samples": self.correct_samples,
            "solved_prompts": self.solved_prompts,
            "distinct_correct_answers": self.distinct_correct_answers,
            "distinct_correct_completions": self.distinct_correct_completions,
            "distinct_answer_share": self.distinct_answer_share,
            "distinct_completion_share": self.distinct_completion_share,
            "distinct_answers_per_solved_prompt": self.distinct_answers_per_solved,
            "per_prompt": self.per_prompt,
        }


def is_correct(sample: dict[str, Any], threshold: float | None) -> bool:
    if threshold is not None:
        reward = sample["reward"]
        return not math.isnan(reward) and reward >= threshold
    return float(sample["parts"]["answer"]) >= 1.0


def coverage(
    model: str,
    samples: Sequence[dict[str, Any]],
    n: int,
    max_k: int | None = None,
    threshold: float | None = None,
) -> Coverage:
    """Coverage from ``evaluate``'s per-sample rows (``index``, ``completion``, ``reward``, ``parts``),
    ``n`` per prompt. Correct = ``parts["answer"]`` is 1, or reward >= ``threshold`` when given."""
    if threshold is None and samples and "answer" not in samples[0]["parts"]:
        raise ConfigError(
            "this task has no 1/0 answer part, so correctness is undefined: pass --correct-reward X "
            "(a sample is correct when its reward >= X)"
        )
    max_k = max_k or n
    if not 1 <= max_k <= n:
        raise ConfigError(f"--max-k must be between 1 and --samples ({n})")
    by_prompt: dict[int, list[dict[str, Any]]] = {}
    for s in samples:
        by_prompt.setdefault(int(s["index"]), []).append(s)
    pass_sums = dict.fromkeys(range(1, max_k + 1), 0.0)
    correct_total = distinct_answers = distinct_completions = solved = 0
    per_prompt = []
    for index, rows in sorted(by_prompt.items()):
        if len(rows) != n:
            raise ValueError(f"prompt {index} has {len(rows)} samples, expected {n}")
        correct = [r for r in rows if is_correct(r, threshold)]
        c = len(correct)
        for k in pass_sums:
            pass_sums[k] += pass_at_k(n, c, k)
        answers = {answer_of(r["completion"]) for r in correct}
        completions = {normalize(r["completion"]) for r in correct}
        correct_total += c
        distinct_answers += len(answers)
        distinct_completions += len(completions)
        solved += c > 0
        per_prompt.append({"index": index, "correct": c, "distinct_answers": len(answers)})
    prompts = len(by_prompt)
    return Coverage(
        model=model,
        samples=n,
        prompts=prompts,
        pass_at={k: v / prompts if prompts else math.nan for k, v in pass_sums.items()},
        correct_samples=correct_total,
        distinct_correct_answers=distinct_answers,
        distinct_correct_completions=distinct_completions,
        solved_prompts=solved,
        per_prompt=per_prompt,
    )
