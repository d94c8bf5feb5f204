"""esft: full-parameter fine-tuning of language models with Evolution Strategies.

Implements the algorithm of "Evolution Strategies at Scale: LLM Fine-Tuning Beyond Reinforcement
Learning" (Qiu et al., 2025): perturb every weight by sigma * eps from a seed, score the perturbed model
by greedy generation and a reward, restore the weights exactly, and move along the z-scored rewards.
"""

from esft.config import ESConfig
from esft.errors import EsftError
from esft.tasks import Task, load_task
from esft.trainer import ESTrainer

__all__ = ["ESConfig", "ESTrainer", "EsftError", "Task", "load_task"]
__version__ = "0.1.0"
