"""Launchers: turning a plan's jobs into processes (local torchrun) or Slurm jobs.

Rendering a job into a command is pure and shown by `engine run --dry-run`; submitting is the only
side effect of the whole pipeline.
"""

from __future__ import annotations

from ..compile import Job, Plan
from ..errors import Problem

# Stage kinds whose worker exists. `engine run` refuses a plan with any other kind before it starts.
RUNNABLE_KINDS: frozenset[str] = frozenset()


def unrunnable(plan: Plan) -> list[Problem]:
    return [
        Problem(
            f"stages.{job.name}",
            f"kind {job.kind!r} has no worker in engine {plan.engine_version} yet, so the run cannot start",
            "`engine plan` and `engine run --dry-run` show what it will do",
        )
        for job in plan.jobs
        if job.kind not in RUNNABLE_KINDS
    ]


def render_local(job: Job) -> list[str]:
    """The command the local launcher runs for a job: torchrun for training, plain python for data."""
    worker = list(job.argv[3:])
    if job.layout is None:
        return ["python", "-m", "engine.worker", *worker]
    return [
        "torchrun",
        "--standalone",
        f"--nproc-per-node={job.resources.processes_per_node}",
        "-m",
        "engine.worker",
        *worker,
    ]
