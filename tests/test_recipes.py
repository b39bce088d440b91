"""Every shipped recipe, found recursively, validates and plans."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.compile.estimate import GIB

from .conftest import RECIPES, compile_with


def test_recipes_are_found() -> None:
    names = {p.name for p in RECIPES}
    assert {"tiny.yaml", "llama3_8b.yaml", "llama3_70b.yaml", "llama31_405b.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_recipe_plans(path: Path) -> None:
    plan = compile_with(recipe=path)
    kinds = [j.kind for j in plan.jobs]
    assert kinds == ["data", "pretrain", "sft", "reward_model", "ppo"]
    for job in plan.jobs:
        if job.estimate is not None:
            assert job.estimate.memory.total > 0
            if plan.cluster.hbm_gib is not None:
                assert job.estimate.memory.total <= plan.cluster.hbm_gib * GIB


def test_h100_recipes_use_published_layouts() -> None:
    by_name = {p.stem: compile_with(recipe=p) for p in RECIPES if p.parent.name == "h100"}
    layouts = {name: plan.job("pretrain").layout for name, plan in by_name.items()}
    l8, l70, l405 = layouts["llama3_8b"], layouts["llama3_70b"], layouts["llama31_405b"]
    assert l8 is not None and (l8.world_size, l8.tp, l8.pp, l8.cp) == (8, 1, 1, 2)
    assert l70 is not None and (l70.world_size, l70.tp, l70.pp, l70.vpp) == (64, 4, 8, 5)
    assert l405 is not None and (l405.world_size, l405.tp, l405.pp, l405.cp, l405.vpp) == (1024, 8, 8, 2, 8)
    for plan in by_name.values():
        precision = plan.job("pretrain").precision
        assert precision is not None and precision.dtype == "fp8"
