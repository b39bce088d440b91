"""Stage 3: supervised fine-tuning on conversations, on Megatron-Core.

Starts from a pretrain (or earlier SFT) checkpoint after checking the hand-off contract. Sequences are
the chat template's renderings from the data stage (engine.chat, the one template the data stage,
SFT, PPO and chat share); the objective is language modelling (engine.worker.objectives) on assistant
tokens only (their contents and closing <|end|>), averaged per micro-batch over those tokens. Batching,
padding and the padding waste are engine.worker.batches'. The validation loss is token-weighted over
the held-out conversations' assistant tokens and is logged at step 0 too, for the parent checkpoint.
"""

from __future__ import annotations

from megatron.core import parallel_state as ps

from ...artifacts import read_manifest
from ...schema import SftStage
from ..batches import ChatBatches, SequenceRows
from ..context import Context
from ..mcore import build_job
from ..objectives import LanguageModel
from ..train import Task, train


def run(ctx: Context, spec: SftStage) -> None:
    plan, job = ctx.plan, ctx.job
    assert job.estimate is not None
    tokenizer = read_manifest(plan.dataset(spec.data))["tokenizer"]
    data = ChatBatches(plan, job, data=spec.data, training=spec.training, batching=spec.batching,
                       shape=SequenceRows(pad=int(tokenizer["pad"])))  # fmt: skip
    if ctx.is_logger:
        print(f"[{job.name}] {data.describe()}", flush=True)
    built = build_job(job, plan.model, training=spec.training, device=ctx.device, steps=job.estimate.steps)
    dp_rank = ps.get_data_parallel_rank()

    task = Task(
        objective=LanguageModel(ctx.device),
        train_batches=data.step_batches(dp_rank),
        valid_batches=lambda: data.valid_batches(dp_rank),
        tokenizer=tokenizer,
        init_from=spec.init_from,
    )
    train(ctx, built, task, training=spec.training, checkpointing=spec.checkpointing)
