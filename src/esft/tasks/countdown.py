"""Countdown: combine the given numbers with + - * / to hit a target (TinyZero; Qiu et al. 2025, App.).

Prompt: the TinyZero instruct prompt, with the assistant turn pre-filled up to ``<think>``.
Reward (paper): answer + 0.1 x format, where
- answer = 1 if the expression in the *last* ``<answer>...</answer>`` uses each given number exactly
  once and equals the target, else 0;
- format = 1 for exactly ``<think>...</think>\\n<answer>...</answer>``, else 0.1 for a think block plus
  0.5 for an answer block.
Expressions are model output, i.e. hostile input: they are parsed with ``ast`` and evaluated over exact
fractions by walking the tree; only integer literals, + - * /, unary minus and parentheses are accepted,
and over-long text is rejected before parsing. Nothing is ever ``eval``-ed.

Data: problems from reasoning-gym's countdown generator (3-4 numbers in 1..100, target 1..100, as in
TinyZero) with a fixed seed and disjoint splits (paper: 200 train, 2000 test), or a user file.
"""

from __future__ import annotations

import ast
import json
import random
import re
from fractions import Fraction
from typing import Any

from esft.errors import DataError
from esft.tasks.base import RewardPart, Scores, Task, answer_accuracy, completion_text
from esft.tasks.data_files import file_split, read_rows
from esft.tasks.extract import format_score, last_answer_tag

SYSTEM = (
    "You are a helpful assistant. You first think about the reasoning process in the mind "
    "and then provide the user with the answer."
)
USER = (
    "Using the numbers {nums}, create an equation that equals {target}. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> "
    "tags. And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
)
PREFILL = "Let me solve this step by step.\n<think>"

MAX_EXPRESSION_CHARS = 200  # far above any honest answer for <= 6 numbers
_ALLOWED_CHARS_RE = re.compile(r"^[0-9+\-*/() \t\n.]+$")


def build_prompt(nums: list[int], target: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": USER.format(nums=list(nums), target=target)},
        {"role": "assistant", "content": PREFILL},
    ]


# -- safe arithmetic ---------------------------------------------------------------------------------


class UnsafeExpression(ValueError):
    pass


def parse_expression(text: str) -> tuple[ast.expr, list[int]]:
    """Parse ``text`` as arithmetic; return the tree and the integer literals it uses.

    Raises UnsafeExpression for anything but integer literals, + - * /, unary minus and parentheses.
    """
    text = text.strip()
    if not text or len(text) > MAX_EXPRESSION_CHARS or not _ALLOWED_CHARS_RE.match(text):
        raise UnsafeExpression("not a short arithmetic expression")
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise UnsafeExpression(f"unparsable: {type(e).__name__}") from None
    numbers: list[int] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            stack += [node.left, node.right]
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            stack.append(node.operand)
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            numbers.append(node.value)
        else:
            raise UnsafeExpression(f"disallowed element {type(node).__name__}")
    return tree, numbers


def evaluate(tree: ast.expr) -> Fraction:
    """Exact value of a tree accepted by parse_expression (raises ZeroDivisionError)."""
    if isinstance(tree, ast.Constant):
        return Fraction(tree.value)
    if isinstance(tree, ast.UnaryOp):
        v = evaluate(tree.operand)
        return -v if isinstance(tree.op, ast.USub) else v
    assert isinstance(tree, ast.BinOp)
    a, b = evaluate(tree.left), evaluate(tree.right)
    if isinstance(tree.op, ast.Add):
        return a + b
    if isinstance(tree.op, ast.Sub):
        return a - b
    if isinstance(tree.op, ast.Mult):
        return a * b
    return a / b


def answer_score(text: str, nums: list[int], target: int | float) -> float:
    """1.0 if the last <answer> uses each number of ``nums`` exactly once and equals ``target``."""
    answer = last_answer_tag(text)
    if answer is None:
        return 0.0
    try:
        tree, used = parse_expression(answer)
        if sorted(used) != sorted(int(n) for n in nums):
            return 0.0
        value = evaluate(tree)
    except (UnsafeExpression, ZeroDivisionError, RecursionError):
        return 0.0
    return 1.0 if abs(float(value) - float(target)) < 1e-5 else 0.0


# -- TRL-signature reward functions --------------------------------------------------------------------


def countdown_answer_reward(prompts, completions, nums, target, **kwargs) -> list[float]:
    """1 if the last <answer> expression is correct, else 0 (TRL signature)."""
    return [answer_score(completion_text(c), n, t) for c, n, t in zip(completions, nums, target, strict=True)]


def countdown_format_reward(prompts, completions, **kwargs) -> list[float]:
    """1 for <think>...</think>\\n<answer>...</answer>, partial credit otherwise (TRL signature)."""
    return [format_score(completion_text(c)) for c in completions]


# -- data ----------------------------------------------------------------------------------------------


def _row(nums: list[int], target: int) -> dict[str, Any]:
    return {"prompt": build_prompt(nums, target), "nums": list(nums), "target": target}


def _key(nums, target) -> tuple:
    return (tuple(sorted(int(n) for n in nums)), int(target))


def _generate(count: int, seed: int, exclude: set) -> list[tuple[list[int], int]]:
    """``count`` distinct problems from reasoning-gym, none of whose keys is in ``exclude``."""
    import reasoning_gym

    out, seen = [], set(exclude)
    attempt = 0
    while len(out) < count:
        ds = reasoning_gym.create_dataset(
            "countdown",
            size=max(8, int((count - len(out)) * 1.1)),
            seed=seed + 7919 * attempt,
            min_numbers=3,
            max_numbers=4,
            min_value=1,
            max_value=100,
            min_target=1,
            max_target=100,
        )
        for item in ds:
            nums, target = item["metadata"]["numbers"], item["metadata"]["target"]
            k = _key(nums, target)
            if k not in seen:
                seen.add(k)
                out.append((list(nums), int(target)))
                if len(out) == count:
                    break
        attempt += 1
    return out


def _generated_splits(seed: int, train_size: int, test_size: int) -> dict[str, list]:
    """Disjoint generated splits, cached on disk (building 2000 problems takes ~20 s)."""
    from esft.models import cache_dir

    path = cache_dir() / "data" / f"countdown-s{seed}-tr{train_size}-te{test_size}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            pass
    train = _generate(train_size, seed, set())
    test = _generate(test_size, seed + 1, {_key(n, t) for n, t in train})
    splits = {"train": train, "test": test}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{random.getrandbits(32)}")
    tmp.write_text(json.dumps(splits))
    tmp.replace(path)
    return splits


def _read_problems(path: str) -> list[dict[str, Any]]:
    rows = read_rows(path, required=("target",))
    for r in rows:
        nums = r.get("nums", r.get("numbers"))
        if not isinstance(nums, list) or not all(isinstance(n, int) for n in nums):
            raise DataError(f"{path}: every row needs 'nums' (or 'numbers'): a list of integers")
        r["nums"] = nums
    return rows


def _file_splits(data_file: str, test_file: str | None, seed: int) -> dict[str, list]:
    return {
        split: [
            (r["nums"], r["target"]) for r in file_split(split, data_file, test_file, seed, _read_problems)
        ]
        for split in ("train", "test")
    }


def _parsable(text: str) -> bool:
    answer = last_answer_tag(text)
    if answer is None:
        return False
    try:
        parse_expression(answer)
    except UnsafeExpression:
        return False
    return True


def accuracy(scores: Scores) -> dict[str, float]:
    """Accuracy (answer part == 1) and the share of completions without a parsable final answer."""
    out = answer_accuracy(scores)
    if scores.completions:
        out["unparsable_fraction"] = sum(not _parsable(c) for c in scores.completions) / len(
            scores.completions
        )
    return out


def load(
    data_file: str | None = None,
    test_file: str | None = None,
    seed: int = 42,
    train_size: int = 200,
    test_size: int = 2000,
) -> Task:
    """The Countdown task. Options: ``data_file``/``test_file`` (JSON/JSONL rows with ``nums`` and
    ``target``; optional ``split`` column), or generated problems: ``seed``, ``train_size``, ``test_size``."""
    cache: dict[str, dict] = {}

    def loader(split: str) -> list[dict[str, Any]]:
        if "splits" not in cache:
            if data_file:
                cache["splits"] = _file_splits(data_file, test_file, int(seed))
            else:
                cache["splits"] = _generated_splits(int(seed), int(train_size), int(test_size))
        return [_row(n, t) for n, t in cache["splits"][split]]

    return Task(
        name="countdown",
        loader=loader,
        rewards=[
            RewardPart("answer", countdown_answer_reward, 1.0),
            RewardPart("format", countdown_format_reward, 0.1),
        ],
        description="Countdown arithmetic (TinyZero prompt); reward = answer + 0.1 x format",
        metrics=accuracy,
        max_new_tokens=1024,
        options={
            "data_file": data_file,
            "test_file": test_file,
            "seed": seed,
            "train_size": train_size,
            "test_size": test_size,
        },
    )
