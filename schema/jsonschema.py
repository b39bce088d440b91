"""The recipe's JSON Schema, generated from the pydantic models, for editor autocompletion.

YAML language servers pick it up with a first line `# yaml-language-server: $schema=<path>`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .recipe import Recipe

SCHEMA_PATH = Path(__file__).resolve().parent / "recipe.schema.json"


def render() -> str:
    schema = Recipe.model_json_schema()
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
