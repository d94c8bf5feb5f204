"""esft report: plots and the HTML page from synthetic run folders (CPU, no training).

Four run folders (2 ES seeds, 2 GRPO seeds) get config.yaml, metrics.jsonl and eval.jsonl written by
hand in the trainers' formats, and checkpoints that are the tiny model with known random deltas; the
analysis JSON comes from the real ``esft analyze`` code on those checkpoints, so the report reads
exactly what the analyses write. The page is then loaded in headless Chromium.
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import missing_dependency

if importlib.util.find_spec("matplotlib") is None:  # the report's one extra dependency
    missing_dependency(
        "matplotlib",
        "install esft with the dev (or report) extra",
        "pip install -e '.[report]'",
        module_level=True,
    )

from PIL import Image  # Pillow comes with matplotlib

from esft.errors import ConfigError
from esft.report import cli as report_cli
from esft.report.collect import analysis_kind, group_runs, load_runs
from esft.report.plots import pareto_front, seed_band
from esft.runstore import RunStore

ITERS = 20
PER_ITER = 8  # samples per iteration: ES 4 members x 2 prompts, GRPO 2 prompts x group of 4
CHECKPOINTS = (10, 20)
ALL_PLOTS = {"training_curves", "reward_vs_kl", "norm_growth", "layer_sparsity", "interpolation"}
ALL_PLOTS |= {"forgetting", "sequential", "pass_at_k", "cosine"}


def shared_config(path: Path, base: Path, seed: int) -> dict:
    """The settings both trainers write (RunConfig.to_dict() plus model_path), for a tiny run."""
    return {
        "model": str(base),
        "task": "conciseness",
        "task_options": {},
        "reward": None,
        "reward_weights": None,
        "iterations": ITERS,
        "budget_samples": 0,
        "seed": seed,
        "max_new_tokens": 6,
        "prompts_per_iteration": 2,
        "freeze": [],
        "fixed_length": False,
        "dtype": "float32",
        "device": "cpu",
        "batch_size": 64,
        "output": str(path),
        "checkpoint_every": 10,
        "keep_checkpoints": 3,
        "pin_checkpoints": [],
        "eval_every": 10,
        "eval_limit": 0,
        "eval_split": "both",
    }


def es_config(path: Path, base: Path, seed: int) -> dict:
    return {"trainer": "es", **shared_config(path, base, seed)} | {
        "population": 4,
        "sigma": 1e-3,
        "alpha": 1e-3,
        "antithetic": False,
        "shaping": "zscore",
        "noise": "independent",
        "rank": 1,
        "engine": "hf",
        "stop_when_flat": 0,
        "model_path": str(base),
    }


def grpo_config(path: Path, base: Path, seed: int) -> dict:
    return {"trainer": "grpo", **shared_config(path, base, seed)} | {
        "group_size": 4,
        "learning_rate": 1e-6,
        "beta": 0.04,
        "loss_type": "dapo",
        "scale_rewards": "group",
        "temperature": 1.0,
        "micro_batch_size": 0,
        "gradient_checkpointing": True,
        "model_path": str(base),
    }


def reward_curve(trainer: str, seed: int, t: int) -> float:
    """A noisy learning curve: ES climbs from -40 to about -15, GRPO to about -22."""
    gain, scale = (25.0, 8.0) if trainer == "es" else (18.0, 6.0)
    return -40.0 + gain * (1 - math.exp(-t / scale)) + 3.0 * math.sin(1.7 * t + 2.3 * seed)


def write_logs(store: RunStore, trainer: str, seed: int) -> None:
    for t in range(1, ITERS + 1):
        row = {
            "iteration": t,
            "samples": PER_ITER * t,
            "tokens": PER_ITER * t * 5,
            "train/reward_mean": reward_curve(trainer, seed, t),
            "train/reward/conciseness": reward_curve(trainer, seed, t),
            "train/completion_tokens": 5.0,
            "perf/seconds": 2.0 + 0.1 * seed if trainer == "es" else 5.0,
            "perf/samples_per_second": PER_ITER / (2.0 + 0.1 * seed) if trainer == "es" else PER_ITER / 5.0,
            "perf/peak_rss_mb": 1500.0 + t if trainer == "es" else 4200.0 + t,
        }
        if trainer == "es":
            row |= {"es/update_norm": 0.01, "es/update_ratio": 1e-4, "member_rewards": [-30.0, -20.0]}
            store.append_seedlog(
                {"iteration": t, "members": [[s, 1] for s in range(4)], "weights": [1.0, -1.0, 1.0, -1.0]}
                | {"alpha": 1e-3}
            )
        else:
            row |= {"grpo/loss": 0.01, "grpo/kl": 1e-3 * t, "grpo/grad_norm": 0.5}
        store.append_metrics(row)
    for t in (0, *CHECKPOINTS):
        for split in ("train", "test"):
            reward = reward_curve(trainer, seed, t) + (2.0 if split == "test" else 0.0)
            store.append_eval(
                {"iteration": t, "split": split, "reward": reward, "reward/conciseness": reward}
                | {
                    "completion_tokens": 5.0,
                    "examples": [{"prompt": "p", "completion": "c", "reward": reward}],
                }
            )


def delta_model(base: Path, dest: Path, seed: int, scale: float) -> Path:
    """The tiny model plus a seeded Gaussian delta of ``scale`` on every matrix of layer 1 and the MLP of
    layer 0 (the embedding, norms and the rest untouched: sparse per layer)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, dest)
    tensors = load_file(base / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    for name, x in tensors.items():
        if x.ndim == 2 and ("layers.1." in name or "layers.0.mlp" in name):
            tensors[name] = x + torch.randn(x.shape, generator=gen) * scale
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def make_run(
    root: Path, name: str, base: Path, trainer: str, seed: int, checkpoints: dict[int, Path]
) -> Path:
    path = root / name
    store = RunStore(path)
    config = (es_config if trainer == "es" else grpo_config)(path, base, seed)
    store.write_config(config)
    write_logs(store, trainer, seed)
    for it, folder in checkpoints.items():
        store.save_checkpoint(
            it, lambda tmp, f=folder: [shutil.copy2(x, tmp / x.name) for x in f.iterdir()], {}
        )
    return path


def analyze(*argv: str) -> None:
    from esft.analysis import cli as analysis_cli

    parser = argparse.ArgumentParser(prog="esft")
    analysis_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    assert analysis_cli.run(parser.parse_args(["analyze", *argv, "--quiet"])) == 0


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="esft")
    report_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["report", *argv])


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """es-s0, es-s1, grpo-s0, grpo-s1 with checkpoints at 10 and 20, and analyses of most of them."""
    root = tmp_path_factory.mktemp("report")
    models = root / "models"
    models.mkdir()
    out: dict[str, Path] = {"root": root}
    for k, (trainer, seed) in enumerate([("es", 0), ("es", 1), ("grpo", 0), ("grpo", 1)]):
        name = f"{trainer}-s{seed}"
        ckpts = {
            it: delta_model(
                tiny_model, models / f"{name}-{it}", 10 * k + i, (0.05 if trainer == "es" else 0.08) * (i + 1)
            )
            for i, it in enumerate(CHECKPOINTS)
        }
        out[name] = make_run(root, name, tiny_model, trainer, seed, ckpts)
    es0, es1, grpo0, grpo1 = (str(out[n]) for n in ("es-s0", "es-s1", "grpo-s0", "grpo-s1"))
    for run in (es0, es1, grpo0):
        analyze("weights", run)
    analyze("weights", f"{es0}@10")
    for run in (es0, es1, grpo0):
        analyze("growth", run)
    for spec in (es0, f"{es0}@10", es1, grpo0):
        analyze("kl", spec, "--limit", "2")
    # GRPO's KL written elsewhere: the report reads it through --analysis
    analyze("kl", grpo1, "--limit", "2", "--json", str(root / "extra-kl-grpo1.json"))
    analyze("interpolate", es0, "--points", "3", "--range", "-0.5", "1.5", "--limit", "2")
    analyze("interpolate", grpo0, "--points", "3", "--range", "-0.5", "1.5", "--limit", "2")
    tasks = ["--tasks", "conciseness", "countdown", "--limit", "2", "--max-new-tokens", "6"]
    analyze("forgetting", es0, *tasks)
    analyze("forgetting", grpo0, *tasks)
    analyze("sequential", es0, grpo0, *tasks)
    analyze("passk", f"{es0}@0", es0, grpo0, "--samples", "4", "--limit", "2", "--correct-reward", "-25")
    analyze("cosine", es0, grpo0)
    return out


@pytest.fixture(scope="module")
def report(runs) -> dict:
    root = runs["root"]
    out = root / "out"
    specs = [str(runs[n]) for n in ("es-s0", "es-s1", "grpo-s0", "grpo-s1")]
    args = parse(
        [
            *specs,
            "--output",
            str(out),
            "--analysis",
            str(root / "extra-kl-grpo1.json"),
            "--title",
            "ES vs GRPO",
        ]
    )
    assert report_cli.run(args) == 0
    return json.loads((out / "report.json").read_text()) | {"out": out}


# -- unit ------------------------------------------------------------------------------------------


def test_seed_band_and_pareto_front():
    x, mean, lo, hi = seed_band([([0, 1, 2], [0.0, 1.0, 2.0]), ([0, 2, 4], [2.0, 4.0, 6.0])])
    assert list(x) == [0, 1, 2]  # only where every seed has data
    assert list(mean) == [1.0, 2.0, 3.0] and list(lo) == [0.0, 1.0, 2.0] and list(hi) == [2.0, 3.0, 4.0]
    assert seed_band([([0, 1], [0, 1]), ([5, 6], [0, 1])]) is None
    # (kl, reward): (0.2, 1) is beaten by (0.1, 2); (0.3, 3) is on the front
    assert pareto_front([(0.0, 0.0), (0.2, 1.0), (0.1, 2.0), (0.3, 3.0), (0.3, 2.5)]) == [0, 2, 3]


def test_groups_split_by_settings_not_by_seed(runs, tmp_path):
    groups = group_runs(load_runs([str(runs[n]) for n in ("es-s0", "es-s1", "grpo-s0", "grpo-s1")]))
    assert [[r.name for r in g.runs] for g in groups] == [["es-s0", "es-s1"], ["grpo-s0", "grpo-s1"]]
    assert groups[0].label == "ES conciseness (2 seeds)"
    # another sigma is another group, labelled by what differs
    other = tmp_path / "es-sigma"
    shutil.copytree(runs["es-s1"], other, ignore=shutil.ignore_patterns("checkpoints", "analysis"))
    store = RunStore(other)
    store.write_config(store.read_config() | {"sigma": 0.01})
    groups = group_runs(load_runs([str(runs["es-s0"]), str(runs["es-s1"]), str(other)]))
    assert [g.label for g in groups] == [
        "ES conciseness sigma=0.001 (2 seeds)",
        "ES conciseness sigma=0.01 (1 seed)",
    ]


def test_analysis_files_are_recognised(runs):
    for path in sorted((runs["es-s0"] / "analysis").glob("*.json")):
        kind = analysis_kind(path, json.loads(path.read_text()))
        assert kind is not None and path.name.startswith(kind), path.name


def test_errors_are_one_line(runs, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a run folder") as e:
        report_cli.run(parse([str(tmp_path / "empty"), "--output", str(tmp_path / "o")]))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        report_cli.run(parse([str(tmp_path / "nope"), "--output", str(tmp_path / "o")]))
    with pytest.raises(ConfigError, match="no runs"):
        report_cli.build_report([], tmp_path / "o")
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(ConfigError, match="not a JSON file written by esft analyze"):
        report_cli.run(parse([str(runs["es-s0"]), "--output", str(tmp_path / "o"), "--analysis", str(bad)]))
    with pytest.raises(SystemExit):  # argparse: RUN and --output are required
        parse(["--output", str(tmp_path / "o")])


# -- the report ------------------------------------------------------------------------------------


def test_every_plot_is_a_real_png(report):
    out = report["out"]
    assert {p["name"] for p in report["plots"]} == ALL_PLOTS
    for p in report["plots"]:
        png = Path(p["png"])
        assert png.parent == out and png.name == f"{p['name']}.png"
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            rgb = im.convert("RGB")
            assert rgb.width >= 500 and rgb.height >= 200
            colors = rgb.getcolors(maxcolors=1 << 20)
            assert colors is not None and len(colors) > 50, f"{png.name} looks empty"
            # something other than the white background covers a fair share of the figure
            white = max(c for c, rgb_ in colors if rgb_ == (255, 255, 255))
            assert white < 0.97 * rgb.width * rgb.height, png.name
        assert p["sources"] and all(Path(s).is_file() for s in p["sources"])


def test_seeds_are_grouped_into_one_band_per_group(report):
    curves = next(p for p in report["plots"] if p["name"] == "training_curves")["details"]
    assert [(d["group"], d["runs"], d["band"]) for d in curves["train"]] == [
        ("ES conciseness (2 seeds)", ["es-s0", "es-s1"], True),
        ("GRPO conciseness (2 seeds)", ["grpo-s0", "grpo-s1"], True),
    ]
    assert curves["bands"] == 2
    assert [d["points"] for d in curves["train"]] == [ITERS, ITERS]
    assert [d["points"] for d in curves["eval"]] == [3, 3]  # iterations 0, 10, 20 -> samples 0, 80, 160


def test_reward_vs_kl_points_and_front(report, runs):
    details = next(p for p in report["plots"] if p["name"] == "reward_vs_kl")["details"]
    points = {p["label"]: p for p in details["points"]}
    assert set(points) == {
        "es-s0@20",
        "es-s0@10",
        "es-s1@20",
        "grpo-s0@20",
        "grpo-s1@20",
        "base (conciseness)",
    }
    assert points["grpo-s1@20"]["trainer"] == "grpo"  # read through --analysis
    assert points["base (conciseness)"]["k3"] == 0.0
    evals = {r["iteration"]: r["reward"] for r in RunStore(runs["es-s0"]).evals() if r["split"] == "test"}
    assert points["es-s0@10"]["reward"] == evals[10] and points["es-s0@20"]["reward"] == evals[20]
    assert "base (conciseness)" in details["front"]["k3"]  # KL 0: nothing has lower KL


def test_runs_sharing_a_folder_name_keep_their_own_kl_points(runs, tmp_path):
    """Two runs named es-s0 (say, one per task): each KL analysis in a run's analysis/ folder belongs to
    that run, and the points are labelled by the runs' unique names on the page."""
    twin = tmp_path / "other-task" / "es-s0"
    shutil.copytree(runs["es-s0"], twin)
    rows = [json.loads(line) for line in (twin / "eval.jsonl").read_text().splitlines()]
    for r in rows:
        r["reward"] = float(r["reward"]) - 100.0  # told apart from the original's points
    (twin / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert report_cli.run(parse([str(runs["es-s0"]), str(twin), "--output", str(out)])) == 0
    details = next(
        p for p in json.loads((out / "report.json").read_text())["plots"] if p["name"] == "reward_vs_kl"
    )["details"]
    mine = {p["label"]: p for p in details["points"] if p["trainer"] != "base"}
    assert {f"{runs['es-s0']}@20", f"{twin}@20", f"{runs['es-s0']}@10", f"{twin}@10"} == set(mine)
    assert mine[f"{twin}@20"]["reward"] == mine[f"{runs['es-s0']}@20"]["reward"] - 100.0
    assert mine[f"{twin}@20"]["file"].startswith(str(twin))


def test_page_is_self_contained_with_every_plot_and_the_configs(report):
    page = (report["out"] / "report.html").read_text()
    assert "<title>ES vs GRPO</title>" in page
    imgs = re.findall(r'<img src="([^"]+)"', page)
    assert len(imgs) == len(report["plots"]) == len(ALL_PLOTS)
    assert all(src.startswith("data:image/png;base64,") for src in imgs)
    for p in report["plots"]:
        assert f'id="plot-{p["name"]}"' in page and html.escape(p["caption"][:40]) in page
    # no external resource of any kind
    assert not re.search(r'(src|href)="(?!data:|#)', page)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    # the configs side by side: one column per run, differing rows highlighted
    table = page[
        page.index('<table class="configs">') : page.index("</table>", page.index('class="configs"'))
    ]
    assert all(f"<th>{n}</th>" in table for n in ("es-s0", "es-s1", "grpo-s0", "grpo-s1"))
    assert re.search(
        r'<tr class="diff"><th>trainer</th><td>es</td><td>es</td><td>grpo</td><td>grpo</td>', table
    )
    assert re.search(r'<tr class="diff"><th>seed</th><td>0</td><td>1</td><td>0</td><td>1</td>', table)
    assert re.search(r"<tr><th>task</th>(<td>conciseness</td>){4}</tr>", table)
    assert '<tr class="diff"><th>population</th><td>4</td><td>4</td><td class="absent">' in table
    # the cost table: wall time = sum of perf/seconds
    assert '<table class="cost">' in page and "40.0 s" in page and "1 min 40 s" in page
    cost = {r["name"]: r["cost"] for r in report["runs"]}
    assert cost["grpo-s0"]["wall_seconds"] == pytest.approx(5.0 * ITERS)
    assert cost["es-s1"]["samples_per_second"] == pytest.approx(PER_ITER / 2.1)
    assert cost["es-s0"]["peak_rss_mb"] == 1500.0 + ITERS


def test_missing_analyses_are_listed_with_commands(report, runs, capsys):
    missing = {(m["plot"], m["command"]) for m in report["missing"]}
    es1, grpo1 = str(runs["es-s1"]), str(runs["grpo-s1"])
    assert ("per-layer sparsity", f"esft analyze weights {grpo1}") in missing
    assert ("norm growth", f"esft analyze growth {grpo1}") in missing
    assert ("interpolation", f"esft analyze interpolate {es1}") in missing
    assert ("forgetting", f"esft analyze forgetting {es1} --tasks conciseness") in missing
    assert not any(plot == "reward vs KL" for plot, _ in missing)  # every run has a KL analysis
    assert not any(plot in ("pass@k", "update similarity") for plot, _ in missing)
    page = (report["out"] / "report.html").read_text()
    assert f"<code>esft analyze interpolate {es1}</code>" in page


def test_report_without_analyses_skips_plots_and_says_why(runs, tmp_path, capsys):
    bare = tmp_path / "bare-es"
    shutil.copytree(runs["es-s0"], bare, ignore=shutil.ignore_patterns("analysis"))
    out = tmp_path / "out"
    (out).mkdir()
    (out / "cosine.png").write_bytes(b"stale")  # from an earlier report: removed
    empty = tmp_path / "empty"  # a run that has not logged anything yet
    RunStore(empty).write_config({"trainer": "grpo", "task": "countdown", "seed": 0})
    assert report_cli.run(parse([str(bare), str(empty), "--output", str(out)])) == 0
    text = capsys.readouterr().out
    data = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in data["plots"]] == ["training_curves"]
    assert sorted(p.name for p in out.glob("*.png")) == ["training_curves.png"]
    commands = [m["command"] for m in data["missing"]]
    for kind in ("kl", "growth", "weights", "interpolate"):
        assert f"esft analyze {kind} {bare}" in commands
        assert f"esft analyze {kind} {bare}" in text
    assert f"esft analyze passk {bare}@0 {bare} --task conciseness --samples 8 --correct-reward X" in commands
    assert "empty: metrics.jsonl has no rows (the run has not trained yet)" in text
    assert "empty: no KL analysis, and the run has no checkpoint to analyse" in text
    page = (out / "report.html").read_text()
    assert page.count("<img ") == 1 and "Missing analyses" in page


# -- the page in a browser -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        missing_dependency("chromium", ".ci/run must apt-get install chromium", "apt-get install chromium")
    return path


def browse(chromium: str, page: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    """Headless Chromium on ``page`` with console messages logged to stderr."""
    argv = [
        chromium,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--enable-logging=stderr",
        "--v=1",
        "--virtual-time-budget=5000",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={tmp / 'profile'}",
        *extra,
        page.resolve().as_uri(),
    ]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp)}
    )


def console_messages(stderr: str) -> list[str]:
    """The page's console messages and uncaught errors in Chromium's log (lines like
    ``[...:INFO:CONSOLE(12)] "message", source: file:///... (12)``)."""
    return [line for line in stderr.splitlines() if re.search(r"CONSOLE|Uncaught", line)]


def test_chromium_harness_sees_errors_and_broken_images(chromium, tmp_path):
    """The checks below would catch a broken page: a console error and an image that does not decode."""
    from esft.report.page import SELF_CHECK

    broken = tmp_path / "broken.html"
    broken.write_text(
        '<!DOCTYPE html><html><body><img src="data:image/png;base64,iVBORw0KGgo=">'
        f"<script>console.error('boom'); {SELF_CHECK}</script></body></html>"
    )
    result = browse(chromium, broken, tmp_path, "--dump-dom")
    assert any("boom" in line for line in console_messages(result.stderr)), result.stderr[-3000:]
    assert 'data-images-ok="no"' in result.stdout


def test_page_loads_in_headless_chromium(chromium, report, tmp_path):
    page = report["out"] / "report.html"
    result = browse(chromium, page, tmp_path, "--dump-dom")
    assert result.returncode == 0, result.stderr[-3000:]
    assert console_messages(result.stderr) == []
    body = re.search(r"<body[^>]*>", result.stdout).group(0)
    n = len(report["plots"])
    assert 'data-images-ok="yes"' in body and f'data-images-loaded="{n}/{n}"' in body, body
    shot = report["out"] / "screenshot.png"
    result = browse(chromium, page, tmp_path, f"--screenshot={shot}", "--window-size=1400,4000")
    assert result.returncode == 0 and console_messages(result.stderr) == []
    with Image.open(shot) as im:
        assert im.size == (1400, 4000)
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 100
    keep = os.environ.get("ESFT_REPORT_SCREENSHOT")  # to look at it: ESFT_REPORT_SCREENSHOT=/tmp/shot.png
    if keep:
        Path(keep).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, keep)
        shutil.copytree(report["out"], Path(keep).with_suffix(""), dirs_exist_ok=True)
