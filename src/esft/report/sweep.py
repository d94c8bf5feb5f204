"""A sweep folder (``esft sweep``) -> plain data for the report: its trials, the best ones, parameter
importance. Reads the saved sweep file and the Optuna study (through ``esft.sweep.layout``, with
optuna only: no trainer, no torch).

Importance is Optuna's ``get_param_importances`` (fANOVA, seeded) over the completed trials; it needs
at least two of them with different parameter values, and the page says so when there are fewer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esft.errors import ConfigError, first_line
from esft.sweep import layout

IMPORTANCE_SEED = 0


@dataclass
class TrialRow:
    """One trial of a sweep, as the report shows it."""

    number: int
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    value: float | None  # the objective (a pruned trial: its last reported value)
    params: dict[str, Any]
    derived: dict[str, Any]
    intermediate: dict[int, float]  # iteration -> the objective metric at that evaluation
    run_dir: Path | None  # the trial's run folder, when it exists
    iterations: int | None
    error: str = ""
    retry_of: int | None = None  # the failed trial this one re-runs


@dataclass
class Sweep:
    """One sweep folder, read once."""

    spec: str  # the argument as given
    path: Path
    name: str  # the study's name
    config: dict[str, Any]  # the saved sweep file
    metric: str
    direction: str  # maximize or minimize
    trials: list[TrialRow]
    kinds: dict[str, str]  # parameter -> "log", "linear" or "categorical"
    importance: dict[str, float] = field(default_factory=dict)
    importance_note: str = ""

    @property
    def method(self) -> str:
        return str(self.config.get("method", "es"))

    @property
    def n_trials(self) -> int | None:
        n = self.config.get("n_trials")
        return int(n) if isinstance(n, int) else None

    def states(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.trials:
            out[t.state] = out.get(t.state, 0) + 1
        return out

    def best(self, k: int | None = None) -> list[TrialRow]:
        """The completed trials, best first (the first ``k``)."""
        done = [t for t in self.trials if t.state == "COMPLETE" and t.value is not None]
        done.sort(key=lambda t: t.value, reverse=self.direction == "maximize")
        return done if k is None else done[:k]

    def param_names(self) -> list[str]:
        return list(self.kinds)


def _kind(distribution: Any) -> str:
    if hasattr(distribution, "choices"):
        return "categorical"
    return "log" if getattr(distribution, "log", False) else "linear"


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def load_sweep(spec: str) -> Sweep:
    """Read the sweep folder ``spec`` (sweep.yaml and its study); one-line ConfigErrors."""
    root = Path(spec).expanduser()
    config = layout.read_spec(root)
    try:
        study = layout.load_study(root, config)
    except ConfigError as e:
        if "not installed" in str(e):
            raise ConfigError(f"{spec} is a sweep; reading it needs Optuna: {layout.INSTALL}") from None
        raise
    objective = config.get("objective") or {}
    metric = str(objective.get("metric") or "eval/reward")
    direction = "maximize" if study.direction.name == "MAXIMIZE" else "minimize"
    trials: list[TrialRow] = []
    kinds: dict[str, str] = {}
    for t in study.get_trials(deepcopy=False):
        for name, d in t.distributions.items():
            kinds.setdefault(name, _kind(d))
        rel = t.user_attrs.get("run_dir")
        run_dir = root / rel if rel and (root / rel / "config.yaml").is_file() else None
        value = t.value if _finite(t.value) else None
        if value is None and t.state.name == "PRUNED" and t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        trials.append(
            TrialRow(
                number=t.number,
                state=t.state.name,
                value=value,
                params=dict(t.params),
                derived=dict(t.user_attrs.get("derived") or {}),
                intermediate={int(k): float(v) for k, v in t.intermediate_values.items() if _finite(v)},
                run_dir=run_dir,
                iterations=t.user_attrs.get("iterations"),
                error=str(t.user_attrs.get("error") or ""),
                retry_of=t.system_attrs.get("failed_trial"),
            )
        )
    sweep = Sweep(spec, root, layout.study_name(root, config), config, metric, direction, trials, kinds)
    sweep.importance, sweep.importance_note = importance(study, sweep)
    return sweep


def importance(study: Any, sweep: Sweep) -> tuple[dict[str, float], str]:
    """(parameter -> importance, summing to 1; a note when it cannot be computed)."""
    import optuna

    done = sweep.best()
    varied = [n for n in sweep.kinds if len({repr(t.params.get(n)) for t in done}) > 1]
    if len(done) < 2 or not varied:
        return {}, (
            f"parameter importance needs at least 2 completed trials with different parameter values; "
            f"{len(done)} completed"
        )
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=IMPORTANCE_SEED)
        found = optuna.importance.get_param_importances(study, evaluator=evaluator, params=varied)
    except (ValueError, RuntimeError) as e:
        return {}, f"parameter importance could not be computed: {first_line(e)}"
    note = ""
    if len(varied) < len(sweep.kinds):
        fixed = [n for n in sweep.kinds if n not in varied]
        note = f"{', '.join(fixed)} took one value in every completed trial: no importance"
    return {k: float(v) for k, v in found.items()}, note


def trial_runs(sweep: Sweep, k: int) -> list[Path]:
    """The run folders of the sweep's ``k`` best trials (those that exist)."""
    return [t.run_dir for t in sweep.best(k) if t.run_dir is not None]
