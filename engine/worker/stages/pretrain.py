"""Stage 2: pretraining — next-token prediction on the data stage's text, on Megatron-Core.

Batches come from Megatron's GPTDatasets over the data stage's indexed datasets, blended with the
recipe's mixture weights (engine.worker.gpt_datasets); the objective is language modelling
(engine.worker.objectives), and the loop, resume, validation and checkpoints are the shared ones of
engine.worker.train.
"""

from __future__ import annotations

from functools import partial

from megatron.core import parallel_state as ps

from ...artifacts import read_manifest
from ...schema import DataStage, PretrainStage
from ..context import Context
from ..gpt_datasets import build_datasets, microbatches
from ..mcore import build_job
from ..objectives import LanguageModel
from ..train import Task, train


def run(ctx: Context, spec: PretrainStage) -> None:
    plan, job = ctx.plan, ctx.job
    lay, est = job.layout, job.estimate
    assert lay is not None and est is not None
    t = spec.training
    gbs, mbs, seq = t.global_batch_size, t.micro_batch_size, plan.model.seq_length
    nmb = gbs // (mbs * lay.dp)

    built = build_job(job, plan.model, training=t, device=ctx.device, steps=est.steps)
    root = plan.dataset(spec.data)
    tokenizer = read_manifest(root)["tokenizer"]
    data = ctx.spec_of(spec.data, DataStage)
    train_ds, valid_ds, _ = build_datasets(
        root, sources=data.sources, mixture=spec.mixture, stage=job.name, seq_length=seq,
        train_samples=est.steps * gbs, valid_samples=t.eval_iters * gbs, seed=t.seed, cache=ctx.stage_dir / "cache",
    )  # fmt: skip
    batches = partial(microbatches, mbs=mbs, dp=lay.dp, dp_rank=ps.get_data_parallel_rank())
    n_eval = t.eval_iters * nmb
    task = Task(
        objective=LanguageModel(ctx.device),
        train_batches=lambda consumed: (partial(batches, train_ds, start=consumed, num=nmb), seq, {}),
        valid_batches=lambda: [(partial(batches, valid_ds, start=0, num=n_eval), seq, n_eval)],
        tokenizer=tokenizer,
        init_from=spec.init_from,
    )
    train(ctx, built, task, training=t, checkpointing=spec.checkpointing)
