"""Stage 4a: the reward model — a scalar head on the GPT backbone, trained on ranked pairs.

The backbone comes from an SFT (or pretrain) checkpoint after checking the hand-off contract; the
head (hidden → 1, tensor-parallel, on the last pipeline stage: engine.worker.mcore.scalar_model_class)
starts fresh. Each pair is scored at the last real token of prompt + chosen and of prompt + rejected,
and the objective is Bradley–Terry, −log σ(r_chosen − r_rejected − margin) (engine.worker.objectives).
Training and validation log the loss, the accuracy (how often r_chosen > r_rejected) and the mean
margin; validation is logged at step 0 too. Every checkpoint's meta.json says `"model": "reward_model"`
with its head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron.core import parallel_state as ps

from ...artifacts import read_manifest
from ...chat import template_for
from ...corpus.tokenizer import load as load_tokenizer
from ...errors import EngineError
from ...schema import DpoStage, RewardModelStage
from ..batches import ChatBatches, PairRows
from ..context import Context
from ..mcore import SCALAR_HEAD, build_job
from ..objectives import PairwisePreference
from ..train import Task, train

META = {"model": "reward_model", "head": {"name": SCALAR_HEAD, "outputs": 1, "read_at": "last_token"}}


def pair_batches(ctx: Context, spec: RewardModelStage | DpoStage, *, reads: str) -> tuple[dict[str, Any], ChatBatches]:
    """The data stage's tokenizer and the stage's ranked-pair batches, announced; `reads` says what the stage
    reads of each sequence, which is why context parallelism (splitting sequences across ranks) is refused."""
    plan, job = ctx.plan, ctx.job
    assert job.layout is not None
    if job.layout.cp > 1:
        raise EngineError(
            f"stages.{job.name}.parallelism.cp={job.layout.cp}: {reads}, which context parallelism splits across "
            "ranks; use cp: 1 for this stage"
        )
    tokenizer = read_manifest(plan.dataset(spec.data))["tokenizer"]
    template = template_for(tokenizer, load_tokenizer(Path(tokenizer["path"])))
    data = ChatBatches(plan, job, data=spec.data, training=spec.training, batching=spec.batching,
                       shape=PairRows(pad=int(tokenizer["pad"]), stop=tuple(template.stop)))  # fmt: skip
    if ctx.is_logger:
        print(f"[{job.name}] {data.describe()}", flush=True)
    return tokenizer, data


def run(ctx: Context, spec: RewardModelStage) -> None:
    plan, job = ctx.plan, ctx.job
    assert job.estimate is not None
    tokenizer, data = pair_batches(ctx, spec, reads="the reward model reads each sequence's last token")
    objective = PairwisePreference(ctx.device, margin=spec.margin, fresh=(SCALAR_HEAD + ".",), meta=META)
    built = build_job(job, plan.model, training=spec.training, device=ctx.device, steps=job.estimate.steps,
                      head=objective.head)  # fmt: skip
    dp_rank = ps.get_data_parallel_rank()

    task = Task(
        objective=objective,
        train_batches=data.step_batches(dp_rank),
        valid_batches=lambda: data.valid_batches(dp_rank),
        tokenizer=tokenizer,
        init_from=spec.init_from,
    )
    train(ctx, built, task, training=spec.training, checkpointing=spec.checkpointing)
