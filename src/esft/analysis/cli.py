"""``esft analyze``: what training did to the weights and to behaviour (see ``docs/analysis.md``).

``add_parser(subparsers)`` adds the ``analyze`` command with one sub-command per analysis; ``run(args)``
executes it and returns the exit code. Each sub-command prints tables and writes a JSON file
(``--json PATH``; by default RUN/analysis/<kind>-<label>.json when a run is given, else
./analysis-<kind>-<label>.json). This module never imports the trainers.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from esft.analysis import sources, tables
from esft.analysis.tables import fmt, table
from esft.errors import ConfigError
from esft.tasks import parse_task_options

MODEL_HELP = (
    "a run folder (its newest checkpoint; RUN@ITER for another, RUN@0 = its base), a checkpoint, or a model"
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``analyze`` and its sub-commands to an argparse ``subparsers`` object."""
    parser = subparsers.add_parser(
        "analyze",
        help="analyse what training did: weights, update similarity, KL drift, interpolation, forgetting, pass@k",
        description="Analyses of run folders and checkpoints (docs/analysis.md).",
    )
    sub = parser.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")

    p = sub.add_parser("weights", help="norm, relative norm, sparsity and |delta| histogram of an update")
    p.add_argument("model", metavar="MODEL_OR_RUN", help=MODEL_HELP)
    _base_flags(p)
    p.add_argument("--tau", type=float, default=None, help="sparsity threshold on |delta| (default 1e-6)")
    p.add_argument("--bins-per-decade", type=int, default=4, help="histogram resolution (default 4)")
    p.add_argument("--tensors", action="store_true", help="also print every tensor's row")
    _common(p)

    p = sub.add_parser("growth", help="ES update norm across a run's checkpoints vs alpha*sqrt(T*d/N)")
    p.add_argument("model", metavar="RUN", help="a run folder")
    p.add_argument("--base", help="base model folder (default: the run's model_path)")
    _common(p)

    p = sub.add_parser("cosine", help="cosine similarity of two updates of one base (global, per layer)")
    p.add_argument("model", metavar="A", help=MODEL_HELP)
    p.add_argument("other", metavar="B", help=MODEL_HELP)
    p.add_argument("--base", help="base model folder (default: A's run's model_path)")
    _common(p)

    p = sub.add_parser("kl", help="KL drift from the base model on task prompts (k1, k3 estimators)")
    p.add_argument("model", metavar="MODEL_OR_RUN", help=MODEL_HELP)
    _base_flags(p)
    p.add_argument(
        "--task", nargs="+", metavar="TASK", help="task(s) whose prompts to use (default: the run's)"
    )
    _task_flags(p, multi=True)
    p.add_argument("--samples", type=int, default=1, help="sampled completions per prompt (default 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--score-batch-size", type=int, default=8, help="sequences per teacher-forcing forward")
    _engine_flags(p)
    _common(p)

    p = sub.add_parser("interpolate", help="reward and KL along theta_A + lambda (theta_B - theta_A)")
    p.add_argument("model", metavar="A", help=f"{MODEL_HELP}; alone: interpolate from its base to it")
    p.add_argument(
        "other", metavar="B", nargs="?", help="second endpoint (default: A is the end, its base the start)"
    )
    _base_flags(p)
    p.add_argument("--task", help="task (default: the run's)")
    _task_flags(p)
    p.add_argument("--points", type=int, default=5, help="evenly spaced lambdas (plus 0 and 1; default 5)")
    p.add_argument("--range", nargs=2, type=float, default=[0.0, 1.0], metavar=("LOW", "HIGH"))
    p.add_argument("--kl-samples", type=int, default=1, help="samples per prompt for KL to A (0 = no KL)")
    p.add_argument("--temperature", type=float, default=1.0, help="KL sampling temperature")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--score-batch-size", type=int, default=8)
    _engine_flags(p)
    _common(p)

    p = sub.add_parser("forgetting", help="tasks evaluated at the base and every checkpoint of a run")
    p.add_argument("model", metavar="RUN", help="a run folder")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="tasks to evaluate (default: the run's)")
    _task_flags(p, multi=True)
    _engine_flags(p)
    _common(p)

    p = sub.add_parser("sequential", help="task x stage matrix of runs trained one after another")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders in training order (RUN@ITER allowed)")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="tasks (default: each run's task)")
    _task_flags(p, multi=True)
    _engine_flags(p)
    _common(p)

    p = sub.add_parser("passk", help="pass@k for k = 1..K and distinct correct answers, per model")
    p.add_argument("models", nargs="+", metavar="MODEL_OR_RUN", help=MODEL_HELP)
    p.add_argument("--task", help="task (default: the first run's)")
    _task_flags(p)
    p.add_argument("--samples", type=int, default=8, help="n: sampled completions per prompt (default 8)")
    p.add_argument("--max-k", type=int, help="largest k (default n)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--correct-reward",
        type=float,
        metavar="X",
        help="for tasks without an answer part: correct = reward >= X",
    )
    _engine_flags(p)
    _common(p)
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="JSON output (default: RUN/analysis/... or ./analysis-...)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _base_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", help="base model (default: the run's model_path)")
    p.add_argument("--checkpoint", type=int, metavar="ITER", help="checkpoint of the run (default: newest)")


def _task_flags(p: argparse.ArgumentParser, multi: bool = False) -> None:
    scope = " (applies to every task)" if multi else ""
    p.add_argument("--task-option", action="append", metavar="KEY=VALUE", help=f"task option{scope}")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--limit", type=int, default=0, help="first K prompts only (0 = all)")
    p.add_argument(
        "--max-new-tokens", type=int, help="completion limit (default: the run's, else the task's)"
    )


def _engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", help="float32, bfloat16, float16 or auto (default: the run's)")
    p.add_argument("--device", help="cpu, cuda or auto (default: the run's)")
    p.add_argument("--batch-size", type=int, default=64)


def run(args: argparse.Namespace) -> int:
    """Execute the parsed ``esft analyze`` command; 0 on success. User errors raise ConfigError."""
    handlers = {
        "weights": _weights,
        "growth": _growth,
        "cosine": _cosine,
        "kl": _kl,
        "interpolate": _interpolate,
        "forgetting": _forgetting,
        "sequential": _sequential,
        "passk": _passk,
    }
    return handlers[args.analysis](args)


# -- helpers -------------------------------------------------------------------------------------


def _engine(path: str, args: argparse.Namespace, config: dict[str, Any], run: Any = None):
    """The HF engine for ``path`` in the run's dtype: --dtype, else the dtype ``run`` recorded in its
    environment.json (``auto`` resolved where it trained), else its config's."""
    from esft import environment
    from esft.engines import build_engine

    env = (environment.read(run.root) or {}) if run is not None else {}
    dtype = args.dtype or env.get("dtype") or config.get("dtype") or "auto"
    device = args.device or config.get("device") or "auto"
    mixed = None if args.dtype else environment.mixed_precision(env)  # a GRPO run in bf16
    return build_engine("hf", path, dtype=dtype, device=device, batch_size=args.batch_size, autocast=mixed)


def _max_new(args: argparse.Namespace, task: Any) -> int:
    """--max-new-tokens, else the task's limit (a run's own task carries the run's limit)."""
    return int(args.max_new_tokens or task.max_new_tokens)


def _save(path: Path, data: dict[str, Any]) -> None:
    tables.write_json(path, data)
    print(f"\nwrote {path}")


def _group_rows(groups: dict[str, Any]) -> list[list[Any]]:
    return [[k, m.numel, m.norm, m.relative_norm, m.rms, m.sparsity, m.max_abs] for k, m in groups.items()]


def _histogram_rows(hist: Any, expected: list[float] | None) -> list[list[Any]]:
    """Bins from the first to the last one with a count (or an expected count >= 0.5)."""
    shown = [i for i, c in enumerate(hist.counts) if c or (expected and expected[i] >= 0.5)]
    if not shown:
        return []
    rows = []
    for i in range(min(shown), max(shown) + 1):
        lo, hi = hist.bins()[i]
        share = hist.counts[i] / hist.total if hist.total else None
        rows.append([f"[{lo:.3g}, {hi:.3g})", hist.counts[i], share, expected[i] if expected else None])
    return rows


# -- weights / growth / cosine ---------------------------------------------------------------------


def _weights(args: argparse.Namespace) -> int:
    from esft.analysis import randomwalk
    from esft.analysis.weights import DEFAULT_TAU, update_stats

    ref = sources.resolve(args.model, args.checkpoint)
    base = sources.local_folder(sources.base_of(ref, args.base))
    tuned = sources.local_folder(ref.path)
    tau = DEFAULT_TAU if args.tau is None else args.tau
    if tau < 0 or args.bins_per_decade < 1:
        raise ConfigError("--tau must be >= 0 and --bins-per-decade >= 1")
    stats = update_stats(base, tuned, tau, args.bins_per_decade, progress=not args.quiet)
    t = stats.total
    print(f"update {ref.label} - base {base}")
    print(f"sparsity = share of coordinates with |delta| <= tau = {tau:g}\n")
    headers = ["||delta||", "||theta_base||", "relative", "rms", "sparsity", "exact zero", "max |delta|"]
    values = [t.norm, t.base_norm, t.relative_norm, t.rms, t.sparsity, t.exact_zero, t.max_abs]
    changed = f"{len(stats.changed_tensors)}/{len(stats.tensors)} tensors, d={stats.changed_numel}"
    print(table([*headers, "changed"], [[*values, changed]]))
    headers = ["group", "numel", "||delta||", "relative", "rms", "sparsity", "max |delta|"]
    print("\nper layer\n" + table(headers, _group_rows(stats.layers)))
    print("\nper module type\n" + table(headers, _group_rows(stats.modules)))
    if args.tensors:
        print("\nper tensor\n" + table(["tensor", *headers[1:]], _group_rows(stats.tensors)))

    walk = None
    if ref.run is not None and ref.iteration and not ref.is_grpo:
        walk = randomwalk.for_run(ref.run, ref.iteration)
    expected = walk.expected_counts(stats.histogram, stats.changed_numel) if walk else None
    title = f"\n|delta| histogram over the changed tensors (d = {stats.changed_numel})"
    if walk:
        title += f"; expected: random walk, |delta_i| ~ |N(0, s^2)|, s = {walk.std:.4g} ({walk.source})"
    print(title)
    rows = _histogram_rows(stats.histogram, expected)
    print(table(["|delta| bin", "count", "share", "expected"], rows) if rows else "(no changed tensor)")
    data: dict[str, Any] = {"analysis": "weights", "model": ref.label, **stats.to_dict()}
    if walk:
        exp_norm = walk.expected_norm(stats.changed_numel)
        print(
            f"\nrandom walk: alpha={walk.alpha:g} N={walk.population} T={walk.iterations}: expected "
            f"||delta|| = {fmt(exp_norm)} (alpha*sqrt(T*d/N) for z-scores), observed/expected = "
            f"{fmt(t.norm / exp_norm if exp_norm else None)}"
        )
        data["random_walk"] = {
            **walk.to_dict(),
            "expected_norm": exp_norm,
            "observed_over_expected": t.norm / exp_norm if exp_norm else None,
            "expected_counts": expected,
        }
    elif ref.is_grpo:
        print("\n(GRPO run: no random-walk expectation)")
    _save(sources.output_path(args.json, "weights", ref, ref.label), data)
    return 0


def _growth(args: argparse.Namespace) -> int:
    from esft.analysis.randomwalk import growth

    ref = sources.resolve(args.model)
    if ref.run is None:
        raise ConfigError(f"{args.model} is not a run folder (no config.yaml)")
    base = sources.local_folder(sources.base_of(ref, args.base))
    result = growth(ref.run, base, progress=not args.quiet)
    print(f"update norm across {ref.run.root} (d = {result.trained_numel} trained coordinates)\n")
    rows = [
        [
            p.iteration,
            p.norm,
            p.relative_norm,
            p.expected_config,
            p.expected_seedlog,
            p.ratio,
            p.step_cosine,
            p.step_lost_fraction,
        ]
        for p in result.points
    ]
    print(
        table(
            [
                "iteration",
                "||theta_T - theta_0||",
                "relative",
                "alpha*sqrt(T*d/N)",
                "seed-log null",
                "ratio",
                "cos(intended)",
                "lost",
            ],
            rows,
        )
    )
    print("ratio = observed / expected under the random-walk null (> 1: updates kept a direction)")
    print(
        "cos(intended), lost = the checkpoint's update against the seed log's float32 update: cosine, and "
        "the share of the coordinates it moves that the checkpoint left unmoved (rounding)"
    )
    _save(sources.output_path(args.json, "growth", ref, ref.run.root.name), result.to_dict())
    return 0


def _cosine(args: argparse.Namespace) -> int:
    from esft.analysis.cosine import update_cosine

    a, b = sources.resolve(args.model), sources.resolve(args.other)
    if args.base:
        base = sources.base_of(a, args.base)
    else:
        base = sources.base_of(a, None)
        if b.base is not None and not sources.same_model(base, b.base):
            raise ConfigError(
                f"{a.label} and {b.label} were trained from different bases ({base} vs {b.base}); "
                "pass --base MODEL to measure both updates from one base"
            )
    result = update_cosine(
        sources.local_folder(base), sources.local_folder(a.path), sources.local_folder(b.path), not args.quiet
    )
    print(f"cos(delta_A, delta_B), A = {a.label}, B = {b.label}, base = {base}\n")
    t = result.total
    print(table(["", "cosine", "||delta_A||", "||delta_B||", "numel"], [["global", t.cosine, *_norms(t)]]))
    headers = ["group", "cosine", "||delta_A||", "||delta_B||", "numel"]
    print("\nper layer\n" + table(headers, [[k, d.cosine, *_norms(d)] for k, d in result.layers.items()]))
    print(
        "\nper module type\n" + table(headers, [[k, d.cosine, *_norms(d)] for k, d in result.modules.items()])
    )
    _save(sources.output_path(args.json, "cosine", a, a.label, b.label), result.to_dict())
    return 0


def _norms(d: Any) -> list[Any]:
    return [d.row()["norm_a"], d.row()["norm_b"], d.numel]


# -- behaviour: kl / interpolate -------------------------------------------------------------------


def _kl(args: argparse.Namespace) -> int:
    from esft.analysis.kl import ESTIMATOR, kl_drift
    from esft.engines import Sampling

    ref = sources.resolve(args.model, args.checkpoint)
    base_path = sources.base_of(ref, args.base)
    if args.samples < 1 or args.temperature <= 0:
        raise ConfigError("--samples must be >= 1 and --temperature > 0")
    options = parse_task_options(args.task_option)
    tasks = [sources.build_task(name, [ref.config], options) for name in (args.task or [None])]
    tuned = _engine(ref.path, args, ref.config, ref.run)
    base = _engine(base_path, args, ref.config, ref.run)
    sampling = Sampling(args.samples, args.temperature, 1.0, args.seed)
    rows, out = [], {}
    for task in tasks:
        prompts = [r["prompt"] for r in task.split(args.split)[: args.limit or None]]
        max_new = _max_new(args, task)
        est = kl_drift(tuned, base, prompts, max_new, sampling, args.score_batch_size, not args.quiet)
        out[task.name] = est.to_dict()
        numbers = [est.per_token_k1, est.per_token_k3, est.per_sequence_k1, est.per_sequence_k3]
        rows.append(
            [f"{task.name}/{args.split}", est.sequences, est.tokens, *numbers, est.per_sequence_k3_se]
        )
    print(f"KL({ref.label} || base {base_path}), temperature {args.temperature:g}, seed {args.seed}\n")
    print(
        table(["prompts", "seqs", "tokens", "k1/token", "k3/token", "k1/seq", "k3/seq", "k3/seq s.e."], rows)
    )
    print(f"estimator: {ESTIMATOR}")
    data = {
        "analysis": "kl",
        "model": ref.label,
        "base": base_path,
        "temperature": args.temperature,
        "seed": args.seed,
        "split": args.split,
        "tasks": out,
    }
    _save(sources.output_path(args.json, "kl", ref, ref.label, *(t.name for t in tasks)), data)
    return 0


def _interpolate(args: argparse.Namespace) -> int:
    from esft.analysis.interpolate import interpolate, lambda_grid
    from esft.engines import Sampling

    ref = sources.resolve(args.model, args.checkpoint)
    if args.other is None:
        start_path, end_path = sources.base_of(ref, args.base), ref.path
        start_label, end_label = "base", ref.label
    else:
        if args.base:
            raise ConfigError("--base is for one endpoint (base -> it); with A and B the path is A -> B")
        other = sources.resolve(args.other)
        start_path, end_path, start_label, end_label = ref.path, other.path, ref.label, other.label
    lambdas = lambda_grid(args.points, *args.range)
    task = sources.build_task(args.task, [ref.config], parse_task_options(args.task_option))
    start = sources.local_folder(start_path)
    end = sources.local_folder(end_path)
    engine = _engine(str(start), args, ref.config, ref.run)
    kl_sampling = Sampling(args.kl_samples, args.temperature, 1.0, args.seed) if args.kl_samples > 0 else None
    result = interpolate(
        engine, start, end, task, lambdas, split=args.split, limit=args.limit,
        max_new_tokens=_max_new(args, task), batch_size=args.batch_size, kl_sampling=kl_sampling,
        kl_batch_size=args.score_batch_size, progress=not args.quiet,
    )  # fmt: skip
    has_acc = all("accuracy" in p.summary for p in result.points)
    rows = []
    for p in result.points:
        row = [p.lam, p.summary["reward"]]
        row += [p.summary["accuracy"]] if has_acc else []
        row += [p.kl.per_token_k3, p.kl.per_sequence_k3] if p.kl else []
        rows.append(row)
    headers = ["lambda", "reward"] + (["accuracy"] if has_acc else [])
    headers += ["KL k3/token", "KL k3/seq"] if kl_sampling else []
    print(f"theta(lambda) = {start_label} + lambda ({end_label} - {start_label}); {task.name}/{args.split}\n")
    print(table(headers, rows))
    for metric, b in result.barriers().items():
        where = f" at lambda = {b['lambda']:g}" if b["lambda"] is not None else ""
        print(f"{metric} barrier (max drop below the endpoint line, 0<lambda<1): {fmt(b['drop'])}{where}")
    data = {"analysis": "interpolate", "a_label": start_label, "b_label": end_label, **result.to_dict()}
    _save(sources.output_path(args.json, "interpolate", ref, start_label, end_label, task.name), data)
    return 0


# -- forgetting / sequential -----------------------------------------------------------------------


def _matrix_table(matrix: Any) -> str:
    forgetting, change = matrix.forgetting(), matrix.change()
    headers = ["task (metric)", *matrix.stages, "forgetting", "change"]
    rows = [
        [f"{t} ({matrix.metric[t]})", *(matrix.values[s][t] for s in matrix.stages), forgetting[t], change[t]]
        for t in matrix.tasks
    ]
    return table(headers, rows)


def _forgetting(args: argparse.Namespace) -> int:
    from esft.analysis.forgetting import evaluate_stages

    ref = sources.resolve(args.model)
    if ref.run is None:
        raise ConfigError(f"{args.model} is not a run folder (no config.yaml)")
    options = parse_task_options(args.task_option)
    tasks = [sources.build_task(n, [ref.config], options) for n in (args.tasks or [None])]
    _unique(tasks)
    engine = _engine(ref.base, args, ref.config, ref.run)
    stages: list[tuple[str, Path | None]] = [("base", None)]
    stages += [(f"iter-{it}", folder) for it, folder in ref.run.checkpoints().items()]
    matrix = evaluate_stages(
        engine, stages, tasks, args.split, args.limit, args.max_new_tokens, args.batch_size, not args.quiet
    )
    matrix.models["base"] = ref.base
    print(f"{ref.run.root}: {args.split} split, greedy; value = accuracy if the task has one, else reward\n")
    print(_matrix_table(matrix))
    print("forgetting = best value before the last checkpoint - value at the last; change = last - base")
    _save(sources.output_path(args.json, "forgetting", ref, ref.run.root.name), matrix.to_dict())
    return 0


def _sequential(args: argparse.Namespace) -> int:
    from esft.analysis.forgetting import evaluate_stages

    refs = [sources.resolve(spec) for spec in args.runs]
    for r in refs:
        if r.run is None:
            raise ConfigError(f"{r.spec} is not a run folder (no config.yaml)")
    options = parse_task_options(args.task_option)
    configs = [r.config for r in refs]
    names = args.tasks or list(dict.fromkeys(c.get("task") for c in configs if c.get("task")))
    tasks = [sources.build_task(n, configs, options) for n in names]
    _unique(tasks)
    for prev, cur in zip(refs, refs[1:], strict=False):
        if not sources.same_model(cur.base, prev.path):
            print(
                f"note: {cur.label} started from {cur.base}, not from {prev.label}'s checkpoint {prev.path}"
            )
    engine = _engine(refs[0].base, args, refs[0].config, refs[0].run)
    labels = [
        r.label if [x.label for x in refs].count(r.label) == 1 else f"{i + 1}:{r.label}"
        for i, r in enumerate(refs)
    ]
    stages: list[tuple[str, Path | None]] = [("base", None)] + [
        (lab, Path(r.path)) for lab, r in zip(labels, refs, strict=True)
    ]
    matrix = evaluate_stages(
        engine, stages, tasks, args.split, args.limit, args.max_new_tokens, args.batch_size, not args.quiet
    )
    matrix.models["base"] = refs[0].base
    print(f"sequential training, stages in order; {args.split} split, greedy\n")
    print(_matrix_table(matrix))
    print("forgetting = best value at an earlier stage - value at the last stage; change = last - base")
    out = sources.output_path(args.json, "sequential", refs[-1], *(r.label for r in refs))
    _save(out, matrix.to_dict())
    return 0


def _unique(tasks: list[Any]) -> None:
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"tasks named twice: {' '.join(names)}")


# -- passk -----------------------------------------------------------------------------------------


def _passk(args: argparse.Namespace) -> int:
    from esft.analysis.passk import coverage
    from esft.engines import Sampling
    from esft.evaluate import evaluate

    refs = [sources.resolve(spec) for spec in args.models]
    if args.samples < 1 or args.temperature <= 0:
        raise ConfigError("--samples must be >= 1 and --temperature > 0 (pass@k needs sampling)")
    task = sources.build_task(args.task, [r.config for r in refs], parse_task_options(args.task_option))
    sampling = Sampling(args.samples, args.temperature, args.top_p, args.seed)
    results = []
    for r in refs:
        engine = _engine(r.path, args, r.config, r.run)
        max_new = _max_new(args, task)
        _, samples = evaluate(
            engine, task, args.split, args.limit, max_new, args.batch_size, not args.quiet, sampling
        )
        results.append(coverage(r.label, samples, args.samples, args.max_k, args.correct_reward))
        del engine
    ks = sorted(results[0].pass_at)
    print(
        f"{task.name}/{args.split}: n = {args.samples} samples per prompt, temperature {args.temperature:g}, "
        f"top_p {args.top_p:g}, seed {args.seed}; pass@k = mean over prompts of 1 - C(n-c,k)/C(n,k)\n"
    )
    print(
        table(
            ["model", *(f"pass@{k}" for k in ks)], [[c.model, *(c.pass_at[k] for k in ks)] for c in results]
        )
    )
    headers = ["model", "correct", "solved prompts", "distinct answers", "answer share", "completion share"]
    rows = [
        [c.model, c.correct_samples, c.solved_prompts, c.distinct_correct_answers, c.distinct_answer_share]
        + [c.distinct_completion_share, c.distinct_answers_per_solved]
        for c in results
    ]
    print("\n" + table([*headers, "answers/solved"], rows))
    print("share = distinct normalised correct answers (completions) / correct samples")
    data = {
        "analysis": "passk",
        "task": task.name,
        "split": args.split,
        "samples": args.samples,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "models": [c.to_dict() for c in results],
    }
    _save(sources.output_path(args.json, "passk", refs[0], task.name, *(r.label for r in refs)), data)
    return 0
