"""esft: full-parameter fine-tuning of language models with Evolution Strategies.

Implements the algorithm of "Evolution Strategies at Scale: LLM Fine-Tuning Beyond Reinforcement
Learning" (Qiu et al., 2025): perturb every weight by sigma * eps from a seed, score the perturbed model
by greedy generation and a reward, restore the weights exactly, and move along the z-scored rewards.
"""

from typing import Any

from esft.config import ESConfig, GRPORunConfig
from esft.errors import EsftError
from esft.tasks import Task, load_task

__all__ = ["ESConfig", "ESTrainer", "EsftError", "GRPORun", "GRPORunConfig", "Task", "load_task"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # the trainers load on first use, so `import esft.analysis` (which reads run folders and never
    # trains) does not import them, and `import esft` stays light. esft.ESTrainer and esft.GRPORun are
    # the TRL-shaped API (esft/api.py), which also takes the CLI-era ESTrainer(config, ...) form; the
    # CLI's classes stay esft.trainer.ESTrainer and esft.grpo.GRPORun.
    if name in ("ESTrainer", "GRPORun"):
        from esft import api

        return getattr(api, name)
    raise AttributeError(f"module 'esft' has no attribute {name!r}")
