"""The ES-vs-GRPO comparison of docs/experiments.md, end to end: train, analyse, report, summarise.

For each task and seed: an ES run (low-rank, N=30) and a GRPO run (TRL) from the embedded model with
the same sample budget, prompts and completion limit; then, per run, `esft analyze weights` (update norm
and sparsity) and `esft analyze kl` on the task's held-out prompts (on-task) and on gsm8k's built-in
sample (off-task); per seed `esft analyze cosine ES GRPO`; for the first seed `esft analyze interpolate
ES GRPO`; finally `esft report` over every run. Prints one markdown table per task and writes
summary.json. Every step is an esft command, printed before it runs, so each number can be reproduced.

    python benchmarks/es_vs_grpo_experiment.py --out experiments/es-vs-grpo            # all tasks
    python benchmarks/es_vs_grpo_experiment.py --out X --tasks conciseness --seeds 0 1  # a subset
    python benchmarks/es_vs_grpo_experiment.py --out X --tasks conciseness --seeds 0 --grpo-lr 1e-6 3e-6

``--grpo-lr`` adds GRPO runs at other learning rates (``grpo-lr1e-06-seed0``, ...), trained, analysed
and tabulated like the others (the cosine and interpolation stay with the task's own GRPO run).

Finished steps are skipped when the script is run again (their outputs exist).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

# Settings shared by both trainers per task (a config file may hold both; each ignores the other's).
TASKS: dict[str, dict] = {
    "conciseness": {
        # the quickstart's ES settings (4 iterations x 30 members x 2 prompts = 240 samples)
        "shared": {"task": "conciseness", "task_options": {"prompt_format": "chat"}, "max_new_tokens": 48,
                   "dtype": "float32", "freeze": ["*embed_tokens*", "lm_head*"], "budget_samples": 240,
                   "iterations": 1000, "eval_every": 1000, "eval_split": "both", "checkpoint_every": 0},
        "es": {"population": 30, "sigma": 1e-3, "alpha": 1e-3, "noise": "lowrank", "rank": 1},
        # 2 prompts x G=8 = 16 completions per step: 15 steps for 240 samples
        "grpo": {"group_size": 8, "learning_rate": 1e-5, "beta": 0.0, "loss_type": "dapo"},
        "kl_limit": 8,
    },
    "rg:chain_sum": {
        "shared": {"task": "rg:chain_sum", "max_new_tokens": 64, "dtype": "float32",
                   "freeze": ["*embed_tokens*", "lm_head*"], "prompts_per_iteration": 4,
                   "budget_samples": 240, "iterations": 1000, "eval_every": 1000, "eval_limit": 32,
                   "eval_split": "test", "checkpoint_every": 0},
        "es": {"population": 30, "sigma": 1e-3, "alpha": 1e-3, "noise": "lowrank", "rank": 1},
        "grpo": {"group_size": 8, "learning_rate": 1e-5, "beta": 0.0, "loss_type": "dapo"},
        "kl_limit": 8,
    },
}  # fmt: skip

OFF_TASK = ["--task", "gsm8k"]  # KL off-task: the built-in gsm8k sample (test split)


def esft(*args: str) -> None:
    cmd = [sys.executable, "-m", "esft", *args]
    print("$ esft " + " ".join(shlex.quote(a) for a in args), flush=True)
    subprocess.run(cmd, check=True)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def train(kind: str, spec: dict, seed: int, out: Path) -> None:
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        return
    import yaml

    cfg = out.parent / f"{out.name}.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(yaml.safe_dump({**spec["shared"], **spec[kind], "seed": seed}))
    esft("train" if kind == "es" else "grpo", "--config", str(cfg), "--output", str(out), "--quiet")


def analyse(run: Path, limit: int) -> dict:
    a = run / "analysis"
    weights, kl_on, kl_off = a / "weights.json", a / "kl-on.json", a / "kl-off.json"
    if not weights.is_file():
        esft("analyze", "weights", str(run), "--json", str(weights), "--quiet")
    if not kl_on.is_file():
        esft(
            "analyze",
            "kl",
            str(run),
            "--split",
            "test",
            "--limit",
            str(limit),
            "--json",
            str(kl_on),
            "--quiet",
        )
    if not kl_off.is_file():
        esft("analyze", "kl", str(run), *OFF_TASK, "--split", "test", "--json", str(kl_off), "--quiet")
    return {"weights": load(weights), "kl_on": load(kl_on), "kl_off": load(kl_off)}


def dig(d: dict, *keys: str, default=math.nan):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def summarise_run(run: Path, analyses: dict) -> dict:
    metrics = jsonl(run / "metrics.jsonl")
    evals = [e for e in jsonl(run / "eval.jsonl") if e.get("split", "test") == "test"]
    w, on, off = analyses["weights"], analyses["kl_on"], analyses["kl_off"]
    return {
        "run": str(run),
        "samples": metrics[-1]["samples"],
        "steps": len(metrics),
        "heldout_before": evals[0].get("reward") if evals else math.nan,
        "heldout_after": evals[-1].get("reward") if evals else math.nan,
        "heldout_accuracy_after": evals[-1].get("accuracy", math.nan) if evals else math.nan,
        "answers_kept_before": answers_kept(run, evals[0]) if evals else math.nan,
        "answers_kept_after": answers_kept(run, evals[-1]) if evals else math.nan,
        "kl_on_k3": kl_value(on),
        "kl_off_k3": kl_value(off),
        "update_norm": dig(w, "total", "norm"),
        "relative_norm": dig(w, "total", "relative_norm"),
        "sparsity": dig(w, "total", "sparsity"),
        "samples_per_second": metrics[-1]["samples"] / sum(m["perf/seconds"] for m in metrics),
        "peak_rss_mb": max(m["perf/peak_rss_mb"] for m in metrics),
        "train_seconds": sum(m["perf/seconds"] for m in metrics),
    }


def answers_kept(run: Path, row: dict) -> float:
    """Conciseness only rewards length, so also check the content: the share of the evaluation's example
    completions that still contain the reference answer as a word (case-insensitive); NaN for other
    tasks, or when the examples do not cover the whole split."""
    import re

    import yaml

    from esft.tasks import load_task

    config = yaml.safe_load((run / "config.yaml").read_text())
    if config["task"] != "conciseness":
        return math.nan
    rows = load_task("conciseness", **config.get("task_options", {})).split(row["split"])
    examples = row.get("examples", [])
    if len(examples) != len(rows):
        return math.nan
    hits = [
        re.search(rf"\b{re.escape(str(r['answer']))}\b", e["completion"], re.IGNORECASE) is not None
        for r, e in zip(rows, examples, strict=True)
    ]
    return sum(hits) / len(hits)


def kl_value(report: dict) -> float:
    """k3 per token from an `esft analyze kl` JSON (its only task)."""
    return float(next(iter(report["tasks"].values()))["per_token_k3"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="experiments/es-vs-grpo")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--no-interpolate", action="store_true")
    p.add_argument("--grpo-lr", nargs="*", type=float, default=[], help="extra GRPO learning rates")
    args = p.parse_args()
    out = Path(args.out)
    summary: dict = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    for task in args.tasks:
        spec = TASKS[task]
        tdir = out / task.replace(":", "_")
        rows = []
        for seed in args.seeds:
            pair = {}
            for kind in ("es", "grpo"):
                run = tdir / f"{kind}-seed{seed}"
                train(kind, spec, seed, run)
                pair[kind] = run
                rows.append(
                    {"trainer": kind, "seed": seed, **summarise_run(run, analyse(run, spec["kl_limit"]))}
                )
            cos = tdir / f"cosine-seed{seed}.json"
            if not cos.is_file():
                esft("analyze", "cosine", str(pair["es"]), str(pair["grpo"]), "--json", str(cos), "--quiet")
            rows.append(
                {"trainer": "cosine(ES, GRPO)", "seed": seed, "cosine": dig(load(cos), "total", "cosine")}
            )
            for lr in args.grpo_lr:
                run = tdir / f"grpo-lr{lr:g}-seed{seed}"
                train("grpo", {**spec, "grpo": {**spec["grpo"], "learning_rate": lr}}, seed, run)
                summary_row = summarise_run(run, analyse(run, spec["kl_limit"]))
                rows.append({"trainer": f"grpo lr {lr:g}", "seed": seed, **summary_row})
            interp = tdir / f"interpolate-seed{seed}.json"
            if seed == args.seeds[0] and not args.no_interpolate and not interp.is_file():
                esft("analyze", "interpolate", str(pair["es"]), str(pair["grpo"]), "--points", "5",
                     "--range", "0", "1", "--limit", str(spec["kl_limit"]), "--kl-samples", "0",
                     "--json", str(interp), "--quiet")  # fmt: skip
        summary[task] = rows
        print(f"\n### {task}\n")
        keys = ["heldout_before", "heldout_after", "heldout_accuracy_after", "answers_kept_before",
                "answers_kept_after", "kl_on_k3", "kl_off_k3",
                "update_norm", "relative_norm", "sparsity", "samples", "steps", "samples_per_second",
                "peak_rss_mb", "train_seconds"]  # fmt: skip
        print("| trainer | seed | " + " | ".join(keys) + " |")
        print("|---|---|" + "---|" * len(keys))
        for r in rows:
            if "cosine" in r:
                print(f"| cosine(ES, GRPO) | {r['seed']} | {r['cosine']:.4g} |" + " |" * (len(keys) - 1))
                continue
            print(f"| {r['trainer']} | {r['seed']} | " + " | ".join(f"{r[k]:.4g}" for k in keys) + " |")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    # the cosine and interpolation files of every task done so far live beside the runs, not in them
    extra = sorted(str(f) for f in out.glob("*/*.json") if f.name.startswith(("cosine-", "interpolate-")))
    done = sorted({str(r) for r in out.glob("*/*-seed*") if (r / "config.yaml").is_file()})
    esft("report", *done, "--output", str(out / "report"), "--title", "ES vs GRPO", "--analysis", *extra)


if __name__ == "__main__":
    main()
