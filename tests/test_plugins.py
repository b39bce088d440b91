"""The plugin layer: the registry, its loud failures, the built-in readers and reward functions, and
how the compiler reports a recipe's plugin names and parameters."""

from __future__ import annotations

import importlib.metadata
import json
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from engine import plugin
from engine.errors import PluginError
from engine.plugin import (
    Conversation,
    DataSource,
    Message,
    Preference,
    Prompt,
    RewardFunction,
    RewardSample,
    Skip,
    Text,
)
from engine.plugins import arithmetic, exact_match, jsonl, length_penalty, numeric_distance, regex_check, text_files

from .conftest import problems_of

FAKE_MODULE = "engine_test_fake_plugins"


# ---- registry ------------------------------------------------------------------------------------
def test_registry_finds_the_built_in_data_sources() -> None:
    sources = plugin.data_sources()
    assert {"arithmetic", "text_files", "jsonl"} <= set(sources)
    assert sources["arithmetic"] is arithmetic.SOURCE
    assert sources["text_files"] is text_files.SOURCE
    assert sources["jsonl"] is jsonl.SOURCE
    assert all(isinstance(s, DataSource) for s in sources.values())


def test_registry_finds_the_built_in_rewards() -> None:
    rewards = plugin.rewards()
    assert {"exact_match", "regex", "length_penalty", "numeric_distance"} <= set(rewards)
    assert rewards["exact_match"] is exact_match.REWARD
    assert rewards["regex"] is regex_check.REWARD
    assert rewards["length_penalty"] is length_penalty.REWARD
    assert all(isinstance(r, RewardFunction) for r in rewards.values())


class _NotParams:
    pass


def _read_nothing(params: Any, kind: Any) -> Iterator[Text]:
    yield from ()


@pytest.fixture
def fake_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """An importable module of plugin objects, good and bad, for fake entry points to point at."""
    module = types.ModuleType(FAKE_MODULE)
    vars(module).update(
        GOOD=DataSource(params=arithmetic.ArithmeticParams, kinds=frozenset({"text"}), read=_read_nothing),
        BAD_PARAMS=DataSource(params=_NotParams, kinds=frozenset({"text"}), read=_read_nothing),  # type: ignore[arg-type]
    )
    monkeypatch.setitem(sys.modules, FAKE_MODULE, module)
    return module


def _install(monkeypatch: pytest.MonkeyPatch, group: str, *entries: tuple[str, str]) -> None:
    """Make `importlib.metadata.entry_points(group=group)` return exactly these (name, value) pairs."""
    eps = [importlib.metadata.EntryPoint(name, value, group) for name, value in entries]

    def entry_points(*, group: str) -> list[importlib.metadata.EntryPoint]:
        return [ep for ep in eps if ep.group == group]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


@pytest.fixture
def fresh_registry() -> Iterator[None]:
    """Clear the cached registries before and after, so a fake installation does not leak."""
    plugin.data_sources.cache_clear()
    plugin.rewards.cache_clear()
    yield
    plugin.data_sources.cache_clear()
    plugin.rewards.cache_clear()


def test_load_group_loads_a_third_party_plugin(monkeypatch: pytest.MonkeyPatch, fake_module: types.ModuleType) -> None:
    _install(
        monkeypatch,
        plugin.DATA_SOURCES_GROUP,
        ("mine", f"{FAKE_MODULE}:GOOD"),
        ("arithmetic", "engine.plugins.arithmetic:SOURCE"),
    )
    found = plugin._load_group(plugin.DATA_SOURCES_GROUP, DataSource)
    assert found == {"mine": fake_module.GOOD, "arithmetic": arithmetic.SOURCE}


def test_the_same_entry_point_seen_twice_is_not_a_collision(monkeypatch: pytest.MonkeyPatch) -> None:
    value = "engine.plugins.arithmetic:SOURCE"
    _install(monkeypatch, plugin.DATA_SOURCES_GROUP, ("arithmetic", value), ("arithmetic", value))
    assert plugin._load_group(plugin.DATA_SOURCES_GROUP, DataSource) == {"arithmetic": arithmetic.SOURCE}


def test_name_collision_is_a_plugin_error_naming_both(
    monkeypatch: pytest.MonkeyPatch, fake_module: types.ModuleType
) -> None:
    _install(
        monkeypatch,
        plugin.DATA_SOURCES_GROUP,
        ("arithmetic", "engine.plugins.arithmetic:SOURCE"),
        ("arithmetic", f"{FAKE_MODULE}:GOOD"),
    )
    with pytest.raises(PluginError, match="collision") as info:
        plugin._load_group(plugin.DATA_SOURCES_GROUP, DataSource)
    message = str(info.value)
    assert "'arithmetic'" in message and plugin.DATA_SOURCES_GROUP in message
    assert "engine.plugins.arithmetic:SOURCE" in message and f"{FAKE_MODULE}:GOOD" in message


@pytest.mark.parametrize(
    ("value", "cause"),
    [("nonexistent_module_xyz:X", "ModuleNotFoundError"), ("engine.plugins.arithmetic:NOPE", "AttributeError")],
)
def test_load_failure_is_a_plugin_error_naming_the_plugin(
    monkeypatch: pytest.MonkeyPatch, value: str, cause: str
) -> None:
    _install(monkeypatch, plugin.REWARDS_GROUP, ("broken", value))
    with pytest.raises(PluginError, match="failed to load") as info:
        plugin._load_group(plugin.REWARDS_GROUP, RewardFunction)
    message = str(info.value)
    assert "'broken'" in message and value in message and cause in message
    assert info.value.__cause__ is not None


def test_object_of_the_wrong_type_is_a_plugin_error_naming_the_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, plugin.DATA_SOURCES_GROUP, ("sneaky", "engine.plugins.exact_match:REWARD"))
    with pytest.raises(PluginError) as info:
        plugin._load_group(plugin.DATA_SOURCES_GROUP, DataSource)
    message = str(info.value)
    assert "'sneaky'" in message and "engine.plugins.exact_match:REWARD" in message
    assert "RewardFunction" in message and "DataSource" in message


def test_params_that_are_not_a_pydantic_model_are_a_plugin_error(
    monkeypatch: pytest.MonkeyPatch, fake_module: types.ModuleType
) -> None:
    _install(monkeypatch, plugin.DATA_SOURCES_GROUP, ("loose", f"{FAKE_MODULE}:BAD_PARAMS"))
    with pytest.raises(PluginError, match="params must be a pydantic model") as info:
        plugin._load_group(plugin.DATA_SOURCES_GROUP, DataSource)
    assert "'loose'" in str(info.value)


@pytest.mark.usefixtures("fresh_registry")
def test_a_broken_installation_is_a_recipe_problem_not_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(
        monkeypatch,
        plugin.DATA_SOURCES_GROUP,
        ("arithmetic", "engine.plugins.arithmetic:SOURCE"),
        ("broken", "nonexistent_module_xyz:X"),
    )
    err = problems_of()
    assert "stages.data" in err.paths()
    assert "'broken'" in err.render()


# ---- arithmetic ----------------------------------------------------------------------------------
EQUATION = re.compile(r"(\d+)\+(\d+)=")


def _sum_of(prompt: str, hi: int) -> int:
    m = EQUATION.fullmatch(prompt)
    assert m, prompt
    a, b = int(m.group(1)), int(m.group(2))
    assert 0 <= a <= hi and 0 <= b <= hi
    return a + b


def test_arithmetic_text_documents_hold_correct_equations() -> None:
    params = arithmetic.ArithmeticParams(max_operand=7, num_samples=5, per_document=3)
    docs = list(arithmetic.read(params, "text"))
    assert len(docs) == 5 and all(isinstance(d, Text) for d in docs)
    for doc in docs:
        assert isinstance(doc, Text)
        lines = doc.text.split("\n")
        assert len(lines) == 3
        for line in lines:
            prompt, _, answer = line.partition("=")
            assert int(answer) == _sum_of(prompt + "=", 7)


def test_arithmetic_conversations_answer_the_user() -> None:
    records = list(arithmetic.read(arithmetic.ArithmeticParams(max_operand=50, num_samples=20), "conversation"))
    assert len(records) == 20
    for r in records:
        assert isinstance(r, Conversation)
        user, assistant = r.messages
        assert user.role == "user" and assistant.role == "assistant"
        assert int(assistant.content) == _sum_of(user.content, 50)


def test_arithmetic_demonstrations_restate_the_equation_at_the_asked_rate() -> None:
    def answers(rate: float) -> list[tuple[str, str]]:
        params = arithmetic.ArithmeticParams(max_operand=30, num_samples=2000, seed=5, restate_rate=rate)
        return [(r.messages[0].content, r.messages[1].content) for r in arithmetic.read(params, "conversation")]

    bare, half, full = answers(0.0), answers(0.5), answers(1.0)
    assert [p for p, _ in bare] == [p for p, _ in half] == [p for p, _ in full]  # the same problems
    for prompt, answer in bare:
        a, b = (int(x) for x in prompt.rstrip("=").split("+"))
        assert answer == str(a + b)
    assert all(answer == prompt + bare_answer for (prompt, answer), (_, bare_answer) in zip(full, bare, strict=True))
    restated = sum(answer.startswith(prompt) for prompt, answer in half) / len(half)
    assert 0.45 < restated < 0.55, restated


def test_arithmetic_preferences_reject_a_wrong_answer() -> None:
    records = list(arithmetic.read(arithmetic.ArithmeticParams(max_operand=3, num_samples=200), "preference"))
    assert len(records) == 200
    for r in records:
        assert isinstance(r, Preference)
        assert int(r.chosen) == _sum_of(r.prompt, 3)
        assert r.rejected != r.chosen and int(r.rejected) >= 0


def test_arithmetic_prompts_carry_the_reference_answer() -> None:
    records = list(arithmetic.read(arithmetic.ArithmeticParams(num_samples=30), "prompt"))
    assert len(records) == 30
    for r in records:
        assert isinstance(r, Prompt) and r.reference is not None
        assert int(r.reference) == _sum_of(r.prompt, 30)


@pytest.mark.parametrize("kind", ["text", "conversation", "preference", "prompt"])
def test_arithmetic_is_deterministic_for_a_seed(kind: Any) -> None:
    def read(seed: int) -> list[Any]:
        return list(arithmetic.read(arithmetic.ArithmeticParams(num_samples=50, seed=seed), kind))

    assert read(7) == read(7)
    assert read(7) != read(8)


def test_arithmetic_kinds_do_not_share_a_stream() -> None:
    params = arithmetic.ArithmeticParams(num_samples=50)
    chats = [r.messages[0].content for r in arithmetic.read(params, "conversation")]  # type: ignore[union-attr]
    prompts = [r.prompt for r in arithmetic.read(params, "prompt")]  # type: ignore[union-attr]
    assert chats != prompts


def test_arithmetic_params_are_checked() -> None:
    with pytest.raises(ValidationError):
        arithmetic.ArithmeticParams(max_operand=0)
    with pytest.raises(ValidationError):
        arithmetic.ArithmeticParams.model_validate({"bogus": 1})
    assert arithmetic.SOURCE.kinds == {"text", "conversation", "preference", "prompt"}


# ---- text_files ----------------------------------------------------------------------------------
@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    (tmp_path / "a.txt").write_text("first line\n\n  \nsecond line\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("third", encoding="utf-8")
    (tmp_path / "skip.md").write_text("not matched", encoding="utf-8")
    return tmp_path


def test_text_files_one_document_per_file(corpus: Path) -> None:
    params = text_files.TextFilesParams(glob=f"{corpus}/**/*.txt")
    assert list(text_files.read(params, "text")) == [Text("first line\n\n  \nsecond line\n"), Text("third")]


def test_text_files_one_document_per_non_empty_line(corpus: Path) -> None:
    params = text_files.TextFilesParams(glob=f"{corpus}/**/*.txt", unit="line")
    assert [t.text for t in text_files.read(params, "text")] == ["first line", "second line", "third"]  # type: ignore[union-attr]


def test_text_files_without_a_match_raise_file_not_found(tmp_path: Path) -> None:
    params = text_files.TextFilesParams(glob=f"{tmp_path}/*.txt")
    with pytest.raises(FileNotFoundError, match="text_files"):
        list(text_files.read(params, "text"))


# ---- jsonl ---------------------------------------------------------------------------------------
def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_jsonl_text_with_a_field_mapping(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "a.jsonl", [{"body": "one"}, "", {"body": 2}])
    params = jsonl.JsonlParams(glob=f"{tmp_path}/*.jsonl", text_field="body")
    assert list(jsonl.read(params, "text")) == [Text("one"), Text("2")]


def test_jsonl_conversations_with_a_field_mapping(tmp_path: Path) -> None:
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    _write_jsonl(tmp_path / "c.jsonl", [{"turns": turns}])
    params = jsonl.JsonlParams(glob=str(tmp_path / "c.jsonl"), messages_field="turns")
    assert list(jsonl.read(params, "conversation")) == [
        Conversation((Message("user", "hi"), Message("assistant", "hello")))
    ]


def test_jsonl_preferences_with_a_field_mapping(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "p.jsonl", [{"q": "2+2=", "good": "4", "bad": "5"}])
    params = jsonl.JsonlParams(
        glob=str(tmp_path / "p.jsonl"), prompt_field="q", chosen_field="good", rejected_field="bad"
    )
    assert list(jsonl.read(params, "preference")) == [Preference("2+2=", chosen="4", rejected="5")]


def test_jsonl_prompts_keep_the_reference_and_other_fields_as_metadata(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "q.jsonl", [{"q": "2+2=", "answer": 4, "topic": "sums"}, {"q": "hi"}])
    params = jsonl.JsonlParams(glob=str(tmp_path / "q.jsonl"), prompt_field="q", reference_field="answer")
    first, second = jsonl.read(params, "prompt")
    assert first == Prompt("2+2=", reference="4", metadata={"topic": "sums"})
    assert second == Prompt("hi", reference=None, metadata={})
    no_ref = jsonl.JsonlParams(glob=str(tmp_path / "q.jsonl"), prompt_field="q", reference_field=None)
    assert next(iter(jsonl.read(no_ref, "prompt"))).reference is None  # type: ignore[union-attr]


@pytest.mark.parametrize("bad_row", ['{"other": "x"}', "{not json", '["a", "list"]'])
def test_jsonl_bad_row_is_skipped_with_file_and_line(tmp_path: Path, bad_row: str) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, "", bad_row, {"text": "after"}])
    records = list(jsonl.read(jsonl.JsonlParams(glob=str(path)), "text"))
    assert records[0] == Text("fine") and records[2] == Text("after")
    assert isinstance(records[1], Skip) and records[1].where == f"{path}:3"


def test_text_files_skips_invalid_utf8_and_empty_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("good text")
    (tmp_path / "b.txt").write_bytes(b"bad \xff\xfe bytes")
    (tmp_path / "c.txt").write_text("  \n")
    records = list(text_files.read(text_files.TextFilesParams(glob=str(tmp_path / "*.txt")), "text"))
    assert records[0] == Text("good text")
    assert [(type(r).__name__, Path(r.where).name) for r in records[1:]] == [("Skip", "b.txt"), ("Skip", "c.txt")]  # type: ignore[union-attr]


def test_jsonl_without_a_match_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="jsonl"):
        list(jsonl.read(jsonl.JsonlParams(glob=f"{tmp_path}/*.jsonl"), "text"))


# ---- reward functions ----------------------------------------------------------------------------
def _samples(*responses: str, reference: str | None = "42") -> list[RewardSample]:
    return [RewardSample(prompt="q", response=r, reference=reference) for r in responses]


def _score(reward: RewardFunction, params: dict[str, Any], batch: list[RewardSample]) -> list[float]:
    return reward.score(reward.params.model_validate(params), batch)


def test_exact_match_compares_the_whole_response() -> None:
    batch = _samples("42", "  42\n", "41", "42 !")
    assert _score(exact_match.REWARD, {}, batch) == [1.0, 1.0, 0.0, 0.0]


def test_exact_match_extracts_the_answer_with_a_regex() -> None:
    batch = _samples("so the answer: 42.", "answer: 41", "no answer here")
    assert _score(exact_match.REWARD, {"extract": r"answer: (\d+)"}, batch) == [1.0, 0.0, 0.0]
    # Without a group, the whole match is the answer.
    assert _score(exact_match.REWARD, {"extract": r"\d+"}, _samples("x 42 y", "x 7 y")) == [1.0, 0.0]


def test_exact_match_ignore_case() -> None:
    batch = _samples("Paris", reference="paris")
    assert _score(exact_match.REWARD, {}, batch) == [0.0]
    assert _score(exact_match.REWARD, {"ignore_case": True}, batch) == [1.0]


def test_exact_match_without_a_reference_scores_zero() -> None:
    assert _score(exact_match.REWARD, {}, _samples("42", "", reference=None)) == [0.0, 0.0]


def test_regex_search_versus_full_match() -> None:
    batch = _samples("abc 12", "12", "abc")
    assert _score(regex_check.REWARD, {"pattern": r"\d+"}, batch) == [1.0, 1.0, 0.0]
    assert _score(regex_check.REWARD, {"pattern": r"\d+", "full_match": True}, batch) == [0.0, 1.0, 0.0]


def test_regex_on_match_and_on_miss() -> None:
    params = {"pattern": "^<answer>", "on_match": 2.5, "on_miss": -1.0}
    assert _score(regex_check.REWARD, params, _samples("<answer>4", "4 <answer>")) == [2.5, -1.0]


def test_regex_needs_a_pattern() -> None:
    with pytest.raises(ValidationError):
        regex_check.RegexParams.model_validate({})


def test_length_penalty_grows_linearly_beyond_the_budget() -> None:
    params = {"max_chars": 5, "per_char": 0.5}
    scores = _score(length_penalty.REWARD, params, _samples("", "abcde", "abcdef", "abcdefghij"))
    assert scores == pytest.approx([0.0, 0.0, -0.5, -2.5])
    assert _score(length_penalty.REWARD, {}, _samples("x" * 200, "x" * 250)) == pytest.approx([0.0, -0.5])


def test_reward_params_are_strict() -> None:
    for reward in (exact_match.REWARD, regex_check.REWARD, length_penalty.REWARD):
        assert issubclass(reward.params, BaseModel)
        with pytest.raises(ValidationError):
            reward.params.model_validate({"pattern": "x", "bogus": 1})
    with pytest.raises(ValidationError):
        length_penalty.LengthPenaltyParams(max_chars=-1)


# ---- plugins in a recipe -------------------------------------------------------------------------
def test_misspelt_data_source_gets_a_did_you_mean() -> None:
    err = problems_of("stages.data.sources[0].plugin=arithmetc")
    assert "stages.data.sources[0].plugin" in err.paths()
    problem = next(p for p in err.problems if p.path == "stages.data.sources[0].plugin")
    assert "arithmetc" in problem.message and "arithmetic" in problem.fix
    assert "did you mean 'arithmetic'?" in err.render()


def test_misspelt_reward_gets_a_did_you_mean() -> None:
    err = problems_of("stages.ppo.rewards[0].plugin=exact_mach")
    assert err.paths() == ["stages.ppo.rewards[0].plugin"]
    assert "did you mean 'exact_match'?" in err.render()


def test_bad_data_source_param_names_its_path() -> None:
    err = problems_of("stages.data.sources[0].params.max_operand=-5")
    assert err.paths() == ["stages.data.sources[0].params.max_operand"]
    assert "-5" in err.problems[0].message


def test_unknown_reward_param_names_its_path_and_the_valid_ones() -> None:
    err = problems_of("stages.ppo.rewards[0].params.bogus=1")
    assert err.paths() == ["stages.ppo.rewards[0].params.bogus"]
    assert "'bogus'" in err.problems[0].message
    assert "extract" in err.problems[0].fix and "ignore_case" in err.problems[0].fix


def test_records_a_plugin_does_not_produce_are_a_problem() -> None:
    err = problems_of(
        "stages.data.sources[2].plugin=text_files",
        "~stages.data.sources[2].params",
        "stages.data.sources[2].params.glob=x",
    )
    assert err.paths() == ["stages.data.sources[2].records"]
    assert "'conversation'" in err.problems[0].message and "text" in err.problems[0].fix


def test_bad_reward_regex_is_a_recipe_problem() -> None:
    err = problems_of("stages.ppo.rewards[0].params.extract=(")
    assert err.paths() == ["stages.ppo.rewards[0].params.extract"]


def test_python_docs_yields_real_english_prose() -> None:
    from engine.plugins import python_docs

    chunks = list(python_docs.read(python_docs.PythonDocsParams(chunk_chars=1000), "text"))
    topics = list(python_docs.read(python_docs.PythonDocsParams(unit="topic"), "text"))
    assert len(chunks) > len(topics) > 50
    text = " ".join(c.text for c in topics)  # type: ignore[union-attr]
    assert len(text) > 300_000 and " the " in text and "statement" in text
    assert "python_docs" in plugin.data_sources()


def test_parquet_reads_each_kind_in_batches(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.plugins import parquet

    pq.write_table(pa.table({"body": [f"doc {i}" for i in range(10)]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"prompt": ["1+1="], "answer": ["2"]}), tmp_path / "q.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    docs = list(
        parquet.read(parquet.ParquetParams(glob=str(tmp_path / "a.parquet"), text_field="body", batch_rows=3), "text")
    )
    assert docs == [Text(f"doc {i}") for i in range(10)]
    prompts = parquet.ParquetParams(glob=str(tmp_path / "q.parquet"), reference_field="answer")
    assert next(iter(parquet.read(prompts, "prompt"))) == Prompt("1+1=", reference="2", metadata={})
    broken = list(parquet.read(parquet.ParquetParams(glob=str(tmp_path / "broken.parquet")), "text"))
    assert len(broken) == 1 and isinstance(broken[0], Skip) and broken[0].where.endswith("broken.parquet")
    assert "parquet" in plugin.data_sources()


def _shard(path: Path, members: dict[str, bytes]) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_reads_shards_and_reports_truncated_ones(tmp_path: Path) -> None:
    from engine.plugins import webdataset_source as wds

    _shard(tmp_path / "s0.tar", {f"{i:04d}.txt": f"text {i}".encode() for i in range(5)} | {"0009.txt": b"\xff\xfe"})
    _shard(tmp_path / "s1.tar", {f"{i:04d}.txt": (f"long text {i} " * 200).encode() for i in range(5)})
    whole = (tmp_path / "s1.tar").read_bytes()
    (tmp_path / "s1.tar").write_bytes(whole[: len(whole) // 2])  # truncated mid-shard
    out = list(wds.read(wds.WebdatasetParams(glob=str(tmp_path / "*.tar")), "text"))
    texts = [r.text for r in out if isinstance(r, Text)]
    skips = [r for r in out if isinstance(r, Skip)]
    assert texts[:5] == [f"text {i}" for i in range(5)] and 5 < len(texts) < 10
    assert len(skips) == 2 and "0009.txt" in skips[0].where and "truncated" in skips[1].reason
    _shard(tmp_path / "j.tar", {"0000.json": json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode()})
    pairs = list(wds.read(wds.WebdatasetParams(glob=str(tmp_path / "j.tar"), member="json"), "preference"))
    assert pairs == [Preference("p", "a", "b")]


def test_hf_disk_reads_a_saved_dataset_and_its_splits(tmp_path: Path) -> None:
    import datasets

    from engine.plugins import hf_disk

    datasets.Dataset.from_dict({"text": ["one", "two", None]}).save_to_disk(str(tmp_path / "ds"))
    out = list(hf_disk.read(hf_disk.HfDiskParams(glob=str(tmp_path / "ds")), "text"))
    assert out[:2] == [Text("one"), Text("two")] and isinstance(out[2], Skip)  # a null field is no text
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(OSError, match=r"set params\.split"):
        list(hf_disk.read(hf_disk.HfDiskParams(glob=str(tmp_path / "dd")), "preference"))
    pairs = list(hf_disk.read(hf_disk.HfDiskParams(glob=str(tmp_path / "dd"), split="train"), "preference"))
    assert pairs == [Preference("a", "b", "c")]
    assert "hf_disk" in plugin.data_sources()


def test_numeric_distance_gives_partial_credit() -> None:
    params = numeric_distance.NumericDistanceParams(scale=4)
    batch = [RewardSample("2+3=", "5", "5"), RewardSample("2+3=", " 7 apples", "5"), RewardSample("2+3=", "12", "5"),
             RewardSample("2+3=", "five", "5"), RewardSample("q", "5", None), RewardSample("2-3=", "-1", "-1")]  # fmt: skip
    assert numeric_distance.score(params, batch) == [1.0, 0.5, 0.0, 0.0, 0.0, 1.0]
    extract = numeric_distance.NumericDistanceParams(scale=4, extract=r"answer: (\d+)", missing=-1)
    assert numeric_distance.score(extract, [RewardSample("p", "3 then answer: 6", "5")]) == [0.75]
    assert numeric_distance.score(extract, [RewardSample("p", "6", "5")]) == [-1.0]
    with pytest.raises(ValueError, match="regular expression"):
        numeric_distance.NumericDistanceParams(extract="(")
