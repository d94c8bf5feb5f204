"""Low-rank perturbations (EGGROLL, Sarkar et al. 2025) for population-batched ES.

Member n perturbs a weight matrix W (out x in) by sigma * E_n with E_n = A_n B_n^T / sqrt(r), where
A_n (out x r) and B_n (in x r) are standard normals drawn from the member's seed and the parameter's
name. Every entry of E_n has unit variance, like full-rank noise, but a member's noise for the whole
model is (out + in) * r numbers per matrix instead of out * in, and, more important, a forward pass can
apply it without touching W:

    x (W + sigma E_n)^T = x W^T + sigma (x B_n) A_n^T / sqrt(r)

so all members share one batched forward through the unperturbed weights, each adding its own rank-r
correction (``engines/hf.py``, ``generate_population``). The update
theta += alpha/N sum_n z_n E_n = alpha/N (A Z) B^T is one (out x Nr) x (Nr x in) matrix product.

Vectors that a population forward can perturb per member (biases of linear layers) get full-rank
Gaussian noise from the same stream; other vectors (normalisation scales) are not trained in this
scheme (``lowrank_trainable``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from esft.es.noise import Member, stream_seed


def lowrank_trainable(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors the low-rank scheme trains: matrices and biases (not normalisation scales)."""
    return {n: t for n, t in params.items() if t.ndim == 2 or (t.ndim == 1 and n.endswith(".bias"))}


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(stream_seed(seed, name))
    return gen


def factors(
    shape: Sequence[int], seed: int, name: str, rank: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A / sqrt(r), B): float32 factors of member ``seed``'s noise for matrix ``name`` of ``shape``.

    ``A @ B.T`` is the member's (unit-variance) noise matrix; A is (out, r) and B is (in, r).
    """
    out_f, in_f = shape
    device = torch.device(device)
    draw = torch.empty((out_f + in_f) * rank, dtype=torch.float32, device=device)
    draw.normal_(generator=_generator(seed, name, device))
    a = draw[: out_f * rank].view(out_f, rank).mul_(1.0 / math.sqrt(rank))
    b = draw[out_f * rank :].view(in_f, rank)
    return a, b


def vector_noise(
    numel: int, seed: int, name: str, device: torch.device | str = "cpu", out: torch.Tensor | None = None
) -> torch.Tensor:
    """Full-rank float32 noise for a vector parameter (a bias)."""
    device = torch.device(device)
    if out is None:
        out = torch.empty(numel, dtype=torch.float32, device=device)
    return out.normal_(generator=_generator(seed, name, device))


def stacked_vectors(
    numel: int, members: Sequence[Member], name: str, device: torch.device | str
) -> torch.Tensor:
    """(n, numel) full-rank vector noise for ``members``, each row carrying the member's sign."""
    return torch.stack([vector_noise(numel, m.seed, name, device) * m.sign for m in members])
