"""Engines own a model and turn prompts into completions; each exposes the tensors its forward uses."""

from esft.engines.base import Engine, Generation, Prompt, Sampling
from esft.engines.hf import HFEngine

ENGINES = ("hf", "vllm")

__all__ = ["Engine", "Generation", "HFEngine", "Prompt", "Sampling", "build_engine"]


def build_engine(name: str, model_path: str, **options) -> Engine:
    """Construct the engine ``name`` (``hf`` or ``vllm``) for the model at ``model_path``."""
    if name == "hf":
        return HFEngine(model_path, **options)
    if name == "vllm":
        from esft.engines.vllm.driver import VLLMEngine  # imports vllm lazily

        return VLLMEngine(model_path, **options)
    from esft.errors import ConfigError

    raise ConfigError(f"unknown engine {name!r}; available: {', '.join(ENGINES)}")
