"""Stage 3: supervised fine-tuning on conversations, on Megatron-Core.

Starts from a pretrain (or earlier SFT) checkpoint after checking the hand-off contract. Sequences are
the chat template's renderings from the data stage (engine.chat, the one template the data stage,
SFT, PPO and chat share); the loss is next-token cross-entropy on assistant tokens only (their
contents and closing <|end|>), averaged per micro-batch over those tokens. Batching, padding and
the padding waste are engine.worker.chat_data's. The validation loss is token-weighted over the
held-out conversations' assistant tokens and is logged at step 0 too, for the parent checkpoint.
"""

from __future__ import annotations

from megatron.core import parallel_state as ps

from ..chat_data import ChatData
from ..data import dataset_dir, read_manifest
from ..loop import LM_KEYS, lm_forward_step
from ..main import Context
from ..mcore import build_job
from ..train import Task, train


def run(ctx: Context) -> None:
    plan, job = ctx.plan, ctx.job
    assert job.estimate is not None
    tokenizer = read_manifest(dataset_dir(plan, job))["tokenizer"]
    data = ChatData(plan, job, pairs=False, pad=int(tokenizer["pad"]))
    if ctx.is_logger:
        print(f"[{job.name}] {data.describe()}", flush=True)
    built = build_job(job, plan.model, device=ctx.device, steps=job.estimate.steps)
    dp_rank = ps.get_data_parallel_rank()

    task = Task(
        forward_step=lm_forward_step(ctx.device),
        keys=LM_KEYS,
        train_batches=data.step_batches(dp_rank),
        valid_batches=lambda: data.valid_batches(dp_rank),
        tokenizer=tokenizer,
    )
    train(ctx, built, task)
