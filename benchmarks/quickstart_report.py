"""The README's quickstart tables, from a finished run folder.

Usage: esft train                                   # the quickstart; note its run folder
       python benchmarks/quickstart_report.py runs/<time>-conciseness [--wall SECONDS]
Prints markdown: reward before/after on the training and the held-out prompts with the two example
completions whose reward changed most (from eval.jsonl), the population's mean reward per iteration, and the iteration split
(from metrics.jsonl). ``--wall`` adds the measured wall-clock time of the whole command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from esft.cli import changed_most, clip


def _clip(text: str, n: int = 90) -> str:
    return clip(text, n).replace("|", "\\|")  # a markdown table cell


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--wall", type=float, help="wall-clock seconds of the esft train command")
    args = ap.parse_args()
    run = Path(args.run)
    evals = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    if args.wall:
        print(f"Wall clock: {int(args.wall // 60)} min {args.wall % 60:.0f} s.\n")
    print("| prompts | reward before | reward after | example: before | example: after |")
    print("|---|---|---|---|---|")
    for split, label in (("train", "training (2)"), ("test", "held-out (8)")):
        rows = [e for e in evals if e["split"] == split]
        if len(rows) < 2:
            continue
        first, last = rows[0], rows[-1]
        pairs = changed_most(first, last) or [({}, {})]
        for i, (ex0, ex1) in enumerate(pairs):
            head = (
                f"| {label} | **{first['reward']:.4g}** | **{last['reward']:.4g}** |" if i == 0 else "| | | |"
            )
            cells = [
                f'"{_clip(ex.get("completion", ""))}" ({ex.get("reward", float("nan")):.4g})'
                for ex in (ex0, ex1)
            ]
            print(f"{head} {cells[0]} | {cells[1]} |")
    means = ", ".join(f"{m['train/reward_mean']:.1f}" for m in metrics)
    print(f"\nMean reward of the perturbed population per iteration: {means}.\n")
    keys = ["perf/seconds", "perf/generate_seconds", "perf/noise_seconds", "perf/update_seconds"]
    avg = {k: sum(m[k] for m in metrics) / len(metrics) for k in keys}
    print(
        f"Seconds per iteration: {avg['perf/seconds']:.1f} on average (generate {avg['perf/generate_seconds']:.1f}, "
        f"noise {avg['perf/noise_seconds']:.2f}, update {avg['perf/update_seconds']:.1f}, score < 0.01); "
        f"{sum(m['perf/tokens_per_second'] for m in metrics) / len(metrics):.0f} tok/s while generating."
    )


if __name__ == "__main__":
    main()
