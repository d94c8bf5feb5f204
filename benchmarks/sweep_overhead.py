"""What the sweep driver (esft sweep) costs per trial, against the trial's own training time.

Usage: python benchmarks/sweep_overhead.py [--trials 4] [--embedded] [--json OUT]

Three parts, printed as markdown tables:

1. **Optuna alone** (SQLite storage in a temporary sweep folder, no training): creating and loading the
   study; ``study.ask`` with the sweep's search space (TPE's sampling plus the new trial's storage
   writes) as the study grows to 10, 50, 100 and 200 finished trials; the storage writes of one trial
   (its user attributes, one ``trial.report`` per evaluation, ``study.tell``).
2. **Whole sweeps of the tiny test model** (2 ES iterations, 3 evaluations per trial, so training is
   short and the overhead shows): in this process (``--parallel 1``) and in processes of their own
   (``--parallel 2``). Per trial: the driver's wall time (from before ``ask`` to seeing the trial
   finished), the trainer's own time (``train_seconds``: model load, training, evaluations,
   checkpoint), and the difference: the sweep's overhead. For trial processes, the start (interpreter,
   imports, opening the study: ``start_seconds``) is split out.
3. With ``--embedded``: the same for the embedded Qwen2.5-Coder-0.5B-Instruct (conciseness,
   population 2 or 4 from the space, low-rank noise, 2 iterations, 32 new tokens, evaluated before and
   after, --dtype auto), in this process and in
   two trial processes, where training time is what a real sweep spends.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import optuna  # noqa: E402

from esft.sweep import driver, layout  # noqa: E402
from esft.sweep.space import parse_spec  # noqa: E402

SPACE = {
    "sigma": {"low": 1e-4, "high": 1e-2, "log": True},
    "alpha": {"expr": "sigma / 2"},
    "population": {"choices": [2, 4]},
}


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def optuna_alone(tmp: Path, model: Path) -> dict:
    """Part 1: study creation and loading, ask as the study grows, one trial's storage writes."""
    spec = parse_spec({"method": "es", "base": {"model": str(model), "task": "conciseness", "eval_every": 1},
                       "space": SPACE, "n_trials": 300})  # fmt: skip
    root = tmp / "optuna"
    root.mkdir()
    saved = spec.to_dict()
    layout.write_spec(root, saved)
    tic = time.perf_counter()
    study = driver.open_study(root, spec, saved, resume=False)
    create = time.perf_counter() - tic
    tic = time.perf_counter()
    driver.open_study(root, spec, saved, resume=True)
    load = time.perf_counter() - tic
    asks: dict[int, float] = {}
    writes = []
    done = 0
    for target in (10, 50, 100, 200):
        while done < target:
            tic = time.perf_counter()
            trial = study.ask(spec.distributions)
            ask = time.perf_counter() - tic
            tic = time.perf_counter()
            trial.set_user_attr("run_dir", f"trials/trial-{trial.number:04d}")
            trial.set_user_attr("derived", {"alpha": trial.params["sigma"] / 2})
            for step in (1, 2):
                trial.report(-10.0 + trial.params["sigma"] * 100 + step, step)
                trial.should_prune()
            for key in ("train_seconds", "iterations"):
                trial.set_user_attr(key, 1)
            study.tell(trial, -10.0 + trial.params["sigma"] * 100)
            writes.append(time.perf_counter() - tic)
            done += 1
            if done > target - 5:  # the last 5 asks before each size
                asks.setdefault(target, 0.0)
                asks[target] += ask / 5
    return {"create": create, "load": load, "ask": asks, "writes": statistics.median(writes)}


def sweep(tmp: Path, name: str, base: dict, trials: int, parallel: int) -> dict:
    """Part 2/3: one whole sweep; per-trial wall, training and overhead."""
    spec = parse_spec({"method": "es", "base": base, "space": SPACE, "n_trials": trials, "pruner": "none"})
    tic = time.perf_counter()
    result = driver.run_sweep(spec, tmp / name, parallel=parallel, log=lambda line: print(f"  {line}"))
    total = time.perf_counter() - tic
    rows = []
    for t in sorted(result.timings, key=lambda t: t.number):
        rows.append(
            {"trial": t.number, "state": t.state, "ask": t.ask, "wall": t.wall, "train": t.train or 0.0}
            | {"start": t.start, "open": t.open, "overhead": t.wall - (t.train or 0.0)}
        )
    return {
        "setup": name,
        "parallel": parallel,
        "study_open": result.open_seconds,
        "total": total,
        "trials": rows,
    }


def print_sweep(res: dict) -> None:
    print(f"\n{res['setup']} (--parallel {res['parallel']}): whole sweep {res['total']:.1f} s, study "
          f"created in {ms(res['study_open'])}")  # fmt: skip
    print(
        "\n| trial | wall s | training s | overhead s | of which: ask | process start (imports, opening the "
        "study) | opening the study | the rest (tell, process exit, driver) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in res["trials"]:
        start = f"{r['start']:.2f} s" if r["start"] is not None else "-"
        opened = f"{r['open']:.2f} s" if r["open"] is not None else "-"
        rest = r["overhead"] - r["ask"] - (r["start"] or 0.0)
        print(f"| {r['trial']} | {r['wall']:.2f} | {r['train']:.2f} | {r['overhead']:.2f} | {ms(r['ask'])} | "
              f"{start} | {opened} | {rest:.2f} s |")  # fmt: skip
    over = [r["overhead"] for r in res["trials"]]
    train = [r["train"] for r in res["trials"]]
    print(f"\nmedian overhead {statistics.median(over):.2f} s per trial against {statistics.median(train):.2f} s "
          f"of training ({statistics.median(over) / max(statistics.median(train), 1e-9):.1%})")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--embedded", action="store_true", help="also sweep the embedded 0.5B model")
    p.add_argument("--json", help="write all measurements here")
    args = p.parse_args()
    out: dict = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        from helpers import build_tiny_model

        tiny = build_tiny_model(tmp / "tiny")
        print(f"optuna {optuna.__version__}, SQLite storage")
        o = optuna_alone(tmp, tiny)
        out["optuna"] = o
        print(f"\ncreate study {ms(o['create'])}, load study {ms(o['load'])}, one trial's storage writes "
              f"(attributes, 2 reports + should_prune, tell) {ms(o['writes'])}")  # fmt: skip
        print("\n| finished trials | study.ask (TPE, mean of 5) |\n|---|---|")
        for n, s in o["ask"].items():
            print(f"| {n} | {ms(s)} |")
        base = {"model": str(tiny), "task": "conciseness", "iterations": 2, "eval_every": 1, "eval_limit": 2,
                "max_new_tokens": 8, "prompts_per_iteration": 2, "dtype": "float32"}  # fmt: skip
        out["tiny"] = []
        for parallel in (1, 2):
            res = sweep(tmp, f"tiny-p{parallel}", base, args.trials, parallel)
            print_sweep(res)
            out["tiny"].append(res)
        if args.embedded:
            base = {"task": "conciseness", "iterations": 2, "eval_every": 2, "max_new_tokens": 32,
                    "noise": "lowrank", "prompts_per_iteration": 2}  # fmt: skip
            out["embedded"] = []
            for parallel in (1, 2):
                res = sweep(tmp, f"embedded-p{parallel}", base, 2, parallel)
                print_sweep(res)
                out["embedded"].append(res)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
