"""The `dpo` kind: offline preference optimisation of the policy on ranked pairs (docs/stages/dpo.md)."""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import Problem
from ..schema import DpoStage
from .base import LOSS, LR, Chart, HeldOut, NextRound, Reference, RuleContext, StageKind, Workload
from .checks import packing_rules


def workload(stage: DpoStage, seq_length: int) -> Workload:
    """A global batch of pairs: two sequences each, trained once per step; the reference (none for simpo)
    holds weights only and runs one forward pass over them."""
    reference = stage.loss != "simpo"
    return Workload(seq_length=seq_length, samples=2 * stage.training.global_batch_size,
                    forward_passes=1.0 if reference else 0.0, frozen_models=int(reference))  # fmt: skip


def rules(where: str, stage: DpoStage, ctx: RuleContext) -> Iterator[Problem]:
    if stage.loss == "simpo" and stage.reference is not None:
        yield Problem(f"{where}.reference", f"={stage.reference!r} with loss=simpo, which has no reference",
                      "remove reference, or use another loss")  # fmt: skip
    if stage.label_smoothing and stage.loss != "sigmoid":
        yield Problem(f"{where}.label_smoothing", f"={stage.label_smoothing} with loss={stage.loss}",
                      "label smoothing is cDPO's, for loss=sigmoid; remove it")  # fmt: skip
    yield from packing_rules(where, stage, ctx)


KIND = StageKind(
    name="dpo",
    model=DpoStage,
    produces="policy",
    worker="engine.worker.stages.dpo",
    references=(
        Reference("data", ("data",), records="preference"),
        Reference("init_from", ("sft", "pretrain", "dpo", "ppo"), checkpoint_ok=True),
        Reference("reference", ("sft", "pretrain", "dpo", "ppo"), checkpoint_ok=True),
    ),
    rules=rules,
    workload=workload,
    next_round=NextRound(start_from="policy"),
    held_out=(
        HeldOut("val_accuracy", "val accuracy", summary="implicit-reward accuracy"),
        HeldOut("val_margin", "val margin", summary="margin"),
    ),
    charts=(LOSS, Chart("implicit-reward accuracy", "accuracy", ("accuracy", "val_accuracy")), LR),
)
