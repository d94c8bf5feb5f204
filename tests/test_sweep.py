"""esft sweep (Optuna): the sweep file's parsing and one-line errors, trials as ordinary run folders
(replay and analyze accept them), pruning at the periodic evaluation, --resume after an interrupted
sweep, --parallel, esft report over a sweep, a GRPO sweep and one on Ray. Tiny model, 1-3 iterations
per trial."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import yaml
from helpers import import_or_skip, missing_dependency

from esft.cli import main
from esft.errors import ConfigError

optuna = import_or_skip("optuna", "install esft with the dev (or sweep) extra", "pip install -e '.[sweep]'")

from esft.sweep import driver, layout  # noqa: E402
from esft.sweep import objective as sweep_objective  # noqa: E402
from esft.sweep.space import parse_spec  # noqa: E402

BASE = {"task": "conciseness", "iterations": 2, "eval_every": 1, "eval_limit": 2, "max_new_tokens": 4,
        "prompts_per_iteration": 2, "dtype": "float32", "seed": 1}  # fmt: skip
SPACE = {
    "sigma": {"low": 1e-3, "high": 5e-2, "log": True},
    "alpha": {"expr": "sigma / 2"},
    "population": {"choices": [2, 4]},
}


def sweep_data(model: Path, **changes) -> dict:
    data = {"method": "es", "base": {**BASE, "model": str(model)}, "space": SPACE, "n_trials": 3}
    for key, value in changes.items():
        if key == "base":
            data["base"] = {**data["base"], **value}
        else:
            data[key] = value
    return data


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def trials(root: Path) -> list:
    return layout.load_study(root).get_trials(deepcopy=False)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- the sweep file --------------------------------------------------------------------------------


def test_the_space_becomes_optuna_distributions_with_defaults(tiny_model):
    D = optuna.distributions
    spec = parse_spec(
        sweep_data(tiny_model, space={**SPACE, "rank": {"low": 1, "high": 4}, "alpha": {"expr": "sigma / 2"}})
    )
    assert spec.distributions["sigma"] == D.FloatDistribution(1e-3, 5e-2, log=True)
    assert spec.distributions["population"] == D.CategoricalDistribution([2, 4])
    assert spec.distributions["rank"] == D.IntDistribution(1, 4)
    assert "alpha" not in spec.distributions and list(spec.derived) == ["alpha"]
    settings, derived = spec.settings({"sigma": 0.004, "population": 4, "rank": 2})
    assert derived == {"alpha": 0.002} and settings["alpha"] == 0.002 and settings["task"] == "conciseness"
    # Optuna's defaults where the file is silent: TPE (seeded), median pruning, the held-out reward
    assert (spec.metric, spec.direction, spec.n_trials) == ("eval/reward", "maximize", 3)
    assert spec.sampler == {"name": "tpe", "seed": 0} and spec.pruner == {"name": "median"}
    assert isinstance(spec.make_sampler(), optuna.samplers.TPESampler)
    assert isinstance(spec.make_pruner(), optuna.pruners.MedianPruner)
    assert parse_spec(spec.to_dict()).to_dict() == spec.to_dict()  # what sweep.yaml holds parses back
    # 1e-4 without a dot (a string to PyYAML), Optuna's class names, both splits, a grid from a step
    other = parse_spec(
        sweep_data(
            tiny_model,
            base={"eval_split": "both"},
            space={"sigma": {"choices": ["1e-4", 1e-3]}, "population": {"low": 2, "high": 6, "step": 2}},
            sampler="GridSampler",
            pruner={"name": "NopPruner"},
            n_trials=None,  # a grid's default: its size
        )
    )
    assert other.distributions["sigma"] == D.CategoricalDistribution([1e-4, 1e-3])
    assert other.n_trials == 6 and other.sampler == {"name": "grid", "seed": 0}
    assert parse_spec(sweep_data(tiny_model, space={"sigma": {"low": "1e-4", "high": 1e-2}})).distributions[
        "sigma"
    ] == D.FloatDistribution(1e-4, 1e-2)
    assert other.metric == "eval/test/reward" and other.pruner == {"name": "none"}
    assert other.distributions["population"] == D.CategoricalDistribution([2, 4, 6])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"space": {"sigmaa": {"low": 1e-4, "high": 1e-2}}},
            "space.sigmaa: unknown setting; did you mean sigma?",
        ),
        (
            {"space": {"learning_rate": {"low": 1e-6, "high": 1e-4}}},
            "a GRPO setting, but the sweep's method is es",
        ),
        ({"space": {"shaping": {"low": 0, "high": 1}}}, "shaping takes a string, not a range of numbers"),
        (
            {"space": {"population": {"low": 2.5, "high": 8}}},
            "population takes an integer, so low must be one",
        ),
        ({"space": {"population": {"choices": ["big"]}}}, "choice 'big' is not an integer"),
        ({"space": {"sigma": {"low": 1e-2, "high": 1e-3}}}, "low must be below high"),
        ({"space": {"sigma": {"low": 0.0, "high": 1e-2, "log": True}}}, "a log range needs low > 0"),
        ({"space": {"population": {"choices": []}}}, "choices must be a non-empty list"),
        ({"space": {"population": {"choices": [1, 4]}}}, "population must be an integer >= 2, got 1"),
        ({"space": {"eval_every": {"choices": [1, 2]}}}, "space.eval_every cannot be searched"),
        ({"space": {"workers": {"choices": [1, 2]}}}, "space.workers cannot be searched"),
        ({"space": {"freeze": {"choices": ["*embed*"]}}}, "space.freeze cannot be searched"),
        ({"space": {"sigma": 1e-3}}, "a fixed value belongs in base"),
        ({"space": {"sigma": {"low": 1e-3, "hi": 1e-2}}}, "unknown key 'hi'; did you mean high"),
        ({"space": {"sigma": {"low": 1e-3, "high": 1e-2}, "alpha": {"expr": "sgma / 2"}}}, "names sgma"),
        (
            {"space": {"sigma": {"low": 1e-3, "high": 1e-2}, "alpha": {"expr": "sigma //"}}},
            "not an arithmetic",
        ),
        (
            {"space": {"sigma": {"low": 1e-3, "high": 1e-2}, "alpha": {"expr": "__import__('os')"}}},
            "only + - *",
        ),
        (
            {"space": {"sigma": {"low": 1e-3, "high": 1e-2}, "alpha": {"expr": "sigma - 1"}}},
            "alpha must be a number > 0",
        ),
        ({"n_trial": 3}, "unknown key 'n_trial'; did you mean n_trials?"),
        ({"n_trials": 0}, "n_trials must be an integer >= 1"),
        ({"sampler": {"name": "tpe", "n_startup": 3}}, "did you mean n_startup_trials?"),
        ({"pruner": "medain"}, "unknown pruner 'medain'; did you mean median?"),
        ({"sampler": "grid"}, "the grid sampler needs choices or a step"),
        ({"objective": {"metric": "train/reward"}}, "the objective is a periodic-evaluation scalar"),
        ({"base": {"eval_split": "both"}, "objective": "eval/reward"}, "name one"),
        ({"base": {"eval_every": 0}}, "base.eval_every must be >= 1"),
        ({"base": {"output": "x"}}, "base.output: the sweep gives every trial its own run folder"),
        ({"base": {"group_size": 4}}, "base.group_size: a GRPO setting"),
        ({"method": "ppo"}, "method must be es or grpo"),
        ({"enqueue": [{"sigma": 1.0}]}, "enqueue[0].sigma: 1.0 is outside the space"),
    ],
)
def test_a_bad_sweep_file_is_a_one_line_error(tiny_model, change, message):
    with pytest.raises(ConfigError) as e:
        parse_spec(sweep_data(tiny_model, **change))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_command_prints_a_bad_space_in_one_line(tiny_model, tmp_path, capsys):
    bad = write(tmp_path / "bad.yaml", sweep_data(tiny_model, space={"sigma": {"low": 1e-2, "high": 1e-3}}))
    assert main(["sweep", "--config", str(bad), "--output", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("esft: error: space.sigma: low must be below high") and "\n" not in err
    assert not (tmp_path / "s" / layout.SPEC_FILE).exists()
    assert main(["sweep", "--output", str(tmp_path / "none"), "--resume"]) == 2
    assert "holds no sweep" in capsys.readouterr().err


# -- a sweep ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def es_sweep(tiny_model, tmp_path_factory) -> Path:
    """Three ES trials of two iterations, one after another in the test's process."""
    tmp = tmp_path_factory.mktemp("sweep")
    config = write(tmp / "sweep.yaml", sweep_data(tiny_model))
    assert main(["sweep", "--config", str(config), "--output", str(tmp / "s")]) == 0
    return tmp / "s"


def test_trials_are_run_folders_that_replay_and_analyze_accept(es_sweep, capsys):
    done = trials(es_sweep)
    assert [t.state.name for t in done] == ["COMPLETE"] * 3
    for t in done:
        run = es_sweep / t.user_attrs["run_dir"]
        assert run == layout.trial_dir(es_sweep, t.number)
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["sigma"] == t.params["sigma"] and config["population"] == t.params["population"]
        assert config["alpha"] == pytest.approx(t.params["sigma"] / 2) == t.user_attrs["derived"]["alpha"]
        evals = rows(run / "eval.jsonl")
        assert [e["iteration"] for e in evals] == [0, 1, 2]
        assert t.intermediate_values == {1: evals[1]["reward"], 2: evals[2]["reward"]}  # not iteration 0
        assert t.value == evals[-1]["reward"]
    run = str(es_sweep / done[0].user_attrs["run_dir"])
    assert main(["replay", "--run", run, "--iteration", "2", "--quiet"]) == 0
    assert "bit-identical" in capsys.readouterr().out
    assert main(["analyze", "weights", run]) == 0
    saved = yaml.safe_load((es_sweep / layout.SPEC_FILE).read_text())
    assert saved["objective"] == {"metric": "eval/reward", "direction": "maximize"}


def test_the_sweep_prints_a_line_per_trial_and_the_best_trials(tiny_model, es_sweep, capsys):
    # the fixture's output is gone; run a fourth trial on the same sweep and look at that
    assert main(["sweep", "--output", str(es_sweep), "--resume", "--n-trials", "4"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "3 of 4 trials finished" in out
    assert "trial   3 (4/4) COMPLETE eval/reward" in out and "best 4 trial(s):" in out
    assert f"esft report {es_sweep}" in out
    assert len(trials(es_sweep)) == 4


def test_esft_report_over_a_sweep(es_sweep, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(es_sweep), "--output", str(out), "--best", "2"]) == 0
    printed = capsys.readouterr().out
    assert "esft report: sweep s (" in printed and "importance:" in printed
    report = json.loads((out / "report.json").read_text())
    (sweep,) = report["sweeps"]
    assert sweep["metric"] == "eval/reward" and sweep["states"]["COMPLETE"] >= 3
    values = [b["value"] for b in sweep["best"]]
    assert values == sorted(values, reverse=True)
    assert set(sweep["importance"]) == {"sigma", "population"}
    assert sum(sweep["importance"].values()) == pytest.approx(1.0)
    names = {p["name"] for p in sweep["plots"]}
    assert names == {f"sweep-s-{k}" for k in ("history", "importance", "params", "intermediate")}
    assert all((out / f"{n}.png").stat().st_size > 1000 for n in names)
    # the two best trials join the report as runs (training curves, configs)
    assert len(report["runs"]) == 2 and (out / "training_curves.png").is_file()
    page = (out / "report.html").read_text()
    best = sweep["best"][0]["trial"]
    assert "Best trials" in page and "Parameter importance" in page
    link = os.path.relpath(es_sweep / "trials" / f"trial-{best:04d}", out)
    assert f'href="{link}/"' in page


def test_a_pruned_trial_stops_at_the_evaluation_that_pruned_it(tiny_model, tmp_path):
    # rewards are <= 0, so a threshold pruner with lower 1 prunes every trial at its first evaluation
    data = sweep_data(
        tiny_model, base={"iterations": 3}, n_trials=2, pruner={"name": "threshold", "lower": 1}
    )
    assert (
        main(["sweep", "--config", str(write(tmp_path / "p.yaml", data)), "--output", str(tmp_path / "s")])
        == 0
    )
    for t in trials(tmp_path / "s"):
        run = tmp_path / "s" / t.user_attrs["run_dir"]
        assert t.state.name == "PRUNED" and list(t.intermediate_values) == [1]
        assert t.value == t.intermediate_values[1]  # Optuna's convention: the last reported value
        assert [m["iteration"] for m in rows(run / "metrics.jsonl")] == [1]  # no iteration after it
        assert [e["iteration"] for e in rows(run / "eval.jsonl")] == [0, 1]
        assert (run / "checkpoints" / "iter-000001").is_dir()  # ended as a run stopped early ends


def test_resume_reruns_interrupted_trials_and_keeps_finished_ones(tiny_model, tmp_path, monkeypatch, capsys):
    root = tmp_path / "s"
    config = write(tmp_path / "r.yaml", sweep_data(tiny_model))
    calls = []
    real = sweep_objective.train_run

    def interrupt_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_objective, "train_run", interrupt_the_second)
    assert main(["sweep", "--config", str(config), "--output", str(root)]) == 130
    assert f"esft sweep --output {root} --resume" in capsys.readouterr().err
    monkeypatch.setattr(sweep_objective, "train_run", real)
    first = (root / "trials" / "trial-0000" / "metrics.jsonl").read_bytes()
    # a trial a killed parallel sweep left behind: RUNNING in the storage
    spec = parse_spec(layout.read_spec(root))
    layout.load_study(root).ask(spec.distributions)
    before = trials(root)
    assert [t.state.name for t in before] == ["COMPLETE", "FAIL", "RUNNING"]

    with pytest.raises(ConfigError, match="already holds a sweep"):
        driver.run_sweep(spec, root)
    assert main(["sweep", "--output", str(root), "--resume"]) == 0
    after = trials(root)
    assert [t.state.name for t in after] == ["COMPLETE", "FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    assert after[2].user_attrs["error"].startswith("interrupted")
    for retry, failed in ((after[3], before[1]), (after[4], before[2])):  # same parameters, in order
        assert retry.params == failed.params
        assert retry.system_attrs["retry_history"] == [failed.number]
        assert "error" not in retry.user_attrs
    assert (root / "trials" / "trial-0000" / "metrics.jsonl").read_bytes() == first  # not run again
    assert driver.counted(after) == 3
    assert main(["sweep", "--output", str(root), "--resume"]) == 0  # done: nothing more runs
    assert len(trials(root)) == 5


def test_timeout_starts_no_trial_after_it_and_resume_goes_on(tiny_model, tmp_path, capsys, monkeypatch):
    """As Optuna's optimize(timeout=): a trial that outlasts 0.5 s (made to take at least 0.6 s here) means
    no second one starts; the sweep says how to continue, and --resume runs the rest."""
    real = sweep_objective.train_run

    def slow(*args, **kwargs):
        time.sleep(0.6)
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_objective, "train_run", slow)
    root = tmp_path / "s"
    config = write(tmp_path / "t.yaml", sweep_data(tiny_model))
    assert main(["sweep", "--config", str(config), "--output", str(root), "--timeout", "0.5"]) == 0
    assert [t.state.name for t in trials(root)] == ["COMPLETE"]
    out = capsys.readouterr().out
    assert "1 of 3 trials finished" in out and f"esft sweep --output {root} --resume" in out
    assert main(["sweep", "--output", str(root), "--resume", "--timeout", "3600"]) == 0
    assert [t.state.name for t in trials(root)] == ["COMPLETE"] * 3
    assert "--timeout reached" not in capsys.readouterr().out
    assert main(["sweep", "--output", str(root), "--resume", "--timeout", "0"]) == 2
    assert "--timeout must be a number of seconds > 0" in capsys.readouterr().err


def test_a_grid_sweep_runs_every_point_and_ends_cleanly(tiny_model, tmp_path, capsys):
    """Optuna's GridSampler stops the study (study.stop) once its grid is used up, which raises outside
    study.optimize; esft's driver asks and tells, so its grid sampler leaves stopping to the driver."""
    root = tmp_path / "g"
    space = {"sigma": {"choices": [0.01, 0.02]}, "alpha": {"expr": "sigma / 2"}}
    config = write(tmp_path / "g.yaml", sweep_data(tiny_model, space=space, sampler="grid", n_trials=None))
    assert main(["sweep", "--config", str(config), "--output", str(root)]) == 0
    done = trials(root)
    assert [t.state.name for t in done] == ["COMPLETE", "COMPLETE"]
    assert sorted(t.params["sigma"] for t in done) == [0.01, 0.02]
    assert "2 of 2 trials finished" in capsys.readouterr().out
    assert main(["sweep", "--output", str(root), "--resume"]) == 0  # nothing left: ends at once
    assert len(trials(root)) == 2


def test_a_failed_trial_stops_the_sweep_unless_catch(tiny_model, tmp_path, monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(sweep_objective, "train_run", boom)
    config = write(tmp_path / "f.yaml", sweep_data(tiny_model, n_trials=2))
    assert main(["sweep", "--config", str(config), "--output", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("esft: error: trial 0 failed: RuntimeError: boom;") and "--resume" in err
    assert "\n" not in err and [t.state.name for t in trials(tmp_path / "s")] == ["FAIL"]
    # catch: true records the failure and goes on, as Optuna's optimize(catch=...) does
    config = write(tmp_path / "c.yaml", sweep_data(tiny_model, n_trials=2, catch=True))
    assert main(["sweep", "--config", str(config), "--output", str(tmp_path / "c")]) == 0
    assert [t.user_attrs["error"] for t in trials(tmp_path / "c")] == ["RuntimeError: boom"] * 2
    assert "no trial has completed yet" in capsys.readouterr().out


def test_an_objective_metric_the_evaluation_lacks_fails_at_once(tiny_model, tmp_path, capsys):
    data = sweep_data(tiny_model, n_trials=1, objective={"metric": "eval/accuracy"})
    assert (
        main(["sweep", "--config", str(write(tmp_path / "m.yaml", data)), "--output", str(tmp_path / "s")])
        == 2
    )
    err = capsys.readouterr().err
    assert "objective metric eval/accuracy is not a scalar of the periodic evaluation" in err
    assert "eval/reward" in err
    (t,) = trials(tmp_path / "s")
    run = tmp_path / "s" / t.user_attrs["run_dir"]
    assert not (run / "metrics.jsonl").exists()  # at the evaluation before training


def test_parallel_trials_run_in_processes_of_their_own(tiny_model, tmp_path):
    data = sweep_data(tiny_model, base={"iterations": 1}, n_trials=2)
    config = write(tmp_path / "p.yaml", data)
    assert main(["sweep", "--config", str(config), "--output", str(tmp_path / "s"), "--parallel", "2"]) == 0
    done = trials(tmp_path / "s")
    assert [t.state.name for t in done] == ["COMPLETE", "COMPLETE"]
    threads = max(1, driver.usable_cpus() // 2)
    for t in done:
        assert t.user_attrs["threads"] == threads and t.user_attrs["start_seconds"] > 0
        env = json.loads((tmp_path / "s" / t.user_attrs["run_dir"] / "environment.json").read_text())
        assert env["cpu_threads"] == threads
        assert layout.log_path(tmp_path / "s", t.number).is_file()


def test_a_grpo_sweep_over_learning_rate_and_beta(tiny_model, tmp_path):
    import_or_skip("trl", "install esft with the dev (or grpo) extra", "pip install -e '.[grpo]'")
    data = {
        "method": "grpo",
        "base": {**BASE, "model": str(tiny_model), "group_size": 2, "iterations": 2},
        "space": {
            "learning_rate": {"low": 1e-5, "high": 1e-3, "log": True},
            "beta": {"choices": [0.0, 0.04]},
        },
        "n_trials": 1,
    }
    config = write(tmp_path / "g.yaml", data)
    assert main(["sweep", "--config", str(config), "--output", str(tmp_path / "s")]) == 0
    (t,) = trials(tmp_path / "s")
    run = tmp_path / "s" / t.user_attrs["run_dir"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert t.state.name == "COMPLETE" and saved["trainer"] == "grpo"
    assert saved["learning_rate"] == t.params["learning_rate"] and saved["beta"] == t.params["beta"]
    assert t.intermediate_values.keys() == {1, 2}


def test_trials_as_ray_tasks(tiny_model, tmp_path):
    if importlib.util.find_spec("ray") is None:
        missing_dependency("ray", ".ci/run must pip install -e '.[ray]'", "pip install -e '.[ray]'")
    data = sweep_data(tiny_model, base={"iterations": 1}, n_trials=2)
    config = write(tmp_path / "ray.yaml", data)
    args = ["sweep", "--config", str(config), "--output", str(tmp_path / "s"), "--ray", "--parallel", "2"]
    assert main(args) == 0
    done = trials(tmp_path / "s")
    assert [t.state.name for t in done] == ["COMPLETE", "COMPLETE"]
    assert all(
        (tmp_path / "s" / t.user_attrs["run_dir"] / "checkpoints" / "iter-000001").is_dir() for t in done
    )
