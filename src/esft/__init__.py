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
    # trains) does not import them, and `import esft` stays light
    if name == "ESTrainer":
        from esft.trainer import ESTrainer

        return ESTrainer
    if name == "GRPORun":
        from esft.grpo import GRPORun

        return GRPORun
    raise AttributeError(f"module 'esft' has no attribute {name!r}")
