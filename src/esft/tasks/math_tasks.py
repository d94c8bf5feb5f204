"""Math reasoning with boxed answers (Qiu et al. 2025; the Qwen-math prompt) and GSM8K.

math: system prompt "Please reason step by step, and put your final answer within \\boxed{}."; reward
1/0 from the last ``\\boxed{...}`` (braces matched; ``\\fbox`` too) compared with the reference by
``math-verify`` (the maintained grader) under a per-answer timeout, so ``\\frac{1}{2}``, ``0.5`` and
``\\dfrac12`` agree.

gsm8k: the reference is the number after ``####``; the model's answer is its last ``\\boxed{}`` or, failing
that, its last number; both are compared as numbers.

Data, in order of precedence:
- a Hugging Face dataset (``dataset=openai/gsm8k dataset_config=main``; needs the ``datasets`` package and
  a reachable hub), its ``train_split`` / ``test_split`` (default train / test);
- a user file (JSON/JSONL/Parquet with ``problem``/``answer`` or ``question``/``answer`` columns; an
  optional ``split`` column, else a fixed 90/10 split);
- the small built-in sample written for this project (tests and smoke runs, not a benchmark).
Rows without an ``answer`` column but with a ``solution`` (the MATH dataset) take the solution's last
``\\boxed{}`` as the answer.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from esft.errors import DataError
from esft.tasks.base import RewardPart, Task, answer_accuracy, completion_text
from esft.tasks.data_files import file_split, read_hub, read_rows
from esft.tasks.extract import last_boxed, last_number, normalize_number

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
DATA = files("esft.tasks") / "data"
GRADE_TIMEOUT_S = 5
MAX_BOXED_CHARS = 500


def _math_verify():
    try:
        import math_verify
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise DataError("the math task needs math-verify: pip install math-verify") from e
    return math_verify


def grade_math(completion: str, reference: str) -> float:
    """1.0 when the last boxed answer of ``completion`` equals ``reference`` (math-verify), else 0.0."""
    boxed = last_boxed(completion)
    if boxed is None or not boxed or len(boxed) > MAX_BOXED_CHARS:
        return 0.0
    ref = last_boxed(reference) or reference
    mv = _math_verify()
    try:
        gold = mv.parse(f"${ref}$", parsing_timeout=GRADE_TIMEOUT_S)
        pred = mv.parse(f"${boxed}$", parsing_timeout=GRADE_TIMEOUT_S)
        if not gold or not pred:
            return 0.0
        return 1.0 if mv.verify(gold, pred, timeout_seconds=GRADE_TIMEOUT_S) else 0.0
    except Exception:
        return 0.0


def gsm8k_reference(answer: str) -> str:
    """The final answer of a GSM8K solution: the text after the last ``####``."""
    return answer.rsplit("####", 1)[-1].strip()


def grade_gsm8k(completion: str, reference: str) -> float:
    """1.0 when the model's boxed answer (else its last number) equals the reference number."""
    want = normalize_number(gsm8k_reference(reference))
    if want is None:
        return 0.0
    got_text = last_boxed(completion)
    got = normalize_number(got_text) if got_text is not None else None
    if got is None:
        last = last_number(completion)
        got = normalize_number(last) if last is not None else None
    return 1.0 if got is not None and abs(got - want) < 1e-6 * max(1.0, abs(want)) else 0.0


def math_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1 if the last \\boxed{} matches the reference under math-verify (TRL signature)."""
    return [grade_math(completion_text(c), str(a)) for c, a in zip(completions, answer, strict=True)]


def gsm8k_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1 if the boxed answer (or last number) equals the number after #### (TRL signature)."""
    return [grade_gsm8k(completion_text(c), str(a)) for c, a in zip(completions, answer, strict=True)]


def _with_answer(row: dict[str, Any]) -> dict[str, Any]:
    """MATH-style rows carry the answer inside ``solution``; take its last boxed expression."""
    if "answer" not in row and isinstance(row.get("solution"), str):
        boxed = last_boxed(row["solution"])
        if boxed is not None:
            return {**row, "answer": boxed}
    return row


def _make(
    name: str,
    sample: str,
    reward,
    data_file: str | None,
    test_file: str | None,
    seed: int,
    hub: dict[str, Any],
) -> Task:
    def check(rows: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
        rows = [_with_answer(r) for r in rows]
        for i, r in enumerate(rows, start=1):
            if "answer" not in r or not ("problem" in r or "question" in r):
                raise DataError(
                    f"{where}: row {i} needs 'problem' (or 'question') and 'answer' (or a boxed 'solution')"
                )
        return rows

    def loader(split: str) -> list[dict[str, Any]]:
        if hub["dataset"]:
            split_name = hub["train_split"] if split == "train" else hub["test_split"]
            rows = check(read_hub(hub["dataset"], split_name, hub["dataset_config"]), hub["dataset"])
        else:
            rows = file_split(
                split, data_file or str(DATA / sample), test_file, seed, lambda p: check(read_rows(p), p)
            )
        return [
            {
                "prompt": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": str(r.get("problem", r.get("question")))},
                ],
                "answer": str(r["answer"]),
            }
            for r in rows
        ]

    if hub["dataset"] and (data_file or test_file):
        raise DataError(f"{name}: pass either dataset=<hub name> or data_file=<path>, not both")
    return Task(
        name=name,
        loader=loader,
        rewards=[RewardPart("answer", reward, 1.0)],
        description=f"{name}: 1/0 reward on the final answer",
        metrics=answer_accuracy,
        max_new_tokens=1024,
        options={"data_file": data_file, "test_file": test_file, "seed": seed, **hub},
    )


def _hub(dataset, dataset_config, train_split, test_split) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "dataset_config": dataset_config,
        "train_split": train_split,
        "test_split": test_split,
    }


def load_math(
    data_file: str | None = None,
    test_file: str | None = None,
    seed: int = 42,
    dataset: str | None = None,
    dataset_config: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
) -> Task:
    """Math with boxed answers graded by math-verify. Options: ``data_file``, ``test_file``, ``seed``,
    or ``dataset`` (a Hugging Face name) with ``dataset_config``, ``train_split``, ``test_split``."""
    hub = _hub(dataset, dataset_config, train_split, test_split)
    return _make("math", "math_sample.jsonl", math_reward, data_file, test_file, seed, hub)


def load_gsm8k(
    data_file: str | None = None,
    test_file: str | None = None,
    seed: int = 42,
    dataset: str | None = None,
    dataset_config: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
) -> Task:
    """GSM8K-style word problems (answers after ####). Options as for ``math``; the hub dataset is
    e.g. ``dataset=openai/gsm8k dataset_config=main``."""
    hub = _hub(dataset, dataset_config, train_split, test_split)
    return _make("gsm8k", "gsm8k_sample.jsonl", gsm8k_reward, data_file, test_file, seed, hub)
