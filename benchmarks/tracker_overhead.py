"""What each ``--report-to`` tracker costs per iteration (esft/trackers.py), side by side in one run.

1. Per call: every tracker gets the same realistic ES metrics row (30 numbers, as metrics.jsonl holds
   them) through ``on_log`` and an evaluation's scalars through ``on_evaluate``, interleaved step by step
   so that all of them see the same machine noise: the median and 90th percentile of the time the
   training thread spends in each call, and the time to start and to finish each tracker run.
2. CPU: W&B hands rows to its wandb-core process and Trackio to a thread, so their calls return before
   the work is done. Each tracker alone gets the rows again, paced like iterations, and the CPU time of
   the whole process tree (this process's threads and its children, e.g. wandb-core) from its start to
   its finish is divided by the rows, less the same loop without a tracker: what it takes from the cores
   training runs on.
3. Training (``--train-iterations N``, off by default): a short tiny-model ES run per tracker and one
   with none, in rounds, timing the interval between consecutive metrics rows. On a shared 2-core
   machine the differences drown in the noise of the iterations themselves.

W&B runs offline, MLflow into a SQLite file and Trackio locally, all in a temporary folder.

Usage: python benchmarks/tracker_overhead.py [--steps 500] [--paced 200] [--train-iterations 0]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
TMP = Path(tempfile.mkdtemp(prefix="esft-tracker-overhead-"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")
os.environ.setdefault("TRACKIO_DIR", str(TMP / "trackio"))  # read when trackio is first imported
os.environ["ESFT_CPU_FLAGS"] = ""  # float32 on every CPU, as the tests

from esft.callbacks import Callback, RunInfo  # noqa: E402
from esft.trackers import TRACKERS, installed, trackers_for  # noqa: E402

ROW_KEYS = [  # an ES metrics.jsonl row's numbers (esft train, full-rank noise)
    "samples", "tokens", "train/reward_mean", "train/reward_std", "train/reward_min", "train/reward_max",
    "train/normalized_reward", "train/reward/length", "train/completion_tokens", "train/truncated_fraction",
    "train/reward_failures", "train/unscored_members", "es/update_norm", "es/update_ratio", "es/param_norm",
    "es/zero_update", "es/flat_streak", "es/step_cosine", "es/step_lost_fraction", "es/step_norm_ratio",
    "es/intended_norm", "es/changed_fraction", "perf/seconds", "perf/generate_seconds", "perf/noise_seconds",
    "perf/score_seconds", "perf/update_seconds", "perf/samples_per_second", "perf/tokens_per_second",
    "perf/peak_rss_mb",
]  # fmt: skip
EVAL_KEYS = ["eval/reward", "eval/reward/length", "eval/normalized_reward", "eval/completion_tokens",
             "eval/reward_failures", "eval/samples"]  # fmt: skip
CONFIG = {"trainer": "es", "task": "conciseness", "population": 30, "sigma": 1e-3, "alpha": 5e-4,
          "iterations": 100, "noise": "lowrank", "rank": 1, "task_options": {"train_size": 200},
          "freeze": ["*embed_tokens*"], "report_to": ["all"]}  # fmt: skip


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def per_call(names: list[str], steps: int, eval_every: int) -> None:
    rng = random.Random(0)
    trackers, made, start, finish = {}, {}, {}, {}
    for name in names:  # the first construction imports the package
        tic = time.perf_counter()
        trackers[name] = trackers_for([name])[0]
        made[name] = time.perf_counter() - tic
    for name, cb in trackers.items():
        root = TMP / f"calls-{name}"
        root.mkdir()
        tic = time.perf_counter()
        cb.on_train_begin(RunInfo(root, "es", CONFIG, 0))
        start[name] = time.perf_counter() - tic
    logs: dict[str, list[float]] = {n: [] for n in names}
    evals: dict[str, list[float]] = {n: [] for n in names}
    for step in range(1, steps + 1):
        row = {"iteration": step, **{k: rng.random() for k in ROW_KEYS}, "member_rewards": [0.0] * 30}
        for name in rng.sample(names, len(names)):  # a different order each step
            tic = time.perf_counter()
            trackers[name].on_log(row, step)
            logs[name].append(time.perf_counter() - tic)
        if step % eval_every == 0:
            scalars = {k: rng.random() for k in EVAL_KEYS}
            for name in rng.sample(names, len(names)):
                tic = time.perf_counter()
                trackers[name].on_evaluate(scalars, [], step)
                evals[name].append(time.perf_counter() - tic)
    for name, cb in trackers.items():
        tic = time.perf_counter()
        cb.on_train_end()
        finish[name] = time.perf_counter() - tic
    print(f"\n1. per call: {steps} metrics rows of {len(ROW_KEYS)} numbers, an evaluation of {len(EVAL_KEYS)} "
          f"scalars every {eval_every} steps")  # fmt: skip
    print(
        f"{'tracker':<12} {'on_log med':>11} {'p90':>9} {'on_evaluate med':>16} {'import':>8} {'start':>8} "
        f"{'finish':>8}"
    )
    for name in names:
        print(
            f"{name:<12} {statistics.median(logs[name]) * 1e3:>8.3f} ms {pct(logs[name], 0.9) * 1e3:>6.3f} ms "
            f"{statistics.median(evals[name]) * 1e3:>13.3f} ms {made[name]:>6.2f} s {start[name]:>6.2f} s "
            f"{finish[name]:>6.2f} s"
        )


class Clock(Callback):
    """The time of each metrics row: the interval between two is one iteration plus the trackers'
    work on the previous row."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_log(self, metrics, step) -> None:
        self.times.append(time.perf_counter())


def training(names: list[str], iterations: int, rounds: int) -> None:
    from helpers import build_tiny_model

    from esft.config import ESConfig
    from esft.trainer import ESTrainer

    model = build_tiny_model(TMP / "tiny")
    runs: dict[str, list[float]] = {n: [] for n in ["none", *names]}
    walls: dict[str, list[float]] = {n: [] for n in runs}
    for r in range(rounds):
        for name in runs:
            out = TMP / f"run-{name}-{r}"
            config = ESConfig(model=str(model), task="conciseness", population=8, iterations=iterations,
                              max_new_tokens=8, prompts_per_iteration=2, checkpoint_every=0, eval_every=5,
                              eval_limit=2, output=str(out), report_to=[name])  # fmt: skip
            clock = Clock()
            tic = time.perf_counter()
            ESTrainer(config, progress=False, callbacks=[clock]).train()
            walls[name].append(time.perf_counter() - tic)
            runs[name] += [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
    base = statistics.median(runs["none"])
    print(f"\n3. training: tiny model, N=8, 2 prompts, 8 new tokens, {iterations} iterations x {rounds} rounds, "
          "evaluation every 5")  # fmt: skip
    print(f"{'tracker':<12} {'s/iteration (median)':>21} {'vs none':>10} {'run wall (median)':>18}")
    for name, gaps in runs.items():
        med = statistics.median(gaps)
        print(
            f"{name:<12} {med * 1e3:>18.1f} ms {(med - base) * 1e3:>+7.1f} ms {statistics.median(walls[name]):>16.2f} s"
        )


def process_cpu() -> float:
    """CPU seconds of this process (all threads) and its live children (wandb-core)."""
    try:
        import psutil
    except ImportError:
        t = os.times()
        return t.user + t.system
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # it ended meanwhile
            total += sum(child.cpu_times()[:2])
    return total


def cpu_per_row(names: list[str], rows: int, gap: float) -> None:
    """Part 2: each tracker alone, ``rows`` rows ``gap`` seconds apart; CPU per row less the bare loop's."""
    rng = random.Random(1)
    cost: dict[str, float] = {}
    for name in ["none", *names]:
        cbs = trackers_for([name])
        root = TMP / f"cpu-{name}"
        root.mkdir()
        for cb in cbs:
            cb.on_train_begin(RunInfo(root, "es", CONFIG, 0))
        time.sleep(1.0)  # let start-up work settle
        cpu = process_cpu()
        for step in range(1, rows + 1):
            row = {"iteration": step, **{k: rng.random() for k in ROW_KEYS}}
            for cb in cbs:
                cb.on_log(row, step)
            time.sleep(gap)
        for cb in cbs:
            cb.on_train_end()
        cost[name] = (process_cpu() - cpu) / rows
    print(f"\n2. CPU of the process tree per metrics row ({rows} rows, {gap * 1e3:.0f} ms apart, "
          "start excluded, finish included), less the bare loop's")  # fmt: skip
    for name in names:
        print(f"{name:<12} {(cost[name] - cost['none']) * 1e3:>7.2f} ms CPU per row")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500, help="metrics rows per tracker in part 1")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--paced", type=int, default=200, help="metrics rows per tracker in part 2")
    ap.add_argument("--gap", type=float, default=0.02, help="seconds between rows in part 2")
    ap.add_argument("--train-iterations", type=int, default=0, help="part 3: ES iterations per run (0: skip)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    names = [t for t in TRACKERS if t in installed()]
    import importlib.metadata as md

    versions = ", ".join(f"{n} {md.version(n)}" for n in names)
    print(f"trackers: {versions}; data in {TMP}")
    per_call(names, args.steps, args.eval_every)
    cpu_per_row(names, args.paced, args.gap)
    if args.train_iterations:
        training(names, args.train_iterations, args.rounds)


if __name__ == "__main__":
    main()
