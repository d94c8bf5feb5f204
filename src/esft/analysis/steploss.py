"""How much of an ES run's intended update its checkpoints hold (es/precision.py, measured afterwards).

Every iteration logs the applied step against the intended one (``es/step_cosine``...). This measures
the same thing for a whole checkpoint: the intended update after T iterations is the seed log applied
to the base in float32 (no rounding at any step), and the checkpoint's update is what a user loads,
checkpoint - base, with the base rounded to the checkpoint's dtype (the run started from those
weights). Reported: cosine between the two, ||checkpoint's|| / ||intended||, and the share of the
coordinates the intended update moves that the checkpoint left at the base value. A float32 run or
one with float32 masters keeps the update (cosine ~1, loss ~0 but for the final cast); round to nearest
in bf16 loses the steps below half an ulp; stochastic rounding keeps them in expectation (its cosine
is below 1 by the rounding noise, its loss shrinks as steps accumulate).

The replay regenerates every member's noise on the CPU, as ``esft replay`` does, over float32 copies of
the trained tensors: memory of 4 bytes per trained parameter, time of one update per iteration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from esft.analysis.tensors import in_run_dtype
from esft.es import Member, ParamSet
from esft.es.params import select_trained
from esft.es.precision import StepStats
from esft.safetensors_folder import iter_tensors


@dataclass
class StepLoss:
    iteration: int
    dtype: str
    cosine: float  # cos(checkpoint - base, intended)
    norm_ratio: float  # ||checkpoint - base|| / ||intended||
    lost_fraction: float  # of the coordinates the intended update moves, the share left unmoved

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@torch.no_grad()
def step_loss(
    config: dict[str, Any],
    seedlog: list[dict[str, Any]],
    base: str | Path,
    checkpoints: dict[int, Path],
    progress: bool = False,
) -> list[StepLoss]:
    """StepLoss of each of ``checkpoints`` (iteration -> folder) of the ES run with ``config`` and
    ``seedlog``, against ``base``; checkpoints past the seed log are skipped."""
    logged = {int(e["iteration"]): e for e in seedlog}
    todo = sorted(i for i in checkpoints if all(t in logged for t in range(1, i + 1)))
    if not todo:
        return []
    first = checkpoints[todo[0]]
    dtypes = {n: t.dtype for n, t in iter_tensors(first)}
    base_t = dict(iter_tensors(base, sorted(dtypes)))
    names = sorted(select_trained(base_t, config.get("freeze") or [], config.get("noise", "independent")))
    start = {n: in_run_dtype(base_t[n], torch.empty(0, dtype=dtypes[n])).float() for n in names}
    del base_t
    exact = ParamSet(
        {n: t.clone() for n, t in start.items()},
        scheme=config.get("noise", "independent"),
        rank=int(config.get("rank", 1)),
        precision="auto",  # float32 tensors: the update without any rounding
    )
    out, done = [], 0
    for it in tqdm(todo, desc="intended update", disable=not progress, leave=False):
        for t in range(done + 1, it + 1):
            e = logged[t]
            exact.update([Member(int(s), int(g)) for s, g in e["members"]], e["weights"], e["alpha"])
        done = it
        stats = StepStats()
        for name, tuned in iter_tensors(checkpoints[it], names):
            stats.add(tuned.float() - start[name], exact.params[name] - start[name])
        out.append(
            StepLoss(
                iteration=it,
                dtype=str(dtypes[names[0]]).removeprefix("torch."),
                cosine=stats.cosine(),
                norm_ratio=stats.norm_ratio(),
                lost_fraction=stats.lost_fraction(),
            )
        )
    return out
