import math

import pytest

from esft.errors import ConfigError, DataError
from esft.tasks import load_task
from esft.tasks.base import RewardPart


def test_conciseness_reward_and_normalised_metric():
    task = load_task("conciseness")
    assert len(task.train) == 2 and len(task.test) == 8
    row = task.train[0]
    assert isinstance(row["prompt"], str) and row["answer"] == "8"
    scores = task.score([row, row], ["8", "The answer is 8"])
    assert scores.total == [0.0, -14.0]
    summary = task.summary(scores)
    assert summary["normalized_reward"] == pytest.approx(((2000) / 2000 + (1986) / 2000) / 2)


def test_conciseness_chat_format():
    task = load_task("conciseness", prompt_format="chat")
    assert task.train[0]["prompt"] == [{"role": "user", "content": "Solve: 3 + 5 ="}]
    with pytest.raises(ConfigError):
        load_task("conciseness", prompt_format="xml")


def test_unknown_task_and_option_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown task"):
        load_task("nope")
    with pytest.raises(ConfigError, match="no option"):
        load_task("conciseness", bogus=1)


def test_failing_reward_scores_zero_and_is_counted():
    task = load_task("conciseness")

    def flaky(prompts, completions, **kw):
        out = []
        for c in completions:
            if c == "boom":
                raise RuntimeError("bad")
            out.append(float("nan") if c == "nan" else 1.0)
        return out

    task.rewards = [RewardPart("flaky", flaky, 1.0)]
    row = task.train[0]
    scores = task.score([row] * 4, ["ok", "boom", "nan", "fine"])
    assert scores.total == [1.0, 0.0, 0.0, 1.0]
    assert scores.failures == 2
    assert all(math.isfinite(v) for v in scores.total)


def test_user_reward_from_file(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text("def short(prompts, completions, **kw):\n    return [-len(c) for c in completions]\n")
    task = load_task("conciseness", reward=f"{f}:short")
    assert [p.name for p in task.rewards] == ["short"]
    assert task.score([task.train[0]], ["abc"]).total == [-3.0]
    with pytest.raises(ConfigError):
        load_task("conciseness", reward=f"{f}:missing")
    with pytest.raises(ConfigError):
        load_task("conciseness", reward="no_such_module_xyz:f")


def test_malformed_data_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\nnot json\n')
    with pytest.raises(DataError, match=":2:"):
        load_task("conciseness", data_file=str(bad)).split("train")
    missing = tmp_path / "m.jsonl"
    missing.write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match="lacks answer"):
        load_task("conciseness", data_file=str(missing)).split("train")
    with pytest.raises(DataError, match="does not exist"):
        load_task("conciseness", data_file=str(tmp_path / "nope.jsonl")).split("train")
