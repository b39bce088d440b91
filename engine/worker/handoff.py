"""The hand-off between stages: what a checkpoint's meta.json records, and the contract a stage checks before
it starts from another stage's checkpoint (or from a checkpoint directory a recipe names: an import).

meta.json holds the architecture, the tokenizer (hash, special token ids), the parallel layout, the
stage, its kind and cache key, and the parent checkpoints. A checkpoint is handed to another stage only
with the same architecture, tokenizer and special tokens; it may have been saved at any layout (Megatron's
distributed checkpoints reshard on load).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import __version__
from ..compile.resolve import recorded_architecture
from ..errors import EngineError
from ..schema.stages import is_checkpoint_path
from . import checkpoint
from .context import Context

SPECIAL_FIELDS = ("pad", "bos", "eod", "end", "roles")


def meta_for(ctx: Context, tokenizer: dict[str, Any], parents: list[str]) -> dict[str, Any]:
    job, plan = ctx.job, ctx.plan
    assert job.layout is not None
    return {
        "format": 1,
        "engine_version": __version__,
        "stage": job.name,
        "kind": job.kind,
        "recipe": plan.recipe,
        "recipe_hash": plan.recipe_hash,
        "cache_key": job.cache_key,
        "architecture": plan.model.model_dump(mode="json"),
        "tokenizer": tokenizer,
        "layout": job.layout.model_dump(mode="json"),
        "parents": parents,
    }


def check_contract(
    parent: Path, meta: dict[str, Any], *, architecture: dict[str, Any], tokenizer: dict[str, Any]
) -> None:
    """A checkpoint handed to another stage must have the same architecture, tokenizer and special tokens."""
    theirs_tok = meta.get("tokenizer", {})
    theirs, ours = theirs_tok.get("sha256"), tokenizer.get("sha256")
    if theirs != ours:
        raise EngineError(
            f"checkpoint {parent} was trained with tokenizer {theirs}, this stage uses {ours}; "
            "start from a checkpoint trained on this recipe's data stage, or rerun its pretraining"
        )
    special = [k for k in SPECIAL_FIELDS if k in tokenizer and theirs_tok.get(k) != tokenizer[k]]
    if special:
        pairs = ", ".join(f"{k}: {theirs_tok.get(k)} vs {tokenizer[k]}" for k in special)
        raise EngineError(f"checkpoint {parent} has other special token ids ({pairs})")
    recorded = recorded_architecture(meta.get("architecture", {}))
    diff = sorted(k for k in architecture if recorded.get(k) != architecture[k])
    if diff:
        pairs = ", ".join(f"{k}: {recorded.get(k)} vs {architecture[k]}" for k in diff)
        raise EngineError(f"checkpoint {parent} has another architecture ({pairs})")


def parent_checkpoint(ctx: Context, stage: str) -> Path:
    """The newest checkpoint of an earlier stage, or the checkpoint directory that `stage` names."""
    if is_checkpoint_path(stage):
        if not (Path(stage) / checkpoint.META).is_file():
            raise EngineError(f"stage {ctx.job.name!r} starts from {stage!r}, which is not a checkpoint (no meta.json)")
        return Path(stage)
    root = Path(ctx.plan.job(stage).outputs[0].path)
    parent = checkpoint.latest_checkpoint(root)
    if parent is None:
        raise EngineError(f"stage {ctx.job.name!r} starts from {stage!r}, which has no checkpoint in {root}")
    return parent


def checked_parent(ctx: Context, stage: str, tokenizer: dict[str, Any]) -> Path:
    """The newest checkpoint of `stage`, after checking that it fits this job (check_contract)."""
    parent = parent_checkpoint(ctx, stage)
    architecture = ctx.plan.model.model_dump(mode="json")
    check_contract(parent, checkpoint.read_meta(parent), architecture=architecture, tokenizer=tokenizer)
    return parent


def checked_policy(ctx: Context, stage: str, tokenizer: dict[str, Any], *, field: str) -> Path:
    """checked_parent for a checkpoint that must be a language model (a policy), not a scalar-head one;
    `field` is the recipe field that named it, for the message."""
    from ..kinds import either, producing

    parent = checked_parent(ctx, stage, tokenizer)
    if "head" in checkpoint.read_meta(parent):
        raise EngineError(
            f"stages.{ctx.job.name}.{field}: {parent} is a scalar-head checkpoint (a reward model or critic); "
            f"the {field} must be a policy (a {either(producing('policy'))} stage's)"
        )
    return parent
