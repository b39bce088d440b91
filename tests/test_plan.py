"""The plan: deterministic, golden-pinned, a DAG with artifacts, cache keys and worker commands.

Refresh the golden files after an intended change with: ENGINE_UPDATE_GOLDEN=1 pytest tests/test_plan.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.launch import render_local

from .conftest import RECIPES, REPO, TINY, compile_with

GOLDEN = REPO / "tests" / "golden"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_plan_matches_golden_file(path: Path) -> None:
    text = compile_with(recipe=path).to_json()
    golden = GOLDEN / f"{path.stem}.plan.json"
    if os.environ.get("ENGINE_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert golden.is_file(), f"missing {golden}; run with ENGINE_UPDATE_GOLDEN=1"
    assert text == golden.read_text(), f"{golden.name} differs; if intended, ENGINE_UPDATE_GOLDEN=1"


def test_plan_is_byte_identical_across_processes() -> None:
    code = "from tests.conftest import compile_with, TINY; import sys; sys.stdout.write(compile_with().to_json())"
    outs = {
        subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    }
    assert len(outs) == 1
    assert outs.pop() == compile_with(recipe=TINY).to_json()


def test_jobs_form_a_dag_in_recipe_order() -> None:
    plan = compile_with()
    names = [j.name for j in plan.jobs]
    assert names == ["data", "pretrain", "sft", "reward", "dpo", "ppo"]
    for i, job in enumerate(plan.jobs):
        assert set(job.depends_on) <= set(names[:i])
    assert plan.job("ppo").depends_on == ("data", "sft", "reward")
    assert plan.job("dpo").depends_on == ("data", "sft")  # its reference defaults to init_from's checkpoint
    assert plan.job("pretrain").depends_on == ("data",)


def test_artifacts_flow_between_jobs() -> None:
    plan = compile_with()
    data = plan.job("data")
    assert {a.kind for a in data.outputs} == {"dataset", "tokenizer"}
    assert plan.job("sft").inputs == plan.job("data").outputs + plan.job("pretrain").outputs
    assert plan.job("sft").outputs[0].path == "runs/tiny/sft/checkpoints"


def test_cache_keys_change_downstream_of_a_change_only() -> None:
    before = {j.name: j.cache_key for j in compile_with().jobs}
    after = {j.name: j.cache_key for j in compile_with("stages.sft.training.lr=5e-4").jobs}
    assert [n for n in before if before[n] != after[n]] == ["sft", "reward", "dpo", "ppo"]
    model_change = {j.name: j.cache_key for j in compile_with("model.seq_length=96").jobs}
    assert [n for n in before if before[n] == model_change[n]] == ["data"]


def test_worker_argv_and_local_launch() -> None:
    plan = compile_with()
    pre = plan.job("pretrain")
    assert pre.argv == ("python", "-m", "engine.worker", "runs/tiny/plan.json", "--job", "pretrain")
    assert render_local(pre) == [
        "torchrun", "--standalone", "--nproc-per-node=2", "-m", "engine.worker", "runs/tiny/plan.json", "--job", "pretrain",
    ]  # fmt: skip
    assert render_local(plan.job("data"))[:3] == ["python", "-m", "engine.worker"]


def test_gpu_jobs_get_their_environment() -> None:
    plan = compile_with(recipe=REPO / "recipes" / "h100" / "llama3_70b.yaml")
    pre = plan.job("pretrain")
    assert pre.env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert pre.env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"  # from the cluster profile
    assert pre.resources.gpus_per_node == 8 and pre.resources.nodes == 8
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in compile_with().job("pretrain").env


def test_plan_json_round_trips() -> None:
    plan = compile_with()
    data = json.loads(plan.to_json())
    assert data["recipe"] == "tiny" and data["model"]["padded_vocab_size"] == 384
    assert type(plan).model_validate(data) == plan


def test_recipe_hash_tracks_content() -> None:
    assert compile_with().recipe_hash == compile_with().recipe_hash
    assert compile_with().recipe_hash != compile_with("description=changed").recipe_hash
