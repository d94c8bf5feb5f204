"""benchmarks/conciseness_study.py's records: a finished run's analysis kept apart from its folder, so a
study continued on another machine keeps every finished run, with the CPU each ran on."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from esft.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(
            "conciseness_study", ROOT / "benchmarks" / "conciseness_study.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_cpu_tag(study):
    assert study.cpu_tag("AMD EPYC [avx512f avx512_bf16]") == "avx512_bf16-amd"
    assert study.cpu_tag("Intel(R) Xeon(R) Processor [avx512f avx512_bf16 amx_bf16]") == "amx-intel"
    assert study.cpu_tag("Intel(R) Core(TM) [none of avx512f avx512_bf16 amx_bf16]") == "other-intel"
    assert study.cpu_tag("unknown") == "other-cpu"


def fake_run(root: Path, name: str, cpu: str, final: list[str], reward: float) -> Path:
    """A finished run folder as the trainers leave it: what the analysis reads, KL already computed."""
    run = root / "runs" / name
    (run / "analysis").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "config.yaml").write_text(
        yaml.safe_dump({"task": "conciseness", "task_options": {"prompt_format": "chat"}})
    )
    env = {"cpu": cpu, "torch": "2.13.0", "esft": "0.1.0 (git 0123456789ab)"}
    (run / "environment.json").write_text(json.dumps(env))
    metrics = [{"iteration": i, "samples": 60 * (i + 1), "perf/seconds": 10.0, "perf/peak_rss_mb": 2000.0 + i}
               for i in range(100)]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    n = len(load_task("conciseness", prompt_format="chat").split("test"))
    evals = [
        {"iteration": 0, "split": "test", "reward": -36.5, "examples": [{"completion": "x"}] * n},
        {"iteration": 0, "split": "train", "reward": -71.5},
        {"iteration": 100, "split": "test", "reward": reward, "examples": [{"completion": c} for c in final]},
        {"iteration": 100, "split": "train", "reward": -14.0},
    ]
    (run / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    (run / "analysis" / "kl-test.json").write_text(
        json.dumps({"tasks": {"conciseness": {"per_token_k3": 0.05}}})
    )
    return run


def test_record_and_read_back(study, tmp_path):
    rows = load_task("conciseness", prompt_format="chat").split("test")
    right = [f"It is {r['answer']}." for r in rows]
    wrong = ["no idea"] * len(rows)
    epyc = fake_run(tmp_path / "a", "es-s0.001-seed1", "AMD EPYC [avx512f avx512_bf16]", right, -20.0)
    xeon = fake_run(tmp_path / "b", "es-s0.001-seed1", "Intel Xeon [avx512_bf16 amx_bf16]", wrong, -30.0)
    records = tmp_path / "records"
    study.record(epyc, records)
    study.record(xeon, records)
    # the same run on two CPUs: two records, each with its own CPU and numbers
    assert sorted(p.name for p in records.iterdir()) == [
        "es-s0.001-seed1.amx-intel.json",
        "es-s0.001-seed1.avx512_bf16-amd.json",
    ]
    found = {r["cpu"]: r for r in study.recorded(records)}
    a, b = found["AMD EPYC [avx512f avx512_bf16]"], found["Intel Xeon [avx512_bf16 amx_bf16]"]
    assert (a["heldout"], b["heldout"]) == (-20.0, -30.0)
    assert math.isclose(a["heldout_normalised"], 1 - 20 / 2000)
    assert (a["answers_kept"], b["answers_kept"]) == (1.0, 0.0)
    assert a["heldout_by_eval"] == {"0": -36.5, "100": -20.0}
    assert (
        a["kl"] == 0.05
        and a["samples"] == 6000
        and a["train_seconds"] == 1000.0
        and a["peak_rss_mb"] == 2099.0
        and a["esft"] == "0.1.0 (git 0123456789ab)"  # the code that ran it
    )
    # the run folder may go: the analysis reads the records alone
    for run in (epyc, xeon):
        for f in sorted(run.rglob("*"), reverse=True):
            f.rmdir() if f.is_dir() else f.unlink()
    assert len(study.recorded(records)) == 2


def test_unknown_configuration_is_one_line(study, tmp_path, monkeypatch):
    argv = ["conciseness_study.py", "--out", str(tmp_path), "--stage", "main", "--grpo-lr", "3e-6"]
    monkeypatch.setattr(sys, "argv", [*argv, "--only", "es-s1e-3"])
    with pytest.raises(SystemExit) as caught:
        study.main()
    message = str(caught.value)
    assert message.startswith("--only es-s1e-3: not a configuration") and "es-s0.001" in message
    assert "grpo-b0.0167" in message and "\n" not in message
    assert not (tmp_path / "runs").exists()  # nothing started


def test_summary_names_the_cpus_of_each_configuration(study, tmp_path, capsys):
    rows = load_task("conciseness", prompt_format="chat").split("test")
    right = [f"It is {r['answer']}." for r in rows]
    epyc = fake_run(tmp_path / "a", "es-s0.001-seed1", "AMD EPYC [avx512f avx512_bf16]", right, -20.0)
    xeon = fake_run(tmp_path / "b", "es-s0.001-seed0", "Intel Xeon [avx512_bf16 amx_bf16]", right, -30.0)
    records = tmp_path / "records"
    runs = [json.loads(study.record(r, records).read_text()) for r in (epyc, xeon)]
    study.summarise(tmp_path, {"es-s0.001": runs}, {})
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| es-s0.001 |")]
    assert rows[0].startswith("| es-s0.001 | 2 | amx-intel, avx512_bf16-amd | 6000 | -25 ± 7.1 |")
    # beside the paper's row for the same setting: its reward and KL, then this study's (0.9875 ± 0.0035
    # normalised), and each one's sd over the mean distance from the best reward (0.004 / 0.111; 0.0035 / 0.0125)
    assert (
        rows[1]
        == "| es-s0.001 | 0.889 ± 0.004 | 0.274 ± 0.096 | no | 0.9875 ± 0.0035 | 0.05 ± 0 | 0.036 / 0.28 |"
    )
    assert (tmp_path / "pareto.png").read_bytes().startswith(b"\x89PNG")  # the reward-KL plot beside it
    assert json.loads((tmp_path / "summary.json").read_text())["configs"]["es-s0.001"]["cpus"] == [
        "amx-intel",
        "avx512_bf16-amd",
    ]


@pytest.mark.parametrize(
    ("trainer", "files", "resumed"),
    [
        ("grpo", [], False),  # config and first evaluation written, no step finished
        ("grpo", ["metrics.jsonl"], False),  # steps logged, no TRL checkpoint yet
        ("grpo", ["metrics.jsonl", "trl/checkpoint-10/trainer_state.json"], True),
        ("es", [], False),
        ("es", ["metrics.jsonl"], True),  # ES replays its seed log
    ],
)
def test_a_stopped_run_resumes_or_starts_again(study, tmp_path, monkeypatch, trainer, files, resumed):
    run = tmp_path / "runs" / "x-seed0"
    (run).mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "eval.jsonl").write_text("{}\n")
    for name in files:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text('{"samples": 0}\n')
    calls = []
    monkeypatch.setattr(study, "esft", lambda *args: calls.append(args) or 0)
    study.train(tmp_path, "x", trainer, {}, seed=0, budget=60)
    (args,) = calls
    assert ("--resume" in args) == resumed
    stale = list((tmp_path / "runs").glob("x-seed0.stopped-*"))
    if resumed:
        assert not stale and (run / "config.yaml").is_file()
    else:  # the attempt is kept beside the fresh start, and nothing is left in the run's folder
        assert len(stale) == 1 and (stale[0] / "config.yaml").is_file() and not run.exists()
