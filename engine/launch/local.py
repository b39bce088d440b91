"""The local launcher: each job as a torchrun (or plain python) subprocess, in DAG order.

The plan and the resolved recipe are written into the run directory first; every job's output is
streamed to the console and to `<stage>/logs/launch.log`. A worker that refuses to start because of a
user error (a missing input, a checkpoint that does not fit the stage) prints one `error: ` line; the
launcher reports that line alone, with exit code 2, and leaves torchrun's report of the failed process
to the log. A failed job stops the run: later jobs, which depend on its artifacts, are not started.
Nothing already in the run directory is removed, so a rerun resumes every stage from its newest
checkpoint; a stage that finished with the same cache key (its `done.json`) is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..artifacts import claim_stage, is_done, write_json_atomic
from ..compile import Job, Plan
from ..errors import EngineError
from ..summary import stage_row
from . import render_local

USER_ERROR = "error: "  # how a worker's rank 0 reports a user error (engine.worker.main), one line


def command(job: Job) -> list[str]:
    """render_local with this interpreter, so that the run uses the engine's own environment."""
    argv = render_local(job)
    if argv[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    return [sys.executable, *argv[1:]]


def summary(job: Job) -> dict[str, str]:
    """The final table's row for a finished job."""
    return stage_row(job.name, job.kind, Path(job.outputs[0].path))


def missing_inputs(jobs: list[Job]) -> list[str]:
    """Inputs produced by stages outside this run that are not on disk: checked before launching."""
    produced = {a.path for j in jobs for a in j.outputs}
    missing = []
    for job in jobs:
        for art in job.inputs:
            if art.path in produced:
                continue
            marker = Path(art.path) / ("manifest.json" if art.kind == "dataset" else "")
            if not marker.exists():
                missing.append(f"stage {job.name!r} needs the {art.kind} of stage {art.stage!r} at {marker}")
    return missing


def run_local(plan: Plan, jobs: list[Job], *, recipe_text: str) -> list[dict[str, str]]:
    missing = missing_inputs(jobs)
    if missing:
        raise EngineError("; ".join(missing) + "; run those stages first (nothing was launched)")
    run_dir = Path(plan.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "plan.json", plan.model_dump(mode="json"))
    (run_dir / "recipe.resolved.yaml").write_text(recipe_text, encoding="utf-8")
    done: list[dict[str, str]] = []
    for job in jobs:
        stage_dir = Path(job.outputs[0].path).parent
        if is_done(stage_dir, job.cache_key):
            print(f"==> {job.name} ({job.kind}): finished earlier with the same inputs; skipped", flush=True)
            done.append(summary(job))
            continue
        moved = claim_stage(stage_dir, job.cache_key)
        if moved is not None:
            print(f"==> {job.name}: the recipe or an upstream stage changed; earlier work kept in {moved}", flush=True)
        logs = stage_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **job.env}
        if job.layout is not None and job.resources.processes_per_node > 1:
            env.setdefault("OMP_NUM_THREADS", "1")
        print(f"==> {job.name} ({job.kind}): {' '.join(render_local(job))}", flush=True)
        with (logs / "launch.log").open("a", encoding="utf-8") as log:
            proc = subprocess.Popen(command(job), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            user_error = None
            for line in proc.stdout:
                log.write(line)
                if user_error is None and line.startswith(USER_ERROR):
                    # A worker refused to start (bad input, contract mismatch): what follows is
                    # torchrun's report of the failed process, which the log keeps.
                    user_error = line[len(USER_ERROR) :].strip()
                if user_error is None:
                    sys.stdout.write(line)
            code = proc.wait()
        if code != 0 and user_error is not None:
            raise EngineError(f"stage {job.name!r}: {user_error}")
        if code != 0:
            raise EngineError(f"stage {job.name!r} failed with exit code {code}; its log: {logs / 'launch.log'}")
        done.append(summary(job))
    return done
