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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from esft import distributed, environment, model_card, runs
from esft.callbacks import Callback, RunInfo
from esft.config import ESConfig
from esft.engines import Engine, build_engine
from esft.errors import ConfigError
from esft.es import ParamSet, UpdateStats, iteration_members, shape
from esft.es.params import MASTER_FILE
from esft.evaluate import periodic_eval
from esft.population import (
    Population,
    apply_seedlog,
    engine_options,
    es_params,
    prompt_batch,
    save_weights,
    score_population,
)
from esft.resources import peak_memory, reset_peak
from esft.runs import TrainResult
from esft.runstore import RunStore
from esft.tasks import Task, load_task
from esft.tasks.base import TrainerState, nanmean


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
class _Progress:
    """Counters carried from iteration to iteration (and over a resume, from metrics.jsonl)."""

    samples: int  # completions generated for training (the budget unit)
    tokens: int  # their tokens
    flat_streak: int  # flat iterations in a row up to the last one


class ESTrainer:
    def __init__(
        self,
        config: ESConfig,
        resume: bool = False,
        progress: bool = True,
        task: Task | None = None,
        allow_environment_change: bool = False,
        callbacks: list[Callback] | None = None,
    ) -> None:
        self.config = config
        self.callbacks = runs.callbacks_for("es", callbacks, config.report_to)
        self.allow_environment_change = allow_environment_change
        self.progress = progress
        self._log = runs.console(progress)
        self.task = task or load_task(
            config.task, reward=config.reward, reward_weights=config.reward_weights, **config.task_options
        )
        self.max_new_tokens = config.max_new_tokens or self.task.max_new_tokens
        output = config.output or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{config.task}"
        self.store = RunStore(output)
        self.resume = resume
        self.engine: Engine | None = None  # the engine, or the pool of Ray workers; closed by train()
        self.params: ParamSet | None = None  # what ES trains (local, or a proxy of remote tensors)
        self.model_path = runs.claim(self.store, config, "es", self.task, resume, self.store.seedlog_path)

    # -- main loop --------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        # an engine with its own processes (vLLM's engine core, Ray workers) stops with the run
        return runs.run_training(self.store, self._train, self._disk_full_message, self._close)

    def _close(self) -> None:
        self.callbacks.on_train_end()
        if self.engine is not None:
            self.engine.close()

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
        cfg = self.config
        start, engine, params = self._load_state(self.model_path)
        self.params = params
        self._open_run(start, engine, params)
        done = self._progress_so_far()
        if over_budget(cfg.budget_samples, done.samples):
            self._log(f"esft: the budget of {cfg.budget_samples} samples is spent ({done.samples} generated)")
            return self._finish(engine, start)
        bar = tqdm(
            total=cfg.iterations,
            initial=start,
            desc="ES",
            unit="it",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        last = start
        for t in range(start + 1, cfg.iterations + 1):
            metrics = self._iteration(t, engine, params, done)
            runs.record(self.store, self.callbacks, metrics, t)
            bar.update(1)
            self._log(summary_line(metrics, cfg.iterations))
            stop = self._stop_reason(t, done)
            if stop is None and self.callbacks.stop:
                stop = f"esft: stopped after iteration {t}: {self.callbacks.stop}"
            final = t == cfg.iterations or stop is not None
            last = t
            if runs.due(t, cfg.checkpoint_every, final):
                self._checkpoint(engine, t)
            if cfg.eval_every and runs.due(t, cfg.eval_every, final):
                self._evaluate(engine, t)
            if stop is None and self.callbacks.stop:  # set by on_evaluate (e.g. a sweep's pruner)
                stop = f"esft: stopped after iteration {t}: {self.callbacks.stop}"
            if stop is not None:
                self._log(stop)
                break
        bar.close()
        return self._finish(engine, last)

    def _iteration(self, t: int, engine: Engine, params: ParamSet, done: _Progress) -> dict[str, Any]:
        """Iteration ``t``, steps 1-4 of the module docstring; its metrics row."""
        cfg, task = self.config, self.task
        row_ids = prompt_batch(len(task.train), cfg.prompts_per_iteration, cfg.seed, t)
        rows = [task.train[i] for i in row_ids]
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
        self.store.append_seedlog(
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
        done.samples += len(members) * len(rows)
        done.tokens += pop.tokens
        done.flat_streak = done.flat_streak + 1 if all(w == 0 for w in weights) else 0
        return iteration_metrics(
            t, done.samples, done.tokens, pop, stats, time.perf_counter() - t0, done.flat_streak
        )

    def _stop_reason(self, t: int, done: _Progress) -> str | None:
        """Why training stops after iteration ``t`` before its last (a flat population, the sample
        budget), or None."""
        cfg = self.config
        if done.flat_streak == 1 and not cfg.stop_when_flat:
            self._log(f"esft: iteration {t}: {FLAT_ADVICE}")
        if cfg.stop_when_flat and done.flat_streak >= cfg.stop_when_flat:
            return (
                f"esft: stopped after iteration {t}: the population was flat for {done.flat_streak} "
                f"iterations in a row (--stop-when-flat {cfg.stop_when_flat}); {FLAT_ADVICE}"
            )
        if over_budget(cfg.budget_samples, done.samples):
            return (
                f"esft: stopped after iteration {t}: {done.samples} samples generated, the budget "
                f"is {cfg.budget_samples} (--budget-samples)"
            )
        return None

    def _finish(self, engine: Engine, last: int) -> TrainResult:
        store = self.store
        if last not in store.checkpoints():  # e.g. killed between the last update and its save
            self._checkpoint(engine, last)
        self.callbacks.on_train_end()
        ckpts = store.checkpoints()
        evals = [e for e in store.evals() if e["iteration"] <= last]
        return TrainResult(store.root, last, ckpts.get(last), evals)

    # -- pieces -----------------------------------------------------------------------------------

    def _open_run(self, start: int, engine: Engine, params: ParamSet) -> None:
        """Write the run's config, clear stale temporary files, start the callbacks (TensorBoard,
        trackers), say what runs, and evaluate the base model on a fresh start."""
        cfg, store = self.config, self.store
        reset_peak()  # perf/peak_rss_mb: training's high-water mark, not the transient copies of loading
        store.write_config({"trainer": "es", **cfg.to_dict(), "model_path": self.model_path})
        store.clean_temp()
        self.callbacks.on_train_begin(RunInfo(store.root, "es", store.read_config(), start))
        self._log(
            f"esft: {self.task.name} | model {cfg.model or 'embedded default'} | {params.numel / 1e6:.1f}M "
            f"trainable params | N={cfg.population} sigma={cfg.sigma:g} alpha={cfg.alpha:g} | noise {cfg.noise}"
            + (f" rank {cfg.rank}" if cfg.noise == "lowrank" else "")
            + f" | run {store.root}"
        )
        if cfg.eval_every and start == 0:
            self._evaluate(engine, 0)

    def _progress_so_far(self) -> _Progress:
        """Samples, tokens and the flat streak through the last logged iteration (0 on a fresh start)."""
        previous = self.store.metrics()
        last = previous[-1] if previous else {}
        return _Progress(last.get("samples", 0), last.get("tokens", 0), last.get("es/flat_streak", 0))

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
        on_disk = environment.read(store.root) if self.resume else None
        recorded = on_disk if check_env else None
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
        if self.resume:
            environment.carry_source(on_disk, env_now, self._log)
        environment.write(store.root, env_now)
        fused = getattr(params, "fused", False)  # a local ParamSet large enough for the compiled update
        self._log(
            f"esft: dtype {env_now['dtype']} ({env_now.get('dtype_reason') or 'as set'}); update precision "
            f"{params.precision} ({getattr(params, 'precision_reason', '') or 'resolved by the engine'})"
            + ("; the update is one compiled pass per chunk (built on first use)" if fused else "")
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

        def write(folder: Path) -> None:  # the weights, then the model card (esft/model_card.py)
            save_weights(engine, self.params, folder)
            model_card.write_card(folder, self.store, t, model_card.reward_parts(self.task))

        path = self.store.save_checkpoint(t, write, {"base_model": cfg.model or "embedded default"})
        self._log(f"checkpoint: {path}")
        self.callbacks.on_checkpoint(path, t)
        dropped = self.store.prune_checkpoints(cfg.keep_checkpoints, cfg.pin_checkpoints)
        if dropped:
            self._log(
                f"dropped checkpoint {', '.join(map(str, dropped))} (--keep-checkpoints {cfg.keep_checkpoints}; "
                "esft replay rebuilds any iteration from the seed log)"
            )

    def _evaluate(self, engine: Engine, t: int) -> list[dict[str, Any]]:
        """Evaluate the unperturbed model on the eval split(s) (evaluate.periodic_eval); the card of
        iteration ``t``'s checkpoint, written before, then shows the results."""
        cfg = self.config
        rows = periodic_eval(
            engine,
            self.task,
            cfg.eval_split,
            cfg.eval_limit,
            self.max_new_tokens,
            cfg.batch_size,
            t,
            self.store,
            self.callbacks,
            self._log,
            self.progress,
        )
        model_card.refresh_card(self.store, t, model_card.reward_parts(self.task))
        return rows
