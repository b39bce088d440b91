"""The `sft` kind: supervised fine-tuning on conversations, loss on assistant tokens (docs/stages/sft.md)."""

from __future__ import annotations

from ..schema import SftStage
from .base import HeldOut, NextRound, Reference, StageKind
from .checks import packing_rules
from .pretrain import sequence_workload

KIND = StageKind(
    name="sft",
    model=SftStage,
    produces="policy",
    worker="engine.worker.stages.sft",
    references=(
        Reference("data", ("data",), records="conversation"),
        Reference("init_from", ("pretrain", "sft"), checkpoint_ok=True),
    ),
    rules=packing_rules,
    workload=sequence_workload,
    next_round=NextRound(start_from="policy"),
    held_out=(HeldOut("val_loss", "val loss", summary="val loss"),),
)
