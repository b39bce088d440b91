"""One training or evaluation step through Megatron-Core's pipeline schedules.

`get_forward_backward_func` picks the schedule from the parallel state: no pipelining, 1F1B, or the
interleaved 1F1B when vpp > 1. Each virtual chunk gets its own iterator over the same micro-batches.

A forward step returns the model's output and a loss function; the loss function returns the loss the
gradient flows from and a dict of values to report. Every reported value is averaged over the step's
micro-batches and the data-parallel ranks (context-parallel ranks included: each sees its own part of
every sequence) and moved from the last pipeline stage to every rank. The schedule divides the loss
by the number of micro-batches in place, so reported values are clones taken before that.

Two objectives share the schedules:

* language modelling (pretraining, SFT): per-token cross-entropy averaged over the loss mask; SFT's
  mask keeps only assistant tokens. It also reports the summed loss and the token count, so that a
  validation loss can be weighted by tokens across micro-batches of different sizes;
* pairwise preference (reward model): Bradley–Terry loss −log σ(r_chosen − r_rejected − margin) on the
  scalar read at each sequence's last real token. It reports sums over pairs (loss, correct order,
  margin, scores) and the pair count, from which accuracy and mean margin follow exactly.

`summarise` turns the sums into the metrics a stage logs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

Batch = dict[str, torch.Tensor]
ForwardStep = Callable[[Iterator[Batch], Any], tuple[torch.Tensor, Callable[..., Any]]]

LM_KEYS = ("loss", "nll_sum", "tokens")
PAIR_KEYS = ("loss", "loss_sum", "correct_sum", "margin_sum", "chosen_sum", "rejected_sum", "pairs")


@dataclass(frozen=True)
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    skipped: bool
    values: dict[str, float]


def _to(batch: Batch, device: str) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()} if device != "cpu" else batch


def lm_forward_step(device: str) -> ForwardStep:
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
            nll = (per_token.float() * mask).sum()
            loss = nll / mask.sum().clamp(min=1.0)
            return loss, {"loss": loss.detach().clone(), "nll_sum": nll.detach().clone(), "tokens": mask.sum()}

        return output, loss_func

    return forward_step


def pair_scores(values: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The scalar of each sequence at its last real token: values [b, s], last [b] → [b]."""
    return values.float().gather(1, last.long().unsqueeze(1)).squeeze(1)


def pair_forward_step(device: str, margin: float) -> ForwardStep:
    """Bradley–Terry on (chosen, rejected) pairs: a micro-batch holds the chosen sequences, then the
    rejected ones, so the schedule sees 2·mbs rows; `weight` zeroes padding pairs in evaluation."""

    def forward_step(data: Iterator[Batch], model: Any) -> tuple[torch.Tensor, Callable[..., Any]]:
        batch = _to(next(data), device)
        output = model(batch["tokens"], batch["position_ids"], None)

        def loss_func(values: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            scores = pair_scores(values, batch["last"])
            chosen, rejected = scores.chunk(2)
            weight = batch["weight"].float()
            diff = chosen - rejected
            per_pair = -F.logsigmoid(diff - margin)
            loss = (per_pair * weight).sum() / weight.sum().clamp(min=1.0)
            report = {
                "loss": loss.detach().clone(),
                "loss_sum": (per_pair.detach() * weight).sum(),
                "correct_sum": ((diff > 0).float() * weight).sum(),
                "margin_sum": (diff.detach() * weight).sum(),
                "chosen_sum": (chosen.detach() * weight).sum(),
                "rejected_sum": (rejected.detach() * weight).sum(),
                "pairs": weight.sum(),
            }
            return loss, report

        return output, loss_func

    return forward_step


def _reduce(outputs: list[dict[str, torch.Tensor]], keys: Sequence[str]) -> dict[str, float]:
    """Means of the reported values over micro-batches and data-parallel ranks, on every rank."""
    from megatron.core import parallel_state as ps

    total = torch.zeros(len(keys) + 1, dtype=torch.float64)
    for item in outputs:
        for i, key in enumerate(keys):
            total[i] += item[key].double().cpu()
        total[-1] += 1
    if torch.cuda.is_available():
        total = total.cuda()
    dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    count = total[-1].clamp(min=1)
    return {key: float(total[i] / count) for i, key in enumerate(keys)}


def run_schedule(
    built: Any, make_iter: Callable[[], Iterator[Batch]], *, forward_step: ForwardStep, num_microbatches: int,
    seq_length: int, mbs: int, forward_only: bool, keys: Sequence[str] = LM_KEYS,
) -> dict[str, float]:  # fmt: skip
    """`mbs` is the number of rows the schedule sees per micro-batch (2 per pair for the reward model)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = built.chunks
    iterators: Any = [make_iter() for _ in chunks] if len(chunks) > 1 else make_iter()
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )
    return _reduce(outputs or [], keys)


def train_step(built: Any, make_iter: Callable[[], Iterator[Batch]], **schedule: Any) -> StepResult:
    for chunk in built.chunks:
        chunk.zero_grad_buffer()
    built.optimizer.zero_grad()
    values = run_schedule(built, make_iter, forward_only=False, **schedule)
    ok, grad_norm, _ = built.optimizer.step()
    built.scheduler.step(increment=1)
    lr = built.optimizer.param_groups[0]["lr"]
    return StepResult(loss=values["loss"], grad_norm=float(grad_norm or 0.0), lr=float(lr), skipped=not ok,
                      values=values)  # fmt: skip


@torch.no_grad()
def evaluate(built: Any, make_iter: Callable[[], Iterator[Batch]], **schedule: Any) -> dict[str, float]:
    for chunk in built.chunks:
        chunk.eval()
    try:
        return run_schedule(built, make_iter, forward_only=True, **schedule)
    finally:
        for chunk in built.chunks:
            chunk.train()


def summarise(values: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Metrics from reduced values: token-weighted loss for language modelling; accuracy, mean margin
    and mean scores for pairs."""
    if "pairs" in values:
        n = max(values["pairs"], 1e-12)
        return {f"{prefix}loss": values["loss_sum"] / n, f"{prefix}accuracy": values["correct_sum"] / n,
                f"{prefix}margin": values["margin_sum"] / n, f"{prefix}chosen_reward": values["chosen_sum"] / n,
                f"{prefix}rejected_reward": values["rejected_sum"] / n}  # fmt: skip
    return {f"{prefix}loss": values["nll_sum"] / max(values["tokens"], 1e-12)}
