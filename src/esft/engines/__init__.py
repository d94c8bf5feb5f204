"""Engines own a model and turn prompts into completions; each exposes the tensors its forward uses."""

from esft.engines.base import Engine, Generation, Prompt, Sampling
from esft.engines.hf import HFEngine

__all__ = ["Engine", "Generation", "HFEngine", "Prompt", "Sampling", "build_engine"]


def build_engine(name: str, model_path: str, **options) -> Engine:
    """Construct the engine ``name`` (only ``hf`` so far) for the model at ``model_path``."""
    if name == "hf":
        return HFEngine(model_path, **options)
    from esft.errors import ConfigError

    raise ConfigError(f"unknown engine {name!r}; available: hf")
