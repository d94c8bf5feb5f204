"""Model cards: every checkpoint folder of an ES or a GRPO run holds a README.md that the Hub reads, naming
the base model, the method and its settings, the held-out results of eval.jsonl, and commands that
rebuild the checkpoint's weights."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml
from helpers import missing_dependency, tiny_config
from safetensors.torch import load_file

from esft import cli
from esft.config import ESConfig, GRPORunConfig
from esft.model_card import EMBEDDED_HUB_ID, environment_line, refresh_card, train_command, write_card
from esft.runstore import RunStore
from esft.trainer import ESTrainer

HAS_HUB = importlib.util.find_spec("huggingface_hub") is not None


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("\n---\n", 1)[0].removeprefix("---\n"))


def code_blocks(card: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)\n```", card, re.S)


def scores(row: dict) -> dict:
    """An eval.jsonl row's finite scores, as the card's model-index holds them."""
    skip = ("iteration", "split", "examples", "samples", "reward_failures")
    return {k: v for k, v in row.items() if k not in skip and isinstance(v, int | float) and math.isfinite(v)}


def check_card(folder: Path, store: RunStore, iteration: int, trainer: str) -> str:
    """What every card holds, for either trainer; returns its text."""
    text = (folder / "README.md").read_text()
    meta = front_matter(text)
    config = store.read_config()
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "esft" in meta["tags"]
    assert ("evolution-strategies" if trainer == "es" else "grpo") in meta["tags"]
    assert "base_model" not in meta  # the tiny model is a local folder, which the Hub would refuse there
    assert f"`{config['model']}`" in text
    assert f"{iteration} of {config['iterations']}" in text
    samples = next(m["samples"] for m in store.metrics() if m["iteration"] == iteration)
    assert f"| samples generated | {samples} |" in text
    assert f'AutoModelForCausalLM.from_pretrained("{store.checkpoint_dir(iteration)}")' in text
    env = json.loads((store.root / "environment.json").read_text())
    assert f"esft {env['esft']}" in text  # the code that trained it, with its commit from a checkout
    # the held-out numbers: this checkpoint's evaluation in the model-index, exactly as in eval.jsonl
    rows = {e["iteration"]: e for e in store.evals() if e["split"] == "test"}
    if iteration in rows:
        (index,) = meta["model-index"]
        (result,) = index["results"]
        assert result["dataset"]["split"] == "test"
        assert {m["type"]: m["value"] for m in result["metrics"]} == scores(rows[iteration])
        reward = f"| reward | {rows[0]['reward']:.4g} | {rows[iteration]['reward']:.4g} |"
        assert "| metric | base model (iteration 0) | this checkpoint (iteration" in text and reward in text
    else:  # evaluated later or never: no claim about these weights, and the command that evaluates them
        assert "model-index" not in meta
        assert f"esft eval --run {store.root} --checkpoint {iteration} --split test" in text
    if HAS_HUB:
        from huggingface_hub import ModelCard

        card = ModelCard.load(folder / "README.md")
        assert card.data.library_name == "transformers"
        assert len(card.data.eval_results or []) == len(scores(rows[iteration]) if iteration in rows else {})
    return text


def reproduced_config(command: str, output: Path, cls: type) -> object:
    """The config ``command`` (an ``esft train``/``esft grpo`` line) trains, with ``output`` as run folder."""
    argv = shlex.split(command)
    assert argv[0] == "esft" and argv[-2] == "--output"
    argv = [*argv[1:-1], str(output)]
    args = cli.build_parser().parse_args(argv)
    return argv, cli._train_config(args, argv[1:], cls)[0]


def same_settings(config, saved: dict, output: Path) -> None:
    assert config.to_dict() == {
        **{k: v for k, v in saved.items() if k not in ("trainer", "model_path")},
        "output": str(output),
    }


def same_weights(a: Path, b: Path) -> None:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


# -- ES -----------------------------------------------------------------------------------------------


def _es_config(tiny_model: Path, out: Path) -> ESConfig:
    return tiny_config(
        tiny_model,
        out,
        task_options={"prompt_format": "raw"},
        sigma=0.002,
        iterations=4,
        freeze=["*norm*"],
        checkpoint_every=1,
        keep_checkpoints=0,
    )


@pytest.fixture(scope="module")
def es_run(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("es") / "run"
    ESTrainer(_es_config(tiny_model, out), progress=False).train()
    return out


def test_every_es_checkpoint_has_a_card_with_its_settings_and_held_out_results(es_run):
    store = RunStore(es_run)
    assert sorted(store.checkpoints()) == [1, 2, 3, 4]
    for t, folder in store.checkpoints().items():
        text = check_card(folder, store, t, "es")
        for row in ("| population N | 4 |", "| sigma | 0.002 |", "| alpha | 0.0005 |", "| noise | independent |",
                    "| shaping | zscore |", "| reward | 1 x length |", "| frozen | *norm* |"):  # fmt: skip
            assert row in text, row
        assert "qiu2025evolution" in text and "arXiv:2509.24372" in text
        assert not (folder / "README.md.tmp").exists()


def test_the_es_cards_commands_rebuild_the_checkpoint_bit_for_bit(es_run, tmp_path, capsys):
    store = RunStore(es_run)
    text = (store.checkpoint_dir(3) / "README.md").read_text()
    replay, train = code_blocks(text, "bash")
    # esft replay: the base model + the seed log, compared with this checkpoint (exit 0: bit-identical)
    args = cli.build_parser().parse_args(shlex.split(replay)[1:])
    assert (args.command, Path(args.run), args.iteration) == ("replay", es_run, 3)
    assert cli.main([*shlex.split(replay)[1:], "--output", str(tmp_path / "replayed"), "--quiet"]) == 0
    assert "bit-identical" in capsys.readouterr().out
    # esft train: the run's settings as flags; a new run to the same iteration has the same weights
    argv, config = reproduced_config(train, tmp_path / "again", ESConfig)
    same_settings(config, store.read_config(), tmp_path / "again")
    assert cli.main([*argv, "--quiet"]) == 0
    same_weights(store.checkpoint_dir(3), RunStore(tmp_path / "again").checkpoint_dir(3))


# -- GRPO ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpo_run(tiny_model, tmp_path_factory) -> Path:
    if importlib.util.find_spec("trl") is None:
        missing_dependency("trl", "install esft with the dev (or grpo) extra", "pip install -e '.[grpo]'")
    from esft.grpo import GRPORun

    out = tmp_path_factory.mktemp("grpo") / "run"
    config = GRPORunConfig(
        model=str(tiny_model), task="conciseness", group_size=4, max_new_tokens=8, learning_rate=1e-3,
        seed=1, iterations=2, eval_every=2, eval_limit=2, checkpoint_every=1, reward_weights=[2.0],
        gradient_checkpointing=False, output=str(out),
    )  # fmt: skip
    GRPORun(config, progress=False).train()
    return out


def test_every_grpo_checkpoint_has_a_card_and_its_command_retrains_it(grpo_run, tmp_path):
    store = RunStore(grpo_run)
    assert sorted(store.checkpoints()) == [1, 2]
    for t, folder in store.checkpoints().items():
        text = check_card(folder, store, t, "grpo")
        for row in ("| group size G | 4 |", "| learning rate | 0.001 |", "| beta (KL) | 0.0 |",
                    "| loss type | dapo |", "| reward | 2 x length |"):  # fmt: skip
            assert row in text, row
        assert "trl" in front_matter(text)["tags"]
        assert "shao2024deepseekmath" in text and "vonwerra2020trl" in text
    (train,) = code_blocks((store.checkpoint_dir(2) / "README.md").read_text(), "bash")
    argv, config = reproduced_config(train, tmp_path / "again", GRPORunConfig)
    assert argv[0] == "grpo" and "--no-gradient-checkpointing" in argv
    same_settings(config, store.read_config(), tmp_path / "again")
    assert cli.main([*argv, "--quiet"]) == 0  # on CPU, TRL's seeded sampling retraces the run
    same_weights(store.checkpoint_dir(2), RunStore(tmp_path / "again").checkpoint_dir(2))


# -- without a model ----------------------------------------------------------------------------------


def test_a_hub_model_is_the_cards_base_model_and_a_refresh_replaces_the_card(tmp_path):
    store = RunStore(tmp_path / "run")
    store.write_config(
        {"trainer": "es", **ESConfig(model="Qwen/Qwen2.5-0.5B-Instruct", output=str(store.root)).to_dict()}
    )
    folder = store.checkpoint_dir(5)
    folder.mkdir(parents=True)
    (folder / "esft_checkpoint.json").write_text('{"iteration": 5}')
    write_card(folder, store, 5, [("answer", 1.0), ("format", 0.5)])
    text = (folder / "README.md").read_text()
    assert front_matter(text)["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert "| reward | 1 x answer + 0.5 x format |" in text and "model-index" not in text
    store.append_eval({"iteration": 5, "split": "test", "reward": 0.25, "accuracy": 0.5, "samples": 4})
    store.append_eval({"iteration": 5, "split": "train", "reward": 0.75, "accuracy": float("nan")})
    refresh_card(store, 5)
    text = (folder / "README.md").read_text()
    test, train = front_matter(text)["model-index"][0]["results"]
    assert (test["dataset"]["split"], train["dataset"]["split"]) == ("test", "train")
    assert {m["type"]: m["value"] for m in test["metrics"]} == {"reward": 0.25, "accuracy": 0.5}
    assert {m["type"]: m["value"] for m in train["metrics"]} == {"reward": 0.75}  # NaN is no score
    assert "**train split** (training prompts)" in text and "| accuracy | n/a |" in text
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "esft_checkpoint.json"]
    if HAS_HUB:
        from huggingface_hub import ModelCard

        card = ModelCard.load(folder / "README.md")
        assert card.data.base_model == "Qwen/Qwen2.5-0.5B-Instruct" and len(card.data.eval_results) == 3

    # the embedded default model is the Hub's Qwen2.5-Coder-0.5B-Instruct
    store.write_config({"trainer": "es", **ESConfig(output=str(store.root)).to_dict()})
    refresh_card(store, 5)
    assert front_matter((folder / "README.md").read_text())["base_model"] == EMBEDDED_HUB_ID


def test_the_train_command_round_trips_every_kind_of_setting(tmp_path):
    config = ESConfig(
        model="Qwen/Qwen2.5-0.5B-Instruct", task="conciseness",
        task_options={"prompt_format": "chat", "data_file": "my data.jsonl", "n": 3, "x": 1e-06, "s": "007"},
        reward=["a.py:f", "b:g"], reward_weights=[1.0, -0.5], freeze=["*embed*", "model.norm*"],
        pin_checkpoints=[10, 20], antithetic=True, population=8, sigma=1e-06, alpha=0.25, max_new_tokens=16,
        noise="lowrank", rank=2, ray_address="host:6379", worker_timeout=30.5, shaping="centered_rank",
        output=str(tmp_path / "old"),
    )  # fmt: skip
    saved = {"trainer": "es", **config.to_dict(), "model_path": "Qwen/Qwen2.5-0.5B-Instruct"}
    command = train_command(saved, tmp_path / "new run")
    _, again = reproduced_config(command, tmp_path / "new run", ESConfig)
    same_settings(again, saved, tmp_path / "new run")

    grpo = GRPORunConfig(task="conciseness", gradient_checkpointing=False, beta=0.04, loss_type="grpo",
                         scale_rewards="none", output="old")  # fmt: skip
    saved = {"trainer": "grpo", **grpo.to_dict(), "model_path": "x"}
    _, again = reproduced_config(train_command(saved, "new"), Path("new"), GRPORunConfig)
    same_settings(again, saved, Path("new"))


def test_the_environment_line_names_the_runs_code_and_never_the_installed_one():
    env = {"device": "cpu", "engine": "hf", "torch": "2.13.0+cpu", "esft": "0.1.0 (git 1c458248847f)"}
    assert environment_line(env) == "cpu, engine hf, torch 2.13.0+cpu, esft 0.1.0 (git 1c458248847f)"
    # a run recorded before environment.json held esft's code: the installed esft may be another one
    del env["esft"]
    assert environment_line(env).endswith("esft (version not recorded)")
