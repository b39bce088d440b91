"""Runs, rounds, lineage records, the end-of-run summary and list appends in overrides; no torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.errors import EngineError
from engine.lineage import chain, continuation, list_runs, next_run_dir, write_lineage, write_run_record
from engine.load import load_recipe
from engine.summary import held_out, read_metrics

from .conftest import TINY, compile_with


def _write_metrics(stage_dir: Path, *lines: dict[str, float]) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_held_out_lines_per_kind(tmp_path: Path) -> None:
    _write_metrics(tmp_path, {"step": 0, "val_reward": 0.5, "val_accuracy": 0.25}, {"step": 3, "loss": 1.0},
                   {"step": 3, "val_reward": 1.5, "val_accuracy": 0.5})  # fmt: skip
    lines = read_metrics(tmp_path)
    assert [m["step"] for m in lines] == [0, 3]  # a step logged twice: the later line
    assert held_out("ppo", lines) == "reward 0.500 → 1.500 · accuracy 0.250 → 0.500"
    assert held_out("pretrain", [{"step": 9, "val_loss": 2.0}]) == "val loss 2.000 · perplexity 7.39"
    assert held_out("reward_model", [{"step": 1, "val_accuracy": 0.8}]) == "pair accuracy 0.800"
    assert held_out("sft", []) == "-"


def _finish(plan_dir: Path, overrides: tuple[str, ...], round_: int, parents: dict[str, list[str]]) -> Path:
    """A run whose stages all finished, with fake checkpoints and lineage records."""
    plan = compile_with(f"run_dir={plan_dir}", *overrides)
    write_run_record(plan, round_=round_, continued_from=None)
    (plan_dir / "plan.json").write_text(plan.to_json())
    for job in plan.jobs:
        out = Path(job.outputs[0].path)
        if job.outputs[0].kind == "checkpoint":
            (out / "step_00000002").mkdir(parents=True)
            tokenizer = plan_dir / "data" / "tokenizer" / "tokenizer.json"
            tokenizer.parent.mkdir(parents=True, exist_ok=True)
            tokenizer.write_text("{}")
            meta = {"parents": parents.get(job.name, []), "tokenizer": {"path": str(tokenizer)}}
            (out / "step_00000002" / "meta.json").write_text(json.dumps(meta))
            (out / "latest").write_text("step_00000002")
        _write_metrics(out.parent, {"step": 2, "val_loss": 1.0})
        write_lineage(plan, job)
        (out.parent / "done.json").write_text(json.dumps({"cache_key": job.cache_key}))
    return plan_dir


def test_continuation_starts_from_the_earlier_policy_and_reward_model(tmp_path: Path) -> None:
    first = _finish(tmp_path / "tiny", (), 1, {"sft": [str(tmp_path / "tiny/pretrain/checkpoints/step_00000002")]})
    plan = compile_with()
    overrides, stages, round_ = continuation(plan, first)
    assert round_ == 2 and stages == ["data", "sft", "reward", "dpo", "ppo"]
    tokenizer = (first / "data" / "tokenizer" / "tokenizer.json").resolve()
    assert overrides == [
        "~tokenizer",  # the next round tokenizes with round 1's tokenizer, not one trained anew
        f'tokenizer={{kind: file, path: "{tokenizer}"}}',
        f"stages.sft.init_from={(first / 'ppo/checkpoints/step_00000002').resolve()}",
        f"stages.reward.init_from={(first / 'reward/checkpoints/step_00000002').resolve()}",
        f"stages.dpo.init_from={(first / 'ppo/checkpoints/step_00000002').resolve()}",  # and its reference
    ]
    assert next_run_dir(first, 2) == str(tmp_path / "tiny-r2")
    assert next_run_dir(tmp_path / "tiny-r2", 3) == str(tmp_path / "tiny-r3")
    with pytest.raises(EngineError, match="not a run directory"):
        continuation(plan, tmp_path / "nowhere")


def test_lineage_follows_parents_across_rounds(tmp_path: Path) -> None:
    r1 = tmp_path / "tiny"
    _finish(r1, (), 1, {"sft": [str(r1 / "pretrain/checkpoints/step_00000002")],
                        "ppo": [str(r1 / "sft/checkpoints/step_00000002")]})  # fmt: skip
    r2 = tmp_path / "tiny-r2"
    _finish(r2, (), 2, {"sft": [str(r1 / "ppo/checkpoints/step_00000002")],
                        "ppo": [str(r2 / "sft/checkpoints/step_00000002")]})  # fmt: skip
    records = chain(r2 / "ppo" / "checkpoints")
    assert [(r["version"], r["stage"]) for r in records] == [
        ("v2", "ppo"), ("v2", "sft"), ("v1", "ppo"), ("v1", "sft"), ("v1", "pretrain")
    ]  # fmt: skip
    assert records[0]["data_manifests"] == {}  # no manifest.json was written in this fake run
    assert [r["round"] for r in list_runs(tmp_path)] == [1, 2]
    assert list_runs(tmp_path)[1]["finished"] == "6/6"
    with pytest.raises(EngineError, match="no finished stage"):
        chain(tmp_path)


def test_an_imported_parent_ends_the_chain_as_external(tmp_path: Path) -> None:
    imported = tmp_path / "imported"
    imported.mkdir()
    run = _finish(tmp_path / "tiny", (), 1, {"pretrain": [str(imported)]})
    records = chain(run / "pretrain")
    assert [r["kind"] for r in records] == ["pretrain", "external"]


def test_overrides_append_to_lists() -> None:
    r = load_recipe(TINY, ["stages.data.sources+={name: more, plugin: arithmetic, records: prompt, params: {seed: 9}}"])
    assert [s.name for s in r.stages["data"].sources][-2:] == ["questions", "more"]  # type: ignore[union-attr]
    r = load_recipe(TINY, ["stages.ppo.rewards+=[{plugin: regex, params: {pattern: '^1'}}, {plugin: length_penalty}]"])
    assert [x.plugin for x in r.stages["ppo"].rewards] == ["exact_match", "regex", "length_penalty"]  # type: ignore[union-attr]
    with pytest.raises(Exception, match="is not a list"):
        load_recipe(TINY, ["stages.sft.training+=3"])


def test_a_changed_cache_key_moves_earlier_work_aside(tmp_path: Path) -> None:
    from engine.artifacts import claim_stage, mark_done

    stage = tmp_path / "sft"
    assert claim_stage(stage, "a" * 64) is None  # a new folder
    (stage / "checkpoints").mkdir()
    mark_done(stage, "a" * 64)
    assert claim_stage(stage, "a" * 64) is None  # the same inputs: kept where it is
    moved = claim_stage(stage, "b" * 64)
    assert moved == tmp_path / f"sft.superseded-{'a' * 12}"
    assert (moved / "checkpoints").is_dir() and (moved / "done.json").is_file()  # nothing is lost
    assert sorted(p.name for p in stage.iterdir()) == ["job.json"]
    # Killed before finishing, then changed again: job.json alone tells whose work the folder holds.
    assert claim_stage(stage, "c" * 64) == tmp_path / f"sft.superseded-{'b' * 12}"


def test_a_corrupt_run_record_is_one_clear_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run.json").write_text("{not json")
    done = subprocess.run([sys.executable, "-m", "engine", "runs", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{tmp_path / 'broken'}: its run.json or plan.json cannot be read" in done.stderr.replace("\n", "")
