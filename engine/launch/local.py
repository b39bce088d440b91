"""The local launcher: each job as a torchrun (or plain python) subprocess, in DAG order.

The plan and the resolved recipe are written into the run directory first; every job's output is
streamed to the console and to `<stage>/logs/launch.log`. A failed job stops the run: later jobs,
which depend on its artifacts, are not started. Nothing already in the run directory is removed, so a
rerun resumes every stage from its newest checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..artifacts import write_json_atomic
from ..compile import Job, Plan
from ..errors import EngineError
from . import render_local


def command(job: Job) -> list[str]:
    """render_local with this interpreter, so that the run uses the engine's own environment."""
    argv = render_local(job)
    if argv[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    return [sys.executable, *argv[1:]]


def run_local(plan: Plan, jobs: list[Job], *, recipe_text: str) -> None:
    run_dir = Path(plan.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "plan.json", plan.model_dump(mode="json"))
    (run_dir / "recipe.resolved.yaml").write_text(recipe_text, encoding="utf-8")
    for job in jobs:
        logs = Path(job.outputs[0].path).parent / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **job.env}
        if job.layout is not None and job.resources.processes_per_node > 1:
            env.setdefault("OMP_NUM_THREADS", "1")
        print(f"==> {job.name} ({job.kind}): {' '.join(render_local(job))}", flush=True)
        with (logs / "launch.log").open("a", encoding="utf-8") as log:
            proc = subprocess.Popen(command(job), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                sys.stdout.write(line)
            code = proc.wait()
        if code != 0:
            raise EngineError(f"stage {job.name!r} failed with exit code {code}; its log: {logs / 'launch.log'}")
