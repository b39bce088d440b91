"""The `sft` kind: supervised fine-tuning on conversations, loss on assistant tokens (docs/stages/sft.md)."""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import Problem
from ..schema import SftStage
from .base import HeldOut, NextRound, Reference, RuleContext, StageKind
from .pretrain import sequence_workload


def rules(where: str, stage: SftStage, ctx: RuleContext) -> Iterator[Problem]:
    """Packing runs where each row's block-diagonal attention mask reaches the attention: the local layer
    spec (CPU, or GPUs with ENGINE_LAYER_SPEC=local), one pipeline stage (packed micro-batches have rows of
    their own number and length, which pipeline sends do not), no context parallelism."""
    if stage.batching != "packed":
        return
    par, at = stage.parallelism, f"{where}.batching"
    if par.pp > 1:
        yield Problem(at, f"=packed with parallelism.pp={par.pp}: packed micro-batches vary in shape, which "
                      "pipeline sends do not", "use batching: bucketed, or pp: 1")  # fmt: skip
    if par.cp > 1:
        yield Problem(at, f"=packed with parallelism.cp={par.cp}: the block-diagonal mask is not split across "
                      "context-parallel ranks", "use batching: bucketed, or cp: 1")  # fmt: skip
    cluster = ctx.cluster
    if cluster is not None and cluster.device == "cuda" and cluster.env.get("ENGINE_LAYER_SPEC") != "local":
        yield Problem(at, f"=packed on cluster {cluster.name!r} (Transformer Engine layers): packed sequences "
                      "there need THD inputs (PackedSeqParams), which this stage does not build",
                      "use batching: bucketed, or set env ENGINE_LAYER_SPEC: local in the cluster profile")  # fmt: skip


KIND = StageKind(
    name="sft",
    model=SftStage,
    produces="policy",
    worker="engine.worker.stages.sft",
    references=(
        Reference("data", ("data",), records="conversation"),
        Reference("init_from", ("pretrain", "sft"), checkpoint_ok=True),
    ),
    rules=rules,
    workload=sequence_workload,
    next_round=NextRound(start_from="policy"),
    held_out=(HeldOut("val_loss", "val loss", summary="val loss"),),
)
