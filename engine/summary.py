"""What a run shows at its end: each stage's held-out metrics, from its first evaluation to its last.

Read from `<stage>/metrics.jsonl` (a step logged twice, after a resume, counts once: the later line).
Which metrics a kind shows is its `held_out` declaration (engine.kinds): pretraining's validation loss
and perplexity; SFT's validation loss on assistant tokens; the reward model's held-out pair accuracy;
PPO's held-out reward and exact-match accuracy, greedy and sampled, before → after. Nothing here
imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .compile import Plan
from .errors import EngineError
from .kinds import KINDS
from .kinds.base import HeldOut


def read_metrics_file(path: Path) -> list[dict[str, float]]:
    """One row per step, sorted by step, of the numeric values in a metrics.jsonl; a step's later line
    wins, and a torn line (the last line of a killed job) is skipped."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    by_step: dict[int, dict[str, float]] = {}
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and _is_number(record.get("step")):
            by_step[int(record["step"])] = {str(k): float(v) for k, v in record.items() if _is_number(v)}
    return [by_step[s] for s in sorted(by_step)]


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def read_metrics(stage_dir: Path) -> list[dict[str, float]]:
    """The stage's metric lines in step order, one per step."""
    return read_metrics_file(stage_dir / "metrics.jsonl")


def load_run_plan(run_dir: Path) -> Plan:
    """A run directory's plan.json, or one user error saying what is wrong with it."""
    path = run_dir / "plan.json"
    if not path.is_file():
        raise EngineError(f"{run_dir} is not a run directory (no plan.json); give runs/<name>")
    try:
        return Plan.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EngineError(f"{path} is not a plan.json this engine version reads ({reason})") from None


def _evals(lines: list[dict[str, Any]], key: str) -> tuple[float, float] | None:
    """(first, last) value of a held-out metric, or None when it was never logged."""
    values = [m[key] for m in lines if key in m]
    return (float(values[0]), float(values[-1])) if values else None


def _shown(metric: HeldOut, pair: tuple[float, float] | None) -> str | None:
    """`label first → last` (or `label last` when it did not change, or for a metric shown by its last value)."""
    if pair is None or metric.summary is None:
        return None
    first, last = (metric.value(v) for v in pair)
    d = metric.digits
    if metric.change and first != last:
        return f"{metric.summary} {first:.{d}f} → {last:.{d}f}"
    return f"{metric.summary} {last:.{d}f}"


def held_out(kind: str, lines: list[dict[str, Any]]) -> str:
    """One line of the stage's held-out results."""
    metrics = KINDS[kind].held_out if kind in KINDS else ()
    shown = [p for m in metrics if (p := _shown(m, _evals(lines, m.key)))]
    return " · ".join(shown) if shown else "-"


def stage_row(name: str, kind: str, output: Path) -> dict[str, str]:
    """The final table's row for one stage: steps, held-out results, where its artifact is."""
    stage_dir = output.parent
    lines = read_metrics(stage_dir)
    steps = str(int(lines[-1]["step"])) if lines else "-"
    version = ""
    lineage = stage_dir / "lineage.json"
    if lineage.is_file():
        version = str(json.loads(lineage.read_text(encoding="utf-8")).get("version", ""))
    return {"stage": name, "steps": steps, "held_out": held_out(kind, lines), "artifact": str(output),
            "version": version}  # fmt: skip
