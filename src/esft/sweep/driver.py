"""The sweep driver: creates (or, with ``--resume``, loads) the study, asks Optuna for trials and runs
them, one at a time in this process, K at a time in processes of their own (``--parallel K``), or as
Ray tasks (``--ray`` / ``--ray-address``), until ``n_trials`` have finished.

- **Storage.** The study lives in the sweep folder (``layout``): SQLite by default, which every
  process on this machine (and every Ray task of a local cluster) opens; each trial's process reports
  its own intermediate values there and tells Optuna its outcome. Study name: the sweep folder's name.
- **Asking.** The driver alone asks (``study.ask(distributions)``: the sampler runs here, once per
  trial) and hands the trial's number to whatever runs it; TPE's constant liar (Optuna's default)
  keeps parallel trials apart.
- **Counting.** ``n_trials`` counts finished trials (complete, pruned, or failed and not re-run), over
  the sweep's whole life: a resumed sweep runs only the rest.
- **Failures.** A trial that raises is FAIL, with its one-line error as the user attribute ``error``.
  As in Optuna's ``optimize`` (``catch=()``), that stops the sweep (the trials running then finish
  first), unless the sweep file says ``catch: true``.
- **Resume.** One driver per sweep (``SWEEP/.lock``). ``--resume`` marks the trials a killed sweep left
  RUNNING as FAIL, and re-runs every failed trial once more with its parameters, as Optuna's
  ``RetryHeartbeatStaleTrialCallback`` does: a WAITING copy with the system attributes
  ``failed_trial`` (the first trial of the series) and ``retry_history``, at most ``MAX_RETRY`` times
  per series. Completed and pruned trials are never run again. The sampler's seed moves by the number
  of trials so far, so a resumed sweep does not redraw the points it drew before.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esft.errors import ConfigError, EsftError
from esft.runstore import take_lock
from esft.sweep import layout
from esft.sweep.space import SweepSpec, parse_spec

MAX_RETRY = 3  # re-runs of one failed trial, over all resumes
POLL_S = 0.2


@dataclass
class TrialTiming:
    """Where one trial's wall time went, as the driver saw it (seconds)."""

    number: int
    ask: float = 0.0  # study.ask: sampling, and the new trial's storage writes
    wall: float = 0.0  # from before the ask to the driver seeing the trial finished
    train: float | None = None  # the trainer: model load, training, evaluations (the trial's own clock)
    start: float | None = None  # a trial process's start: interpreter and imports (None in process)
    open: float | None = None  # opening the study in the trial's process
    state: str = ""


@dataclass
class SweepResult:
    root: Path
    study: Any
    spec: SweepSpec
    open_seconds: float  # creating or loading the study
    timings: list[TrialTiming] = field(default_factory=list)
    interrupted: bool = False
    timed_out: bool = False  # --timeout passed with trials left to run


class SweepLock:
    """One driver per sweep folder: an OS file lock (released when the process exits or is killed)."""

    def __init__(self, root: Path) -> None:
        self.path = root / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> SweepLock:
        self.fd = take_lock(
            self.path,
            lambda holder: (
                f"{self.path.parent} is in use{holder}: one esft sweep drives a sweep at a time "
                "(give it more trial processes with --parallel); wait for it or stop it, then --resume"
            ),
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# -- trial states ----------------------------------------------------------------------------------


def retried(trials: list[Any]) -> set[int]:
    """Numbers of the trials a later trial re-runs (Optuna's ``retry_history`` system attribute)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def counted(trials: list[Any]) -> int:
    """Finished trials toward ``n_trials``: complete, pruned, or failed and not re-run."""
    from optuna.trial import TrialState

    again = retried(trials)
    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(1 for t in trials if t.state in done and t.number not in again)


def retry(study: Any, trial: Any) -> bool:
    """Queue a WAITING copy of failed ``trial`` with its parameters (Optuna's
    ``RetryHeartbeatStaleTrialCallback``, without the failed trial's user attributes); False when
    its series has been re-run ``MAX_RETRY`` times."""
    import optuna

    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > MAX_RETRY:
        return False
    first = trial.system_attrs.get("failed_trial", trial.number)
    study.add_trial(
        optuna.create_trial(
            state=optuna.trial.TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            system_attrs={"failed_trial": first, "retry_history": history},
        )
    )
    return True


def mark_failed(study: Any, number: int, error: str) -> None:
    """Tell ``study`` that its RUNNING trial ``number`` failed (its process died, or was stopped)."""
    import optuna
    from optuna.trial import TrialState

    frozen = study.get_trials(deepcopy=False)[number]
    if frozen.state != TrialState.RUNNING:
        return
    trial = optuna.trial.Trial(study, frozen._trial_id)
    with contextlib.suppress(Exception):
        trial.set_user_attr("error", error)
    study.tell(number, state=TrialState.FAIL, skip_if_finished=True)


def recover(study: Any) -> tuple[int, int]:
    """``--resume``: the trials a killed sweep left RUNNING become FAIL; every failed trial not re-run
    yet is queued again. Returns (trials marked failed, trials queued)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    stale = [t.number for t in trials if t.state == TrialState.RUNNING]
    for number in stale:
        mark_failed(study, number, "interrupted: the sweep stopped while it ran")
    trials = study.get_trials(deepcopy=False)
    again = retried(trials)
    queued = sum(retry(study, t) for t in trials if t.state == TrialState.FAIL and t.number not in again)
    return len(stale), queued


# -- running trials --------------------------------------------------------------------------------


class InProcess:
    """Trials one at a time in this process (Optuna's own way: the objective is called here)."""

    capacity = 1

    def __init__(self, study: Any, spec: SweepSpec, root: Path) -> None:
        from esft.sweep.objective import Objective

        self.study, self.objective = study, Objective(spec, root)
        self.done: list[tuple[int, str | None]] = []

    def start(self, trial: Any) -> None:
        from esft.sweep.objective import run_trial

        run_trial(self.study, trial, self.objective)  # the error is the trial's user attribute
        self.done.append((trial.number, None))

    def wait(self) -> list[tuple[int, str | None]]:
        done, self.done = self.done, []
        return done

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass


def _die_with_parent() -> None:  # pragma: no cover (runs in the child before exec)
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: a killed driver takes its trials


class Processes:
    """Trials in processes of their own (``python -m esft.sweep.objective``), ``capacity`` at a time,
    each with ``threads`` torch threads and its output in ``SWEEP/logs/trial-NNNN.log``."""

    def __init__(self, root: Path, capacity: int, threads: int) -> None:
        self.root, self.capacity, self.threads = root, capacity, threads
        self.procs: dict[int, tuple[subprocess.Popen, Any]] = {}

    def start(self, trial: Any) -> None:
        path = layout.log_path(self.root, trial.number)
        path.parent.mkdir(parents=True, exist_ok=True)
        log = open(path, "ab")  # noqa: SIM115 (the child writes it; closed when the child ends)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        command = [sys.executable, "-m", "esft.sweep.objective", str(self.root), str(trial.number)]
        command += ["--threads", str(self.threads), "--spawned", repr(time.time())]
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        self.procs[trial.number] = (proc, log)

    def wait(self) -> list[tuple[int, str | None]]:
        while True:
            done = []
            for number, (proc, log) in list(self.procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                log.close()
                del self.procs[number]
                why = None if code in (0, 1) else f"its process exited with status {code}"
                done.append((number, why))
            if done:
                return done
            time.sleep(POLL_S)

    def stop(self) -> None:
        """Interrupt the running trials (as Ctrl-C does), then end them if they do not stop."""
        for proc, _ in self.procs.values():
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 30
        for proc, _ in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        self.stop()
        for _, log in self.procs.values():
            log.close()
        self.procs.clear()


class RayTasks:
    """Trials as Ray tasks (one fresh worker process each: ``max_calls=1``), ``capacity`` at a time,
    each with the CPUs (and ``gpus`` GPUs) of its share of the cluster. Ray is joined or started with
    esft.distributed's helpers, as ``esft train --workers`` does."""

    def __init__(
        self, root: Path, capacity: int, address: str | None, gpus: float, log: Callable[[str], None]
    ) -> None:
        from esft.distributed import INSTALL
        from esft.distributed.cluster import connect, import_ray

        try:
            self.ray = import_ray(capacity, address)
        except ConfigError:
            raise ConfigError(
                f"esft sweep --ray runs trials on Ray, which is not installed: {INSTALL}"
            ) from None
        self.started = connect(self.ray, address, capacity)
        total = self.ray.cluster_resources()
        cpus, have_gpus = float(total.get("CPU", 1.0)), float(total.get("GPU", 0.0))
        if capacity * gpus > have_gpus + 1e-9:
            self.close()
            raise ConfigError(
                f"--parallel {capacity} x --gpus-per-trial {gpus:g} needs {capacity * gpus:g} GPUs; the Ray "
                f"cluster has {have_gpus:g}"
            )
        self.cpus = max(1.0, cpus // capacity)
        self.root, self.capacity = root, capacity
        self.remote = self.ray.remote(num_cpus=self.cpus, num_gpus=gpus, max_calls=1, max_retries=0)(
            _ray_trial
        )
        self.refs: dict[Any, int] = {}
        log(
            f"esft sweep: Ray cluster with {cpus:g} CPUs and {have_gpus:g} GPUs; up to {capacity} trials at a "
            f"time, {self.cpus:g} CPUs{f' and {gpus:g} GPUs' if gpus else ''} each"
        )

    def start(self, trial: Any) -> None:
        ref = self.remote.remote(str(self.root), trial.number, int(self.cpus), os.getcwd())
        self.refs[ref] = trial.number

    def wait(self) -> list[tuple[int, str | None]]:
        ready, _ = self.ray.wait(list(self.refs), num_returns=1)
        out = []
        for ref in ready:
            number = self.refs.pop(ref)
            try:
                self.ray.get(ref)
                out.append((number, None))
            except Exception as e:  # the task's worker died, or the task raised before telling Optuna
                from esft.sweep.objective import one_line

                out.append((number, f"its Ray task failed: {one_line(e)}"))
        return out

    def stop(self) -> None:
        for ref in list(self.refs):
            with contextlib.suppress(Exception):
                self.ray.cancel(ref, force=True)

    def close(self) -> None:
        self.stop()
        self.refs.clear()
        if self.started:
            with contextlib.suppress(Exception):
                self.ray.shutdown()
            self.started = False


def _ray_trial(root: str, number: int, threads: int, cwd: str) -> str:
    from esft.sweep.objective import ray_trial

    return ray_trial(root, number, threads, cwd)


def usable_cpus() -> int:
    from esft.distributed.cluster import usable_cpus as cpus

    return cpus()


# -- the sweep -------------------------------------------------------------------------------------


def prepare(root: Path, spec: SweepSpec | None, resume: bool) -> tuple[SweepSpec, dict[str, Any]]:
    """The sweep's spec: a fresh sweep writes ``spec`` into the empty folder ``root``; ``--resume``
    reads the saved one (and checks that ``spec``, when given, is the same but for n_trials)."""
    saved_path = root / layout.SPEC_FILE
    if resume:
        if not saved_path.is_file():
            raise ConfigError(
                f"--resume: {root} holds no sweep (no {layout.SPEC_FILE}); drop --resume to start one"
            )
        saved = layout.read_spec(root)
        have = parse_spec(saved, str(saved_path))
        if spec is not None:
            mine = {k: v for k, v in spec.to_dict().items() if k != "n_trials"}
            theirs = {k: v for k, v in have.to_dict().items() if k != "n_trials"}
            changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            if changed:
                raise ConfigError(
                    f"--resume: {', '.join(changed)} differ from the sweep in {root}; resume with its own "
                    "settings (drop --config; --n-trials may change) or start a new sweep"
                )
        return have, saved
    if spec is None:
        raise ConfigError("esft sweep needs --config SWEEP.yaml (or --resume with --output of a sweep)")
    if saved_path.exists() or (root / layout.TRIALS).exists():
        raise ConfigError(
            f"{root} already holds a sweep; pass --resume to continue it or choose another --output"
        )
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--output {root} exists and is not a folder")
    saved = spec.to_dict()
    return spec, saved


def open_study(root: Path, spec: SweepSpec, saved: dict[str, Any], resume: bool) -> Any:
    """Create the study (fresh) or load it (``--resume``), with the spec's sampler and pruner."""
    optuna = layout.import_optuna()
    storage = layout.open_storage(root, spec.storage)
    name = layout.study_name(root, saved)
    if resume:
        study = layout.load_study(root, saved, None, spec.make_pruner())
        study.sampler = spec.make_sampler(seed_offset=len(study.get_trials(deepcopy=False)))
        return study
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            direction=spec.direction,
            sampler=spec.make_sampler(),
            pruner=spec.make_pruner(),
        )
    except optuna.exceptions.DuplicatedStudyError:
        raise ConfigError(
            f"the storage {layout.storage_url(root, spec.storage)} already holds a study named {name!r}; "
            "set study_name in the sweep file or choose another --output"
        ) from None
    study.set_user_attr("metric", spec.metric)
    study.set_user_attr("method", spec.method)
    for params in spec.enqueue:
        study.enqueue_trial(params, skip_if_exists=True)
    return study


def run_sweep(
    spec: SweepSpec | None,
    output: str | Path,
    resume: bool = False,
    parallel: int = 1,
    n_trials: int | None = None,
    ray: bool = False,
    ray_address: str | None = None,
    gpus_per_trial: float = 0.0,
    log: Callable[[str], None] = print,
    timeout: float | None = None,
) -> SweepResult:
    """Run (or continue) the sweep in ``output`` until ``n_trials`` trials have finished, or, with
    ``timeout``, until that many seconds have passed (as Optuna's ``optimize(timeout=)``: no trial starts
    after it, the running ones finish; ``--resume`` continues); see the module docstring. A
    KeyboardInterrupt marks the running trials FAIL (``--resume`` re-runs them) and goes on up; a failed
    trial raises EsftError once the others running have finished (unless ``catch``)."""
    if not isinstance(parallel, int) or parallel < 1:
        raise ConfigError(f"--parallel must be an integer >= 1, got {parallel!r}")
    if gpus_per_trial < 0:
        raise ConfigError(f"--gpus-per-trial must be >= 0, got {gpus_per_trial!r}")
    if timeout is not None and not timeout > 0:
        raise ConfigError(f"--timeout must be a number of seconds > 0, got {timeout!r}")
    deadline = None if timeout is None else time.perf_counter() + timeout
    root = Path(output).expanduser().absolute()
    if resume and not layout.is_sweep(root):
        raise ConfigError(
            f"--resume: {root} holds no sweep (no {layout.SPEC_FILE}); drop --resume to start one"
        )
    use_ray = ray or bool(ray_address)
    if spec is not None:
        _check_placement(spec, parallel, use_ray)
    root.mkdir(parents=True, exist_ok=True)
    with SweepLock(root):
        spec, saved = prepare(root, spec, resume)
        _check_placement(spec, parallel, use_ray)
        if n_trials is not None:
            if n_trials < 1:
                raise ConfigError(f"--n-trials must be >= 1, got {n_trials}")
            spec.n_trials = saved["n_trials"] = n_trials
        if spec.sampler["name"] == "grid":
            size = math.prod(len(d.choices) for d in spec.distributions.values())
            if spec.n_trials > size:
                log(
                    f"esft sweep: n_trials {spec.n_trials} is more than the grid's {size} points; running {size}"
                )
                spec.n_trials = size
        tic = time.perf_counter()
        if resume:
            study = open_study(root, spec, saved, resume)
            layout.write_spec(root, saved)  # n_trials may have changed
        else:
            layout.write_spec(root, saved)
            try:
                study = open_study(root, spec, saved, resume)
            except BaseException:
                (root / layout.SPEC_FILE).unlink(missing_ok=True)  # no study: no sweep to resume
                raise
        open_seconds = time.perf_counter() - tic
        if resume:
            failed, queued = recover(study)
            done = counted(study.get_trials(deepcopy=False))
            log(
                f"esft sweep: resuming {root}: {done} of {spec.n_trials} trials finished"
                + (f"; {failed} left running by the stopped sweep marked failed" if failed else "")
                + (f"; re-running {queued} failed trial(s) with their parameters" if queued else "")
            )
        result = SweepResult(root, study, spec, open_seconds)
        if parallel == 1 and not use_ray:
            executor: Any = InProcess(study, spec, root)
        elif use_ray:
            executor = RayTasks(root, parallel, ray_address, gpus_per_trial, log)
        else:
            executor = Processes(root, parallel, max(1, usable_cpus() // parallel))
        try:
            _loop(study, spec, root, executor, result, log, deadline)
        except KeyboardInterrupt:
            result.interrupted = True
            executor.stop()
            for t in study.get_trials(deepcopy=False):
                if t.state.name == "RUNNING":
                    mark_failed(study, t.number, "interrupted")
            raise
        finally:
            executor.close()
    return result


def _check_placement(spec: SweepSpec, parallel: int, use_ray: bool) -> None:
    base = spec.base
    if (int(base.get("workers", 1) or 1) > 1 or base.get("ray_address")) and (parallel > 1 or use_ray):
        raise ConfigError(
            "base.workers / base.ray_address give every trial a Ray pool of its own: run such trials one at "
            "a time (--parallel 1, without --ray)"
        )


def _loop(
    study: Any,
    spec: SweepSpec,
    root: Path,
    executor: Any,
    result: SweepResult,
    log,
    deadline: float | None = None,
) -> None:
    running: dict[int, TrialTiming] = {}
    failure: str | None = None
    while True:
        finished = counted(study.get_trials(deepcopy=False))
        if deadline is not None and time.perf_counter() >= deadline and not result.timed_out:
            result.timed_out = finished + len(running) < spec.n_trials
        while (
            failure is None
            and not result.timed_out
            and len(running) < executor.capacity
            and finished + len(running) < spec.n_trials
        ):
            tic = time.perf_counter()
            trial = study.ask(spec.distributions)
            timing = TrialTiming(trial.number, ask=time.perf_counter() - tic)
            running[trial.number] = timing
            timing.wall = -tic
            executor.start(trial)
            if isinstance(executor, InProcess):
                break  # it ran already
        if not running:
            break
        for number, crash in executor.wait():
            if crash:
                mark_failed(study, number, crash)
            timing = running.pop(number)
            timing.wall += time.perf_counter()
            frozen = study.get_trials(deepcopy=False)[number]
            attrs = frozen.user_attrs
            timing.state = frozen.state.name
            timing.train, timing.start, timing.open = (
                attrs.get("train_seconds"),
                attrs.get("start_seconds"),
                attrs.get("open_seconds"),
            )
            result.timings.append(timing)
            finished = counted(study.get_trials(deepcopy=False))
            log(progress_line(study, spec, root, frozen, finished, timing))
            if frozen.state.name == "FAIL" and not spec.catch and failure is None:
                failure = (
                    f"trial {number} failed: {attrs.get('error') or 'see its log'}"
                    + (
                        f" (log: {layout.log_path(root, number)})"
                        if layout.log_path(root, number).exists()
                        else ""
                    )
                    + f"; fix it and continue with: esft sweep --output {root} --resume (failed trials are "
                    "re-run with their parameters), or set catch: true in the sweep file to go on past failures"
                )
    if failure is not None:
        raise EsftError(failure)


# -- what the terminal shows -----------------------------------------------------------------------


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def params_text(trial: Any) -> str:
    values = {**trial.params, **(trial.user_attrs.get("derived") or {})}
    return " ".join(f"{k}={fmt_value(v)}" for k, v in values.items())


def best_trials(study: Any, k: int = 5) -> list[Any]:
    """The ``k`` best complete trials, best first."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    maximize = study.direction == StudyDirection.MAXIMIZE
    return sorted(done, key=lambda t: t.value, reverse=maximize)[:k]


def progress_line(
    study: Any, spec: SweepSpec, root: Path, trial: Any, finished: int, timing: TrialTiming
) -> str:
    state = trial.state.name
    what = state
    if state == "PRUNED":
        steps = sorted(trial.intermediate_values)
        what = f"PRUNED at iteration {steps[-1]}" if steps else "PRUNED"
    value = trial.value if trial.value is not None else None
    text = f"trial {trial.number:>3} ({finished}/{spec.n_trials}) {what}"
    if state == "FAIL":
        text += f": {trial.user_attrs.get('error') or 'failed'}"
    elif value is not None:
        text += f" {spec.metric} {value:.4g}"
    best = best_trials(study, 1)
    if best:
        text += f" (best {best[0].value:.4g}, trial {best[0].number})"
    text += f" | {params_text(trial)} | {timing.wall:.1f} s"
    run_dir = trial.user_attrs.get("run_dir")
    if run_dir:
        text += f" | {root / run_dir}"
    return text


def summary(result: SweepResult, k: int = 5) -> list[str]:
    """The end of a sweep: counts by state, the best trials as a table, where to look next."""
    from esft.analysis.tables import table

    study, spec, root = result.study, result.spec, result.root
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    lines = [
        f"esft sweep: {root}: {counted(trials)} of {spec.n_trials} trials finished ("
        + ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items()))
        + f"); objective {spec.metric}, {spec.direction}"
    ]
    best = best_trials(study, k)
    if best:
        names = list(
            dict.fromkeys(n for t in best for n in [*t.params, *(t.user_attrs.get("derived") or {})])
        )
        rows = []
        for i, t in enumerate(best, 1):
            values = {**t.params, **(t.user_attrs.get("derived") or {})}
            rows.append(
                [i, t.number, t.value, *(values.get(n) for n in names)]
                + [t.user_attrs.get("iterations"), t.user_attrs.get("run_dir", "")]
            )
        lines.append(f"best {len(best)} trial(s):")
        lines.append(table(["rank", "trial", spec.metric, *names, "iterations", "run folder"], rows))
    else:
        lines.append("no trial has completed yet")
    lines.append(
        f"study: {layout.storage_url(root, spec.storage)} (name {layout.study_name(root, spec.to_dict())})"
    )
    if result.timed_out:
        lines.append(f"--timeout reached before n_trials; continue with: esft sweep --output {root} --resume")
    lines.append(f"report: esft report {root} --output {root / 'report'}")
    return lines
