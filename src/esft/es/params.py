"""Perturb, restore and update a set of named tensors in place (Qiu et al. 2025, Algorithm 2).

Exactness: ``theta + sigma*eps - sigma*eps`` is not ``theta`` in bf16/fp16 (nor reliably in fp32), so
this module keeps a *pristine* copy of every trainable tensor. A perturbation writes
``cast(pristine + sigma*eps)`` into the live tensor and restore copies the pristine tensor back: bit-exact
in every dtype, and it costs a memcpy instead of a second noise draw.

``restore="subtract"`` reproduces the reference implementation instead (no pristine copy; restore
regenerates the noise and subtracts it, which is not exact). It exists so ``esft bench`` can time the
reference behaviour on the same work; training always uses the exact copy.

The update ``theta += alpha/N * sum_n z_n sign_n eps_n`` is accumulated per tensor in float32 over the
members and cast to the tensor's dtype once, so a small step is not lost to 30 separate bf16 roundings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from esft.es.lowrank import factors, vector_noise
from esft.es.noise import Member, NoiseScheme, noise_slices


@dataclass
class UpdateStats:
    """Norms of one update, over all trainable tensors."""

    update_norm: float  # ||theta_new - theta_old||, measured after the cast to the parameter dtype
    param_norm: float  # ||theta_old||
    changed_fraction: float  # share of coordinates whose stored value changed

    @property
    def update_ratio(self) -> float:
        return self.update_norm / self.param_norm if self.param_norm > 0 else 0.0


class ParamSet:
    """The trainable tensors of a model, by name, with a pristine copy for exact restore (made when
    first needed).

    ``params`` must be the tensors the forward pass actually reads (an engine's job to provide).
    """

    def __init__(
        self,
        params: Mapping[str, torch.Tensor],
        scheme: NoiseScheme | str = NoiseScheme.INDEPENDENT,
        rank: int = 1,
        restore: str = "copy",
    ) -> None:
        if not params:
            raise ValueError("no trainable parameters: every parameter is frozen")
        self.params = dict(params)
        self.scheme = NoiseScheme(scheme)
        self.rank = int(rank)
        for name, t in self.params.items():
            if not t.is_contiguous():
                raise ValueError(
                    f"parameter {name} is not contiguous; ES updates it in place through a flat view"
                )
            if self.scheme == NoiseScheme.LOWRANK and not (t.ndim == 2 or t.ndim == 1):
                raise ValueError(
                    f"low-rank noise needs matrices and vectors; {name} has shape {tuple(t.shape)}"
                )
        if self.rank < 1:
            raise ValueError("rank must be at least 1")
        if restore not in ("copy", "subtract"):
            raise ValueError(f"restore must be copy or subtract, got {restore!r}")
        self.restore_mode = restore
        # The pristine copy is made on the first perturb(): until then (and for good with low-rank
        # population batching, which never perturbs the live weights) the live tensors are their own
        # base, and ES keeps one copy of the model instead of two. With restore="subtract" they always
        # are; restore subtracts the regenerated noise.
        self.pristine = self.params
        self._buffers: dict[tuple, torch.Tensor] = {}
        self.perturbed: Member | None = None
        self._sigma = 0.0

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.params.values())

    def _eps(self, name: str, member: Member):
        """(start, values) slices of the flattened float32 noise of ``name`` under ``member``."""
        if self.scheme == NoiseScheme.LOWRANK:
            return [(0, self._lowrank_eps(name, member.seed).view(-1))]
        t = self.params[name]
        # generated noise is drawn into a reused buffer; table noise is yielded as table views
        buf = None if self.scheme == NoiseScheme.TABLE else self._buffer(t)
        return noise_slices(t.shape, member.seed, name, t.device, self.scheme, buf)

    def _buffer(self, t: torch.Tensor) -> torch.Tensor:
        key = (tuple(t.shape), t.device)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty(t.shape, dtype=torch.float32, device=t.device)
        return buf

    def _lowrank_eps(self, name: str, seed: int) -> torch.Tensor:
        """The materialised low-rank noise A B^T / sqrt(r) of a matrix (full noise for a vector)."""
        t = self.params[name]
        if t.ndim == 1:
            return vector_noise(t.numel(), seed, name, t.device, out=self._buffer(t))
        a, b = factors(t.shape, seed, name, self.rank, t.device)
        return torch.mm(a, b.T, out=self._buffer(t))

    @torch.no_grad()
    def perturb(self, member: Member, sigma: float) -> None:
        """Set every live tensor to cast(pristine + sign * sigma * eps), layer by layer."""
        if self.perturbed is not None:
            raise RuntimeError("perturb() called twice without restore()")
        if self.restore_mode == "copy" and self.pristine is self.params:
            self.pristine = {name: t.detach().clone() for name, t in self.params.items()}
        self.perturbed, self._sigma = member, sigma
        for name, live in self.params.items():
            flat_live, flat_base = live.view(-1), self.pristine[name].view(-1)
            for start, eps in self._eps(name, member):
                end = start + eps.numel()
                # computed in float32 (eps is float32), rounded once into the live dtype
                torch.add(flat_base[start:end], eps, alpha=sigma * member.sign, out=flat_live[start:end])

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the pristine tensors back: bit-exact (or, with restore="subtract", subtract the noise)."""
        member = self.perturbed
        for name, live in self.params.items():
            if self.restore_mode == "copy":
                if self.pristine is not self.params:
                    live.copy_(self.pristine[name])
            elif member is not None:
                flat = live.view(-1)
                for start, eps in self._eps(name, member):
                    end = start + eps.numel()
                    torch.add(flat[start:end], eps, alpha=-self._sigma * member.sign, out=flat[start:end])
        self.perturbed = None

    @torch.no_grad()
    def update(
        self,
        members: Sequence[Member],
        weights: Sequence[float],
        alpha: float,
        on_tensor: Callable[[], None] | None = None,
    ) -> UpdateStats:
        """theta += alpha / N * sum_n weights_n * sign_n * eps_n, in float32, cast once per tensor.

        ``weights`` are the shaped rewards (z-scores). Members with weight 0 cost nothing, and an
        antithetic pair costs one noise draw.
        """
        if self.perturbed is not None:
            raise RuntimeError("update() while perturbed: call restore() first")
        if len(members) != len(weights):
            raise ValueError("one weight per member")
        n = len(members)
        # Members sharing a seed (antithetic pairs) share one noise draw: weight sum_k w_k sign_k.
        per_seed: dict[int, float] = {}
        for m, w in zip(members, weights, strict=True):
            per_seed[m.seed] = per_seed.get(m.seed, 0.0) + float(w) * m.sign
        active = [(Member(seed), w) for seed, w in per_seed.items() if w != 0.0]
        sq_update = sq_param = 0.0
        changed = total = 0
        for name, live in self.params.items():
            old = self.pristine[name]
            sq_param += float(torch.linalg.vector_norm(old, dtype=torch.float32)) ** 2
            total += old.numel()
            if not active:
                continue
            if self.scheme == NoiseScheme.LOWRANK and old.ndim == 2:
                # sum_n w_n A_n B_n^T as one product of the concatenated factors
                pairs = [
                    (factors(old.shape, m.seed, name, self.rank, old.device), w * m.sign) for m, w in active
                ]
                a = torch.cat([ab[0] * c for ab, c in pairs], dim=1)
                b = torch.cat([ab[1] for ab, _ in pairs], dim=1)
                acc = a @ b.T
            else:
                acc = torch.zeros(old.shape, dtype=torch.float32, device=old.device)
                flat_acc = acc.view(-1)
                for member, w in active:
                    for start, eps in self._eps(name, member):
                        flat_acc[start : start + eps.numel()].add_(eps, alpha=w * member.sign)
            # live = cast(old + alpha/N * acc): the step is taken once, in float32, without temporaries
            acc.mul_(alpha / n)
            before = old.clone() if live is old else old  # restore="subtract" has no separate pristine
            torch.add(old, acc, out=live)
            acc.copy_(live).sub_(before)  # the applied step, after the cast, exactly (float32)
            sq_update += float(torch.linalg.vector_norm(acc)) ** 2
            changed += int(torch.count_nonzero(acc))
            if live is not old:
                old.copy_(live)
            if on_tensor is not None:
                on_tensor()
        return UpdateStats(math.sqrt(sq_update), math.sqrt(sq_param), changed / max(total, 1))

    def state_norm(self) -> float:
        return math.sqrt(sum(float(t.float().pow(2).sum()) for t in self.pristine.values()))
