"""The Python API in TRL's shape: ``esft.ESTrainer`` and ``esft.GRPORun``, called like TRL's ``GRPOTrainer``.

    trainer = ESTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=my_reward,
                        args=ESConfig(population=30, iterations=100, output="runs/a"),
                        train_dataset=train, eval_dataset=test)
    trainer.train(); trainer.evaluate(); trainer.save_model()

Nothing here trains: each class turns its arguments into what the trainers behind the CLI take (an
esft :class:`~esft.tasks.base.Task` built from the reward functions and the datasets' rows, a model
folder, an :class:`~esft.config.ESConfig` with ``model``, ``task`` and ``output`` filled in) and runs
:class:`esft.trainer.ESTrainer` (or :class:`esft.grpo.GRPORun`, which is TRL's ``GRPOTrainer`` writing an
esft run folder). So a run started here writes the same run folder as ``esft train``, and ``esft eval``,
``esft replay``, ``esft analyze`` and ``esft report`` read it alike. ``docs/api.md`` has the details.

The CLI-era form ``ESTrainer(config, resume=..., progress=..., task=..., callbacks=...)`` keeps working:
a config passed first is taken as ``args``, and ``task=`` as ``reward_funcs``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from esft.callbacks import Callback, RunInfo, scalars
from esft.config import ESConfig, GRPORunConfig, RunConfig
from esft.environment import WEIGHT_SUFFIXES
from esft.errors import ConfigError, DataError
from esft.evaluate import evaluate as evaluate_task
from esft.runs import TrainResult
from esft.runstore import CHECKPOINT_MARKER, RunStore
from esft.tasks import Task, import_object, is_task, load_task, task_names
from esft.tasks.custom import check_prompts, reward_parts, task_from_rows

__all__ = ["BASE_MODEL_DIR", "ESTrainer", "GRPORun", "TrainOutput"]

BASE_MODEL_DIR = "base-model"  # <run>/base-model: a model passed as an object, saved once
SAVED_MODEL_DIR = "model"  # save_model()'s default folder inside the run
CUSTOM_TASK = "custom"  # config.yaml's task for rewards and rows given in Python


@dataclasses.dataclass
class TrainOutput(TrainResult):
    """What ``train()`` returns: esft's :class:`~esft.runs.TrainResult` (``run_dir``, ``iterations``,
    ``final_checkpoint``, ``eval_history``) plus the fields of transformers' ``TrainOutput``
    (``global_step``, ``training_loss``, ``metrics``), and it unpacks like it:
    ``step, loss, metrics = trainer.train()``. ES has no loss, so its ``training_loss`` is NaN."""

    global_step: int = 0
    training_loss: float = math.nan
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    def __iter__(self):
        return iter((self.global_step, self.training_loss, self.metrics))


def _rows(dataset: Any, what: str) -> list[dict[str, Any]] | None:
    """The rows of a ``datasets.Dataset`` (or a list of dicts), checked for TRL's ``prompt`` column."""
    if dataset is None:
        return None
    hf = sys.modules.get("datasets")  # loaded if ``dataset`` is one of its objects
    if isinstance(dataset, list | tuple):
        rows: list[dict[str, Any]] | None = [dict(r) for r in dataset]
        columns = sorted({k for r in rows for k in r})
    elif hf is not None and isinstance(dataset, hf.Dataset):
        columns, rows = list(dataset.column_names), None
    elif hf is not None and isinstance(dataset, hf.IterableDataset):
        raise DataError(
            f"{what} is an IterableDataset; ES draws each iteration's prompts from the whole split: pass "
            "a datasets.Dataset (e.g. Dataset.from_list(list(dataset.take(1000))))"
        )
    elif hf is not None and isinstance(dataset, hf.DatasetDict | hf.IterableDatasetDict):
        raise DataError(f"{what} is a DatasetDict; pass one split, e.g. dataset['train']")
    else:
        raise DataError(f"{what} must be a datasets.Dataset or a list of dicts, got {type(dataset).__name__}")
    if "prompt" not in columns:
        raise DataError(
            f"{what} has no 'prompt' column (columns: {', '.join(columns) or 'none'}); "
            "rename one, e.g. dataset.rename_column('question', 'prompt')"
        )
    if rows is None:
        rows = dataset.to_list()
    if not rows:
        raise DataError(f"{what} is empty")
    check_prompts(rows, what)
    return rows


def _same_weights(a: Path, b: Path) -> bool:
    import filecmp

    def weights(folder: Path) -> list[str]:
        return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))

    names = weights(a)
    return names == weights(b) and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def save_base_model(model: Any, tokenizer: Any, output: str | Path) -> str:
    """``model`` and ``tokenizer`` saved as a Hugging Face folder ``<output>/base-model`` (the ES core
    fingerprints, replays and reloads its base from a folder). A folder already there with the same
    weights is kept; one with other weights is replaced, unless ``output`` holds a run (whose base it
    is): then a one-line ConfigError."""
    target = Path(output) / BASE_MODEL_DIR
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{BASE_MODEL_DIR}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.is_dir():
            if _same_weights(tmp, target):
                return str(target)
            if RunStore(output).exists():
                raise ConfigError(
                    f"the model passed differs from the base model of the run in {output} ({target}); "
                    "pass the same model to continue that run, or choose another args.output"
                )
            shutil.rmtree(target)
        os.rename(tmp, target)
        return str(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_model_folder(source: Path, target: Path) -> None:
    """A checkpoint or model folder's Hugging Face files (not esft's own: marker, float32 masters)."""
    target.mkdir(parents=True, exist_ok=True)
    for p in source.iterdir():
        if p.is_file() and p.name != CHECKPOINT_MARKER:
            shutil.copy2(p, target / p.name)


class _TransformersCallback(Callback):
    """A transformers ``TrainerCallback`` (what TRL's ``callbacks=`` takes) driven by esft's hooks: its
    ``on_train_begin``, ``on_step_end`` and ``on_log`` (logs: the metrics row's numbers), ``on_evaluate``
    (metrics: ``eval_reward``, ...), ``on_save`` and ``on_train_end`` are called with ``args`` = the run's
    esft config and a ``TrainerState`` whose ``global_step`` is the iteration;
    ``control.should_training_stop`` ends the run after the current iteration, as TRL's does."""

    def __init__(self, callback: Any, args: RunConfig) -> None:
        from transformers import TrainerControl, TrainerState

        self.callback, self.args = callback, args
        self.state, self.control = TrainerState(), TrainerControl()

    @property
    def stop(self) -> str | None:  # type: ignore[override]
        if self.control.should_training_stop:
            return f"{type(self.callback).__name__} set control.should_training_stop"
        return None

    def _call(self, hook: str, **kwargs: Any) -> None:
        method = getattr(self.callback, hook, None)
        if method is not None:
            out = method(self.args, self.state, self.control, **kwargs)
            if out is not None:  # transformers lets a hook return the control it changed
                self.control = out

    def on_train_begin(self, run: RunInfo) -> None:
        from transformers import TrainerControl

        self.control = TrainerControl()  # as transformers' Trainer.train starts afresh
        self.state.global_step = run.start
        self.state.max_steps = int(run.config.get("iterations", 0))
        self._call("on_train_begin")

    def on_log(self, metrics: dict[str, Any], step: int) -> None:
        self.state.global_step = step
        logs = scalars(metrics)
        self.state.log_history.append({**logs, "step": step})
        self._call("on_step_end")
        self._call("on_log", logs=logs)

    def on_evaluate(self, scalars: dict[str, float], rows: list[dict[str, Any]], step: int) -> None:
        self.state.global_step = step
        metrics = {"eval_" + k.removeprefix("eval/"): v for k, v in scalars.items()}  # transformers' names
        self._call("on_evaluate", metrics=metrics)

    def on_checkpoint(self, path: Path, step: int) -> None:
        self.state.global_step = step
        self._call("on_save")

    def on_train_end(self) -> None:
        self._call("on_train_end")


class _TRLShaped:
    """What ESTrainer and GRPORun share: the arguments to a task, a model folder and a config; train,
    evaluate, save_model."""

    config_class: type[RunConfig] = RunConfig
    trainer_name = ""  # "es" or "grpo"

    def __init__(
        self,
        model: Any = None,
        reward_funcs: Any = None,
        args: RunConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        callbacks: list[Any] | None = None,
        *,
        progress: bool = True,
        config: RunConfig | None = None,
        task: Task | None = None,
        resume: bool = False,
        allow_environment_change: bool = False,
    ) -> None:
        cls = type(self).__name__
        # the CLI-era form: Trainer(config, ...) or Trainer(config=..., task=...)
        if isinstance(model, RunConfig):
            _one_of(config, "a config passed first", "config")
            model, config = None, model
        if config is not None:
            _one_of(args, "config", "args")
            args = config
        if task is not None:
            _one_of(reward_funcs, "task", "reward_funcs")
            reward_funcs = task
        if args is None:
            args = self.config_class()
        if not isinstance(args, self.config_class):
            raise ConfigError(
                f"{cls} args must be an esft.{self.config_class.__name__}, got {type(args).__name__}"
                + (
                    " (TRL's GRPOConfig is for trl.GRPOTrainer)"
                    if "GRPOConfig" in type(args).__name__
                    else ""
                )
            )
        self.progress = progress
        self.allow_environment_change = allow_environment_change
        self._resume = resume
        self._user_model: Any = None  # a model passed as an object: trained in place by train()
        self._model: Any = None
        self._result: TrainOutput | None = None

        train_rows = _rows(train_dataset, "train_dataset")
        eval_rows = _rows(eval_dataset, "eval_dataset")
        self.task, task_name, in_memory = self._build_task(reward_funcs, args, train_rows, eval_rows)
        # Ray workers cannot rebuild such a task from the settings: they receive it (distributed.cluster)
        self.task.portable = not in_memory
        if args.eval_every and args.eval_split in ("test", "both") and not self.task.test:
            raise ConfigError(
                f"args.eval_every={args.eval_every} evaluates the eval split, and there is no eval_dataset: "
                "pass one, set eval_split='train', or eval_every=0"
            )
        suffix = "-grpo" if self.trainer_name == "grpo" else ""
        output = args.output or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{self.task.name}{suffix}"
        model_spec = self._model_spec(model, args, processing_class, output)  # last: it may write a folder
        self.args = dataclasses.replace(args, model=model_spec, task=task_name, output=str(output))
        self.callbacks = [cb for cb in callbacks or [] if isinstance(cb, Callback)]
        self.trainer_callbacks = [cb for cb in callbacks or [] if not isinstance(cb, Callback)]

    # -- building the inputs ----------------------------------------------------------------------

    def _build_task(
        self, reward_funcs: Any, args: RunConfig, train: list | None, test: list | None
    ) -> tuple[Task, str, bool]:
        """(the task, config.yaml's task name, whether its rewards exist only in this process)."""
        default = self.config_class.__dataclass_fields__["task"].default
        set_task = args.task if args.task != default else None  # a task left at its default is filled in

        if isinstance(reward_funcs, Task):  # an esft Task (also the CLI-era task=)
            name = reward_funcs.name if is_task(reward_funcs.name) else set_task or CUSTOM_TASK
            return _with_rows(reward_funcs, train, test), name, False
        if isinstance(reward_funcs, str) or (reward_funcs is None and train is None):
            name = args.task if reward_funcs is None else reward_funcs
            if not is_task(name):
                raise ConfigError(
                    f"reward_funcs {name!r} is not an esft task (available: {task_names()}); esft uses no "
                    "reward models: pass a function with TRL's signature f(prompts, completions, **kwargs)"
                )
            if set_task is not None and set_task != name:
                raise ConfigError(f"args.task={set_task!r} conflicts with reward_funcs={name!r}; give one")
            task = load_task(
                name, reward=args.reward, reward_weights=args.reward_weights, **args.task_options
            )
            return _with_rows(task, train, test), name, False

        if reward_funcs is None:
            if not args.reward:
                raise ConfigError(
                    "reward_funcs is required with a train_dataset: a function with TRL's signature, a list of "
                    "them, or an esft task name"
                )
            specs = [args.reward] if isinstance(args.reward, str) else list(args.reward)
            functions = [import_object(s) for s in specs]
        else:
            if args.reward:
                raise ConfigError(f"args.reward={args.reward!r} conflicts with reward_funcs; give one")
            given = list(reward_funcs) if isinstance(reward_funcs, list | tuple) else [reward_funcs]
            functions = [import_object(f) if isinstance(f, str) else f for f in given]
        bad = [f for f in functions if not callable(f)]
        if bad or not functions:
            raise ConfigError(
                "reward_funcs must be a function with TRL's signature, a list of them, or an esft task name; "
                f"got {type(bad[0]).__name__ if bad else 'an empty list'}"
            )
        if set_task not in (None, CUSTOM_TASK):
            raise ConfigError(
                f"args.task={set_task!r} conflicts with the reward functions given in reward_funcs; give one"
            )
        if train is None:
            raise ConfigError(
                "train_dataset is required with reward functions: a datasets.Dataset with 'prompt'"
            )
        parts = reward_parts(functions)
        if args.reward_weights is not None:
            if len(args.reward_weights) != len(parts):
                raise ConfigError(
                    f"args.reward_weights has {len(args.reward_weights)} values for {len(parts)} reward functions"
                )
            for part, w in zip(parts, args.reward_weights, strict=True):
                part.weight = float(w)
        return task_from_rows(train, test or [], parts), CUSTOM_TASK, True

    def _model_spec(self, model: Any, args: RunConfig, tokenizer: Any, output: str) -> str | None:
        """config.model: an id or folder as given, or the folder a loaded model (or a model with another
        tokenizer) is saved to."""
        if model is None or isinstance(model, str | os.PathLike):
            spec = args.model if model is None else str(model)
            if args.model not in (None, spec):
                raise ConfigError(f"args.model={args.model!r} conflicts with model={spec!r}; give one")
            if tokenizer is None:
                return spec
            from transformers import AutoModelForCausalLM

            from esft.models import resolve_model

            model = AutoModelForCausalLM.from_pretrained(resolve_model(spec), dtype="auto")
            return save_base_model(model, tokenizer, output)
        from transformers import PreTrainedModel

        if not isinstance(model, PreTrainedModel):
            raise ConfigError(
                "model must be a Hugging Face id, a model folder or a loaded transformers PreTrainedModel "
                f"(merge a PEFT model first: model.merge_and_unload()), got {type(model).__name__}"
            )
        if args.model is not None:
            raise ConfigError(f"args.model={args.model!r} conflicts with the loaded model passed; give one")
        if tokenizer is None:
            tokenizer = _tokenizer_of(model)
        self._user_model = model
        return save_base_model(model, tokenizer, output)

    # -- what a TRL trainer has -------------------------------------------------------------------

    @property
    def model(self) -> Any:
        """The model with the current weights: the one passed (trained in place by ``train()``), or the
        newest weights loaded on first use (after ``train()``: its final checkpoint)."""
        if self._user_model is not None:
            return self._user_model
        if self._model is None:
            from transformers import AutoModelForCausalLM

            self._model = AutoModelForCausalLM.from_pretrained(self._current_weights(), dtype="auto").eval()
        return self._model

    @property
    def run_dir(self) -> Path:
        """The run folder (``args.output``)."""
        return Path(self.args.output)

    def train(self, resume_from_checkpoint: bool | str | None = None) -> TrainOutput:
        """Train, writing the run folder ``args.output``; returns a :class:`TrainOutput`.

        ``resume_from_checkpoint=True`` (or the run folder, or one of its checkpoints) continues the run
        in ``args.output`` where it stopped, as ``esft train --resume`` does (the settings must be the
        run's, except iterations and logging cadence)."""
        resume = self._resume or self._resume_flag(resume_from_checkpoint)
        store = RunStore(self.args.output)
        if not resume and (store.exists() or store.metrics_path.exists()):
            raise ConfigError(
                f"{store.root} already holds a run; continue it with train(resume_from_checkpoint=True) "
                "(raise args.iterations to train further), or choose another args.output"
            )
        before = store.metrics()
        start = before[-1] if before else {}
        tic = time.perf_counter()
        result = self._make_trainer(resume).train()
        runtime = time.perf_counter() - tic
        self._resume = False
        self._model = None  # the newest weights load again on next use
        if self._user_model is not None and result.final_checkpoint is not None:
            _load_into(self._user_model, result.final_checkpoint)
        rows = [m for m in store.metrics() if m["iteration"] > start.get("iteration", 0)]
        self._result = _train_output(result, rows, start, runtime)
        return self._result

    def evaluate(self, eval_dataset: Any = None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Greedy completions of the current weights (the final checkpoint after ``train()``, else the
        run's newest checkpoint, else the base model) for ``eval_dataset`` (default: the one given at
        construction; a dict of datasets is evaluated one by one, prefixed ``eval_<name>``), scored by
        the rewards. Returns transformers-style metrics: ``eval_reward``, ``eval_reward/<function>``,
        the task's metrics (e.g. ``eval_accuracy``), ``eval_completion_tokens``, ``eval_samples``,
        ``eval_runtime``, ``eval_samples_per_second``. ``args.eval_limit`` caps the rows (0 = all);
        the run folder is not written, the callbacks' ``on_evaluate`` is called."""
        if isinstance(eval_dataset, dict):
            out: dict[str, float] = {}
            for name, dataset in eval_dataset.items():
                out.update(self.evaluate(dataset, f"{metric_key_prefix}_{name}"))
            return out
        rows = _rows(eval_dataset, "eval_dataset")
        task = self.task if rows is None else _with_rows(self.task, None, rows)
        if not task.test:
            raise ConfigError("nothing to evaluate: pass an eval_dataset, here or to the trainer")
        cfg = self.args
        max_new = cfg.max_new_tokens or task.max_new_tokens
        tic = time.perf_counter()
        engine = self._eval_engine(self._current_weights())
        if cfg.fixed_length:
            engine.min_new_tokens = max_new
        try:
            summary, samples = evaluate_task(
                engine, task, "test", cfg.eval_limit, max_new, cfg.batch_size, progress=self.progress
            )
        finally:
            engine.close()
        runtime = time.perf_counter() - tic
        values = {k: float(v) for k, v in summary.items() if isinstance(v, int | float)}
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in values.items()}
        metrics[f"{metric_key_prefix}_runtime"] = runtime
        metrics[f"{metric_key_prefix}_samples_per_second"] = len(samples) / runtime if runtime > 0 else 0.0
        step = self._result.global_step if self._result is not None else 0
        row = {"iteration": step, "split": metric_key_prefix, **summary}
        for cb in self.callbacks:
            cb.on_evaluate({f"eval/{k}": v for k, v in values.items() if math.isfinite(v)}, [row], step)
        return metrics

    def save_model(self, output_dir: str | Path | None = None) -> Path:
        """Write the current weights (those ``evaluate`` uses) with the tokenizer as a Hugging Face folder,
        ``output_dir`` or ``<args.output>/model``; returns the folder. Loads with
        ``AutoModelForCausalLM.from_pretrained``."""
        target = Path(output_dir) if output_dir is not None else self.run_dir / SAVED_MODEL_DIR
        source = self._current_weights()
        if Path(source).is_dir():
            if Path(source).resolve() == target.resolve():
                return target
            _copy_model_folder(Path(source), target)
        else:  # a Hugging Face id, not trained yet
            from transformers import AutoTokenizer

            self.model.save_pretrained(target)
            AutoTokenizer.from_pretrained(source).save_pretrained(target)
        return target

    # -- pieces -----------------------------------------------------------------------------------

    def _resume_flag(self, resume_from_checkpoint: bool | str | None) -> bool:
        if resume_from_checkpoint is None or isinstance(resume_from_checkpoint, bool):
            return bool(resume_from_checkpoint)
        given, root = Path(resume_from_checkpoint).resolve(), self.run_dir.resolve()
        if given != root and root not in given.parents:
            raise ConfigError(
                f"resume_from_checkpoint={str(resume_from_checkpoint)!r} is not in the run folder {root}: "
                "a run continues from its own newest checkpoint (pass True)"
            )
        return True

    def _current_weights(self) -> str:
        if self._result is not None and self._result.final_checkpoint is not None:
            return str(self._result.final_checkpoint)
        ckpts = RunStore(self.args.output).checkpoints()
        if ckpts:
            return str(ckpts[max(ckpts)])
        from esft.models import resolve_model

        return resolve_model(self.args.model)

    def _make_trainer(self, resume: bool) -> Any:
        raise NotImplementedError

    def _eval_engine(self, path: str) -> Any:
        raise NotImplementedError


class ESTrainer(_TRLShaped):
    """Evolution Strategies fine-tuning, called like TRL's ``GRPOTrainer``.

    - ``model``: a Hugging Face id or a model folder (None: ``args.model``, else the embedded default
      model), or a loaded ``transformers.PreTrainedModel``. ES rebuilds, fingerprints and replays runs
      from a base model *folder*, so a loaded model is saved once, with ``processing_class`` (else the
      tokenizer of ``model.name_or_path``), to ``<args.output>/base-model/``; ``train()`` then loads its
      final weights back into it, as TRL trains the model passed in place.
    - ``reward_funcs``: a function with TRL's signature ``f(prompts, completions, **kwargs) -> list[float
      | None]``, a list of them (also ``"module:function"`` strings), or the name of an esft task
      (``"countdown"``, ``"conciseness"``, ...; then the datasets may be omitted and the task's own
      splits are used), or an esft ``Task``. Functions get every dataset column as a keyword argument,
      plus ``completion_ids``, ``trainer_state``, ``log_metric`` and ``log_extra``, as in TRL; several
      are summed, weighted by ``args.reward_weights``.
    - ``args``: an :class:`~esft.config.ESConfig`; its ``model``, ``task`` and ``output`` are filled from
      the other arguments (set and different: a one-line ConfigError). ``output`` is the run folder
      (default ``runs/<time>-<task>``).
    - ``train_dataset`` / ``eval_dataset``: ``datasets.Dataset`` (or lists of dicts) with a ``prompt``
      column, text or a conversation, and the columns the rewards read. ES generates greedily for
      every prompt of an iteration's mini-batch (``args.prompts_per_iteration``, default all rows).
    - ``processing_class``: the tokenizer, when the model folder's own is not the one to use.
    - ``callbacks``: :class:`esft.callbacks.Callback` objects (``on_log`` gets each metrics row), or
      transformers ``TrainerCallback`` objects (``on_log(args, state, control, logs)``, driven by the
      same hooks; ``GRPORun`` hands them to TRL as they are).

    ``progress=False`` silences the bars and lines. The CLI-era keywords still work: a config passed
    first (or as ``config=``) is ``args``, ``task=`` is ``reward_funcs``, ``resume=True`` continues the run
    in ``args.output``, and ``allow_environment_change`` is ``esft train``'s flag.
    """

    config_class = ESConfig
    trainer_name = "es"
    args: ESConfig

    def _make_trainer(self, resume: bool) -> Any:
        from esft.trainer import ESTrainer as CLITrainer

        adapted = [_TransformersCallback(cb, self.args) for cb in self.trainer_callbacks]
        return CLITrainer(
            self.args,
            resume=resume,
            progress=self.progress,
            task=self.task,
            allow_environment_change=self.allow_environment_change,
            callbacks=[*self.callbacks, *adapted],
        )

    def _eval_engine(self, path: str) -> Any:
        from esft.engines import build_engine

        cfg = self.args
        return build_engine(cfg.engine, path, dtype=cfg.dtype, device=cfg.device, batch_size=cfg.batch_size)


class GRPORun(_TRLShaped):
    """The GRPO baseline with :class:`ESTrainer`'s signature; ``args`` is an
    :class:`~esft.config.GRPORunConfig`.

    The training is TRL's ``GRPOTrainer``, unchanged: this class adds only esft's run folder (the layout,
    metrics and evaluations ES writes, so the two compare on equal terms) and esft's reading of the
    arguments. For GRPO alone, without a comparison with ES, use ``trl.GRPOTrainer`` itself; the name
    stays ``GRPORun`` so as not to shadow it. transformers ``TrainerCallback`` objects in ``callbacks`` go
    to TRL's trainer as they are (TRL's logs, args and state); esft ``Callback`` objects get the metrics
    rows ES's get. Needs TRL (``pip install -e '.[grpo]'``)."""

    config_class = GRPORunConfig
    trainer_name = "grpo"
    args: GRPORunConfig

    def _make_trainer(self, resume: bool) -> Any:
        from esft.grpo import GRPORun as CLIRun

        return CLIRun(
            self.args,
            progress=self.progress,
            task=self.task,
            resume=resume,
            allow_environment_change=self.allow_environment_change,
            callbacks=self.callbacks,
            trainer_callbacks=self.trainer_callbacks,  # TRL calls them itself, with its own logs
        )

    def _eval_engine(self, path: str) -> Any:
        from esft.grpo import grpo_engine

        return grpo_engine(self.args, path)


def _one_of(other: Any, given: str, name: str) -> None:
    """``given`` (a CLI-era argument) and ``name`` mean the same: a one-line error if both are set."""
    if other is not None:
        raise ConfigError(f"{given} and {name} are the same argument; give one")


def _with_rows(task: Task, train: list | None, test: list | None) -> Task:
    """``task`` with its train and/or test split replaced by rows (a copy; ``task`` is not changed)."""
    if train is None and test is None:
        return task
    own = task

    def loader(split: str) -> list[dict[str, Any]]:
        given = train if split == "train" else test
        if given is not None:
            return given
        return [] if train is not None else own.split(split)  # a dataset given for train only: no test

    return dataclasses.replace(task, loader=loader, _splits={}, _reported=set())


def _tokenizer_of(model: Any) -> Any:
    from transformers import AutoTokenizer

    source = getattr(model, "name_or_path", "") or ""
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception:
        raise ConfigError(
            f"no tokenizer found for the model passed (name_or_path {source!r}): pass processing_class=tokenizer"
        ) from None


def _load_into(model: Any, checkpoint: Path) -> None:
    """The checkpoint's weights copied into ``model`` in place (its dtype and device kept)."""
    import torch
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype="auto")
    with torch.no_grad():
        model.load_state_dict(trained.state_dict())


def _train_output(
    result: TrainResult, rows: list[dict[str, Any]], start: dict[str, Any], runtime: float
) -> TrainOutput:
    """TrainResult plus transformers' TrainOutput fields over the iterations this call ran."""
    last = rows[-1] if rows else start
    samples = last.get("samples", 0) - start.get("samples", 0)
    losses = [m["grpo/loss"] for m in rows if isinstance(m.get("grpo/loss"), int | float)]
    loss = sum(losses) / len(losses) if losses else math.nan
    metrics: dict[str, float] = {
        "train_runtime": runtime,
        "train_samples": float(samples),
        "train_samples_per_second": samples / runtime if runtime > 0 else 0.0,
        "train_steps_per_second": len(rows) / runtime if runtime > 0 else 0.0,
    }
    if "train/reward_mean" in last:
        metrics["train_reward"] = float(last["train/reward_mean"])
    if losses:
        metrics["train_loss"] = loss
    return TrainOutput(
        **{f.name: getattr(result, f.name) for f in dataclasses.fields(result)},
        global_step=result.iterations,
        training_loss=loss,
        metrics=metrics,
    )
