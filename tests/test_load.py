"""Loading: YAML + overrides, interpolation confined to the recipe, unknown keys with did-you-mean."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import RecipeError
from engine.load import load_recipe
from engine.schema import PretrainStage, SftStage

from .conftest import TINY


def _error(path: Path, *overrides: str) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return info.value


def test_overrides_reach_nested_keys_and_list_items() -> None:
    r = load_recipe(TINY, ["stages.sft.training.lr=1e-5", "stages.data.sources[1].weight=2", "model.seq_length=128"])
    sft = r.stages["sft"]
    assert isinstance(sft, SftStage) and sft.training.lr == 1e-5
    assert r.stages["data"].sources[1].weight == 2.0  # type: ignore[union-attr]
    assert r.model.seq_length == 128


def test_override_deletes_a_stage() -> None:
    r = load_recipe(TINY, ["~stages.ppo"])
    assert list(r.stages) == ["data", "pretrain", "sft", "reward", "dpo"]


def test_malformed_override_is_a_problem() -> None:
    err = _error(TINY, "stages.sft.training.lr")
    assert "key=value" in err.render()


def test_deleting_a_missing_key_is_a_problem() -> None:
    err = _error(TINY, "~stages.nope")
    assert err.paths() == ["stages.nope"]


def test_unknown_key_suggests_the_close_one() -> None:
    err = _error(TINY, "stages.sft.training.lrr=1")
    [problem] = err.problems
    assert problem.path == "stages.sft.training.lrr"
    assert "'lr'" in problem.fix


def test_every_problem_is_reported_at_once() -> None:
    err = _error(TINY, "stages.sft.training.lr=-1", "model.presett=tiny", "stages.pretrain.precision.dtype=fp16")
    assert sorted(err.paths()) == [
        "model.presett",
        "stages.pretrain.precision.dtype",
        "stages.sft.training.lr",
    ]


def test_discriminator_tags_do_not_appear_in_paths() -> None:
    err = _error(TINY, "stages.reward.training.steps=0")
    assert err.paths() == ["stages.reward.training.steps"]


def test_unknown_stage_kind_lists_the_kinds() -> None:
    err = _error(TINY, "stages.sft.kind=sftt")
    assert err.paths() == ["stages.sft"]
    assert "reward_model" in err.render()


def test_recipe_interpolation_works(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY.read_text() + "\nrun_dir: /tmp/engine-${name}\n")
    r = load_recipe(recipe, ["stages.sft.training.steps=${stages.pretrain.training.steps}"])
    assert r.run_dir == "/tmp/engine-tiny"
    sft, pre = r.stages["sft"], r.stages["pretrain"]
    assert isinstance(sft, SftStage) and isinstance(pre, PretrainStage)
    assert sft.training.steps == pre.training.steps


@pytest.mark.parametrize("expr", ["${oc.env:HOME}", "${oc.decode:'1'}", "${oc.dict.keys:model}", "x-${oc.env:USER,x}"])
def test_resolvers_that_leave_the_recipe_are_refused(tmp_path: Path, expr: str) -> None:
    err = _error(TINY, f"description={expr}")
    assert err.paths() == ["description"]
    assert "not allowed" in err.render()


def test_environment_needs_allow_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINE_TEST_ACCOUNT", "acct42")
    err = _error(TINY, "description=${env:ENGINE_TEST_ACCOUNT}")
    assert "allow_env" in err.render()
    r = load_recipe(TINY, ["description=${env:ENGINE_TEST_ACCOUNT}", "allow_env=[ENGINE_TEST_ACCOUNT]"])
    assert r.description == "acct42"


def test_unset_allowed_environment_uses_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENGINE_TEST_UNSET", raising=False)
    r = load_recipe(TINY, ["description=${env:ENGINE_TEST_UNSET,fallback}", "allow_env=[ENGINE_TEST_UNSET]"])
    assert r.description == "fallback"
    err = _error(TINY, "description=${env:ENGINE_TEST_UNSET}", "allow_env=[ENGINE_TEST_UNSET]")
    assert err.paths() == ["description"]


def test_missing_interpolation_target_names_the_key() -> None:
    err = _error(TINY, "description=${model.nothing_here}")
    assert err.paths() == ["description"]


def test_missing_file(tmp_path: Path) -> None:
    err = _error(tmp_path / "nope.yaml")
    assert "not found" in err.render()


def test_yaml_syntax_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    assert "YAML" in _error(bad).render()


def test_recipe_must_be_a_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    assert "mapping" in _error(bad).render()


def test_a_mapping_on_the_command_line_replaces_the_old_one() -> None:
    r = load_recipe(TINY, ["stages={data: {kind: data, sources: [{name: t, plugin: arithmetic, records: text}]}}"])
    assert list(r.stages) == ["data"]
    r = load_recipe(TINY, ["tokenizer={kind: file, path: x.json}"])
    assert r.tokenizer.kind == "file" and r.tokenizer.vocab_size is None


@pytest.mark.parametrize(
    "override",
    ["stages.sft.training.lr=!!binary aGVsbG8=", "description={", "description=[1, 2", "name=\x00", "model={a: *b}",
     "description=" + "[" * 40 + "]" * 40, "stages.sft.training.lr+=1"],
)  # fmt: skip
def test_an_override_that_is_not_yaml_is_one_problem_naming_it(override: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(TINY, [override])
    assert info.value.problems and all(p.path for p in info.value.problems)


def test_self_reference_and_exploding_interpolation_are_refused() -> None:
    with pytest.raises(RecipeError, match="refers to itself"):
        load_recipe(TINY, ["description=${description}"])
    with pytest.raises(RecipeError, match="refers to itself"):
        load_recipe(TINY, ["description=${name}", "name=${description}"])
    doubling = ["description=${x0}${x0}", *(f"x{i}=${{x{i + 1}}}${{x{i + 1}}}" for i in range(8)),
                "x8=" + "a" * 2000]  # fmt: skip
    with pytest.raises(RecipeError, match="interpolates to more than 1,000,000 characters"):
        load_recipe(TINY, doubling)
