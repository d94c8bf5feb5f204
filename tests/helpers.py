"""Test helpers that need no pytest, so ``benchmarks/gpu_check.py`` can use them on a machine without it:
a randomly initialised Qwen2-style model with a byte-level BPE tokenizer built in-process (no hub), a
small set of named tensors for the ES core's tests, and the one rule for a missing optional dependency
(skip, but fail in CI; these import pytest when called)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if not (loop.last and m['role'] == 'assistant') %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


ARCHS = {  # arch -> (config class, model class) in transformers
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}


def build_tiny_model(
    path: Path, tie: bool = False, seed: int = 0, arch: str = "qwen2", **config: Any
) -> Path:
    """Save a random Qwen2 model (or another ``arch`` of ARCHS) and its tokenizer (a 296-token
    byte-level BPE) to ``path``.

    ``config`` overrides the tiny Qwen2Config (e.g. a real model's sizes; ``vocab_size`` may exceed the
    tokenizer's, whose ids are all smaller: generated ids it does not know decode to nothing)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "Solve: 3 + 5 = 8. The answer is <answer> (1 + 2) / 3 </answer> <think> reasoning </think>"
    ] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )
    torch.manual_seed(seed)
    settings: dict[str, Any] = {
        "vocab_size": len(fast),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": tie,
        "eos_token_id": fast.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": fast.pad_token_id,
        "bos_token_id": None,
        **({} if arch == "qwen2" else {"head_dim": 8}),
        **config,
    }
    config_cls, model_cls = (getattr(transformers, n) for n in ARCHS[arch])
    model = model_cls(config_cls(**settings))
    model.generation_config.eos_token_id = settings["eos_token_id"]
    model.generation_config.pad_token_id = settings["pad_token_id"]
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def transformers_major() -> int:
    """The installed transformers' major version (tests whose subject only some versions have)."""
    import transformers

    return int(transformers.__version__.split(".")[0])


def make_params(dtype, device="cpu"):
    """Three named tensors (two equal-shaped matrices and a vector) of ``dtype`` on ``device``; the
    values are drawn on the CPU, so they are the same on every device."""
    import torch

    g = torch.Generator().manual_seed(0)
    params = {
        "a.weight": (torch.randn(64, 48, generator=g) * 0.05).to(dtype),
        "b.weight": (torch.randn(64, 48, generator=g) * 0.05).to(dtype),
        "c.bias": torch.randn(17, generator=g).to(dtype),
    }
    return {k: v.to(device) for k, v in params.items()}


def missing_dependency(what: str, ci_fix: str, install: str, module_level: bool = False) -> NoReturn:
    """Skip the test (or, with ``module_level``, the module) that needs ``what``; in CI (environment
    variable CI set), which installs every dependency, fail instead, saying what CI must do (``ci_fix``),
    so that a broken install cannot pass as skipped tests."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing in CI: {ci_fix}", pytrace=False)
    pytest.skip(f"needs {what} ({install})", allow_module_level=module_level)


def import_or_skip(module: str, ci_fix: str, install: str) -> ModuleType:
    """``pytest.importorskip(module)`` at module level, except that in CI a failing import fails."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        error = f"{type(e).__name__}: {e}"
    missing_dependency(f"{module} ({error})", ci_fix, install, module_level=True)


def tiny_config(model: Any, out: Any, cls: Any = None, **overrides: Any) -> Any:
    """A run config for a few-second run on a tiny model: conciseness, 3 iterations of 2 prompts and 4
    new tokens, evaluation (2 prompts) and checkpoints every 2; ES gets a population of 4. ``cls``:
    ESConfig (default) or GRPORunConfig; ``overrides`` replace any setting."""
    from esft.config import ESConfig

    cls = cls or ESConfig
    settings: dict[str, Any] = {
        "model": str(model),
        "task": "conciseness",
        "iterations": 3,
        "max_new_tokens": 4,
        "prompts_per_iteration": 2,
        "eval_every": 2,
        "eval_limit": 2,
        "checkpoint_every": 2,
        "output": str(out),
    }
    if cls is ESConfig:
        settings["population"] = 4
    return cls(**(settings | overrides))
