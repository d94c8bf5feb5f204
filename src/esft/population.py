"""Population scoring: what one ES iteration does with its members, below both trainers and the Ray pool.

- :func:`es_params`: the :class:`~esft.es.ParamSet` ES trains on an engine (built where the weights live);
- :func:`score_population`: perturb -> generate -> restore -> score for every member, on whichever path
  the engine offers (:func:`scoring_path`);
- :func:`apply_seedlog`: re-apply logged updates (resume, replay, Ray workers);
- :func:`prompt_batch`, :func:`engine_options`, :func:`save_weights`: the iteration's prompts, the engine
  options a run needs, a checkpoint's files.

The ES trainer (:mod:`esft.trainer`), ``esft replay``, ``esft bench`` and the Ray workers
(:mod:`esft.distributed`) all use these; nothing here imports them back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from esft.engines import Engine, Generation
from esft.engines.base import PopulationScorer, RemoteWeights, batches_population
from esft.errors import ConfigError
from esft.es import Member, NoiseScheme, ParamSet, UpdateStats
from esft.es.params import require_state, select_trained
from esft.tasks import Task
from esft.tasks.base import TrainerState


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
    if isinstance(engine, RemoteWeights):  # the weights live in another process: ES runs there
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


Scoring = Literal["pool", "batched", "member"]


def scoring_path(engine: Engine, params: ParamSet) -> Scoring:
    """How a population is scored on ``engine``, decided here only:

    - ``pool``: the engine is a pool of workers (:class:`~esft.engines.base.PopulationScorer`) that
      spreads the members over its own engines and scores them there;
    - ``batched``: low-rank noise on an engine that generates a whole population in batched calls
      through the unperturbed weights (:func:`~esft.engines.base.batches_population`);
    - ``member``: member by member, perturbing and restoring the weights in place.
    """
    if isinstance(engine, PopulationScorer):
        return "pool"
    if params.scheme == NoiseScheme.LOWRANK and batches_population(engine):
        return "batched"
    return "member"


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
    path = scoring_path(engine, params)
    if path == "pool":  # the members go to workers that each own an engine
        assert isinstance(engine, PopulationScorer)
        return engine.score_population(
            params, task, members, rows, sigma, max_new_tokens, desc, progress, state
        )
    prompts = [r["prompt"] for r in rows]
    pop = Population()
    if path == "batched":
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
