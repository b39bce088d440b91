"""The stage-kind registry is the one list of kinds: every place that depends on a stage's kind derives from
it, and a kind missing from any of them fails here. Imports no torch."""

from __future__ import annotations

import ast
import json
import re
import typing
from pathlib import Path

import pytest

from engine.compile.plan import Job
from engine.kinds import KINDS, producing
from engine.launch import select
from engine.report import _held_out
from engine.schema import Recipe, Spec, TrainingStage
from engine.schema.data import RecordKind
from engine.schema.jsonschema import SCHEMA_PATH
from engine.summary import held_out

from .conftest import RECIPES, REPO, compile_with
from .test_hypothesis import REF_FIELDS, STAGE_KINDS

ENGINE = REPO / "engine"


def _union_models() -> list[type[Spec]]:
    stage = typing.get_args(Recipe.model_fields["stages"].annotation)[1]  # dict[Name, Stage]
    union = typing.get_args(stage)[0]  # Annotated[A | B | ..., discriminator]
    return list(typing.get_args(union))


def _literal_kind(model: type[Spec]) -> str:
    (value,) = typing.get_args(model.model_fields["kind"].annotation)
    return str(value)


def test_the_recipe_union_holds_exactly_the_registered_kinds() -> None:
    models = _union_models()
    assert [_literal_kind(m) for m in models] == list(KINDS)
    for name, kind in KINDS.items():
        assert kind.name == name and _literal_kind(kind.model) == name
        assert kind.model in models


def test_the_json_schema_offers_every_kind() -> None:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    offered = {d["properties"]["kind"]["const"] for d in schema["$defs"].values() if "kind" in d.get("properties", {})
               and d["properties"]["kind"].get("const") in KINDS}  # fmt: skip
    assert offered == set(KINDS)


@pytest.mark.parametrize("name", list(KINDS))
def test_a_kind_declares_what_its_model_has(name: str) -> None:
    kind = KINDS[name]
    assert kind.trains == issubclass(kind.model, TrainingStage)  # a training kind says what its job computes
    records = set(typing.get_args(RecordKind))
    for ref in kind.references:
        assert ref.field in kind.model.model_fields, ref
        assert ref.kinds and set(ref.kinds) <= set(KINDS), ref
        assert ref.records is None or ref.records in records, ref
    if kind.trains:
        assert kind.data_reference is not None  # the records it trains on come from a data stage
        assert kind.held_out, "a training kind shows held-out results"
        assert kind.charts, "the report draws a training kind's curves"
    assert (kind.next_round.start_from is None) or "init_from" in kind.model.model_fields


@pytest.mark.parametrize("name", list(KINDS))
def test_a_kind_has_a_worker_module_with_run(name: str) -> None:
    module = KINDS[name].worker
    assert module.startswith("engine.worker.stages.")
    path = REPO / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    runs = [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "run"]
    assert runs and [a.arg for a in runs[0].args.args] == ["ctx", "spec"], f"{path} needs run(ctx, spec)"


@pytest.mark.parametrize("name", list(KINDS))
def test_a_kind_has_a_docs_page(name: str) -> None:
    page = REPO / "docs" / "stages" / f"{name}.md"
    assert page.is_file(), f"document the {name} kind in {page}"
    assert f"kind: {name}" in page.read_text(encoding="utf-8")


def test_the_fuzz_mutates_into_every_kind_and_reference() -> None:
    assert tuple(KINDS) == STAGE_KINDS
    assert set(REF_FIELDS) == {r.field for k in KINDS.values() for r in k.references}


def test_every_kind_is_in_a_shipped_recipe() -> None:
    used = {stage["kind"] for path in RECIPES for stage in _stages(path)}
    assert used == set(KINDS)


def _stages(path: Path) -> list[dict[str, typing.Any]]:
    import yaml

    return list((yaml.safe_load(path.read_text(encoding="utf-8")).get("stages") or {}).values())


def test_every_kind_runs_and_its_held_out_metrics_are_shown() -> None:
    plan = compile_with()
    jobs, problems = select(plan, None)
    assert {j.kind for j in jobs} == set(KINDS) and not problems
    for name, kind in KINDS.items():
        lines = [{"step": 0.0, **{m.key: 1.0 for m in kind.held_out}},
                 {"step": 1.0, **{m.key: 2.0 for m in kind.held_out}}]  # fmt: skip
        shown = held_out(name, lines)
        for metric in kind.held_out:
            assert metric.summary is None or metric.summary in shown, (name, metric)
        assert _held_out(name) == kind.held_out  # the report's held-out table


def test_policy_and_data_kinds_are_derived() -> None:
    from engine.chat_session import POLICY_KINDS

    assert producing("policy") == POLICY_KINDS
    assert set(producing("data")) | set(producing("policy")) | set(producing("reward_model")) == set(KINDS)


def test_a_plan_from_another_version_with_an_unknown_kind_cannot_run() -> None:
    plan = compile_with()
    odd = plan.model_copy(update={"jobs": (*plan.jobs[:1], Job.model_validate({**plan.jobs[1].model_dump(), "kind": "kto"}))})
    _, problems = select(odd, None)
    assert [p.path for p in problems] == [f"stages.{plan.jobs[1].name}"] and "no worker" in problems[0].message


# ---- no list of kinds outside the registry --------------------------------------------------------------
def _kind_literals(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in KINDS:
        return [node.value]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return [v for e in node.elts for v in _kind_literals(e)]
    return []


def _names_a_kind(node: ast.AST) -> bool:
    text = ast.unparse(node)
    return "kind" in text.rsplit(".", 1)[-1] or text.endswith(("kind", '"kind")', "'kind')", "['kind']", '["kind"]'))


def _hard_coded_kinds(path: Path, root: Path = REPO) -> list[str]:
    """Comparisons of a kind with kind names, and literals holding two kind names or more (a list of kinds)."""
    found = []
    where = path.relative_to(root)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_names_a_kind(s) for s in sides) and any(_kind_literals(s) for s in sides):
                found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Dict) and len([k for k in node.keys if k is not None and _kind_literals(k)]) >= 2:
            found.append(f"{where}:{node.lineno}: a dict keyed by kinds")
        elif isinstance(node, ast.Tuple | ast.List | ast.Set) and len(_kind_literals(node)) >= 2:
            found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_list_of_kinds_outside_the_registry() -> None:
    files = [p for p in ENGINE.rglob("*.py") if "kinds" not in p.relative_to(ENGINE).parts[:1]
             and p.relative_to(ENGINE).parts[0] not in ("schema", "plugins")]  # fmt: skip
    assert len(files) > 40
    assert [hit for p in sorted(files) for hit in _hard_coded_kinds(p)] == []


def test_no_message_lists_kinds_by_hand() -> None:
    """A message that names three kinds or more (\"a pretrain, sft or ppo stage\") is built from the registry."""
    names = re.compile(r"\b(" + "|".join(KINDS) + r")\b")
    found = []
    for path in sorted(ENGINE.rglob("*.py")):
        if path.relative_to(ENGINE).parts[0] in ("kinds", "schema", "plugins"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, ast.Module | ast.FunctionDef | ast.ClassDef) and n.body
                      and isinstance(n.body[0], ast.Expr)}  # fmt: skip
        strings = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        found += [f"{path.relative_to(REPO)}:{n.lineno}: {n.value[:60]}" for n in strings
                  if id(n) not in docstrings and len(set(names.findall(n.value))) >= 3]  # fmt: skip
    assert found == []


def test_the_check_finds_a_list_of_kinds(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('POLICY = ("sft", "ppo")\nif job.kind == "ppo":\n    pass\nx = {"sft": 1, "ppo": 2}\n')
    assert len(_hard_coded_kinds(sample, tmp_path)) == 3


def test_workers_read_typed_specs_not_job_configs() -> None:
    """Stage code reads the spec the worker validated from the job's config once (engine/worker/context.py),
    never the config's JSON by string keys."""
    seen = []
    for path in sorted((ENGINE / "worker").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "config" and ast.unparse(node.value).endswith("job"):
                seen.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert seen and all(s.startswith("engine/worker/context.py:") for s in seen), seen
