"""What a run shows at its end: each stage's held-out metrics, from its first evaluation to its last.

Read from `<stage>/metrics.jsonl` (a step logged twice, after a resume, counts once: the later line).
Per kind: pretraining's validation loss and perplexity; SFT's validation loss on assistant tokens;
the reward model's held-out pair accuracy; PPO's held-out reward and exact-match accuracy, greedy and
sampled, before → after. Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def read_metrics(stage_dir: Path) -> list[dict[str, Any]]:
    """The stage's metric lines in step order, one per step."""
    path = stage_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[int(record.get("step", 0))] = record
    return [by_step[s] for s in sorted(by_step)]


def _evals(lines: list[dict[str, Any]], key: str) -> tuple[float, float] | None:
    """(first, last) value of a held-out metric, or None when it was never logged."""
    values = [m[key] for m in lines if key in m]
    return (float(values[0]), float(values[-1])) if values else None


def _arrow(name: str, pair: tuple[float, float] | None, digits: int = 3) -> str | None:
    if pair is None:
        return None
    first, last = pair
    return f"{name} {first:.{digits}f} → {last:.{digits}f}" if first != last else f"{name} {last:.{digits}f}"


def held_out(kind: str, lines: list[dict[str, Any]]) -> str:
    """One line of the stage's held-out results."""
    parts: list[str | None] = []
    if kind == "pretrain":
        loss = _evals(lines, "val_loss")
        if loss is not None:
            parts = [f"val loss {loss[1]:.3f}", f"perplexity {math.exp(min(loss[1], 50.0)):.2f}"]
    elif kind == "sft":
        parts = [_arrow("val loss", _evals(lines, "val_loss"))]
    elif kind == "reward_model":
        parts = [_arrow("pair accuracy", _evals(lines, "val_accuracy"))]
    elif kind == "ppo":
        parts = [
            _arrow("reward", _evals(lines, "val_reward")),
            _arrow("accuracy", _evals(lines, "val_accuracy")),
            _arrow("sampled reward", _evals(lines, "val_sampled_reward")),
            _arrow("sampled accuracy", _evals(lines, "val_sampled_accuracy")),
        ]
    shown = [p for p in parts if p]
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
