"""The GRPO baseline: TRL's ``GRPOTrainer`` on esft's tasks, writing the same run folder as ES.

ES and GRPO runs are meant to be compared, so everything around the optimiser is shared:
  - the same task, prompts and reward functions (the task's parts become TRL reward functions with the
    task's weights; each batch is scored once by ``Task.score``, so failures, "not applicable" values,
    ``log_metric`` and task metrics such as accuracy behave exactly as in ES);
  - the same run folder (config.yaml with ``trainer: grpo``, metrics.jsonl with the ES keys where they
    mean the same thing, TensorBoard events, eval.jsonl, Hugging Face checkpoints under
    checkpoints/iter-NNNNNN), so eval, analyze and report treat both alike;
  - the same budget unit: ``samples`` counts generated completions (prompts x group size per step, as
    members x prompts per ES iteration) and ``tokens`` their tokens; ``--budget-samples`` stops both;
  - the same cost metrics: perf/seconds, perf/samples_per_second and perf/peak_rss_mb per step.

The policy-gradient maths (sampling G completions per prompt, group-relative advantages, the clipped
surrogate with the chosen loss aggregation, the optional KL term, AdamW) is TRL's, not ours.
Differences from TRL's defaults, on purpose: a constant learning rate (ES has a constant step size;
TRL decays linearly to 0 over max_steps, which would make the schedule depend on the budget) and every
step logged. esft writes the run folder's checkpoints (Hugging Face weights, for eval and analysis);
beside them, every ``--checkpoint-every`` steps, TRL saves its training state (optimizer moments,
scheduler, RNG, data position) under ``trl/checkpoint-N``, the newest only, so that ``esft grpo
--output RUN --resume`` continues a run where it stopped, with the weights an uninterrupted run has.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PrinterCallback, TrainerCallback

from esft import environment, model_card, runs
from esft.callbacks import Callback, RunInfo
from esft.config import GRPORunConfig
from esft.dtypes import choose
from esft.engines.hf import HFEngine, hold_eos_in_generate, resolve_device
from esft.errors import ConfigError
from esft.evaluate import periodic_eval
from esft.resources import peak_memory, reset_peak
from esft.runs import TrainResult
from esft.runstore import RunStore
from esft.tasks import Task, load_task
from esft.tasks.base import Scores, TrainerState, completion_text

TRL_MISSING = "esft grpo needs TRL: pip install 'trl>=1.16,<2' (or pip install -e '.[grpo]')"


def grpo_precision(cfg: GRPORunConfig, device: str) -> tuple[torch.dtype | None, str]:
    """GRPO's compute dtype for mixed precision (None: plain float32) and why.

    ``--dtype`` means the dtype GRPO computes in, chosen as ES chooses (``esft/dtypes.py``: ``auto`` is
    bfloat16 where the hardware computes it natively). The weights and AdamW's state stay float32 in
    every case: AdamW's steps (lr x about 1 per coordinate, 1e-6 here) are far below half a bf16 ulp of
    a weight (about 1e-4 at 0.02), so bf16 weights would keep almost none of them. bf16 and fp16 are
    therefore mixed precision: forwards and backwards under ``torch.autocast`` (TRL's ``bf16``/``fp16``
    flags), the optimizer in float32, as ES keeps its steps with float32 masters (es/precision.py).
    """
    dtype, reason = choose(cfg.dtype, device)
    if dtype == torch.float32:
        return None, reason
    if dtype == torch.float16 and not device.startswith("cuda"):
        raise ConfigError(
            "GRPO in float16 needs CUDA (fp16 mixed precision scales the loss on the GPU); "
            "use --dtype bfloat16 or float32 on the CPU"
        )
    return dtype, reason


def grpo_engine(cfg: GRPORunConfig, model_path: str | Path) -> HFEngine:
    """The policy for GRPO: float32 weights, autocast in the compute dtype (``grpo_precision``)."""
    device = resolve_device(cfg.device)
    dtype, reason = grpo_precision(cfg, device)
    name = None if dtype is None else str(dtype).removeprefix("torch.")
    engine = HFEngine(model_path, dtype="float32", device=device, batch_size=cfg.batch_size, autocast=name)
    engine.dtype_reason = reason + (
        f"; mixed precision: {name} compute, float32 weights and optimizer" if name else ""
    )
    return engine


class TaskRewardFunctions:
    """A task's reward parts as TRL reward functions, one per part (TRL logs each as rewards/<name>).

    TRL calls every function on the same batch in turn; the first call scores the batch with
    ``Task.score`` (esft's failure handling, None as NaN, async rewards, log_metric/log_extra) and the
    others read their part from it. Every scored batch is also kept for the step's metrics row."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.batches: list[tuple[Scores, int]] = []  # (scores, completion tokens) since the last drain
        self._last: tuple[int, Scores] | None = None

    def functions(self) -> list[Callable[..., list[float | None]]]:
        return [self._part(p.name) for p in self.task.rewards]

    @property
    def weights(self) -> list[float]:
        return [float(p.weight) for p in self.task.rewards]

    def _part(self, name: str) -> Callable[..., list[float | None]]:
        def reward(prompts, completions, completion_ids=None, **columns) -> list[float | None]:
            scores = self._score(prompts, completions, completion_ids, columns)
            return [None if math.isnan(v) else v for v in scores.parts[name]]

        reward.__name__ = name
        return reward

    def _score(self, prompts, completions, completion_ids, columns) -> Scores:
        if self._last is not None and self._last[0] == id(completions):
            return self._last[1]
        state = columns.pop("trainer_state", None)
        for key in ("log_extra", "log_metric", "environments"):
            columns.pop(key, None)
        rows = [{"prompt": p, **{k: v[i] for k, v in columns.items()}} for i, p in enumerate(prompts)]
        texts = [completion_text(c) for c in completions]
        esft_state = TrainerState(
            global_step=int(getattr(state, "global_step", 0)),
            max_steps=int(getattr(state, "max_steps", 0)),
            epoch=float(getattr(state, "epoch", 0.0) or 0.0),
        )
        scores = self.task.score(rows, texts, completion_ids, esft_state)
        tokens = sum(len(x) for x in completion_ids) if completion_ids is not None else 0
        self.batches.append((scores, tokens))
        self._last = (id(completions), scores)
        return scores

    def drain(self) -> tuple[dict[str, float], int, int, int]:
        """(task summary over the batches scored since the last drain, completions, tokens, failures)."""
        batches, self.batches, self._last = self.batches, [], None
        if not batches:
            return {}, 0, 0, 0
        merged = Scores(total=[], parts={}, completions=[])
        for scores, _ in batches:
            merged.total += scores.total
            merged.completions += scores.completions
            merged.failures += scores.failures
            for k, v in scores.parts.items():
                merged.parts.setdefault(k, []).extend(v)
            for k, v in scores.logged.items():
                merged.logged.setdefault(k, []).extend(v)
        return (
            self.task.summary(merged),
            len(merged.total),
            sum(t for _, t in batches),
            merged.failures,
        )


def freeze_parameters(model: Any, patterns: list[str]) -> int:
    """Turn off gradients for parameters matching any ``patterns``; returns the trainable count."""
    for name, p in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
            p.requires_grad_(False)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0:
        raise ConfigError("no trainable parameters: the --freeze patterns match every parameter")
    return n


def step_layout(config: GRPORunConfig, n_train: int) -> tuple[int, int, int]:
    """(prompts per step, completions per step, micro-batch): one optimizer step per generation batch
    of prompts x group size completions, accumulated over micro-batches."""
    prompts = min(config.prompts_per_iteration or n_train, n_train)
    per_step = prompts * config.group_size
    micro = config.micro_batch_size or per_step
    if per_step % micro:
        raise ConfigError(
            f"micro_batch_size {micro} must divide the {per_step} completions of a step "
            f"({prompts} prompts x group size {config.group_size})"
        )
    return prompts, per_step, micro


def replay_epochs_on_resume(trainer: Any) -> None:
    """Make TRL's prompt sampler resumable: give it the ``set_epoch`` that transformers calls at each
    epoch's start, drawing that epoch's order afresh from the seed.

    TRL's ``RepeatSampler`` shuffles with one generator seeded once, so epoch e's order is the generator's
    (e+1)-th permutation. transformers resumes a sampler through ``set_epoch`` only; a resumed run would
    otherwise start again at the first epoch's order and train on other batches than an uninterrupted
    run. Replaying e permutations from the seed gives the same orders in both (a fresh run draws the same
    sequence as before). A sampler that is not shaped like TRL's is left alone."""
    import torch

    make = trainer._get_train_sampler

    def sampler(*args: Any, **kwargs: Any):
        s = make(*args, **kwargs)
        generator = getattr(s, "generator", None)
        if not getattr(s, "shuffle", False) or s.seed is None or not isinstance(generator, torch.Generator):
            return s

        def set_epoch(epoch: int) -> None:
            generator.manual_seed(s.seed)
            for _ in range(int(epoch)):
                torch.randperm(s.num_samples, generator=generator)

        s.set_epoch = set_epoch
        return s

    trainer._get_train_sampler = sampler


def training_states(run_dir: Path) -> dict[int, Path]:
    """TRL's saved training states in a run folder by step (``trl/checkpoint-N`` with its trainer
    state written, i.e. complete)."""
    found: dict[int, Path] = {}
    for d in (Path(run_dir) / "trl").glob("checkpoint-*"):
        step = d.name.rsplit("-", 1)[1]
        if step.isdigit() and (d / "trainer_state.json").is_file() and (d / "optimizer.pt").is_file():
            found[int(step)] = d
    return found


def planned_steps(config: GRPORunConfig, per_step: int) -> int:
    """Optimizer steps: --iterations, or fewer when --budget-samples is reached first."""
    if not config.budget_samples:
        return config.iterations
    return min(config.iterations, math.ceil(config.budget_samples / per_step))


class GRPORun:
    """``esft grpo``: one GRPO training run on an esft task, into an esft run folder."""

    def __init__(
        self,
        config: GRPORunConfig,
        progress: bool = True,
        task: Task | None = None,
        resume: bool = False,
        allow_environment_change: bool = False,
        callbacks: list[Callback] | None = None,
        trainer_callbacks: list[TrainerCallback] | None = None,
    ) -> None:
        """``trainer_callbacks``: transformers ``TrainerCallback`` objects handed to TRL's GRPOTrainer
        as they are (the Python API's ``callbacks=`` passes them here: TRL's own logs and controls)."""
        try:
            import trl  # noqa: F401
        except ImportError:
            raise ConfigError(TRL_MISSING) from None
        self.config = config
        self.trainer_callbacks = list(trainer_callbacks or [])
        self.callbacks = runs.callbacks_for("grpo", callbacks, config.report_to)
        self.progress = progress
        self.resume = resume
        self.allow_environment_change = allow_environment_change
        self.task = task or load_task(
            config.task, reward=config.reward, reward_weights=config.reward_weights, **config.task_options
        )
        self.max_new_tokens = config.max_new_tokens or self.task.max_new_tokens
        output = config.output or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{config.task}-grpo"
        self.store = RunStore(output)
        self._log = runs.console(progress)
        self.state_dir: Path | None = None  # the TRL training state --resume continues from
        self.model_path = runs.claim(
            self.store, config, "grpo", self.task, resume, self.store.metrics_path, self._find_resume_point
        )

    def _find_resume_point(self) -> None:
        """The newest TRL training state of the run in --output (its settings are checked by claim)."""
        states = training_states(self.store.root)
        if not states:
            raise ConfigError(
                f"--resume: {self.store.root} holds no GRPO training state to continue from (TRL saves it "
                "every --checkpoint-every steps, and this run saved none); start a new run"
            )
        self.state_dir = states[max(states)]

    def train(self) -> TrainResult:
        return runs.run_training(
            self.store, self._train, self._disk_full_message, self.callbacks.on_train_end
        )

    def _disk_full_message(self) -> str:
        ckpts = self.store.checkpoints()
        return (
            f"no space left on the disk of {self.store.root} (newest checkpoint "
            f"{max(ckpts) if ckpts else 'none'}); free space or lower --keep-checkpoints"
        )

    def _train(self) -> TrainResult:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer

        cfg, store, task = self.config, self.store, self.task
        check_env = self.resume and not self.allow_environment_change
        on_disk = environment.read(store.root) if self.resume else None
        recorded = on_disk if check_env else None
        environment.use_threads(environment.resume_threads(recorded), self._log)
        engine = grpo_engine(cfg, self.model_path)
        reset_peak()  # as ES: memory after the policy is loaded (TRL's reference model, if any, counts)
        if cfg.fixed_length:
            engine.min_new_tokens = self.max_new_tokens  # greedy evaluation too
            # TRL's sampling: EOS held in place, not through min_new_tokens (engines/hf.py, HoldEOS)
            hold_eos_in_generate(engine.model, self.max_new_tokens)
        n_trainable = freeze_parameters(engine.model, cfg.freeze)
        n_prompts, per_step, micro = step_layout(cfg, len(task.train))
        steps = planned_steps(cfg, per_step)
        env_now = environment.describe(engine, "hf", self.model_path)
        start = logged_through = evaluated_through = 0
        if self.resume:
            start = int(self.state_dir.name.rsplit("-", 1)[1])
            if check_env:
                environment.check(recorded, env_now, environment.CHECKED, "--resume")
            environment.carry_source(on_disk, env_now, self._log)
            logged_through = max([m["iteration"] for m in store.metrics()] + [start])
            evaluated_through = max([e["iteration"] for e in store.evals()] + [start])
            store.truncate_logs(start)  # steps after the saved state are redone
            for i in store.checkpoints():
                if i > start:
                    store.drop_checkpoint(i)
        store.write_config({"trainer": "grpo", **cfg.to_dict(), "model_path": self.model_path})
        environment.write(store.root, env_now)
        self.callbacks.on_train_begin(
            RunInfo(store.root, "grpo", store.read_config(), start, logged_through, evaluated_through)
        )
        rewards = TaskRewardFunctions(task)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*checkpointing.*", category=FutureWarning)
            args = self._trl_config(GRPOConfig, engine, rewards, steps, per_step, micro)

        self._log(
            f"esft grpo: {task.name} | model {cfg.model or 'embedded default'} | {n_trainable / 1e6:.3g}M "
            f"trainable params | {n_prompts} prompts x G={cfg.group_size} = {per_step} completions/step | "
            f"lr={cfg.learning_rate:g} beta={cfg.beta:g} loss {cfg.loss_type} | {steps} steps | run {store.root}"
        )
        callback = _RunFolderCallback(self, engine, rewards, steps)
        if start:
            done = [m for m in store.metrics() if m["iteration"] <= start]
            last_row = done[-1] if done else {}
            callback.resume(
                start,
                last_row.get("samples", 0),
                last_row.get("tokens", 0),
                last_row.get("grpo/flat_streak", 0),
            )
            self._log(f"esft grpo: resuming from step {start} ({self.state_dir})")
        trainer = GRPOTrainer(
            model=engine.model,
            reward_funcs=rewards.functions(),
            args=args,
            train_dataset=Dataset.from_list(task.train),
            processing_class=engine.tokenizer,
            callbacks=[callback, *self.trainer_callbacks],
        )
        trainer.remove_callback(PrinterCallback)
        replay_epochs_on_resume(trainer)
        if cfg.eval_every and not start:
            self._evaluate(engine, 0)
        with warnings.catch_warnings():
            # transformers 5 renamed gradient checkpointing; TRL still calls the old names every step
            warnings.filterwarnings("ignore", message=".*checkpointing.*", category=FutureWarning)
            trainer.train(resume_from_checkpoint=str(self.state_dir) if start else None)
        callback.bar.close()
        with contextlib.suppress(OSError):
            (store.root / "trl").rmdir()  # TRL's output_dir, when no training state was saved
        last = callback.last_step
        if last and last not in store.checkpoints():
            self._checkpoint(engine, last)
        self.callbacks.on_train_end()
        ckpts = store.checkpoints()
        return TrainResult(store.root, last, ckpts.get(last), store.evals())

    def _trl_config(self, config_cls, engine: HFEngine, rewards, steps: int, per_step: int, micro: int):
        """TRL's GRPOConfig for this run: one optimizer step per generation batch of ``per_step``
        completions (accumulated over micro-batches), constant learning rate, esft doing the logging."""
        cfg = self.config
        cuda = engine.device.startswith("cuda")
        return config_cls(
            output_dir=str(self.store.root / "trl"),
            max_steps=steps,
            learning_rate=cfg.learning_rate,
            lr_scheduler_type="constant",
            beta=cfg.beta,
            loss_type=cfg.loss_type,
            scale_rewards=cfg.scale_rewards,
            num_generations=cfg.group_size,
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=per_step // micro,
            steps_per_generation=per_step // micro,
            max_completion_length=self.max_new_tokens,
            temperature=cfg.temperature,
            reward_weights=rewards.weights,
            gradient_checkpointing=cfg.gradient_checkpointing,
            use_cpu=not cuda,
            bf16=engine.autocast_dtype == torch.bfloat16,
            fp16=engine.autocast_dtype == torch.float16,
            seed=cfg.seed,
            data_seed=cfg.seed,
            logging_steps=1,
            # TRL's own checkpoint (model, optimizer, scheduler, RNG, data position) is what --resume
            # continues from; only the newest is kept (esft keeps the weights in checkpoints/)
            save_strategy="steps" if cfg.checkpoint_every else "no",
            save_steps=cfg.checkpoint_every or 500,
            save_total_limit=1,
            save_only_model=False,
            report_to="none",  # esft's trackers (config.report_to) log the rows, with ES's metric names
            disable_tqdm=True,  # esft's own bar and step lines instead of TRL's printed log dicts
            remove_unused_columns=False,
            dataloader_num_workers=0,
        )

    def _checkpoint(self, engine: HFEngine, step: int) -> None:
        cfg = self.config
        was_training = engine.model.training
        engine.model.eval()

        def write(folder: Path) -> None:  # the weights, then the model card (esft/model_card.py)
            engine.save(folder)
            model_card.write_card(folder, self.store, step, model_card.reward_parts(self.task))

        path = self.store.save_checkpoint(
            step, write, {"base_model": cfg.model or "embedded default", "trainer": "grpo"}
        )
        engine.model.train(was_training)
        self._log(f"checkpoint: {path}")
        self.callbacks.on_checkpoint(path, step)
        self.store.prune_checkpoints(cfg.keep_checkpoints, cfg.pin_checkpoints)

    def _evaluate(self, engine: HFEngine, step: int) -> None:
        """Greedy evaluation of the current policy on the eval split(s), as ES evaluates."""
        cfg = self.config
        was_training = engine.model.training
        engine.model.eval()
        try:
            periodic_eval(
                engine,
                self.task,
                cfg.eval_split,
                cfg.eval_limit,
                self.max_new_tokens,
                cfg.batch_size,
                step,
                self.store,
                self.callbacks,
                self._log,
            )
        finally:
            engine.model.train(was_training)
        # the card of this step's checkpoint, written before the evaluation, now shows its results
        model_card.refresh_card(self.store, step, model_card.reward_parts(self.task))


FLAT_ADVICE = (
    "every group's completions scored the same, so every advantage is zero: the step has no reward "
    "signal, and only the KL term (beta > 0) and the optimizer's momentum move the weights; to give the "
    "groups something to rank: more prompts per step (--prompts-per-iteration), a larger --group-size "
    "or --temperature, or a reward with finer steps; --stop-when-flat K ends the run after K such steps"
)


class _RunFolderCallback(TrainerCallback):
    """Writes TRL's per-step logs into the esft run folder, checkpoints and evaluates on esft's cadence."""

    def __init__(self, run: GRPORun, engine: HFEngine, rewards: TaskRewardFunctions, steps: int) -> None:
        self.run, self.engine, self.rewards, self.steps = run, engine, rewards, steps
        self.samples = 0
        self.tokens = 0
        self.last_step = 0
        self.flat_streak = 0  # steps in a row whose every group scored the same
        self._t0 = time.perf_counter()
        self.bar = tqdm(total=steps, desc="GRPO", unit="step", disable=not run.progress, dynamic_ncols=True)

    def resume(self, step: int, samples: int, tokens: int, flat_streak: int = 0) -> None:
        """Continue the counters and the bar of a run resumed after ``step``."""
        self.last_step, self.samples, self.tokens = step, samples, tokens
        self.flat_streak = flat_streak
        self.bar.update(step)

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "reward" not in logs:  # the end-of-training summary, not a step
            return
        seconds = time.perf_counter() - self._t0
        step = state.global_step
        summary, n, tokens, failures = self.rewards.drain()
        self.samples += n
        self.tokens += tokens
        self.flat_streak = self.flat_streak + 1 if logs.get("frac_reward_zero_std") == 1.0 else 0
        metrics = grpo_metrics(
            step, self.samples, self.tokens, logs, summary, n, failures, seconds, self.flat_streak
        )
        runs.record(self.run.store, self.run.callbacks, metrics, step)
        self.bar.update(1)
        self.run._log(grpo_line(metrics, self.steps))
        self.last_step = step
        cfg = self.run.config
        final = step >= self.steps
        if self.flat_streak == 1 and not cfg.stop_when_flat:
            self.run._log(f"esft grpo: step {step}: {FLAT_ADVICE}")
        flat_stop = not final and 0 < cfg.stop_when_flat <= self.flat_streak
        if runs.due(step, cfg.checkpoint_every, final or flat_stop):
            self.run._checkpoint(self.engine, step)
        if cfg.eval_every and runs.due(step, cfg.eval_every, final or flat_stop):
            self.run._evaluate(self.engine, step)
        if final and cfg.budget_samples and self.samples >= cfg.budget_samples:
            self.run._log(
                f"esft grpo: stopped after step {step}: {self.samples} samples generated, the budget is "
                f"{cfg.budget_samples} (--budget-samples)"
            )
        elif flat_stop:
            self.run._log(
                f"esft grpo: stopped after step {step}: every group scored the same for {self.flat_streak} "
                f"steps in a row (--stop-when-flat {cfg.stop_when_flat})"
            )
            control.should_training_stop = True
        elif not final and self.run.callbacks.stop:
            # a callback (e.g. a sweep's pruner) ends the run; the step is checkpointed after train()
            self.run._log(f"esft grpo: stopped after step {step}: {self.run.callbacks.stop}")
            control.should_training_stop = True


def grpo_metrics(
    step: int,
    samples: int,
    tokens: int,
    logs: dict[str, Any],
    summary: dict[str, float],
    completions: int,
    failures: int,
    seconds: float,
    flat_streak: int = 0,
) -> dict[str, Any]:
    """The metrics.jsonl row of GRPO step ``step``: ES's keys where they mean the same thing (train/
    reward and parts over this step's completions, lengths, budget counters, perf/), TRL's own
    quantities under grpo/ (loss, grad norm, KL, entropy, clip ratios, reward std over completions),
    and ``grpo/flat_streak``: the steps in a row up to this one whose every group scored the same."""

    def num(key: str) -> float:
        v = logs.get(key)
        return float(v) if isinstance(v, int | float) else math.nan

    row: dict[str, Any] = {
        "iteration": step,
        "samples": samples,
        "tokens": tokens,
        "train/reward_mean": summary.get("reward", num("reward")),
        **{f"train/{k}": v for k, v in summary.items() if k != "reward"},
        "train/completion_tokens": num("completions/mean_length"),
        "train/truncated_fraction": num("completions/clipped_ratio"),
        "train/reward_failures": failures,
    }
    for key, value in logs.items():
        if isinstance(value, int | float) and not key.startswith(("rewards/", "completions/")):
            name = key.replace("reward_std", "reward_std_completions")
            row[f"grpo/{name}"] = float(value)
    row["grpo/flat_streak"] = int(flat_streak)
    row.update(
        {
            "perf/seconds": seconds,
            "perf/samples_per_second": completions / seconds if seconds > 0 else 0.0,
            "perf/tokens_per_second": num("completions/mean_length") * completions / seconds
            if seconds > 0
            else 0.0,
            **peak_memory(),
        }
    )
    return row


def grpo_line(m: dict[str, Any], steps: int) -> str:
    failures = m["train/reward_failures"]
    kl = m.get("grpo/kl")
    flat = m.get("grpo/flat_streak", 0)
    streak = f" ({flat} in a row)" if flat > 1 else ""
    return (
        f"step {m['iteration']:>4}/{steps} | reward {m['train/reward_mean']:.4g} | "
        f"len {m['train/completion_tokens']:.0f} tok | loss {m.get('grpo/loss', math.nan):.4g} "
        f"grad norm {m.get('grpo/grad_norm', math.nan):.3g}"
        + (f" kl {kl:.3g}" if kl is not None else "")
        + f" | {m['perf/seconds']:.1f}s | {m['perf/samples_per_second']:.2f} samples/s"
        + f" | peak {m['perf/peak_rss_mb']:.0f} MiB"
        + (f" | {failures} reward failures" if failures else "")
        + (f" | FLAT: every group scored the same{streak}" if m.get("grpo/flat_streak") else "")
    )
