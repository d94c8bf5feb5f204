"""The Python API in TRL's shape (esft/api.py): ESTrainer(model=..., reward_funcs=..., args=...,
train_dataset=..., eval_dataset=...) and GRPORun alike, the notebook example, and one-line errors."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import pytest
import torch
import yaml
from helpers import import_or_skip
from safetensors.torch import load_file

import esft
from esft import ESConfig, GRPORunConfig
from esft.callbacks import Callback
from esft.errors import ConfigError, DataError, EsftError
from esft.runs import TrainResult

datasets = import_or_skip("datasets", "install esft with the dev extra", "pip install datasets")
Dataset = datasets.Dataset
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "notebook_es.py"


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def data(n: int = 3, conversation: bool = True):
    return Dataset.from_list(
        [{"prompt": chat(f"Say {i}") if conversation else f"Say {i}", "target": i + 2} for i in range(n)]
    )


def length_reward(prompts, completions, target, **kwargs):
    return [
        -abs(len(c if isinstance(c, str) else c[0]["content"]) - t)
        for c, t in zip(completions, target, strict=True)
    ]


def small(tmp_path: Path, **kw) -> ESConfig:
    settings = {"population": 2, "iterations": 2, "max_new_tokens": 4, "output": str(tmp_path / "run")}
    return ESConfig(**{**settings, **kw})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_notebook_example_runs_on_a_tiny_model(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("ESFT_EXAMPLE_MODEL", str(tiny_model))
    monkeypatch.setenv("ESFT_EXAMPLE_OUTPUT", str(tmp_path / "run"))
    monkeypatch.setenv("ESFT_EXAMPLE_ITERATIONS", "2")
    cells = runpy.run_path(str(EXAMPLE), run_name="notebook")
    run = tmp_path / "run"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["trainer"] == "es" and config["task"] == "custom" and config["model"] == str(tiny_model)
    assert config["reward_weights"] == [1.0, 0.5] and config["population"] == 16
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [1, 2]
    assert {"train/reward/correct", "train/reward/length_match"} <= set(metrics[-1])
    assert [s for s in metrics[-1]["member_rewards"] if not math.isnan(s)]
    assert (
        cells["result"].global_step == 2
        and cells["result"].final_checkpoint == run / "checkpoints" / "iter-000002"
    )
    for metrics in (cells["before"], cells["after"]):
        assert {"eval_reward", "eval_reward/correct", "eval_reward/length_match", "eval_runtime"} <= set(
            metrics
        )
        assert metrics["eval_samples"] == 2
    assert cells["saved"] == run / "model" and (run / "model" / "config.json").is_file()
    saved = load_file(str(run / "model" / "model.safetensors"))
    final = load_file(str(run / "checkpoints" / "iter-000002" / "model.safetensors"))
    assert all(torch.equal(saved[k], final[k]) for k in final)
    assert not (run / "model" / "esft_checkpoint.json").exists()


def test_rewards_get_the_dataset_columns_and_trl_arguments_and_callbacks_the_logs(tiny_model, tmp_path):
    from transformers import TrainerCallback

    calls = []

    def recording(prompts, completions, target, **kwargs):
        calls.append({"prompts": prompts, "completions": completions, "target": target, **kwargs})
        kwargs["log_metric"]("seen", float(len(completions)))
        return [float(t) for t in target]

    class Rows(Callback):
        def __init__(self):
            self.logged, self.evals, self.ends = [], [], 0

        def on_log(self, metrics, step):
            self.logged.append((step, metrics["train/reward_mean"]))

        def on_evaluate(self, scalars, rows, step):
            self.evals.append((step, sorted(scalars)))

        def on_train_end(self):
            self.ends += 1

    class StopAtOne(TrainerCallback):  # transformers' callbacks are driven by the same hooks
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append((state.global_step, logs["train/reward_mean"]))
            control.should_training_stop = True

    mine, theirs = Rows(), StopAtOne()
    trainer = esft.ESTrainer(
        model=str(tiny_model),
        reward_funcs=[recording, length_reward],
        args=small(tmp_path, iterations=3, reward_weights=[2.0, 0.0]),
        train_dataset=data(3, conversation=False),
        eval_dataset=data(2),
        callbacks=[mine, theirs],
        progress=False,
    )
    assert [(p.name, p.weight) for p in trainer.task.rewards] == [("recording", 2.0), ("length_reward", 0.0)]
    result = trainer.train()
    assert isinstance(result, TrainResult) and result.global_step == 1  # stopped by the TrainerCallback
    step, loss, metrics = result
    assert step == 1 and math.isnan(loss) and metrics["train_samples"] == 2 * 3
    assert metrics["train_reward"] == pytest.approx(2.0 * (2 + 3 + 4) / 3)

    first = calls[0]
    assert first["target"] == [2, 3, 4] and first["prompts"] == ["Say 0", "Say 1", "Say 2"]
    assert all(isinstance(c, str) for c in first["completions"])  # text prompts: text completions
    assert len(first["completion_ids"]) == 3 and all(isinstance(i, int) for i in first["completion_ids"][0])
    assert first["trainer_state"].global_step == 1 and first["trainer_state"].max_steps == 3
    assert callable(first["log_extra"]) and callable(first["log_metric"])
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert rows[0]["train/logged/seen"] == 3
    assert mine.logged == [(1, rows[0]["train/reward_mean"])] == theirs.logs and mine.ends == 1

    scores = trainer.evaluate()
    assert scores["eval_reward"] == pytest.approx(2.0 * (2 + 3) / 2) and scores["eval_samples"] == 2
    assert isinstance(calls[-1]["completions"][0], list)  # conversations: TRL's message completions
    assert mine.evals and mine.evals[-1][0] == 1 and "eval/reward" in mine.evals[-1][1]
    several = trainer.evaluate({"a": data(1), "b": data(2)})
    assert several["eval_a_samples"] == 1 and several["eval_b_samples"] == 2


def test_a_loaded_model_is_saved_once_trained_in_place_and_resumed(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = small(tmp_path, iterations=1, population=4, sigma=0.5)  # members that differ: a non-zero update
    trainer = esft.ESTrainer(
        model, length_reward, args=args, train_dataset=data(), processing_class=tokenizer, progress=False
    )
    base = tmp_path / "run" / "base-model"
    assert trainer.args.model == str(base) and (base / "config.json").is_file()
    assert (base / "tokenizer.json").is_file() and args.model is None  # the caller's args are not changed
    result = trainer.train()
    assert trainer.model is model
    final = load_file(str(result.final_checkpoint / "model.safetensors"))
    assert all(torch.equal(model.state_dict()[k], final[k]) for k in final)
    assert any(not torch.equal(before[k], final[k]) for k in final)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"] == str(base)

    # again with the same (now trained) model object would change the run's base: refused
    with pytest.raises(ConfigError, match="differs from the base model of the run"):
        esft.ESTrainer(model, length_reward, args=args, train_dataset=data(), processing_class=tokenizer)
    # the base model itself resumes the run
    base_model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    again = esft.ESTrainer(
        base_model,
        length_reward,
        args=small(tmp_path, iterations=2, population=4, sigma=0.5),
        train_dataset=data(),
        processing_class=tokenizer,
        progress=False,
    )
    with pytest.raises(
        ConfigError, match=r"already holds a run; continue it with train\(resume_from_checkpoint"
    ):
        again.train()
    assert again.train(resume_from_checkpoint=True).global_step == 2
    assert [m["iteration"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


def test_a_model_id_with_another_tokenizer_is_saved_with_it(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    trainer = esft.ESTrainer(
        str(tiny_model), length_reward, args=small(tmp_path), train_dataset=data(), processing_class=tokenizer
    )
    base = tmp_path / "run" / "base-model"
    assert trainer.args.model == str(base) and (base / "model.safetensors").is_file()
    assert "<|extra|>" in AutoTokenizer.from_pretrained(str(base)).get_vocab()


def test_a_task_name_uses_the_tasks_rewards_and_splits(tiny_model, tmp_path):
    args = ESConfig(population=2, iterations=1, max_new_tokens=4, eval_every=1, eval_limit=2,
                    output=str(tmp_path / "run"))  # fmt: skip
    trainer = esft.ESTrainer(model=str(tiny_model), reward_funcs="conciseness", args=args, progress=False)
    assert trainer.args.task == "conciseness" and len(trainer.task.train) == 2
    before = trainer.save_model(tmp_path / "base-copy")  # before training: the base model's files
    assert (
        load_file(str(before / "model.safetensors")).keys()
        == load_file(str(tiny_model / "model.safetensors")).keys()
    )
    result = trainer.train()
    assert result.global_step == 1 and [e["iteration"] for e in result.eval_history] == [0, 1]
    scores = trainer.evaluate()
    assert {"eval_reward", "eval_reward/length", "eval_completion_tokens"} <= set(scores)
    assert scores["eval_samples"] == 2  # args.eval_limit
    assert isinstance(trainer.model, torch.nn.Module)

    # a task's rewards over rows given as datasets (only the train split here: no test split)
    rows = [{"prompt": chat("Hi"), "answer": "Hello"}]
    other = esft.ESTrainer(str(tiny_model), "conciseness", args=small(tmp_path / "b"), train_dataset=rows)
    assert other.task.train == rows and other.task.test == [] and other.task.rewards[0].name == "length"


def test_the_cli_era_form_still_trains(tiny_model, tmp_path):
    config = ESConfig(model=str(tiny_model), task="conciseness", population=2, iterations=1,
                      max_new_tokens=4, output=str(tmp_path / "run"))  # fmt: skip
    result = esft.ESTrainer(config, progress=False).train()
    assert result.iterations == 1 and result.final_checkpoint.is_dir()
    assert esft.ESTrainer(config=config).args.task == "conciseness"


def test_one_line_errors(tiny_model, tmp_path):
    model = str(tiny_model)

    def error(exc, match, *a, **kw):
        with pytest.raises(exc, match=match) as e:
            esft.ESTrainer(*a, **kw)
        assert "\n" not in str(e.value) and isinstance(e.value, EsftError)

    no_prompt = Dataset.from_list([{"question": "Hi", "target": 1}])
    error(DataError, "train_dataset has no 'prompt' column \\(columns: question, target\\)",
          model, length_reward, args=small(tmp_path), train_dataset=no_prompt)  # fmt: skip
    error(DataError, "eval_dataset has no 'prompt' column",
          model, length_reward, args=small(tmp_path), train_dataset=data(), eval_dataset=no_prompt)  # fmt: skip
    error(DataError, "IterableDataset", model, length_reward, args=small(tmp_path),
          train_dataset=data().to_iterable_dataset())  # fmt: skip
    error(ConfigError, "args.model='other' conflicts with model=",
          model, length_reward, args=small(tmp_path, model="other"), train_dataset=data())  # fmt: skip
    error(ConfigError, "args.task='math' conflicts with reward_funcs='conciseness'",
          model, "conciseness", args=small(tmp_path, task="math"), train_dataset=data())  # fmt: skip
    error(ConfigError, "args.task='math' conflicts with the reward functions",
          model, length_reward, args=small(tmp_path, task="math"), train_dataset=data())  # fmt: skip
    error(ConfigError, "reward_weights has 2 values for 1 reward functions",
          model, length_reward, args=small(tmp_path, reward_weights=[1, 2]), train_dataset=data())  # fmt: skip
    error(ConfigError, "'my/reward-model' is not an esft task",
          model, "my/reward-model", args=small(tmp_path), train_dataset=data())  # fmt: skip
    error(ConfigError, "train_dataset is required", model, length_reward, args=small(tmp_path))
    error(ConfigError, "args must be an esft.ESConfig", model, length_reward, args=GRPORunConfig())
    error(ConfigError, "there is no eval_dataset", model, length_reward,
          args=small(tmp_path, eval_every=1), train_dataset=data())  # fmt: skip


def test_grpo_run_takes_the_same_arguments(tiny_model, tmp_path):
    import_or_skip("trl", "install esft with the dev (or grpo) extra", "pip install -e '.[grpo]'")
    from transformers import TrainerCallback

    logged, trl_logs = [], []

    class Rows(Callback):
        def on_log(self, metrics, step):
            logged.append(step)

    class TRLLogs(TrainerCallback):  # handed to TRL's GRPOTrainer as it is: TRL's own log names
        def on_log(self, args, state, control, logs=None, **kwargs):
            trl_logs.append((state.global_step, sorted(logs or {})))

    args = GRPORunConfig(group_size=2, iterations=2, max_new_tokens=4, learning_rate=1e-3,
                         prompts_per_iteration=2, output=str(tmp_path / "run"))  # fmt: skip
    trainer = esft.GRPORun(
        model=str(tiny_model),
        reward_funcs=length_reward,
        args=args,
        train_dataset=data(2),
        eval_dataset=data(2),
        callbacks=[Rows(), TRLLogs()],
        progress=False,
    )
    result = trainer.train()
    assert result.global_step == 2 and math.isfinite(result.training_loss) and logged == [1, 2]
    assert [step for step, keys in trl_logs if "loss" in keys and "reward" in keys] == [1, 2]
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["trainer"] == "grpo" and config["task"] == "custom" and config["group_size"] == 2
    assert "train/reward/length_reward" in read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    assert trainer.evaluate()["eval_samples"] == 2
    saved = trainer.save_model()
    final = load_file(str(result.final_checkpoint / "model.safetensors"))
    assert all(torch.equal(load_file(str(saved / "model.safetensors"))[k], v) for k, v in final.items())
    with pytest.raises(ConfigError, match="args must be an esft.GRPORunConfig"):
        esft.GRPORun(str(tiny_model), length_reward, args=ESConfig(), train_dataset=data())
