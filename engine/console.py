"""What the command line prints: its two consoles, the one way a user error ends a command, and its tables.

A user error prints one message (every problem, each with its dotted path and fix) and exits with code
2, without a traceback.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from .errors import EXIT_USER_ERROR, EngineError

if TYPE_CHECKING:
    from .compile import Plan
    from .compile.data_estimate import DataEstimate

# Wide enough for the plan table when piped to a file or a CI log, where rich would assume 80 columns.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def finite(value: float | None) -> float | None:
    """A typer callback: NaN and infinity are no setting (click's ranges let NaN through)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def fail(exc: EngineError) -> typer.Exit:
    """Print a user error and return the exit (code 2) to raise."""
    err.print(f"error: {exc.render()}", markup=False, style="red")
    return typer.Exit(EXIT_USER_ERROR)


def finished_table(rows: list[dict[str, str]]) -> Table:
    """Held-out results per stage and where each artifact is."""
    table = Table("stage", "steps", "held-out results", "artifact", title="finished", title_justify="left")
    for row in rows:
        artifact = row["artifact"] + (f" ({row['version']})" if row.get("version") else "")
        table.add_row(row["stage"], row["steps"], row["held_out"], artifact)
    return table


def data_caption(name: str, d: DataEstimate) -> str:
    """What a data stage's estimate rests on: its input, its passes, its tasks."""
    from .compile.estimate import human_time

    if not d.input_bytes:
        return f"{name}: no wall-time estimate: the sizes of {', '.join(d.unknown_sources)} are not known before reading"
    passes = ", ".join(f"{k} {human_time(v)}" for k, v in d.passes.items())
    tasks = f"{d.tasks} tasks on {d.processes} node{'s' if d.processes > 1 else ''}, " if d.tasks > 1 else ""
    line = (f"{name}: {d.input_bytes / 1e6:,.1f} MB of input · {passes} ({tasks}{d.workers} worker"
            f"{'s' if d.workers > 1 else ''} each; the profile's data_rates)")  # fmt: skip
    if d.unknown_sources:
        line += f" · size unknown before reading: {', '.join(d.unknown_sources)} (not counted)"
    return line


def plan_table(p: Plan) -> Table:
    from .compile.estimate import human_bytes, human_count, human_time

    title = f"{p.recipe} · cluster {p.cluster.name}" + (f" ({p.cluster.gpu})" if p.cluster.gpu else " (cpu)")
    table = Table(title=title, title_justify="left")
    for col in ("stage", "kind", "nodes×gpus", "tp/pp/cp/dp/vpp", "precision", "mem/gpu", "tokens/s", "steps", "wall"):
        table.add_column(col, justify="right" if col in ("mem/gpu", "tokens/s", "steps", "wall") else "left")
    for j in p.jobs:
        if j.layout is None or j.estimate is None or j.precision is None:
            # A job without a layout (the data stage): its nodes (one per shard on Slurm) × worker processes.
            d = j.data_estimate
            wall = "-" if d is None or not d.input_bytes else ("≥" if d.unknown_sources else "") + human_time(d.wall_time_s)
            table.add_row(j.name, j.kind, f"{j.resources.nodes}×{j.config.get('workers', 1)} cpu", "-", "-", "-", "-", "-",
                          wall)  # fmt: skip
            continue
        lay, est = j.layout, j.estimate
        device = (
            f"{j.resources.nodes}×{j.resources.gpus_per_node}"
            if j.resources.device == "cuda"
            else f"{j.resources.nodes}×{j.resources.processes_per_node} cpu"
        )
        prec = j.precision.dtype + (f" ({j.precision.fp8_recipe})" if j.precision.fp8_recipe else "")
        table.add_row(
            j.name,
            j.kind,
            device,
            f"{lay.tp}/{lay.pp}/{lay.cp}/{lay.dp}/{lay.vpp}",
            prec,
            human_bytes(est.memory.total),
            human_count(est.tokens_per_s),
            str(est.steps),
            human_time(est.wall_time_s),
        )
    n = next((j.estimate.params.total for j in p.jobs if j.estimate), 0)
    caption = [f"{human_count(n)} parameters · vocab {p.model.vocab_size} (padded {p.model.padded_vocab_size}) · run dir {p.run_dir}"]
    for j in p.jobs:
        if (d := j.data_estimate) is not None:
            caption.append(data_caption(j.name, d))
    for j in p.jobs:  # RL roles take turns: mem/gpu is the largest phase's
        if j.estimate is not None and j.estimate.memory.phases:
            phases = " · ".join(f"{k} {human_bytes(v)}" for k, v in j.estimate.memory.phases.items())
            offload = j.config.get("offload") or []
            caption.append(f"{j.name} mem/gpu by phase: {phases}" + (f" (offloaded: {', '.join(offload)})" if offload else ""))
    table.caption = "\n".join(caption)
    return table
