"""`init_from` naming a checkpoint directory (an imported model): compile-time checks. No torch here;
the conversions themselves are tested in tests/worker/test_hf.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from engine.schema.stages import is_checkpoint_path

from .conftest import compile_with, problems_of


def _checkpoint(folder: Path, **architecture: Any) -> Path:
    """A checkpoint directory whose meta.json carries the tiny recipe's architecture, changed by `architecture`."""
    model = compile_with().model.model_dump(mode="json")
    folder.mkdir(parents=True)
    meta = {"architecture": {**model, **architecture}, "tokenizer": {"sha256": "abc", "path": "t/tokenizer.json"}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_a_value_with_a_slash_or_a_leading_dot_is_a_path() -> None:
    assert is_checkpoint_path("./imported") and is_checkpoint_path("runs/x/sft/checkpoints/step_00000010")
    assert is_checkpoint_path("..") and not is_checkpoint_path("pretrain")


def test_sft_and_pretrain_start_from_a_checkpoint_directory(tmp_path: Path) -> None:
    ckpt = str(_checkpoint(tmp_path / "imported"))
    plan = compile_with(f"stages.sft.init_from={ckpt}", f"stages.pretrain.init_from={ckpt}")
    sft = plan.job("sft")
    assert sft.config["init_from"] == ckpt
    assert sft.depends_on == ("data",)  # the checkpoint is no stage: nothing to wait for
    assert plan.job("pretrain").depends_on == ("data",)
    assert "sft" in plan.job("reward").depends_on


def test_a_missing_checkpoint_names_the_path_the_value_and_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    err = problems_of(f"stages.sft.init_from={missing}")
    assert err.paths() == ["stages.sft.init_from"]
    text = err.problems[0].render()
    assert text.startswith(f"stages.sft.init_from={str(missing)!r} is not a checkpoint directory: no such directory")
    assert "`engine import`" in text and "checkpoints/step_N" in text


def test_a_folder_without_meta_json_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    err = problems_of(f"stages.pretrain.init_from={tmp_path / 'empty'}")
    assert err.paths() == ["stages.pretrain.init_from"]
    assert "has no meta.json" in err.render()


def test_another_architecture_is_refused_before_anything_runs(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "wide", hidden_size=256, num_layers=2)
    err = problems_of(f"stages.sft.init_from={ckpt}")
    assert err.paths() == ["stages.sft.init_from"]
    assert "hidden_size: 256 vs 128" in err.render() and "num_layers: 2 vs 6" in err.render()


def test_another_tokenizer_file_is_refused(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "imported")
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"model": {"vocab": {"a": 383}}}')
    err = problems_of("tokenizer.kind=file", f"tokenizer.path={tok}", f"stages.sft.init_from={ckpt}")
    assert err.paths() == ["stages.sft.init_from"]
    assert hashlib.sha256(tok.read_bytes()).hexdigest() in err.render()
    assert "set tokenizer.path to the checkpoint's tokenizer (t/tokenizer.json;" in err.render()


def test_other_references_take_no_paths(tmp_path: Path) -> None:
    ckpt = str(_checkpoint(tmp_path / "imported"))
    err = problems_of(f"stages.ppo.reward_model={ckpt}", f"stages.ppo.critic_from={ckpt}")
    assert sorted(err.paths()) == ["stages.ppo.critic_from", "stages.ppo.reward_model"]
    assert "only the init_from of pretrain, sft, reward_model and dpo stages, the reference of dpo and ppo " \
        "stages and a ppo stage's policy accept" in err.render()
    # A ppo stage's reference may be a checkpoint directory: the plan depends on no stage for it.
    ppo = compile_with(f"stages.ppo.reference={ckpt}").job("ppo")
    assert ppo.config["reference"] == ckpt


def test_a_ppo_policy_may_be_a_checkpoint_directory(tmp_path: Path) -> None:
    ckpt = str(_checkpoint(tmp_path / "imported"))
    plan = compile_with(f"stages.ppo.policy={ckpt}")
    ppo = next(j for j in plan.jobs if j.kind == "ppo")
    assert "sft" not in ppo.depends_on and ppo.config["policy"] == ckpt
    err = problems_of(f"stages.ppo.policy={tmp_path / 'missing'}")
    assert err.paths() == ["stages.ppo.policy"] and "is not a checkpoint directory" in err.render()
