"""The ES trainer (Qiu et al. 2025, Algorithm 2), reading top to bottom.

Per iteration t:
  1. members  = N (seed, sign) pairs from (run seed, t); prompts = the iteration's mini-batch;
  2. for each member: perturb theta in place by sigma*eps, generate greedily, restore exactly, score;
  3. z = shape(member rewards)   (z-score by default);
  4. log (members, z) to the seed log, then theta += alpha/N * sum z_n eps_n, in fp32, layer by layer.
The seed log alone, applied to the base model, rebuilds every checkpoint (see replay.py); resume loads
the newest checkpoint and replays the seed log past it, so a killed run loses nothing.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from esft import distributed, environment
from esft.config import ESConfig
from esft.engines import Engine, Generation, build_engine
from esft.errors import ConfigError
from esft.es import Member, NoiseScheme, ParamSet, UpdateStats, iteration_members, shape
from esft.es.params import MASTER_FILE, require_state, select_trained
from esft.evaluate import periodic_eval
from esft.models import resolve_model
from esft.resources import peak_memory, reset_peak
from esft.runstore import DiskFullError, RunStore, is_disk_full
from esft.tasks import Task, load_task
from esft.tasks.base import TrainerState, nanmean

# Settings a resumed run may change; anything else would change the trajectory.
RESUMABLE = {
    "iterations",
    "budget_samples",
    "checkpoint_every",
    "keep_checkpoints",
    "pin_checkpoints",
    "stop_when_flat",
    "eval_every",
    "eval_limit",
    "eval_split",
    "output",
    # where members are scored (Ray workers give the same results as one process: esft/distributed)
    "workers",
    "ray_address",
    "gpus_per_worker",
    "worker_timeout",
}


def es_params(
    engine: Engine,
    freeze: list[str],
    noise: str = "independent",
    rank: int = 1,
    precision: str = "auto",
    state_dir: str | None = None,
) -> ParamSet:
    """The ParamSet ES trains: the engine's parameters minus ``freeze`` (minus norm scales for lowrank),
    updated with ``precision`` (es/precision.py); its float32 masters come from the checkpoint folder
    ``state_dir`` when it holds them (else from the weights)."""
    if hasattr(engine, "param_set"):  # the weights live in another process (vLLM): ES runs there
        return engine.param_set(freeze, noise, rank, precision, state_dir)
    params = select_trained(engine.parameters(), freeze, noise)
    if not params:
        raise ConfigError("no trainable parameters: the --freeze patterns match every parameter")
    out = ParamSet(params, scheme=noise, rank=rank, precision=precision)
    if state_dir is not None:
        try:
            require_state(out, state_dir)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return out


def save_weights(engine: Engine, params: ParamSet, path: Any) -> None:
    """A checkpoint's files: the engine's weights (what a user loads) and, with float32 masters, the
    masters (what --resume continues from). A remote engine's worker writes both itself."""
    engine.save(path)
    if isinstance(params, ParamSet):
        params.save_state(path)


def engine_options(engine: str, noise: str, population: int, rank: int) -> dict[str, int]:
    """Engine options a run needs beyond the model: vLLM batches low-rank members as LoRA adapters, so it
    reserves one adapter slot per member at start-up."""
    if engine == "vllm" and noise == NoiseScheme.LOWRANK:
        return {"lora_population": population, "lora_rank": rank}
    return {}


def prompt_batch(n_rows: int, size: int | None, run_seed: int, iteration: int) -> list[int]:
    """Row indices used in ``iteration``: all rows, or a mini-batch drawn from (run seed, iteration)."""
    if size is None or size >= n_rows:
        return list(range(n_rows))
    rng = np.random.default_rng(np.random.SeedSequence([run_seed, iteration, 1]))
    return sorted(rng.choice(n_rows, size=size, replace=False).tolist())


def apply_seedlog(params: ParamSet, entries: list[dict[str, Any]]) -> list[UpdateStats]:
    """Re-apply logged updates in order: the same members, weights and alpha give the same bits (the
    same stochastic rounding too: its bits come from the members)."""
    out = []
    for e in entries:
        members = [Member(int(s), int(sign)) for s, sign in e["members"]]
        out.append(params.update(members, e["weights"], e["alpha"]))
    return out


@dataclass
class Population:
    """What one iteration's members produced."""

    summaries: list[dict[str, float]] = field(default_factory=list)  # task.summary() per member
    completions: int = 0
    tokens: int = 0
    truncated: int = 0
    failures: int = 0
    timer: dict[str, float] = field(
        default_factory=lambda: {"generate": 0.0, "score": 0.0, "noise": 0.0, "update": 0.0}
    )


def score_population(
    engine: Engine,
    params: ParamSet,
    task: Task,
    members: list[Member],
    rows: list[dict[str, Any]],
    sigma: float,
    max_new_tokens: int,
    desc: str = "members",
    progress: bool = False,
    state: TrainerState | None = None,
) -> Population:
    """Perturb -> generate -> restore -> score, member by member, timing each part.

    With low-rank noise and an engine that batches populations, all members generate together through
    the unperturbed weights (no perturb or restore) and are then scored one by one. A pool of Ray workers
    (esft/distributed) scores the population itself, spread over its workers, with this same function.
    """
    if hasattr(engine, "score_population"):  # the members go to workers that each own an engine
        return engine.score_population(
            params, task, members, rows, sigma, max_new_tokens, desc, progress, state
        )
    prompts = [r["prompt"] for r in rows]
    pop = Population()
    if params.scheme == NoiseScheme.LOWRANK and getattr(engine, "population_batching", False):
        groups = engine.generate_population(prompts, members, params, sigma, max_new_tokens, pop.timer)
        for gens in groups:
            _score_member(pop, task, rows, gens, state)
        return pop
    for member in tqdm(members, desc=desc, unit="member", leave=False, disable=not progress):
        tic = time.perf_counter()
        params.perturb(member, sigma)
        pop.timer["noise"] += time.perf_counter() - tic
        try:
            tic = time.perf_counter()
            gens = engine.generate(prompts, max_new_tokens)
            pop.timer["generate"] += time.perf_counter() - tic
        finally:
            tic = time.perf_counter()
            params.restore()
            pop.timer["noise"] += time.perf_counter() - tic
        _score_member(pop, task, rows, gens, state)
    return pop


def _score_member(
    pop: Population,
    task: Task,
    rows: list[dict[str, Any]],
    gens: list[Generation],
    state: TrainerState | None,
) -> None:
    tic = time.perf_counter()
    scores = task.score(rows, [g.text for g in gens], [g.token_ids for g in gens], state)
    pop.summaries.append(task.summary(scores))
    pop.timer["score"] += time.perf_counter() - tic
    pop.completions += len(gens)
    pop.tokens += sum(g.num_tokens for g in gens)
    pop.truncated += sum(g.truncated for g in gens)
    pop.failures += scores.failures


def iteration_metrics(
    t: int,
    samples: int,
    tokens: int,
    pop: Population,
    stats: UpdateStats,
    seconds: float,
    flat_streak: int = 0,
) -> dict[str, Any]:
    """The metrics.jsonl row of iteration ``t`` (namespaces train/, es/, perf/).

    ``flat_streak`` counts the flat iterations in a row up to this one (a flat population: every member
    scored the same, so every shaped weight is 0 and the update is exactly zero); ``es/zero_update`` is
    1 when this iteration is one of them."""
    r = np.asarray([s["reward"] for s in pop.summaries], dtype=np.float64)
    keys = list(dict.fromkeys(k for s in pop.summaries for k in s if k != "reward"))
    scorable = r[~np.isnan(r)] if np.isfinite(r).any() else np.zeros(1)
    n = max(pop.completions, 1)
    gen_s = pop.timer["generate"]
    return {
        "iteration": t,
        "samples": samples,  # completions generated for training so far (the budget unit)
        "tokens": tokens,  # their tokens
        # over the members with a score (a member whose every sample was "not applicable" has none)
        "train/reward_mean": float(scorable.mean()),
        "train/reward_std": float(scorable.std()),
        "train/reward_min": float(scorable.min()),
        "train/reward_max": float(scorable.max()),
        "train/unscored_members": int(np.isnan(r).sum()),
        # mean over members of every part (train/reward/<part>), task metric (e.g. accuracy) and value
        # reward functions logged with log_metric (train/logged/<name>)
        **{f"train/{k}": nanmean([s.get(k, math.nan) for s in pop.summaries]) for k in keys},
        "train/completion_tokens": pop.tokens / n,
        "train/truncated_fraction": pop.truncated / n,
        "train/reward_failures": pop.failures,
        "es/update_norm": stats.update_norm,
        "es/update_ratio": stats.update_ratio,
        "es/param_norm": stats.param_norm,
        "es/changed_fraction": stats.changed_fraction,
        # the step that reached the stored weights (the masters, with masters) against the float32 step
        "es/intended_norm": stats.intended_norm,
        "es/step_cosine": stats.step_cosine,
        "es/step_lost_fraction": stats.lost_fraction,
        "es/step_norm_ratio": stats.norm_ratio,
        "es/zero_update": int(flat_streak > 0),
        "es/flat_streak": int(flat_streak),
        "perf/seconds": seconds,
        **{f"perf/{k}_seconds": v for k, v in pop.timer.items()},
        "perf/tokens_per_second": pop.tokens / gen_s if gen_s > 0 else 0.0,
        "perf/samples_per_second": pop.completions / seconds if seconds > 0 else 0.0,
        **peak_memory(),
        "member_rewards": r.tolist(),
    }


def summary_line(m: dict[str, Any], iterations: int) -> str:
    failures = m["train/reward_failures"]
    return (
        f"iter {m['iteration']:>4}/{iterations} | reward {m['train/reward_mean']:.4g} "
        f"(min {m['train/reward_min']:.4g} max {m['train/reward_max']:.4g}) | "
        f"len {m['train/completion_tokens']:.0f} tok | ||d||/||theta|| {m['es/update_ratio']:.2e} | "
        f"{m['perf/seconds']:.1f}s (gen {m['perf/generate_seconds']:.1f} score {m['perf/score_seconds']:.2f} "
        f"noise {m['perf/noise_seconds']:.1f} update {m['perf/update_seconds']:.1f}) | "
        f"{m['perf/tokens_per_second']:.0f} tok/s"
        + (f" | {failures} reward failures" if failures else "")
        + (
            f" | FLAT: every member scored {m['train/reward_mean']:.4g}, zero update"
            + (f" ({m['es/flat_streak']} in a row)" if m.get("es/flat_streak", 0) > 1 else "")
            if m.get("es/zero_update")
            else ""
        )
    )


FLAT_ADVICE = (
    "every member scored the same, so the z-scores and the update are zero; to give the population "
    "something to rank: more prompts per iteration (--prompts-per-iteration), a larger --sigma, "
    "or a reward with finer steps"
)


def over_budget(budget: int, samples: int) -> bool:
    """True once ``samples`` generated completions reach a sample budget (0 = none)."""
    return bool(budget) and samples >= budget


@dataclass
class TrainResult:
    run_dir: Path
    iterations: int
    final_checkpoint: Path | None
    eval_history: list[dict[str, Any]] = field(default_factory=list)


TRAINERS = {
    "es": ("an ES", "esft train"),
    "grpo": ("a GRPO", "esft grpo"),
}  # config's trainer -> name, command


def check_resumable(store: RunStore, config: Any, trainer: str) -> None:
    """``--resume``'s checks, for either trainer: ``store`` holds a run of ``trainer`` whose settings are
    ``config``'s except the RESUMABLE ones; otherwise a one-line ConfigError saying what to change."""
    if not store.exists():
        raise ConfigError(f"--resume: {store.root} holds no run to resume; drop --resume to start one")
    saved = store.read_config()
    was = saved.get("trainer", "es")
    if was != trainer:
        have, command = TRAINERS.get(was, (f"a {was}", f"esft {was}"))
        raise ConfigError(
            f"--resume: {store.root} is {have} run, not {TRAINERS[trainer][0]} run; "
            f"continue it with {command} --resume"
        )
    mine, fields = config.to_dict(), type(config).field_names()
    changed = sorted(k for k, v in saved.items() if k in fields and k not in RESUMABLE and v != mine.get(k))
    if changed:
        raise ConfigError(
            f"--resume: {', '.join(changed)} differ from the run in {store.root}; "
            "resume with the original settings (only iterations and logging cadence may change)"
        )


class ESTrainer:
    def __init__(
        self,
        config: ESConfig,
        resume: bool = False,
        progress: bool = True,
        task: Task | None = None,
        allow_environment_change: bool = False,
    ) -> None:
        self.config = config
        self.allow_environment_change = allow_environment_change
        self.progress = progress
        self.task = task or load_task(
            config.task, reward=config.reward, reward_weights=config.reward_weights, **config.task_options
        )
        self.max_new_tokens = config.max_new_tokens or self.task.max_new_tokens
        output = config.output or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{config.task}"
        self.store = RunStore(output)
        self.resume = resume
        self.engine: Engine | None = None  # the engine, or the pool of Ray workers; closed by train()
        self.params: ParamSet | None = None  # what ES trains (local, or a proxy of remote tensors)
        self.store.lock()  # before looking at the folder: a second writer stops here
        try:
            self._check_run_folder()
            # Fail on a bad dataset or model now, before anything is written to the run folder.
            if not self.task.train:
                raise ConfigError(f"task {self.task.name!r} has an empty train split")
            self.model_path = resolve_model(config.model)
        except BaseException:
            self.store.unlock()
            raise

    # -- setup ------------------------------------------------------------------------------------

    def _check_run_folder(self) -> None:
        store = self.store
        if self.resume:
            check_resumable(store, self.config, "es")
        elif store.exists() or store.seedlog_path.exists():
            raise ConfigError(
                f"{store.root} already holds a run; pass --resume to continue it or choose another --output"
            )

    def _log(self, msg: str) -> None:
        if self.progress:
            tqdm.write(msg)

    # -- main loop --------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        self.store.lock()
        try:
            return self._train()
        except Exception as e:
            if is_disk_full(e):
                raise DiskFullError(self._disk_full_message()) from None
            raise
        finally:
            # an engine with its own processes (vLLM's engine core, Ray workers) stops with the run
            close = getattr(self.engine, "close", None)
            if close is not None:
                close()
            self.store.unlock()

    def _disk_full_message(self) -> str:
        store = self.store
        log = store.seedlog()
        ckpts = store.checkpoints()
        saved = f"seed log through iteration {log[-1]['iteration']}" if log else "no iterations logged"
        saved += f", newest checkpoint {max(ckpts)}" if ckpts else ", no checkpoint"
        return (
            f"no space left on the disk of {store.root} ({saved}, both intact); free space or lower "
            f"--keep-checkpoints, then continue with: esft train --output {store.root} --resume"
        )

    def _train(self) -> TrainResult:
        cfg, store, task = self.config, self.store, self.task
        start, engine, params = self._load_state(self.model_path)
        self.params = params
        reset_peak()  # perf/peak_rss_mb: training's high-water mark, not the transient copies of loading
        store.write_config({"trainer": "es", **cfg.to_dict(), "model_path": self.model_path})
        store.clean_temp()
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(store.root / "events"), purge_step=start + 1)
        train_rows = task.train
        self._log(
            f"esft: {task.name} | model {cfg.model or 'embedded default'} | {params.numel / 1e6:.1f}M trainable "
            f"params | N={cfg.population} sigma={cfg.sigma:g} alpha={cfg.alpha:g} | noise {cfg.noise}"
            + (f" rank {cfg.rank}" if cfg.noise == "lowrank" else "")
            + f" | run {store.root}"
        )
        if cfg.eval_every and start == 0:
            self._evaluate(engine, 0, tb)

        previous = store.metrics()
        samples_done = previous[-1]["samples"] if previous else 0  # completions scored so far (budget)
        tokens_done = previous[-1].get("tokens", 0) if previous else 0
        flat_streak = previous[-1].get("es/flat_streak", 0) if previous else 0
        last = start
        if over_budget(cfg.budget_samples, samples_done):
            self._log(f"esft: the budget of {cfg.budget_samples} samples is spent ({samples_done} generated)")
            return self._finish(engine, tb, last)
        bar = tqdm(
            total=cfg.iterations,
            initial=start,
            desc="ES",
            unit="it",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        for t in range(start + 1, cfg.iterations + 1):
            row_ids = prompt_batch(len(train_rows), cfg.prompts_per_iteration, cfg.seed, t)
            rows = [train_rows[i] for i in row_ids]
            members = iteration_members(cfg.seed, t, cfg.population, cfg.antithetic)
            t0 = time.perf_counter()

            # 1-2: every member perturbs, generates on the same prompts, restores, and is scored.
            member_bar = self.progress and sys.stderr.isatty()  # a bar per member floods non-terminal logs
            state = TrainerState(global_step=t, max_steps=cfg.iterations, epoch=float(t))
            pop = score_population(
                engine,
                params,
                task,
                members,
                rows,
                cfg.sigma,
                self.max_new_tokens,
                f"iter {t}",
                member_bar,
                state,
            )
            member_rewards = [s["reward"] for s in pop.summaries]

            # 3-4: shape, log the update's inputs, then update.
            weights = shape(member_rewards, cfg.shaping)
            store.append_seedlog(
                {
                    "iteration": t,
                    "members": [[m.seed, m.sign] for m in members],
                    "weights": weights,
                    "alpha": cfg.alpha,
                    "rewards": member_rewards,
                }
            )
            tic = time.perf_counter()
            stats = params.update(members, weights, cfg.alpha)
            pop.timer["update"] = time.perf_counter() - tic
            samples_done += len(members) * len(rows)
            tokens_done += pop.tokens
            flat_streak = flat_streak + 1 if all(w == 0 for w in weights) else 0

            metrics = iteration_metrics(
                t, samples_done, tokens_done, pop, stats, time.perf_counter() - t0, flat_streak
            )
            store.append_metrics(metrics)
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "iteration" and math.isfinite(v):
                    tb.add_scalar(k, v, t)
            bar.update(1)
            self._log(summary_line(metrics, cfg.iterations))

            if flat_streak == 1 and not cfg.stop_when_flat:
                self._log(f"esft: iteration {t}: {FLAT_ADVICE}")
            flat_stop = bool(cfg.stop_when_flat) and flat_streak >= cfg.stop_when_flat
            budget_stop = over_budget(cfg.budget_samples, samples_done)
            final = t == cfg.iterations or flat_stop or budget_stop
            last = t
            if final or (cfg.checkpoint_every and t % cfg.checkpoint_every == 0):
                self._checkpoint(engine, t)
            if cfg.eval_every and (final or t % cfg.eval_every == 0):
                self._evaluate(engine, t, tb)
            if flat_stop:
                self._log(
                    f"esft: stopped after iteration {t}: the population was flat for {flat_streak} "
                    f"iterations in a row (--stop-when-flat {cfg.stop_when_flat}); {FLAT_ADVICE}"
                )
                break
            if budget_stop:
                self._log(
                    f"esft: stopped after iteration {t}: {samples_done} samples generated, the budget "
                    f"is {cfg.budget_samples} (--budget-samples)"
                )
                break
        bar.close()
        return self._finish(engine, tb, last)

    def _finish(self, engine: Engine, tb, last: int) -> TrainResult:
        store = self.store
        if last not in store.checkpoints():  # e.g. killed between the last update and its save
            self._checkpoint(engine, last)
        tb.close()
        ckpts = store.checkpoints()
        evals = [e for e in store.evals() if e["iteration"] <= last]
        return TrainResult(store.root, last, ckpts.get(last), evals)

    # -- pieces -----------------------------------------------------------------------------------

    def _build_engine(self, path: str, threads: int | None = None) -> Engine:
        """The engine (or the pool of Ray workers) for the weights at ``path``; ``threads``: the torch
        threads per process a resumed CPU run started with (None: this machine's default)."""
        cfg = self.config
        options = engine_options(cfg.engine, cfg.noise, cfg.population, cfg.rank)
        if distributed.requested(cfg):  # Ray workers, each with its own engine, used as one engine
            engine = distributed.start_pool(
                cfg, path, options, self.task, self.store.checkpoints, self._log, threads=threads
            )
        else:
            environment.use_threads(threads, self._log)
            engine = build_engine(
                cfg.engine, path, dtype=cfg.dtype, device=cfg.device, batch_size=cfg.batch_size, **options
            )
        if cfg.fixed_length:
            engine.min_new_tokens = self.max_new_tokens
        self.engine = engine
        return engine

    def _load_state(self, model_path: str) -> tuple[int, Engine, ParamSet]:
        """Fresh start from the base model, or resume: newest checkpoint + seed-log entries past it."""
        cfg, store = self.config, self.store
        log = store.seedlog() if self.resume else []
        done = log[-1]["iteration"] if log else 0
        if [e["iteration"] for e in log] != list(range(1, done + 1)):
            raise ConfigError(
                f"{store.seedlog_path} is not a contiguous log of iterations 1..{done}; cannot resume"
            )
        ckpts = {i: p for i, p in store.checkpoints().items() if i <= done}
        check_env = self.resume and not self.allow_environment_change
        recorded = environment.read(store.root) if check_env else None
        if (recorded or {}).get("update_precision") == "master":
            # a run with float32 masters continues from a checkpoint that saved them (all of its own do)
            ckpts = {i: p for i, p in ckpts.items() if (p / MASTER_FILE).is_file()}
        base_iter = max(ckpts) if ckpts else 0
        source = str(ckpts[base_iter]) if base_iter else model_path
        engine = self._build_engine(source, environment.resume_threads(recorded))
        params = es_params(
            engine,
            cfg.freeze,
            cfg.noise,
            cfg.rank,
            cfg.update_precision,
            source if base_iter else None,
        )
        env_now = {
            **environment.describe(engine, cfg.engine, model_path),
            "update_precision": params.precision,
        }
        if check_env:
            environment.check(recorded, env_now, environment.CHECKED, "--resume")
        environment.write(store.root, env_now)
        self._log(
            f"esft: dtype {env_now['dtype']} ({env_now.get('dtype_reason') or 'as set'}); update precision "
            f"{params.precision} ({getattr(params, 'precision_reason', '') or 'resolved by the engine'})"
        )
        if self.resume:
            store.truncate_logs(done)
            if done > base_iter:
                self._log(
                    f"esft: resuming from checkpoint {base_iter}, replaying iterations {base_iter + 1}..{done}"
                )
            apply_seedlog(params, log[base_iter:done])
            if done > cfg.iterations:
                raise ConfigError(
                    f"{store.root} already has {done} iterations; pass --iterations {done} or more"
                )
        return done, engine, params

    def _checkpoint(self, engine: Engine, t: int) -> None:
        cfg = self.config
        path = self.store.save_checkpoint(
            t,
            lambda p: save_weights(engine, self.params, p),
            {"base_model": cfg.model or "embedded default"},
        )
        self._log(f"checkpoint: {path}")
        dropped = self.store.prune_checkpoints(cfg.keep_checkpoints, cfg.pin_checkpoints)
        if dropped:
            self._log(
                f"dropped checkpoint {', '.join(map(str, dropped))} (--keep-checkpoints {cfg.keep_checkpoints}; "
                "esft replay rebuilds any iteration from the seed log)"
            )

    def _evaluate(self, engine: Engine, t: int, tb) -> list[dict[str, Any]]:
        """Evaluate the unperturbed model on the eval split(s) (evaluate.periodic_eval)."""
        cfg = self.config
        return periodic_eval(
            engine,
            self.task,
            cfg.eval_split,
            cfg.eval_limit,
            self.max_new_tokens,
            cfg.batch_size,
            t,
            self.store,
            tb,
            self._log,
            self.progress,
        )
