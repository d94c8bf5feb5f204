"""End-to-end: the real CLI on a tiny randomly initialised model built in the test."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from esft.cli import main
from esft.runstore import RunStore

COMMON = ["--task", "conciseness", "--population", "4", "--sigma", "0.05", "--alpha", "0.05",
          "--max-new-tokens", "12", "--seed", "3", "--quiet"]  # fmt: skip


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def train(model: Path, out: Path, iterations: int, *extra: str) -> int:
    return main(
        [
            "train",
            "--model",
            str(model),
            "--output",
            str(out),
            "--iterations",
            str(iterations),
            *COMMON,
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def straight_run(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "straight"
    assert train(tiny_model, out, 4, "--checkpoint-every", "2", "--eval-every", "4") == 0
    return out


def test_training_changes_every_parameter_and_logs_everything(tiny_model, straight_run):
    base = weights(tiny_model)
    final = weights(straight_run / "checkpoints" / "iter-000004")
    assert set(base) == set(final)
    for name in base:
        assert not torch.equal(base[name], final[name]), f"{name} did not change"
    metrics = [json.loads(line) for line in (straight_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1, 2, 3, 4]
    for key in ["train/reward_mean", "train/reward_std", "train/reward_min", "train/reward_max",
                "train/reward/length", "train/completion_tokens", "es/update_norm", "es/update_ratio",
                "perf/generate_seconds", "perf/score_seconds", "perf/noise_seconds", "perf/update_seconds",
                "perf/tokens_per_second", "train/reward_failures"]:  # fmt: skip
        assert key in metrics[-1], key
    assert metrics[-1]["samples"] == 4 * 4 * 2  # iterations x population x prompts
    seedlog = [json.loads(line) for line in (straight_run / "seedlog.jsonl").read_text().splitlines()]
    assert len(seedlog) == 4 and len(seedlog[0]["members"]) == 4 and len(seedlog[0]["weights"]) == 4
    evals = [json.loads(line) for line in (straight_run / "eval.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in evals] == [0, 4]
    assert list((straight_run / "events").iterdir())
    assert sorted(p.name for p in (straight_run / "checkpoints").iterdir()) == ["iter-000002", "iter-000004"]


def test_checkpoint_loads_in_transformers(straight_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = straight_run / "checkpoints" / "iter-000004"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok("Solve: 3 + 5 =", return_tensors="pt", return_token_type_ids=False)
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert ids["input_ids"].shape[1] < out.shape[1] <= ids["input_ids"].shape[1] + 3  # generated 1-3 tokens
    assert set(model.state_dict()) >= set(weights(ckpt))


def test_same_seed_gives_identical_weights(tiny_model, straight_run, tmp_path):
    assert train(tiny_model, tmp_path / "again", 4) == 0
    a, b = (
        weights(straight_run / "checkpoints" / "iter-000004"),
        weights(tmp_path / "again" / "checkpoints" / "iter-000004"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_equals_straight_run(tiny_model, straight_run, tmp_path):
    out = tmp_path / "resumed"
    assert train(tiny_model, out, 2, "--checkpoint-every", "1") == 0
    assert main(["train", "--output", str(out), "--iterations", "4", "--resume", "--quiet"]) == 0
    a, b = weights(straight_run / "checkpoints" / "iter-000004"), weights(out / "checkpoints" / "iter-000004")
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [1, 2, 3, 4]


def test_resume_after_crash_replays_the_seed_log(tiny_model, straight_run, tmp_path):
    """A crash after iteration 3's update but before its checkpoint: resume replays iteration 3."""
    out = tmp_path / "crashed"
    assert train(tiny_model, out, 3, "--checkpoint-every", "2") == 0
    shutil.rmtree(out / "checkpoints" / "iter-000003")  # as if killed before the final save
    (out / "checkpoints" / ".tmp-iter-000003-1").mkdir()  # a half-written checkpoint left behind
    with open(out / "seedlog.jsonl", "a") as f:
        f.write('{"iteration": 4, "memb')  # torn write
    assert main(["train", "--output", str(out), "--iterations", "4", "--resume", "--quiet"]) == 0
    a, b = weights(straight_run / "checkpoints" / "iter-000004"), weights(out / "checkpoints" / "iter-000004")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_replay_reproduces_checkpoint(straight_run, capsys):
    assert main(["replay", "--run", str(straight_run), "--iteration", "2", "--quiet"]) == 0
    assert "bit-identical" in capsys.readouterr().out
    a = weights(straight_run / "checkpoints" / "iter-000002")
    b = weights(straight_run / "replay" / "iter-000002")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_replay_without_its_checkpoint_checks_an_earlier_one_or_says_it_cannot(
    straight_run, tmp_path, capsys
):
    """Iteration 3 has no checkpoint (every 2): replay checks checkpoint 2, which it passes on its way, and
    finds a checkpoint 2 the seed log does not give. With no checkpoint at or before 3 the weights are
    still written, but one line says that nothing checked them, and the exit status is 3."""
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    ckpt2 = run / "checkpoints" / "iter-000002"
    replay3 = ["replay", "--run", str(run), "--iteration", "3", "--quiet"]
    capsys.readouterr()
    assert main(replay3) == 0
    out = capsys.readouterr().out
    assert (
        f"matches checkpoint {ckpt2} (iteration 2, the newest before 3, which has none): bit-identical" in out
    )
    rebuilt = weights(run / "replay" / "iter-000003")
    for other in (ckpt2, run / "checkpoints" / "iter-000004"):  # iteration 3 is neither 2 nor 4
        assert any(not torch.equal(v, weights(other)[k]) for k, v in rebuilt.items())

    tensors = weights(ckpt2)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] += 0.5
    save_file(tensors, str(ckpt2 / "model.safetensors"), metadata={"format": "pt"})
    assert main(replay3) == 1
    out = capsys.readouterr().out
    assert (
        f"DIFFERS from checkpoint {ckpt2} (iteration 2, the newest before 3, which has none): max abs" in out
    )

    shutil.rmtree(ckpt2)
    assert main([*replay3, "--output", str(tmp_path / "unchecked")]) == 3
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if "NOT VERIFIED" in line or "matches" in line or "DIFFERS" in line] == [
        "NOT VERIFIED: the run has no checkpoint at or before iteration 3 to compare the replay with "
        "(its checkpoints: 4; replaying to one of them checks the seed log)"
    ]
    assert all(torch.equal(v, rebuilt[k]) for k, v in weights(tmp_path / "unchecked").items())
    assert main(["replay", "--run", str(run), "--iteration", "4", "--quiet"]) == 0
    assert "bit-identical" in capsys.readouterr().out


def test_eval_writes_per_sample_results(straight_run, tmp_path, capsys):
    out = tmp_path / "eval.jsonl"
    assert main(["eval", "--run", str(straight_run), "--limit", "3", "--output", str(out), "--quiet"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and {"completion", "reward", "parts", "answer"} <= set(rows[0])
    assert rows[0]["completion_tokens"] <= 12  # the run's max_new_tokens is reused
    assert "normalized_reward" in capsys.readouterr().out


def test_eval_of_a_missing_checkpoint_or_a_non_run_is_a_one_line_error(straight_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["eval", "--run", str(straight_run), "--checkpoint", "3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == f"esft: error: {straight_run} has no checkpoint 3; available: 2, 4\n"  # no "0 = the base"
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(straight_run / "config.yaml", empty / "config.yaml")
    assert main(["eval", "--run", str(empty), "--quiet"]) == 2
    assert capsys.readouterr().err == f"esft: error: {empty} has no checkpoints yet\n"
    assert main(["eval", "--run", str(tmp_path), "--quiet"]) == 2
    assert capsys.readouterr().err == f"esft: error: {tmp_path} is not an esft run folder (no config.yaml)\n"


def test_freeze_keeps_matching_parameters(tiny_model, tmp_path):
    assert (
        train(tiny_model, tmp_path / "frozen", 1, "--freeze", "*embed_tokens*", "--freeze", "lm_head*") == 0
    )
    base, final = weights(tiny_model), weights(tmp_path / "frozen" / "checkpoints" / "iter-000001")
    for name in base:
        frozen = "embed_tokens" in name or name.startswith("lm_head")
        assert torch.equal(base[name], final[name]) == frozen, name


def test_countdown_chat_prompts_and_antithetic(tiny_model, tmp_path):
    rc = main(["train", "--model", str(tiny_model), "--output", str(tmp_path / "cd"), "--task", "countdown",
               "--task-option", "train_size=6", "--task-option", "test_size=4", "--population", "4",
               "--antithetic", "--prompts-per-iteration", "3", "--iterations", "1", "--max-new-tokens", "8",
               "--shaping", "centered_rank", "--quiet"])  # fmt: skip
    assert rc == 0
    log = json.loads((tmp_path / "cd" / "seedlog.jsonl").read_text())
    assert [s for _, s in log["members"]] == [1, -1, 1, -1]


def test_config_file_and_flag_override(tiny_model, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {tiny_model}\ntask: conciseness\npopulation: 3\niterations: 1\nmax_new_tokens: 4\n"
    )
    assert (
        main(["train", "--config", str(cfg), "--population", "2", "--output", str(tmp_path / "r"), "--quiet"])
        == 0
    )
    saved = (tmp_path / "r" / "config.yaml").read_text()
    assert "population: 2" in saved and "max_new_tokens: 4" in saved


def test_a_runs_own_config_starts_the_same_run_again(straight_run, tmp_path, capsys):
    """A run's config.yaml (which also records its trainer and model folder) is a valid --config: the
    same settings into a new folder give the same weights; the other trainer refuses it in one line."""
    again = tmp_path / "again"
    assert (
        main(["train", "--config", str(straight_run / "config.yaml"), "--output", str(again), "--quiet"]) == 0
    )
    first, second = (
        yaml.safe_load((straight_run / "config.yaml").read_text()),
        yaml.safe_load((again / "config.yaml").read_text()),
    )
    assert {k: v for k, v in first.items() if k != "output"} == {
        k: v for k, v in second.items() if k != "output"
    }
    last = max(RunStore(straight_run).checkpoints())
    a, b = weights(RunStore(straight_run).checkpoints()[last]), weights(RunStore(again).checkpoints()[last])
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(["grpo", "--config", str(straight_run / "config.yaml"), "--output", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds the settings of an ES run; start it with esft train" in err and "\n" not in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--population", "1"], "population must be an integer >= 2"),
        (["--sigma", "0"], "sigma must be a number > 0"),
        (["--sigma=-1e-3"], "sigma must be a number > 0"),
        (["--task", "nope"], "unknown task 'nope'"),
        (["--antithetic", "--population", "5"], "even population"),
        (["--model", "/no/such/model"], "does not exist"),
        (["--data", "/no/such/file.jsonl", "--task", "conciseness"], "does not exist"),
    ],
)
def test_user_mistakes_get_one_line_errors(tmp_path, args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "esft", "train", "--output", str(tmp_path / "x"), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "x" / "config.yaml").exists()


def test_existing_run_is_not_overwritten(tiny_model, straight_run, capsys):
    before = (straight_run / "seedlog.jsonl").read_text()
    assert train(tiny_model, straight_run, 4) == 2
    assert "--resume" in capsys.readouterr().err
    assert (straight_run / "seedlog.jsonl").read_text() == before


def test_table_noise_run_replays_bit_identically(tiny_model, tmp_path, capsys):
    out = tmp_path / "table"
    assert train(tiny_model, out, 2, "--noise", "table") == 0
    base, final = weights(tiny_model), weights(out / "checkpoints" / "iter-000002")
    assert all(not torch.equal(base[k], final[k]) for k in base)
    assert main(["replay", "--run", str(out), "--iteration", "2", "--quiet"]) == 0
    assert "bit-identical" in capsys.readouterr().out


def test_lowrank_run_trains_matrices_replays_and_resumes(tiny_model, tmp_path, capsys):
    out = tmp_path / "lowrank"
    assert train(tiny_model, out, 2, "--noise", "lowrank", "--rank", "2") == 0
    base, final = weights(tiny_model), weights(out / "checkpoints" / "iter-000002")
    for k in base:  # matrices and biases move; normalisation scales are not trained by this scheme
        moved = not torch.equal(base[k], final[k])
        assert moved == (base[k].ndim == 2 or k.endswith(".bias")), k
    assert main(["replay", "--run", str(out), "--iteration", "2", "--quiet"]) == 0
    assert "bit-identical" in capsys.readouterr().out
    resumed = tmp_path / "resumed"
    assert train(tiny_model, resumed, 1, "--noise", "lowrank", "--rank", "2") == 0
    assert train(tiny_model, resumed, 2, "--noise", "lowrank", "--rank", "2", "--resume") == 0
    again = weights(resumed / "checkpoints" / "iter-000002")
    assert all(torch.equal(final[k], again[k]) for k in final)


@pytest.mark.parametrize(
    "task,options",
    [
        ("math", []),
        ("gsm8k", []),
        ("sudoku", ["--task-option", "train_size=4", "--task-option", "test_size=2"]),
        ("rg:leg_counting", ["--task-option", "train_size=4", "--task-option", "test_size=2"]),
    ],
)
def test_every_task_trains_and_evaluates(tiny_model, tmp_path, task, options, request):
    if task == "sudoku" or task.startswith("rg:"):
        request.getfixturevalue("needs_bwrap")  # their graders run in the sandbox
    out = tmp_path / "run"
    rc = main(["train", "--model", str(tiny_model), "--output", str(out), "--task", task, *options,
               "--population", "2", "--iterations", "1", "--max-new-tokens", "6",
               "--prompts-per-iteration", "2", "--quiet"])  # fmt: skip
    assert rc == 0
    metrics = json.loads((out / "metrics.jsonl").read_text())
    assert "train/accuracy" in metrics and "train/reward/answer" in metrics
    assert (
        main(["eval", "--run", str(out), "--limit", "2", "--output", str(tmp_path / "e.jsonl"), "--quiet"])
        == 0
    )
    assert len((tmp_path / "e.jsonl").read_text().splitlines()) == 2


def test_keep_checkpoints_drops_old_ones_but_pinned(tiny_model, straight_run, tmp_path):
    out = tmp_path / "kept"
    extra = ("--checkpoint-every", "1", "--keep-checkpoints", "2", "--pin-checkpoints", "1")
    assert train(tiny_model, out, 4, *extra) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "iter-000001",
        "iter-000003",
        "iter-000004",
    ]
    assert all(torch.equal(v, weights(straight_run / "checkpoints" / "iter-000004")[k])
               for k, v in weights(out / "checkpoints" / "iter-000004").items())  # fmt: skip
    # a dropped iteration is rebuilt from the seed log
    assert main(["replay", "--run", str(out), "--iteration", "2", "--quiet"]) == 0
    assert all(torch.equal(v, weights(straight_run / "checkpoints" / "iter-000002")[k])
               for k, v in weights(out / "replay" / "iter-000002").items())  # fmt: skip


@pytest.mark.parametrize(
    "failure",
    [
        OSError(28, "No space left on device"),
        RuntimeError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        ),
    ],
    ids=["oserror", "safetensors"],
)
def test_full_disk_is_a_one_line_error_and_resume_finishes(
    tiny_model, straight_run, tmp_path, monkeypatch, capsys, failure
):
    from esft.engines.hf import HFEngine

    real_save = HFEngine.save

    def save(self, path):
        real_save(self, path)  # half-written: the files exist when the disk fills up
        if "iter-000003" in str(path):
            raise failure

    monkeypatch.setattr(HFEngine, "save", save)
    out = tmp_path / "full"
    capsys.readouterr()
    assert train(tiny_model, out, 4, "--checkpoint-every", "1") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no space left" in err and "--resume" in err
    assert "seed log through iteration 3" in err and "newest checkpoint 2" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter-000001", "iter-000002"]
    monkeypatch.setattr(HFEngine, "save", real_save)
    assert train(tiny_model, out, 4, "--checkpoint-every", "1", "--resume") == 0
    final = weights(out / "checkpoints" / "iter-000004")
    assert all(
        torch.equal(v, weights(straight_run / "checkpoints" / "iter-000004")[k]) for k, v in final.items()
    )


def test_environment_is_recorded_and_a_change_refuses_resume_and_replay(tiny_model, tmp_path, capsys):
    out = tmp_path / "env"
    assert train(tiny_model, out, 1) == 0
    env = json.loads((out / "environment.json").read_text())
    assert env["device"] == "cpu" and env["dtype"] == "float32" and env["engine"] == "hf"
    assert env["torch"] == torch.__version__ and env["model_fingerprint"].startswith("sha256:")
    assert env["transformers"]
    assert env["cpu"].endswith("]")  # the CPU's model and speed flags (conftest empties the flags: "none of")
    for field, value, command in [
        ("torch", "0.0.1", ["train", "--output", str(out), "--iterations", "2", "--resume", "--quiet"]),
        ("device", "cuda", ["replay", "--run", str(out), "--iteration", "1", "--quiet"]),
        (
            "model_fingerprint",
            "sha256:other",
            ["train", "--output", str(out), "--iterations", "2", "--resume", "--quiet"],
        ),
    ]:
        changed = {**env, field: value}
        (out / "environment.json").write_text(json.dumps(changed))
        capsys.readouterr()
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert field in err and value in err and "--allow-environment-change" in err and "\n" not in err
        assert main([*command, "--allow-environment-change"]) == 0
    # esft's own code is recorded, not checked: a resume under other code says so and keeps the earlier
    import esft

    env = json.loads((out / "environment.json").read_text())
    assert env["esft"].startswith(esft.__version__)
    if (Path(esft.__file__).parents[2] / ".git").exists():  # a checkout: the commit, never a guess
        assert re.fullmatch(re.escape(esft.__version__) + r" \(git [0-9a-f]{12}(\+modified)?\)", env["esft"])
    (out / "environment.json").write_text(json.dumps({**env, "esft": "0.0.9 (git 0123456789ab)"}))
    capsys.readouterr()
    assert main(["train", "--output", str(out), "--iterations", "3", "--resume"]) == 0  # notes: not --quiet
    said = capsys.readouterr()
    assert "the run last started with 0.0.9 (git 0123456789ab)" in said.out + said.err
    resumed = json.loads((out / "environment.json").read_text())
    assert resumed["esft"] == env["esft"] and resumed["esft_earlier"] == ["0.0.9 (git 0123456789ab)"]
    capsys.readouterr()
    assert main(["train", "--output", str(out), "--iterations", "4", "--resume", "--quiet"]) == 0
    said = capsys.readouterr()
    assert "last started with" not in said.out + said.err  # the same code: nothing to say
    assert json.loads((out / "environment.json").read_text())["esft_earlier"] == ["0.0.9 (git 0123456789ab)"]
    # the weights file itself is part of the fingerprint
    weights_file = next(tiny_model.glob("*.safetensors"))
    from esft.environment import model_fingerprint

    before = model_fingerprint(str(tiny_model))
    copy = tmp_path / "model-copy"
    shutil.copytree(tiny_model, copy)
    assert model_fingerprint(str(copy)) == before
    data = bytearray((copy / weights_file.name).read_bytes())
    data[-1] ^= 1
    (copy / weights_file.name).write_bytes(bytes(data))
    assert model_fingerprint(str(copy)) != before


def test_flat_population_gives_a_zero_update_reported_and_can_stop_the_run(tiny_model, tmp_path, capsys):
    """Every member scoring the same (here a constant reward) makes every z-score 0: the update is
    exactly zero, the metrics say so, and --stop-when-flat ends the run."""
    from esft.trainer import summary_line

    reward = tmp_path / "flat.py"
    reward.write_text("def same(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    out = tmp_path / "flat"
    assert train(tiny_model, out, 5, "--reward", f"{reward}:same", "--stop-when-flat", "2") == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]  # stopped after 2 flat iterations of 5
    assert [r["es/zero_update"] for r in rows] == [1, 1] and [r["es/flat_streak"] for r in rows] == [1, 2]
    assert all(r["es/update_norm"] == 0.0 and r["train/reward_std"] == 0.0 for r in rows)
    log = [json.loads(x) for x in (out / "seedlog.jsonl").read_text().splitlines()]
    assert all(w == 0.0 for entry in log for w in entry["weights"])
    base = load_file(str(next(tiny_model.glob("*.safetensors"))))
    final = weights(out / "checkpoints" / "iter-000002")
    assert all(torch.equal(final[k], base[k]) for k in final)  # exactly unchanged
    line = summary_line(rows[1], 5)
    assert "FLAT: every member scored 1, zero update (2 in a row)" in line
    # a population that is not flat is not reported as such, and the streak resets
    varied = tmp_path / "varied"
    assert train(tiny_model, varied, 1) == 0
    row = json.loads((varied / "metrics.jsonl").read_text().splitlines()[0])
    assert row["es/zero_update"] == 0 and row["es/flat_streak"] == 0
    assert "FLAT" not in summary_line(row, 1)


def test_eval_on_both_splits_prints_before_and_after_with_examples(tiny_model, tmp_path, capsys):
    out = tmp_path / "both"
    rc = main(["train", "--model", str(tiny_model), "--output", str(out), "--task", "conciseness",
               "--population", "2", "--iterations", "1", "--max-new-tokens", "6", "--eval-every", "1",
               "--eval-split", "both", "--eval-limit", "2"])  # fmt: skip
    assert rc == 0
    rows = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["split"]) for r in rows] == [
        (0, "train"),
        (0, "test"),
        (1, "train"),
        (1, "test"),
    ]
    assert all(
        len(r["examples"]) == 2 and {"prompt", "completion", "reward"} <= set(r["examples"][0]) for r in rows
    )
    printed = capsys.readouterr().out
    assert "training prompts (train split):" in printed and "held-out prompts (test split):" in printed
    assert printed.count("before:") == 4 and printed.count("after:") == 4


def test_resume_runs_with_the_thread_count_the_run_started_with(tiny_model, tmp_path):
    """CPU rounding can depend on torch's thread count, so --resume sets it back to the recorded one;
    --allow-environment-change keeps this machine's; a run that recorded none resumes as before."""
    before = torch.get_num_threads()
    out = tmp_path / "threads"
    try:
        torch.set_num_threads(2)
        assert train(tiny_model, out, 1) == 0
        assert json.loads((out / "environment.json").read_text())["cpu_threads"] == 2
        torch.set_num_threads(1)
        assert train(tiny_model, out, 2, "--resume") == 0
        assert torch.get_num_threads() == 2
        assert json.loads((out / "environment.json").read_text())["cpu_threads"] == 2

        torch.set_num_threads(1)
        assert train(tiny_model, out, 3, "--resume", "--allow-environment-change") == 0
        assert torch.get_num_threads() == 1
        assert json.loads((out / "environment.json").read_text())["cpu_threads"] == 1

        env = json.loads((out / "environment.json").read_text())
        del env["cpu_threads"]  # as written before the thread count was recorded
        (out / "environment.json").write_text(json.dumps(env))
        torch.set_num_threads(2)
        assert train(tiny_model, out, 4, "--resume") == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
