"""Fault injection for crash-safety tests: `ENGINE_FAULT=<point>:<step>` SIGKILLs rank 0 there;
`ENGINE_FAULT=usr2@<point>:<step>` sends it SIGUSR2 instead (what Slurm sends before a job's time limit,
engine.worker.preempt), in a Slurm job's first run only (not once the job was requeued).

Points: `after_step` (after the step's optimizer update and metrics, before any checkpoint of that
step), `in_save` (after every rank has written the checkpoint data, before it is made complete) and
`after_shard_task` (a sharded data stage's shard task of that number has finished).
Unset in normal runs; reading one environment variable is its only cost.
"""

from __future__ import annotations

import os
import signal

from .comm import rank


def maybe_kill(point: str, step: int) -> None:
    spec = os.environ.get("ENGINE_FAULT")
    if not spec or rank() != 0:
        return
    where, _, at = spec.partition(":")
    action, _, where = where.rpartition("@")
    if where != point or not at.isdigit() or int(at) != step:
        return
    if action == "usr2":
        if os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
            os.kill(os.getpid(), signal.SIGUSR2)
        return
    os.kill(os.getpid(), signal.SIGKILL)
