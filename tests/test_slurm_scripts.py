"""The Slurm launcher's pure half: sbatch scripts (golden-pinned), time limits, and values that must
never reach a script unquoted or unchecked. No cluster needed (tests/slurm/ has the real one).

Refresh the golden scripts after an intended change with: ENGINE_UPDATE_GOLDEN=1 pytest tests/test_slurm_scripts.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.errors import RecipeError
from engine.launch.slurm import minutes, sbatch_parameters, script_problems, show_scripts

from .conftest import REPO, compile_with

GOLDEN = REPO / "tests" / "golden"
H100_8B = REPO / "recipes" / "h100" / "llama3_8b.yaml"


@pytest.mark.parametrize(("recipe", "overrides"), [(H100_8B, ()), (REPO / "recipes" / "tiny.yaml", ("cluster=dev",))])
def test_sbatch_scripts_match_golden_files(recipe: Path, overrides: tuple[str, ...]) -> None:
    plan = compile_with(*overrides, recipe=recipe)
    text = show_scripts(plan, folder_root="/shared/project", python="/opt/venv/bin/python")
    golden = GOLDEN / f"{recipe.stem}.{plan.cluster.name}.sbatch"
    if os.environ.get("ENGINE_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"{golden.name} differs; if intended, ENGINE_UPDATE_GOLDEN=1"


def test_h100_scripts_ask_for_gpus_container_and_environment() -> None:
    plan = compile_with(recipe=H100_8B)
    job = next(j for j in plan.jobs if j.kind == "pretrain")
    text = show_scripts(plan, folder_root="/p", python="python")
    assert f"#SBATCH --gpus-per-node={job.resources.gpus_per_node}" in text
    assert f"#SBATCH --ntasks-per-node={job.resources.processes_per_node}" in text
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in text
    assert "--container-image=nvcr.io/nvidia/pytorch:25.04-py3" in text
    assert "#SBATCH --signal=USR2@120" in text and "#SBATCH --requeue" in text


def test_a_sharded_data_stage_asks_for_a_node_per_shard_and_its_workers_cores() -> None:
    plan = compile_with("stages.data.shards=16", recipe=REPO / "recipes" / "h100" / "llama3_70b.yaml")
    job = plan.job("data")
    assert (job.resources.nodes, job.resources.processes_per_node, job.resources.cpus_per_process) == (16, 1, 64)
    params = sbatch_parameters(plan, job, folder_root="/shared", dependency=None)
    assert params["nodes"] == 16 and params["ntasks_per_node"] == 1 and params["cpus_per_task"] == 64
    # Locally one process runs every shard's tasks in turn.
    local = compile_with("stages.data.shards=4", "tokenizer={kind: file, path: /t.json, vocab_size: 384}").job("data")
    assert local.resources.nodes == 1


def test_cli_prints_scripts_and_refuses_a_local_cluster() -> None:
    shown = subprocess.run([sys.executable, "-m", "engine", "plan", str(H100_8B), "--show-scripts"],
                           capture_output=True, text=True, cwd=REPO, check=False)  # fmt: skip
    assert shown.returncode == 0 and shown.stdout.count("#!/bin/bash") >= 2, shown.stderr
    assert f"#SBATCH --chdir={REPO}" in shown.stdout
    local = subprocess.run([sys.executable, "-m", "engine", "plan", "recipes/tiny.yaml", "--show-scripts"],
                           capture_output=True, text=True, cwd=REPO, check=False)  # fmt: skip
    assert local.returncode == 2 and "runs jobs locally" in local.stderr and "Traceback" not in local.stderr


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        ("30", 30),
        ("90:30", 91),
        ("04:00:00", 240),
        ("01:00:01", 61),
        ("2-00:00:00", 2880),
        ("1-12", 2160),
        ("1-0:30", 1470),
    ],
)
def test_time_limits_in_minutes(limit: str, expected: int) -> None:
    assert minutes(limit) == expected


INJECTIONS = ["dev\n#SBATCH --wrap=touch /tmp/pwned", "dev; touch /tmp/pwned", "$(touch /tmp/pwned)", "a b", "x'y"]


def _profile(tmp_path: Path, **fields: object) -> Path:
    base = yaml.safe_load((REPO / "slurm" / "clusters" / "dev.yaml").read_text())
    path = tmp_path / "evil.yaml"
    path.write_text(yaml.safe_dump({**base, **fields}))
    return path


@pytest.mark.parametrize("evil", INJECTIONS)
@pytest.mark.parametrize("field", ["partition", "account", "qos", "constraint", "container_image"])
def test_unsafe_profile_values_are_refused_before_any_script(tmp_path: Path, field: str, evil: str) -> None:
    plan = compile_with(f"cluster={_profile(tmp_path, **{field: evil})}")
    problems = script_problems(plan, list(plan.jobs), folder_root="/p")
    assert [p.path for p in problems] == [f"cluster(dev).{field}"], problems
    assert "cannot carry safely" in problems[0].message


@pytest.mark.parametrize("evil", [*INJECTIONS, "/tmp/run dir", "/tmp/run\ndir"])
def test_unsafe_run_directories_are_refused(evil: str) -> None:
    plan = compile_with("cluster=dev")
    problems = script_problems(plan, list(plan.jobs), folder_root=evil)
    assert [p.path for p in problems] == ["run_dir"], problems


def test_environment_values_reach_the_script_quoted(tmp_path: Path) -> None:
    """Values with shell syntax are exported literally: running the setup lines creates no file."""
    marker = tmp_path / "pwned"
    evil = {"A": f"$(touch {marker})", "B": f"`touch {marker}`; echo", "C": 'it\'s "quoted" & <more>'}
    plan = compile_with(f"cluster={_profile(tmp_path, env=evil)}")
    job = plan.jobs[1]
    assert script_problems(plan, [job], folder_root="/p") == []
    setup = sbatch_parameters(plan, job, folder_root="/p", dependency=None)["setup"]
    printed = subprocess.run(["bash", "-c", "\n".join([*setup, 'printf "%s|%s|%s" "$A" "$B" "$C"'])],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert printed == "|".join(evil.values())
    assert not marker.exists()


def test_control_characters_and_bad_names_in_the_environment_are_refused(tmp_path: Path) -> None:
    profile = _profile(tmp_path, env={"GOOD": "a\nb", "BAD NAME": "x", "1X": "y"})
    plan = compile_with(f"cluster={profile}")
    problems = script_problems(plan, [plan.jobs[0]], folder_root="/p")
    assert sorted(p.path for p in problems) == ["cluster(dev).env", "cluster(dev).env", "cluster(dev).env.GOOD"]


def test_submitting_without_slurm_is_one_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # no sbatch anywhere
    done = subprocess.run([sys.executable, "-m", "engine", "run", "recipes/tiny.yaml", "cluster=dev",
                           f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=REPO, env=env)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "submits to Slurm, but sbatch is not on PATH" in done.stderr


@pytest.mark.parametrize("partition", ["x\nmalicious", "x\n", "a b", "x;y"])
def test_a_profile_value_that_would_break_a_script_is_never_rendered(tmp_path: Path, partition: str) -> None:
    profile = tmp_path / "bad.yaml"
    profile.write_text(yaml.safe_dump({**yaml.safe_load((REPO / "slurm/clusters/dev.yaml").read_text()),
                                       "partition": partition}))  # fmt: skip
    plan = compile_with(f"cluster={profile}")
    with pytest.raises(RecipeError) as info:
        show_scripts(plan, folder_root="/p", python="python")
    assert info.value.paths() == [f"cluster({plan.cluster.name}).partition"]
    done = subprocess.run([sys.executable, "-m", "engine", "run", "recipes/tiny.yaml", f"cluster={profile}", "--dry-run"],
                          capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert done.returncode == 2 and "partition" in done.stderr and "Traceback" not in done.stderr
    assert "malicious" not in done.stdout
