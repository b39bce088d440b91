"""A run's report: one self-contained HTML page with the plan, held-out metrics and training curves.

`render_report` reads a run directory (plan.json, recipe.resolved.yaml, each stage's metrics.jsonl and
done.json, the data stage's manifest) and returns the page; it writes nothing and stamps no time, so the
same run gives the same page. The page needs nothing else: CSS is inline and the plots are SVG drawn
here, line charts with round ticks (1, 2 or 5 × 10^k apart), no JavaScript, no fonts or images fetched.

metrics.jsonl holds one line per logged step. A resumed job logs again the steps after its checkpoint,
so the later line of a step replaces the earlier one; a torn last line of a killed job is skipped, and
non-finite values are left out of the plots. A stage without metrics shows as "not run".

Every string that comes from the run directory (the recipe's description and text, metric names,
stage names) is HTML-escaped. Nothing here imports torch.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from .artifacts import is_done, read_json
from .compile import Job, Plan
from .compile.estimate import human_bytes, human_count
from .errors import EngineError
from .kinds import KINDS
from .kinds.base import LOSS, LR, HeldOut
from .summary import load_run_plan as load_plan
from .summary import read_metrics_file as read_metrics

Row = dict[str, float]
esc = html.escape


class Series(NamedTuple):
    label: str
    points: list[tuple[float, float]]


class Stage(NamedTuple):
    job: Job
    state: str  # finished | started | not run
    rows: list[Row]


W, H = 540, 280
LEFT, RIGHT, TOP, BOTTOM = 78, 18, 46, 44
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;
color:#222;background:#fff;padding:0 16px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555;margin:2px 0}table{border-collapse:collapse;font-size:14px;margin:6px 0}
th,td{border:1px solid #ddd;padding:4px 10px;text-align:left}th{background:#f3f5f8}td.num{text-align:right;
font-variant-numeric:tabular-nums}.kind{color:#666;font-weight:normal;font-size:15px}
.state{font-size:13px;font-weight:normal;padding:1px 8px;border-radius:10px;margin-left:6px}
.finished{background:#d9f2dd;color:#17602a}.started{background:#fff1cc;color:#7a5600}
.not-run{background:#eee;color:#666}.missing{color:#888;font-style:italic}
.charts{display:flex;flex-wrap:wrap;gap:12px}svg{background:#fff;border:1px solid #e3e3e3}
svg text{font-size:12px;fill:#333}svg .title{font-size:14px;font-weight:600}.grid{stroke:#eee}
.axis{stroke:#555}.latest{font-size:13px;color:#444}pre{background:#f7f7f7;padding:10px;overflow:auto;font-size:12px}
"""


def points(rows: Sequence[Row], key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]


def nice_ticks(lo: float, hi: float, *, count: int = 5, min_step: float = 0.0) -> list[float]:
    """Round tick values, 1, 2 or 5 × 10^k apart, from at or below `lo` to at or above `hi`."""
    if not hi > lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = max((hi - lo) / count, min_step)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first = math.floor(lo / step + 1e-9) * step
    n = max(1, math.ceil((hi - first) / step - 1e-9))
    return [first + i * step for i in range(n + 1)]


def tick_label(v: float, step: float) -> str:
    if abs(v) < step * 1e-6:
        v = 0.0
    if abs(v) >= 1e5:
        return f"{v:.3g}"
    digits = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{v:.{digits}f}" if digits <= 4 else f"{v:.1e}"


def svg_chart(title: str, series: Sequence[Series], *, y_label: str, x_label: str = "step") -> str:
    """A line chart with axes, ticks, labels and a legend; empty when no series has a point."""
    drawn = [s for s in series if s.points]
    if not drawn:
        return ""
    xt = nice_ticks(min(x for s in drawn for x, _ in s.points), max(x for s in drawn for x, _ in s.points), min_step=1)
    yt = nice_ticks(min(y for s in drawn for _, y in s.points), max(y for s in drawn for _, y in s.points))

    def px(x: float) -> float:
        return LEFT + (x - xt[0]) / (xt[-1] - xt[0]) * (W - LEFT - RIGHT)

    def py(y: float) -> float:
        return H - BOTTOM - (y - yt[0]) / (yt[-1] - yt[0]) * (H - TOP - BOTTOM)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        f'role="img" aria-label="{esc(title)}"><text class="title" x="{LEFT}" y="18">{esc(title)}</text>',
        *_axes(xt, yt, px, py, x_label=x_label, y_label=y_label),
    ]
    legend_x = float(LEFT)
    for i, s in enumerate(drawn):
        color = PALETTE[i % len(PALETTE)]
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s.points)
        parts.append(f'<polyline data-series="{esc(s.label)}" fill="none" stroke="{color}" stroke-width="2" '
                     f'stroke-linejoin="round" points="{pts}"/>')  # fmt: skip
        if len(s.points) <= 40:  # markers keep sparse eval curves (and a single point) visible
            parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>' for x, y in s.points]
        parts.append(f'<rect x="{legend_x:.0f}" y="28" width="14" height="4" fill="{color}"/>'
                     f'<text x="{legend_x + 18:.0f}" y="35">{esc(s.label)}</text>')  # fmt: skip
        legend_x += 30 + 7 * len(s.label)
    parts.append("</svg>")
    return "".join(parts)


def _axes(
    xt: list[float],
    yt: list[float],
    px: Callable[[float], float],
    py: Callable[[float], float],
    *,
    x_label: str,
    y_label: str,
) -> list[str]:
    x0, x1, y0, y1 = px(xt[0]), px(xt[-1]), py(yt[0]), py(yt[-1])
    out = []
    for v in yt:
        y = py(v)
        out.append(f'<line class="grid" x1="{x0:.1f}" y1="{y:.1f}" x2="{x1:.1f}" y2="{y:.1f}"/>'
                   f'<line class="axis" x1="{x0 - 5:.1f}" y1="{y:.1f}" x2="{x0:.1f}" y2="{y:.1f}"/>'
                   f'<text x="{x0 - 8:.1f}" y="{y + 4:.1f}" text-anchor="end">{tick_label(v, yt[1] - yt[0])}</text>')  # fmt: skip
    for v in xt:
        x = px(v)
        out.append(f'<line class="axis" x1="{x:.1f}" y1="{y0:.1f}" x2="{x:.1f}" y2="{y0 + 5:.1f}"/>'
                   f'<text x="{x:.1f}" y="{y0 + 18:.1f}" text-anchor="middle">{tick_label(v, xt[1] - xt[0])}</text>')  # fmt: skip
    out.append(f'<line class="axis" x1="{x0:.1f}" y1="{y0:.1f}" x2="{x1:.1f}" y2="{y0:.1f}"/>'
               f'<line class="axis" x1="{x0:.1f}" y1="{y0:.1f}" x2="{x0:.1f}" y2="{y1:.1f}"/>'
               f'<text x="{(x0 + x1) / 2:.1f}" y="{H - 6}" text-anchor="middle">{esc(x_label)}</text>'
               f'<text transform="translate(14 {(y0 + y1) / 2:.1f}) rotate(-90)" text-anchor="middle">{esc(y_label)}</text>')  # fmt: skip
    return out


def num(v: float) -> str:
    return f"{v:.4g}"


def _stage(run_dir: Path, job: Job) -> Stage:
    # The stage's folder under the directory given, not the plan's run_dir: a copied or moved run still reports.
    folder = run_dir / job.name
    state = "finished" if is_done(folder, job.cache_key) else "started" if folder.is_dir() else "not run"
    return Stage(job, state, read_metrics(folder / "metrics.jsonl"))


def _header(plan: Plan, run_dir: Path) -> str:
    params = next((j.estimate.params.total for j in plan.jobs if j.estimate), 0)
    cluster = plan.cluster.name + (f" ({plan.cluster.gpu})" if plan.cluster.gpu else " (cpu)")
    return (
        f"<h1>{esc(plan.recipe)} · run report</h1>"
        + (f'<p class="meta">{esc(plan.description)}</p>' if plan.description else "")
        + f'<p class="meta">run dir {esc(str(run_dir))} · cluster {esc(cluster)} · {human_count(params)} parameters · '
        f"vocab {plan.model.vocab_size} (padded {plan.model.padded_vocab_size}) · recipe hash "
        f"{esc(plan.recipe_hash[:12])} · engine {esc(plan.engine_version)}</p>"
    )


def _plan_section(stages: Sequence[Stage]) -> str:
    head = ("stage", "kind", "nodes×gpus", "tp/pp/cp/dp", "precision", "est. memory/GPU", "steps", "last step", "state")
    rows = []
    for st in stages:
        j, last = st.job, (num(st.rows[-1]["step"]) if st.rows else "-")
        cells = [j.name, j.kind, f"{j.resources.nodes}×{j.config.get('workers', 1)} cpu", "-", "-", "-", "-", last]
        if j.layout is not None and j.precision is not None and j.estimate is not None:
            r, lay = j.resources, j.layout
            cells[2] = f"{r.nodes}×{r.gpus_per_node}" if r.device == "cuda" else f"{r.nodes}×{r.processes_per_node} cpu"
            cells[3] = f"{lay.tp}/{lay.pp}/{lay.cp}/{lay.dp}"
            cells[4] = j.precision.dtype + (f" ({j.precision.fp8_recipe})" if j.precision.fp8_recipe else "")
            cells[5:7] = [human_bytes(j.estimate.memory.total), str(j.estimate.steps)]
        state = f'<span class="state {st.state.replace(" ", "-")}">{st.state}</span>'
        rows.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + f"<td>{state}</td></tr>")
    return f'<h2 id="plan">Plan</h2><table>{_thead(head)}{"".join(rows)}</table>'


def _thead(cols: Sequence[str]) -> str:
    return "<tr>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>"


def _held_out(kind: str) -> tuple[HeldOut, ...]:
    found = KINDS.get(kind)
    return found.held_out if found is not None else ()


def _summary_section(stages: Sequence[Stage]) -> str:
    """Held-out metrics per stage at its first and at its last evaluation."""
    rows = []
    for st in stages:
        specs, name = _held_out(st.job.kind), esc(st.job.name)
        if specs and not st.rows:
            rows.append(f'<tr><td>{name}</td><td colspan="3" class="missing">not run</td></tr>')
            continue
        for metric in specs:
            label, key = metric.label, metric.key
            evals = [r for r in st.rows if key in r and math.isfinite(r[key])]
            if not evals:
                rows.append(
                    f'<tr><td>{name}</td><td>{esc(label)}</td><td colspan="2" class="missing">no eval yet</td></tr>'
                )
                continue
            first, last = ((r["step"], metric.value(r[key])) for r in (evals[0], evals[-1]))
            rows.append(
                f"<tr><td>{name}</td><td>{esc(label)}</td><td class='num'>{num(first[1])} (step {num(first[0])})</td>"
                f"<td class='num'>{num(last[1])} (step {num(last[0])})</td></tr>"
            )
    table = f"<table>{_thead(('stage', 'metric', 'first eval', 'last eval'))}{''.join(rows)}</table>"
    return '<h2 id="summary">Held-out metrics</h2>' + (table if rows else '<p class="missing">no training stages</p>')


def _stage_section(run_dir: Path, st: Stage) -> str:
    j = st.job
    state = f'<span class="state {st.state.replace(" ", "-")}">{st.state}</span>'
    head = f'<section id="stage-{esc(j.name)}"><h2>{esc(j.name)} <span class="kind">{esc(j.kind)}</span>{state}</h2>'
    kind = KINDS.get(j.kind)
    if kind is not None and kind.produces == "data":
        return head + _data_records(run_dir / j.name / "data" / "manifest.json") + "</section>"
    if not st.rows:
        return head + '<p class="missing">not run: no metrics yet</p></section>'
    charts = (svg_chart(c.title, [Series(k, points(st.rows, k)) for k in c.keys], y_label=c.y_label)
              for c in (kind.charts if kind is not None else (LOSS, LR)))  # fmt: skip
    last = st.rows[-1]
    values = " · ".join(f"{esc(k)} {num(v)}" for k, v in last.items() if k != "step")
    return (
        head + f'<div class="charts">{"".join(charts)}</div>'
        f'<p class="latest">last line (step {num(last["step"])}): {values}</p></section>'
    )


def _data_records(manifest: Path) -> str:
    """The data stage's records per source and split, from its manifest."""
    try:
        records = read_json(manifest)["report"]["records"]
        splits = ("train", "valid", "test")
        rows = [
            f"<tr><td>{esc(str(name))}</td>"
            + "".join(f"<td class='num'>{esc(str(r.get(s, '-')))}</td>" for s in splits)
            for name, r in sorted(records.items())
            if isinstance(r, dict)
        ]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return '<p class="missing">not run: no dataset manifest</p>'
    return f"<table>{_thead(('source', *('records ' + s for s in splits)))}{''.join(rows)}</table>"


def render_report(run_dir: Path) -> str:
    """The run's report as one self-contained HTML page."""
    plan = load_plan(run_dir)
    stages = [_stage(run_dir, j) for j in plan.jobs]
    try:
        recipe = (run_dir / "recipe.resolved.yaml").read_text(encoding="utf-8", errors="replace")
        recipe_html = f"<details><summary>recipe.resolved.yaml</summary><pre>{esc(recipe)}</pre></details>"
    except OSError:
        recipe_html = '<p class="missing">no recipe.resolved.yaml</p>'
    body = [_header(plan, run_dir), _plan_section(stages), _summary_section(stages)]
    body += [_stage_section(run_dir, st) for st in stages]
    body += ['<h2 id="recipe">Recipe</h2>', recipe_html]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(plan.recipe)} · run report</title><style>{CSS}</style></head>\n"
        "<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Render the report and write it (default: <run_dir>/report.html); returns the path written."""
    target = out or run_dir / "report.html"
    page = render_report(run_dir)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise EngineError(f"cannot write the report to {target}: {exc.strerror or exc}") from None
    return target
