"""What training did to the weights: norms, relative norms and sparsity of delta = theta - theta_base.

Computed in one streaming pass over the two checkpoints (two tensors in memory at a time, deltas in
float32 slices), summed in float64, and reported globally, per transformer layer, per module type
(``naming.py``) and per tensor:

- ``norm`` = ||delta||_2 and ``relative_norm`` = ||delta||_2 / ||theta_base||_2 over the group;
- ``sparsity`` = share of coordinates with |delta| <= tau, and ``exact_zero`` = share with delta == 0;
- a histogram of |delta| over the *changed tensors* (those with any nonzero delta: frozen tensors say
  nothing about the update's distribution), in log-spaced bins.

Default tau = 1e-6 (absolute). Why: float32 rounding of a weight with |theta| < 8 is below 1e-6
(ulp(8) = 9.5e-7), so the reconstruction error of delta cannot cross it; bf16 weights move by at least
about 1e-4 relative when they move at all; and an ES step (alpha/sqrt(N) per coordinate, 1e-4 at
alpha = 5e-4, N = 30) is two orders of magnitude larger. So |delta| <= 1e-6 means "not moved" in every
dtype esft trains in. Set ``tau`` for another threshold; ``exact_zero`` is tau = 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from esft.analysis.naming import MODULE_TYPES, layer_of, layer_order, module_type
from esft.analysis.tensors import aligned_tensors, chunks, in_run_dtype

DEFAULT_TAU = 1e-6
HIST_LOW, HIST_HIGH = -10, 1  # histogram edges 1e-10 .. 10, plus an underflow and an overflow bin


@dataclass
class DeltaMoments:
    """Sums over a group of coordinates, from which the reported statistics follow."""

    numel: int = 0
    sq_delta: float = 0.0  # sum delta^2
    sq_base: float = 0.0  # sum theta_base^2
    below_tau: int = 0  # count |delta| <= tau
    zeros: int = 0  # count delta == 0
    max_abs: float = 0.0  # max |delta|

    def add(self, other: DeltaMoments) -> None:
        self.numel += other.numel
        self.sq_delta += other.sq_delta
        self.sq_base += other.sq_base
        self.below_tau += other.below_tau
        self.zeros += other.zeros
        self.max_abs = max(self.max_abs, other.max_abs)

    @property
    def norm(self) -> float:
        return math.sqrt(self.sq_delta)

    @property
    def base_norm(self) -> float:
        return math.sqrt(self.sq_base)

    @property
    def relative_norm(self) -> float:
        """||delta|| / ||theta_base|| (NaN for an all-zero base)."""
        return self.norm / self.base_norm if self.sq_base > 0 else math.nan

    @property
    def sparsity(self) -> float:
        return self.below_tau / self.numel if self.numel else math.nan

    @property
    def exact_zero(self) -> float:
        return self.zeros / self.numel if self.numel else math.nan

    @property
    def rms(self) -> float:
        """Root mean square of delta per coordinate."""
        return math.sqrt(self.sq_delta / self.numel) if self.numel else math.nan

    def row(self) -> dict[str, float]:
        return {
            "numel": self.numel,
            "norm": self.norm,
            "base_norm": self.base_norm,
            "relative_norm": self.relative_norm,
            "rms": self.rms,
            "sparsity": self.sparsity,
            "exact_zero": self.exact_zero,
            "max_abs": self.max_abs,
        }


def histogram_edges(bins_per_decade: int = 4) -> list[float]:
    """Log-spaced bin edges 1e-10 .. 1e1, ``bins_per_decade`` bins per power of ten."""
    n = (HIST_HIGH - HIST_LOW) * bins_per_decade
    return [10.0 ** (HIST_LOW + i / bins_per_decade) for i in range(n + 1)]


@dataclass
class Histogram:
    """Counts of |delta| in bins [edges[i-1], edges[i]); bin 0 is [0, edges[0]) (exact zeros included)
    and the last bin is [edges[-1], inf)."""

    edges: list[float]
    counts: list[int]

    @property
    def total(self) -> int:
        return sum(self.counts)

    def bins(self) -> list[tuple[float, float]]:
        """(low, high) of every bin, matching ``counts``."""
        lows = [0.0, *self.edges]
        highs = [*self.edges, math.inf]
        return list(zip(lows, highs, strict=True))


@dataclass
class UpdateStats:
    """Statistics of delta = tuned - base. ``changed_numel`` counts the coordinates of tensors with any
    nonzero delta (the trained tensors, as far as the checkpoint shows)."""

    base: str
    tuned: str
    tau: float
    total: DeltaMoments
    layers: dict[str, DeltaMoments]
    modules: dict[str, DeltaMoments]
    tensors: dict[str, DeltaMoments]
    histogram: Histogram
    changed_numel: int = 0
    changed_tensors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "tuned": self.tuned,
            "tau": self.tau,
            "sparsity_definition": f"share of coordinates with |delta| <= tau = {self.tau:g}",
            "total": self.total.row(),
            "changed_numel": self.changed_numel,
            "changed_tensors": len(self.changed_tensors),
            "layers": {k: v.row() for k, v in self.layers.items()},
            "modules": {k: v.row() for k, v in self.modules.items()},
            "tensors": {k: v.row() for k, v in self.tensors.items()},
            "histogram": asdict(self.histogram),
        }


def _tensor_moments(
    base: torch.Tensor, tuned: torch.Tensor, tau: float, edges: torch.Tensor
) -> tuple[DeltaMoments, torch.Tensor]:
    m = DeltaMoments(numel=base.numel())
    counts = torch.zeros(len(edges) + 1, dtype=torch.int64)
    for b, t in chunks(base, tuned):
        a = (t - b).abs_()  # one float32 slice of |delta|
        m.sq_delta += _sq_sum(a)
        m.sq_base += _sq_sum(b)
        m.below_tau += int(torch.count_nonzero(a <= tau))
        m.zeros += int(torch.count_nonzero(a == 0))
        if a.numel():
            m.max_abs = max(m.max_abs, float(a.max()))
        # right=True: a value equal to an edge falls into the bin that starts at that edge
        counts += torch.bincount(torch.bucketize(a, edges, right=True), minlength=len(edges) + 1)
    return m, counts


def _sq_sum(x: torch.Tensor) -> float:
    """sum x^2 accumulated in float64, in slices (no float64 copy of a large tensor)."""
    total = 0.0
    step = 1 << 20
    flat = x.reshape(-1)
    for start in range(0, flat.numel(), step):
        s = flat[start : start + step].double()
        total += float(torch.dot(s, s))
    return total


def update_stats(
    base: str | Path,
    tuned: str | Path,
    tau: float = DEFAULT_TAU,
    bins_per_decade: int = 4,
    progress: bool = False,
) -> UpdateStats:
    """Statistics of delta = theta_tuned - theta_base in one streaming pass over both checkpoints."""
    base, tuned = Path(base), Path(tuned)
    edges_list = histogram_edges(bins_per_decade)
    edges = torch.tensor(edges_list, dtype=torch.float32)
    total = DeltaMoments()
    layers: dict[str, DeltaMoments] = {}
    modules: dict[str, DeltaMoments] = {k: DeltaMoments() for k in MODULE_TYPES}
    tensors: dict[str, DeltaMoments] = {}
    hist = torch.zeros(len(edges_list) + 1, dtype=torch.int64)
    changed: list[str] = []
    changed_numel = 0
    for name, (b, t) in aligned_tensors([base, tuned], progress, desc="delta"):
        m, counts = _tensor_moments(in_run_dtype(b, t), t, tau, edges)
        tensors[name] = m
        total.add(m)
        layers.setdefault(layer_of(name), DeltaMoments()).add(m)
        modules[module_type(name)].add(m)
        if m.zeros < m.numel:
            changed.append(name)
            changed_numel += m.numel
            hist += counts
    return UpdateStats(
        base=str(base),
        tuned=str(tuned),
        tau=tau,
        total=total,
        layers=dict(sorted(layers.items(), key=lambda kv: layer_order(kv[0]))),
        modules={k: v for k, v in modules.items() if v.numel},
        tensors=tensors,
        histogram=Histogram(edges_list, hist.tolist()),
        changed_numel=changed_numel,
        changed_tensors=changed,
    )


def update_norm(
    base: str | Path, tuned: str | Path, progress: bool = False
) -> tuple[float, float, dict[str, int]]:
    """(||delta||, ||theta_base||, {changed tensor: numel}): the global part of :func:`update_stats`."""
    sq_delta = sq_base = 0.0
    changed: dict[str, int] = {}
    for name, (b, t) in aligned_tensors([Path(base), Path(tuned)], progress, desc="delta"):
        sq = 0.0
        for bb, tt in chunks(in_run_dtype(b, t), t):
            sq += _sq_sum(tt - bb)
            sq_base += _sq_sum(bb)
        sq_delta += sq
        if sq > 0:
            changed[name] = b.numel()
    return math.sqrt(sq_delta), math.sqrt(sq_base), changed
