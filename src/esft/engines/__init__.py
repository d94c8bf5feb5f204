"""Engines own a model and turn prompts into completions; each exposes the tensors its forward uses."""

from esft.engines.base import Engine, Generation, Prompt, Sampling
from esft.engines.hf import HFEngine

ENGINES = ("hf", "vllm")

__all__ = ["Engine", "Generation", "HFEngine", "Prompt", "Sampling", "build_engine"]


def build_engine(name: str, model_path: str, autocast: str | None = None, **options) -> Engine:
    """Construct the engine ``name`` (``hf`` or ``vllm``) for the model at ``model_path``. ``autocast``
    (a dtype name; hf only) is mixed precision: float32 weights, forwards under torch.autocast in it."""
    if autocast is not None and name != "hf":
        from esft.errors import ConfigError

        raise ConfigError(f"mixed precision (autocast {autocast}) needs the hf engine, not {name}")
    if name == "hf":
        return HFEngine(model_path, autocast=autocast, **options)
    if name == "vllm":
        from esft.engines.vllm.driver import VLLMEngine  # imports vllm lazily

        return VLLMEngine(model_path, **options)
    from esft.errors import ConfigError

    raise ConfigError(f"unknown engine {name!r}; available: {', '.join(ENGINES)}")
