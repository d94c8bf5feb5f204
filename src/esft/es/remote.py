"""A ``ParamSet`` whose tensors live in other processes: the driver side of every remote engine.

When an engine's weights live elsewhere (vLLM's worker process; a pool of Ray workers, each holding a
replica), the trainer cannot hand out tensors. The ES core then runs *where the tensors are*, in an
object that exposes ParamSet's operations as named methods (the ``esft_*`` worker API), and the driver
holds this proxy, with ParamSet's interface, whose every call is ``call(method, *args)``:

    esft_init_params(freeze, scheme, rank, precision, state_dir) -> {"names", "numel", "precision"}
    esft_perturb(seed, sign, sigma)
    esft_restore()
    esft_update([[seed, sign], ...], weights, alpha) -> UpdateStats.to_dict() (+ timings)
    esft_state_norm() -> float

Only names, seeds, signs and scalars cross the boundary, never tensors. ``call`` is the transport: one
``collective_rpc`` into vLLM's worker (``engines/vllm/driver.py`` calling ``engines/vllm/worker.py``),
or a broadcast to every Ray worker that also checks the replicas still agree (``distributed/pool.py``
calling ``distributed/worker.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from esft.es.noise import Member, NoiseScheme
from esft.es.params import UpdateStats

Call = Callable[..., Any]  # call(method_name, *args) -> the worker's answer


class RemoteParamSet:
    """ParamSet's interface (``perturb``, ``restore``, ``update``, ``numel``, ``state_norm``, ``scheme``,
    ``rank``, ``perturbed``, ``names``) over ``call``; building one builds the worker-side ParamSet."""

    def __init__(
        self,
        call: Call,
        freeze: Sequence[str],
        scheme: str,
        rank: int = 1,
        precision: str = "auto",
        state_dir: str | None = None,
    ) -> None:
        self._call = call
        self.scheme = NoiseScheme(scheme)
        self.rank = int(rank)
        info = call(
            "esft_init_params",
            list(freeze),
            str(self.scheme),
            self.rank,
            str(precision),
            None if state_dir is None else str(state_dir),
        )
        self.names: list[str] = list(info["names"])
        self._numel = int(info["numel"])
        self.precision: str = info.get("precision", "nearest")  # resolved where the tensors are
        self.perturbed: Member | None = None

    @property
    def numel(self) -> int:
        return self._numel

    def perturb(self, member: Member, sigma: float) -> None:
        if self.perturbed is not None:
            raise RuntimeError("perturb() called twice without restore()")
        self._call("esft_perturb", int(member.seed), int(member.sign), float(sigma))
        self.perturbed = member

    def restore(self) -> None:
        self._call("esft_restore")
        self.perturbed = None

    def update(
        self,
        members: Sequence[Member],
        weights: Sequence[float],
        alpha: float,
        on_tensor: Callable[[], None] | None = None,
    ) -> UpdateStats:
        if self.perturbed is not None:
            raise RuntimeError("update() while perturbed: call restore() first")
        if len(members) != len(weights):
            raise ValueError("one weight per member")
        stats = self._call(
            "esft_update",
            [[int(m.seed), int(m.sign)] for m in members],
            [float(w) for w in weights],
            float(alpha),
        )
        if on_tensor is not None:
            on_tensor()
        return UpdateStats.from_dict(stats)

    def state_norm(self) -> float:
        return float(self._call("esft_state_norm"))
