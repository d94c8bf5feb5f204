"""TRL's reward-function protocol in esft: TRL's own shipped rewards run unchanged and give the values
TRL computes directly, with what GRPOTrainer passes (completion_ids, trainer_state, log_extra,
log_metric), None as "not applicable", async functions awaited, and the first error of a part logged."""

from __future__ import annotations

import json
import logging
import math

import pytest
from helpers import import_or_skip

from esft.es.shaping import centered_rank, zscore
from esft.tasks.base import RewardPart, Task, TrainerState

trl_rewards = import_or_skip(
    "trl.rewards", "install esft with the dev (or grpo) extra", "pip install -e '.[grpo]'"
)

ROWS = [
    {"prompt": [{"role": "user", "content": "What is 1/3 + 0?"}], "solution": r"$\frac{1}{3}$"},
    {"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "solution": "$4$"},
    {"prompt": [{"role": "user", "content": "Say hi"}], "solution": "$4$"},
    {"prompt": [{"role": "user", "content": "Anything"}], "solution": "no math here"},
]
TEXTS = [
    r"<think>easy</think>The answer is \boxed{\frac{1}{3}}",
    r"I think it is \boxed{5}",
    "<think>\nhmm\n</think>\nhi hi hi hi hi hi",
    r"\boxed{4}",
]
IDS = [[5, 6, 7], [1] * 30, [2, 3, 2, 3, 2, 3, 2, 3], list(range(45))]


def task_with(*fns) -> Task:
    return Task(
        name="trl-test",
        loader=lambda split: ROWS,
        rewards=[RewardPart(getattr(f, "__name__", type(f).__name__), f, 1.0) for f in fns],
    )


def direct(fn, **extra):
    completions = [[{"role": "assistant", "content": t}] for t in TEXTS]
    prompts = [r["prompt"] for r in ROWS]
    return fn(
        prompts=prompts,
        completions=completions,
        completion_ids=IDS,
        solution=[r["solution"] for r in ROWS],
        **extra,
    )


def same(a: list, b: list) -> bool:
    return all(
        (x is None and math.isnan(y)) or (x is not None and y == pytest.approx(x))
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: trl_rewards.accuracy_reward,
        lambda: trl_rewards.think_format_reward,
        lambda: trl_rewards.get_soft_overlong_punishment(max_completion_len=40, soft_punish_cache=20),
        lambda: trl_rewards.get_repetition_penalty_reward(ngram_size=2, max_penalty=-1.0),
        lambda: trl_rewards.get_cosine_scaled_reward(max_len=50),
    ],
    ids=["accuracy", "think_format", "soft_overlong", "repetition_penalty", "cosine_scaled"],
)
def test_trl_shipped_rewards_give_trls_values(make):
    fn = make()
    task = task_with(fn)
    scores = task.score(ROWS, TEXTS, IDS, TrainerState(global_step=3))
    assert scores.failures == 0
    want = direct(fn)
    got = scores.parts[task.rewards[0].name]
    assert same(want, got), (want, got)
    assert len(set(map(str, want))) > 1  # the table exercises more than one outcome


def test_accuracy_reward_none_and_log_extra():
    task = task_with(trl_rewards.accuracy_reward)
    scores = task.score(ROWS, TEXTS, IDS)
    # gold "no math here" cannot be parsed: TRL returns None, i.e. not applicable
    assert math.isnan(scores.parts["accuracy_reward"][3]) and math.isnan(scores.total[3])
    summary = task.summary(scores)
    assert summary["reward"] == pytest.approx(1 / 3)  # over the 3 applicable samples
    assert scores.extra["gold_parsed"] and len(scores.extra["answer_parsed"]) == 4


def test_trainer_state_log_metric_and_async():
    seen = {}

    def stepper(completions, trainer_state, log_metric, **kw):
        seen["step"] = trainer_state.global_step
        log_metric("mean_len", sum(len(c[0]["content"]) for c in completions) / len(completions))
        return [float(trainer_state.global_step)] * len(completions)

    async def judge(completions, **kw):
        return [1.0 if "hi hi" in c[0]["content"] else None for c in completions]

    task = task_with(stepper, judge)
    scores = task.score(ROWS, TEXTS, IDS, TrainerState(global_step=7, max_steps=10))
    assert seen["step"] == 7 and scores.parts["stepper"] == [7.0] * 4
    assert math.isnan(scores.parts["judge"][0]) and scores.parts["judge"][2] == 1.0
    assert scores.total[2] == 8.0 and scores.total[0] == 7.0  # NaN parts add nothing
    assert task.summary(scores)["logged/mean_len"] == pytest.approx(sum(map(len, TEXTS)) / 4)


def test_first_error_of_a_part_is_logged_once(caplog):
    def broken(completions, **kw):
        raise KeyError("needs a column named 'answer_key'")

    task = task_with(broken)
    with caplog.at_level(logging.WARNING, logger="esft.rewards"):
        first = task.score(ROWS, TEXTS, IDS)
        task.score(ROWS, TEXTS, IDS)
    assert first.failures == 4 and first.parts["broken"] == [0.0] * 4
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "broken" in messages[0] and "answer_key" in messages[0]


def test_shaping_leaves_unscored_members_out():
    assert zscore([1.0, math.nan, 3.0]) == [-1.0, 0.0, 1.0]
    assert zscore([math.nan, 2.0]) == [0.0, 0.0]
    r = centered_rank([3.0, math.nan, 1.0, 2.0])
    assert r[1] == 0.0 and r[0] > r[3] > r[2]


def test_trainer_routes_trainer_state_and_log_metric(tiny_model, tmp_path):
    from esft.cli import main

    reward = tmp_path / "stepper.py"
    reward.write_text(
        "def stepper(completions, completion_ids, trainer_state, log_metric, **kw):\n"
        "    log_metric('step', trainer_state.global_step)\n"
        "    return [float(len(ids)) for ids in completion_ids]\n"
    )
    out = tmp_path / "run"
    rc = main(["train", "--model", str(tiny_model), "--output", str(out), "--task", "conciseness",
               "--reward", f"{reward}:stepper", "--population", "2", "--iterations", "2",
               "--max-new-tokens", "5", "--quiet"])  # fmt: skip
    assert rc == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/logged/step"] for r in rows] == [1.0, 2.0]
    assert all(r["train/reward_failures"] == 0 for r in rows)
    # the reward is the number of completion token ids, so it tracks the completion length
    assert rows[0]["train/reward_mean"] == pytest.approx(rows[0]["train/completion_tokens"])


def test_several_rewards_with_weights_through_the_cli(tiny_model, tmp_path, capsys):
    from esft.cli import main

    rewards = tmp_path / "r.py"
    rewards.write_text(
        "def one(completions, **kw):\n    return [1.0] * len(completions)\n"
        "def length(completion_ids, **kw):\n    return [float(len(i)) for i in completion_ids]\n"
    )
    out = tmp_path / "run"
    common = ["--model", str(tiny_model), "--task", "conciseness", "--population", "2",
              "--max-new-tokens", "5", "--quiet"]  # fmt: skip
    rc = main(["train", *common, "--output", str(out), "--iterations", "1",
               "--reward", f"{rewards}:one", "--reward", f"{rewards}:length", "--reward-weights", "2", "0.5"])  # fmt: skip
    assert rc == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["train/reward/one"] == 1.0
    assert row["train/reward_mean"] == pytest.approx(2.0 + 0.5 * row["train/reward/length"])
    # eval of the run keeps its rewards and weights
    assert main(["eval", "--run", str(out), "--split", "train", "--quiet"]) == 0
    # a weight count that does not match is a one-line error
    capsys.readouterr()
    rc = main(["train", *common, "--output", str(tmp_path / "bad"), "--reward", f"{rewards}:one",
               "--reward-weights", "1", "2"])  # fmt: skip
    assert rc == 2 and "reward_weights has 2 values for 1" in capsys.readouterr().err
    rc = main(["train", *common, "--output", str(tmp_path / "bad2"), "--reward-weights", "1", "2", "3"])
    assert rc == 2 and "the task has 1 reward parts (length)" in capsys.readouterr().err


def test_task_parts_can_be_reweighted():
    from esft.tasks import load_task

    task = load_task("countdown", reward_weights=[1.0, 0.5], train_size=2, test_size=2)
    assert [(p.name, p.weight) for p in task.rewards] == [("answer", 1.0), ("format", 0.5)]
