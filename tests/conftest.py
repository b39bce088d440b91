"""Shared fixtures. Compiler tests import no torch; keep it that way here too."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.compile import Plan, compile_recipe
from engine.errors import RecipeError
from engine.load import load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
TINY = REPO / "recipes" / "tiny.yaml"


def compile_with(*overrides: str, recipe: Path = TINY, force: bool = False) -> Plan:
    return compile_recipe(load_recipe(recipe, overrides), force=force)


def problems_of(*overrides: str, recipe: Path = TINY) -> RecipeError:
    """The RecipeError that compiling the recipe with these overrides must raise."""
    with pytest.raises(RecipeError) as info:
        compile_with(*overrides, recipe=recipe)
    return info.value


@pytest.fixture(autouse=True)
def _run_from_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    # Relative paths in recipes (run_dir, cluster profile paths) are relative to the working directory.
    monkeypatch.chdir(REPO)
