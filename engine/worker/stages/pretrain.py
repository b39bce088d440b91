"""Stage 2: pretraining — next-token prediction on the data stage's text, on Megatron-Core.

The loop is Megatron's: each step runs `global_batch / (micro_batch · dp)` micro-batches through the
pipeline schedule, clips the global gradient norm, steps Adam and the warmup + cosine/linear decay
schedule. Validation loss runs every `eval_interval` steps and at the end; checkpoints every
`checkpointing.interval` steps and at the end.

Start-up order: the stage's own newest complete checkpoint (an interrupted or killed run resumes
exactly: model, optimizer, schedule, data position and RNG states); otherwise `init_from`'s newest
checkpoint, weights only, after checking the hand-off contract; otherwise a fresh model.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ... import __version__
from ...errors import EngineError
from .. import checkpoint
from ..data import build_datasets, dataset_dir, microbatches, read_manifest
from ..faults import maybe_kill
from ..loop import eval_loss, lm_forward_step, train_step
from ..main import Context
from ..mcore import build_job
from ..metrics import Metrics


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
    """A checkpoint handed to another stage must have the same architecture and tokenizer."""
    theirs, ours = meta.get("tokenizer", {}).get("sha256"), tokenizer.get("sha256")
    if theirs != ours:
        raise EngineError(f"checkpoint {parent} was trained with tokenizer {theirs}, this stage uses {ours}")
    diff = sorted(k for k in architecture if meta.get("architecture", {}).get(k) != architecture[k])
    if diff:
        pairs = ", ".join(f"{k}: {meta['architecture'].get(k)} vs {architecture[k]}" for k in diff)
        raise EngineError(f"checkpoint {parent} has another architecture ({pairs})")


def _start(ctx: Context, built: Any, root: Path, tokenizer: dict[str, Any]) -> tuple[int, int, list[str]]:
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
        return step, consumed, list(meta.get("parents", []))
    parent_stage = ctx.job.config.get("init_from")
    if parent_stage is None:
        return 0, 0, []
    parent_root = Path(ctx.plan.job(parent_stage).outputs[0].path)
    parent = checkpoint.latest_checkpoint(parent_root)
    if parent is None:
        raise EngineError(
            f"stage {ctx.job.name!r} starts from {parent_stage!r}, which has no checkpoint in {parent_root}"
        )
    meta = checkpoint.read_meta(parent)
    check_contract(parent, meta, architecture=ctx.plan.model.model_dump(mode="json"), tokenizer=tokenizer)
    checkpoint.load(parent, built, layout=layout, model_only=True)
    return 0, 0, [str(parent)]


def run(ctx: Context) -> None:
    from megatron.core import parallel_state as ps

    plan, job = ctx.plan, ctx.job
    lay, est = job.layout, job.estimate
    assert lay is not None and est is not None
    t, ck = job.config["training"], job.config["checkpointing"]
    steps, seq = est.steps, plan.model.seq_length
    gbs, mbs = int(t["global_batch_size"]), int(t["micro_batch_size"])
    nmb = gbs // (mbs * lay.dp)
    eval_every = t["eval_interval"] or steps
    save_every = ck["interval"] or steps

    built = build_job(job, plan.model, device=ctx.device, steps=steps)

    tokenizer = read_manifest(dataset_dir(plan, job))["tokenizer"]
    train_ds, valid_ds, _ = build_datasets(
        plan, job, train_samples=steps * gbs, valid_samples=t["eval_iters"] * gbs, seed=t["seed"],
        cache=ctx.stage_dir / "cache",
    )  # fmt: skip
    root = Path(job.outputs[0].path)
    step, consumed, parents = _start(ctx, built, root, tokenizer)
    meta = meta_for(ctx, tokenizer, parents)
    dp_rank = ps.get_data_parallel_rank()
    schedule = dict(forward_step=lm_forward_step(ctx.device), seq_length=seq, mbs=mbs)
    n_eval = t["eval_iters"] * nmb
    valid_batches = partial(microbatches, valid_ds, start=0, num=n_eval, mbs=mbs, dp=lay.dp, dp_rank=dp_rank)
    metrics = Metrics(ctx.stage_dir, name=job.name, total_steps=steps, start_step=step, enabled=ctx.is_logger)
    if ck["async_save"] and ctx.is_logger:
        print(f"[{job.name}] note: checkpointing.async_save is not implemented yet; saving synchronously", flush=True)
    loop_start = time.perf_counter()
    try:
        while step < steps:
            began = time.perf_counter()
            train_batches = partial(
                microbatches, train_ds, start=consumed, num=nmb, mbs=mbs, dp=lay.dp, dp_rank=dp_rank
            )
            result = train_step(built, train_batches, num_microbatches=nmb, **schedule)
            step, consumed = step + 1, consumed + gbs
            values: dict[str, float] = {
                "loss": result.loss, "grad_norm": result.grad_norm, "lr": result.lr,
                "tokens_per_s": gbs * seq / (time.perf_counter() - began), "consumed_samples": consumed,
            }  # fmt: skip
            if step % eval_every == 0 or step == steps:
                values["val_loss"] = eval_loss(built, valid_batches, num_microbatches=n_eval, **schedule)
            values["elapsed_s"] = time.perf_counter() - loop_start
            metrics.log(step, values)
            maybe_kill("after_step", step)
            if step % save_every == 0 or step == steps:
                checkpoint.save(root, built, step=step, consumed=consumed, meta=meta, keep_last=ck["keep_last"])
    finally:
        metrics.close()
