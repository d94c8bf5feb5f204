"""Greedy decoding without transformers' float32 copy of every step's logits.

Transformers' decoding loop (``GenerationMixin._sample``) converts each step's last-position logits
to a fresh float32 tensor before its logits processors and its argmax. For greedy decoding in bf16 that
copy is most of the step's work outside the model: (rows x vocabulary) values converted and written,
60 x 151936 for a population of 30 members x 2 prompts on the embedded model. Converting bf16 to float32
is exact and keeps the order of values, so the argmax of the logits themselves is the same token, ties
included (both take the first maximum). The loop takes it as ``max(dim=-1).indices``, faster than
``argmax`` on bf16 CPU tensors (``benchmarks/greedy_loop.py`` times the three; docs/benchmarks.md).

``greedy_loop`` is that loop for greedy decoding, given to ``generate`` as ``custom_generate``: generate
still prepares the inputs, the cache, the logits processors and the stopping criteria, and the loop
calls the model's own input preparation and bookkeeping at every step, as ``_sample`` does. The logits
are used as they are only where every logits processor declares that it gives the same tokens on them
(``same_tokens_on_raw_logits``; ``HoldEOS`` only bans EOS columns); with any other processor the loop
takes the float32 copy as transformers does. ``greedy_kwargs`` says whether a model's transformers
offers what the loop needs; elsewhere the engine calls ``generate`` as it is (``tests/test_bench.py``
checks the tokens are transformers' own, with and without padding, EOS and ``--fixed-length``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch


def _exact_on_raw_logits(processors) -> bool:
    """Whether every processor declares that it picks the same tokens on the model's own logits as on a
    float32 copy (``same_tokens_on_raw_logits = True``, as ``hf.HoldEOS``)."""
    return all(getattr(p, "same_tokens_on_raw_logits", False) for p in processors)


def greedy_loop(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    **model_kwargs,
) -> torch.LongTensor:
    """``GenerationMixin._sample`` with ``do_sample=False`` for a decoder-only model, returning the
    sequences (prompt and completion), its float32 copy skipped where that gives the same tokens."""
    pad = generation_config._pad_token_tensor
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    raw = _exact_on_raw_logits(logits_processor)
    outputs = model._prefill(input_ids, generation_config, model_kwargs)
    while True:
        model_kwargs = model._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=False
        )
        last = outputs.logits[:, -1]
        if raw:  # max's indices: the first maximum, as argmax, which is slower in bf16 on the CPU
            scores = logits_processor(input_ids, last)
            next_tokens = scores.max(dim=-1).indices
        else:
            scores = logits_processor(input_ids, last.to(copy=True, dtype=torch.float32))
            next_tokens = torch.argmax(scores, dim=-1)
        if has_eos:
            next_tokens = next_tokens * unfinished + pad * (1 - unfinished)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        unfinished = unfinished & ~stopping_criteria(input_ids, None)
        del outputs, last, scores
        if not bool(unfinished.any()):
            return input_ids
        step = 1 if model_kwargs.get("use_cache", True) else None
        inputs = model.prepare_inputs_for_generation(input_ids, next_sequence_length=step, **model_kwargs)
        outputs = model(**inputs, return_dict=True)


def greedy_kwargs(model) -> dict[str, Callable]:
    """``{"custom_generate": greedy_loop}`` where ``model``'s transformers runs a callable decoding loop
    and has the steps it calls, for a decoder-only model on the CPU; else ``{}`` (generate as it is).
    On a GPU the copy costs little beside the step and the loop is not used."""
    generate = getattr(type(model), "generate", None)
    if (
        generate is None
        or getattr(model.config, "is_encoder_decoder", False)
        or model.device.type != "cpu"
        or "custom_generate" not in inspect.signature(generate).parameters
        or not all(hasattr(model, f) for f in ("_prefill", "_update_model_kwargs_for_generation"))
        or "next_sequence_length" not in inspect.signature(model.prepare_inputs_for_generation).parameters
    ):
        return {}
    return {"custom_generate": greedy_loop}
