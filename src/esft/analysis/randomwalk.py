"""The random-walk null model of an ES update, and a run's norm growth against it.

ES (Qiu et al. 2025, Algorithm 2) takes the step theta_t = theta_{t-1} + alpha/N * sum_n z_n eps_n with
eps_n ~ N(0, I) drawn fresh for every member and iteration, and z the shaped rewards (z-scores, or
centered ranks z-scored again: mean 0, unit population variance, so sum_n z_n^2 = N).

Null model: the rewards carry no information about the noise (z independent of eps). Given z, each
coordinate of one step is a weighted sum of independent unit Gaussians, so it is
N(0, (alpha/N)^2 * sum_n z_n^2) = N(0, alpha^2 / N). Steps of different iterations use independent
noise, so after T iterations every coordinate of delta = theta_T - theta_0 is

    delta_i ~ N(0, s^2),  s^2 = alpha^2 T / N,

and over d trained coordinates ||delta||^2 = sum of d such squares, whose mean is d s^2 (relative std
sqrt(2/d), negligible for d in the millions): ||delta|| ~ alpha * sqrt(T d / N). The expected share of
coordinates with |delta_i| in [a, b) is erf(b / (s sqrt 2)) - erf(a / (s sqrt 2)).

When the run's seed log is available the variance is summed exactly over the logged iterations
instead: s^2 = sum_t (alpha_t / N_t)^2 * sum_seeds c_{t,s}^2 with c_{t,s} = sum of w * sign over the
members sharing seed s (antithetic pairs share one noise draw; flat iterations, all w = 0, add
nothing). Low-rank noise (A B^T / sqrt(r), Gaussian factors) has unit variance per coordinate too, so
the same s^2 applies.

Reading it: a run whose updates keep a direction grows faster than sqrt(T) (up to linearly in T), so
observed/expected > 1 means ES found a consistent direction; about 1 is what noise alone gives; below 1
means steps cancelled, were zero, or were rounded away by a low-precision dtype (a bf16 weight drops a
step smaller than half its ulp), which the null model does not include.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from esft.analysis.weights import Histogram, update_norm


@dataclass
class RandomWalk:
    """Per-coordinate variance of delta after ``iterations`` under the null model."""

    alpha: float
    population: int
    iterations: int
    variance: float  # s^2 per coordinate
    source: str  # "seedlog" (exact sum) or "config" (alpha^2 T / N)

    @property
    def std(self) -> float:
        return math.sqrt(self.variance)

    def expected_norm(self, d: int) -> float:
        """E||delta|| ~ sqrt(d s^2) over ``d`` trained coordinates (alpha sqrt(T d / N) from config)."""
        return math.sqrt(d * self.variance)

    def bin_probability(self, low: float, high: float) -> float:
        """P(low <= |X| < high) for X ~ N(0, s^2)."""
        if self.variance <= 0:
            return 1.0 if low <= 0.0 < high else 0.0
        scale = self.std * math.sqrt(2.0)
        upper = 1.0 if math.isinf(high) else math.erf(high / scale)
        return upper - math.erf(low / scale)

    def expected_counts(self, histogram: Histogram, d: int) -> list[float]:
        """Expected count per histogram bin for ``d`` coordinates."""
        return [d * self.bin_probability(lo, hi) for lo, hi in histogram.bins()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "population": self.population,
            "iterations": self.iterations,
            "variance": self.variance,
            "std": self.std,
            "source": self.source,
            "model": "delta_i ~ N(0, alpha^2 T / N) when rewards are independent of the noise",
        }


def is_es_run(config: dict[str, Any]) -> bool:
    return config.get("trainer", "es") in (None, "es")


def from_config(config: dict[str, Any], iterations: int) -> RandomWalk | None:
    """alpha^2 T / N from a run's config; None for a run that is not ES (e.g. GRPO)."""
    if not is_es_run(config) or not config.get("alpha") or not config.get("population"):
        return None
    alpha, n = float(config["alpha"]), int(config["population"])
    return RandomWalk(alpha, n, iterations, alpha * alpha * iterations / n, "config")


def from_seedlog(rows: list[dict[str, Any]], iterations: int, config: dict[str, Any]) -> RandomWalk | None:
    """The exact null variance summed over seed-log iterations 1..``iterations``; None when the log does
    not cover them all (a truncated or missing log)."""
    used = {int(r["iteration"]): r for r in rows if 1 <= int(r.get("iteration", 0)) <= iterations}
    if len(used) != iterations or iterations == 0:
        return None
    variance = 0.0
    for row in used.values():
        members, weights = row["members"], row["weights"]
        per_seed: dict[int, float] = {}
        for (seed, sign), w in zip(members, weights, strict=True):
            per_seed[seed] = per_seed.get(seed, 0.0) + float(w) * sign
        step = float(row.get("alpha", config.get("alpha", 0.0))) / max(len(members), 1)
        variance += step * step * sum(c * c for c in per_seed.values())
    return RandomWalk(
        float(config.get("alpha", 0.0)), int(config.get("population", 0)), iterations, variance, "seedlog"
    )


def for_run(store: Any, iterations: int) -> RandomWalk | None:
    """The null model of run ``store`` at ``iterations``: from the seed log when it covers them, else
    from the config; None for a non-ES run."""
    config = store.read_config()
    if not is_es_run(config):
        return None
    return from_seedlog(store.seedlog(), iterations, config) or from_config(config, iterations)


@dataclass
class GrowthPoint:
    iteration: int
    norm: float  # ||theta_T - theta_0||
    relative_norm: float  # / ||theta_0||
    expected_config: float | None  # alpha sqrt(T d / N)
    expected_seedlog: float | None  # sqrt(d s^2) with the seed log's exact s^2
    # the checkpoint against the seed log's intended update, in float32 (steploss.py); None: not ES
    step_cosine: float | None = None
    step_norm_ratio: float | None = None
    step_lost_fraction: float | None = None

    @property
    def ratio(self) -> float | None:
        expected = self.expected_seedlog or self.expected_config
        return self.norm / expected if expected else None


@dataclass
class Growth:
    run: str
    base: str
    trained_numel: int  # d
    points: list[GrowthPoint]

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "base": self.base,
            "trained_numel": self.trained_numel,
            "expected": "alpha * sqrt(T * d / N) (config); sqrt(d * s^2) with s^2 from the seed log",
            "points": [{**p.__dict__, "ratio": p.ratio} for p in self.points],
        }


def growth(store: Any, base: str | Path, progress: bool = False) -> Growth:
    """||theta_T - theta_0|| at every checkpoint of an ES run against the random-walk expectation, and
    against the update the seed log intended (``steploss.py``: what rounding lost).

    theta_0 is the base rounded to the checkpoints' dtype (a bf16 run starts from those weights).
    d = the coordinates of the tensors that changed in any checkpoint (frozen tensors stay exact)."""
    config = store.read_config()
    seedlog = store.seedlog()
    es = is_es_run(config)
    measured = []
    trained: dict[str, int] = {}
    for it, folder in tqdm(
        store.checkpoints().items(), desc="checkpoints", disable=not progress, leave=False
    ):
        norm, base_norm, changed = update_norm(base, folder)
        trained.update(changed)
        measured.append((it, norm, base_norm))
    d = sum(trained.values())
    losses = {}
    if es and seedlog:
        from esft.analysis.steploss import step_loss

        losses = {s.iteration: s for s in step_loss(config, seedlog, base, store.checkpoints(), progress)}
    points = []
    for it, norm, base_norm in measured:
        by_config = from_config(config, it) if es else None
        by_log = from_seedlog(seedlog, it, config) if es else None
        points.append(
            GrowthPoint(
                iteration=it,
                norm=norm,
                relative_norm=norm / base_norm if base_norm else math.nan,
                expected_config=by_config.expected_norm(d) if by_config else None,
                expected_seedlog=by_log.expected_norm(d) if by_log else None,
                step_cosine=losses[it].cosine if it in losses else None,
                step_norm_ratio=losses[it].norm_ratio if it in losses else None,
                step_lost_fraction=losses[it].lost_fraction if it in losses else None,
            )
        )
    return Growth(str(store.root), str(base), d, points)
