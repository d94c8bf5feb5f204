"""The GRPO baseline (TRL's GRPOTrainer): trains a tiny model, writes the ES run-folder layout, honours
the sample budget, and esft's own task rewards run unchanged inside TRL."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import import_or_skip
from safetensors.torch import load_file

from esft.cli import main

import_or_skip("trl", "install esft with the dev (or grpo) extra", "pip install -e '.[grpo]'")

COMMON = ["--task", "conciseness", "--group-size", "4", "--max-new-tokens", "8", "--learning-rate", "1e-3",
          "--seed", "1", "--quiet"]  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def grpo(model: Path, out: Path, *extra: str) -> int:
    return main(["grpo", "--model", str(model), "--output", str(out), *COMMON, *extra])


@pytest.fixture(scope="module")
def grpo_run(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grpo") / "run"
    assert grpo(tiny_model, out, "--iterations", "3", "--eval-every", "3", "--checkpoint-every", "2") == 0
    return out


def test_grpo_changes_the_weights_and_writes_the_es_layout(tiny_model, grpo_run):
    base = load_file(str(tiny_model / "model.safetensors"))
    final = load_file(str(grpo_run / "checkpoints" / "iter-000003" / "model.safetensors"))
    assert set(base) == set(final)
    changed = [n for n in base if not torch.equal(base[n], final[n])]
    assert len(changed) > len(base) // 2, f"only {changed} changed"

    config = yaml.safe_load((grpo_run / "config.yaml").read_text())
    assert config["trainer"] == "grpo" and config["task"] == "conciseness" and config["group_size"] == 4
    assert (grpo_run / "environment.json").is_file()
    assert list((grpo_run / "events").iterdir()), "no TensorBoard events"
    assert sorted(p.name for p in (grpo_run / "checkpoints").iterdir()) == ["iter-000002", "iter-000003"]

    metrics = read_jsonl(grpo_run / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [1, 2, 3]
    # 2 conciseness train prompts x group size 4 per step
    assert [m["samples"] for m in metrics] == [8, 16, 24]
    assert metrics[-1]["tokens"] == sum(8 * m["train/completion_tokens"] for m in metrics)
    for key in ["train/reward_mean", "train/reward/length", "train/completion_tokens",
                "train/truncated_fraction", "train/reward_failures", "grpo/loss", "grpo/grad_norm",
                "perf/seconds", "perf/samples_per_second", "perf/peak_rss_mb"]:  # fmt: skip
        assert key in metrics[-1], key
    assert metrics[-1]["perf/peak_rss_mb"] > 50

    evals = read_jsonl(grpo_run / "eval.jsonl")
    assert [(e["iteration"], e["split"]) for e in evals] == [(0, "test"), (3, "test")]
    assert evals[0]["examples"] and "reward" in evals[0]


def test_esft_eval_reads_a_grpo_run(grpo_run, tmp_path, capsys):
    out = tmp_path / "eval.jsonl"
    assert main(["eval", "--run", str(grpo_run), "--limit", "2", "--output", str(out), "--quiet"]) == 0
    assert len(read_jsonl(out)) == 2
    assert "iter-000003" in capsys.readouterr().out


def test_budget_samples_stops_es_and_grpo_at_the_same_count(tiny_model, tmp_path):
    # GRPO: 2 prompts x G=4 = 8 completions per step; ES: N=4 members x 2 prompts = 8 per iteration
    assert grpo(tiny_model, tmp_path / "g", "--iterations", "10", "--budget-samples", "12") == 0
    es = ["train", "--model", str(tiny_model), "--output", str(tmp_path / "e"), "--task", "conciseness",
          "--population", "4", "--max-new-tokens", "8", "--iterations", "10", "--budget-samples", "12",
          "--quiet"]  # fmt: skip
    assert main(es) == 0
    g, e = read_jsonl(tmp_path / "g" / "metrics.jsonl"), read_jsonl(tmp_path / "e" / "metrics.jsonl")
    assert [m["samples"] for m in g] == [m["samples"] for m in e] == [8, 16]
    assert "perf/peak_rss_mb" in e[-1] and "perf/samples_per_second" in e[-1]
    assert e[-1]["tokens"] > 0


def test_fixed_length_makes_every_sampled_completion_full_length(tiny_model, tmp_path):
    """--fixed-length holds EOS back in TRL's sampling too (engines/hf.py, hold_eos_in_generate)."""
    assert grpo(tiny_model, tmp_path / "g", "--iterations", "2", "--fixed-length", "--eval-every", "2") == 0
    rows = read_jsonl(tmp_path / "g" / "metrics.jsonl")
    assert [m["train/completion_tokens"] for m in rows] == [8, 8]
    assert [m["train/truncated_fraction"] for m in rows] == [1, 1]
    assert read_jsonl(tmp_path / "g" / "eval.jsonl")[-1]["completion_tokens"] == 8  # greedy evaluation too


def test_frozen_parameters_stay_fixed(tiny_model, tmp_path):
    out = tmp_path / "frozen"
    assert (
        grpo(tiny_model, out, "--iterations", "1", "--freeze", "*embed_tokens*", "--freeze", "*layers.0.*")
        == 0
    )
    base = load_file(str(tiny_model / "model.safetensors"))
    final = load_file(str(out / "checkpoints" / "iter-000001" / "model.safetensors"))
    for name in base:
        frozen = "embed_tokens" in name or ".layers.0." in name
        assert torch.equal(base[name], final[name]) == frozen, name


def test_one_line_errors(tiny_model, grpo_run, tmp_path, capsys, monkeypatch):
    assert grpo(tiny_model, grpo_run, "--iterations", "1") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert grpo(tiny_model, tmp_path / "m", "--micro-batch-size", "3") == 2
    assert "micro_batch_size 3 must divide the 8 completions" in capsys.readouterr().err
    assert grpo(tiny_model, tmp_path / "l", "--loss-type", "ppo") == 2
    assert "unknown loss_type 'ppo'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "trl", None)
    assert grpo(tiny_model, tmp_path / "t") == 2
    assert "esft grpo needs TRL: pip install" in capsys.readouterr().err


def test_a_config_file_shared_with_es_is_accepted(tiny_model, tmp_path, capsys):
    cfg = tmp_path / "pair.yaml"
    cfg.write_text("task: conciseness\npopulation: 30\nsigma: 0.001\niterations: 1\nmax_new_tokens: 8\n")
    out = tmp_path / "shared"
    assert main(["grpo", "--config", str(cfg), "--model", str(tiny_model), "--output", str(out),
                 "--group-size", "2", "--quiet"]) == 0  # fmt: skip
    assert "ignoring settings of the other trainer: population, sigma" in capsys.readouterr().out


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("task_name", ["countdown", "math"])
def test_esft_task_rewards_run_inside_trl_grpotrainer(tiny_model, tmp_path, task_name):
    """esft's own reward functions, passed to TRL's GRPOTrainer as they are, give TRL the values esft
    computes for the same completions."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from esft.tasks import load_task

    task = load_task(task_name)
    rows = task.train[:2]
    seen: list[tuple[list, list, dict]] = []

    def spy(prompts, completions, **columns):
        seen.append((prompts, completions, columns))
        return [0.0] * len(prompts)

    funcs = [p.fn for p in task.rewards]
    args = GRPOConfig(
        output_dir=str(tmp_path / "trl"),
        max_steps=1,
        num_generations=2,
        per_device_train_batch_size=4,
        max_completion_length=8,
        use_cpu=True,
        bf16=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        gradient_checkpointing=False,
    )
    logged: list[dict] = []

    class Capture(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(dict(logs or {}))

    trainer = GRPOTrainer(
        model=str(tiny_model),
        reward_funcs=[*funcs, spy],
        args=args,
        train_dataset=Dataset.from_list(rows),
        callbacks=[Capture()],
    )
    trainer.train()
    assert seen, "TRL never called the reward functions"
    prompts, completions, columns = seen[0]
    batch = [
        {"prompt": p, **{k: columns[k][i] for k in rows[0] if k != "prompt"}} for i, p in enumerate(prompts)
    ]
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    scores = task.score(batch, texts)
    assert scores.failures == 0
    step = next(log for log in logged if "reward" in log)
    for part, fn in zip(task.rewards, funcs, strict=True):
        expected = sum(scores.parts[part.name]) / len(texts)
        assert math.isclose(step[f"rewards/{fn.__name__}/mean"], expected, abs_tol=1e-6), part.name

    # A tiny random model earns nothing, so also call each function exactly as TRL's _calculate_rewards
    # does (this trainer's state, log_extra, log_metric, completion ids) on a right answer: full marks.
    good = {
        "countdown": (
            {"nums": [3, 7, 5], "target": 26},
            "<think> 3*7+5 </think>\n<answer>3 * 7 + 5</answer>",
        ),
        "math": ({"answer": "\\frac{1}{2}"}, "Half of it: \\boxed{\\frac{1}{2}}"),
    }[task_name]
    columns, text = good
    for fn in funcs:
        values = fn(
            prompts=[rows[0]["prompt"]],
            completions=[[{"role": "assistant", "content": text}]],
            completion_ids=[[1, 2, 3]],
            **{k: [v] for k, v in columns.items()},
            trainer_state=trainer.state,
            log_extra=trainer._log_completion_extra,
            log_metric=trainer._log_metric,
        )
        assert values == [1.0], (fn.__name__, values)


def test_resume_continues_with_the_weights_of_an_uninterrupted_run(tiny_model, tmp_path, capsys):
    """A run stopped after step 2 and resumed to step 4 (TRL's optimizer, scheduler, RNG and data
    position from trl/checkpoint-2) ends with the bits, logs and counters of a run that never stopped."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert (
        grpo(tiny_model, straight, "--iterations", "4", "--checkpoint-every", "2", "--eval-every", "2") == 0
    )
    assert grpo(tiny_model, resumed, "--iterations", "2", "--checkpoint-every", "2", "--eval-every", "2") == 0
    assert [p.name for p in (resumed / "trl").glob("checkpoint-*")] == ["checkpoint-2"]
    assert main(["grpo", "--output", str(resumed), "--resume", "--iterations", "4", "--quiet"]) == 0
    a = load_file(str(straight / "checkpoints" / "iter-000004" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "iter-000004" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = read_jsonl(straight / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl")
    assert [m["iteration"] for m in mb] == [1, 2, 3, 4]
    assert [(m["samples"], m["tokens"], m["train/reward_mean"]) for m in mb] == [
        (m["samples"], m["tokens"], m["train/reward_mean"]) for m in ma
    ]
    assert [e["iteration"] for e in read_jsonl(resumed / "eval.jsonl") if e["split"] == "test"] == [0, 2, 4]
    # the newest state only
    assert [p.name for p in (resumed / "trl").glob("checkpoint-*")] == ["checkpoint-4"]

    # one-line errors: nothing to resume from, another trainer's run, a changed setting
    capsys.readouterr()
    assert grpo(tiny_model, tmp_path / "nostate", "--iterations", "1", "--checkpoint-every", "0") == 0
    assert main(["grpo", "--output", str(tmp_path / "nostate"), "--resume", "--quiet"]) == 2
    assert "holds no GRPO training state" in capsys.readouterr().err
    assert main(["grpo", "--output", str(resumed), "--resume", "--learning-rate", "0.5", "--quiet"]) == 2
    assert "learning_rate differ" in capsys.readouterr().err
    es_run = tmp_path / "es"
    assert main(["train", "--model", str(tiny_model), "--output", str(es_run), "--task", "conciseness",
                 "--iterations", "1", "--population", "2", "--max-new-tokens", "4", "--quiet"]) == 0  # fmt: skip
    assert main(["grpo", "--output", str(es_run), "--resume", "--quiet"]) == 2
    assert "is an ES run, not a GRPO run" in capsys.readouterr().err


def test_grpo_callbacks_see_the_logged_rows_and_can_stop_the_run(tiny_model, tmp_path):
    from esft.callbacks import Callback
    from esft.config import GRPORunConfig
    from esft.grpo import GRPORun

    class StopAfterTwo(Callback):
        def __init__(self):
            self.logged, self.evals, self.ends = [], [], 0

        def on_log(self, metrics, step):
            self.logged.append((step, metrics["train/reward_mean"]))
            if step == 2:
                self.stop = "two steps are enough"

        def on_evaluate(self, scalars, rows, step):
            self.evals.append(step)

        def on_train_end(self):
            self.ends += 1

    cb = StopAfterTwo()
    config = GRPORunConfig(
        model=str(tiny_model), task="conciseness", group_size=4, max_new_tokens=8, learning_rate=1e-3,
        iterations=5, eval_every=1, eval_limit=2, output=str(tmp_path / "run"),
    )  # fmt: skip
    result = GRPORun(config, progress=False, callbacks=[cb]).train()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert cb.logged == [(m["iteration"], m["train/reward_mean"]) for m in rows] and len(rows) == 2
    assert cb.evals == [0, 1, 2] and cb.ends == 1
    assert result.iterations == 2 and result.final_checkpoint is not None


def test_grpo_precision_follows_the_hardware_and_keeps_float32_weights(monkeypatch):
    from esft.config import GRPORunConfig
    from esft.errors import ConfigError
    from esft.grpo import grpo_precision

    monkeypatch.setenv("ESFT_CPU_FLAGS", "avx2 avx512_bf16")
    assert grpo_precision(GRPORunConfig(dtype="auto"), "cpu")[0] == torch.bfloat16
    assert grpo_precision(GRPORunConfig(dtype="bf16"), "cpu")[0] == torch.bfloat16
    monkeypatch.setenv("ESFT_CPU_FLAGS", "avx2")
    dtype, reason = grpo_precision(GRPORunConfig(dtype="auto"), "cpu")
    assert dtype is None and "no native bfloat16" in reason
    assert grpo_precision(GRPORunConfig(dtype="float32"), "cpu")[0] is None
    with pytest.raises(ConfigError, match="GRPO in float16 needs CUDA"):
        grpo_precision(GRPORunConfig(dtype="float16"), "cpu")


def test_bf16_grpo_is_mixed_precision_and_keeps_steps_far_below_a_bf16_ulp(tiny_model, tmp_path):
    """At lr 1e-7 every AdamW step is ~1e-7 per coordinate, below half a bf16 ulp of nearly every weight
    (2**-9 relative): bf16 weights would keep none of it. Mixed precision keeps float32 weights and
    AdamW state (TRL's bf16 autocast), so the step lands in every trained tensor."""
    out = tmp_path / "bf16"
    assert grpo(tiny_model, out, "--iterations", "1", "--dtype", "bfloat16", "--learning-rate", "1e-7") == 0
    env = json.loads((out / "environment.json").read_text())
    assert env["dtype"] == "bfloat16" and env["weights_dtype"] == "float32"
    from esft.environment import esft_source

    assert env["esft"] == esft_source()  # GRPO records esft's code as ES does
    assert "mixed precision" in env["dtype_reason"]
    base = load_file(str(tiny_model / "model.safetensors"))
    final = load_file(str(out / "checkpoints" / "iter-000001" / "model.safetensors"))
    moved, changed, lost_in_bf16 = [], 0, 0
    for name, w in base.items():
        assert final[name].dtype == torch.float32, name
        diff = final[name] != w
        if diff.any():
            moved.append(name)
            assert float((final[name] - w).abs().max()) < 1e-5, name  # a tiny step
            changed += int(diff.sum())
            same = final[name].to(torch.bfloat16) == w.to(torch.bfloat16)
            lost_in_bf16 += int((diff & same).sum())
    assert len(moved) > len(base) // 2, f"only {moved} moved"
    # the same step written into bf16 weights would have been lost almost entirely
    assert lost_in_bf16 / changed > 0.9

    # evaluation and analysis see the run as it trained: float32 weights under bf16 autocast
    from esft import environment
    from esft.engines import build_engine

    assert environment.mixed_precision(env) == "bfloat16"
    assert environment.mixed_precision({"dtype": "bfloat16"}) is None  # ES in bf16: bf16 weights
    engine = build_engine("hf", str(out / "checkpoints" / "iter-000001"), autocast="bfloat16")
    assert engine.dtype == torch.float32 and engine.autocast_dtype == torch.bfloat16
    with engine.autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    assert main(["eval", "--run", str(out), "--limit", "2", "--max-new-tokens", "4"]) == 0
    assert main(["analyze", "kl", str(out), "--limit", "2", "--max-new-tokens", "4", "--quiet"]) == 0


def test_flat_steps_are_counted_reported_and_can_stop_the_run(tiny_model, tmp_path, capsys):
    """A step whose every group scored the same (here a constant reward: TRL's frac_reward_zero_std 1)
    has no reward signal: metrics.jsonl counts the streak, the step line and the log say so, and
    --stop-when-flat ends the run with a checkpoint and the final evaluation, as for ES."""
    reward = tmp_path / "flat.py"
    reward.write_text("def same(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    out = tmp_path / "flat"
    loud = [a for a in COMMON if a != "--quiet"]  # the step lines and the log are what this test reads
    argv = ["grpo", "--model", str(tiny_model), "--output", str(out), *loud, "--reward", f"{reward}:same",
            "--iterations", "5", "--stop-when-flat", "2", "--eval-every", "10", "--checkpoint-every", "10"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr()
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2]  # stopped after 2 flat steps of 5
    assert [r["grpo/flat_streak"] for r in rows] == [1, 2]
    assert all(r["grpo/frac_reward_zero_std"] == 1.0 for r in rows)
    assert (
        "stopped after step 2: every group scored the same for 2 steps in a row" in printed.out + printed.err
    )
    assert "FLAT: every group scored the same (2 in a row)" in printed.out + printed.err
    assert (out / "checkpoints" / "iter-000002" / "model.safetensors").is_file()
    assert [e["iteration"] for e in read_jsonl(out / "eval.jsonl")] == [0, 2]  # the final evaluation

    # without --stop-when-flat the run goes on, and the first flat step says what to change
    going = tmp_path / "going"
    argv = ["grpo", "--model", str(tiny_model), "--output", str(going), *loud, "--iterations", "1"]
    assert main([*argv, "--reward", f"{reward}:same"]) == 0
    assert "step 1: every group's completions scored the same" in "".join(capsys.readouterr())
    assert read_jsonl(going / "metrics.jsonl")[0]["grpo/flat_streak"] == 1


def test_a_step_whose_groups_differ_ends_the_flat_streak(tiny_model, tmp_path):
    """Steps 1 and 3 flat (a constant reward), step 2 not (each completion of a group scored apart):
    the streak is 1, 0, 1, and with --stop-when-flat 2 the run does not stop."""
    reward = tmp_path / "alternating.py"
    reward.write_text(
        "calls = []\n"
        "def alternate(prompts, completions, **kw):\n"
        "    calls.append(1)\n"
        "    if len(calls) % 2:\n"
        "        return [1.0] * len(completions)\n"
        "    return [float(i) for i in range(len(completions))]\n"
    )
    out = tmp_path / "run"
    assert (
        grpo(tiny_model, out, "--iterations", "3", "--reward", f"{reward}:alternate", "--stop-when-flat", "2")
        == 0
    )
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["grpo/frac_reward_zero_std"] for r in rows] == [1.0, 0.0, 1.0]
    assert [r["grpo/flat_streak"] for r in rows] == [1, 0, 1]
