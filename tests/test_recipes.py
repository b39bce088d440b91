"""Every shipped recipe, found recursively, validates and plans."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.compile.estimate import GIB

from .conftest import RECIPES, compile_with


def test_recipes_are_found() -> None:
    names = {p.name for p in RECIPES}
    assert {"tiny.yaml", "llama3_8b.yaml", "llama3_70b.yaml", "llama31_405b.yaml"} <= names
    assert {"llama31_8b_instruct.yaml", "llama31_70b_instruct.yaml", "qwen25_72b_instruct.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_recipe_plans(path: Path) -> None:
    plan = compile_with(recipe=path)
    kinds = [j.kind for j in plan.jobs]
    chain = ["data", "sft", "reward_model", "ppo"]  # a fine-tuning recipe starts from an import: no pretraining
    rl = [k for k in kinds if k != "dpo"]  # DPO sits beside PPO (the demo has both)
    assert rl in ([*chain[:1], "pretrain", *chain[1:]], chain)
    for job in plan.jobs:
        if job.estimate is not None:
            assert job.estimate.memory.total > 0
            if plan.cluster.hbm_gib is not None:
                assert job.estimate.memory.total <= plan.cluster.hbm_gib * GIB


def test_h100_recipes_use_published_layouts() -> None:
    by_name = {p.stem: compile_with(recipe=p) for p in RECIPES if p.parent.name == "h100" and "instruct" not in p.stem}
    layouts = {name: plan.job("pretrain").layout for name, plan in by_name.items()}
    l8, l70, l405 = layouts["llama3_8b"], layouts["llama3_70b"], layouts["llama31_405b"]
    assert l8 is not None and (l8.world_size, l8.tp, l8.pp, l8.cp) == (8, 1, 1, 2)
    assert l70 is not None and (l70.world_size, l70.tp, l70.pp, l70.vpp) == (64, 4, 8, 5)
    assert l405 is not None and (l405.world_size, l405.tp, l405.pp, l405.cp, l405.vpp) == (1024, 8, 8, 2, 8)
    for plan in by_name.values():
        precision = plan.job("pretrain").precision
        assert precision is not None and precision.dtype == "fp8"


def test_h100_fine_tuning_recipes_use_megatron_bridges_sft_layouts() -> None:
    """Megatron-Bridge's full-SFT recipes on H100: Llama 3.1 8B at TP2 PP1; Llama 3.1 70B and Qwen2.5 72B at
    TP8 PP4 on 32 GPUs; bf16, lr 5e-6; sequence 4096 (Llama) or 2048 (Qwen). Each starts from an import."""
    plans = {p.stem: compile_with(recipe=p) for p in RECIPES if p.stem.endswith("_instruct")}
    want = {"llama31_8b_instruct": (8, 2, 1, 4096), "llama31_70b_instruct": (32, 8, 4, 4096),
            "qwen25_72b_instruct": (32, 8, 4, 2048)}  # fmt: skip
    for name, (world, tp, pp, seq) in want.items():
        plan = plans[name]
        for stage in ("sft", "reward"):
            job = plan.job(stage)
            assert job.layout is not None and (job.layout.world_size, job.layout.tp, job.layout.pp) == (world, tp, pp)
            assert job.precision is not None and job.precision.dtype == "bf16"
        assert plan.model.seq_length == seq and plan.job("sft").config["training"]["lr"] == 5e-6
        assert str(plan.job("sft").config["init_from"]).endswith("/imported")
    assert plans["qwen25_72b_instruct"].model.qkv_bias and plans["qwen25_72b_instruct"].model.padded_vocab_size == 152064
    assert plans["llama31_8b_instruct"].model.rope_scaling_factor == 8.0
