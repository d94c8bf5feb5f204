"""Cosine similarity between two updates of one base model (e.g. ES vs GRPO from the same start).

With delta_A = theta_A - theta_base and delta_B = theta_B - theta_base,

    cos(A, B) = <delta_A, delta_B> / (||delta_A|| ||delta_B||),

globally, per transformer layer and per module type, from float64 sums over one streaming pass through
the three checkpoints (three tensors in memory at a time, float32 slices). 1 means the same direction,
-1 the opposite, about 0 unrelated directions (two independent random walks over d coordinates have
cosine ~ N(0, 1/d)). Each update is taken from the base in its own run's dtype (``_tensor_dot``), so
a bf16 run and a float32 run can be compared. A group where either update is zero has no direction: its
cosine is NaN (JSON null). Checkpoints whose tensor names or shapes differ do not share a base: a one-line ConfigError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from esft.analysis.naming import MODULE_TYPES, layer_of, layer_order, module_type
from esft.analysis.tensors import aligned_tensors, chunks, in_run_dtype


@dataclass
class Dot:
    """<a, b>, ||a||^2, ||b||^2 over a group of coordinates."""

    ab: float = 0.0
    aa: float = 0.0
    bb: float = 0.0
    numel: int = 0

    def add(self, other: Dot) -> None:
        self.ab += other.ab
        self.aa += other.aa
        self.bb += other.bb
        self.numel += other.numel

    @property
    def cosine(self) -> float:
        if self.aa <= 0 or self.bb <= 0:
            return math.nan
        # sqrt(x * x) == x exactly in IEEE arithmetic, so cos(delta, delta) is exactly 1
        return max(-1.0, min(1.0, self.ab / math.sqrt(self.aa * self.bb)))

    def row(self) -> dict[str, float]:
        return {
            "cosine": self.cosine,
            "norm_a": math.sqrt(self.aa),
            "norm_b": math.sqrt(self.bb),
            "numel": self.numel,
        }


@dataclass
class CosineResult:
    base: str
    a: str
    b: str
    total: Dot
    layers: dict[str, Dot]
    modules: dict[str, Dot]

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "a": self.a,
            "b": self.b,
            "definition": "<delta_a, delta_b> / (||delta_a|| ||delta_b||), delta = checkpoint - base",
            "total": self.total.row(),
            "layers": {k: v.row() for k, v in self.layers.items()},
            "modules": {k: v.row() for k, v in self.modules.items()},
        }


def _tensor_dot(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> Dot:
    """The sums for one tensor, each update taken from the base rounded to its own run's dtype: a bf16
    ES run and a float32 GRPO run started from different roundings of the same base, so one shared base
    would count the base's rounding as the bf16 run's update (a frozen tensor included)."""
    out = Dot(numel=base.numel())
    base_a = in_run_dtype(base, a)
    base_b = base_a if b.dtype == a.dtype else in_run_dtype(base, b)  # one rounding when the runs agree
    for base_as, a_s, base_bs, b_s in chunks(base_a, a, base_b, b):
        da = (a_s - base_as).double()
        db = (b_s - base_bs).double()
        out.ab += float(torch.dot(da, db))
        out.aa += float(torch.dot(da, da))
        out.bb += float(torch.dot(db, db))
    return out


def update_cosine(base: str | Path, a: str | Path, b: str | Path, progress: bool = False) -> CosineResult:
    """Cosine similarity of the updates a - base and b - base (global, per layer, per module type)."""
    folders = [Path(base), Path(a), Path(b)]
    total = Dot()
    layers: dict[str, Dot] = {}
    modules: dict[str, Dot] = {k: Dot() for k in MODULE_TYPES}
    for name, (tb, ta, tt) in aligned_tensors(folders, progress, desc="cosine"):
        d = _tensor_dot(tb, ta, tt)
        total.add(d)
        layers.setdefault(layer_of(name), Dot()).add(d)
        modules[module_type(name)].add(d)
    return CosineResult(
        base=str(base),
        a=str(a),
        b=str(b),
        total=total,
        layers=dict(sorted(layers.items(), key=lambda kv: layer_order(kv[0]))),
        modules={k: v for k, v in modules.items() if v.numel},
    )
