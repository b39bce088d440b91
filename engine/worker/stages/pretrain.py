"""Stage 2: pretraining — next-token prediction on the data stage's text, on Megatron-Core.

Batches come from Megatron's GPTDatasets over the data stage's indexed datasets, blended with the
recipe's mixture weights (engine.worker.data); the loop, resume, validation and checkpoints are the
shared ones of engine.worker.train.
"""

from __future__ import annotations

from functools import partial

from megatron.core import parallel_state as ps

from ..data import build_datasets, dataset_dir, microbatches, read_manifest
from ..loop import LM_KEYS, lm_forward_step
from ..main import Context
from ..mcore import build_job
from ..train import Task, train


def run(ctx: Context) -> None:
    plan, job = ctx.plan, ctx.job
    lay, est = job.layout, job.estimate
    assert lay is not None and est is not None
    t = job.config["training"]
    gbs, mbs, seq = int(t["global_batch_size"]), int(t["micro_batch_size"]), plan.model.seq_length
    nmb = gbs // (mbs * lay.dp)

    built = build_job(job, plan.model, device=ctx.device, steps=est.steps)
    tokenizer = read_manifest(dataset_dir(plan, job))["tokenizer"]
    train_ds, valid_ds, _ = build_datasets(
        plan, job, train_samples=est.steps * gbs, valid_samples=t["eval_iters"] * gbs, seed=t["seed"],
        cache=ctx.stage_dir / "cache",
    )  # fmt: skip
    batches = partial(microbatches, mbs=mbs, dp=lay.dp, dp_rank=ps.get_data_parallel_rank())
    n_eval = t["eval_iters"] * nmb
    task = Task(
        forward_step=lm_forward_step(ctx.device),
        keys=LM_KEYS,
        train_batches=lambda consumed: (partial(batches, train_ds, start=consumed, num=nmb), seq, {}),
        valid_batches=lambda: [(partial(batches, valid_ds, start=0, num=n_eval), seq, n_eval)],
        tokenizer=tokenizer,
    )
    train(ctx, built, task)
