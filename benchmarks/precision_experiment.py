"""What precision does to learning: the quickstart in float32 and in bfloat16 with each update precision.

Usage:
    python benchmarks/precision_experiment.py --out experiments/precision [--seeds 0 1 2]
        [--variants float32 bf16-nearest bf16-stochastic bf16-master] [--table-only]

Each (variant, seed) is the quickstart (``src/esft/configs/quickstart.yaml``: conciseness, N=30, lowrank,
4 iterations, evaluation of both splits before and after) with ``--dtype`` and ``--update-precision``
set, run as its own ``esft train`` process (so wall time and peak memory are its own), followed by
``esft analyze growth`` on its run folder. A finished run (its result.json) is not run again, so
the study can continue over several sittings. Writes ``results.json`` and prints the markdown table of
docs/experiments.md: held-out reward before/after, update norm against the random walk, the share of the
intended step lost per iteration and in the final checkpoint, seconds per iteration, peak memory, wall.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "float32": ["--dtype", "float32"],
    "bf16-nearest": ["--dtype", "bfloat16", "--update-precision", "nearest"],
    "bf16-stochastic": ["--dtype", "bfloat16", "--update-precision", "stochastic"],
    "bf16-master": ["--dtype", "bfloat16", "--update-precision", "master"],
}
QUICKSTART = Path(__file__).resolve().parents[1] / "src" / "esft" / "configs" / "quickstart.yaml"


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def run_one(out: Path, variant: str, seed: int) -> dict:
    run = out / f"{variant}-seed{seed}"
    done = run / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    if run.exists():  # an interrupted run: start it again (a quickstart is minutes)
        import shutil

        shutil.rmtree(run)
    cmd = [sys.executable, "-m", "esft", "train", "--config", str(QUICKSTART), "--seed", str(seed),
           "--output", str(run), "--quiet", *VARIANTS[variant]]  # fmt: skip
    tic = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - tic
    subprocess.run(
        [sys.executable, "-m", "esft", "analyze", "growth", str(run), "--quiet"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    growth = json.loads((run / "analysis" / f"growth-{run.name}.json").read_text())["points"][-1]
    evals = [e for e in _rows(run / "eval.jsonl") if e["split"] == "test"]
    metrics = _rows(run / "metrics.jsonl")
    env = json.loads((run / "environment.json").read_text())
    result = {
        "variant": variant,
        "seed": seed,
        "dtype": env["dtype"],
        "update_precision": env.get("update_precision"),
        "held_out_before": evals[0]["reward"],
        "held_out_after": evals[-1]["reward"],
        "train_reward_last": metrics[-1]["train/reward_mean"],
        "update_norm": growth["norm"],
        "random_walk_ratio": growth["ratio"],
        "checkpoint_cosine": growth.get("step_cosine"),
        "checkpoint_lost": growth.get("step_lost_fraction"),
        "step_lost_mean": statistics.mean(m["es/step_lost_fraction"] for m in metrics),
        "step_cosine_mean": statistics.mean(m["es/step_cosine"] for m in metrics),
        "seconds_per_iteration": statistics.mean(m["perf/seconds"] for m in metrics),
        "update_seconds": statistics.mean(m["perf/update_seconds"] for m in metrics),
        "peak_rss_mb": max(m["perf/peak_rss_mb"] for m in metrics),
        "wall_seconds": wall,
    }
    done.write_text(json.dumps(result, indent=1))
    return result


def table(results: list[dict]) -> str:
    cols = [
        ("held-out after", "held_out_after", "{:.2f}"),
        ("norm / random walk", "random_walk_ratio", "{:.4f}"),
        ("step lost / iter", "step_lost_mean", "{:.1%}"),
        ("lost in checkpoint", "checkpoint_lost", "{:.1%}"),
        ("s / iteration", "seconds_per_iteration", "{:.1f}"),
        ("update s", "update_seconds", "{:.2f}"),
        ("peak RSS GB", "peak_rss_mb", "{:.2f}"),
        ("wall s", "wall_seconds", "{:.0f}"),
    ]
    lines = [
        "| variant | seeds | " + " | ".join(c[0] for c in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for variant in VARIANTS:
        rs = [r for r in results if r["variant"] == variant]
        if not rs:
            continue
        cells = []
        for _, key, fmt in cols:
            vals = [r[key] / 1024 if key == "peak_rss_mb" else r[key] for r in rs if r[key] is not None]
            if not vals:
                cells.append("-")
                continue
            mean = statistics.mean(vals)
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(fmt.format(mean) + (f" ± {fmt.format(sd)}" if key == "held_out_after" else ""))
        per_seed = " / ".join(f"{r['held_out_after']:.2f}" for r in sorted(rs, key=lambda r: r["seed"]))
        lines.append(f"| {variant} | {per_seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="experiments/precision")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--table-only", action="store_true", help="print the table of the finished runs")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        for variant in args.variants:
            if args.table_only:
                f = out / f"{variant}-seed{seed}" / "result.json"
                if f.is_file():
                    results.append(json.loads(f.read_text()))
                continue
            results.append(run_one(out, variant, seed))
            print(json.dumps(results[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
