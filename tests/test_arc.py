import pytest

from esft.tasks import load_task
from esft.tasks.arc import extract_code

pytestmark = pytest.mark.usefixtures("needs_bwrap")  # graders/programs run in the sandbox


@pytest.fixture(scope="module")
def task():
    return load_task("arc", limit=3, train_pairs=True)


def _solution_for(row) -> str:
    # A "solution" that looks the answer up: correct on the test input by construction.
    return (
        "Here you go:\n```python\n"
        f"def transform(grid):\n    if grid == {row['test_input']!r}:\n        return {row['test_output']!r}\n"
        "    return grid\n```\n"
    )


def test_arc_splits_and_prompt(task):
    assert len(task.train) >= 3 and len(task.test) >= 3
    row = task.train[0]
    text = row["prompt"][-1]["content"]
    assert "Example 1" in text and "Test input" in text and "transform(grid)" in text


def test_arc_rewards_table(task):
    row = task.train[0]
    identity = "```python\ndef transform(grid):\n    return grid\n```"
    cases = [
        (_solution_for(row), 1.0),
        (identity, 1.0 if row["test_input"] == row["test_output"] else 0.0),
        ("```python\ndef transform(grid):\n    return [[0]]\n```", 0.0),  # wrong grid
        ("```python\ndef transform(grid):\n    return 'grid'\n```", 0.0),  # not a grid
        ("```python\ndef transform(grid):\n    raise ValueError\n```", 0.0),
        ("```python\ndef transform(grid):\n    while True: pass\n```", 0.0),  # timeout
        ("```python\nimport os\ndef transform(grid):\n    return open('/etc/passwd').read()\n```", 0.0),
        ("I cannot solve this.", 0.0),  # no code
        ("", 0.0),
        (
            "```python\ndef transform(grid):\n" + "    x = 1\n" * 5000 + "    return grid\n```",
            0.0,
        ),  # too long
    ]
    for completion, expected in cases:
        scores = task.score([row], [completion])
        assert scores.parts["answer"] == [expected], completion[:80]
        assert scores.failures == 0


def test_arc_train_pairs_part(task):
    row = task.train[0]
    scores = task.score([row], [_solution_for(row)])
    assert 0.0 <= scores.parts["train"][0] <= 1.0
    assert scores.total[0] == pytest.approx(1.0 + 0.5 * scores.parts["train"][0])


def test_extract_code_prefers_last_block_with_transform():
    text = "```python\nprint(1)\n```\n```python\ndef transform(g):\n    return g\n```"
    assert extract_code(text).startswith("def transform")
    assert extract_code("def transform(g): return g") == "def transform(g): return g"
    assert extract_code("no code") is None
