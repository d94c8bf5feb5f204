"""``esft bench``: the cost of one ES iteration against the floor of plain batched inference.

For a model, task, population N, P prompts per member and L new tokens, it measures in one process,
on one engine:
  (a) the floor: one plain batched generation of the same N x P prompts with the unperturbed model;
  (b) one full ES iteration per mode, split into generate / score / noise / update:
      - ``reference``: the reference implementation's behaviour (one perturbed model at a time, noise
        regenerated for perturb, restore and update, correlated seeding, restore by subtraction);
      - ``independent`` / ``table`` / ``correlated``: esft's member-by-member iteration with that noise
        (exact restore by copying a pristine tensor);
      - ``lowrank``: all members in one population-batched generation (EGGROLL, rank ``rank``);
and prints a table of seconds, tokens/s and the ratio of each to the floor (measured results:
docs/benchmarks.md, "`esft bench`: one ES iteration against the batched-inference floor").
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from esft.config import BENCH_MODES
from esft.engines import Engine
from esft.engines.base import RemoteWeights, batches_population
from esft.errors import ConfigError
from esft.es import ParamSet, iteration_members, shape
from esft.es.params import select_trained
from esft.population import score_population
from esft.tasks import Task


def mode_params(
    engine: Engine, mode: str, freeze: list[str], rank: int = 1, precision: str = "auto"
) -> tuple[str, ParamSet]:
    """(row label, ParamSet) that makes one ES iteration behave as ``mode`` (its update with
    ``precision``; the reference code rounds to nearest)."""
    if mode not in BENCH_MODES:
        raise ValueError(f"unknown bench mode {mode!r}; use {', '.join(BENCH_MODES)}")
    if mode == "lowrank":
        how = "batched" if batches_population(engine) else "member by member"
        label = f"ES, lowrank r={rank} ({how})"
    else:
        label = "reference (paper code)" if mode == "reference" else f"ES, {mode} noise"
    if isinstance(engine, RemoteWeights):  # weights in another process (vLLM)
        if mode == "reference":
            raise ConfigError("the reference mode needs --engine hf (it restores by subtraction in place)")
        return label, engine.param_set(freeze, mode, rank, precision)
    live = select_trained(engine.parameters(), freeze)
    if mode == "reference":
        return label, ParamSet(live, scheme="correlated", restore="subtract", precision="nearest")
    if mode == "lowrank":
        return label, ParamSet(
            select_trained(live, [], mode), scheme="lowrank", rank=rank, precision=precision
        )
    return label, ParamSet(live, scheme=mode, precision=precision)


@dataclass
class BenchRow:
    mode: str
    seconds: float
    generate: float
    score: float
    noise: float
    update: float
    tokens: int
    # with repeats: this row's time over its round's floor, per round (the median is the ratio shown)
    ratios: list[float] = field(default_factory=list)

    def ratio(self, floor: float) -> float:
        if self.ratios:
            return statistics.median(self.ratios)
        return self.seconds / floor if floor > 0 else float("inf")


def run_bench(
    engine: Engine,
    task: Task,
    population: int,
    prompts_per_member: int,
    max_new_tokens: int,
    modes: list[str],
    sigma: float = 1e-3,
    freeze: list[str] | None = None,
    rank: int = 1,
    fixed_length: bool = False,
    log=print,
    precision: str = "auto",
    repeats: int = 1,
) -> list[BenchRow]:
    """The floor and one ES iteration per mode. ``fixed_length`` makes every completion exactly
    ``max_new_tokens`` long (end-of-sequence suppressed, where the engine supports it), so the floor
    and each mode do identical token work and the ratios measure engine cost alone.

    ``repeats`` > 1 runs that many rounds, each the floor and then every mode, so each measurement sits
    beside a floor measured moments before it: a row holds the median of its rounds (each column on its
    own) and its ratio is the median over rounds of its time over that round's floor. On a shared machine
    this separates the code's cost from the machine's drift, which moves both alike."""
    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {repeats}")
    if fixed_length:
        engine.min_new_tokens = max_new_tokens
    rows = task.train[:prompts_per_member]
    if len(rows) < prompts_per_member:
        log(f"note: the train split has only {len(rows)} prompts; using {len(rows)} per member")
    prompts = [r["prompt"] for r in rows]
    engine.generate(prompts[:1], 2)  # warm-up, not timed

    members = iteration_members(0, 1, population)
    rounds = []
    for _ in range(repeats):
        measured = [_floor(engine, task, rows, prompts, population, max_new_tokens)]
        for mode in modes:
            measured.append(
                _iteration(engine, task, rows, members, mode, sigma, max_new_tokens, freeze, rank, precision)
            )
        rounds.append(measured)
    if repeats == 1:
        return rounds[0]
    floors = [r[0].seconds for r in rounds]
    return [_median(list(column), floors) for column in zip(*rounds, strict=True)]


def _floor(engine: Engine, task: Task, rows: list, prompts: list, population: int, max_new_tokens: int):
    """Plain batched generation of the same prompts with the unperturbed model, then scoring."""
    tic = time.perf_counter()
    gens = engine.generate(prompts * population, max_new_tokens)
    floor_s = time.perf_counter() - tic
    tic = time.perf_counter()
    task.score(rows * population, [g.text for g in gens], [g.token_ids for g in gens])
    floor_score = time.perf_counter() - tic
    return BenchRow(
        "floor (batched)",
        floor_s + floor_score,
        floor_s,
        floor_score,
        0.0,
        0.0,
        sum(g.num_tokens for g in gens),
    )


def _iteration(
    engine: Engine,
    task: Task,
    rows: list,
    members: list,
    mode: str,
    sigma: float,
    max_new_tokens: int,
    freeze: list[str] | None,
    rank: int,
    precision: str,
) -> BenchRow:
    """One full ES iteration in ``mode`` (its update with a zero step: the weights stay as they were)."""
    label, params = mode_params(engine, mode, freeze or [], rank, precision)
    if mode == "table":
        from esft.es.noise import noise_table

        if isinstance(params, ParamSet):  # a remote ParamSet builds its table in its own process
            noise_table(next(iter(params.params.values())).device)  # once, not per iteration
    # restore="subtract" is inexact by design; keep later modes on the original weights (untimed)
    snapshot = {n: t.clone() for n, t in params.params.items()} if mode == "reference" else None
    # one-time costs of the first update (allocations; vLLM on CPU: the first repack of every GEMM
    # is ~5x a later one) are not part of an iteration: pay them untimed with a zero step
    params.update(members[:1], [1.0], 0.0)
    tic = time.perf_counter()
    pop = score_population(engine, params, task, members, rows, sigma, max_new_tokens)
    weights = shape([s["reward"] for s in pop.summaries])
    t_update = time.perf_counter()
    params.update(members, weights, 0.0)  # the full cost; a zero step leaves the weights exactly as they were
    end = time.perf_counter()
    if snapshot is not None:
        for n, t in params.params.items():
            t.copy_(snapshot[n])
    del params, snapshot  # free the copies before the next mode
    return BenchRow(
        label,
        end - tic,
        pop.timer["generate"],
        pop.timer["score"],
        pop.timer["noise"],
        end - t_update,
        pop.tokens,
    )


def _median(column: list[BenchRow], floors: list[float]) -> BenchRow:
    """One row from its rounds: the median of each column, and its ratio to each round's floor."""
    med = statistics.median
    first = column[0]
    return BenchRow(
        first.mode,
        med(r.seconds for r in column),
        med(r.generate for r in column),
        med(r.score for r in column),
        med(r.noise for r in column),
        med(r.update for r in column),
        first.tokens,
        [r.seconds / f if f > 0 else float("inf") for r, f in zip(column, floors, strict=True)],
    )


def format_table(results: list[BenchRow], info: dict[str, Any]) -> str:
    floor = results[0].seconds
    spread = len(results[-1].ratios) > 1  # several rounds: show each ratio's range over them
    head = " | ".join(f"{k}={v}" for k, v in info.items())
    lines = [
        head,
        f"{'mode':<24} {'total s':>8} {'generate':>9} {'score':>7} {'noise':>7} {'update':>7} {'tok/s':>7} {'x floor':>8}"
        + (f" {'range':>11}" if spread else ""),
    ]
    for r in results:
        tps = r.tokens / r.generate if r.generate > 0 else 0.0
        lines.append(
            f"{r.mode:<24} {r.seconds:>8.2f} {r.generate:>9.2f} {r.score:>7.2f} {r.noise:>7.2f} {r.update:>7.2f} "
            f"{tps:>7.1f} {r.ratio(floor):>8.2f}"
            + (f" {min(r.ratios):>5.2f}-{max(r.ratios):<5.2f}" if spread and r.ratios else "")
        )
    if spread:
        lines.append(
            f"medians of {len(results[-1].ratios)} rounds (floor, then each mode, per round); x floor is the "
            "median of each round's ratio to its own floor"
        )
    return "\n".join(lines)
