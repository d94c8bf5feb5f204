"""``esft sweep --config SWEEP.yaml --output DIR``: hyperparameter search with Optuna (``docs/sweeps.md``).

``add_parser(subparsers)`` adds the command; ``run(args)`` runs it and returns the exit code. Nothing
heavy is imported until the command runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from esft.errors import ConfigError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sweep",
        help="hyperparameter search with Optuna: trials as run folders, pruned at the periodic evaluation",
        description=(
            "Search training settings with Optuna (TPE by default, median pruning at the periodic "
            "evaluation). Every trial is an ordinary run folder SWEEP/trials/trial-NNNN; the study is "
            "stored in SWEEP (study.db), so --resume continues an interrupted sweep. docs/sweeps.md."
        ),
    )
    p.add_argument(
        "--config", help="the sweep file (YAML/TOML/JSON): method, base, space, n_trials, objective"
    )
    p.add_argument("--output", help="the sweep folder (default: sweeps/<time>-<method>-<task>)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the sweep in --output: finished trials are kept, interrupted and failed ones re-run",
    )
    p.add_argument("--n-trials", type=int, metavar="N", help="finished trials to reach (overrides the file)")
    p.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="K",
        help="trials at a time: 1 runs them in this process; K > 1 in K processes with cores/K torch "
        "threads each (or K Ray tasks with --ray)",
    )
    p.add_argument("--ray", action="store_true", help="run the trials as Ray tasks on a local Ray cluster")
    p.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="run the trials as Ray tasks on the running cluster there (the sweep folder and its storage "
        "must be reachable from every node; docs/sweeps.md)",
    )
    p.add_argument(
        "--gpus-per-trial", type=float, default=0.0, metavar="G", help="GPUs per Ray task (default 0)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="start no trial after this many seconds (running ones finish; as Optuna's optimize(timeout)); "
        "--resume continues",
    )
    p.add_argument("--quiet", action="store_true", help="no line per finished trial")
    return p


def run(args: argparse.Namespace) -> int:
    from esft.sweep.driver import run_sweep, summary
    from esft.sweep.space import read_sweep_file

    if args.resume and not args.output:
        raise ConfigError("--resume needs --output SWEEP, the folder of the sweep to continue")
    spec = read_sweep_file(args.config) if args.config else None
    if spec is None and not args.resume:
        raise ConfigError("esft sweep needs --config SWEEP.yaml (or --resume --output SWEEP)")
    output = args.output
    if output is None:
        assert spec is not None
        task = spec.base.get("task") or spec.config_class().task
        output = f"sweeps/{time.strftime('%Y%m%d-%H%M%S')}-{spec.method}-{task}"

    def log(line: str) -> None:
        if not args.quiet:
            print(line, flush=True)

    try:
        result = run_sweep(
            spec,
            output,
            resume=args.resume,
            parallel=args.parallel,
            n_trials=args.n_trials,
            ray=args.ray,
            ray_address=args.ray_address,
            gpus_per_trial=args.gpus_per_trial,
            log=log,
            timeout=args.timeout,
        )
    except KeyboardInterrupt:
        print(f"\nesft: interrupted. Continue with:  esft sweep --output {output} --resume", file=sys.stderr)
        return 130
    for line in summary(result):
        print(line)
    return 0
