"""The training loop every training stage shares: pretraining, SFT and the reward model.

A stage describes itself as a `Task`: its objective (engine.worker.objectives: forward step, loss
reduction, metric keys, head, frozen auxiliary models), its batches, its validation set, its tokenizer
and the stage it starts from. `train` does the rest, identically for all of them: Megatron's schedules,
gradient clipping, Adam and the warmup + decay schedule; the objective's frozen models built, loaded and
run ahead of every pass; validation every `eval_interval` steps and at the end; atomic checkpoints
every `checkpointing.interval` steps and at the end; metrics to metrics.jsonl, TensorBoard and the
console.

Start-up order: the stage's own newest complete checkpoint (an interrupted or killed run resumes
exactly: model, optimizer, schedule, data position and RNG states); otherwise the task's `init_from`
stage's newest checkpoint (or the checkpoint directory it names: an imported model), weights only,
after checking the hand-off contract (engine.worker.handoff), and then a validation pass logged as
step 0, the starting point the stage is measured against; otherwise a fresh model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..schema import Checkpointing, Training
from . import checkpoint, comm, preempt
from .context import Context
from .faults import maybe_kill
from .handoff import checked_parent, meta_for
from .loop import MakeIter, evaluate, forward_outputs, train_step
from .mcore import build_frozen
from .metrics import Metrics
from .objectives import Batch, FrozenModel, Objective

Schedule = dict[str, Any]


@dataclass
class Task:
    """What a training stage brings to the shared loop."""

    objective: Objective
    # consumed samples → (micro-batch factory for this rank, sequence length, extra values to log); an extra
    # "real_tokens" (the step's tokens without padding) is logged as real_tokens_per_s, not as itself, and
    # "micro_batches" (a packed step's) replaces global_batch_size / (micro_batch_size · dp)
    train_batches: Callable[[int], tuple[MakeIter, int, dict[str, float]]]
    # the validation set in schedule calls: (micro-batch factory, sequence length, micro-batches) each
    valid_batches: Callable[[], list[tuple[MakeIter, int, int]]]
    tokenizer: dict[str, Any]
    init_from: str | None  # the stage (or checkpoint directory) a fresh run starts from; None: random init


@dataclass(frozen=True)
class Frozen:
    """A frozen auxiliary model as the loop holds it: its declaration and its model chunks."""

    model: FrozenModel
    chunks: list[Any]


def build_frozen_models(ctx: Context, objective: Objective, *, recompute: str) -> list[Frozen]:
    """The objective's frozen models, each built for this job's layout, loaded (weights only), and frozen."""
    assert ctx.job.layout is not None
    out = []
    for spec in objective.frozen:
        chunks = build_frozen(ctx.job, ctx.plan.model, device=ctx.device, head=spec.head, recompute=recompute)
        checkpoint.load_weights(spec.checkpoint, chunks, layout=ctx.job.layout.model_dump())
        out.append(Frozen(spec, chunks))
    return out


def with_frozen_outputs(frozen: list[Frozen], make: MakeIter, *, num_microbatches: int, seq_length: int,
                        mbs: int) -> MakeIter:  # fmt: skip
    """Micro-batches that also carry each frozen model's outputs (as batch[name]), computed for this pass."""
    if not frozen:
        return make
    outputs = {
        f.model.name: forward_outputs(f.chunks, make, forward_step=f.model.forward_step,
                                      num_microbatches=num_microbatches, seq_length=seq_length, mbs=mbs)
        for f in frozen
    }  # fmt: skip

    def carrying() -> Any:
        for m, batch in enumerate(make()):
            yield {**batch, **{name: out[m] for name, out in outputs.items()}}

    return carrying


def start(ctx: Context, built: Any, root: Path, task: Task) -> tuple[int, int, list[str]]:
    """(step, consumed samples, parents) after resuming or initialising from a parent stage."""
    assert ctx.job.layout is not None
    if ctx.info.rank == 0:
        checkpoint.remove_partial(root)
    comm.barrier()
    layout = ctx.job.layout.model_dump()
    own = checkpoint.latest_checkpoint(root)
    if own is not None:
        meta = checkpoint.read_meta(own)
        step, consumed = checkpoint.load(own, built, layout=layout, model_only=False)
        if ctx.is_logger:
            print(f"[{ctx.job.name}] resuming from step {step} ({own})", flush=True)
        return step, consumed, list(meta.get("parents", []))
    if task.init_from is None:
        return 0, 0, []
    parent = checked_parent(ctx, task.init_from, task.tokenizer)
    # A parent that has the objective's head (a reward model continuing from a reward model) keeps it.
    fresh = task.objective.fresh if "head" not in checkpoint.read_meta(parent) else ()
    checkpoint.load(parent, built, layout=layout, model_only=True, fresh=fresh)
    return 0, 0, [str(parent)]


def validate(built: Any, task: Task, frozen: list[Frozen], schedule: Schedule) -> dict[str, float]:
    """Validation metrics (`val_` prefixed) over the task's held-out batches."""
    batches = task.valid_batches()
    if not batches:
        return {}
    totals: dict[str, float] = {}
    for make, seq, num in batches:
        make = with_frozen_outputs(frozen, make, num_microbatches=num, seq_length=seq, mbs=schedule["mbs"])
        values = evaluate(built, make, num_microbatches=num, seq_length=seq, **schedule)
        for k, v in values.items():
            totals[k] = totals.get(k, 0.0) + v / len(batches)
    return task.objective.summarise(totals, "val_")


def train(ctx: Context, built: Any, task: Task, *, training: Training, checkpointing: Checkpointing) -> None:
    job, objective = ctx.job, task.objective
    lay, est = job.layout, job.estimate
    assert lay is not None and est is not None
    steps = est.steps
    gbs, mbs = training.global_batch_size, training.micro_batch_size
    nmb = gbs // (mbs * lay.dp)
    eval_every = training.eval_interval or steps
    save_every = checkpointing.interval or steps
    rows = mbs * objective.rows_per_sample
    schedule: Schedule = dict(forward_step=objective.forward_step, mbs=rows, keys=objective.keys)

    root = Path(job.outputs[0].path)
    step, consumed, parents = start(ctx, built, root, task)
    frozen = build_frozen_models(ctx, objective, recompute=training.recompute)
    meta = {**meta_for(ctx, task.tokenizer, parents), **objective.meta}
    metrics = Metrics(ctx.stage_dir, name=job.name, total_steps=steps, start_step=step, enabled=ctx.is_logger)
    background = checkpoint.Background() if checkpointing.async_save else None
    try:
        if step == 0 and parents:
            metrics.log(0, validate(built, task, frozen, schedule))
        loop_start = time.perf_counter()
        while step < steps:
            began = time.perf_counter()
            make, seq, extra = task.train_batches(consumed)
            # A step packed across its micro-batches runs as many as its packing needs (usually fewer than nmb).
            num = int(extra.get("micro_batches", nmb))
            make = with_frozen_outputs(frozen, make, num_microbatches=num, seq_length=seq, mbs=rows)
            result = train_step(built, make, num_microbatches=num, seq_length=seq, **schedule)
            step, consumed = step + 1, consumed + gbs
            seconds = time.perf_counter() - began
            # Positions the model runs over, padding included (packed rows: fewer and of their own length).
            computed = extra.pop("computed_tokens", gbs * objective.rows_per_sample * seq)
            real = extra.pop("real_tokens", computed)
            values: dict[str, float] = {"loss": result.loss}
            values |= {k: v for k, v in objective.summarise(result.values).items() if k != "loss"}
            values |= {
                "grad_norm": result.grad_norm, "lr": result.lr, "tokens_per_s": computed / seconds,
                "real_tokens_per_s": real / seconds, "consumed_samples": consumed, **extra,
            }  # fmt: skip
            if step % eval_every == 0 or step == steps:
                values |= validate(built, task, frozen, schedule)
            values["elapsed_s"] = time.perf_counter() - loop_start
            metrics.log(step, values)
            maybe_kill("after_step", step)
            if background is not None:
                background.poll()  # completes an earlier save whose writers have all finished
            stop = preempt.requested()
            if stop or step % save_every == 0 or step == steps:
                checkpoint.save(root, built, step=step, consumed=consumed, meta=meta, keep_last=checkpointing.keep_last,
                                background=background)  # fmt: skip
            if stop and step < steps:
                if background is not None:
                    background.wait()
                preempt.requeue(step)
        if background is not None:
            background.wait()
    except BaseException:
        if background is not None:
            background.abort()
        raise
    finally:
        metrics.close()


__all__ = ["Batch", "Frozen", "Task", "build_frozen_models", "train", "with_frozen_outputs"]
