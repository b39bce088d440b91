"""A sharded data stage on the dev cluster: one task per shard on each of the two nodes, meeting between
passes, and the same outputs as one local process on the same inputs; preempted, it keeps what finished."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ..data.test_sharded import RECIPE, _corpus, _run
from .conftest import REPO, SlurmDev


def _on_two_nodes(slurm_dev: SlurmDev, tmp_path: Path, **env: str) -> tuple[Path, Path, str]:
    """The stage over 2 shards on the cluster, and the single local process on the same inputs:
    (the cluster run's folder, the local outputs, the Slurm job id)."""
    corpus = tmp_path / "corpus"
    _corpus(corpus)
    one = _run(tmp_path / "one", corpus)
    recipe = tmp_path / "sharded.yaml"
    recipe.write_text(RECIPE.replace("TMP", str(corpus)).replace("name: sharded", "name: sharded\ncluster: dev"))
    run = tmp_path / "two"
    done = subprocess.run([sys.executable, "-m", "engine", "run", str(recipe), f"run_dir={run}", "--wait",
                           "stages.data.dedup.threshold=0.7", "stages.data.shards=2"], capture_output=True,
                          text=True, env={**slurm_dev.env, "OMP_NUM_THREADS": "1", **env}, timeout=900, cwd=REPO)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return run, one, json.loads((run / "slurm.json").read_text())["jobs"][0]["job_id"]


def _same_outputs(out: Path, one: Path) -> None:
    ours, theirs = (json.loads((d / "manifest.json").read_text()) for d in (out, one))
    assert ours["sources"] == theirs["sources"] and ours["report"] == theirs["report"]
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file() and p.name != "manifest.json")
    for f in files:
        assert (out / f).read_bytes() == (one / f).read_bytes(), f


def test_two_shards_on_two_nodes_write_the_single_process_outputs(slurm_dev: SlurmDev, tmp_path: Path) -> None:
    run, one, job = _on_two_nodes(slurm_dev, tmp_path)
    nodes = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "NodeList,NNodes", "-j", job], env=slurm_dev.env,
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert nodes[-1] == "n[1-2]|2", nodes
    _same_outputs(run / "data" / "data", one)
    logs = "".join(p.read_text() for p in (run / "data" / "slurm").glob("*_log.out"))
    assert "over 2 shards, 2 processes" in logs, logs[-3000:]


def test_a_preempted_sharded_stage_is_requeued_and_redoes_only_the_unfinished_tasks(
    slurm_dev: SlurmDev, tmp_path: Path
) -> None:
    """Slurm's signal before the time limit (here sent by the first task to itself once its first shard task
    is done): the round's check sees it on both nodes, the job is requeued with the finished shard tasks kept,
    and its second run skips them and writes the single process's outputs."""
    run, one, job = _on_two_nodes(slurm_dev, tmp_path, ENGINE_FAULT="usr2@after_shard_task:0")
    logs = "".join(p.read_text() for p in sorted((run / "data" / "slurm").glob(f"{job}_*_log.*")))
    assert "preempted: 2 of 2 shard tasks finished and kept; requeueing Slurm job" in logs, logs[-4000:]
    assert "[data] shard task 0: finished in an earlier run, kept" in logs, logs[-4000:]
    shown = subprocess.run(["scontrol", "show", "job", job], env=slurm_dev.env, capture_output=True, text=True).stdout
    assert "Restarts=1" in shown, shown
    _same_outputs(run / "data" / "data", one)
