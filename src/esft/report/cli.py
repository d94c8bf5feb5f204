"""``esft report RUN [RUN...] --output DIR``: plots and one self-contained HTML page (``docs/report.md``).

``add_parser(subparsers)`` adds the command; ``run(args)`` builds the report and returns the exit code.
It reads run folders and analysis JSON only: no trainer is imported and no model is loaded. A plot
whose data is missing is skipped, and the page and the terminal say which ``esft analyze`` command
would produce it.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from esft.analysis.tables import write_json
from esft.errors import ConfigError
from esft.report.collect import Analysis, Run, by_kind, group_runs, load_analyses, load_runs

PLOT_NAMES = (
    "training_curves",
    "reward_vs_kl",
    "norm_growth",
    "layer_sparsity",
    "interpolation",
    "forgetting",
    "sequential",
    "pass_at_k",
    "cosine",
)
PAGE = "report.html"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``report`` to an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "report",
        help="PNG plots and one self-contained HTML page comparing runs (reads files only)",
        description=(
            "Plots (training curves with the spread over seeds, reward vs KL, norm growth, per-layer "
            "sparsity, interpolation, forgetting, pass@k) and one HTML page with them and the runs' "
            "configs side by side, from run folders and the JSON of esft analyze (docs/report.md)."
        ),
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="run folders (ES and GRPO alike), or sweep folders (esft sweep: best trials, parameter "
        "importance, objective against each parameter)",
    )
    p.add_argument(
        "--output", "-o", required=True, metavar="DIR", help="folder for the PNGs, report.html, report.json"
    )
    p.add_argument(
        "--analysis",
        nargs="+",
        action="extend",
        default=[],
        metavar="FILE",
        help="more analysis JSON files (written with esft analyze --json); RUN/analysis/*.json are always read",
    )
    p.add_argument("--title", help="page title (default: the run names)")
    p.add_argument(
        "--best",
        type=int,
        default=3,
        metavar="K",
        help="a sweep's K best trials join the report as runs (curves, configs, cost; default 3, 0: none)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Execute the parsed ``esft report`` command; 0 on success. User errors raise ConfigError."""
    result = build_report(args.runs, args.output, args.analysis, args.title, args.best)
    print_summary(result)
    return 0


def default_title(runs: list[Run], sweeps: list[Any] | None = None) -> str:
    names = [f"sweep {s.name}" for s in sweeps or []] + [r.display for r in runs]
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"esft report: {shown}"


def build_report(
    run_specs: list[str],
    output: str | Path,
    analysis_files: list[str] | None = None,
    title: str | None = None,
    best: int = 3,
) -> dict[str, Any]:
    """Read the runs, sweeps and analyses, write the PNGs, report.html and report.json into ``output``;
    returns what report.json holds. A sweep folder among ``run_specs`` adds its section, and its
    ``best`` best trials join the runs."""
    try:
        from esft.report import plots
        from esft.report.page import write_page
    except ImportError as e:  # pragma: no cover - matplotlib is a dependency of the report only
        raise ConfigError(f"esft report needs matplotlib ({e}): pip install -e '.[report]'") from None

    from esft.report import sweep as sweep_data
    from esft.sweep.layout import is_sweep

    if best < 0:
        raise ConfigError(f"--best must be >= 0, got {best}")
    sweeps = [sweep_data.load_sweep(s) for s in run_specs if is_sweep(s)]
    specs = [s for s in run_specs if not is_sweep(s)]
    specs += [str(p) for sw in sweeps for p in sweep_data.trial_runs(sw, best)]
    if not specs and not sweeps:
        raise ConfigError("no runs: esft report RUN [RUN...] --output DIR")
    runs = load_runs(specs) if specs else []
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {output} exists and is not a folder")
    analyses, notes = load_analyses(runs, analysis_files)
    groups = group_runs(runs)
    out.mkdir(parents=True, exist_ok=True)

    made = [
        plots.training_curves(groups, out),
        plots.reward_vs_kl(by_kind(analyses, "kl"), runs, out),
        plots.norm_growth(by_kind(analyses, "growth"), runs, out),
        plots.layer_stats(by_kind(analyses, "weights"), out),
        plots.interpolation(by_kind(analyses, "interpolate"), out),
        plots.forgetting(by_kind(analyses, "forgetting"), out),
        plots.sequential(by_kind(analyses, "sequential"), out),
        plots.pass_at_k(by_kind(analyses, "passk"), out),
        plots.cosine(by_kind(analyses, "cosine"), out),
    ]
    produced = [p for p in made if p is not None]
    for name in PLOT_NAMES:  # a plot skipped now must not leave last time's PNG behind
        if name not in {p.name for p in produced}:
            (out / f"{name}.png").unlink(missing_ok=True)
    for p in produced:
        notes += p.details.get("notes", [])
    sweep_plots = [
        (
            sw,
            [
                p
                for p in (
                    plots.sweep_history(sw, out),
                    plots.sweep_importance(sw, out),
                    plots.sweep_params(sw, out),
                    plots.sweep_intermediate(sw, out),
                )
                if p is not None
            ],
        )
        for sw in sweeps
    ]
    drawn = {p.png.name for _, ps in sweep_plots for p in ps}
    for png in out.glob(f"{plots.SWEEP_PREFIX}*.png"):
        if png.name not in drawn:
            png.unlink()
    missing = missing_analyses(runs, analyses)
    title = title or default_title(runs, sweeps)
    page = write_page(out / PAGE, title, runs, groups, produced, missing, notes, sweep_plots)
    result = {
        "title": title,
        "page": str(page),
        "sweeps": [sweep_json(sw, ps) for sw, ps in sweep_plots],
        "runs": [
            {"name": r.display, "path": str(r.path), "trainer": r.trainer, "task": r.task, "cost": r.cost()}
            for r in runs
        ],
        "groups": [
            {"label": g.label, "trainer": g.trainer, "task": g.task, "runs": [r.display for r in g.runs]}
            | {"differs": g.differs}
            for g in groups
        ],
        "plots": [
            {"name": p.name, "title": p.title, "png": str(p.png), "caption": p.caption, "sources": p.sources}
            | {"details": p.details}
            for p in produced
        ],
        "missing": missing,
        "notes": notes,
        "analysis_files": [
            {"path": str(a.path), "kind": a.kind, "runs": [r.display for r in a.runs]} for a in analyses
        ],
    }
    write_json(out / "report.json", result)
    return result


def sweep_json(sweep: Any, plots: list[Any]) -> dict[str, Any]:
    """What report.json says about a sweep."""
    return {
        "name": sweep.name,
        "path": str(sweep.path),
        "method": sweep.method,
        "metric": sweep.metric,
        "direction": sweep.direction,
        "n_trials": sweep.n_trials,
        "states": sweep.states(),
        "best": [
            {"trial": t.number, "value": t.value, "params": t.params, "derived": t.derived}
            | {"run": str(t.run_dir) if t.run_dir else None, "iterations": t.iterations}
            for t in sweep.best()
        ],
        "importance": sweep.importance,
        "importance_note": sweep.importance_note,
        "plots": [{"name": p.name, "png": str(p.png), "details": p.details} for p in plots],
    }


def print_summary(result: dict[str, Any]) -> None:
    runs, groups = result["runs"], result["groups"]
    for sw in result.get("sweeps", []):
        best = sw["best"][0] if sw["best"] else None
        states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(sw["states"].items()))
        top = f"; best trial {best['trial']}: {sw['metric']} {best['value']:.4g}" if best else ""
        print(f"esft report: sweep {sw['name']} ({states}){top}")
        if sw["importance"]:
            ranked = sorted(sw["importance"].items(), key=lambda kv: -kv[1])
            print("  importance: " + ", ".join(f"{k} {v:.2f}" for k, v in ranked))
        elif sw["importance_note"]:
            print(f"  {sw['importance_note']}")
    print(f"esft report: {len(runs)} runs in {len(groups)} groups -> {result['page']}")
    for g in groups:
        print(f"  {g['label']}: {', '.join(g['runs'])}")
    print("plots:")
    for p in result["plots"]:
        print(f"  {Path(p['png']).name:<22} from {len(p['sources'])} file(s)")
    if result["missing"]:
        print(f"missing ({len(result['missing'])}):")
        for m in result["missing"]:
            print(f"  {m['plot']}: {m['what']}")
            if m.get("command"):
                print(f"    {m['command']}")
    for n in result["notes"]:
        print(f"note: {n}")


# -- what is missing, and the command that makes it ------------------------------------------------


def _cmd(*words: str) -> str:
    return " ".join(shlex.quote(w) for w in words)


def missing_analyses(runs: list[Run], analyses: list[Analysis]) -> list[dict[str, str]]:
    """What each plot lacks, per run, with the exact command that would produce it (empty when no
    command can: e.g. evaluations happen during training)."""
    out: list[dict[str, str]] = []

    def add(plot: str, what: str, command: str = "") -> None:
        out.append({"plot": plot, "what": what, "command": command})

    def covered(kind: str, run: Run) -> bool:
        return any(run in a.runs for a in by_kind(analyses, kind))

    for r in runs:
        if not r.metrics:
            add("training curves", f"{r.display}: metrics.jsonl has no rows (the run has not trained yet)")
        elif not r.has_samples:
            add("training curves", f"{r.display}: metrics.jsonl has no 'samples' column (an older run)")
        if not any(e.get("split", "test") == "test" for e in r.evals):
            add(
                "training curves (held-out)",
                f"{r.display}: no test-split evaluation in eval.jsonl; train with --eval-every K",
            )

    tasks = list(dict.fromkeys(r.task for r in runs))
    per_run = [
        ("reward vs KL", "kl", "KL analysis", lambda r: _cmd("esft", "analyze", "kl", r.spec)),
        ("norm growth", "growth", "growth analysis", lambda r: _cmd("esft", "analyze", "growth", r.spec)),
        (
            "per-layer sparsity",
            "weights",
            "weights analysis",
            lambda r: _cmd("esft", "analyze", "weights", r.spec),
        ),
        (
            "interpolation",
            "interpolate",
            "interpolation",
            lambda r: _cmd("esft", "analyze", "interpolate", r.spec),
        ),
        (
            "forgetting",
            "forgetting",
            "forgetting analysis",
            lambda r: _cmd("esft", "analyze", "forgetting", r.spec, "--tasks", *tasks),
        ),
    ]
    for plot, kind, what, command in per_run:
        for r in runs:
            if covered(kind, r):
                continue
            if not r.checkpoints:
                add(plot, f"{r.display}: no {what}, and the run has no checkpoint to analyse")
            else:
                add(plot, f"{r.display}: no {what}", command(r))

    # pass@k: one command per task over its runs and the first run's base
    passk_tasks = {a.data.get("task") for a in by_kind(analyses, "passk")}
    for task in tasks:
        task_runs = [r for r in runs if r.task == task and r.checkpoints]
        if task in passk_tasks or not task_runs:
            continue
        words = ["esft", "analyze", "passk", f"{task_runs[0].spec}@0", *(r.spec for r in task_runs)]
        words += ["--task", task, "--samples", "8"]
        has_answer = any("train/accuracy" in row for r in task_runs for row in r.metrics[:1])
        what = f"no pass@k analysis for {task}"
        if not has_answer:
            words += ["--correct-reward", "X"]
            what += f" ({task} has no answer part: choose the reward X that counts as correct)"
        add("pass@k", what, _cmd(*words))

    # update similarity: the first ES and the first GRPO run of each task
    for task in tasks:
        es = [r for r in runs if r.task == task and r.trainer == "es" and r.checkpoints]
        grpo = [r for r in runs if r.task == task and r.trainer == "grpo" and r.checkpoints]
        done = any(
            a.runs and set(a.runs) & set(es) and set(a.runs) & set(grpo) for a in by_kind(analyses, "cosine")
        )
        if es and grpo and not done:
            add(
                "update similarity",
                f"no cosine analysis of an ES and a GRPO update on {task}",
                _cmd("esft", "analyze", "cosine", es[0].spec, grpo[0].spec),
            )
    return out
