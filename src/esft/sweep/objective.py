"""One trial: its settings (the sweep's base, the sampled parameters, the derived settings) trained as an
ordinary run folder ``SWEEP/trials/trial-NNNN`` by the ES trainer or the GRPO run, scored at the periodic
evaluation and pruned there.

:class:`Objective` is an Optuna objective (``study.optimize(Objective(spec, root))`` works too): it
returns the objective metric of the run's last evaluation. :class:`PruningCallback` reports the metric
at every periodic evaluation (``trial.report(value, iteration)``; iteration 0, the base model before
training, is not reported) and, when ``trial.should_prune()``, sets the trainer's ``stop``: the run
ends after that iteration, checkpointed like any run that stops early, and the objective then raises
``optuna.TrialPruned``. :func:`run_trial` is Optuna's own handling of an objective's outcome (complete,
pruned, failed), for a trial asked elsewhere.

``python -m esft.sweep.objective SWEEP NUMBER`` runs trial NUMBER of the sweep in ``SWEEP`` in a process
of its own (``esft sweep --parallel K``); :func:`ray_trial` does the same in a Ray task.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from esft.callbacks import Callback
from esft.errors import ConfigError, EsftError, first_line
from esft.sweep import layout
from esft.sweep.space import SweepSpec, parse_spec


def one_line(e: BaseException) -> str:
    """An exception as one line: an esft error's message, or the type and the first line."""
    if isinstance(e, EsftError) or not str(e).strip():
        return first_line(e)
    return f"{type(e).__name__}: {first_line(e)}"


class PruningCallback(Callback):
    """Reports the objective metric of every periodic evaluation to an Optuna trial; stops the run
    when the trial's pruner says so."""

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.value: float | None = None  # the metric at the last evaluation (None: not finite there)
        self.step: int | None = None  # the iteration of the last evaluation
        self.pruned_at: int | None = None

    def on_evaluate(self, scalars: dict[str, float], rows: list[dict[str, Any]], step: int) -> None:
        self.step, self.value = step, scalars.get(self.metric)
        if self.value is None and self.metric not in _known_scalars(rows):
            raise ConfigError(
                f"objective metric {self.metric} is not a scalar of the periodic evaluation; it has: "
                f"{', '.join(sorted(_known_scalars(rows)))}"
            )
        if step == 0 or self.value is None:  # the base model; or a NaN: nothing to report
            return
        self.trial.report(self.value, step)
        if self.pruned_at is None and self.trial.should_prune():
            self.pruned_at = step
            pruner = type(self.trial.study.pruner).__name__
            self.stop = f"pruned by the sweep's {pruner} ({self.metric} {self.value:.4g})"


def _known_scalars(rows: list[dict[str, Any]]) -> set[str]:
    """The evaluation scalars' names, NaN ones too (periodic_eval passes on only the finite)."""
    splits = [r.get("split", "test") for r in rows]
    out = set()
    for r in rows:
        prefix = "eval" if len(splits) == 1 else f"eval/{r.get('split', 'test')}"
        out |= {f"{prefix}/{k}" for k, v in r.items() if isinstance(v, int | float) and k != "iteration"}
    return out


def train_run(method: str, config: Any, callbacks: list[Callback], progress: bool = False) -> Any:
    """Train one run folder with the sweep's trainer; its TrainResult."""
    if method == "grpo":
        from esft.grpo import GRPORun

        return GRPORun(config, progress=progress, callbacks=callbacks).train()
    from esft.trainer import ESTrainer

    return ESTrainer(config, progress=progress, callbacks=callbacks).train()


class Objective:
    """The sweep's Optuna objective: one trial trained as the run folder ``root/trials/trial-NNNN``."""

    def __init__(self, spec: SweepSpec, root: str | Path, progress: bool = False) -> None:
        self.spec = spec
        self.root = Path(root)
        self.progress = progress

    def __call__(self, trial: Any) -> float:
        import optuna

        spec = self.spec
        settings, derived = spec.settings(trial.params)
        run_dir = layout.trial_dir(self.root, trial.number)
        settings["output"] = str(run_dir)
        trial.set_user_attr("run_dir", f"{layout.TRIALS}/{run_dir.name}")
        if derived:
            trial.set_user_attr("derived", derived)
        config = spec.config_class.from_dict(settings, f"trial {trial.number}")
        if not self.progress:  # a quiet trial: no "Writing model shards" bar at every checkpoint either
            with contextlib.suppress(ImportError):
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
        pruning = PruningCallback(trial, spec.metric)
        tic = time.perf_counter()
        result = train_run(spec.method, config, [pruning], self.progress)
        trial.set_user_attr("train_seconds", round(time.perf_counter() - tic, 3))
        trial.set_user_attr("iterations", int(result.iterations))
        if pruning.pruned_at is not None:
            raise optuna.TrialPruned(f"pruned at iteration {pruning.pruned_at}")
        if pruning.value is None or not math.isfinite(pruning.value):
            raise ConfigError(
                f"{spec.metric} was not a finite number at the last evaluation (iteration {pruning.step}); "
                f"see {run_dir}/eval.jsonl"
            )
        return float(pruning.value)


def run_trial(study: Any, trial: Any, objective: Objective) -> tuple[Any, BaseException | None]:
    """Run ``objective`` on ``trial`` and tell ``study`` the outcome, as Optuna's ``optimize`` does:
    a value is COMPLETE, ``TrialPruned`` is PRUNED (with the last reported value), an exception is
    FAIL (its one-line message kept as the trial's user attribute ``error``). Returns (the finished
    trial, the exception or None). A KeyboardInterrupt marks the trial FAIL and goes on up."""
    import optuna
    from optuna.trial import TrialState

    error: BaseException | None = None
    try:
        value = objective(trial)
    except optuna.TrialPruned:
        return study.tell(trial, state=TrialState.PRUNED), None
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            trial.set_user_attr("error", "interrupted")
            study.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as e:
        error = e
        with contextlib.suppress(Exception):
            trial.set_user_attr("error", one_line(e))
        return study.tell(trial, state=TrialState.FAIL), error
    return study.tell(trial, value), None


def open_trial(root: Path, number: int) -> tuple[Any, Any, SweepSpec]:
    """(the study, trial ``number`` as a live ``optuna.trial.Trial``, the sweep's spec), from the sweep
    folder: what a trial's own process (or Ray task) starts with."""
    import optuna

    saved = layout.read_spec(root)
    spec = parse_spec(saved, str(root / layout.SPEC_FILE))
    study = layout.load_study(root, saved, spec.make_sampler(), spec.make_pruner())
    frozen = study.get_trials(deepcopy=False)[number]  # a study's trials are numbered 0, 1, ...
    # Optuna's Trial is built from the storage's trial id (what Study.ask does); the number is its
    # position in the study
    return study, optuna.trial.Trial(study, frozen._trial_id), spec


def execute(root: str | Path, number: int, threads: int | None = None, spawned: float | None = None) -> str:
    """Run trial ``number`` of the sweep in ``root`` in this process (its own process, or a Ray task)
    with ``threads`` torch threads; the trial's final state's name."""
    root = Path(root)
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
    tic = time.perf_counter()
    study, trial, spec = open_trial(root, number)
    opened = time.perf_counter() - tic
    if spec.method == "grpo":  # imported now, so that train_seconds is the trainer's own time
        import esft.grpo  # noqa: F401
    else:
        import esft.trainer  # noqa: F401
    if spawned is not None:  # the process's start: interpreter, imports, opening the study
        trial.set_user_attr("start_seconds", round(time.time() - spawned, 3))
    trial.set_user_attr("open_seconds", round(opened, 3))
    if threads:
        trial.set_user_attr("threads", threads)
    frozen, error = run_trial(study, trial, Objective(spec, root))
    if error is not None:
        traceback.print_exception(error)
    return frozen.state.name


def ray_trial(root: str, number: int, threads: int, cwd: str) -> str:
    """A Ray task: trial ``number`` in the Ray worker's process, its output into the trial's log."""
    os.chdir(cwd)  # relative paths in the settings (a model folder, a data file) mean what they did
    path = layout.log_path(Path(root), number)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return execute(root, number, threads, None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m esft.sweep.objective", description="run one trial of a sweep")
    p.add_argument("sweep")
    p.add_argument("number", type=int)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--spawned", type=float, default=None, help="time.time() when the driver started it")
    args = p.parse_args(argv)
    try:
        state = execute(Path(args.sweep), args.number, args.threads or None, args.spawned)
    except KeyboardInterrupt:
        return 130
    except EsftError as e:  # before the trial ran (a broken sweep folder)
        print(f"esft: error: {e}", file=sys.stderr)
        return 2
    return 0 if state != "FAIL" else 1


if __name__ == "__main__":
    code = main()
    # The outcome is in the storage and the run folder is closed: skip the interpreter's teardown of
    # torch and transformers (about a second per trial process, measured in docs/benchmarks.md).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
