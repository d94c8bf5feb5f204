"""The reference engine: transformers ``generate``, batched over prompts with left padding.

Runs on CPU or CUDA in float32, bfloat16 or float16 (``auto``: the hardware's fastest native dtype,
``esft/dtypes.py``). Greedy decoding; sampling settings from the
model's ``generation_config`` (temperature, top-p, repetition penalty) are overridden, so what ES scores
is the deterministic argmax completion. Sampled decoding (evaluation, KL) draws from softmax(logits / T)
cut only by the caller's top-p: the config's other truncations (top-k, min-p, typical-p, epsilon and
eta cutoffs, top-h) are switched off too.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from esft.dtypes import choose
from esft.engines.base import Generation, Prompt, Sampling, completion, render_prompt
from esft.engines.greedy import greedy_kwargs
from esft.errors import ConfigError, ModelError, first_line
from esft.es.noise import Member
from esft.es.params import ParamSet


class HoldEOS:
    """A logits processor that bans the EOS tokens until ``min_new`` tokens follow the prompt (``--fixed-
    length``): what transformers' ``min_new_tokens`` does, with the same scores, but in place on the EOS
    columns. Transformers' processor copies and rewrites the whole (batch x vocab) scores at every step
    (a clone, an ``isin`` over the vocabulary and a ``where``): 1.0 s of a 3.9 s generation of 60 rows x
    16 tokens with the embedded model's 151936-token vocabulary (2-core Xeon, bf16). The scores are
    changed in place: a caller that asks generate for its raw logits (``output_logits``) would see the
    ban in them; esft's and TRL's calls ask for sequences only."""

    same_tokens_on_raw_logits = True  # -inf on some columns in any dtype: greedy.py may skip its copy

    def __init__(self, prompt_len: int, min_new: int, eos_ids: list[int]) -> None:
        self.prompt_len, self.min_new, self.eos_ids = prompt_len, min_new, eos_ids
        self._index: torch.Tensor | None = None  # eos_ids on the scores' device, made once

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] - self.prompt_len < self.min_new:
            if self._index is None or self._index.device != scores.device:
                self._index = torch.tensor(self.eos_ids, dtype=torch.long, device=scores.device)
            scores.index_fill_(1, self._index, -float("inf"))
        return scores


def hold_eos_in_generate(model, min_new: int) -> None:
    """Make ``model.generate`` hold EOS back for ``min_new`` new tokens through ``HoldEOS``, for code that
    calls ``generate`` itself (TRL's GRPOTrainer): the same tokens as ``min_new_tokens``, which the caller
    must then not set. The EOS tokens are those of the call's generation config (what generate stops on)."""
    plain = model.generate

    def generate(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        eos = (kwargs.get("generation_config") or model.generation_config).eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        held = any(isinstance(p, HoldEOS) for p in kwargs.get("logits_processor") or [])  # the engine's own
        if eos and ids is not None and not held:
            hold = HoldEOS(ids.shape[-1], min_new, sorted(eos))
            kwargs["logits_processor"] = [*(kwargs.get("logits_processor") or []), hold]
        return plain(*args, **kwargs)

    model.generate = generate


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return device


class HFEngine:
    """A transformers causal LM with greedy batched generation."""

    population_batching = True  # generate_population: low-rank members share batched forwards

    def __init__(
        self,
        model_path: str | Path,
        dtype: str = "auto",
        device: str = "auto",
        batch_size: int = 64,
        autocast: str | None = None,
    ) -> None:
        """``autocast`` (a dtype name) is mixed precision: the weights load in float32 whatever ``dtype``
        says, and every forward runs under ``torch.autocast`` in that dtype (GRPO in bf16)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        except ImportError:  # pragma: no cover
            pass
        self.device = resolve_device(device)
        self.dtype, self.dtype_reason = choose(dtype, self.device)
        # Mixed precision: float32 weights, forwards under torch.autocast in this dtype.
        self.autocast_dtype: torch.dtype | None = None
        if autocast is not None:
            self.autocast_dtype = choose(autocast, self.device)[0]
            self.dtype = torch.float32
            self.dtype_reason = f"mixed precision: {autocast} compute, float32 weights"
        self.batch_size = batch_size
        # Benchmarks set this to max_new_tokens so every row does the same token work (EOS suppressed).
        self.min_new_tokens = 0
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
            self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=self.dtype)
        except (OSError, ValueError) as e:
            first = first_line(e)
            raise ModelError(f"cannot load model {str(model_path)!r}: {first}") from e
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        gen_cfg = self.model.generation_config
        eos = gen_cfg.eos_token_id if gen_cfg.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = self.tokenizer.pad_token_id
        # the truncating warpers this transformers knows, off for sampling (top_k is off for all calls)
        self._no_truncation = {
            k: None
            for k in ("min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h")
            if hasattr(gen_cfg, k)
        }
        # greedy decoding without transformers' float32 copy of each step's logits (greedy.py);
        # ESFT_GREEDY_LOOP=off keeps transformers' own loop (benchmarks compare the two)
        self._greedy = greedy_kwargs(self.model) if os.environ.get("ESFT_GREEDY_LOOP", "on") != "off" else {}

    # -- protocol ---------------------------------------------------------------------------------

    def parameters(self) -> dict[str, torch.Tensor]:
        return {name: p.data for name, p in self.model.named_parameters()}

    def render(self, prompt: Prompt) -> str:
        """Prompt text as the model sees it: raw text, or a conversation through the chat template."""
        return render_prompt(self.tokenizer, prompt)

    @torch.inference_mode()
    def generate(
        self, prompts: list[Prompt], max_new_tokens: int, sampling: Sampling | None = None
    ) -> list[Generation]:
        texts, raw = self._texts(prompts)
        if sampling is not None:
            torch.manual_seed(sampling.seed)  # sampled evaluation is reproducible for a given seed
        per_call = self.batch_size if sampling is None else max(1, self.batch_size // sampling.samples)
        return self._generate_texts(texts, max_new_tokens, raw, sampling, per_call)

    @torch.inference_mode()
    def generate_population(
        self,
        prompts: list[Prompt],
        members: Sequence[Member],
        params: ParamSet,
        sigma: float,
        max_new_tokens: int,
        timer: dict[str, float] | None = None,
    ) -> list[list[Generation]]:
        """Greedy completions of ``prompts`` under each member's low-rank perturbation, one list per
        member, from batched forwards through the unperturbed weights (``population.py``).

        Members are batched ``batch_size // len(prompts)`` at a time (at least one). ``timer["noise"]``
        accumulates the time spent drawing factors, ``timer["generate"]`` the rest.
        """
        from esft.engines.population import PopulationHooks

        texts, raw = self._texts(prompts)
        per_call = self.members_per_batch(len(texts))
        timer = timer if timer is not None else {}
        out: list[list[Generation]] = []
        with PopulationHooks(self.model, params) as hooks:
            for start in range(0, len(members), per_call):
                chunk = members[start : start + per_call]
                tic = time.perf_counter()
                hooks.prepare(chunk, sigma, self.dtype)
                mid = time.perf_counter()
                # member-major rows; several members fit one batch, a lone member's prompts may span
                # several (the hooks need each batch to hold whole members, or rows of one member)
                gens = self._generate_texts(texts * len(chunk), max_new_tokens, raw)
                hooks.check_fired()
                end = time.perf_counter()
                timer["noise"] = timer.get("noise", 0.0) + mid - tic
                timer["generate"] = timer.get("generate", 0.0) + end - mid
                out.extend(gens[i * len(texts) : (i + 1) * len(texts)] for i in range(len(chunk)))
        return out

    def close(self) -> None:
        """Nothing to stop: the model lives in this process."""

    def members_per_batch(self, n_prompts: int) -> int:
        """Members that ``generate_population`` puts in one batch for ``n_prompts`` prompts each: its
        batches are members[0:k], members[k:2k], ... (a Ray pool hands out exactly these, so a member
        is generated in the same batch layout on any worker as in one process)."""
        return max(1, self.batch_size // max(n_prompts, 1))

    def _texts(self, prompts: list[Prompt]) -> tuple[list[str], bool]:
        """Rendered prompts, and whether they are raw text (raw prompts get the tokenizer's special
        tokens, e.g. BOS; chat templates already hold them)."""
        return [self.render(p) for p in prompts], all(isinstance(p, str) for p in prompts)

    def _generate_texts(
        self,
        texts: list[str],
        max_new_tokens: int,
        raw: bool,
        sampling: Sampling | None = None,
        per_call: int | None = None,
    ) -> list[Generation]:
        per_call = per_call or self.batch_size
        with self.autocast():
            return [
                g
                for start in range(0, len(texts), per_call)
                for g in self._generate_batch(texts[start : start + per_call], max_new_tokens, raw, sampling)
            ]

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` in ``autocast_dtype`` on this device (mixed precision), else nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=self.autocast_dtype)

    def _generate_batch(
        self, texts: list[str], max_new_tokens: int, raw: bool, sampling: Sampling | None
    ) -> list[Generation]:
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=raw)
        # ids and mask only: a tokenizer that also returns token_type_ids (PreTrainedTokenizerFast's
        # default before transformers 5) makes generate refuse them on a causal LM
        enc = {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask")}
        prompt_len = enc["input_ids"].shape[1]
        if sampling is None:
            decoding = {"do_sample": False, "temperature": None, "top_p": None, **self._greedy}
        else:
            decoding = {
                "do_sample": True,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "num_return_sequences": sampling.samples,
                **self._no_truncation,
            }
        hold = min(self.min_new_tokens, max_new_tokens)
        seqs = self.model.generate(
            **enc,
            **decoding,
            max_new_tokens=max_new_tokens,
            logits_processor=[HoldEOS(prompt_len, hold, sorted(self.eos_ids))]
            if hold and self.eos_ids
            else None,
            top_k=None,
            repetition_penalty=None,
            num_beams=1,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids) or None,
        )
        new_tokens = seqs[:, prompt_len:].tolist()  # (B, <= max_new_tokens), completion only
        return [completion(self.tokenizer, self.eos_ids, row) for row in new_tokens]

    def save(self, path: str | Path) -> None:
        path = Path(path)
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
