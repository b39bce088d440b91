"""The `reward_model` kind: a scalar head trained on ranked pairs (docs/stages/reward_model.md)."""

from __future__ import annotations

from ..schema import RewardModelStage
from .base import LOSS, LR, Chart, HeldOut, NextRound, Reference, StageKind
from .checks import packing_rules
from .pretrain import sequence_workload

KIND = StageKind(
    name="reward_model",
    model=RewardModelStage,
    produces="reward_model",
    worker="engine.worker.stages.reward_model",
    references=(
        Reference("data", ("data",), records="preference"),
        Reference("init_from", ("sft", "pretrain", "reward_model"), checkpoint_ok=True),
    ),
    rules=packing_rules,
    workload=sequence_workload,
    next_round=NextRound(start_from="reward_model"),
    held_out=(
        HeldOut("val_accuracy", "val accuracy", summary="pair accuracy"),
        HeldOut("val_loss", "val loss"),
    ),
    charts=(LOSS, Chart("accuracy", "accuracy", ("accuracy", "val_accuracy")), LR),
)
