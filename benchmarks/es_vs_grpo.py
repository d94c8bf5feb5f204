"""ES (low-rank batched) against GRPO (TRL) on the same model, prompts and completion lengths.

Each trainer runs in its own process (so its peak resident memory is its own) with the same sample
budget, the same prompts and exactly the same number of generated tokens per completion
(--fixed-length). Reported per trainer: completions per second over the timed steps, generated tokens
per second, peak resident memory, wall time of the process; then the ES/GRPO ratios.

    python benchmarks/es_vs_grpo.py                        # embedded model, conciseness, 2 x 60 samples
    python benchmarks/es_vs_grpo.py --model PATH --budget 120 --max-new-tokens 32 --json out.json

ES: N members x P prompts per iteration; GRPO: P prompts x G completions per step, G = N, so one ES
iteration and one GRPO step generate the same number of completions. The first iteration/step is
warm-up and is left out of the speeds unless there is only one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(kind: str, args: argparse.Namespace, out: Path) -> dict:
    common = ["--task", args.task, "--max-new-tokens", str(args.max_new_tokens), "--fixed-length",
              "--budget-samples", str(args.budget), "--iterations", "1000", "--checkpoint-every", "0",
              "--keep-checkpoints", "1", "--seed", "0", "--quiet", "--output", str(out)]  # fmt: skip
    if args.model:
        common += ["--model", args.model]
    if kind == "es":
        cmd = ["train", *common, "--population", str(args.n), "--noise", "lowrank", "--rank", "1",
               "--dtype", "float32", "--sigma", "1e-3", "--alpha", "1e-3"]  # fmt: skip
    else:
        cmd = ["grpo", *common, "--group-size", str(args.n), "--dtype", "float32",
               "--micro-batch-size", str(args.micro_batch), "--learning-rate", "1e-6"]  # fmt: skip
    tic = time.perf_counter()
    subprocess.run([sys.executable, "-m", "esft", *cmd], check=True)
    wall = time.perf_counter() - tic
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:] if len(rows) > 1 else rows
    timed_samples = rows[-1]["samples"] - (rows[0]["samples"] if len(rows) > 1 else 0)
    timed_tokens = rows[-1]["tokens"] - (rows[0]["tokens"] if len(rows) > 1 else 0)
    seconds = sum(r["perf/seconds"] for r in timed)
    return {
        "trainer": kind,
        "steps": len(rows),
        "samples": rows[-1]["samples"],
        "completion_tokens": rows[-1]["train/completion_tokens"],
        "samples_per_second": timed_samples / seconds,
        "tokens_per_second": timed_tokens / seconds,
        "seconds_per_step": seconds / len(timed),
        "peak_rss_mb": max(r["perf/peak_rss_mb"] for r in rows),
        "wall_seconds": wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder (default: the embedded model)")
    p.add_argument("--task", default="conciseness")
    p.add_argument("--n", type=int, default=30, help="ES population N = GRPO group size G")
    p.add_argument(
        "--budget", type=int, default=120, help="completions per trainer (multiple of N x prompts)"
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=10, help="GRPO completions per forward/backward")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("es", "grpo"):
            print(f"running {kind} ...", flush=True)
            results.append(run(kind, args, Path(tmp) / kind))
    es, grpo = results
    keys = ["steps", "samples", "completion_tokens", "samples_per_second", "tokens_per_second",
            "seconds_per_step", "peak_rss_mb", "wall_seconds"]  # fmt: skip
    print(f"\n| {'':20} | {'ES (lowrank)':>14} | {'GRPO (TRL)':>14} | {'ES / GRPO':>10} |")
    print(f"|{'-' * 22}|{'-' * 16}|{'-' * 16}|{'-' * 12}|")
    for k in keys:
        ratio = es[k] / grpo[k] if grpo[k] else float("nan")
        print(f"| {k:20} | {es[k]:>14.4g} | {grpo[k]:>14.4g} | {ratio:>10.3g} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
