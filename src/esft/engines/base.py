"""The engine protocol shared by every backend (transformers, vLLM, population-batched).

An engine owns a model and does two things for the ES trainer:
- ``parameters()``: the name -> tensor mapping that the forward pass *really* reads, with the model's
  original (Hugging Face) parameter names, so the es core can perturb it in place;
- ``generate()``: greedy completions for a list of prompts, the completion only (never the prompt text).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

# A prompt is raw text, or a conversation (list of {"role", "content"} messages) rendered with the
# model's chat template. A conversation ending in an assistant message is continued from that message.
Prompt = str | list[dict[str, str]]


@dataclass
class Generation:
    text: str  # the completion only, special tokens removed
    num_tokens: int  # generated tokens, up to and including the end-of-sequence token
    truncated: bool  # stopped by max_new_tokens rather than by an end-of-sequence token


@dataclass(frozen=True)
class Sampling:
    """Stochastic decoding for evaluation (ES itself always decodes greedily)."""

    samples: int = 1  # completions per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@runtime_checkable
class Engine(Protocol):
    def parameters(self) -> dict[str, torch.Tensor]:
        """Name -> live tensor read by the forward pass (Hugging Face names)."""
        ...

    def generate(
        self, prompts: list[Prompt], max_new_tokens: int, sampling: Sampling | None = None
    ) -> list[Generation]:
        """Greedy completions, one per prompt, in order; with ``sampling``, ``sampling.samples``
        sampled completions per prompt, prompt-major (all of prompt 0's, then prompt 1's, ...)."""
        ...

    def save(self, path: str | Path) -> None:
        """Write the current weights in Hugging Face format (safetensors + config + tokenizer)."""
        ...
