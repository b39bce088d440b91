"""Preemption under Slurm: a signal before the time limit → checkpoint → requeue → resume.

The Slurm launcher asks sbatch for `--signal=USR2@<seconds>`, so every task receives SIGUSR2 that long
before the job's time limit; an operator's `scancel --signal=USR2 <job>` does the same at any time.
The handler only sets a flag. The training loops read it after each optimizer step, agreed over all
ranks by one all-reduce, so that every rank saves the same step. Then rank 0 asks Slurm to requeue the
job and every rank leaves with EXIT_PREEMPTED: non-zero, so that a job whose requeue failed is never
taken for finished and its `afterok` dependents do not start. The requeued job runs the worker afresh,
and the worker resumes from that checkpoint as after any restart.

Outside Slurm nothing is installed and `requested()` costs nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType

from ..errors import EngineError

EXIT_PREEMPTED = 3

_installed = False
_flag = False


class Preempted(Exception):
    """Raised on every rank once the checkpoint is saved and the requeue asked for."""


def _set(signum: int, frame: FrameType | None) -> None:
    global _flag
    _flag = True


def install() -> None:
    """Trap SIGUSR2 when running as a Slurm job (replacing any earlier handler, submitit's included)."""
    global _installed
    if "SLURM_JOB_ID" in os.environ:
        signal.signal(signal.SIGUSR2, _set)
        _installed = True


def requested() -> bool:
    """Whether any rank was signalled; a collective, so every rank must call it at the same step."""
    if not _installed:
        return False
    import torch

    from . import comm

    flag = torch.tensor([1.0 if _flag else 0.0])
    if comm.initialized():
        flag = comm.all_reduce(flag, op="max")
    return bool(flag.item() > 0)


def requeue(step: int) -> None:
    """After the checkpoint of `step` is saved: rank 0 requeues the job, then every rank raises Preempted."""
    requeue_after(f"checkpoint of step {step} saved", resume="resume from it")


def requeue_after(saved: str, *, resume: str) -> None:
    """Once what a rerun resumes from is saved (`saved` says what): rank 0 requeues the job, then every rank
    raises Preempted. `resume` says what resubmitting the run does, should the requeue fail."""
    from . import comm

    if comm.rank() == 0:
        job_id = os.environ["SLURM_JOB_ID"]
        print(f"preempted: {saved}; requeueing Slurm job {job_id}", file=sys.stderr, flush=True)
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise EngineError(f"scontrol requeue {job_id} failed: {done.stderr.strip()}; {saved}: resubmit the run "
                              f"to {resume}")  # fmt: skip
    comm.barrier()
    raise Preempted(saved)
