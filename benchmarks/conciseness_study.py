"""The paper's conciseness study (Qiu et al. 2025, section 4.2 and Table 2) at 0.5B, resumable.

Three stages, each made only of esft commands (printed before they run), each skipped or continued
where an earlier sitting left it, so the study can be stopped at any point (Ctrl-C, a kill, the end of
a sitting) and run again with the same command:

1. **Sweeps, equal for both methods** (``OUT/sweeps/es``, ``OUT/sweeps/grpo``): each method's step size
   on a small budget, the same number of trials, the same samples per trial, the same objective (the
   greedy reward on the *training* prompts, so the held-out prompts stay unseen until the report):
   ES's sigma (alpha = sigma/2 as in the paper), GRPO's learning rate (beta 0). The rule that picks a
   setting is the same for both: the best objective, and among trials within ``TIE`` characters of it
   the smallest step. GRPO's main runs use the chosen learning rate; ES's use the paper's sigma grid,
   plus the chosen sigma where it lies outside that grid.
2. **Main runs** (``OUT/runs/<config>-seed<S>``): ES at sigma in {5e-4, 1e-3, 1.5e-3} with alpha =
   sigma/2, GRPO at beta in {0, 0.0167} (the paper's beta=0 and its best non-hacking beta), each for
   ``--seeds``, all at ``--budget`` samples. One ES iteration and one GRPO step both generate 60
   completions (N=30 members, or a group of 30, on the 2 training prompts), the paper's matching.
   Runs are checkpointed every 10 iterations/steps and resumed with ``--resume``; seed 0 of every
   configuration runs before seed 1, so a partial study is balanced.
3. **Analysis** of every finished run: ``esft analyze kl`` on the 8 held-out prompts (4 sampled
   completions per prompt, k3 per token as the paper's estimator), the held-out reward (raw and
   normalised as the paper: 1 + R/2000, so 0 = -2000 and 1 = 0), whether each held-out answer still
   contains its reference answer (the check the length reward lacks), mean and standard deviation over
   seeds, the reward-KL Pareto front over configurations, and ``esft report`` over runs and sweeps.

Each main run is analysed as soon as it finishes (while its checkpoint is on disk) and its analysis is
written to ``--records`` (``benchmarks/results/conciseness-study/<run>.<cpu>.json``, small files meant
to be committed): with the CPU it ran on (from its environment.json), its held-out reward at every
evaluation and its held-out answers. The analysis stage reads these records beside the run folders, so
a study whose machine was lost between sittings keeps every finished run, and a run repeated on
another CPU (whose bf16 kernels round differently, so the same seed follows another path) stands
beside the first as its own row.

    python benchmarks/conciseness_study.py --out experiments/conciseness-study          # everything
    python benchmarks/conciseness_study.py --out X --stage sweep                        # stage 1 only
    python benchmarks/conciseness_study.py --out X --stage main --only es-s0.001 grpo-b0 # some runs
    python benchmarks/conciseness_study.py --out X --stage analyse                      # tables so far
    python benchmarks/conciseness_study.py --out X --stage main --grpo-lr 3e-6          # sweeps elsewhere

Every command runs with the machine's default threads; wall times are in each run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from es_vs_grpo_experiment import answers_kept, jsonl, kl_value  # noqa: E402

SHARED = {
    "task": "conciseness",
    "task_options": {"prompt_format": "chat"},
    "max_new_tokens": 48,
    "dtype": "auto",  # bf16 where the CPU computes it natively (ES: stochastic rounding; GRPO: mixed)
    "freeze": ["*embed_tokens*", "lm_head*"],
    "eval_split": "both",
    "iterations": 100000,  # the sample budget stops every run
}
ES = {"population": 30, "noise": "lowrank", "rank": 1}
GRPO = {"group_size": 30, "loss_type": "dapo", "micro_batch_size": 20}
SWEEP_BUDGET = 480  # 8 ES iterations or 8 GRPO steps of 60 completions
SWEEPS = {
    "es": {"space": {"sigma": {"choices": [5e-4, 1e-3, 2e-3, 4e-3]}, "alpha": {"expr": "sigma / 2"}},
           "setting": "sigma", "extra": ES},
    "grpo": {"space": {"learning_rate": {"choices": [1e-6, 3e-6, 1e-5, 3e-5]}},
             "setting": "learning_rate", "extra": {**GRPO, "beta": 0.0}},
}  # fmt: skip
TIE = 1.0  # characters: trials this close to the best objective count as tied
PAPER_SIGMAS = (5e-4, 1e-3, 1.5e-3)
BETAS = (0.0, 0.0167)
OBJECTIVE = "eval/train/reward"
RECORDS = Path(__file__).parent / "results" / "conciseness-study"
# The paper's Table 2 (Qiu et al. 2025, arXiv 2509.24372 v2; Qwen2.5-7B-Instruct, 1,000 iterations, 4 runs):
# normalised held-out reward and KL per token, mean and sd, for the configurations this study repeats;
# "hacking" marks the rows where the paper saw reward hacking. Cited, not measured here.
PAPER_TABLE2 = {
    "es-s0.001": {"reward": (0.889, 0.004), "kl": (0.274, 0.096), "hacking": False},
    "es-s0.0015": {"reward": (0.919, 0.008), "kl": (0.813, 0.212), "hacking": False},
    "grpo-b0": {"reward": (0.867, 0.054), "kl": (0.861, 0.614), "hacking": True},
    "grpo-b0.01": {"reward": (0.871, 0.060), "kl": (1.354, 0.873), "hacking": True},
    "grpo-b0.0167": {"reward": (0.911, 0.038), "kl": (1.591, 0.811), "hacking": False},
    "grpo-b0.0464": {"reward": (0.881, 0.062), "kl": (1.384, 1.187), "hacking": False},
}


def esft(*args: str) -> int:
    print("$ esft " + " ".join(shlex.quote(a) for a in args), flush=True)
    return subprocess.run([sys.executable, "-m", "esft", *args]).returncode


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -- stage 1: sweeps ------------------------------------------------------------------------------


def finished_trials(root: Path) -> list:
    """The sweep's finished (complete) trials, read with Optuna; [] before it exists."""
    if not (root / "sweep.yaml").is_file():
        return []
    import optuna

    from esft.sweep.layout import load_study

    study = load_study(root)
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def run_sweep(out: Path, method: str) -> None:
    spec = SWEEPS[method]
    root = out / "sweeps" / method
    n = len(spec["space"][spec["setting"]]["choices"])
    if len(finished_trials(root)) >= n:
        return
    if (root / "sweep.yaml").is_file():
        rc = esft("sweep", "--output", str(root), "--resume")
    else:
        base = {**SHARED, **spec["extra"], "budget_samples": SWEEP_BUDGET, "eval_every": 4,
                "checkpoint_every": 0, "seed": 0}  # fmt: skip
        sweep = {"method": method, "base": base, "space": spec["space"], "n_trials": n,
                 "objective": {"metric": OBJECTIVE, "direction": "maximize"},
                 "sampler": "grid", "pruner": "none"}  # fmt: skip
        rc = esft("sweep", "--config", str(write_yaml(out / "sweeps" / f"{method}.yaml", sweep)),
                  "--output", str(root))  # fmt: skip
    if rc:
        raise SystemExit(f"the {method} sweep stopped (exit {rc}); run this command again to resume it")


def chosen(out: Path, method: str) -> float | None:
    """The setting the shared rule picks from a finished sweep (None while it is unfinished)."""
    spec = SWEEPS[method]
    trials = finished_trials(out / "sweeps" / method)
    if len(trials) < len(spec["space"][spec["setting"]]["choices"]):
        return None
    best = max(t.value for t in trials)
    return min(t.params[spec["setting"]] for t in trials if t.value >= best - TIE)


# -- stage 2: main runs ---------------------------------------------------------------------------


def configs(out: Path, grpo_lr: float | None = None) -> dict[str, tuple[str, dict]]:
    """name -> (trainer, settings) of every main configuration the sweeps allow so far. ``grpo_lr``
    stands in for the GRPO sweep's choice where that sweep is not on this disk (a study continued on
    another machine: docs/experiments.md records the choice)."""
    sigmas = list(PAPER_SIGMAS)
    es_pick = chosen(out, "es")
    if es_pick is not None and not any(math.isclose(es_pick, s) for s in sigmas):
        sigmas.append(es_pick)
    found = {f"es-s{s:g}": ("es", {**ES, "sigma": s, "alpha": s / 2}) for s in sigmas}
    lr = chosen(out, "grpo")
    if lr is not None and grpo_lr is not None and not math.isclose(lr, grpo_lr):
        raise SystemExit(f"--grpo-lr {grpo_lr:g} differs from this study's GRPO sweep, which chose {lr:g}")
    lr = lr if lr is not None else grpo_lr
    if lr is not None:
        found.update({f"grpo-b{b:g}": ("grpo", {**GRPO, "beta": b, "learning_rate": lr}) for b in BETAS})
    return found


def finished(run: Path, budget: int) -> bool:
    rows = jsonl(run / "metrics.jsonl")
    return bool(rows) and rows[-1]["samples"] >= budget and (run / "checkpoints").is_dir()


def resumable(run: Path, trainer: str) -> bool:
    """Whether ``run`` holds a state its trainer's ``--resume`` continues from."""
    if not (run / "metrics.jsonl").is_file():
        return False
    return trainer == "es" or any((run / "trl").glob("checkpoint-*"))


def train(out: Path, name: str, trainer: str, settings: dict, seed: int, budget: int) -> Path:
    run = out / "runs" / f"{name}-seed{seed}"
    if finished(run, budget):
        return run
    cfg = {**SHARED, **settings, "budget_samples": budget, "eval_every": 10, "checkpoint_every": 10,
           "keep_checkpoints": 1, "seed": seed, "report_to": ["tensorboard"]}  # fmt: skip
    path = write_yaml(out / "runs" / f"{name}-seed{seed}.yaml", cfg)
    command = "train" if trainer == "es" else "grpo"
    resume = ["--resume"] if resumable(run, trainer) else []
    if run.is_dir() and not resume:
        # stopped before its first training state (ES resumes from its seed log once one iteration
        # is logged; GRPO only from a TRL checkpoint): start again, keeping the attempt beside it
        stale = run.with_name(f"{run.name}.stopped-{int(time.time())}")
        print(f"{run} holds no training state yet; moved to {stale}, starting again", flush=True)
        run.rename(stale)
    rc = esft(command, "--config", str(path), "--output", str(run), "--quiet", *resume)
    if rc:
        raise SystemExit(f"{run} stopped (exit {rc}); run this command again to resume it")
    return run


def cpu_tag(cpu: str) -> str:
    """A file-name tag for a CPU description from environment.json: "amx" or "avx512_bf16" (the bf16
    kernels that decide the rounding) followed by the vendor, "other" without either."""
    flags = "" if "[none of" in cpu else cpu.rsplit("[", 1)[-1]
    kind = "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "other"
    vendor = "amd" if "AMD" in cpu else "intel" if "Intel" in cpu else "cpu"
    return f"{kind}-{vendor}"


def record(run: Path, records: Path) -> Path:
    """Analyse a finished run and write its record (see the module's docstring)."""
    env = json.loads((run / "environment.json").read_text()) if (run / "environment.json").is_file() else {}
    cpu = env.get("cpu", "unknown")
    found = {**analyse_run(run), "name": run.name, "cpu": cpu, "torch": env.get("torch"),
             "esft": env.get("esft")}  # fmt: skip
    path = records / f"{run.name}.{cpu_tag(cpu)}.json"
    records.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(found, indent=1, default=str) + "\n")
    print(f"recorded {path}", flush=True)
    return path


def recorded(records: Path) -> list[dict]:
    """Every record in ``records`` (see :func:`record`), sorted by run name and CPU."""
    return [json.loads(f.read_text()) for f in sorted(records.glob("*.json"))] if records.is_dir() else []


# -- stage 3: analysis ----------------------------------------------------------------------------


def normalised(reward: float) -> float:
    """The paper's scale: 0 = a reward of -2000 characters, 1 = the best possible reward, 0."""
    return 1 + reward / 2000


def analyse_run(run: Path) -> dict:
    kl_path = run / "analysis" / "kl-test.json"
    if not kl_path.is_file():
        esft("analyze", "kl", str(run), "--split", "test", "--samples", "4", "--seed", "0",
             "--json", str(kl_path), "--quiet")  # fmt: skip
    evals = jsonl(run / "eval.jsonl")
    test = [e for e in evals if e.get("split") == "test"]
    train_ = [e for e in evals if e.get("split") == "train"]
    metrics = jsonl(run / "metrics.jsonl")
    return {
        "run": str(run),
        "samples": metrics[-1]["samples"],
        "heldout_before": test[0]["reward"],
        "heldout": test[-1]["reward"],
        "heldout_normalised": normalised(test[-1]["reward"]),
        "heldout_by_eval": {str(e["iteration"]): e["reward"] for e in test},
        "train_reward": train_[-1]["reward"] if train_ else math.nan,
        "answers_kept": answers_kept(run, test[-1]),
        "answers_kept_before": answers_kept(run, test[0]),
        "kl": kl_value(json.loads(kl_path.read_text())),
        "train_seconds": sum(m["perf/seconds"] for m in metrics),
        "peak_rss_mb": max(m["perf/peak_rss_mb"] for m in metrics),
        "examples": [e["completion"] for e in test[-1].get("examples", [])],
    }


def mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def pareto(rows: dict[str, dict]) -> list[str]:
    """Configurations no other one beats on both mean held-out reward (higher) and mean KL (lower)."""
    front = []
    for name, r in rows.items():
        dominated = any(
            o["heldout"][0] >= r["heldout"][0]
            and o["kl"][0] <= r["kl"][0]
            and (o["heldout"][0] > r["heldout"][0] or o["kl"][0] < r["kl"][0])
            for other, o in rows.items()
            if other != name
        )
        if not dominated:
            front.append(name)
    return front


def fmt(pair: tuple[float, float], digits: int = 4) -> str:
    m, s = pair
    if math.isnan(m):
        return "-"
    return f"{m:.{digits}g}" + ("" if math.isnan(s) else f" ± {s:.2g}")


def runs_table(per_run: dict[str, list[dict]]) -> None:
    """One row per recorded run: its CPU beside its held-out reward, KL and answers."""
    print("\n| run | CPU | held-out reward (normalised) | held-out at each evaluation | KL (k3/token) | "
          "answers containing the reference | train reward | train s | peak MB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for runs in per_run.values():
        for r in runs:
            by_eval = " / ".join(f"{v:g}" for v in r.get("heldout_by_eval", {}).values())
            print(f"| {r['name']} | {r['cpu']} | {r['heldout']:g} ({r['heldout_normalised']:.4g}) | {by_eval} | "
                  f"{r['kl']:.3g} | {r['answers_kept']:.3g} | {r['train_reward']:g} | {r['train_seconds']:.0f} | "
                  f"{r['peak_rss_mb']:.0f} |")  # fmt: skip


def summarise(out: Path, per_run: dict[str, list[dict]], sweeps: dict[str, list[dict]]) -> None:
    rows = {}
    for name, runs in per_run.items():
        rows[name] = {k: mean_sd([r[k] for r in runs])
                      for k in ("heldout", "heldout_normalised", "kl", "answers_kept", "train_reward",
                                "train_seconds", "peak_rss_mb")}  # fmt: skip
        rows[name]["seeds"] = len(runs)
        rows[name]["cpus"] = sorted({cpu_tag(r["cpu"]) for r in runs})
        rows[name]["samples"] = min(r["samples"] for r in runs)
    front = pareto(rows)
    print(
        "\n| configuration | seeds | CPUs | samples | held-out reward | normalised | KL (k3/token) | answers "
        "containing the reference | train reward | train s | peak MB | Pareto |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['seeds']} | {', '.join(r['cpus'])} | {r['samples']} | {fmt(r['heldout'])} | "
              f"{fmt(r['heldout_normalised'])} | {fmt(r['kl'], 3)} | {fmt(r['answers_kept'], 3)} | "
              f"{fmt(r['train_reward'])} | {fmt(r['train_seconds'], 4)} | {fmt(r['peak_rss_mb'], 4)} | "
              f"{'yes' if name in front else ''} |")  # fmt: skip
    paper_table(rows)
    plot = pareto_plot(rows, front, per_run, out / "pareto.png")
    if plot:
        print(f"wrote {plot}")
    data = {"configs": rows, "pareto": front, "runs": per_run, "sweeps": sweeps, "paper": PAPER_TABLE2,
            "choices": {m: chosen(out, m) for m in SWEEPS}}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(data, indent=1, default=str))


def paper_table(rows: dict[str, dict]) -> None:
    """This study's configurations beside the paper's Table 2 rows for the same settings: normalised
    held-out reward and KL, mean ± sd over seeds, and the reward's spread over seeds (sd / mean of
    1 - reward, the distance from the best possible reward, so the two scales' spreads compare)."""
    shared = [n for n in rows if n in PAPER_TABLE2]
    if not shared:
        return
    print("\n| configuration | paper: reward | paper: KL | paper: reward hacking | here: reward | here: KL | "
          "relative spread of 1 - reward, paper / here |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name in shared:
        p, r = PAPER_TABLE2[name], rows[name]
        print(f"| {name} | {fmt(p['reward'], 3)} | {fmt(p['kl'], 3)} | {'yes' if p['hacking'] else 'no'} | "
              f"{fmt(r['heldout_normalised'])} | {fmt(r['kl'], 3)} | "
              f"{relative_spread(p['reward']):.2g} / {relative_spread(r['heldout_normalised']):.2g} |")  # fmt: skip


def pareto_plot(
    rows: dict[str, dict], front: list[str], per_run: dict[str, list[dict]], path: Path
) -> Path | None:
    """Held-out reward (normalised) against KL per token, log scale: left, this study's runs (small
    points) and each configuration's mean ± sd over seeds (error bars), ``front`` (:func:`pareto` of the
    means) dashed; right, the paper's Table 2 rows the same way. None without matplotlib or rows."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullFormatter

        from esft.report.plots import TRAINER_COLORS as colors
    except ImportError:
        return None
    if not rows:
        return None
    fig = Figure(figsize=(12, 4.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    here, paper = fig.subplots(1, 2)
    for name, r in rows.items():
        color = colors[name.split("-")[0]]
        runs = [x for x in per_run.get(name, []) if x["kl"] > 0]
        here.scatter(
            [x["kl"] for x in runs], [x["heldout_normalised"] for x in runs], s=12, color=color, alpha=0.4
        )
        (mk, sk), (mr, sr) = r["kl"], r["heldout_normalised"]
        if mk > 0:
            here.errorbar(mk, mr, xerr=0 if math.isnan(sk) else sk, yerr=0 if math.isnan(sr) else sr, fmt="o",
                          color=color, capsize=3)  # fmt: skip
            # GRPO's points sit at the right edge, one above the other: their labels go left, staggered
            right = name.startswith("grpo")
            shift = (-6, 4 if len(here.texts) % 2 else -11) if right else (5, 4)
            here.annotate(f"{name} ({r['seeds']})", (mk, mr), fontsize=8, xytext=shift, textcoords="offset points",
                          ha="right" if right else "left")  # fmt: skip
    line = sorted((rows[n]["kl"][0], rows[n]["heldout_normalised"][0]) for n in front if rows[n]["kl"][0] > 0)
    if line:
        here.step(
            [k for k, _ in line],
            [r for _, r in line],
            where="post",
            color="black",
            ls="--",
            lw=1,
            label="Pareto front of the means",
        )
        here.legend(loc="lower right", fontsize=8, frameon=False)
    for name, p in PAPER_TABLE2.items():
        color = colors[name.split("-")[0]]
        paper.errorbar(p["kl"][0], p["reward"][0], xerr=p["kl"][1], yerr=p["reward"][1], fmt="o", color=color,
                       capsize=3, mfc="none" if p["hacking"] else color)  # fmt: skip
        paper.annotate(name + (" *" if p["hacking"] else ""), (p["kl"][0], p["reward"][0]), fontsize=8,
                       xytext=(5, 4), textcoords="offset points")  # fmt: skip
    for ax, title in ((here, "this study (0.5B, 100 iterations): runs and mean ± sd over seeds"),
                      (paper, "the paper's Table 2 (7B, 1,000 iterations; * reward hacking)")):  # fmt: skip
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # the decades only: minor labels overlap
        ax.set(title=title, xlabel="KL to the base, k3 per token (log)", ylabel="held-out reward, normalised")
        ax.grid(alpha=0.3)
    fig.savefig(path)
    return path


def relative_spread(pair: tuple[float, float]) -> float:
    """sd over seeds of a normalised reward, relative to the mean distance from the best (1)."""
    mean, sd = pair
    return sd / (1 - mean) if mean < 1 and not math.isnan(sd) else math.nan


def sweep_table(out: Path, method: str) -> list[dict]:
    """One row per finished trial of a sweep: its setting, the objective (training prompts) and, for
    information only (not used to choose), the held-out reward, answers kept and completion length."""
    spec = SWEEPS[method]
    found = []
    for t in sorted(finished_trials(out / "sweeps" / method), key=lambda t: t.params[spec["setting"]]):
        run = out / "sweeps" / method / t.user_attrs["run_dir"]  # relative to the sweep folder
        test = [e for e in jsonl(run / "eval.jsonl") if e.get("split") == "test"]
        train_rows = [e for e in jsonl(run / "eval.jsonl") if e.get("split") == "train"]
        metrics = jsonl(run / "metrics.jsonl")
        found.append({
            spec["setting"]: t.params[spec["setting"]],
            "objective": t.value,
            "train_reward_by_eval": [e["reward"] for e in train_rows],
            "heldout": test[-1]["reward"],
            "answers_kept": answers_kept(run, test[-1]),
            "heldout_tokens": test[-1].get("completion_tokens", math.nan),
            "train_seconds": sum(m["perf/seconds"] for m in metrics),
        })  # fmt: skip
    if found:
        pick = chosen(out, method)
        print(f"\n{method} sweep ({SWEEP_BUDGET} samples per trial; chosen: {pick})\n")
        print(f"| {spec['setting']} | training reward at each evaluation | held-out reward | answers containing "
              "the reference | held-out tokens | train s |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        for r in found:
            print(f"| {r[spec['setting']]:g} | {' / '.join(f'{v:g}' for v in r['train_reward_by_eval'])} | "
                  f"{r['heldout']:g} | {r['answers_kept']:.3g} | {r['heldout_tokens']:.3g} | "
                  f"{r['train_seconds']:.0f} |")  # fmt: skip
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="experiments/conciseness-study")
    p.add_argument("--stage", choices=["sweep", "main", "analyse", "all"], default="all")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--budget", type=int, default=6000, help="samples per main run")
    p.add_argument("--only", nargs="*", default=None, help="main configurations to run (default: all)")
    p.add_argument(
        "--records",
        default=str(RECORDS),
        help="where each finished main run's analysis is kept (default: %(default)s)",
    )
    p.add_argument(
        "--grpo-lr",
        type=float,
        default=None,
        help="GRPO's learning rate where the GRPO sweep is not in --out (its choice: 3e-6)",
    )
    args = p.parse_args()
    out = Path(args.out)
    records = Path(args.records)
    if args.stage in ("sweep", "all"):
        for method in SWEEPS:
            run_sweep(out, method)
        print({m: chosen(out, m) for m in SWEEPS})
    if args.stage in ("main", "all"):
        known = configs(out, args.grpo_lr)
        unknown = sorted(set(args.only or ()) - set(known))
        if unknown:
            raise SystemExit(
                f"--only {unknown[0]}: not a configuration of this study; choose from {', '.join(known)}"
            )
        todo = {n: c for n, c in known.items() if args.only is None or n in args.only}
        for seed in args.seeds:  # seed 0 of every configuration first
            for name, (trainer, settings) in todo.items():
                record(train(out, name, trainer, settings, seed, args.budget), records)  # KL is cached
    if args.stage in ("analyse", "all"):
        sweeps_found = {m: sweep_table(out, m) for m in SWEEPS}
        per_run: dict[str, list[dict]] = {}
        names = list(configs(out, args.grpo_lr))
        for name in names:
            for seed in args.seeds:
                run = out / "runs" / f"{name}-seed{seed}"
                if finished(run, args.budget):
                    record(run, records)
        for r in recorded(records):
            config, _, seed = r["name"].rpartition("-seed")
            if int(seed) in args.seeds and r["samples"] >= args.budget:
                per_run.setdefault(config, []).append(r)
        per_run = {n: per_run[n] for n in [*names, *sorted(set(per_run) - set(names))] if n in per_run}
        runs_table(per_run)
        summarise(out, per_run, sweeps_found)
        done = sorted({str(out / "runs" / f"{n}-seed{s}") for n in per_run for s in args.seeds
                       if finished(out / "runs" / f"{n}-seed{s}", args.budget)})  # fmt: skip
        sweeps = [str(out / "sweeps" / m) for m in SWEEPS if (out / "sweeps" / m / "sweep.yaml").is_file()]
        if done or sweeps:
            esft("report", *done, *sweeps, "--output", str(out / "report"), "--title", "Conciseness study")


if __name__ == "__main__":
    main()
