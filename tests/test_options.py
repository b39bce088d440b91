"""Every option of the recipe schema (and of a cluster profile) is read by the compiler, a launcher or a
worker: a field that nothing reads is an option that does nothing. Imports no torch.

A field is read when engine code outside schema/ names it: as an attribute (`stage.training.seed`), a
string key (`merged["hidden_size"]`: the model's fields are merged as a mapping), or a kind's reference
(`Reference("init_from", ...)`). What each option does is held by its own tests; this walk fails when a
new field is added and nothing uses it, or when the last reader of one goes away.
"""

from __future__ import annotations

import ast
import typing
from pathlib import Path

from pydantic import BaseModel

from engine.kinds import KINDS
from engine.schema import Recipe
from engine.schema.cluster import ClusterProfile

from .conftest import REPO

# Read by the schema itself: discriminator tags, and free text the plan carries to `engine plan`.
NOT_READ_BY_NAME = {"TrainTokenizer.kind", "FileTokenizer.kind"} | {f"{k.model.__name__}.kind" for k in KINDS.values()}


def _models(tp: object) -> list[type[BaseModel]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for a in typing.get_args(tp) for m in _models(a)]


def _fields() -> list[str]:
    seen: set[type[BaseModel]] = set()
    out: list[str] = []

    def walk(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, info in model.model_fields.items():
            out.append(f"{model.__name__}.{name}")
            for inner in _models(info.annotation):
                walk(inner)

    for root in (Recipe, ClusterProfile, *(k.model for k in KINDS.values())):
        walk(root)
    return out


def _names_read() -> set[str]:
    names: set[str] = set()
    for path in (REPO / "engine").rglob("*.py"):
        if path.relative_to(REPO / "engine").parts[0] in ("schema", "plugins"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
                names.add(node.value)
    return names


def test_every_option_is_read_somewhere() -> None:
    read = _names_read()
    references = {r.field for k in KINDS.values() for r in k.references}
    fields = _fields()
    assert len(fields) > 150
    unread = [f for f in fields if f not in NOT_READ_BY_NAME and f.split(".")[1] not in read | references]
    assert unread == [], f"options nothing reads: {unread}"


def test_the_walk_finds_an_unread_option(tmp_path: Path) -> None:
    read = _names_read()
    assert "peak_tflops_fp8" in read  # the FP8 time estimate reads it
    assert "a_field_nobody_reads" not in read
