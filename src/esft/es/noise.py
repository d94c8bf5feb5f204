"""Noise streams derived from seeds (Salimans et al. 2017; Qiu et al. 2025, Algorithm 2).

A population member is a seed and a sign; its perturbation eps is regenerated from the seed whenever it
is needed (perturb, update, replay) and never stored. Seeds come from (run seed, iteration) alone, so a
whole run is a pure function of its configuration.

Schemes:
- ``independent`` (default): every (seed, parameter) pair gets its own stream, seeded by a hash of the
  seed and the parameter *name*. Equal-shaped tensors therefore get unrelated noise.
- ``correlated``: the reference implementation's scheme, which re-seeds with the bare seed for every
  tensor, so all equal-shaped tensors receive the *same* noise. Offered only to replicate the paper's
  code; it makes the search space much smaller than the parameter count suggests.

Noise is drawn in float32 on the parameter's device. CPU and CUDA generators differ, so a run is
reproducible on the same device type, not across them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch

# Seeds live in [0, 2**31): small enough for every RNG API and for JSON.
SEED_BOUND = 2**31


class NoiseScheme(StrEnum):
    INDEPENDENT = "independent"
    CORRELATED = "correlated"


@dataclass(frozen=True)
class Member:
    """One population member: perturbation sign * eps(seed)."""

    seed: int
    sign: int = 1


def iteration_members(
    run_seed: int, iteration: int, population: int, antithetic: bool = False
) -> list[Member]:
    """The population of iteration ``iteration`` (1-based), a pure function of its arguments.

    With ``antithetic``, members come in mirrored pairs (+eps, -eps) that share one seed, so the
    population must be even.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(run_seed), int(iteration)]))
    if antithetic:
        if population % 2:
            raise ValueError("antithetic sampling needs an even population")
        seeds = rng.integers(0, SEED_BOUND, size=population // 2)
        return [Member(int(s), sign) for s in seeds for sign in (1, -1)]
    return [Member(int(s)) for s in rng.integers(0, SEED_BOUND, size=population)]


def stream_seed(seed: int, name: str, scheme: NoiseScheme = NoiseScheme.INDEPENDENT) -> int:
    """The generator seed for parameter ``name`` under member seed ``seed``."""
    if scheme == NoiseScheme.CORRELATED:
        return int(seed)
    digest = hashlib.blake2b(f"{int(seed)}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def noise_for(
    shape: torch.Size | tuple[int, ...],
    seed: int,
    name: str,
    device: torch.device | str = "cpu",
    scheme: NoiseScheme = NoiseScheme.INDEPENDENT,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Standard normal noise (float32) of ``shape`` for parameter ``name`` under ``seed``.

    ``out``, when given, is a float32 buffer of the right shape to fill (avoids an allocation per call).
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(stream_seed(seed, name, scheme))
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=device)
    return out.normal_(generator=gen)
