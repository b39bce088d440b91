"""The Slurm launcher: each job of the plan as one sbatch job, submitted through submitit, chained
with `afterok`.

Rendering is pure. `sbatch_parameters` turns a job and its cluster profile into submitit's
SlurmExecutor parameters: nodes, tasks per node (= GPUs per node, or worker processes on a CPU
profile), GPUs, time limit, partition/account/qos/constraint, the container (pyxis' `srun
--container-image`) or `module load` lines, the job's environment (for example
CUDA_DEVICE_MAX_CONNECTIONS=1 on H100s), `--requeue`, `--kill-on-invalid-dep=yes` and the dependency
on the upstream jobs. `render_sbatch` is submitit's own script text for those parameters, exactly
what `submit` hands to sbatch, and what `engine plan --show-scripts` prints (with the upstream job
ids, unknown before submission, as `<stage>` placeholders).

Every value that reaches the script is checked first (`script_problems`): names, profile fields and
paths must be free of control characters, environment names must be identifiers, and values are
shell-quoted where the script is shell (`export`, `module load`) and by submitit in `#SBATCH` lines.

Each task of a job runs `SlurmWorker`, a picklable callable that submitit's `_submit` calls once per
task: it runs the engine worker in that process, which reads its rank, world size and rendezvous
from Slurm's environment (engine.worker.env). The job's signal (`--signal=USR2@...`, submitit's
`signal_delay_s`) comes before the time limit; the worker then saves a checkpoint and requeues the
job, which resumes from it (engine.worker.preempt). A failed job makes Slurm cancel every job that
depends on it (`--kill-on-invalid-dep=yes`).

The run directory records the submission in `slurm.json` (job ids, names, logs); `engine status`
reads it with sacct, `engine cancel` scancels the chain.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifacts import read_json, write_json_atomic
from ..compile import Job, Plan
from ..errors import EngineError, Problem
from . import needs_running, write_run_files
from .local import missing_inputs

SLURM_RECORD = "slurm.json"
SIGNAL_DELAY_S = 120  # time to save a checkpoint between the signal and the time limit
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# What may stand in an #SBATCH value or a path on the script: no whitespace, quotes or control
# characters (submitit writes `#SBATCH --key=value` lines, which a newline would break out of).
SBATCH_VALUE = re.compile(r"^[A-Za-z0-9_.,:/@%+=~\-\[\]]+$")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class SlurmWorker:
    """What each task of a Slurm job runs (pickled by submitit): the engine worker for one job."""

    plan: str
    job: str
    workdir: str

    def __call__(self) -> str:
        from ..worker.main import main

        os.chdir(self.workdir)
        code = main([self.plan, "--job", self.job])
        if code != 0:
            # A non-zero exit fails the Slurm job, so that its `afterok` dependents are cancelled.
            raise SystemExit(code)
        return self.job


def minutes(limit: str) -> int:
    """A Slurm time limit (`MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS`) in whole minutes."""
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH[:MM[:SS]]
        h, m, s = [*parts, 0, 0][:3]
        return int(days) * 1440 + h * 60 + m + math.ceil(s / 60)
    if len(parts) == 3:
        return parts[0] * 60 + parts[1] + math.ceil(parts[2] / 60)
    if len(parts) == 2:
        return parts[0] + math.ceil(parts[1] / 60)
    return parts[0]


def script_problems(plan: Plan, jobs: list[Job], *, folder_root: str) -> list[Problem]:
    """Everything that would reach an sbatch script unsafely: one problem per value, with the fix."""
    c = plan.cluster
    problems: list[Problem] = []

    def value(path: str, v: str | None, fix: str) -> None:
        if v is not None and not SBATCH_VALUE.fullmatch(v):
            problems.append(Problem(path, f"={v!r} has characters an sbatch script cannot carry safely", fix))

    for field in ("partition", "account", "qos", "constraint", "container_image"):
        value(f"cluster({c.name}).{field}", getattr(c, field), "use letters, digits and . , : / @ % + = ~ - _ [ ]")
    for i, mount in enumerate(c.container_mounts):
        value(f"cluster({c.name}).container_mounts[{i}]", mount, "use src:dst paths without spaces or quotes")
    for i, module in enumerate(c.modules):
        value(f"cluster({c.name}).modules[{i}]", module, "name a module as `module load` expects it")
    value("run_dir", folder_root, "choose a run_dir without spaces, quotes or control characters")
    for job in jobs:
        for key, v in job.env.items():
            if not ENV_NAME.fullmatch(key):
                problems.append(Problem(f"cluster({c.name}).env", f"{key!r} is not an environment variable name",
                                        "use letters, digits and _, not starting with a digit"))  # fmt: skip
            if CONTROL.search(v):
                problems.append(Problem(f"cluster({c.name}).env.{key}", f"={v!r} contains a control character",
                                        "put the value on one line"))  # fmt: skip
    return problems


def sbatch_parameters(plan: Plan, job: Job, *, folder_root: str, dependency: str | None) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for one job (values checked by script_problems)."""
    c, r = plan.cluster, job.resources
    env = dict(job.env)
    if r.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")  # one process per core, not one thread pool per process
    setup = [f"module load {shlex.quote(m)}" for m in c.modules]
    setup += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    params: dict[str, Any] = {
        "job_name": f"{plan.recipe}.{job.name}",
        "nodes": r.nodes,
        "ntasks_per_node": r.processes_per_node,
        "time": minutes(r.time_limit),
        "signal_delay_s": SIGNAL_DELAY_S,
        "stderr_to_stdout": True,
        "setup": setup,
        "additional_parameters": {"requeue": True, "kill-on-invalid-dep": "yes", "chdir": folder_root},
    }
    if r.device == "cuda":
        params["gpus_per_node"] = r.gpus_per_node
    if r.cpus_per_process > 1:  # the data stage's worker pool
        params["cpus_per_task"] = r.cpus_per_process
    for field in ("partition", "account", "qos", "constraint"):
        if getattr(c, field):
            params[field] = getattr(c, field)
    if c.container_image:
        srun = [f"--container-image={c.container_image}"]
        if c.container_mounts:
            srun.append(f"--container-mounts={','.join(c.container_mounts)}")
        params["srun_args"] = srun
    if dependency:
        params["dependency"] = dependency
    return params


def job_folder(folder_root: str, plan: Plan, job: Job) -> Path:
    """Where submitit keeps a job's pickles and logs (`%j`: the Slurm job id)."""
    return Path(folder_root) / Path(job.outputs[0].path).parent / "slurm"


def render_sbatch(plan: Plan, job: Job, *, folder_root: str, dependency: str | None, python: str) -> str:
    """The sbatch script submitit writes for this job (submitit's own renderer)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = job_folder(folder_root, plan, job)
    command = " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])
    params = sbatch_parameters(plan, job, folder_root=folder_root, dependency=dependency)
    return str(_make_sbatch_string(command=command, folder=folder, **params))


def afterok(ids: list[str]) -> str | None:
    return "afterok:" + ":".join(ids) if ids else None


def show_scripts(
    plan: Plan, jobs: list[Job] | None = None, *, folder_root: str | None = None, python: str | None = None
) -> str:
    """Every job's script as `engine run` here would submit it, upstream ids as `<stage>` placeholders."""
    root = folder_root or os.getcwd()
    py = python or shlex.quote(sys.executable)
    # The same checks as a submission: nothing unsafe is ever rendered into a script, not even to show it.
    problems = script_problems(plan, list(jobs if jobs is not None else plan.jobs), folder_root=root)
    if problems:
        from ..errors import RecipeError

        raise RecipeError(problems)
    parts = []
    for job in jobs if jobs is not None else plan.jobs:
        dep = afterok([f"<{d}>" for d in job.depends_on])
        text = render_sbatch(plan, job, folder_root=root, dependency=dep, python=py)
        parts.append(f"# ---- {job.name} ----\n{text}")
    return "\n".join(parts)


def submit(plan: Plan, jobs: list[Job], *, recipe_text: str) -> list[dict[str, str]]:
    """Submit the jobs in DAG order, each depending (afterok) on its upstream jobs of this run."""
    import submitit

    if shutil.which("sbatch") is None:
        raise EngineError(f"cluster={plan.cluster.name!r} submits to Slurm, but sbatch is not on PATH; run from a Slurm "
                          "login node (`engine plan --show-scripts` shows what would be submitted)")  # fmt: skip
    root = os.getcwd()
    problems = script_problems(plan, jobs, folder_root=root)
    if problems:
        from ..errors import RecipeError

        raise RecipeError(problems)
    missing = missing_inputs(jobs)
    if missing:
        raise EngineError("; ".join(missing) + "; run those stages first (nothing was submitted)")
    run_dir = Path(plan.run_dir)
    queued = [j for j in status(run_dir) if j["state"] in ACTIVE]
    if queued:
        listed = ", ".join(f"{j['name']}={j['job_id']}" for j in queued)
        raise EngineError(f"run {run_dir} still has Slurm jobs queued or running ({listed}); wait for them, or "
                          f"`engine cancel {run_dir}` first")  # fmt: skip
    write_run_files(plan, recipe_text)
    plan_path = str(Path(root) / run_dir / "plan.json")
    ids: dict[str, str] = {}
    record = []
    for job in jobs:
        if not needs_running(job):
            record.append({"name": job.name, "job_id": "", "log": "", "skipped": "finished earlier"})
            write_json_atomic(run_dir / SLURM_RECORD, {"cluster": plan.cluster.name, "jobs": record})
            continue
        upstream = [ids[d] for d in job.depends_on if d in ids]
        folder = job_folder(root, plan, job)
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=3)
        ex.update_parameters(**sbatch_parameters(plan, job, folder_root=root, dependency=afterok(upstream)))
        try:
            submitted = ex.submit(SlurmWorker(plan=plan_path, job=job.name, workdir=root))
        except Exception as exc:  # sbatch's refusal (bad partition, no cluster): its own words
            done_ids = ", ".join(f"{n}={i}" for n, i in ids.items()) or "none"
            raise EngineError(f"sbatch refused stage {job.name!r}: {str(exc).strip()[-600:]}; jobs already submitted: "
                              f"{done_ids} (`engine cancel {run_dir}` removes them)") from None  # fmt: skip
        ids[job.name] = str(submitted.job_id)
        log = str(folder / f"{submitted.job_id}_0_log.out")
        record.append({"name": job.name, "job_id": ids[job.name], "log": log, "skipped": ""})
        # After every submission, so that `engine cancel` finds a chain that stopped half-way.
        write_json_atomic(run_dir / SLURM_RECORD, {"cluster": plan.cluster.name, "jobs": record})
        print(f"==> {job.name} ({job.kind}): Slurm job {submitted.job_id}"
              + (f", after {', '.join(upstream)}" if upstream else "") + f"; log {log}", flush=True)  # fmt: skip
    return record


# Slurm job states (sacct's first word) by what they mean for the chain.
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
          "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"}  # fmt: skip
FAILED = {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def sacct_states(ids: list[str]) -> dict[str, tuple[str, str]]:
    """{job id: (state, exit code)} for the allocations of these jobs; the newest record wins."""
    if not ids:
        return {}
    done = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobIDRaw,State,ExitCode", "-j", ",".join(ids)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        raise EngineError(f"sacct failed: {done.stderr.strip()}; is this a Slurm login node with accounting?")
    states: dict[str, tuple[str, str]] = {}
    for line in done.stdout.splitlines():
        fields = line.split("|")
        if len(fields) == 3:
            states[fields[0]] = (fields[1].split()[0] if fields[1] else "UNKNOWN", fields[2])
    return states


def status(run_dir: Path) -> list[dict[str, str]]:
    """The run's Slurm jobs with their current state (empty when the run was never submitted)."""
    path = run_dir / SLURM_RECORD
    if not path.is_file():
        return []
    jobs: list[dict[str, str]] = read_json(path)["jobs"]
    states = sacct_states([j["job_id"] for j in jobs if j["job_id"]])
    for j in jobs:
        j["state"], j["exit_code"] = states.get(j["job_id"], ("SKIPPED" if j["skipped"] else "UNKNOWN", ""))
    return jobs


def cancel(run_dir: Path) -> list[str]:
    """scancel every job of the run that is still queued or running; the ids cancelled."""
    # A job sacct does not know yet (just submitted, accounting lagging) counts as queued.
    ids = [j["job_id"] for j in status(run_dir) if j["state"] in ACTIVE or (j["state"] == "UNKNOWN" and j["job_id"])]
    if ids:
        done = subprocess.run(["scancel", *ids], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise EngineError(f"scancel {' '.join(ids)} failed: {done.stderr.strip()}")
    return ids


def wait(run_dir: Path, *, poll_s: float = 5.0, timeout_s: float | None = None) -> list[dict[str, str]]:
    """Poll until no job of the run is queued or running; the final states."""
    began = time.monotonic()
    while True:
        jobs = status(run_dir)
        if not any(j["state"] in ACTIVE or (j["state"] == "UNKNOWN" and j["job_id"]) for j in jobs):
            return jobs
        if timeout_s is not None and time.monotonic() - began > timeout_s:
            return jobs
        time.sleep(poll_s)
