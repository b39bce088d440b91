"""The training loop every training stage shares: pretraining, SFT and the reward model.

A stage describes itself as a `Task` (its objective, its batches, its validation set, its tokenizer)
and `train` does the rest, identically for all of them: Megatron's schedules, gradient clipping,
Adam and the warmup + decay schedule; validation every `eval_interval` steps and at the end;
atomic checkpoints every `checkpointing.interval` steps and at the end; metrics to metrics.jsonl,
TensorBoard and the console.

Start-up order: the stage's own newest complete checkpoint (an interrupted or killed run resumes
exactly: model, optimizer, schedule, data position and RNG states); otherwise `init_from`'s newest
checkpoint (or the checkpoint directory it names: an imported model), weights only, after checking
the hand-off contract (architecture, tokenizer hash and special tokens), and then a validation pass
logged as step 0, the starting point the stage is measured against; otherwise a fresh model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from .. import __version__
from ..errors import EngineError
from ..schema.stages import is_checkpoint_path
from . import checkpoint, preempt
from .faults import maybe_kill
from .loop import Batch, ForwardStep, evaluate, summarise, train_step
from .main import Context
from .metrics import Metrics

MakeIter = Callable[[], Iterator[Batch]]
SPECIAL_FIELDS = ("pad", "bos", "eod", "end", "roles")


@dataclass
class Task:
    """What a training stage brings to the shared loop."""

    forward_step: ForwardStep
    keys: Sequence[str]  # the values its loss function reports
    # consumed samples → (micro-batch factory for this rank, sequence length, extra values to log)
    train_batches: Callable[[int], tuple[MakeIter, int, dict[str, float]]]
    # the validation set in schedule calls: (micro-batch factory, sequence length, micro-batches) each
    valid_batches: Callable[[], list[tuple[MakeIter, int, int]]]
    tokenizer: dict[str, Any]
    rows_per_sample: int = 1  # rows the schedule sees per sample: 2 for preference pairs
    fresh: tuple[str, ...] = ()  # parameter prefixes a parent checkpoint cannot provide
    meta: dict[str, Any] = field(default_factory=dict)  # extra fields for every checkpoint's meta.json


def meta_for(ctx: Context, tokenizer: dict[str, Any], parents: list[str]) -> dict[str, Any]:
    job, plan = ctx.job, ctx.plan
    assert job.layout is not None
    return {
        "format": 1,
        "engine_version": __version__,
        "stage": job.name,
        "kind": job.kind,
        "recipe": plan.recipe,
        "recipe_hash": plan.recipe_hash,
        "cache_key": job.cache_key,
        "architecture": plan.model.model_dump(mode="json"),
        "tokenizer": tokenizer,
        "layout": job.layout.model_dump(mode="json"),
        "parents": parents,
    }


def check_contract(
    parent: Path, meta: dict[str, Any], *, architecture: dict[str, Any], tokenizer: dict[str, Any]
) -> None:
    """A checkpoint handed to another stage must have the same architecture, tokenizer and special tokens."""
    theirs_tok = meta.get("tokenizer", {})
    theirs, ours = theirs_tok.get("sha256"), tokenizer.get("sha256")
    if theirs != ours:
        raise EngineError(
            f"checkpoint {parent} was trained with tokenizer {theirs}, this stage uses {ours}; "
            "start from a checkpoint trained on this recipe's data stage, or rerun its pretraining"
        )
    special = [k for k in SPECIAL_FIELDS if k in tokenizer and theirs_tok.get(k) != tokenizer[k]]
    if special:
        pairs = ", ".join(f"{k}: {theirs_tok.get(k)} vs {tokenizer[k]}" for k in special)
        raise EngineError(f"checkpoint {parent} has other special token ids ({pairs})")
    diff = sorted(k for k in architecture if meta.get("architecture", {}).get(k) != architecture[k])
    if diff:
        pairs = ", ".join(f"{k}: {meta['architecture'].get(k)} vs {architecture[k]}" for k in diff)
        raise EngineError(f"checkpoint {parent} has another architecture ({pairs})")


def parent_checkpoint(ctx: Context, stage: str) -> Path:
    """The newest checkpoint of an earlier stage, or the checkpoint directory that `stage` names."""
    if is_checkpoint_path(stage):
        if not (Path(stage) / checkpoint.META).is_file():
            raise EngineError(f"stage {ctx.job.name!r} starts from {stage!r}, which is not a checkpoint (no meta.json)")
        return Path(stage)
    root = Path(ctx.plan.job(stage).outputs[0].path)
    parent = checkpoint.latest_checkpoint(root)
    if parent is None:
        raise EngineError(f"stage {ctx.job.name!r} starts from {stage!r}, which has no checkpoint in {root}")
    return parent


def checked_parent(ctx: Context, stage: str, tokenizer: dict[str, Any]) -> Path:
    """The newest checkpoint of `stage`, after checking that it fits this job (check_contract)."""
    parent = parent_checkpoint(ctx, stage)
    architecture = ctx.plan.model.model_dump(mode="json")
    check_contract(parent, checkpoint.read_meta(parent), architecture=architecture, tokenizer=tokenizer)
    return parent


def start(ctx: Context, built: Any, root: Path, task: Task) -> tuple[int, int, list[str]]:
    """(step, consumed samples, parents) after resuming or initialising from a parent stage."""
    assert ctx.job.layout is not None
    if ctx.info.rank == 0:
        checkpoint.remove_partial(root)
    dist.barrier()
    layout = ctx.job.layout.model_dump()
    own = checkpoint.latest_checkpoint(root)
    if own is not None:
        meta = checkpoint.read_meta(own)
        step, consumed = checkpoint.load(own, built, layout=layout, model_only=False)
        if ctx.is_logger:
            print(f"[{ctx.job.name}] resuming from step {step} ({own})", flush=True)
        return step, consumed, list(meta.get("parents", []))
    parent_stage = ctx.job.config.get("init_from")
    if parent_stage is None:
        return 0, 0, []
    parent = checked_parent(ctx, parent_stage, task.tokenizer)
    # A parent that has the task's head (a reward model continuing from a reward model) keeps it.
    fresh = task.fresh if "head" not in checkpoint.read_meta(parent) else ()
    checkpoint.load(parent, built, layout=layout, model_only=True, fresh=fresh)
    return 0, 0, [str(parent)]


def validate(built: Any, task: Task, schedule: dict[str, Any]) -> dict[str, float]:
    """Validation metrics (`val_` prefixed) over the task's held-out batches."""
    batches = task.valid_batches()
    if not batches:
        return {}
    totals: dict[str, float] = {}
    for make, seq, num in batches:
        values = evaluate(built, make, num_microbatches=num, seq_length=seq, **schedule)
        for k, v in values.items():
            totals[k] = totals.get(k, 0.0) + v / len(batches)
    return summarise(totals, "val_")


def train(ctx: Context, built: Any, task: Task) -> None:
    job = ctx.job
    lay, est = job.layout, job.estimate
    assert lay is not None and est is not None
    t, ck = job.config["training"], job.config["checkpointing"]
    steps = est.steps
    gbs, mbs = int(t["global_batch_size"]), int(t["micro_batch_size"])
    nmb = gbs // (mbs * lay.dp)
    eval_every = t["eval_interval"] or steps
    save_every = ck["interval"] or steps
    schedule: dict[str, Any] = dict(forward_step=task.forward_step, mbs=mbs * task.rows_per_sample, keys=task.keys)
    pairs = task.rows_per_sample == 2

    root = Path(job.outputs[0].path)
    step, consumed, parents = start(ctx, built, root, task)
    meta = {**meta_for(ctx, task.tokenizer, parents), **task.meta}
    metrics = Metrics(ctx.stage_dir, name=job.name, total_steps=steps, start_step=step, enabled=ctx.is_logger)
    if ck["async_save"] and ctx.is_logger:
        print(f"[{job.name}] note: checkpointing.async_save is not implemented yet; saving synchronously", flush=True)
    try:
        if step == 0 and parents:
            metrics.log(0, validate(built, task, schedule))
        loop_start = time.perf_counter()
        while step < steps:
            began = time.perf_counter()
            make, seq, extra = task.train_batches(consumed)
            result = train_step(built, make, num_microbatches=nmb, seq_length=seq, **schedule)
            step, consumed = step + 1, consumed + gbs
            values: dict[str, float] = {"loss": result.loss}
            if pairs:
                values |= {k: v for k, v in summarise(result.values).items() if k != "loss"}
            values |= {
                "grad_norm": result.grad_norm, "lr": result.lr,
                "tokens_per_s": gbs * task.rows_per_sample * seq / (time.perf_counter() - began),
                "consumed_samples": consumed, **extra,
            }  # fmt: skip
            if step % eval_every == 0 or step == steps:
                values |= validate(built, task, schedule)
            values["elapsed_s"] = time.perf_counter() - loop_start
            metrics.log(step, values)
            maybe_kill("after_step", step)
            stop = preempt.requested()
            if stop or step % save_every == 0 or step == steps:
                checkpoint.save(root, built, step=step, consumed=consumed, meta=meta, keep_last=ck["keep_last"])
            if stop and step < steps:
                preempt.requeue(step)
    finally:
        metrics.close()
