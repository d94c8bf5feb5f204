"""Linear interpolation between two checkpoints: reward and KL along theta(lambda), and the barrier.

theta(lambda) = theta_A + lambda (theta_B - theta_A), computed per tensor in float32 and cast once into
one engine's live weights (lambda = 0 and 1 copy the endpoints exactly; identical endpoints give
theta_A at every lambda). lambda outside [0, 1] extrapolates (e.g. [-0.5, 1.5]: what "more of the
update" does). A is typically the base model and B a fine-tuned checkpoint.

At every lambda: the task's greedy evaluation (reward, and accuracy when the task has one), and
optionally KL(p_lambda || p_A) estimated as in ``kl.py`` (samples from theta(lambda); theta_A's
log-probabilities by swapping its weights back into the same engine).

Loss barrier (Frankle et al. 2020, in reward terms): the largest drop of the reward below the straight
line between the endpoints' rewards over interior points,

    barrier = max_{0 < lambda < 1} [R(0) + lambda (R(1) - R(0)) - R(lambda)],

reported as a reward drop: 0 or negative means the path has no barrier (linear mode connectivity).
Only one copy of theta_A is kept besides the engine's weights; theta_B is streamed from disk per point.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from esft.analysis.kl import KLEstimate, completion_logprobs, kl_estimate, sample_completions
from esft.analysis.tensors import load_weights
from esft.engines.base import Sampling
from esft.errors import ConfigError
from esft.evaluate import evaluate
from esft.safetensors_folder import iter_tensors, tensor_names
from esft.tasks.base import Task


def lambda_grid(points: int, low: float = 0.0, high: float = 1.0) -> list[float]:
    """``points`` evenly spaced values over [low, high], plus the endpoints 0 and 1 (always evaluated:
    the barrier needs them), sorted and deduplicated."""
    if points < 2:
        raise ConfigError("--points must be at least 2")
    if high <= low:
        raise ConfigError("--range LOW HIGH needs LOW < HIGH")
    values = {round(low + i * (high - low) / (points - 1), 10) for i in range(points)}
    return sorted(values | {0.0, 1.0})


def barrier(lambdas: list[float], values: list[float]) -> tuple[float | None, float | None]:
    """(max drop below the endpoint line over 0 < lambda < 1, where): see the module docstring."""
    at = dict(zip(lambdas, values, strict=True))
    r0, r1 = at[0.0], at[1.0]
    drops = [(r0 + lam * (r1 - r0) - v, lam) for lam, v in at.items() if 0.0 < lam < 1.0]
    if not drops:
        return None, None
    drop, lam = max(drops)
    return drop, lam


@dataclass
class InterpPoint:
    lam: float
    summary: dict[str, float]
    kl: KLEstimate | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"lambda": self.lam, **self.summary, "kl": self.kl.to_dict() if self.kl else None}


@dataclass
class Interpolation:
    a: str
    b: str
    task: str
    split: str
    points: list[InterpPoint] = field(default_factory=list)

    def metric(self, name: str) -> tuple[list[float], list[float]]:
        return [p.lam for p in self.points], [float(p.summary[name]) for p in self.points]

    def barriers(self) -> dict[str, dict[str, float | None]]:
        out = {}
        for name in ("reward", "accuracy"):
            if all(name in p.summary for p in self.points):
                drop, lam = barrier(*self.metric(name))
                out[name] = {"drop": drop, "lambda": lam}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "task": self.task,
            "split": self.split,
            "theta": "theta(lambda) = theta_a + lambda (theta_b - theta_a)",
            "barrier": "max over 0<lambda<1 of R(0) + lambda (R(1) - R(0)) - R(lambda) (a reward drop)",
            "points": [p.to_dict() for p in self.points],
            "barriers": self.barriers(),
        }


class Interpolator:
    """Sets an engine's weights to theta(lambda) in place, with theta_A kept once in memory."""

    def __init__(self, engine: Any, a: Path, b: Path) -> None:
        self.params = engine.parameters()
        self.b = Path(b)
        load_weights(self.params, Path(a))  # also checks that A fits the engine
        names = tensor_names(self.b)
        if names != set(self.params):
            raise ConfigError(f"{a} and {b} have different parameters: they are not one architecture")
        self.anchor = {name: t.detach().clone() for name, t in self.params.items()}

    @torch.no_grad()
    def set(self, lam: float) -> None:
        if lam == 0.0:
            self.restore()
            return
        for name, tb in iter_tensors(self.b, sorted(self.params)):
            live, a = self.params[name], self.anchor[name]
            if tuple(tb.shape) != tuple(a.shape):
                raise ConfigError(f"{name} has shape {tuple(tb.shape)} in {self.b} but {tuple(a.shape)} in A")
            if lam == 1.0:
                live.copy_(tb)
            else:
                af = a.float()
                live.copy_(af + lam * (tb.to(af.device, torch.float32) - af))

    @torch.no_grad()
    def restore(self) -> None:
        for name, live in self.params.items():
            live.copy_(self.anchor[name])


def interpolate(
    engine: Any,
    a: str | Path,
    b: str | Path,
    task: Task,
    lambdas: list[float],
    split: str = "test",
    limit: int = 0,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    kl_sampling: Sampling | None = None,
    kl_batch_size: int = 8,
    progress: bool = False,
) -> Interpolation:
    """Greedy evaluation (and KL to A when ``kl_sampling`` is given) at every lambda; ``engine`` is an
    HFEngine of the architecture of A and B (its weights are overwritten, and left at theta_A)."""
    interp = Interpolator(engine, Path(a), Path(b))
    result = Interpolation(str(a), str(b), task.name, split)
    rows = task.split(split)[: limit or None]
    max_new = max_new_tokens or task.max_new_tokens
    for lam in tqdm(lambdas, desc="interpolate", unit="point", disable=not progress):
        interp.set(lam)
        summary, _ = evaluate(engine, task, split, limit, max_new, batch_size, False)
        kl = None
        if kl_sampling is not None:
            items = sample_completions(engine, [r["prompt"] for r in rows], max_new, kl_sampling)
            temp = kl_sampling.temperature
            lp = completion_logprobs(engine.model, items, engine.pad_id, temp, kl_batch_size)
            interp.restore()
            lp_a = completion_logprobs(engine.model, items, engine.pad_id, temp, kl_batch_size)
            kl = kl_estimate(lp, lp_a)
        result.points.append(InterpPoint(lam, summary, kl))
    interp.restore()
    return result
