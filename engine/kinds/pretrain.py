"""The `pretrain` kind: next-token prediction on a data stage's text (docs/stages/pretrain.md)."""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import Problem, did_you_mean
from ..schema import DataStage, PretrainStage, TrainingStage
from .base import LOSS, LR, HeldOut, NextRound, Reference, RuleContext, StageKind, Workload, perplexity


def sequence_workload(stage: TrainingStage, seq_length: int) -> Workload:
    """A global batch of sequences of the model's length, trained once per step (pretraining, SFT, reward model)."""
    return Workload(seq_length=seq_length, samples=stage.training.global_batch_size)


def rules(where: str, stage: PretrainStage, ctx: RuleContext) -> Iterator[Problem]:
    target = ctx.recipe.stages.get(stage.data)
    if not isinstance(target, DataStage) or not stage.mixture:
        return
    have = [s.name for s in target.sources if s.records == "text"]
    for key in stage.mixture:
        if key not in have:
            yield Problem(f"{where}.mixture.{key}", "names no text source of the data stage", did_you_mean(key, have))
    for key, w in stage.mixture.items():
        if w < 0:
            yield Problem(f"{where}.mixture.{key}", f"={w} is negative", "use a weight ≥ 0")


KIND = StageKind(
    name="pretrain",
    model=PretrainStage,
    produces="policy",
    worker="engine.worker.stages.pretrain",
    references=(
        Reference("data", ("data",), records="text"),
        Reference("init_from", ("pretrain",), checkpoint_ok=True),
    ),
    rules=rules,
    workload=sequence_workload,
    next_round=NextRound(skip=True),
    held_out=(
        HeldOut("val_loss", "val loss", summary="val loss", change=False),
        HeldOut(
            "val_loss", "perplexity exp(val loss)", summary="perplexity", transform=perplexity, change=False, digits=2
        ),
    ),
    charts=(LOSS, LR),
)
