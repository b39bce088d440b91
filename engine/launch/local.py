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

from ..artifacts import is_done
from ..compile import Job, Plan
from ..errors import EngineError
from ..summary import load_run_plan, stage_row
from ..worker.env import cpu_threads
from . import needs_running, render_local, write_run_files

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
    write_run_files(plan, recipe_text)
    done: list[dict[str, str]] = []
    for job in jobs:
        if not needs_running(job):
            done.append(summary(job))
            continue
        logs = Path(job.outputs[0].path).parent / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **job.env}
        if job.layout is not None:
            # Each process its share of the cores, so that processes do not oversubscribe them and a rerun
            # on this machine uses the same thread count (torchrun would set 1 for several processes).
            share = cpu_threads({}, processes_per_node=job.resources.processes_per_node)
            env.setdefault("OMP_NUM_THREADS", str(share))
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


def status(run_dir: Path) -> list[dict[str, str]]:
    """Each job of a local run: finished (with its cache key), started, or not run; where its log is."""
    rows = []
    for job in load_run_plan(run_dir).jobs:
        stage_dir = Path(job.outputs[0].path).parent
        state = "COMPLETED" if is_done(stage_dir, job.cache_key) else ("STARTED" if stage_dir.exists() else "NOT RUN")
        rows.append({"name": job.name, "job_id": "", "state": state, "exit_code": "", "skipped": "",
                     "log": str(stage_dir / "logs" / "launch.log")})  # fmt: skip
    return rows
