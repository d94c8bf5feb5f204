"""One function per plot: each draws from collected data with matplotlib (Agg, no display), writes a PNG
into the output folder and returns a :class:`Plot` saying what it drew and from which files, or None
when its data is missing (the caller lists what would produce it).

Figures are built with ``matplotlib.figure.Figure`` and an Agg canvas, never pyplot, so nothing global
(an interactive backend, open figures) is touched. All figures are 12 inches wide so they line up on the
page.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from esft.analysis.naming import layer_order
from esft.analysis.tables import fmt
from esft.report.collect import Analysis, Group, Run, finite, run_for_label

WIDTH = 12.0  # inches; 100 dpi -> 1200 px
DPI = 100
TRAINER_COLORS = {"es": "#1f77b4", "grpo": "#d62728"}
BASE_COLOR = "#7f7f7f"
STYLE = {
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "font.size": 10,
    "axes.titlesize": 11,
    "legend.fontsize": 8,
    "legend.frameon": False,
}


@dataclass
class Plot:
    name: str  # file stem: <name>.png
    title: str
    caption: str
    png: Path
    sources: list[str]  # files the plot was drawn from
    details: dict[str, Any] = field(default_factory=dict)  # what was drawn (for report.json and tests)


def _color(i: int) -> str:
    return f"C{i % 10}"


def _figure(ncols: int, height: float = 4.2, nrows: int = 1, width: float = WIDTH):
    fig = Figure(figsize=(width, height * nrows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _grid(n: int, height: float = 4.2):
    """A figure of ``n`` panels, at most three per row, the unused cells of the last row hidden."""
    ncols = min(n, 3)
    fig, axes = _figure(ncols, height=height, nrows=math.ceil(n / ncols))
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _save(fig: Figure, out: Path, name: str) -> Path:
    path = out / f"{name}.png"
    fig.savefig(path, dpi=DPI)
    return path


def _num(value: Any) -> float | None:
    return float(value) if finite(value) else None


def _nan(value: Any) -> float:
    """A finite number as float, anything else (None, null, NaN) as NaN: a gap in a line."""
    return float(value) if finite(value) else math.nan


def _legend(ax) -> None:
    """A legend when the axes has labelled artists (matplotlib warns on an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")


def _shared_legend(fig: Figure, axes: list[Any], ncols: int = 3) -> None:
    """One legend under all panels (each label once), for panels that draw the same series."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncols=min(len(seen), ncols))


def _layer_ticks(ax, layers: list[str]) -> None:
    """x ticks for layer groups: block numbers (every n-th when there are many) and short names for the
    embedding, the final norm and the output head."""
    short = {"embed": "emb", "norm": "norm", "lm_head": "head", "other": "other"}
    blocks = sum(g.startswith("layers.") for g in layers)
    step = max(1, math.ceil(blocks / 16))
    labels = []
    for g in layers:
        if g.startswith("layers."):
            i = int(g.removeprefix("layers."))
            labels.append(str(i) if i % step == 0 else "")
        else:
            labels.append(short.get(g, g))
    ax.set_xticks(range(len(layers)), labels)
    for g, tick in zip(layers, ax.get_xticklabels(), strict=True):
        if not g.startswith("layers."):  # upright names would overlap their neighbours
            tick.set_rotation(90)
    ax.set_xlabel("transformer layer")


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666666", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


# -- 1. training curves ----------------------------------------------------------------------------


def seed_band(series: Sequence[tuple[Sequence[float], Sequence[float]]]):
    """Mean, min and max over seeds on a shared x grid: the union of the seeds' x values inside the
    range every seed covers, each seed linearly interpolated onto it. Returns (x, mean, lo, hi) arrays,
    or None when the seeds share no x range."""
    series = [(np.asarray(x, float), np.asarray(y, float)) for x, y in series if len(x)]
    if not series:
        return None
    lo_x = max(x.min() for x, _ in series)
    hi_x = min(x.max() for x, _ in series)
    grid = np.unique(np.concatenate([x for x, _ in series]))
    grid = grid[(grid >= lo_x) & (grid <= hi_x)]
    if grid.size == 0:
        return None
    ys = np.stack([np.interp(grid, x[np.argsort(x)], y[np.argsort(x)]) for x, y in series])
    return grid, ys.mean(0), ys.min(0), ys.max(0)


def _draw_groups(ax, groups: list[Group], get, marker: str | None = None) -> list[dict[str, Any]]:
    drawn = []
    for i, g in enumerate(groups):
        series = [get(r) for r in g.runs]
        used = [r.display for r, s in zip(g.runs, series, strict=True) if len(s[0])]
        band = seed_band([s for s in series if len(s[0])])
        if band is None:
            continue
        x, mean, lo, hi = band
        ax.plot(x, mean, color=_color(i), lw=1.8, marker=marker, ms=4, label=g.label)
        spread = len(used) > 1
        if spread:
            ax.fill_between(x, lo, hi, color=_color(i), alpha=0.18, lw=0)
        drawn.append({"group": g.label, "runs": used, "band": spread, "points": int(x.size)})
    return drawn


def training_curves(groups: list[Group], out: Path) -> Plot | None:
    """Training reward (left) and held-out evaluation reward (right) against samples generated, one
    line per group of seeds (mean) with the min-max band over its seeds."""
    if not any(len(r.series("train/reward_mean")[0]) for g in groups for r in g.runs):
        return None
    with rc_context(STYLE):
        fig, (ax_train, ax_eval) = _figure(2)
        train = _draw_groups(ax_train, groups, lambda r: r.series("train/reward_mean"))
        ax_train.set(
            title="training reward (population / group mean)", xlabel="samples generated", ylabel="reward"
        )
        _legend(ax_train)
        evals = _draw_groups(ax_eval, groups, lambda r: r.eval_series("reward", "test"), marker="o")
        if evals:
            ax_eval.set(
                title="held-out reward (greedy, test split)", xlabel="samples generated", ylabel="reward"
            )
            _legend(ax_eval)
        else:
            ax_eval.set_title("held-out reward (greedy, test split)")
            _note(ax_eval, "no test-split evaluations in eval.jsonl\n(train with --eval-every K)")
        path = _save(fig, out, "training_curves")
    runs = [r for g in groups for r in g.runs]
    sources = [str(r.path / "metrics.jsonl") for r in runs if r.metrics]
    sources += [str(r.path / "eval.jsonl") for r in runs if r.evals]
    bands = sum(d["band"] for d in train)
    return Plot(
        "training_curves",
        "Training curves",
        "Reward against the sample budget (completions generated for training, the unit ES and GRPO "
        "share). Lines: mean over the seeds of a group (runs whose configs differ only in seed); bands: "
        "min to max over those seeds. Right: greedy reward on the held-out test split from eval.jsonl "
        "(iteration 0 = before training, at 0 samples).",
        path,
        sources,
        {"train": train, "eval": evals, "bands": bands},
    )


# -- 2. reward vs KL -------------------------------------------------------------------------------


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both low KL (x) and high reward (y), by KL."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def kl_points(docs: list[Analysis], runs: list[Run]) -> tuple[list[dict[str, Any]], list[str]]:
    """One point per KL analysis of a run's checkpoint: KL per token on the run's own task (k1, k3) and
    the run's greedy test reward at that checkpoint. Returns (points, notes on what was left out)."""
    points, notes = [], []
    owner: dict[str, Run] = {}  # point label -> its run
    for a in docs:
        label = a.data.get("model")
        found = run_for_label(label, runs, near=a.path)
        tasks = a.data.get("tasks") or {}
        if found is None:
            notes.append(f"{a.path.name}: {label} is not a checkpoint of a run in this report")
            continue
        run, it = found
        if run.task not in tasks:  # off-task drift (e.g. forgetting) is not this run's reward-KL trade-off
            notes.append(f"{a.path.name}: KL on {', '.join(tasks) or 'no task'}, not on {run.task}: left out")
            continue
        task = run.task
        est = tasks.get(task)
        k3 = _num((est or {}).get("per_token_k3"))
        k1 = _num((est or {}).get("per_token_k1"))
        reward = run.eval_at(it)
        if k3 is None or reward is None:
            why = "no KL estimate" if k3 is None else f"no test evaluation at iteration {it} in eval.jsonl"
            notes.append(f"{a.path.name}: {label}: {why}")
            continue
        trainer = "base" if it == 0 else run.trainer
        label = f"{run.display or run.name}@{it}"  # unique on the page, as the run's other series
        owner[label] = run
        points.append(
            {"label": label, "trainer": trainer, "task": task, "k3": k3, "k1": k1, "reward": reward}
            | {"file": str(a.path), "iteration": it, "base": str(run.config.get("model_path"))}
            | {"eval": str(run.path / "eval.jsonl")}
        )
    # the base model itself: KL 0 by definition, reward = the runs' evaluation before training
    bases = {(p["base"], p["task"]) for p in points if p["iteration"] == 0}
    for label in dict.fromkeys(p["label"] for p in points):
        run = owner[label]
        key = (str(run.config.get("model_path")), run.task)
        reward = run.eval_at(0)
        if key not in bases and reward is not None:
            bases.add(key)
            points.append(
                {"label": f"base ({run.task})", "trainer": "base", "task": run.task, "k3": 0.0, "k1": 0.0}
                | {
                    "reward": reward,
                    "file": "",
                    "iteration": 0,
                    "base": key[0],
                    "eval": str(run.path / "eval.jsonl"),
                }
            )
    return points, notes


def reward_vs_kl(docs: list[Analysis], runs: list[Run], out: Path) -> Plot | None:
    """Held-out reward against KL(p_ft || p_base) per token (k3 left, k1 right), one point per analysed
    checkpoint, coloured by trainer, with the Pareto front (lower KL, higher reward)."""
    points, notes = kl_points(docs, runs)
    if not points:
        return None
    fronts = {}
    with rc_context(STYLE):
        fig, axes = _figure(2)
        for ax, key in zip(axes, ("k3", "k1"), strict=True):
            pts = [p for p in points if p[key] is not None]
            for trainer in dict.fromkeys(p["trainer"] for p in pts):
                sel = [p for p in pts if p["trainer"] == trainer]
                ax.scatter(
                    [p[key] for p in sel],
                    [p["reward"] for p in sel],
                    color=TRAINER_COLORS.get(trainer, BASE_COLOR),
                    label=trainer.upper() if trainer != "base" else "base (iteration 0)",
                    s=36,
                    zorder=3,
                )
            for p in pts:
                ax.annotate(
                    p["label"], (p[key], p["reward"]), fontsize=7, xytext=(4, 3), textcoords="offset points"
                )
            front = pareto_front([(p[key], p["reward"]) for p in pts])
            fronts[key] = [pts[i]["label"] for i in front]
            if front:  # a staircase, carried on to the largest KL so a one-point front shows too
                xmax = max(p[key] for p in pts)
                ax.step(
                    [pts[i][key] for i in front] + [xmax],
                    [pts[i]["reward"] for i in front] + [pts[front[-1]]["reward"]],
                    where="post",
                    color="black",
                    lw=1,
                    ls="--",
                    label="Pareto front",
                    zorder=2,
                )
            ax.set(
                title=f"held-out reward vs KL ({key} per token)",
                xlabel=f"KL(fine-tuned || base), {key} per token",
                ylabel="greedy test reward",
            )
            _legend(ax)
        path = _save(fig, out, "reward_vs_kl")
    return Plot(
        "reward_vs_kl",
        "Reward vs KL",
        "Greedy held-out reward (eval.jsonl, at the checkpoint's iteration) against the KL drift from the "
        "base model per completion token (esft analyze kl; k3 is never negative, k1 is the plain log "
        "ratio). The base model sits at KL 0 with the runs' reward before training. Dashed: the Pareto front, the checkpoints no other one beats on both lower KL and higher "
        "reward.",
        path,
        sorted({p["file"] for p in points if p["file"]}) + sorted({p["eval"] for p in points}),
        {"points": points, "front": fronts, "notes": notes},
    )


# -- 3. norm growth --------------------------------------------------------------------------------


def norm_growth(docs: list[Analysis], runs: list[Run], out: Path) -> Plot | None:
    """||theta_T - theta_0|| at each checkpoint T against the random-walk expectation alpha sqrt(T d/N)
    (dashed; x: the exact seed-log value), and their ratio."""
    docs = [a for a in docs if any(_num(p.get("norm")) is not None for p in a.data.get("points") or [])]
    if not docs:
        return None
    lines, handles = [], []
    with rc_context(STYLE):
        fig, (ax, ax_ratio) = _figure(2)
        for i, a in enumerate(docs):
            pts = sorted(
                (p for p in a.data["points"] if _num(p.get("norm")) is not None), key=lambda p: p["iteration"]
            )
            label = a.runs[0].display if a.runs else Path(str(a.data.get("run", a.path.stem))).name
            t = np.array([0.0] + [p["iteration"] for p in pts])  # theta_0 is the base: 0 at T = 0
            ax.plot(t, [0.0] + [p["norm"] for p in pts], color=_color(i), marker="o", ms=4, lw=1.8)
            handles.append(Line2D([], [], color=_color(i), lw=1.8, label=label))
            cfg = [(p["iteration"], p["expected_config"]) for p in pts if _num(p.get("expected_config"))]
            if cfg:  # alpha sqrt(T d / N) = c sqrt(T): draw the whole curve
                c = cfg[-1][1] / math.sqrt(cfg[-1][0])
                tt = np.linspace(0, t.max(), 100)
                ax.plot(tt, c * np.sqrt(tt), color=_color(i), ls="--", lw=1.2)
            log = [(p["iteration"], p["expected_seedlog"]) for p in pts if _num(p.get("expected_seedlog"))]
            if log:
                ax.scatter(*zip(*log, strict=True), color=_color(i), marker="x", s=40, zorder=3)
            ratio = [(p["iteration"], p["ratio"]) for p in pts if _num(p.get("ratio"))]
            if ratio:
                ax_ratio.plot(*zip(*ratio, strict=True), color=_color(i), marker="o", lw=1.5, label=label)
            lines.append(
                {"run": label, "points": len(pts), "expected": bool(cfg or log), "file": str(a.path)}
            )
        ax.set(title="update norm across checkpoints", xlabel="iteration T", ylabel="||theta_T - theta_0||")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        handles += [
            Line2D([], [], color="black", marker="o", ms=4, lw=1.8, label="measured"),
            Line2D([], [], color="black", ls="--", lw=1.2, label="alpha*sqrt(T*d/N)"),
            Line2D([], [], color="black", marker="x", ls="none", label="seed-log null"),
        ]
        ax.legend(handles=handles, loc="best")
        if ax_ratio.lines:
            ax_ratio.axhline(1.0, color="black", lw=1, ls=":")
            ax_ratio.set(title="measured / random-walk expectation", xlabel="iteration T", ylabel="ratio")
            _legend(ax_ratio)
        else:
            ax_ratio.set_title("measured / random-walk expectation")
            _note(ax_ratio, "no random-walk expectation\n(GRPO runs have none)")
        path = _save(fig, out, "norm_growth")
    return Plot(
        "norm_growth",
        "Norm growth",
        "Distance from the base weights at every kept checkpoint (esft analyze growth), against what an "
        "update with no information in the rewards would give: a random walk, ||delta|| = "
        "alpha*sqrt(T*d/N) (dashed; crosses: the exact value from the seed log). A ratio above 1 means "
        "the updates kept a direction; about 1 is noise alone.",
        path,
        [str(a.path) for a in docs],
        {"lines": lines},
    )


# -- 4. per-layer sparsity and relative norm -------------------------------------------------------


def layer_stats(docs: list[Analysis], out: Path) -> Plot | None:
    """Per-layer sparsity (share of |delta| <= tau) and relative norm ||delta|| / ||theta_base||, one
    line per analysed checkpoint."""
    docs = [a for a in docs if isinstance(a.data.get("layers"), dict) and a.data["layers"]]
    if not docs:
        return None
    layers = sorted({k for a in docs for k in a.data["layers"]}, key=layer_order)
    x = np.arange(len(layers))
    taus = sorted({fmt(a.data.get("tau")) for a in docs})
    with rc_context(STYLE):
        fig, (ax_s, ax_r) = _figure(2, height=4.6)
        rel_values, rel_lines = [], []
        for i, a in enumerate(docs):
            rows = a.data["layers"]
            label = str(a.data.get("model", a.path.stem))
            sparsity = [_nan((rows.get(k) or {}).get("sparsity")) for k in layers]
            rel = [_nan((rows.get(k) or {}).get("relative_norm")) for k in layers]
            rel_values += [v for v in rel if v > 0]
            style = {"color": _color(i), "marker": "o", "ms": 4, "lw": 1.5, "label": label}
            ax_s.plot(x, sparsity, **style)
            rel_lines.append(ax_r.plot(x, rel, **style)[0])
        ax_s.set(title=f"sparsity per layer (share of |delta| <= tau = {', '.join(taus)})", ylabel="sparsity")
        ax_s.set_ylim(-0.03, 1.03)
        ax_r.set(title="relative norm per layer", ylabel="||delta|| / ||theta_base||")
        if rel_values and max(rel_values) / min(rel_values) > 20:
            ax_r.set_yscale("log")
            for line in rel_lines:  # an unchanged layer (0) has no place on a log axis: a gap
                y = np.asarray(line.get_ydata(), float)
                line.set_ydata(np.where(y > 0, y, np.nan))
        for ax in (ax_s, ax_r):
            _layer_ticks(ax, layers)
        _shared_legend(fig, [ax_s], ncols=4)
        path = _save(fig, out, "layer_sparsity")
    return Plot(
        "layer_sparsity",
        "Per-layer sparsity and relative norm",
        "Per transformer layer (and the embedding, final norm and output head) of the update delta = "
        "checkpoint - base (esft analyze weights): the share of coordinates that did not move "
        "(|delta| <= tau) and the update's size relative to the base weights.",
        path,
        [str(a.path) for a in docs],
        {"models": [a.data.get("model") for a in docs], "layers": layers},
    )


# -- 5. interpolation ------------------------------------------------------------------------------


def interpolation(docs: list[Analysis], out: Path) -> Plot | None:
    """Reward (and accuracy) and KL to the start along theta_A + lambda (theta_B - theta_A)."""
    docs = [a for a in docs if isinstance(a.data.get("points"), list) and a.data["points"]]
    if not docs:
        return None
    has_acc = any(finite(p.get("accuracy")) for a in docs for p in a.data["points"])
    has_kl = any(
        isinstance(p.get("kl"), dict) and finite(p["kl"].get("per_token_k3"))
        for a in docs
        for p in a.data["points"]
    )
    panels = ["reward"] + (["accuracy"] if has_acc else []) + (["kl"] if has_kl else [])
    curves = []
    with rc_context(STYLE):
        fig, axes = _figure(len(panels))
        ax_of = dict(zip(panels, axes, strict=True))
        for i, a in enumerate(docs):
            pts = sorted(a.data["points"], key=lambda p: p["lambda"])
            lam = [p["lambda"] for p in pts]
            label = (
                f"{a.data.get('a_label', 'A')} -> {a.data.get('b_label', 'B')} ({a.data.get('task', '?')})"
            )
            style = {"color": _color(i), "marker": "o", "ms": 4, "lw": 1.6, "label": label}
            ax_of["reward"].plot(lam, [_nan(p.get("reward")) for p in pts], **style)
            if has_acc:
                ax_of["accuracy"].plot(lam, [_nan(p.get("accuracy")) for p in pts], **style)
            if has_kl:
                ax_of["kl"].plot(lam, [_nan((p.get("kl") or {}).get("per_token_k3")) for p in pts], **style)
            drop = ((a.data.get("barriers") or {}).get("reward") or {}).get("drop")
            curves.append({"label": label, "points": len(pts), "reward_barrier": drop, "file": str(a.path)})
        titles = {
            "reward": ("greedy reward", "reward"),
            "accuracy": ("accuracy", "accuracy"),
            "kl": ("KL(p_lambda || p_A), k3 per token", "KL per token"),
        }
        for name, ax in ax_of.items():
            for edge in (0.0, 1.0):
                ax.axvline(edge, color="black", lw=0.8, ls=":")
            title, ylabel = titles[name]
            ax.set(title=title, xlabel="lambda  (0 = A, 1 = B)", ylabel=ylabel)
        _shared_legend(fig, [ax_of["reward"]], ncols=2)
        path = _save(fig, out, "interpolation")
    barriers = ", ".join(f"{c['label']}: {fmt(c['reward_barrier'])}" for c in curves)
    return Plot(
        "interpolation",
        "Interpolation",
        "Models on the straight line theta(lambda) = theta_A + lambda (theta_B - theta_A) (esft analyze "
        "interpolate; lambda outside [0, 1] extrapolates). Reward barrier (largest drop below the line "
        f"between the endpoints' rewards, 0 or less = none): {barriers}.",
        path,
        [str(a.path) for a in docs],
        {"curves": curves},
    )


# -- 6. forgetting ---------------------------------------------------------------------------------


def _stage_iteration(stage: str) -> int | None:
    if stage == "base":
        return 0
    head, _, tail = stage.partition("-")
    return int(tail) if head == "iter" and tail.isdigit() else None


def forgetting(docs: list[Analysis], out: Path) -> Plot | None:
    """Each task's value (accuracy, else mean reward) at the base and every checkpoint of a run: one
    panel per task, one line per run."""
    docs = [a for a in docs if a.data.get("tasks") and a.data.get("stages")]
    if not docs:
        return None
    tasks = list(dict.fromkeys(t for a in docs for t in a.data["tasks"]))
    lines = []
    with rc_context(STYLE):
        fig, axes = _grid(len(tasks), height=3.8)
        for j, task in enumerate(tasks):
            ax = axes[j]
            metric = next(
                (a.data.get("metric", {}).get(task) for a in docs if task in a.data["tasks"]), "value"
            )
            for i, a in enumerate(docs):
                if task not in a.data["tasks"]:
                    continue
                pts = [
                    (_stage_iteration(s), _num(a.data["values"].get(s, {}).get(task)))
                    for s in a.data["stages"]
                ]
                pts = sorted((x, y) for x, y in pts if x is not None and y is not None)
                label = a.runs[0].display if a.runs else a.path.stem
                if pts:
                    ax.plot(*zip(*pts, strict=True), color=_color(i), marker="o", lw=1.6, label=label)
                    lines.append({"task": task, "run": label, "points": len(pts), "file": str(a.path)})
            ax.set(title=f"{task} ({metric})", xlabel="checkpoint iteration (0 = base)", ylabel=metric)
        _shared_legend(fig, axes[: len(tasks)], ncols=4)
        path = _save(fig, out, "forgetting")
    return Plot(
        "forgetting",
        "Forgetting",
        "Greedy evaluation of each task at the base model and at every checkpoint the run kept (esft "
        "analyze forgetting): accuracy when the task has an answer part, else mean reward. A task the run "
        "did not train on that drops shows forgetting.",
        path,
        [str(a.path) for a in docs],
        {"lines": lines, "tasks": tasks},
    )


def sequential(docs: list[Analysis], out: Path) -> Plot | None:
    """Task x stage matrices of sequential training as heatmaps (colour scaled per task row, so tasks
    with different metrics share one map; the numbers are the values)."""
    docs = [a for a in docs if a.data.get("tasks") and a.data.get("stages")]
    if not docs:
        return None
    with rc_context(STYLE):
        rows = max(len(a.data["tasks"]) for a in docs)
        cols = sum(len(a.data["stages"]) for a in docs)
        width = min(WIDTH, 3.0 * len(docs) + 1.3 * cols)  # cells about 1.3 inches wide
        fig, axes = _figure(len(docs), height=max(2.4, 0.7 * rows + 1.6), width=width)
        for ax, a in zip(axes, docs, strict=True):
            stages, tasks = a.data["stages"], a.data["tasks"]
            m = np.array([[_nan(a.data["values"].get(s, {}).get(t)) for s in stages] for t in tasks], float)
            with warnings.catch_warnings():  # a task with no value at any stage: an all-NaN row
                warnings.simplefilter("ignore", RuntimeWarning)
                lo = np.nanmin(m, axis=1, keepdims=True)
                span = np.nanmax(m, axis=1, keepdims=True) - lo
            scaled = np.where(span > 0, (m - lo) / np.where(span > 0, span, 1), 0.5)
            ax.imshow(scaled, cmap="viridis", vmin=0, vmax=1, aspect="auto")
            ax.grid(False)
            for (r, c), v in np.ndenumerate(m):
                ax.text(
                    c,
                    r,
                    fmt(v, 3),
                    ha="center",
                    va="center",
                    color="white" if scaled[r, c] < 0.6 else "black",
                )
            metric = a.data.get("metric") or {}
            ax.set_xticks(range(len(stages)), stages, rotation=30 if len(stages) > 4 else 0)
            ax.set_yticks(range(len(tasks)), [f"{t} ({metric.get(t, 'value')})" for t in tasks])
            ax.set_title(f"sequential: {' -> '.join(stages)}")
        path = _save(fig, out, "sequential")
    return Plot(
        "sequential",
        "Sequential training",
        "Task x stage matrix of runs trained one after another (esft analyze sequential): each stage's "
        "value per task. Colour runs from the task's lowest (dark) to highest (light) value across stages "
        "(mid colour: the same value at every stage).",
        path,
        [str(a.path) for a in docs],
        {"matrices": [{"stages": a.data["stages"], "tasks": a.data["tasks"]} for a in docs]},
    )


# -- 7. pass@k -------------------------------------------------------------------------------------


def pass_at_k(docs: list[Analysis], out: Path) -> Plot | None:
    """pass@k against k, one panel per analysis (task), one line per model."""
    docs = [a for a in docs if a.data.get("models")]
    if not docs:
        return None
    lines = []
    with rc_context(STYLE):
        fig, axes = _grid(len(docs))
        for ax, a in zip(axes, docs, strict=False):
            kmax = 1
            for i, m in enumerate(a.data["models"]):
                pts = sorted(
                    (int(k), _num(v)) for k, v in (m.get("pass_at") or {}).items() if _num(v) is not None
                )
                if not pts:
                    continue
                kmax = max(kmax, pts[-1][0])
                share = _num(m.get("distinct_answer_share"))
                extra = f", distinct answers {share:.2f}" if share is not None else ""
                ax.plot(
                    *zip(*pts, strict=True),
                    color=_color(i),
                    marker="o",
                    ms=4,
                    lw=1.6,
                    label=f"{m.get('model')}{extra}",
                )
                lines.append({"model": m.get("model"), "k": [k for k, _ in pts], "file": str(a.path)})
            if kmax >= 8:
                ax.set_xscale("log", base=2)
            ax.set_ylim(-0.02, 1.02)
            details = f"n={a.data.get('samples', '?')}, T={a.data.get('temperature', '?')}"
            ax.set(
                title=f"pass@k: {a.data.get('task', '?')}/{a.data.get('split', '?')} ({details})",
                xlabel="k",
                ylabel="pass@k",
            )
            _legend(ax)
        path = _save(fig, out, "pass_at_k")
    return Plot(
        "pass_at_k",
        "pass@k",
        "Unbiased pass@k (Chen et al. 2021) from n sampled completions per prompt (esft analyze passk), "
        "and the share of distinct answers among the correct samples. A fine-tuned model whose curve is "
        "higher at k = 1 but flatter than its base's has narrowed onto fewer solutions.",
        path,
        [str(a.path) for a in docs],
        {"lines": lines},
    )


# -- cosine (ES vs GRPO update directions) ---------------------------------------------------------


def cosine(docs: list[Analysis], out: Path) -> Plot | None:
    """Per-layer cosine similarity of two updates of one base, one line per pair."""
    docs = [a for a in docs if isinstance(a.data.get("layers"), dict) and a.data["layers"]]
    if not docs:
        return None
    layers = sorted({k for a in docs for k in a.data["layers"]}, key=layer_order)
    x = np.arange(len(layers))
    pairs = []
    with rc_context(STYLE):
        fig, (ax,) = _figure(1, height=4.0)
        for i, a in enumerate(docs):
            label = f"{_checkpoint_label(a.data.get('a'))} vs {_checkpoint_label(a.data.get('b'))}"
            total = _num((a.data.get("total") or {}).get("cosine"))
            values = [_nan((a.data["layers"].get(k) or {}).get("cosine")) for k in layers]
            ax.plot(
                x,
                values,
                color=_color(i),
                marker="o",
                ms=4,
                lw=1.6,
                label=f"{label} (global {fmt(total, 3)})",
            )
            pairs.append({"pair": label, "global": total, "file": str(a.path)})
        ax.axhline(0.0, color="black", lw=0.8, ls=":")
        _layer_ticks(ax, layers)
        ax.set(title="cosine similarity of the two updates per layer", ylabel="cos(delta_A, delta_B)")
        _legend(ax)
        path = _save(fig, out, "cosine")
    return Plot(
        "cosine",
        "Update similarity",
        "Cosine of the two updates' directions per layer (esft analyze cosine): 1 = same direction, 0 = "
        "unrelated (two independent random walks give about +-1/sqrt(d)).",
        path,
        [str(a.path) for a in docs],
        {"pairs": pairs},
    )


def _checkpoint_label(path: Any) -> str:
    p = Path(str(path))
    if p.parent.name == "checkpoints":
        return f"{p.parent.parent.name}@{p.name.removeprefix('iter-').lstrip('0') or '0'}"
    return p.name or str(path)


# -- sweeps (esft sweep) ---------------------------------------------------------------------------

SWEEP_PREFIX = "sweep-"  # every sweep plot's file name starts so (a re-run removes stale ones)
STATE_STYLE = {
    "COMPLETE": {"marker": "o", "color": "#1f77b4", "label": "complete"},
    "PRUNED": {"marker": "x", "color": "#7f7f7f", "label": "pruned (last reported value)"},
}


def sweep_slug(sweep: Any) -> str:
    """A file-name-safe name for a sweep's plots."""
    text = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(sweep.path.resolve().name))
    return text or "sweep"


def _sweep_points(sweep: Any) -> list[Any]:
    return [t for t in sweep.trials if t.state in STATE_STYLE and t.value is not None]


def sweep_history(sweep: Any, out: Path) -> Plot | None:
    """The objective of every trial against its number, with the best so far."""
    points = _sweep_points(sweep)
    if not points:
        return None
    maximize = sweep.direction == "maximize"
    name = f"{SWEEP_PREFIX}{sweep_slug(sweep)}-history"
    with rc_context(STYLE):
        fig, (ax,) = _figure(1, height=3.6)
        for state, style in STATE_STYLE.items():
            pts = [(t.number, t.value) for t in points if t.state == state]
            if pts:
                ax.scatter(*zip(*pts, strict=True), s=28, **style)
        done = sorted((t.number, t.value) for t in points if t.state == "COMPLETE")
        if done:
            best, xs, ys = None, [], []
            for n, v in done:
                best = v if best is None else (max(best, v) if maximize else min(best, v))
                xs.append(n)
                ys.append(best)
            ax.step(xs, ys, where="post", color="#d62728", lw=1.6, label="best so far")
        ax.set(title=f"{sweep.name}: objective per trial", xlabel="trial", ylabel=sweep.metric)
        _legend(ax)
        path = _save(fig, out, name)
    return Plot(
        name,
        f"Sweep {sweep.name}: history",
        f"{sweep.metric} ({sweep.direction}) of every finished trial at its last evaluation, by trial "
        "number; pruned trials at the last value they reported before they were stopped; the line is the "
        "best completed trial so far.",
        path,
        [str(sweep.path / "sweep.yaml")],
        {"points": len(points), "complete": len(done)},
    )


def sweep_importance(sweep: Any, out: Path) -> Plot | None:
    """Optuna's parameter importance (fANOVA) as horizontal bars."""
    if not sweep.importance:
        return None
    name = f"{SWEEP_PREFIX}{sweep_slug(sweep)}-importance"
    items = sorted(sweep.importance.items(), key=lambda kv: kv[1])
    with rc_context(STYLE):
        fig, (ax,) = _figure(1, height=max(2.0, 0.45 * len(items) + 1.2))
        ax.barh([k for k, _ in items], [v for _, v in items], color="#1f77b4")
        for i, (_, v) in enumerate(items):
            ax.text(v, i, f" {v:.2f}", va="center")
        ax.set_xlim(0, max(1.0, max(v for _, v in items) * 1.15))
        ax.set(title=f"{sweep.name}: parameter importance (fANOVA)", xlabel="importance (sums to 1)")
        path = _save(fig, out, name)
    return Plot(
        name,
        f"Sweep {sweep.name}: parameter importance",
        "How much of the objective's variance over the completed trials each parameter explains "
        "(optuna.importance.get_param_importances, fANOVA, seeded). Few trials give rough estimates.",
        path,
        [str(sweep.path / "sweep.yaml")],
        {"importance": dict(sweep.importance)},
    )


def sweep_params(sweep: Any, out: Path) -> Plot | None:
    """The objective against each parameter: one scatter panel per parameter (log axis for a log
    range, the choices in order for a categorical one), pruned trials in grey."""
    points = _sweep_points(sweep)
    names = [n for n in sweep.param_names() if any(n in t.params for t in points)]
    if not points or not names:
        return None
    name = f"{SWEEP_PREFIX}{sweep_slug(sweep)}-params"
    panels = []
    with rc_context(STYLE):
        fig, axes = _grid(len(names), height=3.6)
        for ax, param in zip(axes, names, strict=False):
            kind = sweep.kinds.get(param, "linear")
            values = [t.params[param] for t in points if param in t.params]
            categories = []
            if kind == "categorical":  # the choices in order (numbers by value)
                unique = list(dict.fromkeys(values))
                if all(isinstance(v, int | float) and not isinstance(v, bool) for v in unique):
                    unique.sort()
                categories = [repr(v) for v in unique]
            for state, style in STATE_STYLE.items():
                pts = [(t.params[param], t.value) for t in points if t.state == state and param in t.params]
                if not pts:
                    continue
                xs = [categories.index(repr(x)) if categories else x for x, _ in pts]
                ax.scatter(xs, [y for _, y in pts], s=28, **style)
            if categories:
                ax.set_xticks(range(len(categories)), [c.strip("'") for c in categories])
            elif kind == "log":
                ax.set_xscale("log")
            ax.set(title=param, xlabel=f"{param}{' (log)' if kind == 'log' else ''}", ylabel=sweep.metric)
            panels.append({"param": param, "kind": kind, "points": len(values)})
        _shared_legend(fig, axes[: len(names)])
        path = _save(fig, out, name)
    return Plot(
        name,
        f"Sweep {sweep.name}: objective against each parameter",
        f"{sweep.metric} of every finished trial against the value each parameter took (Optuna's slice "
        "plot): blue dots completed, grey crosses pruned (at their last reported value).",
        path,
        [str(sweep.path / "sweep.yaml")],
        {"panels": panels},
    )


def sweep_intermediate(sweep: Any, out: Path) -> Plot | None:
    """The objective metric at every periodic evaluation of every trial: where pruning stopped them."""
    trials = [t for t in sweep.trials if len(t.intermediate) >= 1]
    if not trials:
        return None
    name = f"{SWEEP_PREFIX}{sweep_slug(sweep)}-intermediate"
    with rc_context(STYLE):
        fig, (ax,) = _figure(1, height=3.6)
        for t in trials:
            pts = sorted(t.intermediate.items())
            pruned = t.state == "PRUNED"
            ax.plot(
                *zip(*pts, strict=True),
                color=STATE_STYLE["PRUNED"]["color"] if pruned else STATE_STYLE["COMPLETE"]["color"],
                alpha=0.55 if pruned else 0.9,
                ls="--" if pruned else "-",
                marker="x" if pruned else "o",
                ms=3,
                lw=1.2,
            )
        handles = [
            Line2D(
                [], [], color=STATE_STYLE["COMPLETE"]["color"], marker="o", ms=3, label="completed / running"
            ),
            Line2D([], [], color=STATE_STYLE["PRUNED"]["color"], ls="--", marker="x", ms=3, label="pruned"),
        ]
        ax.legend(handles=handles, loc="best")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(
            title=f"{sweep.name}: {sweep.metric} at each evaluation", xlabel="iteration", ylabel=sweep.metric
        )
        path = _save(fig, out, name)
    return Plot(
        name,
        f"Sweep {sweep.name}: evaluations",
        f"{sweep.metric} at every periodic evaluation of every trial (the values reported to the pruner; "
        "iteration 0, the base model, is not reported). Dashed grey: trials the pruner stopped.",
        path,
        [str(sweep.path / "sweep.yaml")],
        {"trials": len(trials), "pruned": sum(t.state == "PRUNED" for t in trials)},
    )
