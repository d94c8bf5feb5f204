"""The ES core: noise from seeds, exact perturb/restore, fitness shaping, the update.

Engine-agnostic: everything here works on a mapping of parameter name -> tensor, so a Hugging Face
model, a vLLM worker's weights or a Ray worker's copy all share one implementation.
"""

from esft.es.noise import Member, NoiseScheme, iteration_members, noise_for
from esft.es.params import ParamSet, UpdateStats
from esft.es.shaping import SHAPERS, centered_rank, shape, zscore

__all__ = [
    "SHAPERS",
    "Member",
    "NoiseScheme",
    "ParamSet",
    "UpdateStats",
    "centered_rank",
    "iteration_members",
    "noise_for",
    "shape",
    "zscore",
]
