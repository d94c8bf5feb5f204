import pytest

from esft.errors import ConfigError
from esft.tasks import load_task

pytestmark = pytest.mark.usefixtures("needs_bwrap")  # graders/programs run in the sandbox


def _wrap(answer: str) -> str:
    return f" reasoning </think>\n<answer>{answer}</answer>"


def test_sudoku_splits_and_rewards():
    task = load_task("sudoku", train_size=20, test_size=10)
    assert len(task.train) == 20 and len(task.test) == 10
    assert {r["rg_entry"]["question"] for r in task.train}.isdisjoint(
        {r["rg_entry"]["question"] for r in task.test}
    )
    row = task.test[0]
    solution = row["answer"]
    grid = [line.split() for line in solution.splitlines()]
    wrong = "\n".join(" ".join(r) for r in [grid[1], grid[0], *grid[2:]])
    cases = [
        (_wrap(solution), 1.0, 1.0),  # correct, exact format
        (" x </think> <answer>" + solution + "</answer>", 1.0, 0.6),  # correct, loose format
        (_wrap(wrong), "partial", 1.0),  # rows swapped: reasoning-gym gives partial credit, never 1
        (_wrap(solution.replace("\n", " | ")), None, 1.0),  # odd layout: whatever reasoning-gym says
        ("no tags, " + solution, 0.0, 0.0),
        ("", 0.0, 0.0),
        (_wrap(""), 0.0, 1.0),
        ("x" * 100_000, 0.0, 0.0),
    ]
    for completion, answer, fmt in cases:
        scores = task.score([row], [completion])
        if answer == "partial":
            assert 0.0 <= scores.parts["answer"][0] < 1.0
        elif answer is not None:
            assert scores.parts["answer"] == [answer], completion[:60]
        assert scores.parts["format"] == [pytest.approx(fmt)]
        assert scores.failures == 0


def test_rg_generic_task_uses_the_generators_scorer():
    task = load_task("rg:leg_counting", train_size=5, test_size=3, seed=1)
    assert task.name == "rg:leg_counting"
    row = task.train[0]
    right = task.score([row], [_wrap(str(row["answer"]))])
    wrong = task.score([row], [_wrap(str(int(row["answer"]) + 1))])
    assert right.parts["answer"] == [1.0] and wrong.parts["answer"] == [0.0]
    assert task.summary(right)["accuracy"] == 1.0


def test_rg_errors_are_one_line():
    with pytest.raises(ConfigError, match="no dataset"):
        load_task("rg:no_such_generator")
    with pytest.raises(ConfigError, match="unknown task"):
        load_task("rg:")
