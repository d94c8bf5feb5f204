"""Experiment trackers: where a run's metrics go besides its own logs (``--report-to``).

The names and their meaning are transformers' and TRL's ``report_to``: ``tensorboard`` (the default,
``<run>/events``), ``wandb`` (Weights & Biases), ``mlflow``, ``trackio``, several at once, ``all`` (every
one of those four whose package is installed) or ``none`` (no tracker; metrics.jsonl, eval.jsonl and the
seed log are always written). Both trainers (ES and GRPO) build them with :func:`trackers_for`, and every
tracker is an :class:`esft.callbacks.Callback`, so each one receives the same rows under the same names:

- ``on_log``: a metrics.jsonl row's numbers (``train/reward_mean``, ``es/update_norm``, ``grpo/loss``,
  ``perf/seconds``, ``samples``, ...) at step = the iteration (GRPO: the optimizer step);
- ``on_evaluate``: the evaluation's scalars (``eval/<metric>``, or ``eval/<split>/<metric>``);
- the run's config.yaml, recorded once (W&B config, MLflow params, Trackio config);
- ``on_train_end``: the tracker's run is finished (MLflow: FAILED or KILLED when training raised).

Where the data goes, unless the environment says otherwise with each tool's own variables:

- W&B: ``dir=<run>`` (``WANDB_DIR``), project ``esft`` (``WANDB_PROJECT``); ``WANDB_MODE=offline``
  keeps it in ``<run>/wandb`` for a later ``wandb sync``. Without that, esft asks wandb for the login
  before the run folder is touched, so a missing API key is a one-line error, not a half-started run.
- MLflow: the SQLite store ``<run>/mlflow.db`` (``MLFLOW_TRACKING_URI``; MLflow 3.17 refuses its old
  ``file:`` store unless ``MLFLOW_ALLOW_FILE_STORE=true``), experiment ``esft``
  (``MLFLOW_EXPERIMENT_NAME``).
- Trackio: its local database of project ``esft`` (``TRACKIO_PROJECT``) under ``TRACKIO_DIR`` (default
  ``$HF_HOME/trackio``, ``~/.cache/huggingface/trackio``): Trackio reads that folder once per process, when it is first
  imported, so it cannot follow each run folder; ``TRACKIO_SPACE_ID`` sends it to a Space instead.

``--resume`` continues the same tracker run: ``<run>/trackers.json`` keeps the run's tracker id (W&B's
run id, Trackio's run name: the run folder's name plus a random suffix, so that two folders of the same
name never share a run) and MLflow's run id with its tracking URI. A resumed GRPO run goes back to its
last training state and redoes the steps after it that an earlier attempt had logged
(``RunInfo.logged_through``). W&B, MLflow and Trackio cannot replace a logged step (W&B would take the
rows again, MLflow and Trackio would hold the step twice), so they skip the redone rows and keep the
first attempt's: the same numbers, as the redone steps are bit-identical (TRL's RNG and data position
are restored), except the timings (``perf/*``). TensorBoard drops the old events (``purge_step``) and
logs the redone ones.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from esft.callbacks import Callback, RunInfo, TensorBoardCallback, scalars
from esft.errors import ConfigError, first_line

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
REPORT_TO = (*TRACKERS, "all", "none")  # what report_to accepts
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
PROJECT = "esft"  # W&B project, MLflow experiment and Trackio project unless the environment names one
STATE_FILE = "trackers.json"  # in the run folder: the tracker runs that --resume continues
STEP = "iteration"  # W&B's x axis: the metrics.jsonl column


def parse_report_to(value: Any) -> list[str]:
    """``report_to`` in its canonical form: a list of names (a string may hold several, comma-separated),
    ``["all"]`` or ``["none"]``; a one-line ConfigError listing the valid names otherwise."""
    valid = ", ".join(REPORT_TO)
    if value is None:
        return ["none"]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"report_to must be a list of names ({valid}), got {value!r}")
    names = list(dict.fromkeys(n.strip() for v in items for n in v.split(",") if n.strip()))
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown:
        raise ConfigError(f"unknown report_to {', '.join(unknown)}; valid: {valid} (several at once)")
    if len(names) > 1 and {"all", "none"} & set(names):
        raise ConfigError(f"report_to: all and none stand alone, got {' '.join(names)}")
    return names or ["none"]


def installed() -> list[str]:
    """The trackers whose package is installed: what ``all`` means."""
    return [t for t in TRACKERS if importlib.util.find_spec(PACKAGES[t]) is not None]


def resolve(report_to: Any) -> list[str]:
    """The trackers ``report_to`` asks for (``all``: the installed ones; ``none``: none)."""
    names = parse_report_to(report_to)
    if names == ["none"]:
        return []
    return installed() if names == ["all"] else names


def trackers_for(report_to: Any) -> list[Callback]:
    """One callback per tracker of ``report_to``; a one-line ConfigError when a package is missing."""
    return [FACTORIES[name]() for name in resolve(report_to)]


def _require(name: str) -> Any:
    """Import tracker ``name``'s package, or a one-line ConfigError saying what to install."""
    package = PACKAGES[name]
    try:
        return importlib.import_module(package)
    except ImportError as e:
        why = "is not installed" if isinstance(e, ModuleNotFoundError) else f"fails to import ({e})"
        raise ConfigError(
            f"--report-to {name}: the {package} package {why}; pip install {package} "
            f"(or pip install -e '.[trackers]'), or drop {name} from --report-to"
        ) from None


def _failure() -> str | None:
    """MLflow's status for a run ending because of the exception in flight (trainers call
    ``on_train_end`` from a ``finally``): KILLED (interrupted), FAILED, or None when there is none."""
    error = sys.exc_info()[1]
    if error is None:
        return None
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"


# -- the run folder's tracker state (trackers.json) ------------------------------------------------


def read_state(root: Path) -> dict[str, Any]:
    """``<run>/trackers.json``: the tracker runs of the run in ``root`` ({} if none was started)."""
    try:
        state = json.loads((Path(root) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _remember(root: Path, tracker: str, info: dict[str, Any]) -> None:
    state = read_state(root)
    state[tracker] = info
    _write_state(root, state)


def _write_state(root: Path, state: dict[str, Any]) -> None:
    path = Path(root) / STATE_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(path)


def _run_key(root: Path) -> str:
    """The run's id in W&B and name in Trackio: the folder's name and a random suffix, chosen on the first
    start and kept in trackers.json, so a resume finds it and two folders named alike never share it."""
    state = read_state(root)
    if not state.get("id"):
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(root).resolve().name).strip("-.")[:48] or "run"
        state["id"] = f"{slug}-{secrets.token_hex(4)}"
        _write_state(root, state)
    return str(state["id"])


# -- the trackers ----------------------------------------------------------------------------------


class _StepTracker(Callback):
    """A tracker that stores scalars at a step (metrics rows and evaluations alike, ``_write``) and
    cannot replace a step it holds. A resumed GRPO run redoes the steps after its last training state
    that an earlier attempt logged (after ``RunInfo.start``, up to ``logged_through`` for metrics rows
    and ``evaluated_through`` for evaluations); those rows are skipped, the first attempt's kept."""

    _redone = (0, 0, 0)

    def on_train_begin(self, run: RunInfo) -> None:
        self._redone = (run.start, run.logged_through, run.evaluated_through)
        self._open(run)

    def on_log(self, metrics: dict[str, Any], step: int) -> None:
        if self._new(step, self._redone[1]):
            self._write(scalars(metrics), step)

    def on_evaluate(self, scalars: dict[str, float], rows: list[dict[str, Any]], step: int) -> None:
        if self._new(step, self._redone[2]):
            self._write(dict(scalars), step)

    def _new(self, step: int, logged_through: int) -> bool:
        return not self._redone[0] < step <= logged_through

    def _open(self, run: RunInfo) -> None:
        raise NotImplementedError

    def _write(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError


class WandbCallback(_StepTracker):
    """Weights & Biases: one W&B run per run folder, resumed by id (``resume="allow"``)."""

    def __init__(self) -> None:
        self.wandb = _require("wandb")
        self.run: Any = None
        if os.environ.get("WANDB_MODE", "").lower() not in ("offline", "dryrun", "disabled"):
            # online: find the API key now (or prompt for it in a terminal), before the run folder exists
            try:
                self.wandb.login(verify=False)
            except self.wandb.errors.UsageError as e:
                first = first_line(e)
                raise ConfigError(
                    f"--report-to wandb: {first} Or set WANDB_MODE=offline to keep the W&B run in the "
                    "run folder and upload it later with wandb sync"
                ) from None

    def _open(self, run: RunInfo) -> None:
        key = _run_key(run.root)
        self.run = self.wandb.init(
            project=os.environ.get("WANDB_PROJECT") or PROJECT,
            name=Path(run.root).resolve().name,
            id=key,
            resume="allow",
            dir=None if os.environ.get("WANDB_DIR") else str(run.root),
            reinit="create_new",  # esft's own run, beside any run the caller has open
        )
        self.run.config.update(run.config, allow_val_change=True)  # a resume may change RESUMABLE ones
        self.run.define_metric(STEP)
        self.run.define_metric("*", step_metric=STEP, step_sync=True)
        _remember(run.root, "wandb", {"id": key, "project": self.run.project})

    def _write(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, STEP: step})

    def on_train_end(self) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=1 if _failure() else 0)


class MLflowCallback(_StepTracker):
    """MLflow, through its client (no global active run): one MLflow run per run folder, reopened by
    the id kept in trackers.json."""

    def __init__(self) -> None:
        _require("mlflow")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils import validation

        self.Metric, self.Param, self.Client, self.limits = Metric, Param, MlflowClient, validation
        self.client: Any = None
        self.run_id: str | None = None

    def _open(self, run: RunInfo) -> None:
        root = Path(run.root).resolve()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
        self.client = client = self.Client(uri)
        saved = read_state(root).get("mlflow", {})
        self.run_id = saved.get("run_id") if saved.get("tracking_uri") == uri else None
        if self.run_id is not None:
            try:
                client.update_run(self.run_id, status="RUNNING")
            except Exception:  # deleted or unreachable: start another
                self.run_id = None
        if self.run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
            experiment = client.get_experiment_by_name(name)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:
                own = not os.environ.get("MLFLOW_TRACKING_URI")
                artifacts = (root / "mlartifacts").as_uri() if own else None
                experiment_id = client.create_experiment(name, artifact_location=artifacts)
            self.run_id = client.create_run(experiment_id, run_name=root.name).info.run_id
        # the config once: params cannot change in MLflow, so a resume adds only new ones
        logged = client.get_run(self.run_id).data.params
        params = [self.Param(k, v) for k, v in _flat(run.config) if k not in logged]
        size, longest = self.limits.MAX_PARAMS_TAGS_PER_BATCH, self.limits.MAX_PARAM_VAL_LENGTH
        params = [self.Param(p.key, p.value[:longest]) for p in params]
        for i in range(0, len(params), size):
            client.log_batch(self.run_id, params=params[i : i + size])
        _remember(root, "mlflow", {"tracking_uri": uri, "run_id": self.run_id})

    def _write(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self.Metric(_metric_key(k), v, now, step) for k, v in values.items()]
        size = self.limits.MAX_METRICS_PER_BATCH
        for i in range(0, len(metrics), size):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + size])

    def on_train_end(self) -> None:
        if self.run_id is not None:
            run_id, self.run_id = self.run_id, None
            self.client.set_terminated(run_id, status=_failure() or "FINISHED")


class TrackioCallback(_StepTracker):
    """Trackio: one Trackio run per run folder, resumed by name (``resume="allow"``)."""

    def __init__(self) -> None:
        self.trackio = _require("trackio")
        self.run: Any = None

    def _open(self, run: RunInfo) -> None:
        key = _run_key(run.root)
        project = os.environ.get("TRACKIO_PROJECT") or PROJECT
        self.run = self.trackio.init(
            project=project, name=key, config=run.config, resume="allow", embed=False
        )
        where = getattr(getattr(self.trackio, "utils", None), "TRACKIO_DIR", None)
        _remember(run.root, "trackio", {"project": project, "name": key, "dir": str(where)})

    def _write(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def on_train_end(self) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            current = self.trackio.context_vars.current_run
            if current.get() is run:
                self.trackio.finish()  # also clears trackio's current run
            else:
                run.finish()


def _metric_key(key: str) -> str:
    """MLflow's allowed characters (as transformers' MLflowCallback sanitises them)."""
    return re.sub(r"[^0-9A-Za-z_\-. :/]", "_", key)


def _flat(config: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """A config as MLflow params: nested mappings flattened with dots, values as strings."""
    out: list[tuple[str, str]] = []
    for k, v in config.items():
        key = _metric_key(f"{prefix}{k}")
        if isinstance(v, dict) and v:
            out += _flat(v, f"{key}.")
        else:
            out.append((key, json.dumps(v) if isinstance(v, list | dict | bool) or v is None else str(v)))
    return out


FACTORIES: dict[str, type[Callback]] = {
    "tensorboard": TensorBoardCallback,
    "wandb": WandbCallback,
    "mlflow": MLflowCallback,
    "trackio": TrackioCallback,
}
