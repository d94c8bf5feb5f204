"""Tasks from reasoning-gym's procedural generators: ``rg:<dataset>`` and 4x4 Mini Sudoku.

``rg:<dataset>`` (e.g. ``rg:leg_counting``) turns any reasoning-gym generator into a task: the model
thinks in <think> tags and answers in <answer> tags; the reward is the generator's own
``score_answer`` on the last <answer> (weight 1) plus 0.1 x the format score used for Countdown.

Several of reasoning-gym's graders evaluate the answer text (``eval``, sympy's ``parse_expr``), so
model text reaching them is model code: every grader call runs in :mod:`esft.sandbox` (bubblewrap),
one forked process per answer, and these tasks refuse to load without it. The sandbox keeps such an
answer from the host but not from the grader's own process, where it could forge its score: so an
answer to a grader that evaluates it is first checked on the host against that dataset's strict
grammar (:mod:`esft.tasks.rg_answers`) and scores 0 outside it. NaN and infinities score 0 on every
dataset, and game_of_life_halting (whose grader gives 1 to any non-empty answer) is scored on the
host by its True/False answer.

``sudoku`` is the paper's 4x4 Mini Sudoku (Qiu et al. 2025, appendix): reasoning-gym's ``mini_sudoku``
puzzles with fixed-seed, disjoint train/test splits (paper: 800/200) and the same reward layout.
"""

from __future__ import annotations

import math
from typing import Any

from esft import sandbox
from esft.errors import ConfigError
from esft.tasks import rg_answers
from esft.tasks.base import RewardPart, Task, answer_accuracy, completion_text
from esft.tasks.countdown import PREFILL, SYSTEM  # the same think/answer prompt style
from esft.tasks.extract import format_score, last_answer_tag

INSTRUCTION = (
    "\n\nShow your work in <think> </think> tags. And return only the final answer in "
    "<answer> </answer> tags."
)


# reasoning-gym's graders are not ours, and several evaluate the answer text (eval, sympy's
# parse_expr): every grader call runs in the sandbox (esft.sandbox), never in this process.
RG = sandbox.Profile("reasoning_gym", packages=("reasoning_gym",), preload=("reasoning_gym",))
LIMITS = sandbox.Limits(timeout_s=10.0, cpu_s=5, memory_mb=1024)
_PREPARE = """
import math
import reasoning_gym
SCORERS = {}

def __esft_rg_score(name, answer, entry):
    if name == "composite":  # graded by the dataset the entry came from
        name = entry["metadata"]["source_dataset"]
    if name not in SCORERS:
        SCORERS[name] = reasoning_gym.get_score_answer_fn(name)
    score = float(SCORERS[name](answer, entry))
    return score if math.isfinite(score) else 0.0
"""


def _warm(dataset: str) -> str:
    """Host-written code that builds ``dataset``'s grader once in the sandbox's PID 1, before jobs fork."""
    return f"SCORERS[{dataset!r}] = reasoning_gym.get_score_answer_fn({dataset!r})\n"


def score_answers(dataset: str, answers: list[str | None], entries: list[dict]) -> list[float]:
    """reasoning-gym's own score for each answer, each graded in its own sandboxed process; 0 for a
    missing answer, one a grader that evaluates answers must not see (:mod:`esft.tasks.rg_answers`:
    checked on the host first), or one whose grading fails, times out or returns a non-number."""
    pool = sandbox.pool(RG)
    pool.prepare(_PREPARE)
    if dataset != "composite":
        pool.prepare(_warm(dataset))
    out: list[float] = [0.0] * len(answers)
    jobs, where = [], []
    for i, (a, e) in enumerate(zip(answers, entries, strict=True)):
        if a is None or not rg_answers.admissible(dataset, a, e):
            continue  # no answer, or one outside the grammar of a grader that evaluates it: 0
        host = rg_answers.host_score(dataset, a, e)
        if host is not None:
            out[i] = host
        else:
            jobs.append((None, "__esft_rg_score", [dataset, a, e]))
            where.append(i)
    for i, result in zip(where, pool.run_many(jobs, LIMITS) if jobs else [], strict=True):
        out[i] = as_score(result)
    return out


def as_score(result: sandbox.SandboxResult) -> float:
    """A grader's result as a score in [0, 1]: anything but a finite int or float is 0 (never raises)."""
    value = result.value
    if not result.ok or isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    try:
        score = float(value)
    except OverflowError:
        return 0.0
    return min(max(score, 0.0), 1.0) if math.isfinite(score) else 0.0


def rg_answer_reward(prompts, completions, rg_dataset, rg_entry, **kwargs) -> list[float]:
    """reasoning-gym's own score of the last <answer>, graded in the sandbox (TRL signature)."""
    answers = [last_answer_tag(completion_text(c)) for c in completions]
    out = [0.0] * len(answers)
    for name in dict.fromkeys(rg_dataset):
        idx = [i for i, n in enumerate(rg_dataset) if n == name]
        for i, v in zip(
            idx, score_answers(name, [answers[i] for i in idx], [rg_entry[i] for i in idx]), strict=True
        ):
            out[i] = v
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
    sandbox.require_sandbox(RG)  # graders may evaluate model text: refuse to start without isolation
    return _task(f"rg:{dataset}", dataset, seed, train_size, test_size, config)


def load_sudoku(seed: int = 42, train_size: int = 800, test_size: int = 200) -> Task:
    """4x4 Mini Sudoku (paper: 800 train / 200 test). Options: ``seed``, ``train_size``, ``test_size``."""
    sandbox.require_sandbox(RG)
    return _task("sudoku", "mini_sudoku", seed, train_size, test_size, None)
