"""One training or evaluation step through Megatron-Core's pipeline schedules.

`get_forward_backward_func` picks the schedule from the parallel state: no pipelining, 1F1B, or the
interleaved 1F1B when vpp > 1. Each virtual chunk gets its own iterator over the same micro-batches.
The schedule divides the returned loss by the number of micro-batches in place, so the reported value
is a clone taken before that. The step's loss is averaged over micro-batches and data-parallel ranks
(context-parallel ranks included: each sees its own part of every sequence) and moved from the last
pipeline stage to every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    skipped: bool


def _to(batch: Batch, device: str) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()} if device != "cpu" else batch


def lm_forward_step(device: str) -> Callable[[Iterator[Batch], Any], tuple[torch.Tensor, Callable[..., Any]]]:
    """Next-token prediction: the model returns per-token losses; average them over the loss mask."""

    def forward_step(data: Iterator[Batch], model: Any) -> tuple[torch.Tensor, Callable[..., Any]]:
        from megatron.core import parallel_state as ps
        from megatron.core.utils import get_batch_on_this_cp_rank

        batch = _to(next(data), device)
        if ps.get_context_parallel_world_size() > 1:
            # Each context-parallel rank keeps two of 2·cp sequence chunks (load-balanced causal attention).
            batch = get_batch_on_this_cp_rank(batch)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def loss_func(per_token: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            mask = batch["loss_mask"].float()
            loss = (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)
            return loss, {"loss": loss.detach().clone()}

        return output, loss_func

    return forward_step


def _reduce(losses: list[dict[str, torch.Tensor]]) -> float:
    """Mean of the micro-batch losses over data-parallel ranks, delivered to every rank."""
    from megatron.core import parallel_state as ps

    total = torch.zeros(2, dtype=torch.float64)
    for item in losses:
        total[0] += item["loss"].double().cpu()
        total[1] += 1
    if torch.cuda.is_available():
        total = total.cuda()
    dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    return float(total[0] / total[1].clamp(min=1))


def run_schedule(
    built: Any, make_iter: Callable[[], Iterator[Batch]], *, forward_step: Any, num_microbatches: int,
    seq_length: int, mbs: int, forward_only: bool,
) -> float:  # fmt: skip
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = built.chunks
    iterators: Any = [make_iter() for _ in chunks] if len(chunks) > 1 else make_iter()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )
    return _reduce(losses or [])


def train_step(built: Any, make_iter: Callable[[], Iterator[Batch]], **schedule: Any) -> StepResult:
    for chunk in built.chunks:
        chunk.zero_grad_buffer()
    built.optimizer.zero_grad()
    loss = run_schedule(built, make_iter, forward_only=False, **schedule)
    ok, grad_norm, _ = built.optimizer.step()
    built.scheduler.step(increment=1)
    lr = built.optimizer.param_groups[0]["lr"]
    return StepResult(loss=loss, grad_norm=float(grad_norm or 0.0), lr=float(lr), skipped=not ok)


@torch.no_grad()
def eval_loss(built: Any, make_iter: Callable[[], Iterator[Batch]], **schedule: Any) -> float:
    for chunk in built.chunks:
        chunk.eval()
    try:
        return run_schedule(built, make_iter, forward_only=True, **schedule)
    finally:
        for chunk in built.chunks:
            chunk.train()
