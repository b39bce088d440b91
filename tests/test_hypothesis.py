"""Property tests: whatever a user writes, the loader and compiler answer with a Plan or a RecipeError.

Each example starts from the plain data of a shipped recipe (every YAML under recipes/, found
recursively) and applies a few random mutations: missing keys, unknown keys, leaves of the wrong type
or out of range, other stage kinds, references renamed to other stages, other parallel layouts and
batch sizes, other clusters. `parse_recipe` then `compile_recipe` must either return a Plan whose JSON
round-trips, or raise a RecipeError naming at least one problem by its dotted path. Any other
exception escaping is an engine bug: the CLI would print a traceback instead of the problems.

Set ENGINE_FUZZ_EXAMPLES to run more examples per test (the default keeps the file at a few seconds).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from engine.compile import Plan, compile_recipe
from engine.errors import RecipeError
from engine.kinds import KINDS
from engine.load import parse_recipe

from .conftest import RECIPES

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
RECIPE_FILES = RECIPES  # those that validate as shipped (tests/conftest.py)
EXAMPLES = int(os.environ.get("ENGINE_FUZZ_EXAMPLES", "60"))

# Stages' references to other stages, and the stage kinds: every registered one.
REF_FIELDS = tuple(dict.fromkeys(r.field for k in KINDS.values() for r in k.references))
STAGE_KINDS = tuple(KINDS)
BAD_VALUES: tuple[Any, ...] = (
    None,
    -1,
    0,
    3,
    10**12,
    1e-30,
    float("nan"),
    float("inf"),
    "",
    "x",
    [],
    {},
    True,
)
UNKNOWN_KEYS = ("bogus", "tp", "lr", "kind", "Data", "steps", "preset", "nodes", "weight", "glob")

Path_ = tuple[str | int, ...]
Draw = Callable[[st.SearchStrategy[Any]], Any]


def _load(path: Path) -> dict[str, Any]:
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(data, dict)
    return data  # type: ignore[return-value]


BASES: dict[str, dict[str, Any]] = {str(p.relative_to(RECIPES_DIR)): _load(p) for p in RECIPE_FILES}


# ---- walking plain data --------------------------------------------------------------------------
def _nodes(data: Any, path: Path_ = ()) -> list[Path_]:
    """Every path below `data` (not the root itself), keys and list indices alike."""
    out: list[Path_] = []
    items: list[tuple[str | int, Any]] = []
    if isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, list):
        items = list(enumerate(data))
    for key, value in items:
        out.append((*path, key))
        out.extend(_nodes(value, (*path, key)))
    return out


def _containers(data: Any, path: Path_ = ()) -> list[Path_]:
    """Every path to a dict, the root included."""
    out: list[Path_] = [path] if isinstance(data, dict) else []
    items: list[tuple[str | int, Any]] = []
    if isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, list):
        items = list(enumerate(data))
    for key, value in items:
        out.extend(_containers(value, (*path, key)))
    return out


def _get(data: Any, path: Path_) -> Any:
    for key in path:
        data = data[key]
    return data


def _stages(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    stages = data.get("stages")
    if not isinstance(stages, dict):
        return {}
    return {k: v for k, v in stages.items() if isinstance(v, dict)}


def _training_stages(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in _stages(data).items() if v.get("kind") != "data"}


def _section(stage: dict[str, Any], name: str) -> dict[str, Any]:
    """stage[name] as a dict, created (or replaced, if a mutation broke it) when needed."""
    if not isinstance(stage.get(name), dict):
        stage[name] = {}
    return stage[name]  # type: ignore[no-any-return]


# ---- mutations: each edits `data` in place using values drawn from hypothesis ------------------
def delete_key(draw: Draw, data: dict[str, Any]) -> None:
    nodes = _nodes(data)
    if nodes:
        *parent, key = draw(st.sampled_from(nodes))
        del _get(data, tuple(parent))[key]


def insert_unknown(draw: Draw, data: dict[str, Any]) -> None:
    where = _get(data, draw(st.sampled_from(_containers(data))))
    where[draw(st.sampled_from(UNKNOWN_KEYS))] = copy.deepcopy(draw(st.sampled_from((*BAD_VALUES, "tiny", 1.0))))


def replace_value(draw: Draw, data: dict[str, Any]) -> None:
    nodes = _nodes(data)
    if nodes:
        *parent, key = draw(st.sampled_from(nodes))
        _get(data, tuple(parent))[key] = copy.deepcopy(draw(st.sampled_from(BAD_VALUES)))


def replace_leaf(draw: Draw, data: dict[str, Any]) -> None:
    leaves = [p for p in _nodes(data) if not isinstance(_get(data, p), dict | list)]
    if leaves:
        *parent, key = draw(st.sampled_from(leaves))
        _get(data, tuple(parent))[key] = copy.deepcopy(draw(st.sampled_from(BAD_VALUES)))


def change_kind(draw: Draw, data: dict[str, Any]) -> None:
    stages = _stages(data)
    if stages:
        stage = stages[draw(st.sampled_from(sorted(stages)))]
        stage["kind"] = draw(st.sampled_from((*STAGE_KINDS, "bogus", None, 1)))


def rename_reference(draw: Draw, data: dict[str, Any]) -> None:
    stages = _stages(data)
    if stages:
        stage = stages[draw(st.sampled_from(sorted(stages)))]
        field = draw(st.sampled_from(REF_FIELDS))
        stage[field] = draw(st.sampled_from((*sorted(stages), "nope", "", "Data", None)))


def reorder_stages(draw: Draw, data: dict[str, Any]) -> None:
    stages = data.get("stages")
    if isinstance(stages, dict) and stages:
        order = draw(st.permutations(list(stages)))
        data["stages"] = {k: stages[k] for k in order}


def change_parallelism(draw: Draw, data: dict[str, Any]) -> None:
    stages = _training_stages(data)
    if stages:
        par = _section(stages[draw(st.sampled_from(sorted(stages)))], "parallelism")
        for key in draw(st.lists(st.sampled_from(("tp", "pp", "cp", "vpp")), min_size=1, unique=True)):
            par[key] = draw(st.integers(1, 16))
        if draw(st.booleans()):
            par["sequence_parallel"] = draw(st.booleans())


def change_resources(draw: Draw, data: dict[str, Any]) -> None:
    stages = _training_stages(data)
    if stages:
        res = _section(stages[draw(st.sampled_from(sorted(stages)))], "resources")
        res[draw(st.sampled_from(("nodes", "gpus_per_node")))] = draw(st.integers(1, 16))


def change_batch(draw: Draw, data: dict[str, Any]) -> None:
    stages = _training_stages(data)
    if stages:
        training = _section(stages[draw(st.sampled_from(sorted(stages)))], "training")
        sizes = st.one_of(st.integers(1, 1024), st.sampled_from((0, -1, 10**12)))
        for key in draw(st.lists(st.sampled_from(("micro_batch_size", "global_batch_size")), min_size=1, unique=True)):
            training[key] = draw(sizes)


def set_cluster(draw: Draw, data: dict[str, Any]) -> None:
    data["cluster"] = draw(st.sampled_from(("local", "h100", "h200")))


MUTATIONS: dict[str, Callable[[Draw, dict[str, Any]], None]] = {
    f.__name__: f
    for f in (
        delete_key,
        insert_unknown,
        replace_value,
        replace_leaf,
        change_kind,
        rename_reference,
        reorder_stages,
        change_parallelism,
        change_resources,
        change_batch,
        set_cluster,
    )
}


@st.composite
def mutated_recipes(
    draw: Draw, only: Callable[[Draw, dict[str, Any]], None] | None = None, most: int = 3
) -> dict[str, Any]:
    data = copy.deepcopy(BASES[draw(st.sampled_from(sorted(BASES)))])
    for _ in range(draw(st.integers(1, most))):
        mutate = only or draw(st.sampled_from(list(MUTATIONS.values())))
        mutate(draw, data)
    return data


# ---- the property -------------------------------------------------------------------------------
def _outcome(data: dict[str, Any]) -> Plan | RecipeError:
    """Parse and compile; a RecipeError is returned, anything else that is raised fails the test."""
    try:
        return compile_recipe(parse_recipe(data))
    except RecipeError as exc:
        return exc


def _check(data: dict[str, Any]) -> None:
    result = _outcome(data)
    if isinstance(result, RecipeError):
        assert result.problems, "a RecipeError must name at least one problem"
        for p in result.problems:
            assert isinstance(p.path, str), p
            assert isinstance(p.message, str) and p.message, p
        assert isinstance(result.render(), str)
        return
    text = result.to_json()
    # NaN/inf would make the text invalid JSON for strict readers; json.loads still takes them,
    # so compare the re-serialised text rather than the (NaN ≠ NaN) values.
    assert json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n" == text


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # no .hypothesis/ directory; failures print their reproducing example instead
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def test_shipped_recipes_found() -> None:
    assert "tiny.yaml" in BASES
    assert any(name.startswith("h100/") for name in BASES)


@pytest.mark.parametrize("name", sorted(BASES))
def test_shipped_recipe_compiles_deterministically(name: str) -> None:
    data = BASES[name]
    first = compile_recipe(parse_recipe(copy.deepcopy(data)))
    second = compile_recipe(parse_recipe(copy.deepcopy(data)))
    assert first.to_json() == second.to_json()
    assert json.loads(first.to_json())["recipe"] == data["name"]


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
@FUZZ
@given(data=st.data())
def test_one_kind_of_mutation_gives_plan_or_recipe_error(mutation: str, data: st.DataObject) -> None:
    _check(data.draw(mutated_recipes(only=MUTATIONS[mutation])))


@settings(FUZZ, max_examples=EXAMPLES * 5)
@given(data=mutated_recipes(most=4))
def test_mixed_mutations_give_plan_or_recipe_error(data: dict[str, Any]) -> None:
    _check(data)


@FUZZ
@given(data=mutated_recipes())
def test_mutating_a_copy_leaves_the_shipped_plans_alone(data: dict[str, Any]) -> None:
    # Mutations work on deep copies, and compiling keeps no state: the shipped plans do not change.
    _check(data)
    for name, base in BASES.items():
        assert compile_recipe(parse_recipe(base)).to_json() == _shipped_plan(name)


@functools.cache
def _shipped_plan(name: str) -> str:
    return compile_recipe(parse_recipe(_load(RECIPES_DIR / name))).to_json()


# ---- regressions: inputs found outside the strategies above that escape as other exceptions ----------
@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    def stop(signum: int, frame: object) -> None:
        raise TimeoutError(f"compiling took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _tiny_with(model: dict[str, Any], pretrain_parallelism: dict[str, Any] | None = None) -> dict[str, Any]:
    data = copy.deepcopy(BASES["tiny.yaml"])
    data["model"].update(model)
    if pretrain_parallelism is not None:
        data["stages"]["pretrain"]["parallelism"] = pretrain_parallelism
    return data


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs SIGALRM")
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(_tiny_with({"num_layers": 10**12}, {"pp": 3}), id="num_layers=1e12,pp=3"),
        pytest.param(_tiny_with({"num_attention_heads": 10**12, "num_query_groups": 7}), id="heads=1e12,groups=7"),
    ],
)
def test_huge_sizes_do_not_hang_the_compiler(data: dict[str, Any]) -> None:
    with _time_limit(1.0):
        _check(data)


def test_huge_hidden_size_is_a_recipe_error_or_a_plan() -> None:
    _check(_tiny_with({"hidden_size": 10**300, "num_attention_heads": 1, "num_query_groups": 1}))
