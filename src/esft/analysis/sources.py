"""What the analysis commands' arguments name: a run folder, ``RUN@ITER``, a checkpoint, or a model.

- ``RUN`` (a folder with ``config.yaml``): its newest checkpoint (or ``--checkpoint ITER``), with the
  run's ``model_path`` as its base; ``RUN@ITER`` names checkpoint ITER, and ``RUN@0`` the base itself.
- ``RUN/checkpoints/iter-000010``: that checkpoint, base from its run.
- any other folder or Hugging Face id: that model, with no known base (``--base`` gives one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esft.errors import ConfigError
from esft.runstore import CHECKPOINT_RE, RunStore


@dataclass
class ModelRef:
    """A resolved model argument."""

    spec: str  # as given
    path: str  # loadable model: a folder, or a Hugging Face id
    label: str  # short name for tables and file names
    run: RunStore | None = None
    iteration: int | None = None  # checkpoint iteration (0 = the run's base)
    base: str | None = None  # the run's base model, when known
    config: dict[str, Any] = field(default_factory=dict)  # the run's config ({} for a plain model)

    @property
    def is_grpo(self) -> bool:
        return self.config.get("trainer") == "grpo"


def _run_base(store: RunStore, config: dict[str, Any]) -> str:
    base = config.get("model_path") or config.get("model")
    if not base:
        raise ConfigError(f"{store.root}/config.yaml names no model_path: pass --base MODEL")
    return str(base)


def run_checkpoint(
    store: RunStore, iteration: int | None = None, zero_is_base: bool = False
) -> tuple[int, Path]:
    """(iteration, folder) of checkpoint ``iteration`` of the run (its newest when None), for
    ``esft analyze`` and ``esft eval``. A run without checkpoints, or without that one, is a one-line
    ConfigError listing those it has; ``zero_is_base`` (the caller takes 0 as the base) adds that hint."""
    ckpts = store.checkpoints()
    if not ckpts:
        raise ConfigError(f"{store.root} has no checkpoints yet")
    it = max(ckpts) if iteration is None else iteration
    if it not in ckpts:
        hint = " (0 = the base)" if zero_is_base else ""
        raise ConfigError(
            f"{store.root} has no checkpoint {it}; available: {', '.join(map(str, ckpts))}{hint}"
        )
    return it, ckpts[it]


def _from_run(spec: str, store: RunStore, iteration: int | None) -> ModelRef:
    config = store.read_config()
    base = _run_base(store, config)
    name = store.root.resolve().name
    if iteration == 0:
        return ModelRef(spec, base, f"{name}@0", store, 0, base, config)
    it, folder = run_checkpoint(store, iteration, zero_is_base=True)
    return ModelRef(spec, str(folder), f"{name}@{it}", store, it, base, config)


def resolve(spec: str, checkpoint: int | None = None) -> ModelRef:
    """Resolve a MODEL_OR_RUN argument (see the module docstring); ``checkpoint`` applies to a run."""
    head, sep, tail = spec.rpartition("@")
    if sep and tail.isdigit() and RunStore(head).exists():
        if checkpoint is not None and checkpoint != int(tail):
            raise ConfigError(f"{spec} and --checkpoint {checkpoint} disagree; give one of them")
        return _from_run(spec, RunStore(head), int(tail))
    path = Path(spec).expanduser()
    if RunStore(path).exists():
        return _from_run(spec, RunStore(path), checkpoint)
    if checkpoint is not None:
        raise ConfigError(f"--checkpoint needs a run folder, and {spec} is not one (no config.yaml)")
    m = CHECKPOINT_RE.match(path.name)
    if path.is_dir() and m and path.parent.name == "checkpoints" and RunStore(path.parent.parent).exists():
        store = RunStore(path.parent.parent)
        config = store.read_config()
        label = f"{store.root.resolve().name}@{int(m.group(1))}"
        return ModelRef(spec, str(path), label, store, int(m.group(1)), _run_base(store, config), config)
    from esft.models import resolve_model

    resolved = resolve_model(spec)
    return ModelRef(spec, resolved, Path(spec).name or spec)


def base_of(ref: ModelRef, base: str | None) -> str:
    """The base to compare ``ref`` against: ``--base`` when given, else the run's base."""
    if base:
        from esft.models import resolve_model

        return resolve_model(base)
    if ref.base is None:
        raise ConfigError(
            f"{ref.spec} is not an esft run or checkpoint, so its base is unknown: pass --base MODEL"
        )
    return ref.base


def local_folder(model: str) -> Path:
    """A local folder with the weights of ``model`` (a folder, or a Hugging Face id already in the local
    hub cache): analyses that stream tensors need the files."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:
        raise ConfigError(
            f"{model} is not a local model folder (nor in the Hugging Face cache): pass a folder"
        ) from None


def same_model(a: str, b: str) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:  # pragma: no cover
        return a == b


def build_task(
    name: str | None,
    configs: list[dict[str, Any]],
    options: dict[str, Any] | None = None,
    reward: list[str] | None = None,
    reward_weights: list[float] | None = None,
):
    """Task ``name`` (default: the first run's task). When ``name`` is a run's task, that run's task
    options, rewards and ``max_new_tokens`` are used; ``options`` (from --task-option) override them,
    ``reward`` (from --reward) replaces the run's rewards and ``reward_weights`` (--reward-weights) its
    weights."""
    from esft.tasks import load_task

    if not name:
        name = next((c.get("task") for c in configs if c.get("task")), None)
        if not name:
            raise ConfigError("--task is required (e.g. --task countdown)")
    saved = next((c for c in configs if c.get("task") == name), {})
    task_options = {**dict(saved.get("task_options") or {}), **(options or {})}
    if not reward:
        reward, reward_weights = saved.get("reward"), reward_weights or saved.get("reward_weights")
    task = load_task(name, reward=reward, reward_weights=reward_weights, **task_options)
    if saved.get("max_new_tokens"):  # the run's completion limit for its own task
        task.max_new_tokens = int(saved["max_new_tokens"])
    return task


def output_path(given: str | None, kind: str, ref: ModelRef | None, *labels: str) -> Path:
    """``--json`` when given; else RUN/analysis/<kind>-<labels>.json for a run, or
    ./analysis-<kind>-<labels>.json."""
    if given:
        return Path(given)
    stem = "-".join([kind, *(re.sub(r"[^A-Za-z0-9_.@+-]+", "_", x) for x in labels if x)])
    if ref is not None and ref.run is not None:
        return ref.run.root / "analysis" / f"{stem}.json"
    return Path.cwd() / f"analysis-{stem}.json"
