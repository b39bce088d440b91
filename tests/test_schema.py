"""The typed recipe: frozen models, unknown keys rejected, every field documented, schema file fresh."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import BaseModel, ValidationError

from engine.schema import ClusterProfile, Recipe, TrainTokenizer
from engine.schema.jsonschema import SCHEMA_PATH, render

from .conftest import REPO


def _models(root: type[BaseModel]) -> set[type[BaseModel]]:
    seen: set[type[BaseModel]] = set()
    todo: list[Any] = [root]
    while todo:
        tp = todo.pop()
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp in seen:
                continue
            seen.add(tp)
            todo.extend(f.annotation for f in tp.model_fields.values())
        else:
            todo.extend(get_args(tp))
    return seen


MODELS = sorted(_models(Recipe) | {ClusterProfile}, key=lambda m: m.__name__)


def test_the_recipe_covers_every_stage_kind() -> None:
    names = {m.__name__ for m in MODELS}
    assert {"DataStage", "PretrainStage", "SftStage", "RewardModelStage", "PpoStage"} <= names
    assert {"Parallelism", "Precision", "Training", "Checkpointing", "Resources", "ModelSpec"} <= names


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_field_is_described(model: type[BaseModel]) -> None:
    missing = [name for name, f in model.model_fields.items() if not f.description]
    assert not missing, f"{model.__name__} fields without description: {missing}"


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_models_are_frozen_and_strict(model: type[BaseModel]) -> None:
    assert model.model_config.get("frozen") is True
    assert model.model_config.get("extra") == "forbid"


def test_frozen_means_frozen() -> None:
    tok = TrainTokenizer(kind="train", vocab_size=512)
    with pytest.raises(ValidationError):
        tok.vocab_size = 1024  # type: ignore[misc]


def test_committed_json_schema_is_fresh() -> None:
    assert (REPO / "schema" / "recipe.schema.json").resolve() == SCHEMA_PATH
    assert SCHEMA_PATH.read_text() == render(), "schema/recipe.schema.json is stale: run `engine schema`"


def test_generic_names_do_not_install_as_top_level_modules(tmp_path: Path) -> None:
    code = (
        "import importlib.util as u, engine.schema, engine.plugins;"
        "print(u.find_spec('schema') is None, u.find_spec('plugins') is None)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "True"]
