from pathlib import Path

import pytest

from esft.cli import main
from esft.errors import ConfigError
from esft.tasks import load_task

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_task_from_a_python_file():
    task = load_task(f"{EXAMPLES}/custom_task.py:make_task", words=8)
    assert task.name == "reverse-word" and len(task.train) == 6 and len(task.test) == 2
    row = task.train[0]
    scores = task.score([row, row], [row["word"][::-1], "no idea"])
    assert scores.total == [pytest.approx(1.1), 0.0]
    assert scores.parts == {"correct": [1.0, 0.0], "brief": [1.0, 0.0]}


def test_custom_data_plus_reward():
    task = load_task(
        "custom",
        data_file=str(EXAMPLES / "questions.jsonl"),
        reward=f"{EXAMPLES}/number_reward.py:answers_with_number",
    )
    assert len(task.train) == 3 and len(task.test) == 1
    assert task.score(task.train[:1], [" 13 is prime"]).total == [1.0]
    assert task.score(task.train[:1], ["7"]).total == [0.5]


def test_custom_task_errors():
    with pytest.raises(ConfigError, match="needs a data file"):
        load_task("custom", reward=f"{EXAMPLES}/number_reward.py:answers_with_number")
    with pytest.raises(ConfigError, match="needs a reward"):
        load_task("custom", data_file=str(EXAMPLES / "questions.jsonl"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_task("nowhere/task.py:make")
    with pytest.raises(ConfigError, match="task factory"):
        load_task(f"{EXAMPLES}/number_reward.py:answers_with_number")
    with pytest.raises(ConfigError, match="neither an esft Task"):
        load_task(f"{EXAMPLES}/number_reward.py:re")


def test_cli_trains_a_custom_task_file(tiny_model, tmp_path):
    rc = main(["train", "--model", str(tiny_model), "--task", f"{EXAMPLES}/custom_task.py:make_task",
               "--task-option", "words=6", "--population", "2", "--iterations", "1", "--max-new-tokens", "4",
               "--output", str(tmp_path / "run"), "--quiet"])  # fmt: skip
    assert rc == 0
    assert "train/reward/correct" in (tmp_path / "run" / "metrics.jsonl").read_text()
