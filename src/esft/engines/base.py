"""The engine protocol shared by every backend (transformers, vLLM, a pool of Ray workers).

An engine owns a model and does three things for the ES trainer (:class:`Engine`):
- ``parameters()``: the name -> tensor mapping that the forward pass *really* reads, with the model's
  original (Hugging Face) parameter names, so the es core can perturb it in place;
- ``generate()``: greedy completions for a list of prompts, the completion only (never the prompt text);
- ``save()``: the current weights as a Hugging Face folder.
It also says where it runs (``device``, ``dtype`` and why, ``dtype_reason``), takes a
``min_new_tokens`` (``--fixed-length``), and ``close()`` stops any process it started.

What only some engines can do is declared here as optional protocols, checked with ``isinstance``
(one place per decision, e.g. :func:`esft.population.scoring_path`), never probed with ``hasattr``:

============================ ============================================ =========================
capability                   what the engine offers                       engines
============================ ============================================ =========================
:class:`PopulationBatching`  ``generate_population()``: all low-rank      HF; vLLM (LoRA adapters,
                             members in batched calls through the          when it started with
                             unperturbed weights; ``members_per_batch()``  them)
:class:`RemoteWeights`       ``param_set()``: the weights live in another vLLM (its worker), Ray
                             process; ES's ParamSet is built there         workers
:class:`PopulationScorer`    ``score_population()``: scores a population  Ray workers
                             itself, spread over its own engines
:class:`DescribesEnvironment` ``describe_environment()``: what            Ray workers
                             environment.json records, from elsewhere
:class:`WeightChecksums`     ``weight_checksums()``: per-tensor checksums  vLLM
                             of the weights it serves
============================ ============================================ =========================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

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
    device: Any  # where the forward pass runs (a torch.device or its name)
    dtype: Any  # the compute dtype
    dtype_reason: str  # why --dtype auto chose it ("" when set explicitly)
    min_new_tokens: int  # generate at least this many tokens (--fixed-length; 0: stop at EOS)

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

    def close(self) -> None:
        """Stop whatever processes the engine started (a no-op for an in-process model)."""
        ...


@runtime_checkable
class PopulationBatching(Protocol):
    """Generates a whole low-rank population in batched calls through the unperturbed weights (each
    member's rank-r noise applied in the forward pass), instead of perturbing member by member.
    ``population_batching`` says whether it can now (vLLM: only when started with LoRA slots)."""

    population_batching: bool

    def generate_population(
        self,
        prompts: list[Prompt],
        members: list[Any],
        params: Any,
        sigma: float,
        max_new_tokens: int,
        timer: dict[str, float],
    ) -> list[list[Generation]]:
        """One list of greedy generations per member, in member order."""
        ...

    def members_per_batch(self, n_prompts: int) -> int | None:
        """How many members share one batched call for ``n_prompts`` prompts (None: all of them)."""
        ...


@runtime_checkable
class RemoteWeights(Protocol):
    """The weights live in another process (vLLM's worker, Ray workers): the ParamSet ES perturbs and
    updates is built there and driven from here."""

    def param_set(
        self, freeze: list[str], noise: str, rank: int, precision: str, state_dir: str | None
    ) -> Any:
        """A ParamSet-like proxy: perturb/restore/update/save_state run where the weights are."""
        ...


@runtime_checkable
class PopulationScorer(Protocol):
    """Scores a population itself (a pool of Ray workers, each with its own engine), with the same
    results as :func:`esft.population.score_population` on one engine."""

    def score_population(
        self,
        params: Any,
        task: Any,
        members: list[Any],
        rows: list[dict[str, Any]],
        sigma: float,
        max_new_tokens: int,
        desc: str,
        progress: bool,
        state: Any,
    ) -> Any:
        """A :class:`esft.population.Population`."""
        ...


@runtime_checkable
class DescribesEnvironment(Protocol):
    """Knows what environment.json records better than its attributes say (Ray workers: their own
    devices, dtypes and library versions)."""

    def describe_environment(self, engine_name: str, model_path: str) -> dict[str, Any]: ...


@runtime_checkable
class WeightChecksums(Protocol):
    """Per-tensor checksums of the weights it serves (to check workers agree bit for bit)."""

    def weight_checksums(self, names: Sequence[str] | None = None) -> dict[str, int]: ...


def batches_population(engine: Any) -> bool:
    """True when ``engine`` can generate a low-rank population in batched calls right now."""
    return isinstance(engine, PopulationBatching) and bool(engine.population_batching)
