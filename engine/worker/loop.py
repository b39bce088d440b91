"""One training, evaluation or forward-only step through Megatron-Core's pipeline schedules.

`get_forward_backward_func` picks the schedule from the parallel state: no pipelining, 1F1B, or the
interleaved 1F1B when vpp > 1. Each virtual chunk gets its own iterator over the same micro-batches.

A forward step (an objective's: engine.worker.objectives) returns the model's output and a loss
function; the loss function returns the loss the gradient flows from and a dict of values to report.
Every reported value is averaged over the step's micro-batches and the data-parallel ranks (context-
parallel ranks included: each sees its own part of every sequence) and moved from the last pipeline
stage to every rank. The schedule divides the loss by the number of micro-batches in place, so
reported values are clones taken before that.

`forward_outputs` runs a forward-only schedule whose loss function returns per-row outputs instead
(log-probabilities per token, a scalar per position or per sequence); the last pipeline stage's
outputs are delivered to every rank of the pipeline (engine.worker.comm).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import comm
from .objectives import Batch, ForwardStep

MakeIter = Callable[[], Iterator[Batch]]


@dataclass(frozen=True)
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    skipped: bool
    values: dict[str, float]


def _reduce(outputs: list[dict[str, torch.Tensor]], keys: Sequence[str]) -> dict[str, float]:
    """Means of the reported values over micro-batches and data-parallel ranks, on every rank."""
    from megatron.core import parallel_state as ps

    total = torch.zeros(len(keys) + 1, dtype=torch.float64)
    for item in outputs:
        for i, key in enumerate(keys):
            total[i] += item[key].double().cpu()
        total[-1] += 1
    total = comm.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        total = comm.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    count = total[-1].clamp(min=1)
    return {key: float(total[i] / count) for i, key in enumerate(keys)}


def _schedule(chunks: list[Any], make_iter: MakeIter, **kwargs: Any) -> Any:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iterators: Any = [make_iter() for _ in chunks] if len(chunks) > 1 else make_iter()
    return get_forward_backward_func()(
        data_iterator=iterators, model=chunks if len(chunks) > 1 else chunks[0], **kwargs
    )


def run_schedule(
    built: Any, make_iter: MakeIter, *, forward_step: ForwardStep, num_microbatches: int, seq_length: int, mbs: int,
    forward_only: bool, keys: Sequence[str],
) -> dict[str, float]:  # fmt: skip
    """`mbs` is the number of rows the schedule sees per micro-batch (2 per pair for the reward model)."""
    return _reduce(_pass(built, make_iter, forward_step=forward_step, num_microbatches=num_microbatches,
                         seq_length=seq_length, mbs=mbs, forward_only=forward_only), keys)  # fmt: skip


def _pass(
    built: Any, make_iter: MakeIter, *, forward_step: ForwardStep, num_microbatches: int, seq_length: int, mbs: int,
    forward_only: bool,
) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """The schedule's pass: the values each micro-batch's loss function reported (on the last pipeline stage)."""
    outputs = _schedule(built.chunks, make_iter, forward_step_func=forward_step, num_microbatches=num_microbatches,
                        seq_length=seq_length, micro_batch_size=mbs, forward_only=forward_only)  # fmt: skip
    return outputs or []


@torch.no_grad()
def forward_outputs(
    chunks: list[Any], make_iter: MakeIter, *, forward_step: ForwardStep, num_microbatches: int, seq_length: int,
    mbs: int,
) -> list[torch.Tensor]:  # fmt: skip
    """One output tensor per micro-batch, on every rank: what `forward_step`'s loss function returns when the
    schedule calls it with `non_loss_data=True` on the last pipeline stage."""
    from megatron.core import parallel_state as ps

    outputs = _schedule(chunks, make_iter, forward_step_func=forward_step, num_microbatches=num_microbatches,
                        seq_length=seq_length, micro_batch_size=mbs, forward_only=True,
                        collect_non_loss_data=True)  # fmt: skip
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    return comm.deliver_from_last_stage(list(outputs) if last else None)


STEP_TIMES_ENV = "ENGINE_STEP_TIMES"


class _StepTimes:
    """`ENGINE_STEP_TIMES=<path>`: every rank appends one JSON line per training step to `<path>.<rank>`: the
    seconds of the forward and backward passes, of the gradient reduction (the schedule's finalize_model_grads,
    waits for slower ranks included), of the reported values' reduction and of the optimizer step. A debugging
    aid (bench/chat_dp_speed.py --breakdown reads it); unset, it costs one environment look-up per step."""

    def __init__(self, built: Any, path: str) -> None:
        self.path, self.grads = f"{path}.{comm.rank()}", 0.0
        inner = built.config.finalize_model_grads_func

        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.grads += time.perf_counter() - began

        built.config.finalize_model_grads_func = timed

    @staticmethod
    def of(built: Any) -> _StepTimes | None:
        """The timer of a model being trained (built once per model: a job lives as long as its models)."""
        path = os.environ.get(STEP_TIMES_ENV)
        if not path:
            return None
        if id(built) not in _TIMERS:
            _TIMERS[id(built)] = _StepTimes(built, path)
        return _TIMERS[id(built)]

    def write(self, schedule: float, reduce: float, optimizer: float) -> None:
        row = {"forward_backward_s": schedule - self.grads, "grad_sync_s": self.grads, "reduce_s": reduce,
               "optimizer_s": optimizer}  # fmt: skip
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        self.grads = 0.0


_TIMERS: dict[int, _StepTimes] = {}


def train_step(built: Any, make_iter: MakeIter, **schedule: Any) -> StepResult:
    for chunk in built.chunks:
        chunk.zero_grad_buffer()
    built.optimizer.zero_grad()
    times = _StepTimes.of(built)
    keys = schedule.pop("keys")
    began = time.perf_counter()
    outputs = _pass(built, make_iter, forward_only=False, **schedule)
    passed = time.perf_counter()
    values = _reduce(outputs, keys)
    reduced = time.perf_counter()
    ok, grad_norm, _ = built.optimizer.step()
    if times is not None:
        times.write(passed - began, reduced - passed, time.perf_counter() - reduced)
    built.scheduler.step(increment=1)
    lr = built.optimizer.param_groups[0]["lr"]
    return StepResult(loss=values["loss"], grad_norm=float(grad_norm or 0.0), lr=float(lr), skipped=not ok,
                      values=values)  # fmt: skip


@torch.no_grad()
def evaluate(built: Any, make_iter: MakeIter, **schedule: Any) -> dict[str, float]:
    for chunk in built.chunks:
        chunk.eval()
    try:
        return run_schedule(built, make_iter, forward_only=True, **schedule)
    finally:
        for chunk in built.chunks:
            chunk.train()
