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
    token_ids: tuple[int, ...] = ()  # the generated ids (TRL rewards receive them as completion_ids)


@dataclass(frozen=True)
class Sampling:
    """Stochastic decoding for evaluation (ES itself always decodes greedily)."""

    samples: int = 1  # completions per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """Prompt text as the model sees it: raw text, or a conversation through the chat template (a
    conversation ending in an assistant message is continued from it)."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        from esft.errors import ConfigError

        raise ConfigError(
            "this task builds chat prompts but the model's tokenizer has no chat template; "
            "use a chat/instruct model or the task's raw prompt format"
        )
    continue_final = prompt[-1]["role"] == "assistant"
    return tokenizer.apply_chat_template(
        prompt,
        tokenize=False,
        add_generation_prompt=not continue_final,
        continue_final_message=continue_final,
    )


def completion(tokenizer, eos_ids: set[int], token_ids: list[int]) -> Generation:
    """A Generation from generated token ids: cut after the first end-of-sequence token, decoded."""
    n, stopped = len(token_ids), False
    for i, tok in enumerate(token_ids):
        if tok in eos_ids:
            n, stopped = i + 1, True
            break
    text = tokenizer.decode(token_ids[:n], skip_special_tokens=True)
    return Generation(text=text, num_tokens=n, truncated=not stopped, token_ids=tuple(token_ids[:n]))


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
