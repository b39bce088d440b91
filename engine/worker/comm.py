"""Collectives on host values and host → device moves, in one place, for every backend.

Worker code reaches torch.distributed only through this module (and engine.worker.context, which starts
and ends the process group); a test holds every other worker module to that.

NCCL has no collectives for CPU tensors, and CUDA models reject CPU inputs; on the CPU (gloo)
everything is on the host, so a test there cannot see either mistake. Worker code therefore never calls
torch.distributed on its own values: it reduces, broadcasts and moves through these helpers, which put a
tensor on the device the group's backend needs and hand host values back.

`deliver_from_last_stage` is how outputs that only the last pipeline stage computes (per-token
log-probabilities, values, scores of a forward-only schedule) reach every rank of the pipeline.
Decoding outside Megatron's schedules (engine.worker.generate) passes hidden states between stages with
`send_to_next_stage` / `recv_from_previous_stage` and hands the sampled tokens to every stage with
`pipeline_broadcast`: these take tensors already on the job's device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

SMALL = 4096  # values: up to this many, a host all-reduce on gloo is an all-gather and a local sum
MAX_DIMS = 8  # the widest output `deliver_from_last_stage` carries: [micro-batches, *up to 7 dims]


def _device(group: Any) -> torch.device:
    """Where a collective over `group` needs its tensors: the current GPU for NCCL, else the host."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialized() -> bool:
    return bool(dist.is_initialized())


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return int(dist.get_rank()) if dist.is_initialized() else 0


def barrier() -> None:
    """Every rank waits for every other (a no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def max_(tensor: torch.Tensor, *, group: Any) -> torch.Tensor:
    """The elementwise maximum over `group`, in place, of a tensor already on the job's device (logits)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def send_to_next_stage(tensor: torch.Tensor) -> None:
    """Hidden states (on the job's device) to the next pipeline stage; after the last, the first (the
    next virtual chunk under interleaving)."""
    from megatron.core import parallel_state as ps

    dist.send(tensor.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())


def recv_from_previous_stage(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """What the previous pipeline stage sent with `send_to_next_stage`, on `device`."""
    from megatron.core import parallel_state as ps

    out = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(out, src=ps.get_pipeline_model_parallel_prev_rank())
    return out


def pipeline_broadcast(tensor: torch.Tensor) -> torch.Tensor:
    """The last pipeline stage's `tensor` (on the job's device; same shape and dtype on every stage) on every
    stage. Without pipeline parallelism the tensor itself."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return tensor
    group = ps.get_pipeline_model_parallel_group()
    x = tensor.to(_device(group))
    dist.broadcast(x, src=ps.get_pipeline_model_parallel_last_rank(), group=group)
    return x.to(tensor.device)


def to_device(batch: Mapping[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    """A micro-batch on the job's device (a no-op on the CPU)."""
    if device == "cpu":
        return dict(batch)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def all_reduce(values: torch.Tensor, *, group: Any = None, op: str = "sum") -> torch.Tensor:
    """The sum (or "max") of a tensor of host values over `group`, on the host, as float64.

    On gloo, a small tensor is all-gathered and summed here in rank order: gloo's all-reduce of a few
    values costs about five times its all-gather (1.2 ms against 0.24 ms between two processes on one
    host), and the training loop reduces its metrics every step."""
    x = values.detach().to(torch.float64).to(_device(group)).clone()
    size = dist.get_world_size(group)
    if x.device.type == "cpu" and x.numel() <= SMALL and size > 1:
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x, group=group)
        stacked = torch.stack(parts)
        return stacked.amax(0) if op == "max" else stacked.sum(0)
    dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return x.cpu()


def deliver_from_last_stage(outputs: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """The last pipeline stage's outputs (one same-shaped tensor per micro-batch) on every pipeline rank, on
    the host. Other stages pass None. Without pipeline parallelism the outputs come back as they are."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return [t.detach().cpu() for t in outputs or []]
    group = ps.get_pipeline_model_parallel_group()
    src = ps.get_pipeline_model_parallel_last_rank()
    device = _device(group)
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    header = torch.zeros(MAX_DIMS + 2, dtype=torch.int64, device=device)
    stacked = None
    if last:
        stacked = torch.stack([t.detach() for t in outputs or []]).to(device)
        if stacked.dim() > MAX_DIMS:
            raise ValueError(f"outputs of {stacked.dim()} dimensions; at most {MAX_DIMS} are delivered")
        header[0] = stacked.dim()
        header[1] = _DTYPES.index(stacked.dtype)
        header[2 : 2 + stacked.dim()] = torch.tensor(stacked.shape, dtype=torch.int64)
    dist.broadcast(header, src=src, group=group)
    dims, dtype = int(header[0]), _DTYPES[int(header[1])]
    shape = [int(v) for v in header[2 : 2 + dims]]
    if stacked is None:
        stacked = torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(stacked, src=src, group=group)
    return list(stacked.cpu().unbind(0))


_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.bool)
