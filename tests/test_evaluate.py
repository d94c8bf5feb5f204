"""evaluate(): greedy pass@1 and sampled mean@K / pass@K, checked with a scripted engine."""

from __future__ import annotations

import json

import pytest

from esft.cli import main
from esft.engines import Generation, Sampling
from esft.evaluate import evaluate
from esft.tasks import load_task


class ScriptedEngine:
    """Returns canned completions: for prompt j and sample i, answers[j][i]."""

    def __init__(self, answers):
        self.answers = answers
        self.calls = 0

    def parameters(self):
        return {}

    def generate(self, prompts, max_new_tokens, sampling=None):
        k = sampling.samples if sampling else 1
        out = []
        for _ in prompts:
            j = self.calls
            self.calls += 1
            out += [Generation(self.answers[j][i], 3, False) for i in range(k)]
        return out

    def save(self, path):
        raise NotImplementedError


def test_mean_and_pass_at_k():
    task = load_task("gsm8k")
    rows = task.test[:3]
    want = [r["answer"].rsplit("####", 1)[-1].strip() for r in rows]
    answers = [
        [f"\\boxed{{{want[0]}}}", "\\boxed{0}", f"\\boxed{{{want[0]}}}", "\\boxed{0}"],  # 2 of 4
        ["\\boxed{0}"] * 4,  # 0 of 4
        [f"\\boxed{{{want[2]}}}"] * 4,  # 4 of 4
    ]
    summary, samples = evaluate(
        ScriptedEngine(answers), task, "test", limit=3, sampling=Sampling(4, 0.7), batch_size=4
    )
    assert summary["mean@4"] == pytest.approx(6 / 12)
    assert summary["pass@4"] == pytest.approx(2 / 3)
    assert summary["samples"] == 12 and len(samples) == 12
    assert [s["index"] for s in samples] == [0] * 4 + [1] * 4 + [2] * 4
    assert [s["sample"] for s in samples[:4]] == [0, 1, 2, 3]


def test_greedy_accuracy_is_pass_at_1():
    task = load_task("gsm8k")
    rows = task.test[:2]
    want = rows[0]["answer"].rsplit("####", 1)[-1].strip()
    summary, _ = evaluate(ScriptedEngine([[f"\\boxed{{{want}}}"], ["nope"]]), task, "test", limit=2)
    assert summary["accuracy"] == 0.5 and "pass@1" not in summary


def test_sampled_eval_cli_is_reproducible(tiny_model, tmp_path):
    args = ["eval", "--model", str(tiny_model), "--task", "math", "--limit", "2", "--samples", "3",
            "--temperature", "1.0", "--max-new-tokens", "5", "--seed", "7", "--quiet"]  # fmt: skip
    assert main([*args, "--output", str(tmp_path / "a.jsonl")]) == 0
    assert main([*args, "--output", str(tmp_path / "b.jsonl")]) == 0
    a = [json.loads(x)["completion"] for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    b = [json.loads(x)["completion"] for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert len(a) == 6 and a == b
    assert len(set(a)) > 1  # actually sampled


def test_samples_without_temperature_is_a_one_line_error(tiny_model, capsys):
    rc = main(["eval", "--model", str(tiny_model), "--task", "math", "--samples", "4", "--quiet"])
    assert rc == 2 and "--temperature" in capsys.readouterr().err
