"""Launchers: turning a plan's jobs into processes (local torchrun) or Slurm jobs.

Rendering a job into a command is pure and shown by `engine run --dry-run`; submitting is the only
side effect of the whole pipeline.
"""

from __future__ import annotations

from ..compile import Job, Plan
from ..errors import Problem

# Stage kinds whose worker exists. `engine run` refuses a plan with any other kind before it starts.
RUNNABLE_KINDS: frozenset[str] = frozenset({"data", "pretrain", "sft", "reward_model", "ppo"})


def select(plan: Plan, only: list[str] | None) -> tuple[list[Job], list[Problem]]:
    """The jobs to run (all, or those named) and the problems that keep the run from starting."""
    names = [j.name for j in plan.jobs]
    unknown = [n for n in only or [] if n not in names]
    if unknown:
        return [], [Problem("--stages", f"names no stage: {', '.join(unknown)}", f"stages: {', '.join(names)}")]
    jobs = [j for j in plan.jobs if only is None or j.name in only]
    problems = [
        Problem(
            f"stages.{job.name}",
            f"kind {job.kind!r} has no worker in engine {plan.engine_version} yet, so the run cannot start",
            "run the other stages with --stages; `engine run --dry-run` shows what it will do",
        )
        for job in jobs
        if job.kind not in RUNNABLE_KINDS
    ]
    problems += [
        Problem(
            f"stages.{job.name}.parallelism.pp",
            f"={job.layout.pp}: the PPO worker of engine {plan.engine_version} runs rollouts without pipeline "
            "parallelism, so the run cannot start",
            "use pp: 1 and split the model with tp (the plan itself is valid for later versions)",
        )
        for job in jobs
        if job.kind == "ppo" and job.layout is not None and job.layout.pp > 1
    ]
    return jobs, problems


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
