import time

import pytest

from esft.tasks import load_task
from esft.tasks.countdown import answer_score, countdown_answer_reward, format_score, parse_expression

NUMS, TARGET = [3, 5, 7], 26  # 3 * 7 + 5

GOOD = " 3*7+5 is 26 </think>\n<answer>3 * 7 + 5</answer>"

CASES = [
    # (completion, answer part, format part)
    (GOOD, 1.0, 1.0),
    (" x </think>\n<answer>(7 * 3) + 5</answer>", 1.0, 1.0),  # equivalent form
    (" x </think>\n<answer> 5 + 3*7 </answer>", 1.0, 1.0),  # whitespace inside the tag
    (" x </think> <answer>5+7*3</answer>", 1.0, 0.6),  # right answer, loose format
    (" x </think>\n<answer>3 * 7 - 5</answer>", 0.0, 1.0),  # wrong value
    (" x </think>\n<answer>3 * 7 + 5 + 3 - 3</answer>", 0.0, 1.0),  # reuses numbers
    (" x </think>\n<answer>7 * 3 + 6 - 1</answer>", 0.0, 1.0),  # numbers not given
    (" x </think>\n<answer>3 * 7</answer>", 0.0, 1.0),  # misses a number
    (" <answer>1+1</answer> then </think>\n<answer>3*7+5</answer>", 1.0, 1.0),  # last answer counts
    # The paper's format regex is non-greedy but anchored, so trailing tags still match the full format.
    (" </think>\n<answer>3*7+5</answer> then <answer>1</answer>", 0.0, 1.0),
    ("no tags at all, 26", 0.0, 0.0),
    ("", 0.0, 0.0),
    (" x </think>\n<answer></answer>", 0.0, 1.0),
    (" x </think>\n<answer>3 * 7 + 5", 0.0, 0.1),  # unterminated
    (" x </think>\n<answer>26</answer>", 0.0, 1.0),  # just the target
    (" x </think>\n<answer>3 / (7 - 7) + 5</answer>", 0.0, 1.0),  # division by zero, reuse
    (" x </think>\n<answer>3.0 * 7 + 5</answer>", 0.0, 1.0),  # float literal: not a given number
]

HOSTILE = [
    "<answer>__import__('os').system('echo pwned')</answer>",
    "<answer>9**9**9</answer>",
    "<answer>3**7**5</answer>",
    "<answer>" + "(" * 10_000 + "3*7+5" + ")" * 10_000 + "</answer>",
    "<answer>open('/etc/passwd').read()</answer>",
    "<answer>[x for x in range(10**9)]</answer>",
    "<answer>lambda: 3*7+5</answer>",
    "<answer>" + "-" * 100_000 + "3</answer>",
    "<answer>" + "+".join(["1"] * 50_000) + "</answer>",
    "<answer>(3 * 7 + 5) if True else 0</answer>",
    "<answer>3 * 7 + 5; import os</answer>",
]


@pytest.mark.parametrize("completion,answer,fmt", CASES)
def test_countdown_table(completion, answer, fmt):
    assert answer_score(completion, NUMS, TARGET) == answer
    assert format_score(completion) == pytest.approx(fmt)


def test_fractional_intermediate_values_are_exact():
    assert answer_score("<answer>(8 / 3) * 3 + 1</answer>", [8, 3, 3, 1], 9) == 1.0
    assert answer_score("<answer>10 - -3</answer>", [10, 3], 13) == 1.0


@pytest.mark.parametrize("completion", HOSTILE)
def test_hostile_answers_score_zero_fast(completion):
    t = time.perf_counter()
    assert answer_score(completion, [3, 5, 7], 26) == 0.0
    assert time.perf_counter() - t < 0.5


def test_parser_rejects_everything_but_arithmetic():
    for bad in ["a + 1", "2 ** 3", "1 % 2", "1 // 2", "(1, 2)", "abs(-1)", "1 < 2", "True"]:
        with pytest.raises(ValueError):
            parse_expression(bad)


def test_task_total_is_answer_plus_tenth_of_format():
    task = load_task("countdown", train_size=3, test_size=3)
    rows = [{"prompt": "p", "nums": NUMS, "target": TARGET}]
    scores = task.score(rows, [GOOD])
    assert scores.total == [pytest.approx(1.1)]
    assert scores.parts == {"answer": [1.0], "format": [1.0]}
    assert task.summary(scores)["accuracy"] == 1.0


def test_reward_accepts_trl_conversational_completions():
    out = countdown_answer_reward(
        prompts=[[{"role": "user", "content": "q"}]],
        completions=[[{"role": "assistant", "content": GOOD}]],
        nums=[NUMS],
        target=[TARGET],
    )
    assert out == [1.0]


def test_generated_splits_are_disjoint_and_deterministic():
    a = load_task("countdown", seed=5, train_size=20, test_size=30)
    b = load_task("countdown", seed=5, train_size=20, test_size=30)
    assert len(a.train) == 20 and len(a.test) == 30
    key = lambda r: (tuple(sorted(r["nums"])), r["target"])  # noqa: E731
    assert {key(r) for r in a.train}.isdisjoint({key(r) for r in a.test})
    assert [key(r) for r in a.train] == [key(r) for r in b.train]
    row = a.train[0]
    assert 3 <= len(row["nums"]) <= 4 and 1 <= row["target"] <= 100
    assert row["prompt"][-1]["role"] == "assistant" and row["prompt"][-1]["content"].endswith("<think>")


def test_user_data_file(tmp_path):
    f = tmp_path / "cd.jsonl"
    f.write_text(
        '{"nums": [1, 2, 3], "target": 6, "split": "train"}\n{"numbers": [4, 5], "target": 9, "split": "test"}\n'
    )
    task = load_task("countdown", data_file=str(f))
    assert [r["target"] for r in task.train] == [6]
    assert [r["nums"] for r in task.test] == [[4, 5]]
