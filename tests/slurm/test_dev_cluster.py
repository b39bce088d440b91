"""Smoke tests of the Slurm dev cluster: what the Slurm executor relies on works on it.

Batch jobs complete and sacct reports them; a two-node job's srun reaches both nodes; submitit
gets a result back, and a cancelled job makes `result()` raise instead of hanging; a requeued job
runs again within seconds; a job whose afterok dependency failed is cancelled.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import submitit

if TYPE_CHECKING:
    from tests.slurm.conftest import SlurmDev

REQUEUE_LIMIT_S = 20
CANCEL_LIMIT_S = 90


def _wait_for(path: Path, predicate: str, timeout: float) -> str:
    """Waits until the text of `path` contains `predicate`; returns the text."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if predicate in text:
            return text
        time.sleep(0.2)
    raise AssertionError(f"{path} has no {predicate!r} after {timeout}s")


def test_batch_job_completes_and_sacct_reports_it(slurm_dev: SlurmDev, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    job = slurm_dev.sbatch(f"--output={out}", "--wrap", "echo hello from $SLURMD_NODENAME")

    assert slurm_dev.wait_state(job) == "COMPLETED", slurm_dev.log_tail()
    assert out.read_text().strip() in {"hello from n1", "hello from n2"}


def test_two_node_job_runs_srun_on_both_nodes(slurm_dev: SlurmDev, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    step = "echo $SLURM_NODEID $SLURMD_NODENAME $SLURM_PROCID"
    job = slurm_dev.sbatch("--nodes=2", "--ntasks-per-node=1", f"--output={out}", "--wrap", f"srun bash -c '{step}'")

    assert slurm_dev.wait_state(job) == "COMPLETED", out.read_text() if out.exists() else slurm_dev.log_tail()
    assert sorted(out.read_text().splitlines()) == ["0 n1 0", "1 n2 1"]


def test_submitit_returns_a_result_and_a_cancelled_job_raises(slurm_environ: SlurmDev) -> None:
    executor = submitit.AutoExecutor(folder=slurm_environ.submitit_dir / "%j", cluster="slurm")
    executor.update_parameters(
        slurm_partition=slurm_environ.partition, timeout_min=5, nodes=1, tasks_per_node=1, cpus_per_task=1
    )

    def where(x: int) -> tuple[int, str]:
        import os

        return x * 2, os.environ["SLURM_JOB_ID"]

    job = executor.submit(where, 21)
    assert job.result() == (42, job.job_id)

    sleeper = executor.submit(time.sleep, 600)
    slurm_environ.wait_state(sleeper.job_id, {"RUNNING"})
    slurm_environ.run("scancel", sleeper.job_id)
    # submitit waits on sacct; were sacct missing, result() would poll forever. Guard with a thread.
    outcome: list[BaseException | object] = []
    started = time.monotonic()
    waiter = threading.Thread(target=lambda: outcome.append(_result_or_error(sleeper)), daemon=True)
    waiter.start()
    waiter.join(CANCEL_LIMIT_S)
    elapsed = time.monotonic() - started

    assert outcome, f"result() of a cancelled job still blocks after {elapsed:.0f}s"
    assert isinstance(outcome[0], submitit.core.utils.UncompletedJobError), outcome[0]
    assert "CANCELLED" in str(outcome[0])


def _result_or_error(job: submitit.Job[None]) -> BaseException | object:
    try:
        return job.result()
    except Exception as error:
        return error


def test_requeued_job_runs_again_within_seconds(slurm_dev: SlurmDev, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    job = slurm_dev.sbatch(
        f"--output={out}", "--open-mode=append", "--wrap", "echo run ${SLURM_RESTART_COUNT:-0}; sleep 600"
    )
    _wait_for(out, "run 0", timeout=30)

    requeued = time.monotonic()
    slurm_dev.run("scontrol", "requeue", job)
    _wait_for(out, "run 1", timeout=60)
    delay = time.monotonic() - requeued
    slurm_dev.run("scancel", job)

    assert delay < REQUEUE_LIMIT_S, f"the requeued job started again after {delay:.1f}s (limit {REQUEUE_LIMIT_S}s)"


def test_afterok_dependency_on_a_failed_job_is_cancelled(slurm_dev: SlurmDev) -> None:
    failing = slurm_dev.sbatch("--output=/dev/null", "--wrap", "exit 3")
    dependent = slurm_dev.sbatch(
        "--output=/dev/null", f"--dependency=afterok:{failing}", "--kill-on-invalid-dep=yes", "--wrap", "true"
    )

    assert slurm_dev.wait_state(failing) == "FAILED"
    assert slurm_dev.wait_state(dependent) == "CANCELLED"
