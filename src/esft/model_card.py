"""Model cards: a README.md in every checkpoint folder, as the Hugging Face Hub reads one (and as TRL
writes one for its trainers).

The card is written from the run folder alone (config.yaml, environment.json, metrics.jsonl,
eval.jsonl) plus the task's reward parts, so ES and GRPO checkpoints get the same card:

- YAML front matter: ``base_model`` (when the run's model is a Hub id), ``library_name: transformers``,
  ``pipeline_tag: text-generation``, ``tags``, ``model_name`` and a ``model-index`` with the evaluation
  results of this checkpoint (the Hub's machine-readable form, full precision);
- what it is: base model, method and its key settings (ES: N, sigma, alpha, noise, rank, shaping,
  precision; GRPO: group size, learning rate, beta, loss), task and reward parts with their weights,
  the iteration reached and the samples generated to get there;
- evaluation: the newest eval.jsonl row per split at or before this iteration, next to the base model's
  row (iteration 0) when there is one;
- how to load it, and the commands that reproduce it: for ES, ``esft replay`` (base model + seed log ->
  these weights, checked bit for bit against this checkpoint) and the ``esft train`` command with the
  run's settings as flags; for GRPO the ``esft grpo`` command. Flags rather than
  ``--config RUN/config.yaml``: config.yaml also records ``trainer`` and ``model_path``, which
  ``--config`` refuses, and its ``output`` is the run folder itself, which already holds the run.

The card is part of the checkpoint: the trainers write it in the writer they pass to
``RunStore.save_checkpoint``, before the completion marker and the rename. Both trainers evaluate
*after* checkpointing an iteration, so the card written then cannot hold that iteration's evaluation;
:func:`refresh_card` rewrites the card of the checkpoint of that iteration once the evaluation is
logged (README.md.tmp, then ``os.replace``: a reader sees the old card or the new one, never half of
one). Evaluating first instead would make a crash or a full disk in the evaluation (long generations,
sandboxed reward code) lose the iteration's checkpoint, which GRPO cannot rebuild; and the card is
documentation, not something resume trusts, so refreshing it in a complete checkpoint is safe.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from esft.config import ESConfig, GRPORunConfig
from esft.runstore import RunStore

CARD = "README.md"

ES_CITATION = """@article{qiu2025evolution,
  title   = {{Evolution Strategies at Scale: LLM Fine-Tuning Beyond Reinforcement Learning}},
  author  = {Xin Qiu and Yulu Gan and Conor F. Hayes and Qiyao Liang and Elliot Meyerson and Babak Hodjat and Risto Miikkulainen},
  year    = {2025},
  eprint  = {arXiv:2509.24372},
}"""
GRPO_CITATION = """@article{shao2024deepseekmath,
  title   = {{DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models}},
  author  = {Zhihong Shao and Peiyi Wang and Qihao Zhu and Runxin Xu and Junxiao Song and Mingchuan Zhang and Y. K. Li and Y. Wu and Daya Guo},
  year    = {2024},
  eprint  = {arXiv:2402.03300},
}"""
TRL_CITATION = """@software{vonwerra2020trl,
  title   = {{TRL: Transformers Reinforcement Learning}},
  author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallouédec, Quentin},
  license = {Apache-2.0},
  url     = {https://github.com/huggingface/trl},
  year    = {2020}
}"""

EMBEDDED_HUB_ID = "Qwen/Qwen2.5-Coder-0.5B-Instruct"  # the embedded default (esft/models.py), de-quantized
SPLITS = {"test": "held-out prompts", "train": "training prompts"}
COMMANDS = {"es": "train", "grpo": "grpo"}
NOT_FLAGS = ("output",)  # settings the reproducing command replaces


def write_card(
    folder: str | Path,
    run: RunStore | str | Path,
    iteration: int,
    rewards: Sequence[tuple[str, float]] | None = None,
    location: str | Path | None = None,
) -> Path:
    """Write ``folder``/README.md, the card of ``run``'s checkpoint of ``iteration`` (atomically: a
    temporary file replaced into place). ``rewards``: the task's reward parts (name, weight);
    ``location``: where the checkpoint is read from, for the card's loading snippet (default: the run's
    checkpoints/iter-NNNNNN, where ``save_checkpoint`` renames ``folder`` to)."""
    store = run if isinstance(run, RunStore) else RunStore(run)
    folder = Path(folder)
    text = card_text(store, iteration, rewards, location or store.checkpoint_dir(iteration))
    tmp = folder / f"{CARD}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / CARD)
    return folder / CARD


def refresh_card(store: RunStore, iteration: int, rewards: Sequence[tuple[str, float]] | None = None) -> None:
    """Rewrite the card of checkpoint ``iteration``, if the run has one, after its evaluation was logged."""
    path = store.checkpoints().get(iteration)
    if path is not None:
        write_card(path, store, iteration, rewards)


def reward_parts(task: Any) -> list[tuple[str, float]]:
    """A task's reward parts as (name, weight)."""
    return [(p.name, float(p.weight)) for p in task.rewards]


# -- the card ---------------------------------------------------------------------------------------


def card_text(
    store: RunStore, iteration: int, rewards: Sequence[tuple[str, float]] | None, location: str | Path
) -> str:
    config = store.read_config()
    trainer = config.get("trainer", "es")
    env = _read_json(store.root / "environment.json")
    metrics = next((m for m in reversed(store.metrics()) if m.get("iteration") == iteration), {})
    latest, base = evaluation_rows(store.evals(), iteration)
    name = f"{store.root.name}-iter-{iteration:06d}"
    hub_id = base_model_id(config.get("model"))

    meta: dict[str, Any] = {}
    if hub_id:
        meta["base_model"] = hub_id
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["model_name"] = name
    meta["tags"] = ["esft", "evolution-strategies"] if trainer == "es" else ["esft", "grpo", "trl"]
    own = {split: row for split, row in latest.items() if row["iteration"] == iteration}
    index = model_index(name, config.get("task", "task"), own)
    if index:
        meta["model-index"] = index

    out = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    out += [f"# {name}", ""]
    method = (
        "evolution strategies (ES, Qiu et al. 2025)"
        if trainer == "es"
        else "GRPO (Shao et al. 2024) through TRL's GRPOTrainer"
    )
    what = describe_model(config.get("model"), hub_id)
    out += [
        f"{what[0].upper()}{what[1:]} fine-tuned with {method} by esft on the "
        f"`{config.get('task')}` task: {'iteration' if trainer == 'es' else 'step'} {iteration} of "
        f"{config.get('iterations')}"
        + (f", {metrics['samples']} completions generated for training" if "samples" in metrics else "")
        + ".",
        "",
    ]
    out += ["## Training", "", "| setting | value |", "|---|---|"]
    out += [f"| {k} | {_cell(v)} |" for k, v in settings(config, env, rewards, iteration, metrics)]
    out += [""]
    out += evaluation_section(config, store, iteration, latest, base)
    out += usage_section(location)
    out += reproduce_section(config, store, iteration, env)
    out += [
        "<details><summary>All settings (the run's config.yaml)</summary>",
        "",
        "```yaml",
        yaml.safe_dump(config, sort_keys=False, allow_unicode=True).rstrip(),
        "```",
        "",
        "</details>",
        "",
    ]
    out += ["## Citation", ""]
    if trainer == "es":
        out += ["The method:", "", "```bibtex", ES_CITATION, "```", ""]
    else:
        out += ["GRPO:", "", "```bibtex", GRPO_CITATION, "```", "", "TRL:", "", "```bibtex", TRL_CITATION]
        out += ["```", ""]
    return "\n".join(out)


def settings(
    config: dict[str, Any],
    env: dict[str, Any],
    rewards: Sequence[tuple[str, float]] | None,
    iteration: int,
    metrics: dict[str, Any],
) -> list[tuple[str, Any]]:
    """The card's training table: (setting, value) rows."""
    trainer = config.get("trainer", "es")
    rows: list[tuple[str, Any]] = [
        ("base model", describe_model(config.get("model"), base_model_id(config.get("model")))),
        ("method", "ES (esft train)" if trainer == "es" else "GRPO (esft grpo, TRL)"),
        ("task", config.get("task")),
    ]
    if config.get("task_options"):
        rows.append(("task options", json.dumps(config["task_options"], sort_keys=True)))
    if rewards:
        rows.append(("reward", " + ".join(f"{w:g} x {n}" for n, w in rewards)))
    elif config.get("reward"):
        rows.append(("reward", config["reward"]))
    if trainer == "es":
        noise = config.get("noise")
        rows += [
            ("population N", config.get("population")),
            ("sigma", config.get("sigma")),
            ("alpha", config.get("alpha")),
            ("noise", f"{noise}, rank {config.get('rank')}" if noise == "lowrank" else noise),
            ("shaping", config.get("shaping")),
            ("antithetic", config.get("antithetic")),
            (
                "precision",
                f"{env.get('dtype', config.get('dtype'))} weights, update precision "
                f"{env.get('update_precision', config.get('update_precision'))}",
            ),
        ]
    else:
        rows += [
            ("group size G", config.get("group_size")),
            ("learning rate", config.get("learning_rate")),
            ("beta (KL)", config.get("beta")),
            ("loss type", config.get("loss_type")),
            ("reward scaling", config.get("scale_rewards")),
            ("temperature", config.get("temperature")),
            ("precision", f"{env.get('dtype', config.get('dtype'))} weights"),
        ]
    rows += [
        (
            "prompts per iteration" if trainer == "es" else "prompts per step",
            config.get("prompts_per_iteration") or "the whole train split",
        ),
        ("max new tokens", config.get("max_new_tokens") or "the task's default"),
        ("seed", config.get("seed")),
    ]
    if config.get("freeze"):
        rows.append(("frozen", ", ".join(config["freeze"])))
    rows.append(("iteration" if trainer == "es" else "step", f"{iteration} of {config.get('iterations')}"))
    if "samples" in metrics:
        rows.append(("samples generated", metrics["samples"]))
    if env:
        rows.append(("trained on", environment_line(env)))
    return rows


def evaluation_rows(
    evals: list[dict[str, Any]], iteration: int
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(the newest row per split at or before ``iteration``, the base model's row per split)."""
    latest: dict[str, dict[str, Any]] = {}
    base: dict[str, dict[str, Any]] = {}
    for row in evals:
        it, split = row.get("iteration", 0), row.get("split", "test")
        if it > iteration:
            continue
        if split not in latest or it >= latest[split]["iteration"]:
            latest[split] = row
        if it == 0:
            base[split] = row
    return latest, base


COUNTS = ("completion_tokens", "reward_failures", "samples")  # eval.jsonl's numbers that are not scores


def summary_values(row: dict[str, Any]) -> dict[str, float]:
    """An eval.jsonl row's numbers: reward, task metrics, reward parts, then the counts."""
    keys = [k for k in row if k not in ("iteration", "split", "examples")]
    ordered = ["reward"] if "reward" in keys else []
    ordered += [k for k in keys if k != "reward" and not k.startswith("reward/") and k not in COUNTS]
    ordered += [k for k in keys if k.startswith("reward/")]
    ordered += [k for k in COUNTS if k in keys]
    return {k: row[k] for k in ordered if isinstance(row[k], int | float) and not isinstance(row[k], bool)}


def model_index(name: str, task: str, rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The Hub's ``model-index``: ``rows``, this checkpoint's own evaluation per split (finite scores;
    an earlier iteration's evaluation describes other weights and is left out)."""
    results = []
    for split, row in rows.items():
        metrics = [
            {"type": k, "value": v, "name": k}
            for k, v in summary_values(row).items()
            if math.isfinite(v) and k not in ("reward_failures", "samples")
        ]
        if metrics:
            results.append(
                {
                    "task": {"type": "text-generation", "name": "Text Generation"},
                    "dataset": {"name": f"esft {task}", "type": f"esft/{task}", "split": split},
                    "metrics": metrics,
                }
            )
    return [{"name": name, "results": results}] if results else []


def evaluation_section(
    config: dict[str, Any],
    store: RunStore,
    iteration: int,
    latest: dict[str, dict[str, Any]],
    base: dict[str, dict[str, Any]],
) -> list[str]:
    out = ["## Evaluation", ""]
    if not latest:
        out += [
            "This run logged no evaluation at or before this checkpoint"
            + (" (`--eval-every 0`)" if not config.get("eval_every") else "")
            + f". Evaluate it with `esft eval --run {shlex.quote(str(store.root))} --checkpoint {iteration}`.",
            "",
        ]
        return out
    limit = config.get("eval_limit")
    out += [
        "Greedy completions, scored by the task's rewards ("
        + (f"the first {limit} rows" if limit else "every row")
        + "; eval.jsonl in the run folder):",
        "",
    ]
    for split, row in latest.items():
        it = row["iteration"]
        out += [f"**{split} split** ({SPLITS.get(split, split)})", ""]
        columns = [("base model (iteration 0)", base[split])] if split in base else []
        if it == iteration:
            columns.append((f"this checkpoint (iteration {it})", row))
        elif it:
            columns.append((f"iteration {it} (the newest evaluation before this checkpoint)", row))
        if it != iteration:
            out += [
                f"This checkpoint was not evaluated; `esft eval --run {shlex.quote(str(store.root))} "
                f"--checkpoint {iteration} --split {split}` does.",
                "",
            ]
        out += ["| metric | " + " | ".join(c for c, _ in columns) + " |"]
        out += ["|---|" + "---|" * len(columns)]
        names = list(summary_values(row))
        names += [k for _, r in columns for k in summary_values(r) if k not in names]
        for k in names:
            out += [f"| {k} | " + " | ".join(_number(summary_values(r).get(k)) for _, r in columns) + " |"]
        out += [""]
    return out


def usage_section(location: str | Path) -> list[str]:
    where = str(location)
    return [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"model = AutoModelForCausalLM.from_pretrained({json.dumps(where)})",
        f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(where)})",
        "```",
        "",
    ]


def reproduce_section(
    config: dict[str, Any], store: RunStore, iteration: int, env: dict[str, Any]
) -> list[str]:
    trainer = config.get("trainer", "es")
    train = train_command(config, f"{store.root}-reproduced")
    out = ["## Reproduce", ""]
    if trainer == "es":
        out += [
            "The base model and the run's seed log determine these weights. Rebuild them from the run folder,",
            "checked bit for bit against this checkpoint (exit status 0: bit-identical):",
            "",
            "```bash",
            replay_command(store.root, iteration),
            "```",
            "",
            f"or train the run again (checkpoints/iter-{iteration:06d} of the new run holds these weights):",
            "",
        ]
    else:
        out += [
            f"Train the run again (checkpoints/iter-{iteration:06d} of the new run holds these weights):",
            "",
        ]
    out += ["```bash", train, "```", ""]
    if env:
        same = (
            "gives the same bits"
            if trainer == "es"
            else "retraces the run (TRL's sampling is seeded with --seed; GPU kernels that are not "
            "deterministic can make it drift)"
        )
        out += [
            f"On the environment the run used ({environment_line(env)}; environment.json in the run folder) "
            f"this {same}; other hardware or library versions may differ in the last bits.",
            "",
        ]
    return out


def replay_command(run_dir: str | Path, iteration: int) -> str:
    return f"esft replay --run {shlex.quote(str(run_dir))} --iteration {iteration}"


def train_command(config: dict[str, Any], output: str | Path) -> str:
    """The ``esft train``/``esft grpo`` command with the run's settings as flags (those that differ from
    the defaults) and ``output`` as its run folder."""
    trainer = config.get("trainer", "es")
    cls = ESConfig if trainer == "es" else GRPORunConfig
    defaults = _defaults(cls)
    words = ["esft", COMMANDS.get(trainer, trainer)]
    for key in cls.field_names():
        if key in NOT_FLAGS or key not in config or config[key] == defaults.get(key):
            continue
        words += _flag(key, config[key])
    words += ["--output", str(output)]
    return " ".join(shlex.quote(w) for w in words)


def _flag(key: str, value: Any) -> list[str]:
    flag = "--" + key.replace("_", "-")
    if key == "task_options":
        return [w for k, v in value.items() for w in ("--task-option", f"{k}={_yaml_scalar(v)}")]
    if key in ("freeze", "reward"):
        items = value if isinstance(value, list) else [value]
        return [w for v in items for w in (flag, str(v))]
    if key in ("pin_checkpoints", "reward_weights"):
        return [flag, *(repr(v) for v in value)]
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if value is None:
        return []  # only settings whose default is not None get here, and none of them may be None
    text = repr(value) if isinstance(value, float) else str(value)
    return [f"{flag}={text}"] if text.startswith("-") else [flag, text]


def _yaml_scalar(value: Any) -> str:
    """``value`` as --task-option parses it back (a YAML scalar, or flow-style YAML)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    return text.removesuffix("...").strip()


def _defaults(cls: type) -> dict[str, Any]:
    import dataclasses

    return {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        for f in dataclasses.fields(cls)
    }


# -- small pieces -----------------------------------------------------------------------------------


def base_model_id(model: str | None) -> str | None:
    """The Hub id of the run's model, for ``base_model`` (the Hub rejects a local path there): the
    embedded default's, a Hub id as given, or None for a local folder."""
    if model in (None, "", "default"):
        return EMBEDDED_HUB_ID
    if model.startswith((".", "/", "~")) or Path(model).expanduser().exists():
        return None
    return model if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model) else None


def describe_model(model: str | None, hub_id: str | None) -> str:
    if model in (None, "", "default"):
        return f"[{EMBEDDED_HUB_ID}](https://huggingface.co/{EMBEDDED_HUB_ID}) (esft's embedded copy: Q4_K_M, de-quantized)"
    if hub_id:
        return f"[{hub_id}](https://huggingface.co/{hub_id})"
    return f"the local model `{model}`"


def environment_line(env: dict[str, Any]) -> str:
    parts = [f"{env.get('device')}" + (f" ({env['gpu']})" if env.get("gpu") else "")]
    for k in ("engine", "torch", "transformers", "vllm"):
        if env.get(k):
            parts.append(f"{k} {env[k]}")
    # the run's code, version and commit; a run recorded before environment.json held it names none
    # (the installed esft need not be the one that trained it)
    parts.append(f"esft {env['esft']}" if env.get("esft") else "esft (version not recorded)")
    return ", ".join(parts)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _number(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}" if math.isfinite(v) else "n/a"


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|")
