"""Shared fixtures. Compiler tests import no torch; keep it that way here too."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.compile import Plan, compile_recipe
from engine.errors import RecipeError
from engine.load import load_recipe

REPO = Path(__file__).resolve().parents[1]
REQUIRES = "# requires: "  # a recipe's header line naming what must run first (e.g. the script that imports its model)


def needs_setup(path: Path) -> bool:
    return any(line.startswith(REQUIRES) for line in path.read_text(encoding="utf-8").splitlines()[:20])


# The shipped recipes that validate as they are; one that needs a setup step is tested after running it.
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if not needs_setup(p))
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
