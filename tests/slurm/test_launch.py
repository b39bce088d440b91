"""The Slurm launcher against the real dev cluster: the tiny recipe as a chain of Slurm jobs, a
two-node gloo group, requeue and signal-driven preemption resuming to the same loss, a failure
cancelling its downstream jobs, and `engine status` / `engine cancel`.

Stages are shortened (tens of steps) so that the module runs in a few minutes on 2 cores."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, SlurmDev

TINY = REPO / "recipes" / "tiny.yaml"
SHORT = [
    "cluster=dev",
    "stages.pretrain.training.steps=30", "stages.pretrain.training.eval_interval=10",
    "stages.pretrain.checkpointing.interval=10",
    "stages.sft.training.steps=20", "stages.sft.training.eval_interval=10",
    "stages.reward.training.steps=20", "stages.reward.training.eval_interval=10",
    "stages.dpo.training.steps=20", "stages.dpo.training.eval_interval=10",
    "stages.ppo.training.steps=2", "stages.ppo.eval_prompts=8",
]  # fmt: skip


def engine(*args: str, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)  # fmt: skip


def metrics(run_dir: Path, stage: str) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]


def record(run_dir: Path) -> dict[str, dict[str, str]]:
    return {j["name"]: j for j in json.loads((run_dir / "slurm.json").read_text())["jobs"]}


def by_step(run_dir: Path, stage: str) -> dict[int, dict[str, float]]:
    return {int(m["step"]): m for m in metrics(run_dir, stage)}  # a step logged twice: the later line wins


@pytest.fixture(scope="module")
def env(slurm_dev: SlurmDev) -> dict[str, str]:
    return {**slurm_dev.env, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def chain(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole tiny recipe on the dev cluster, one Slurm job per stage, waited for."""
    run = tmp_path_factory.mktemp("chain")
    done = engine("run", str(TINY), f"run_dir={run}", *SHORT, "--wait", env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return run


def with_data(chain: Path, target: Path) -> Path:
    """A new run directory holding the chain's data stage (shards and tokenizer)."""
    shutil.copytree(chain / "data", target / "data")
    return target


def test_each_stage_is_its_own_slurm_job_chained_by_afterok(chain: Path, env: dict[str, str]) -> None:
    jobs = record(chain)
    assert list(jobs) == ["data", "pretrain", "sft", "reward", "dpo", "ppo"]
    ids = {name: j["job_id"] for name, j in jobs.items()}
    assert len(set(ids.values())) == 6
    chained = (("pretrain", ["data"]), ("sft", ["data", "pretrain"]), ("dpo", ["data", "sft"]),
               ("ppo", ["data", "sft", "reward"]))  # fmt: skip
    for name, upstream in chained:
        script = (chain / name / "slurm" / f"{ids[name]}_submission.sh").read_text()
        assert f"#SBATCH --dependency=afterok:{':'.join(ids[u] for u in upstream)}" in script, script
        assert "#SBATCH --kill-on-invalid-dep=yes" in script and "#SBATCH --requeue" in script
    for stage in ("pretrain", "sft", "reward", "dpo", "ppo"):
        assert metrics(chain, stage)[-1]["step"] > 0
        assert (chain / stage / "done.json").is_file()
    shown = engine("status", str(chain), env=env)
    assert shown.returncode == 0 and shown.stdout.count("COMPLETED") == 6, shown.stdout
    # Submitting again skips every stage: each finished with the same cache key.
    again = engine("run", str(TINY), f"run_dir={chain}", *SHORT, "--wait", env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert all(j["skipped"] for j in record(chain).values())


def test_two_nodes_one_task_each_train_as_one_gloo_group(chain: Path, env: dict[str, str], tmp_path: Path) -> None:
    """DP=2 across the emulated nodes n1 and n2 equals DP=2 as two tasks on one node (the chain's)."""
    run = with_data(chain, tmp_path)
    done = engine("run", str(TINY), f"run_dir={run}", *SHORT, "--stages", "pretrain", "--wait",
                  "stages.pretrain.resources={nodes: 2, gpus_per_node: 1}", env=env)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    job = record(run)["pretrain"]["job_id"]
    nodes = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "NodeList,NNodes", "-j", job], env=env,
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert nodes[-1] == "n[1-2]|2", nodes
    ours, reference = by_step(run, "pretrain"), by_step(chain, "pretrain")
    for step in (10, 20, 30):
        assert ours[step]["loss"] == pytest.approx(reference[step]["loss"], abs=1e-4), step
        assert ours[step]["val_loss"] == pytest.approx(reference[step]["val_loss"], abs=1e-4), step


def _start_pretrain(chain: Path, run: Path, env: dict[str, str]) -> str:
    done = engine("run", str(TINY), f"run_dir={run}", *SHORT, "--stages", "pretrain",
                  "stages.pretrain.training.steps=80", env=env)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return record(run)["pretrain"]["job_id"]


def _wait_for(predicate: object, timeout: float, what: str) -> None:
    began = time.monotonic()
    while not predicate():  # type: ignore[operator]
        if time.monotonic() - began > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.5)


def _steps_logged(run: Path) -> int:
    path = run / "pretrain" / "metrics.jsonl"
    return (
        max((int(json.loads(line)["step"]) for line in path.read_text().splitlines()), default=0)
        if path.is_file()
        else 0
    )


@pytest.fixture(scope="module")
def uninterrupted(chain: Path, env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = with_data(chain, tmp_path_factory.mktemp("straight"))
    _start_pretrain(chain, run, env)
    _wait_for(lambda: (run / "pretrain" / "done.json").is_file(), 600, "the uninterrupted pretraining")
    return run


@pytest.mark.parametrize("interrupt", ["scontrol requeue", "USR2 before the time limit"])
def test_an_interrupted_job_is_requeued_and_ends_with_the_uninterrupted_loss(
    chain: Path, uninterrupted: Path, env: dict[str, str], tmp_path: Path, interrupt: str
) -> None:
    run = with_data(chain, tmp_path)
    job = _start_pretrain(chain, run, env)
    _wait_for(lambda: _steps_logged(run) >= 25, 600, "step 25")
    if interrupt == "scontrol requeue":  # an operator's requeue: resume from the newest periodic checkpoint
        subprocess.run(["scontrol", "requeue", job], env=env, check=True, capture_output=True)
    else:  # what sbatch --signal sends before the time limit: checkpoint now, then requeue
        subprocess.run(["scancel", "--signal=USR2", job], env=env, check=True, capture_output=True)
    _wait_for(lambda: (run / "pretrain" / "done.json").is_file(), 600, "the requeued job to finish")
    log = (run / "pretrain" / "slurm" / f"{job}_0_log.out").read_text()
    assert "[pretrain] resuming from step" in log, log[-3000:]
    ours, reference = by_step(run, "pretrain"), by_step(uninterrupted, "pretrain")
    assert ours[80]["loss"] == pytest.approx(reference[80]["loss"], abs=1e-5)
    assert ours[80]["val_loss"] == pytest.approx(reference[80]["val_loss"], abs=1e-5)
    if interrupt != "scontrol requeue":  # the checkpoint was taken at the signal, and resumed from
        saved = re.search(r"preempted: checkpoint of step (\d+) saved", log)
        assert saved is not None and int(saved.group(1)) >= 25, log[-3000:]
        assert f"[pretrain] resuming from step {saved.group(1)} " in log, log[-3000:]


def test_a_failed_stage_cancels_its_downstream_jobs_and_status_names_it(
    chain: Path, env: dict[str, str], tmp_path: Path
) -> None:
    """The pretrain checkpoint's tokenizer hash is altered: SFT refuses it at start (exit 2), and Slurm
    cancels the reward model and PPO, which depend on it (--kill-on-invalid-dep=yes)."""
    run = with_data(chain, tmp_path)
    shutil.copytree(chain / "pretrain", run / "pretrain")
    for meta_path in (run / "pretrain" / "checkpoints").glob("step_*/meta.json"):
        meta = json.loads(meta_path.read_text())
        meta["tokenizer"]["sha256"] = "0" * 64
        meta_path.write_text(json.dumps(meta))
    done = engine("run", str(TINY), f"run_dir={run}", *SHORT, "--stages", "sft,reward,ppo", "--wait", env=env)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    states = dict(_status_rows(run, env))
    assert states == {"sft": "FAILED", "reward": "CANCELLED", "ppo": "CANCELLED"}, states
    shown = engine("status", str(run), env=env)
    flat = shown.stdout.replace("\n", "")
    sft = record(run)["sft"]
    assert f"failed: sft (Slurm job {sft['job_id']}, FAILED); its log: {sft['log']}" in flat, shown.stdout
    assert "tokenizer" in Path(sft["log"]).read_text()


def _status_rows(run: Path, env: dict[str, str]) -> list[tuple[str, str]]:
    code = "import json,sys; from engine.launch import slurm; from pathlib import Path; " \
           "print(json.dumps([(j['name'], j['state']) for j in slurm.status(Path(sys.argv[1]))]))"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, str(run)], env=env, capture_output=True, text=True, check=True)
    return [(name, state) for name, state in json.loads(out.stdout)]


def test_cancel_stops_the_whole_chain(chain: Path, env: dict[str, str], tmp_path: Path) -> None:
    run = with_data(chain, tmp_path)
    done = engine("run", str(TINY), f"run_dir={run}", *SHORT, "--stages", "pretrain,sft",
                  "stages.pretrain.training.steps=5000", env=env)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cancelled = engine("cancel", str(run), env=env)
    assert cancelled.returncode == 0 and "cancelled Slurm jobs" in cancelled.stdout, cancelled.stdout
    _wait_for(lambda: all(s == "CANCELLED" for _, s in _status_rows(run, env)), 60, "both jobs to be cancelled")
    assert os.path.isdir(run / "data")  # nothing the run already had is touched
