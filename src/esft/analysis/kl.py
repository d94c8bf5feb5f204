"""KL drift of a fine-tuned model from its base on a prompt set, by sampling and teacher forcing.

For prompt x, completions y ~ p_ft(. | x) are sampled from the fine-tuned model (temperature 1 by
default, seeded), then both models score them by teacher forcing: per completion token y_t,

    l_t = log p_ft(y_t | x, y_<t) - log p_base(y_t | x, y_<t),   r_t = p_base / p_ft = exp(-l_t).

Two estimators of the per-token KL(p_ft || p_base) (Schulman, "Approximating KL divergence", 2020):

- k1 = l_t: unbiased, high variance, can be negative on a sample;
- k3 = (r_t - 1) - log r_t = expm1(-l_t) + l_t: unbiased too (E_ft[r_t] = 1), always >= 0, lower
  variance when the models are close.

Reported per token (the mean over every completion token of every sample, pooled) and per sequence
(the sum over a completion's tokens, which by the chain rule estimates KL of the whole completion
distribution, averaged over completions, with its standard error). A model against itself gives
l_t = 0 exactly, hence 0 for both.

At temperature T != 1 both models' logits are divided by T before the softmax, so the estimate is the
KL between the two *tempered* distributions, which is what the samples come from. Sampling is plain
(top_p = 1): truncated sampling would not be p_ft and would bias both estimators.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from esft.engines.base import Prompt, Sampling
from esft.errors import ConfigError

ESTIMATOR = (
    "samples y ~ p_ft (temperature T, top_p 1); l = log p_ft(y_t) - log p_base(y_t) by teacher forcing; "
    "k1 = mean l, k3 = mean((r - 1) - log r) with r = p_base/p_ft; per token = pooled over completion "
    "tokens, per sequence = sum over a completion's tokens, averaged over completions"
)


@dataclass
class Scored:
    """One sampled completion: its prompt's token ids and the completion's token ids."""

    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]


def sample_completions(
    engine: Any, prompts: Sequence[Prompt], max_new_tokens: int, sampling: Sampling
) -> list[Scored]:
    """``sampling.samples`` sampled completions per prompt from ``engine`` (an HFEngine), with the
    prompt token ids exactly as the engine encodes them. Empty completions are dropped."""
    gens = engine.generate(list(prompts), max_new_tokens, sampling)
    out = []
    for i, g in enumerate(gens):
        prompt = prompts[i // sampling.samples]
        ids = prompt_token_ids(engine, prompt)
        if g.token_ids and ids:  # an empty prompt has no position that predicts the first token
            out.append(Scored(i // sampling.samples, ids, list(g.token_ids)))
    return out


def prompt_token_ids(engine: Any, prompt: Prompt) -> list[int]:
    """The ids the HF engine feeds for ``prompt`` (raw text gets special tokens, a chat template
    already holds them)."""
    text = engine.render(prompt)
    return list(engine.tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"])


@torch.inference_mode()
def completion_logprobs(
    model: torch.nn.Module,
    items: Sequence[Scored],
    pad_id: int,
    temperature: float = 1.0,
    batch_size: int = 8,
    progress: bool = False,
) -> list[torch.Tensor]:
    """log p(y_t | x, y_<t) of every completion token by teacher forcing, float64, one tensor per item.

    Rows are left-padded with explicit position ids, and only the last max(len(y)) + 1 positions'
    logits are computed (``logits_to_keep``), so the (batch, length, vocab) logits stay small."""
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    bar = tqdm(total=len(items), desc="teacher forcing", unit="seq", disable=not progress, leave=False)
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        seqs = [it.prompt_ids + it.completion_ids for it in batch]
        length = max(len(s) for s in seqs)
        keep = max(len(it.completion_ids) for it in batch) + 1
        ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, length - len(s) :] = torch.tensor(s)
            mask[row, length - len(s) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        try:
            logits = model(**inputs, logits_to_keep=keep).logits
        except TypeError:  # an architecture without logits_to_keep computes every position
            logits = model(**inputs).logits
        logits = logits[:, -keep:-1].float()  # (B, keep-1, V): position j predicts token j+1
        logp = torch.log_softmax(logits / temperature, dim=-1)
        for row, it in enumerate(batch):
            c = len(it.completion_ids)
            target = torch.tensor(it.completion_ids, device=device)
            picked = logp[row, logp.shape[1] - c :].gather(-1, target[:, None])[:, 0]
            out.append(picked.double().cpu())
        bar.update(len(batch))
    bar.close()
    return out


@dataclass
class KLEstimate:
    """KL(p_ft || p_base) estimates over a set of sampled completions."""

    per_token_k1: float
    per_token_k3: float
    per_sequence_k1: float
    per_sequence_k3: float
    per_sequence_k1_se: float  # standard error of the per-sequence mean
    per_sequence_k3_se: float
    sequences: int
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "mean_tokens": self.tokens / max(self.sequences, 1), "estimator": ESTIMATOR}


def _mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def kl_estimate(logp_tuned: Sequence[torch.Tensor], logp_base: Sequence[torch.Tensor]) -> KLEstimate:
    """k1 and k3, per token and per sequence, from aligned per-token log-probabilities (see module)."""
    seq_k1, seq_k3 = [], []
    tok_k1 = tok_k3 = 0.0
    tokens = 0
    for ft, base in zip(logp_tuned, logp_base, strict=True):
        log_ratio = ft - base  # l_t = log p_ft - log p_base = -log r_t
        k3 = torch.expm1(-log_ratio) + log_ratio  # (r - 1) - log r, accurate near r = 1
        seq_k1.append(float(log_ratio.sum()))
        seq_k3.append(float(k3.sum()))
        tok_k1 += seq_k1[-1]
        tok_k3 += seq_k3[-1]
        tokens += log_ratio.numel()
    k1, k1_se = _mean_se(seq_k1)
    k3, k3_se = _mean_se(seq_k3)
    return KLEstimate(
        per_token_k1=tok_k1 / tokens if tokens else math.nan,
        per_token_k3=tok_k3 / tokens if tokens else math.nan,
        per_sequence_k1=k1,
        per_sequence_k3=k3,
        per_sequence_k1_se=k1_se,
        per_sequence_k3_se=k3_se,
        sequences=len(seq_k1),
        tokens=tokens,
    )


def _autocast(engine: Any):
    """The engine's autocast context (mixed precision, ``HFEngine.autocast``), else nothing."""
    import contextlib

    make = getattr(engine, "autocast", None)
    return make() if callable(make) else contextlib.nullcontext()


def kl_drift(
    tuned: Any,
    base: Any,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    sampling: Sampling | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> KLEstimate:
    """KL(p_tuned || p_base) on ``prompts``: sample from engine ``tuned``, teacher-force both engines'
    models (HFEngine objects; the same object twice gives exactly 0)."""
    sampling = sampling or Sampling()
    if sampling.top_p != 1.0:
        raise ConfigError("KL drift needs plain sampling (top_p 1): truncated sampling is not p_ft")
    items = sample_completions(tuned, prompts, max_new_tokens, sampling)
    with _autocast(tuned):  # mixed precision engines score as they generate
        lp_tuned = completion_logprobs(
            tuned.model, items, tuned.pad_id, sampling.temperature, batch_size, progress
        )
    with _autocast(base):
        lp_base = completion_logprobs(
            base.model, items, base.pad_id, sampling.temperature, batch_size, progress
        )
    return kl_estimate(lp_tuned, lp_base)
