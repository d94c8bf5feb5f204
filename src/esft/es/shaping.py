"""Fitness shaping: map raw rewards (higher is better) to update weights.

The paper (Qiu et al. 2025) z-scores the rewards; centered ranks (Salimans et al. 2017) are an option
that is robust to outliers. Both are pure functions of the reward vector.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def zscore(rewards: Sequence[float]) -> list[float]:
    """(r - mean) / std with the population std; all zeros when every reward is equal. A NaN reward
    (a member none of whose samples any reward applied to) gets weight 0 and is left out of the
    statistics."""
    r = np.asarray(rewards, dtype=np.float64)
    ok = ~np.isnan(r)
    out = np.zeros(len(r))
    if ok.sum() < 2:
        return out.tolist()
    std = r[ok].std()
    if not np.isfinite(std) or std < 1e-12:
        return out.tolist()
    out[ok] = (r[ok] - r[ok].mean()) / std
    return out.tolist()


def centered_rank(rewards: Sequence[float]) -> list[float]:
    """Ranks scaled to [-0.5, 0.5] (ties share their mean rank), then z-scored to unit variance.

    Normalising keeps alpha meaning the same step size under either shaping.
    """
    full = np.asarray(rewards, dtype=np.float64)
    ok = ~np.isnan(full)
    if ok.sum() < len(full):  # rank the scored members; unscored ones get weight 0
        out = np.zeros(len(full))
        out[ok] = centered_rank(full[ok].tolist())
        return out.tolist()
    r = full
    n = len(r)
    if n < 2:
        return [0.0] * n
    order = np.argsort(r, kind="stable")
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.arange(n, dtype=np.float64)
    # Average ranks over ties so equal rewards get equal weights.
    for value in np.unique(r):
        tie = r == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return zscore(ranks / (n - 1) - 0.5)


SHAPERS: dict[str, Callable[[Sequence[float]], list[float]]] = {
    "zscore": zscore,
    "centered_rank": centered_rank,
}


def shape(rewards: Sequence[float], method: str = "zscore") -> list[float]:
    try:
        return SHAPERS[method](rewards)
    except KeyError:
        raise ValueError(f"unknown fitness shaping {method!r}; choose one of {sorted(SHAPERS)}") from None
