"""The report page: one self-contained HTML file.

Every plot is embedded as a base64 PNG data URI and the CSS is inline, so the file can be mailed or
archived alone and loads no external resource. The only script is a self-check that marks
``<body data-images-ok="yes">`` once every image has decoded (the tests read it in headless Chromium).
"""

from __future__ import annotations

import base64
import html
import json
import os
import struct
import time
from pathlib import Path
from typing import Any

from esft.analysis.tables import fmt
from esft.report.collect import Group, Run
from esft.report.plots import Plot

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f;
       margin: 0; background: #f6f7f9; }
main { max-width: 1240px; margin: 0 auto; padding: 16px 20px 48px; }
h1 { font-size: 24px; margin: 8px 0 4px; }
h2 { font-size: 18px; margin: 0 0 8px; }
.meta { color: #555; margin: 0 0 12px; }
nav { margin: 0 0 16px; }
nav a { margin-right: 14px; color: #0b5cad; text-decoration: none; }
section, figure { background: #fff; border: 1px solid #e1e4e8; border-radius: 6px; padding: 14px 16px;
                  margin: 0 0 16px; }
figure img { display: block; max-width: 100%; height: auto; margin: 4px 0 8px; }
figcaption { color: #333; }
.sources { display: block; color: #777; font-size: 12px; margin-top: 4px; word-break: break-all; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #e1e4e8; padding: 3px 8px; vertical-align: top; }
th { background: #f0f2f5; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.configs td { max-width: 260px; word-break: break-all; font-family: ui-monospace, Menlo, monospace;
                   font-size: 12px; }
tr.diff td, tr.diff th { background: #fff4c2; }
tr.sep th { background: #fff; color: #777; font-weight: normal; font-style: italic; }
td.absent { color: #aaa; }
code { font-family: ui-monospace, Menlo, monospace; font-size: 12px; background: #f0f2f5; padding: 1px 4px;
       border-radius: 3px; word-break: break-all; }
ul.missing li { margin-bottom: 6px; }
.legend-diff { background: #fff4c2; padding: 0 4px; }
"""

SELF_CHECK = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.imagesLoaded = ok + "/" + imgs.length;
  document.body.dataset.imagesOk = ok === imgs.length ? "yes" : "no";
});
"""

ABSENT = "\u2014"  # em dash: the run's config has no such key


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def config_value(value: Any) -> str:
    """A config value as text: strings bare, everything else as compact JSON (null, lists, dicts)."""
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    return struct.unpack(">II", head[16:24])


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def config_rows(runs: list[Run]) -> list[tuple[str, list[str | None], bool]]:
    """(key, value per run or None when absent, differs) for the union of the runs' config keys:
    trainer and task first, then the keys that differ between runs, then those that do not."""
    keys = list(dict.fromkeys(k for r in runs for k in r.config))
    keys = ["trainer", "task"] + [k for k in keys if k not in ("trainer", "task")]
    rows = []
    for k in keys:
        if k == "trainer":
            values: list[str | None] = [r.trainer for r in runs]
        else:
            values = [config_value(r.config[k]) if k in r.config else None for r in runs]
        rows.append((k, values, len(set(values)) > 1))
    head, rest = rows[:2], rows[2:]
    return head + [r for r in rest if r[2]] + [r for r in rest if not r[2]]


def _config_table(runs: list[Run], groups: list[Group]) -> str:
    group_of = {id(r): g.label for g in groups for r in g.runs}
    out = ['<div class="scroll"><table class="configs">']
    out.append("<tr><th>key</th>" + "".join(f"<th>{esc(r.display)}</th>" for r in runs) + "</tr>")
    out.append(
        '<tr class="sep"><th>group</th>'
        + "".join(f"<td>{esc(group_of.get(id(r), ''))}</td>" for r in runs)
        + "</tr>"
    )
    rows = config_rows(runs)
    sep_done = False
    for key, values, differs in rows:
        if not differs and key not in ("trainer", "task") and not sep_done:
            out.append(f'<tr class="sep"><th colspan="{len(runs) + 1}">the same in every run</th></tr>')
            sep_done = True
        cls = ' class="diff"' if differs else ""
        cells = "".join(
            f'<td class="absent">{ABSENT}</td>' if v is None else f"<td>{esc(v)}</td>" for v in values
        )
        out.append(f"<tr{cls}><th>{esc(key)}</th>{cells}</tr>")
    out.append("</table></div>")
    return "\n".join(out)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s"


def cost_rows(runs: list[Run]) -> tuple[list[str], list[list[Any]]]:
    costs = [r.cost() for r in runs]
    cuda = any(c["peak_cuda_mb"] is not None for c in costs)
    headers = ["run", "trainer", "iterations", "samples", "tokens", "wall time", "samples/s", "peak RSS MiB"]
    headers += ["peak CUDA MiB"] if cuda else []
    rows = []
    for r, c in zip(runs, costs, strict=True):
        row = [r.display, r.trainer, c["iterations"], c["samples"], c["tokens"], duration(c["wall_seconds"])]
        row += [c["samples_per_second"], c["peak_rss_mb"]] + ([c["peak_cuda_mb"]] if cuda else [])
        rows.append(row)
    return headers, rows


def _cost_table(runs: list[Run]) -> str:
    headers, rows = cost_rows(runs)
    out = ['<div class="scroll"><table class="cost">']
    out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>")
    for row in rows:
        cells = []
        for v in row:
            num = isinstance(v, int | float) or v is None
            text = fmt(int(v) if isinstance(v, float) and v.is_integer() else v)
            cells.append(f'<td class="num">{esc(text)}</td>' if num else f"<td>{esc(text)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table></div>")
    return "\n".join(out)


def _figure(plot: Plot) -> str:
    width, height = png_size(plot.png)
    sources = ", ".join(esc(s) for s in plot.sources)
    return (
        f'<figure id="plot-{esc(plot.name)}">\n<h2>{esc(plot.title)}</h2>\n'
        f'<img src="{data_uri(plot.png)}" alt="{esc(plot.title)}" width="{width}" height="{height}">\n'
        f'<figcaption>{esc(plot.caption)}<span class="sources">from: {sources}</span></figcaption>\n'
        "</figure>"
    )


def _missing(missing: list[dict[str, str]]) -> str:
    if not missing:
        return "<p>Nothing: every plot has its data.</p>"
    items = []
    for m in missing:
        cmd = f"<br><code>{esc(m['command'])}</code>" if m.get("command") else ""
        items.append(f"<li><b>{esc(m['plot'])}</b>: {esc(m['what'])}{cmd}</li>")
    return '<ul class="missing">\n' + "\n".join(items) + "\n</ul>"


def _sweep_link(run_dir: Path | None, page_dir: Path) -> str:
    """A link to a trial's run folder, relative to the page (the page stays next to its PNGs)."""
    if run_dir is None:
        return ABSENT
    try:
        href = os.path.relpath(run_dir.resolve(), page_dir.resolve())
    except ValueError:  # another drive
        href = run_dir.resolve().as_uri()
    return f'<a href="{esc(href)}/">{esc(run_dir.name)}</a>'


def sweep_rows(sweep: Any) -> tuple[list[str], list[list[Any]]]:
    """The best-trials table of a sweep: headers and rows (rank, trial, objective, parameters, derived
    settings, iterations; the run folder is added by the page)."""
    best = sweep.best()
    params = list(sweep.kinds)
    derived = list(dict.fromkeys(k for t in best for k in t.derived))
    headers = ["rank", "trial", sweep.metric, *params, *derived, "iterations"]
    rows = [
        [i, t.number, t.value, *(t.params.get(p) for p in params), *(t.derived.get(d) for d in derived)]
        + [t.iterations]
        for i, t in enumerate(best, 1)
    ]
    return headers, rows


def _cell(v: Any) -> str:
    if isinstance(v, int | float) and not isinstance(v, bool) or v is None:
        return f'<td class="num">{esc(fmt(v))}</td>'
    return f"<td>{esc(fmt(v))}</td>"


def _sweep_section(sweep: Any, plots: list[Plot], page_dir: Path, anchor: str) -> str:
    """One sweep: what it searched, its best trials (linked to their run folders), parameter importance,
    the plots, and the trials that failed."""
    config = sweep.config
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(sweep.states().items())) or "no trials"
    sampler = config.get("sampler") or {}
    pruner = config.get("pruner") or {}
    options = lambda d: ", ".join(f"{k}={v}" for k, v in d.items() if k != "name")  # noqa: E731
    space = "; ".join(f"{k}: {config_value(v)}" for k, v in (config.get("space") or {}).items())
    out = [
        f'<section id="{esc(anchor)}">',
        f"<h2>Sweep {esc(sweep.name)} ({esc(sweep.method)})</h2>",
        f"<p>{esc(sweep.path)}: {esc(states)} of n_trials {esc(sweep.n_trials)}; objective "
        f"<code>{esc(sweep.metric)}</code>, {esc(sweep.direction)}; sampler {esc(sampler.get('name'))} "
        f"({esc(options(sampler))}), pruner {esc(pruner.get('name'))}"
        f"{' (' + esc(options(pruner)) + ')' if options(pruner) else ''}.</p>",
        f"<p>Space: <code>{esc(space)}</code></p>",
    ]
    headers, rows = sweep_rows(sweep)
    if rows:
        out.append(f"<h2>Best trials ({len(rows)} completed)</h2>")
        out.append('<div class="scroll"><table class="sweep-best">')
        out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in [*headers, "run folder"]) + "</tr>")
        for row, t in zip(rows, sweep.best(), strict=True):
            cells = "".join(_cell(v) for v in row)
            out.append(f"<tr>{cells}<td>{_sweep_link(t.run_dir, page_dir)}</td></tr>")
        out.append("</table></div>")
    else:
        out.append("<p>No trial has completed yet.</p>")
    out.append("<h2>Parameter importance</h2>")
    if sweep.importance:
        out.append('<table class="sweep-importance"><tr><th>parameter</th><th>importance</th></tr>')
        for k, v in sorted(sweep.importance.items(), key=lambda kv: -kv[1]):
            out.append(f'<tr><td>{esc(k)}</td><td class="num">{esc(fmt(v))}</td></tr>')
        out.append("</table>")
    if sweep.importance_note:
        out.append(f"<p>{esc(sweep.importance_note)}</p>")
    failed = [t for t in sweep.trials if t.state == "FAIL"]
    if failed:
        out.append("<h2>Failed trials</h2><ul>")
        for t in failed:
            first = t.retry_of if t.retry_of is not None else t.number
            again = [r.number for r in sweep.trials if r.retry_of == first and r.number > t.number]
            rerun = f" (re-run as trial {again[0]})" if again else ""
            out.append(f"<li>trial {t.number}: {esc(t.error or 'no error recorded')}{rerun}</li>")
        out.append("</ul>")
    out.append("</section>")
    out += [_figure(p) for p in plots]
    return "\n".join(out)


def write_page(
    path: Path,
    title: str,
    runs: list[Run],
    groups: list[Group],
    plots: list[Plot],
    missing: list[dict[str, str]],
    notes: list[str],
    sweeps: list[tuple[Any, list[Plot]]] | None = None,
) -> Path:
    """Write the self-contained HTML page to ``path``; ``sweeps``: (sweep, its plots) from
    ``report.sweep`` and ``plots.sweep_*``, shown first."""
    when = time.strftime("%Y-%m-%d %H:%M")
    sweeps = sweeps or []
    anchors = [f"sweep-{i}" for i in range(len(sweeps))]
    nav = [(a, f"Sweep {s.name}") for a, (s, _) in zip(anchors, sweeps, strict=True)]
    nav += [("configs", "Configs"), ("cost", "Cost")] + [(f"plot-{p.name}", p.title) for p in plots]
    nav += [("missing", "Missing analyses")]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head>\n<meta charset="utf-8">\n<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>",
        "<body>\n<main>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="meta">esft report, {esc(when)}: {len(runs)} run{"s" if len(runs) != 1 else ""} in '
        f"{len(groups)} group{'s' if len(groups) != 1 else ''} (runs that differ only in seed), "
        f"{len(plots)} plot{'s' if len(plots) != 1 else ''}.</p>",
        "<nav>" + "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t in nav) + "</nav>",
        *(_sweep_section(s, ps, path.parent, a) for a, (s, ps) in zip(anchors, sweeps, strict=True)),
        '<section id="configs">\n<h2>Run configs</h2>',
        '<p><span class="legend-diff">Highlighted</span> rows differ between runs; '
        f"{ABSENT} = not in that run's config.</p>",
        _config_table(runs, groups),
        "</section>",
        '<section id="cost">\n<h2>Cost</h2>',
        "<p>From metrics.jsonl: wall time = sum of perf/seconds (training iterations only, without model "
        "load and evaluations); samples/s = samples / wall time; peak RSS = the process's resident "
        "high-water mark.</p>",
        _cost_table(runs),
        "</section>",
        *(_figure(p) for p in plots),
        '<section id="missing">\n<h2>Missing analyses</h2>',
        _missing(missing),
    ]
    if notes:
        parts.append("<h2>Notes</h2>\n<ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    parts += ["</section>", "</main>", f"<script>{SELF_CHECK}</script>", "</body>\n</html>\n"]
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
