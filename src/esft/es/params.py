"""Perturb, restore and update a set of named tensors in place (Qiu et al. 2025, Algorithm 2).

Exactness: ``theta + sigma*eps - sigma*eps`` is not ``theta`` in bf16/fp16 (nor reliably in fp32), so
this module keeps a *pristine* copy of every trainable tensor. A perturbation writes
``cast(pristine + sigma*eps)`` into the live tensor and restore copies the pristine tensor back: bit-exact
in every dtype, and it costs a memcpy instead of a second noise draw.

The update ``theta += alpha/N * sum_n z_n sign_n eps_n`` is accumulated per tensor in float32 over the
members and cast to the tensor's dtype once, so a small step is not lost to 30 separate bf16 roundings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

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
    """The trainable tensors of a model, by name, with a pristine copy for exact restore.

    ``params`` must be the tensors the forward pass actually reads (an engine's job to provide).
    """

    def __init__(
        self,
        params: Mapping[str, torch.Tensor],
        scheme: NoiseScheme | str = NoiseScheme.INDEPENDENT,
    ) -> None:
        if not params:
            raise ValueError("no trainable parameters: every parameter is frozen")
        self.params = dict(params)
        for name, t in self.params.items():
            if not t.is_contiguous():
                raise ValueError(
                    f"parameter {name} is not contiguous; ES updates it in place through a flat view"
                )
        self.scheme = NoiseScheme(scheme)
        with torch.no_grad():
            self.pristine = {name: t.detach().clone() for name, t in self.params.items()}
        self._buffers: dict[tuple, torch.Tensor] = {}
        self.perturbed = False

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.params.values())

    def _eps(self, name: str, member: Member):
        """(start, values) slices of the flattened float32 noise of ``name`` under ``member``."""
        t = self.params[name]
        buf = None
        if self.scheme != NoiseScheme.TABLE:  # generated noise is drawn into a reused buffer
            key = (tuple(t.shape), t.device)
            buf = self._buffers.get(key)
            if buf is None:
                buf = self._buffers[key] = torch.empty(t.shape, dtype=torch.float32, device=t.device)
        return noise_slices(t.shape, member.seed, name, t.device, self.scheme, buf)

    @torch.no_grad()
    def perturb(self, member: Member, sigma: float) -> None:
        """Set every live tensor to cast(pristine + sign * sigma * eps), layer by layer."""
        if self.perturbed:
            raise RuntimeError("perturb() called twice without restore()")
        self.perturbed = True
        for name, live in self.params.items():
            flat_live, flat_base = live.view(-1), self.pristine[name].view(-1)
            for start, eps in self._eps(name, member):
                end = start + eps.numel()
                # computed in float32 (eps is float32), rounded once into the live dtype
                torch.add(flat_base[start:end], eps, alpha=sigma * member.sign, out=flat_live[start:end])

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the pristine tensors back: bit-exact."""
        for name, live in self.params.items():
            live.copy_(self.pristine[name])
        self.perturbed = False

    @torch.no_grad()
    def update(
        self,
        members: Sequence[Member],
        weights: Sequence[float],
        alpha: float,
        on_tensor: Callable[[], None] | None = None,
    ) -> UpdateStats:
        """theta += alpha / N * sum_n weights_n * sign_n * eps_n, in float32, cast once per tensor.

        ``weights`` are the shaped rewards (z-scores). Members with weight 0 cost nothing.
        """
        if self.perturbed:
            raise RuntimeError("update() while perturbed: call restore() first")
        if len(members) != len(weights):
            raise ValueError("one weight per member")
        n = len(members)
        active = [(m, float(w)) for m, w in zip(members, weights, strict=True) if w != 0.0]
        sq_update = sq_param = 0.0
        changed = total = 0
        for name, live in self.params.items():
            old = self.pristine[name]
            sq_param += float(old.float().pow(2).sum())
            total += old.numel()
            if not active:
                continue
            acc = torch.zeros(old.shape, dtype=torch.float32, device=old.device)
            flat_acc = acc.view(-1)
            for member, w in active:
                for start, eps in self._eps(name, member):
                    flat_acc[start : start + eps.numel()].add_(eps, alpha=w * member.sign)
            # new = cast(old + alpha/N * acc); the step is taken once, in float32.
            acc.mul_(alpha / n).add_(old)
            new = acc.to(old.dtype)
            delta = new.float() - old.float()
            sq_update += float(delta.pow(2).sum())
            changed += int((delta != 0).sum())
            old.copy_(new)
            live.copy_(new)
            if on_tensor is not None:
                on_tensor()
        return UpdateStats(math.sqrt(sq_update), math.sqrt(sq_param), changed / max(total, 1))

    def state_norm(self) -> float:
        return math.sqrt(sum(float(t.float().pow(2).sum()) for t in self.pristine.values()))
