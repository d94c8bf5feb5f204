"""The ``esft`` command: train (ES), grpo (the RL baseline), eval, bench, analyze, report, replay, sweep.

Every training setting is an ESConfig field; it can come from ``--config FILE`` (YAML/TOML/JSON) and
from a flag of the same name, and flags win. ``esft train`` with no arguments runs the quickstart.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import sys
import textwrap
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from esft.config import BENCH_MODES, ESConfig, GRPORunConfig, RunConfig, read_config_file
from esft.errors import ConfigError, EsftError
from esft.tasks import parse_task_options

QUICKSTART = files("esft") / "configs" / "quickstart.yaml"
REPLAY_UNVERIFIED = 3  # esft replay wrote the weights, but the run has no checkpoint to check them against


def _field_docs(cls: type) -> dict[str, str]:
    """Config attribute docstrings (the string under each field, inherited ones too), for --help."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
            ):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _add_config_flags(p: argparse.ArgumentParser, cls: type[RunConfig] = ESConfig) -> None:
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")
        if f.name == "task_options":
            p.add_argument(
                "--task-option", dest="task_options", action="append", metavar="KEY=VALUE", help=help_text
            )
        elif f.name == "freeze":
            p.add_argument(flag, action="append", metavar="PATTERN", help=help_text)
        elif f.name == "pin_checkpoints":
            p.add_argument(flag, type=int, nargs="+", metavar="ITER", help=help_text)
        elif f.name == "reward":
            p.add_argument(flag, action="append", metavar="MODULE:FUNCTION", help=help_text)
        elif f.name == "reward_weights":
            p.add_argument(flag, type=float, nargs="+", metavar="W", help=help_text)
        elif f.name == "report_to":
            p.add_argument(flag, nargs="+", metavar="NAME", help=help_text)
        elif f.type in ("bool",):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.type in ("int", "int | None"):
            p.add_argument(flag, type=int, metavar="N", help=help_text)
        elif f.type == "float":
            p.add_argument(flag, type=float, metavar="X", help=help_text)
        else:
            p.add_argument(flag, metavar=f.name.split("_")[-1].upper(), help=help_text)


def _train_config(
    args: argparse.Namespace, argv: list[str], cls: type[RunConfig] = ESConfig
) -> tuple[RunConfig, bool]:
    """Merge defaults < quickstart/config file < flags. Returns (config, is_quickstart).

    A config file may hold the settings of both trainers (one file for a matched ES/GRPO pair): the
    other trainer's own settings are ignored, with a note."""
    quickstart = not argv and cls is ESConfig
    values: dict[str, Any] = {}
    if quickstart:
        values.update(yaml.safe_load(QUICKSTART.read_text()))
    if args.config:
        values.update({k.replace("-", "_"): v for k, v in read_config_file(args.config).items()})
        # a run's own config.yaml also records which trainer wrote it and the resolved model folder
        wrote = values.pop("trainer", None)
        values.pop("model_path", None)
        mine = "es" if cls is ESConfig else "grpo"
        if wrote not in (None, mine):
            from esft.runs import TRAINERS

            have, command = TRAINERS.get(wrote, (f"a {wrote}", f"esft {wrote}"))
            raise ConfigError(f"{args.config} holds the settings of {have} run; start it with {command}")
        other = GRPORunConfig if cls is ESConfig else ESConfig
        ignored = [k for k in values if k in other.field_names() and k not in cls.field_names()]
        if ignored:
            print(f"esft: {args.config}: ignoring settings of the other trainer: {', '.join(ignored)}")
            values = {k: v for k, v in values.items() if k not in ignored}
    if getattr(args, "resume", False) and args.output and not args.config:
        # Resume reuses the run's own settings; flags may still change iterations and cadence.
        from esft.runstore import RunStore

        store = RunStore(args.output)
        if store.exists():
            values.update({k: v for k, v in store.read_config().items() if k in cls.field_names()})
    flags = {k: v for k, v in vars(args).items() if k in cls.field_names() and v is not None}
    if "task_options" in flags:
        flags["task_options"] = {
            **values.get("task_options", {}),
            **parse_task_options(flags["task_options"]),
        }
    if args.data:
        flags["task_options"] = {
            **flags.get("task_options", values.get("task_options", {})),
            "data_file": args.data,
        }
    values.update(flags)
    return cls.from_dict(values, args.config or "settings"), quickstart


def changed_most(first: dict, last: dict, k: int = 2) -> list[tuple[dict, dict]]:
    """The ``k`` example pairs (same prompt, before and after) whose reward changed most."""
    pairs = list(zip(first.get("examples", []), last.get("examples", []), strict=False))

    def change(pair: tuple[dict, dict]) -> float:
        d = abs(float(pair[1].get("reward", 0.0)) - float(pair[0].get("reward", 0.0)))
        return d if d == d else 0.0  # NaN: no change to show

    return sorted(pairs, key=change, reverse=True)[:k]


def clip(text: str, n: int) -> str:
    """``text`` on one line, cut to ``n`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    from esft.trainer import ESTrainer

    if args.resume and not args.output:
        raise ConfigError("--resume needs --output RUN_DIR, the folder of the run to continue")
    config, quickstart = _train_config(args, argv)
    if quickstart:
        print(
            "esft: no arguments, running the quickstart: ES on the conciseness task with the embedded "
            "Qwen2.5-Coder-0.5B-Instruct, evaluated on its training and held-out prompts before and after "
            "(a few minutes on 2 CPU cores). See `esft train --help`.",
            flush=True,
        )
    trainer = ESTrainer(
        config,
        resume=args.resume,
        progress=not args.quiet,
        allow_environment_change=args.allow_environment_change,
    )
    try:
        result = trainer.train()
    except KeyboardInterrupt:
        print(
            f"\nesft: interrupted. Continue with:  esft train --output {trainer.store.root} --resume",
            file=sys.stderr,
        )
        return 130
    print_result(result)
    return 0


def cmd_grpo(args: argparse.Namespace, argv: list[str]) -> int:
    from esft.grpo import GRPORun, training_states

    if args.resume and not args.output:
        raise ConfigError("--resume needs --output RUN_DIR, the folder of the run to continue")
    config, _ = _train_config(args, argv, GRPORunConfig)
    run = GRPORun(
        config,
        progress=not args.quiet,
        resume=args.resume,
        allow_environment_change=args.allow_environment_change,
    )
    try:
        result = run.train()
    except KeyboardInterrupt:
        hint = (
            f"esft grpo --output {run.store.root} --resume"
            if training_states(run.store.root)
            else "(no training state saved yet: --checkpoint-every N saves one every N steps)"
        )
        print(f"\nesft: interrupted. Continue with:  {hint}", file=sys.stderr)
        return 130
    print_result(result)
    return 0


def print_result(result) -> None:
    """The end of a training run: run folder, before/after per evaluated split, the final checkpoint."""
    from esft.evaluate import format_summary

    print(f"esft: done. Run folder: {result.run_dir}")
    for split in dict.fromkeys(row.get("split", "test") for row in result.eval_history):
        history = [row for row in result.eval_history if row.get("split", "test") == split]
        if len(history) < 2:
            continue
        name = {"train": "training prompts", "test": "held-out prompts"}.get(split, split)
        print(f"  {name} ({split} split):")
        for label, row in (("before", history[0]), ("after ", history[-1])):
            shown = {k: v for k, v in row.items() if k not in ("iteration", "split", "examples")}
            print(f"    {label} (iter {row['iteration']}): {format_summary(shown)}")
        for before, after in changed_most(history[0], history[-1]):
            print(f"    e.g. {clip(before['prompt'], 60)!r}")
            print(f"      before: {clip(before['completion'], 100)!r} ({before['reward']:.4g})")
            print(f"      after:  {clip(after['completion'], 100)!r} ({after['reward']:.4g})")
    if result.final_checkpoint:
        print(f"  final checkpoint (loads with transformers): {result.final_checkpoint}")
        print(f"  evaluate it:  esft eval --run {result.run_dir}")


def cmd_eval(args: argparse.Namespace) -> int:
    from esft.analysis.sources import build_task, run_checkpoint
    from esft.engines import build_engine
    from esft.evaluate import evaluate, format_summary
    from esft.models import resolve_model
    from esft.runstore import RunStore

    if args.run and args.model:
        raise ConfigError("give --model or --run, not both")
    saved: dict[str, Any] = {}
    if args.run:
        store = RunStore(args.run)
        saved = store.read_config()
        step, folder = run_checkpoint(store, args.checkpoint)
        model_path, label = str(folder), f"iter-{step:06d}"
        if args.max_new_tokens is None:
            args.max_new_tokens = saved.get("max_new_tokens")
    else:
        if args.checkpoint is not None:
            raise ConfigError("--checkpoint needs --run")
        model_path, label = resolve_model(args.model), "model"
    task_options = parse_task_options(args.task_option)
    if args.data:
        task_options["data_file"] = args.data
    task_name = args.task or saved.get("task")  # as build_task picks it
    task = build_task(task_name, [saved], task_options, args.reward, args.reward_weights)
    engine_name = saved.get("engine", "hf")
    dtype, device = args.dtype or saved.get("dtype", "auto"), args.device or saved.get("device", "auto")
    from esft import environment

    env = environment.read(args.run) if args.run else None
    mixed = None if args.dtype else environment.mixed_precision(env)  # a GRPO run in bf16, as it trained
    engine = build_engine(
        engine_name, model_path, dtype=dtype, device=device, batch_size=args.batch_size, autocast=mixed
    )
    if args.samples < 1:
        raise ConfigError("--samples must be >= 1")
    sampling = None
    if args.samples > 1 or args.temperature > 0:
        if args.temperature <= 0:
            raise ConfigError("--samples K > 1 needs sampling: also pass --temperature T (e.g. 0.7)")
        from esft.engines import Sampling

        sampling = Sampling(args.samples, args.temperature, args.top_p, args.seed)
    summary, samples = evaluate(
        engine, task, args.split, args.limit, args.max_new_tokens, args.batch_size, not args.quiet, sampling
    )
    out = (
        Path(args.output)
        if args.output
        else (
            Path(args.run) / "eval" / f"{label}-{task_name}-{args.split}.jsonl"
            if args.run
            else Path(f"eval-{task_name}-{args.split}.jsonl")
        )
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for s in samples:
            f.write(json.dumps(s, default=str) + "\n")
    print(f"{task_name}/{args.split} ({summary['samples']} prompts, {label}): {format_summary(summary)}")
    print(f"per-sample results: {out}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from esft.replay import compare_weights, replay
    from esft.runstore import RunStore

    store = RunStore(args.run)
    target = args.iteration
    # The replay is checked against the checkpoint of the iteration, else against the newest checkpoint
    # before it, which the replay passes on its way (checkpoints are a cache: replay rebuilds dropped
    # ones). With none at or before it, nothing is checked: say so and exit 3 (REPLAY_UNVERIFIED).
    checkpoints = store.checkpoints()
    check_at = max((t for t in checkpoints if t <= target), default=None)
    result: dict[str, tuple[bool, float]] = {}

    def check(t: int, engine: Any) -> None:
        if t == check_at:
            result["compared"] = compare_weights(engine.parameters(), checkpoints[t])

    engine, _ = replay(
        args.run,
        target,
        progress=not args.quiet,
        allow_environment_change=args.allow_environment_change,
        after=check,
    )
    out = Path(args.output) if args.output else store.root / "replay" / f"iter-{target:06d}"
    engine.save(out)
    print(f"replayed iteration {target} from the base model and the seed log: {out}")
    if check_at is None:
        later = ", ".join(str(t) for t in checkpoints)
        hint = (
            f"its checkpoints: {later}; replaying to one of them checks the seed log"
            if later
            else "it has none"
        )
        print(
            f"NOT VERIFIED: the run has no checkpoint at or before iteration {target} to compare the replay "
            f"with ({hint})"
        )
        return REPLAY_UNVERIFIED
    ckpt = checkpoints[check_at]
    where = (
        "" if check_at == target else f" (iteration {check_at}, the newest before {target}, which has none)"
    )
    same, diff = result["compared"]
    if same:
        print(f"matches checkpoint {ckpt}{where}: bit-identical")
        return 0
    why = (
        "different tensor names, shapes or dtypes" if diff == float("inf") else f"max abs difference {diff:g}"
    )
    print(f"DIFFERS from checkpoint {ckpt}{where}: {why}")
    return 1


def machine(engine) -> str:
    """What a speed figure was measured on: the GPU's name, or the CPU's model, flags and threads."""
    import torch

    from esft.dtypes import cpu_summary

    device = str(engine.device)
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_summary()}, {torch.get_num_threads()} threads"


def cmd_bench(args: argparse.Namespace) -> int:
    from esft.bench import format_table, run_bench
    from esft.engines import build_engine
    from esft.es.fused import FUSED
    from esft.models import resolve_model
    from esft.population import engine_options
    from esft.tasks import load_task

    if args.population < 2 or args.prompts_per_member < 1 or args.max_new_tokens < 1 or args.rank < 1:
        raise ConfigError("--population must be >= 2, --prompts-per-member, --max-new-tokens and --rank >= 1")
    task = load_task(args.task, **parse_task_options(args.task_option))
    lowrank = "lowrank" if "lowrank" in args.modes else ""
    engine = build_engine(
        args.engine,
        resolve_model(args.model),
        dtype=args.dtype,
        device=args.device,
        batch_size=args.batch_size,
        **engine_options(args.engine, lowrank, args.population, args.rank),
    )
    results = run_bench(
        engine,
        task,
        args.population,
        args.prompts_per_member,
        args.max_new_tokens,
        args.modes,
        args.sigma,
        args.freeze,
        args.rank,
        args.fixed_length,
        precision=args.update_precision,
        repeats=args.repeats,
    )
    info = {
        "model": args.model or "embedded",
        "task": args.task,
        "N": args.population,
        "prompts/member": len(task.train[: args.prompts_per_member]),
        "max_new_tokens": args.max_new_tokens,
        "fixed_length": args.fixed_length,
        "engine": args.engine,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "update": args.update_precision + (" (fused)" if FUSED.built() else ""),
        "machine": machine(engine),
    }
    reason = engine.dtype_reason
    if reason:
        print(f"esft: dtype {info['dtype']} ({reason})")
    print(format_table(results, info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esft", description="Evolution Strategies fine-tuning for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune with ES (no arguments: the quickstart)")
    p.add_argument("--config", help="YAML/TOML/JSON file of settings (flags override it)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output where it stopped")
    p.add_argument(
        "--allow-environment-change",
        action="store_true",
        help="resume although device, dtype, library versions, GPU or base weights changed (not bit-identical)",
    )
    p.add_argument("--data", help="dataset file for the task (shortcut for --task-option data_file=FILE)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-iteration lines")
    _add_config_flags(p)

    p = sub.add_parser(
        "grpo",
        help="fine-tune with GRPO (TRL's GRPOTrainer): the RL baseline, same tasks and run folder as ES",
    )
    p.add_argument("--config", help="YAML/TOML/JSON file of settings (flags override; ES-only ones ignored)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output from its newest training state (saved every --checkpoint-every steps)",
    )
    p.add_argument(
        "--allow-environment-change",
        action="store_true",
        help="resume although device, dtype, library versions, GPU or base weights changed",
    )
    p.add_argument("--data", help="dataset file for the task (shortcut for --task-option data_file=FILE)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-step lines")
    _add_config_flags(p, GRPORunConfig)

    p = sub.add_parser("eval", help="evaluate a model or a run's checkpoint on a task")
    p.add_argument("--model", help="HF id or folder (default: the embedded model)")
    p.add_argument("--run", help="run folder: evaluate its checkpoint")
    p.add_argument("--checkpoint", type=int, metavar="STEP", help="checkpoint iteration (default: newest)")
    p.add_argument("--task", help="task name (default with --run: the run's task)")
    p.add_argument("--task-option", action="append", metavar="KEY=VALUE", help="task option")
    p.add_argument("--data", help="dataset file for the task")
    p.add_argument(
        "--reward", action="append", help="reward function module:function or file.py:function (repeatable)"
    )
    p.add_argument("--reward-weights", type=float, nargs="+", metavar="W", help="one weight per reward part")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--limit", type=int, default=0, help="first K rows only (0 = all)")
    p.add_argument("--max-new-tokens", type=int, help="completion limit (default: the task's)")
    p.add_argument(
        "--samples", type=int, default=1, metavar="K", help="sampled completions per prompt (mean@K, pass@K)"
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy, the default)"
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", help="float32, bfloat16, float16 or auto")
    p.add_argument("--device", help="cpu, cuda or auto")
    p.add_argument("--output", help="per-sample JSONL path")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("bench", help="time one ES iteration against plain batched inference (the floor)")
    p.add_argument("--model", help="HF id or folder (default: the embedded model)")
    p.add_argument("--task", default="conciseness")
    p.add_argument("--task-option", action="append", metavar="KEY=VALUE")
    p.add_argument("--population", type=int, default=30)
    p.add_argument("--prompts-per-member", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument(
        "--modes",
        nargs="+",
        default=["reference", "table", "lowrank"],
        choices=list(BENCH_MODES),
        help="ES modes to time against the floor (default: reference table lowrank)",
    )
    p.add_argument("--rank", type=int, default=1, help="rank of the lowrank mode")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        metavar="K",
        help="K rounds of the floor then every mode; prints medians and each ratio's range (default 1)",
    )
    p.add_argument(
        "--update-precision",
        default="auto",
        choices=["auto", "master", "stochastic", "nearest"],
        help="how the ES modes' update reaches bf16/fp16 weights (as esft train; default auto)",
    )
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"], help="generation backend")
    p.add_argument(
        "--fixed-length",
        action="store_true",
        help="generate exactly --max-new-tokens per completion (EOS suppressed): identical token work",
    )
    p.add_argument("--sigma", type=float, default=1e-3)
    p.add_argument("--freeze", action="append", metavar="PATTERN", help="parameter-name pattern kept fixed")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)

    from esft.analysis import cli as analysis_cli

    analysis_cli.add_parser(sub)
    from esft.report import cli as report_cli

    report_cli.add_parser(sub)
    from esft.sweep import cli as sweep_cli

    sweep_cli.add_parser(sub)

    p = sub.add_parser(
        "replay",
        help="rebuild an iteration's weights from the base model and the seed log",
        description=(
            "Rebuild iteration T's weights from the base model and the seed log, and check them bit for bit "
            "against the run's checkpoint of T or, when T has none (checkpoints are a cache), against the "
            "newest checkpoint before T, which the replay passes on its way. Exit status: 0 bit-identical, "
            f"1 differs, 2 error, {REPLAY_UNVERIFIED} weights written but not verified (the run has no "
            "checkpoint at or before T)."
        ),
    )
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument(
        "--allow-environment-change",
        action="store_true",
        help="replay although device, dtype, torch, GPU or base weights changed (not bit-identical)",
    )
    p.add_argument("--iteration", type=int, required=True, help="iteration to rebuild")
    p.add_argument("--output", help="folder for the rebuilt model (default RUN/replay/iter-T)")
    p.add_argument("--quiet", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args, argv[1:])
        if args.command == "grpo":
            return cmd_grpo(args, argv[1:])
        if args.command == "analyze":
            from esft.analysis import cli as analysis_cli

            return analysis_cli.run(args)
        if args.command == "report":
            from esft.report import cli as report_cli

            return report_cli.run(args)
        if args.command == "sweep":
            from esft.sweep import cli as sweep_cli

            return sweep_cli.run(args)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "bench":
            return cmd_bench(args)
        return cmd_replay(args)
    except EsftError as e:
        print(f"esft: error: {e}", file=sys.stderr)
        return 2
