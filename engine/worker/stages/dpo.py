"""Stage 4c: offline preference optimisation of the policy on ranked pairs — DPO and its family.

The policy starts from `init_from` (an SFT checkpoint, usually) after checking the hand-off contract; a
frozen reference (the `reference` stage or checkpoint, by default the same checkpoint as `init_from`) is
built for the job's layout and run ahead of every training and validation pass through the same
pipeline schedule, forward only (engine.worker.train: the objective's frozen models), so TP, PP, VPP and
DP work as for the other training stages. Rows are the reward model's: prompt + chosen, then prompt +
rejected, with the response tokens masked in (engine.worker.batches.PairRows). The losses — sigmoid
(DPO, with cDPO's label smoothing), ipo, hinge, and the reference-free simpo, plus RPO's NLL term — are
engine.worker.objectives.preference_loss. Logged: loss, implicit-reward accuracy and margin, chosen and
rejected log-probabilities, the chosen response's NLL, and the held-out versions (at step 0 too). Every
checkpoint is a policy (`"model": "policy"`): chat, export, PPO and later rounds take it as any other.
"""

from __future__ import annotations

from megatron.core import parallel_state as ps

from ...schema import DpoStage
from ..context import Context
from ..handoff import checked_policy
from ..mcore import build_job
from ..objectives import DirectPreference, FrozenModel, ReferenceLogps
from ..train import Task, train
from .reward_model import pair_batches

META = {"model": "policy"}


def run(ctx: Context, spec: DpoStage) -> None:
    plan, job = ctx.plan, ctx.job
    assert job.estimate is not None
    tokenizer, data = pair_batches(ctx, spec, reads="DPO sums each response's log-probabilities")
    frozen: tuple[FrozenModel, ...] = ()
    if spec.loss != "simpo":
        reference = checked_policy(ctx, spec.reference or spec.init_from, tokenizer, field="reference")
        frozen = (FrozenModel("reference", head="lm", checkpoint=reference,
                              forward_step=ReferenceLogps(ctx.device).forward_step),)  # fmt: skip
        if ctx.is_logger:
            print(f"[{job.name}] reference: {reference}", flush=True)
    objective = DirectPreference(ctx.device, loss=spec.loss, beta=spec.beta, label_smoothing=spec.label_smoothing,
                                 gamma=spec.simpo_gamma, rpo_alpha=spec.rpo_alpha, meta=META, frozen=frozen)  # fmt: skip
    built = build_job(job, plan.model, training=spec.training, device=ctx.device, steps=job.estimate.steps)
    dp_rank = ps.get_data_parallel_rank()
    task = Task(
        objective=objective,
        train_batches=data.step_batches(dp_rank),
        valid_batches=lambda: data.valid_batches(dp_rank),
        tokenizer=tokenizer,
        init_from=spec.init_from,
    )
    train(ctx, built, task, training=spec.training, checkpointing=spec.checkpointing)
