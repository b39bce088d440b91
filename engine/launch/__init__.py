"""Launchers: turning a plan's jobs into processes (local torchrun) or Slurm jobs.

Rendering a job into a command is pure and shown by `engine run --dry-run`; submitting is the only
side effect of the whole pipeline.
"""

from __future__ import annotations

from pathlib import Path

from ..artifacts import claim_stage, is_done, write_json_atomic
from ..compile import Job, Plan
from ..errors import Problem
from ..kinds import KINDS


def select(plan: Plan, only: list[str] | None) -> tuple[list[Job], list[Problem]]:
    """The jobs to run (all, or those named) and the problems that keep the run from starting."""
    names = [j.name for j in plan.jobs]
    unknown = [n for n in only or [] if n not in names]
    if unknown:
        return [], [Problem("--stages", f"names no stage: {', '.join(unknown)}", f"stages: {', '.join(names)}")]
    jobs = [j for j in plan.jobs if only is None or j.name in only]
    # A plan written by another engine version may name kinds this one does not know; `engine run`
    # refuses it before anything starts.
    problems = [
        Problem(
            f"stages.{job.name}",
            f"kind {job.kind!r} has no worker in engine {plan.engine_version} yet, so the run cannot start",
            "run the other stages with --stages; `engine run --dry-run` shows what it will do",
        )
        for job in jobs
        if job.kind not in KINDS
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


def write_run_files(plan: Plan, recipe_text: str) -> Path:
    """The run directory with the plan and the resolved recipe, before any job starts."""
    run_dir = Path(plan.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "plan.json", plan.model_dump(mode="json"))
    (run_dir / "recipe.resolved.yaml").write_text(recipe_text, encoding="utf-8")
    return run_dir


def needs_running(job: Job) -> bool:
    """False for a stage that finished with this job's cache key; otherwise the stage folder is claimed
    for this key (another key's work moved aside, never deleted) and the job must run."""
    stage_dir = Path(job.outputs[0].path).parent
    if is_done(stage_dir, job.cache_key):
        print(f"==> {job.name} ({job.kind}): finished earlier with the same inputs; skipped", flush=True)
        return False
    moved = claim_stage(stage_dir, job.cache_key)
    if moved is not None:
        print(f"==> {job.name}: the recipe or an upstream stage changed; earlier work kept in {moved}", flush=True)
    return True
