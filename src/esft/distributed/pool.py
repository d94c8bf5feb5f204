"""The driver side of distributed ES on Ray: a pool of workers that the trainer uses as its engine.

The trainer's loop does not change; the pool takes the engine's place (``worker.py`` is the other side):

- **Scoring.** ``score_population`` hands the whole population to ``WorkerPool.score_population``, which
  splits it into work units and hands them out dynamically: whichever worker is free takes the next
  unit (``ray.wait``). A unit is one member, or, with low-rank noise on a population-batching engine,
  one population batch: exactly the members that one process would generate in one batch
  (``HFEngine.members_per_batch``). Every member is therefore generated in the same batch layout as in
  the single-process trainer, so its reward does not depend on which worker scored it, and the results
  equal a single-process run for the same seeds, engine and hardware, whatever the number of workers.
  Completions stay on the workers; a unit returns per-member task summaries, counters and timers.
- **Update.** ``param_set`` returns a ``RemoteParamSet`` (``es/remote.py``) whose calls are broadcast to
  every worker: each applies the update to its own replica; no weights cross the network. Every answer
  carries a checksum of the worker's weights (``es.checksum.tensor_checksum``), and the run stops with an
  error naming the first differing tensor if two workers ever disagree.
- **Evaluation and checkpoints** run on one worker: ``generate`` for evaluation, ``save`` from a worker
  on the driver's own node straight into the run folder (from another node the files are copied over in
  chunks). The driver holds no model: a replica there would cost a second copy of the model (plus its
  pristine copy) on an accelerator of the workers' kind, since CPU and CUDA draw different noise, and
  its update would compete with worker 0's. The run folder is the single-process trainer's.
- **Worker loss.** A worker that dies loses only its in-flight unit, which goes back to the front of the
  queue for the others. A replacement starts at once and is rebuilt from the newest checkpoint plus
  the updates since (the seed log; ``--resume``'s mechanism) while the others work; its checksum must
  match before it takes work. The run ends with the weights it would have had without the failure.
  A worker that stops answering without dying (a hung driver call, a stuck GPU) is treated the same
  once a scoring unit or an update has taken longer than the hang limit (``--worker-timeout``; by default 10x the slowest
  call so far, at least 300 s): it is killed, and its unit re-queued.

Timers: each unit's generate / score / noise seconds are summed over units and divided by the number of
workers, so the metrics' time split adds up to wall-clock time and tokens/s is the pool's throughput.
``traffic`` counts the pickled bytes of every call and answer (the payload that crosses the network).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from esft.distributed import INSTALL
from esft.errors import ConfigError, EsftError
from esft.es.noise import Member, NoiseScheme
from esft.es.remote import RemoteParamSet

HANG_FLOOR_S = 300.0  # the automatic hang limit is never below this
HANG_FACTOR = 10.0  # ... and is this many times the slowest call that came back
PLACEMENT_TIMEOUT_S = 120.0  # a worker not running after this long cannot be placed on the cluster
CONNECT_TIMEOUT_S = 3.0  # to reach --ray-address before handing it to ray.init (which retries for minutes)
CHUNK_BYTES = 64 << 20  # checkpoint files copied from a worker on another node in chunks of this size
FAULT_ENV = "ESFT_RAY_FAULT"  # test hook, see worker.parse_fault


class DistributedError(EsftError):
    """The pool cannot go on (workers diverged, or keep dying); the run folder is intact."""


class _WorkerDied(Exception):
    def __init__(self, slot: _Slot, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.slot, self.cause = slot, cause


@dataclass
class _Slot:
    """One worker: its index in the pool, the actor, and the build still running (None once ready)."""

    index: int
    actor: Any
    building: Any = None  # ObjectRef of build(), until the pool has checked its report
    node: str = ""
    host: str = ""
    incarnation: int = 0


def import_ray(workers: int, address: str | None):
    try:
        import ray
    except ImportError:
        what = f"--ray-address {address}" if address else f"--workers {workers}"
        raise ConfigError(f"{what} runs ES on Ray, which is not installed: {INSTALL}") from None
    return ray


def check_reachable(address: str) -> None:
    """Fail in seconds, with a one-line error, if nothing listens at ``address`` (host:port, or
    ray://host:port); ray.init itself retries an unreachable address for minutes."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r} must look like HOST:PORT (e.g. 10.0.0.1:6379) or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise ConfigError(
            f"--ray-address {address}: cannot reach a Ray cluster there ({e.strerror or e}); start one with "
            "`ray start --head` on that machine, or drop --ray-address to start a local one with --workers"
        ) from None


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        return os.cpu_count() or 1


class WorkerPool:
    """K Ray workers used as one engine (see the module docstring). Engine protocol: ``generate``,
    ``save``; ES: ``param_set``, ``score_population``; ``describe_environment`` for environment.json."""

    def __init__(
        self,
        config: Any,
        model_path: str,
        engine_options: dict[str, Any],
        task: Any,
        checkpoints: Callable[[], dict[int, Any]] | None = None,
        log: Callable[[str], None] = print,
        threads: int | None = None,
    ) -> None:
        self.workers = int(getattr(config, "workers", 1) or 1)
        self.threads = threads  # torch threads per worker; None: the worker's share of the CPUs
        self.address = getattr(config, "ray_address", None) or None
        self.gpus_per_worker = float(getattr(config, "gpus_per_worker", 0) or 0)
        self.ray = import_ray(self.workers, self.address)
        if self.workers < 1:
            raise ConfigError(f"workers must be an integer >= 1, got {self.workers}")
        if str(config.device).startswith("cuda") and self.gpus_per_worker <= 0:
            raise ConfigError(
                f"--device {config.device} with Ray workers needs --gpus-per-worker (e.g. 1): "
                "Ray hides the GPUs from a worker that asks for none"
            )
        self.log, self.checkpoints, self.task = log, checkpoints, task
        self.source = str(model_path)
        self.source_iteration = _checkpoint_iteration(self.source)
        self.updates: list[dict[str, Any]] = []  # every update broadcast since the source (seed-log rows)
        self.digests: dict[int, str] = {}  # agreed weight checksum after len(updates) == key updates
        self.init_args: list[Any] | None = None
        self._params: RemoteParamSet | None = None
        self._chunk: dict[int, int | None] = {}
        self.traffic = {"sent": 0, "received": 0}  # pickled payload bytes, since start
        self.traffic_log: list[dict[str, int]] = []  # per update: payload bytes since the previous one
        self._since = dict(self.traffic)
        self.requeued = self.replaced = 0
        self.max_replacements = 3 * self.workers
        self.worker_timeout = float(getattr(config, "worker_timeout", 0) or 0)
        self.slowest = 0.0  # seconds of the slowest unit or broadcast that came back (the hang limit)
        self.closed = False

        self.started_ray = self._connect(config)
        try:
            self._start_workers(config, engine_options)
        except BaseException:
            self.close()
            raise

    # -- start ------------------------------------------------------------------------------------

    def _connect(self, config: Any) -> bool:
        """Join ``ray_address``, reuse a Ray this process already started, or start a local cluster on
        loopback; True if the pool started Ray (and shuts it down at close)."""
        ray = self.ray
        if self.address:
            check_reachable(self.address)
        if ray.is_initialized():
            return False
        quiet = {"logging_level": logging.WARNING, "log_to_driver": True, "include_dashboard": False}
        if self.address:
            try:
                ray.init(address=self.address, **quiet)
            except (ConnectionError, RuntimeError) as e:
                why, chain, cause = _first_line(e), "", e
                while cause is not None:  # Ray wraps the authentication error in a connection error
                    chain, cause = chain + str(cause), cause.__cause__ or cause.__context__
                if "AuthToken" in chain or "uthentication" in chain:
                    why = (
                        "it requires Ray's token: set RAY_AUTH_MODE=token here, with the cluster's token in "
                        "~/.ray/auth_token or RAY_AUTH_TOKEN (docs/distributed.md)"
                    )
                raise ConfigError(
                    f"--ray-address {self.address}: cannot join the Ray cluster: {why}"
                ) from None
            return True
        # Ray announces that it secures its local cluster with a token (it does, here too): not news
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(
            address="local",  # a new cluster for this run, even if `ray start` runs one on this machine
            num_cpus=max(usable_cpus(), self.workers),
            _node_ip_address="127.0.0.1",  # this run's own cluster: nothing listens beyond loopback
            object_store_memory=256 << 20,  # only seeds, rows and summaries go through it
            **quiet,
        )
        return True

    def _start_workers(self, config: Any, engine_options: dict[str, Any]) -> None:
        ray, k = self.ray, self.workers
        self.driver_node = ray.get_runtime_context().get_node_id()
        total = ray.cluster_resources()
        cpus, gpus = float(total.get("CPU", 1.0)), float(total.get("GPU", 0.0))
        if k * self.gpus_per_worker > gpus + 1e-9:
            raise ConfigError(
                f"--workers {k} x --gpus-per-worker {self.gpus_per_worker:g} needs {k * self.gpus_per_worker:g} "
                f"GPUs; the Ray cluster has {gpus:g}"
            )
        cpu_share = cpus / k
        # a resumed CPU run keeps the thread count it started with (rounding depends on it)
        threads = self.threads or max(1, int(cpu_share))
        self.spec = {
            "engine": config.engine,
            "dtype": config.dtype,
            "device": config.device,
            "batch_size": config.batch_size,
            "engine_options": dict(engine_options),
            "min_new_tokens": 0,
            "task": {
                "name": config.task,
                "reward": config.reward,
                "reward_weights": config.reward_weights,
                **dict(config.task_options),
            },
            "threads": threads,
        }
        from esft.distributed.worker import Worker

        self._actor = ray.remote(Worker).options(
            num_cpus=cpu_share, num_gpus=self.gpus_per_worker, max_restarts=0, max_task_retries=0
        )
        fault = os.environ.get(FAULT_ENV)
        tic = time.perf_counter()
        self.slots = [_Slot(i, self._actor.remote(self.spec, i, fault)) for i in range(k)]
        where = [s.actor.where.remote() for s in self.slots]
        ready, pending = ray.wait(where, num_returns=k, timeout=PLACEMENT_TIMEOUT_S)
        if pending:
            raise DistributedError(
                f"only {len(ready)} of {k} Ray workers started within {PLACEMENT_TIMEOUT_S:.0f} s: each needs "
                f"{cpu_share:g} CPUs and {self.gpus_per_worker:g} GPUs, and the cluster has {cpus:g} CPUs and "
                f"{gpus:g} GPUs in all (`ray status` shows them by node); lower --workers or --gpus-per-worker"
            )
        for slot, ref in zip(self.slots, where, strict=True):
            info = self._get(ref, slot, "starting")
            slot.node, slot.host = info["node"], info["host"]
        builds = [(s, s.actor.build.remote([(self.source, [])], None, 0)) for s in self.slots]
        reports = [self._get(ref, slot, "loading the model") for slot, ref in builds]
        self._agree({s.index: r for (s, _), r in zip(builds, reports, strict=True)}, "loading the model")
        self._check_task(reports[0])
        self.device, self.dtype = reports[0]["device"], reports[0]["dtype"]
        hosts = sorted({s.host for s in self.slots})
        self.log(
            f"esft: {k} Ray worker(s) on {', '.join(hosts)} ({cpu_share:g} CPU, {threads} torch thread(s)"
            f"{f', {self.gpus_per_worker:g} GPU' if self.gpus_per_worker else ''} each; device {self.device}), "
            f"model loaded in {time.perf_counter() - tic:.1f} s"
            + (
                ""
                if self.gpus_per_worker or gpus == 0
                else "; the cluster has GPUs: --gpus-per-worker 1 uses them"
            )
        )

    def _check_task(self, report: dict[str, Any]) -> None:
        mine = [self.task.name, [[r.name, float(r.weight)] for r in self.task.rewards]]
        if report["task"] != mine:
            raise ConfigError(
                f"the Ray workers built task {report['task']} from the settings, but this trainer scores "
                f"{mine}; with --workers the task must come from the settings (--task, --reward, "
                "--reward-weights, --task-option), not a Task object"
            )

    # -- Ray calls ----------------------------------------------------------------------------------

    def _count(self, key: str, payload: Any) -> None:
        with contextlib.suppress(Exception):
            self.traffic[key] += len(pickle.dumps(payload, protocol=5))

    def _call(self, slot: _Slot, method: str, *args: Any):
        self._count("sent", (method, args))
        return getattr(slot.actor, method).remote(*args)

    def hang_limit(self) -> float | None:
        """Seconds after which a call without an answer counts as hung (None: no limit yet)."""
        if self.worker_timeout > 0:
            return self.worker_timeout
        if self.slowest <= 0:
            return None
        return max(HANG_FLOOR_S, HANG_FACTOR * self.slowest)

    def _hung(self, slot: _Slot, waited: float) -> _WorkerDied:
        source = (
            "--worker-timeout" if self.worker_timeout > 0 else f"{HANG_FACTOR:g}x the slowest call so far"
        )
        return _WorkerDied(
            slot, TimeoutError(f"no answer in {waited:.0f} s, the hang limit ({source}); killed")
        )

    def _get(self, ref: Any, slot: _Slot, what: str = "", timeout: float | None = None) -> Any:
        """ray.get, counting the answer; a dead worker raises _WorkerDied, a worker-side error its cause
        (a user-facing EsftError stays one line); no answer within ``timeout`` seconds counts as dead."""
        ray = self.ray
        try:
            value = ray.get(ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise self._hung(slot, timeout or 0.0) from None
        except ray.exceptions.RayActorError as e:
            if what:  # while starting: nothing to recover
                raise DistributedError(
                    f"Ray worker {slot.index} died while {what}: {_first_line(e)}"
                ) from None
            raise _WorkerDied(slot, e) from None
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, EsftError):
                raise cause from None
            raise e.as_instanceof_cause() from None
        self._count("received", value)
        return value

    def _broadcast(self, method: str, *args: Any) -> dict[int, Any]:
        """``method`` on every worker (each runs it after whatever it has queued); answers by worker.
        A worker that dies is replaced, and its replacement rebuilt to the state after this call."""
        refs = [(slot, self._call(slot, method, *args)) for slot in self.slots]
        answers: dict[int, Any] = {}
        sent = time.perf_counter()
        for slot, ref in refs:
            try:
                if slot.building is not None:  # a replacement: check its rebuild before its answer
                    self._finish_build(slot)
                    sent = time.perf_counter()  # its answer waited for the rebuild, which has no limit
                timed = method == "esft_update"  # start-up calls (loading, hashing) have no limit
                limit = self.hang_limit() if timed else None
                left = None if limit is None else max(0.0, sent + limit - time.perf_counter())
                answers[slot.index] = self._get(ref, slot, timeout=left)
                if timed:
                    self.slowest = max(self.slowest, time.perf_counter() - sent)
            except _WorkerDied as dead:
                self._replace(dead, f"during {method}")
        if not answers:
            raise DistributedError(f"every Ray worker died during {method}")
        return answers

    def _pick(self, prefer_node: str | None = None) -> _Slot:
        """A worker for a single call: a ready one (on ``prefer_node`` if any), lowest index first."""
        return min(self.slots, key=lambda s: (s.building is not None, s.node != prefer_node, s.index))

    def _one(self, method: str, *args: Any) -> Any:
        """``method`` on one worker; a worker that dies is replaced and the call goes to the next."""
        for _ in range(self.max_replacements + len(self.slots)):
            slot = self._pick()
            try:
                return self._get(self._call(slot, method, *args), slot)
            except _WorkerDied as dead:
                self._replace(dead, f"during {method}")
        raise DistributedError(f"no Ray worker survived {method}")

    # -- agreement ----------------------------------------------------------------------------------

    def _agree(self, answers: dict[int, Any], what: str) -> None:
        """Every answer's weight checksum must be the same (and equal the one agreed on before for the
        same number of updates); otherwise the replicas have diverged and the run stops."""
        digests = {i: a["checksum"] for i, a in answers.items() if isinstance(a, dict) and "checksum" in a}
        if not digests:
            return
        key = len(self.updates)
        expected = self.digests.get(key)
        groups: dict[str, list[int]] = {}
        for i, d in sorted(digests.items()):
            groups.setdefault(d, []).append(i)
        if expected is None and len(groups) == 1:
            self.digests[key] = next(iter(groups))
            return
        if expected is not None and set(groups) == {expected}:
            return
        majority = expected or max(groups, key=lambda d: len(groups[d]))
        odd = sorted(i for d, members in groups.items() if d != majority for i in members)
        good = next((i for d, members in groups.items() if d == majority for i in members), None)
        where = self._first_difference(good, odd[0]) if good is not None else ""
        it = self.source_iteration + key
        raise DistributedError(
            f"the Ray workers' weights diverged after {what} (iteration {it}): worker(s) "
            f"{', '.join(map(str, odd))} differ from the others{where}. Every worker applies the same update "
            "to the same bits, so a worker has a hardware fault, a different device or library version, or "
            "there is a bug; the seed log and the newest checkpoint are intact: --resume continues from them"
        )

    def _first_difference(self, good: int, bad: int) -> str:
        try:
            a = self._get(self._call(self.slots[good], "esft_checksum"), self.slots[good])
            b = self._get(self._call(self.slots[bad], "esft_checksum"), self.slots[bad])
        except Exception:  # a diagnosis only
            return ""
        names = [n for n in a if a[n] != b.get(n)]
        return f" (first differing tensor: {names[0]}, {len(names)} in all)" if names else ""

    # -- worker loss --------------------------------------------------------------------------------

    def _rebuild_candidates(self) -> tuple[list[tuple[str, list[dict[str, Any]]]], str]:
        """Where a replacement loads from: the newest checkpoint of this run plus the updates after it,
        else the pool's own source plus every update since (also the fallback on a node that cannot see
        the run folder). Returns (candidates, description)."""
        now = self.source_iteration + len(self.updates)
        ckpts = self.checkpoints() if self.checkpoints is not None else {}
        usable = [i for i in ckpts if self.source_iteration < i <= now]
        fallback = (self.source, list(self.updates))
        if not usable:
            kind = "checkpoint" if self.source_iteration else "base model"
            return [fallback], f"{kind} {self.source_iteration} + {len(self.updates)} seed-log update(s)"
        c = max(usable)
        entries = self.updates[c - self.source_iteration :]
        return [(str(ckpts[c]), entries), fallback], f"checkpoint {c} + {len(entries)} seed-log update(s)"

    def _replace(self, dead: _WorkerDied, when: str, lost: str = "") -> None:
        """Start a replacement for a dead worker; it builds in the background (``slot.building``)."""
        old = dead.slot
        if self.closed or self.slots[old.index] is not old:  # closing, or replaced already
            return
        with contextlib.suppress(Exception):
            self.ray.kill(old.actor, no_restart=True)
        if self.replaced >= self.max_replacements:
            raise DistributedError(
                f"Ray workers died {self.replaced + 1} times; giving up (last: worker {old.index} {when}: "
                f"{_first_line(dead.cause)}); the seed log and newest checkpoint are intact: --resume"
            )
        self.replaced += 1
        candidates, described = self._rebuild_candidates()
        new = _Slot(
            old.index, self._actor.remote(self.spec, old.index, None), incarnation=old.incarnation + 1
        )
        new.building = self._call(new, "build", candidates, self.init_args, len(self.updates))
        self.slots[old.index] = new
        hung = isinstance(dead.cause, TimeoutError)
        _warn(
            f"esft: Ray worker {old.index} {'hung' if hung else 'died'} {when} ({_first_line(dead.cause)})"
            + (f"; {lost} re-queued to the others" if lost else "")
            + f"; starting a replacement, rebuilt from {described}"
        )

    def _finish_build(self, slot: _Slot) -> None:
        """Check a replacement's report (weights agree with the pool's) and let it take work."""
        report = self._get(slot.building, slot)
        slot.building = None
        slot.node, slot.host = report["node"], report["host"]
        expected = self.digests.get(report["updates"])
        if expected is not None and report["checksum"] != expected:
            raise DistributedError(
                f"replacement Ray worker {slot.index} rebuilt from {report['source']} holds different weights "
                f"than the others (checksum {report['checksum']} != {expected}); the checkpoint or the seed "
                "log does not reproduce the run on that node (a different device or library version?)"
            )
        self.log(
            f"esft: replacement Ray worker {slot.index} ready on {report['host']} in {report['seconds']:.1f} s "
            f"(rebuilt from {report['source']} + {report['replayed']} update(s); weights match)"
        )

    # -- the engine protocol (evaluation, checkpoints, environment) --------------------------------

    def parameters(self) -> dict[str, Any]:
        raise NotImplementedError(
            "the weights live in the Ray workers; use param_set(freeze, noise, rank) for ES and save() to read them"
        )

    def generate(self, prompts: list[Any], max_new_tokens: int, sampling: Any = None) -> list[Any]:
        return self._one("generate", prompts, max_new_tokens, sampling)

    def save(self, path: str | Path) -> None:
        """Write the weights into ``path``: straight from a worker on this node, else copied over from
        another node in chunks."""
        path = Path(path)
        for _ in range(self.max_replacements + len(self.slots)):
            slot = self._pick(prefer_node=self.driver_node)
            try:
                if slot.node == self.driver_node:
                    self._get(self._call(slot, "save", str(path)), slot)
                else:
                    self._copy_checkpoint(slot, path)
                return
            except _WorkerDied as dead:
                self._replace(dead, "while saving a checkpoint")
        raise DistributedError("no Ray worker survived saving a checkpoint")

    def _copy_checkpoint(self, slot: _Slot, path: Path) -> None:
        folder, files = self._get(self._call(slot, "save_local"), slot)
        try:
            for name, size in files:
                target = path / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as f:
                    for offset in range(0, size, CHUNK_BYTES):
                        f.write(
                            self._get(self._call(slot, "read_chunk", folder, name, offset, CHUNK_BYTES), slot)
                        )
        finally:
            with contextlib.suppress(Exception):
                self._call(slot, "drop", folder)

    def describe_environment(self, engine_name: str, model_path: str) -> dict[str, Any]:
        """environment.json as the workers see it; they must all agree (a member's reward must not depend
        on which worker scored it)."""
        answers = self._broadcast("describe", engine_name, model_path)
        first = answers[min(answers)]
        for i, env in sorted(answers.items()):
            diff = [f"{k} {first.get(k)!r} vs {env.get(k)!r}" for k in first if env.get(k) != first.get(k)]
            if diff:
                raise ConfigError(
                    f"Ray workers {min(answers)} and {i} run in different environments ({'; '.join(diff)}): "
                    "a member's reward would depend on which worker scored it; give every worker the same "
                    "device, libraries and model files"
                )
        return first

    @property
    def min_new_tokens(self) -> int:
        return int(self.spec["min_new_tokens"])

    @min_new_tokens.setter
    def min_new_tokens(self, n: int) -> None:
        self.spec["min_new_tokens"] = int(n)
        self._broadcast("set_min_new_tokens", int(n))

    # -- ES ---------------------------------------------------------------------------------------

    def param_set(
        self,
        freeze: list[str] | tuple[str, ...] = (),
        noise: str = "independent",
        rank: int = 1,
        precision: str = "auto",
        state_dir: str | None = None,
    ):
        """A RemoteParamSet over every worker: building it builds each worker's ParamSet; its update is
        applied by every worker and checked for agreement."""
        self._params = RemoteParamSet(self._call_all, freeze, noise, rank, precision, state_dir)
        return self._params

    def _call_all(self, method: str, *args: Any) -> Any:
        """RemoteParamSet's transport: broadcast, check the replicas agree, answer worker 0's (or the
        lowest surviving worker's) result. Updates are recorded first, so a worker that dies during one
        is rebuilt with it."""
        if method == "esft_init_params":
            self.init_args = list(args)
        if method == "esft_update":
            self.updates.append({"members": args[0], "weights": args[1], "alpha": args[2]})
        answers = self._broadcast(method, *args)
        self._agree(answers, method.removeprefix("esft_").replace("_", " "))
        if method == "esft_update":  # an iteration's traffic: its scoring, its update (and evaluation)
            self.traffic_log.append({k: self.traffic[k] - self._since[k] for k in self.traffic})
        if method in ("esft_update", "esft_init_params"):
            self._since = dict(self.traffic)
        return answers[min(answers)]

    def _units(self, members: list[Member], n_prompts: int, scheme: NoiseScheme) -> list[list[int]]:
        """Work units as lists of member indices: one member each, or consecutive population batches."""
        if scheme != NoiseScheme.LOWRANK:
            return [[i] for i in range(len(members))]
        if n_prompts not in self._chunk:
            self._chunk[n_prompts] = self._one("members_per_batch", n_prompts)
        per = self._chunk[n_prompts] or len(members)
        return [list(range(i, min(i + per, len(members)))) for i in range(0, len(members), per)]

    def score_population(
        self,
        params: Any,
        task: Any,
        members: list[Member],
        rows: list[dict[str, Any]],
        sigma: float,
        max_new_tokens: int,
        desc: str = "members",
        progress: bool = False,
        state: Any = None,
    ):
        """What ``trainer.score_population`` computes, with the members spread over the workers (each
        scores with its own task, built from the same settings as ``task``)."""
        from esft.trainer import Population

        if params is not self._params:
            raise ValueError("score_population needs this pool's param_set()")
        ray = self.ray
        units = self._units(members, len(rows), params.scheme)
        wire = [[int(m.seed), int(m.sign)] for m in members]
        rows_ref = ray.put(rows)
        rows_bytes = len(pickle.dumps(rows, protocol=5))
        fetched: set[int] = set()  # workers that read this iteration's rows (once each)
        queue: deque[int] = deque(range(len(units)))
        results: list[Any] = [None] * len(units)
        running: dict[Any, tuple[_Slot, int | None]] = {}  # ObjectRef -> (worker, unit; None: a build)
        started: dict[Any, float] = {}  # ObjectRef of a unit -> when it was handed out
        idle: deque[_Slot] = deque()
        for slot in self.slots:
            if slot.building is not None:
                running[slot.building] = (slot, None)
            else:
                idle.append(slot)
        bar = tqdm(total=len(members), desc=desc, unit="member", leave=False, disable=not progress)
        try:
            while queue or any(u is not None for _, u in running.values()):
                while queue and idle:
                    slot, u = idle.popleft(), queue.popleft()
                    if slot.index not in fetched:
                        self.traffic["sent"] += rows_bytes
                        fetched.add(slot.index)
                    ref = self._call(
                        slot, "score", [wire[i] for i in units[u]], rows_ref, sigma, max_new_tokens, state
                    )
                    running[ref] = (slot, u)
                    started[ref] = time.perf_counter()
                if not running:
                    raise DistributedError("no Ray worker is left to score the population")
                limit = self.hang_limit()
                timeout = None
                if limit is not None and started:
                    timeout = max(0.0, min(started.values()) + limit - time.perf_counter())
                ready, _ = ray.wait(list(running), num_returns=1, timeout=timeout)
                if ready:
                    done = ready[0]
                else:  # the unit handed out longest ago may have run past the hang limit
                    done = min(started, key=started.__getitem__)
                    if limit is None or time.perf_counter() - started[done] < limit:
                        continue
                slot, u = running.pop(done)
                began = started.pop(done, None)
                try:
                    if not ready:
                        raise self._hung(slot, time.perf_counter() - began)
                    if u is None:
                        self._finish_build(slot)
                    else:
                        results[u] = self._get(done, slot)
                        self.slowest = max(self.slowest, time.perf_counter() - began)
                        bar.update(len(units[u]))
                except _WorkerDied as dead:
                    lost = ""
                    if u is not None:
                        queue.appendleft(u)
                        self.requeued += len(units[u])
                        lost = f"its in-flight member(s) {', '.join(str(i) for i in units[u])}" + (
                            f" of iteration {state.global_step}" if state is not None else ""
                        )
                    fetched.discard(slot.index)
                    self._replace(dead, "while scoring" if u is not None else "while being rebuilt", lost)
                    running[self.slots[slot.index].building] = (self.slots[slot.index], None)
                    continue
                idle.append(slot)
        finally:
            bar.close()
        pop = Population()
        for part in results:
            pop.summaries += part.summaries
            pop.completions += part.completions
            pop.tokens += part.tokens
            pop.truncated += part.truncated
            pop.failures += part.failures
            for k, v in part.timer.items():
                pop.timer[k] = pop.timer.get(k, 0.0) + v
        for k in pop.timer:
            pop.timer[k] /= len(self.slots)
        return pop

    # -- end ----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the workers (and the local Ray cluster, if this pool started it)."""
        if self.closed:
            return
        self.closed = True
        ray = self.ray
        for slot in getattr(self, "slots", []):
            with contextlib.suppress(Exception):
                ray.kill(slot.actor, no_restart=True)
        if self.traffic_log:
            per = {k: sum(t[k] for t in self.traffic_log) / len(self.traffic_log) for k in self.traffic}
            self.log(
                f"esft: Ray pool: {per['sent'] / 1e3:.1f} kB sent and {per['received'] / 1e3:.1f} kB received per "
                f"iteration (payload); {self.requeued} member(s) re-queued, {self.replaced} worker(s) replaced"
            )
        if self.started_ray:
            with contextlib.suppress(Exception):
                ray.shutdown()


def _checkpoint_iteration(path: str) -> int:
    """The iteration a checkpoint folder holds (0 for a base model)."""
    import json

    from esft.runstore import CHECKPOINT_MARKER

    marker = Path(path) / CHECKPOINT_MARKER
    try:
        return int(json.loads(marker.read_text())["iteration"])
    except (OSError, ValueError, KeyError):
        return 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _warn(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)
