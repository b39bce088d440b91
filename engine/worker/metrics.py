"""Per-step metrics: metrics.jsonl and TensorBoard events in the stage folder, progress on the console.

Only global rank 0 writes. Lines in metrics.jsonl are flushed as they are written, so a killed job
keeps every step it finished; a resumed job appends. On a GPU each line also records rank 0's peak
allocated memory so far (`gpu_max_allocated_bytes`, torch.cuda.max_memory_allocated), the number the
plan's per-GPU memory estimate is checked against.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

# What the console line shows, in this order (everything goes to metrics.jsonl and TensorBoard).
CONSOLE = ("loss", "reward", "kl", "val_loss", "val_accuracy", "val_reward", "val_sampled_accuracy", "lr",
           "tokens_per_s")  # fmt: skip
HELD_OUT = {"val_loss", "val_accuracy", "val_reward"}  # a line with any of these is always printed


class Metrics:
    def __init__(self, folder: Path, *, name: str, total_steps: int, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.name = name
        self.total = total_steps
        self.tb: Any = None
        self.file: TextIO | None = None
        self.progress: Any = None
        self.task: Any = None
        self.last_print = 0.0
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        self.file = (folder / "metrics.jsonl").open("a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(folder / "tensorboard"))
        except ImportError:  # tensorboard is a declared dependency; keep training if it is broken
            self.tb = None
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn(f"[bold]{name}[/]"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
            )  # fmt: skip
            self.task = self.progress.add_task(name, total=total_steps, completed=start_step, info="")
            self.progress.start()

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (round(v, 8) if isinstance(v, float) else v) for k, v in values.items()}}
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            record["gpu_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        assert self.file is not None
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{self.name}/{k}", v, step)
        info = "  ".join(f"{k} {values[k]:.4g}" for k in CONSOLE if k in values)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)
        elif time.monotonic() - self.last_print > 5 or step in (0, 1, self.total) or HELD_OUT & values.keys():
            self.last_print = time.monotonic()
            print(f"[{self.name}] step {step}/{self.total}  {info}", flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()
