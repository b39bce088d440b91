"""The `ppo` kind: RLHF with PPO (or RLOO) against a reward model and reward functions (docs/stages/ppo.md)."""

from __future__ import annotations

from collections.abc import Iterator

from .. import plugin
from ..errors import Problem
from ..schema import PpoStage
from .base import LR, Chart, HeldOut, Reference, RuleContext, StageKind, Workload
from .checks import installed, packing_rules, plugin_params, plugin_table


def rules(where: str, stage: PpoStage, ctx: RuleContext) -> Iterator[Problem]:
    if stage.training.tokens is not None:
        yield Problem(f"{where}.training.tokens", "PPO counts iterations, not tokens", "set training.steps instead")
    par = stage.parallelism
    if par.cp > 1:
        yield Problem(
            f"{where}.parallelism.cp",
            f"={par.cp}: the PPO stage does not split rollouts across context-parallel ranks",
            "set cp: 1 (rollouts are short; split the model with tp or pp instead)",
        )
    if par.sequence_parallel:
        yield Problem(
            f"{where}.parallelism.sequence_parallel",
            "=true: rollouts decode one token per step, which sequence parallelism cannot split over tp ranks "
            "(Megatron-Core runs inference without it)",
            "set sequence_parallel: false for the PPO stage",
        )
    present = {"reference": stage.ppo.uses_reference, "reward_model": stage.reward_model is not None,
               "critic": not stage.ppo.group_advantage}  # fmt: skip
    why = {"reference": "ppo.kl_coef is 0, so no reference is built", "reward_model": "reward_model is not set",
           "critic": f"ppo.advantage={stage.ppo.advantage} trains no critic"}  # fmt: skip
    for i, role in enumerate(stage.offload):
        if role in stage.offload[:i]:
            yield Problem(f"{where}.offload[{i}]", f"{role!r} is listed twice", "list each role once")
        elif not present[role]:
            yield Problem(f"{where}.offload[{i}]", f"={role!r}: {why[role]}", f"remove {role!r} from offload")
    yield from packing_rules(where, stage, ctx)
    if stage.reward_model is None and not stage.rewards:
        yield Problem(
            f"{where}.rewards",
            "no reward source: neither reward_model nor rewards is set",
            "name a reward_model stage or add a reward plugin",
        )
    funcs = plugin_table(f"{where}.rewards", plugin.rewards)
    if isinstance(funcs, Problem):
        yield funcs
        funcs = {}
    for i, r in enumerate(stage.rewards):
        found = yield from installed(f"{where}.rewards[{i}].plugin", r.plugin, funcs, "reward function")
        if found is None:
            continue
        yield from plugin_params(f"{where}.rewards[{i}].params", found.params, r.params)
    ro, seq = stage.rollout, ctx.seq_length
    if seq is not None and ro.max_prompt_tokens + ro.max_new_tokens > seq:
        yield Problem(
            f"{where}.rollout",
            f"max_prompt_tokens + max_new_tokens = {ro.max_prompt_tokens}+{ro.max_new_tokens} exceeds model.seq_length={seq}",
            "shorten them",
        )
    hp = stage.ppo
    if hp.group_advantage and ro.responses_per_prompt < 2:
        yield Problem(
            f"{where}.rollout.responses_per_prompt",
            f"={ro.responses_per_prompt} with ppo.advantage={hp.advantage}: its baseline is the other responses to the same prompt",
            "sample at least 2 responses per prompt, or use ppo.advantage=gae",
        )
    if hp.group_advantage and stage.critic_from is not None:
        yield Problem(
            f"{where}.critic_from",
            f"={stage.critic_from!r} with ppo.advantage={hp.advantage}, which trains no critic",
            "remove critic_from, or use ppo.advantage=gae",
        )
    if hp.dynamic_sampling and not hp.group_advantage:
        yield Problem(
            f"{where}.ppo.dynamic_sampling",
            "=true with ppo.advantage=gae: it drops the prompts whose group of responses scores alike",
            "use ppo.advantage rloo, grpo or dr_grpo, or turn dynamic_sampling off",
        )
    if hp.overlong_buffer is not None and hp.overlong_buffer > ro.max_new_tokens:
        yield Problem(
            f"{where}.ppo.overlong_buffer",
            f"={hp.overlong_buffer} exceeds rollout.max_new_tokens={ro.max_new_tokens}",
            f"use at most {ro.max_new_tokens}",
        )
    if not hp.uses_reference and stage.reference is not None:
        yield Problem(
            f"{where}.reference",
            f"={stage.reference!r} with ppo.kl_coef=0, which builds no reference model",
            "remove reference, or set ppo.kl_coef > 0",
        )
    if hp.kl_coef == 0 and hp.kl_target is not None:
        yield Problem(
            f"{where}.ppo.kl_target",
            f"={hp.kl_target} with kl_coef=0: the adaptive controller scales the coefficient, which stays 0",
            "set kl_coef > 0, or remove kl_target",
        )
    if hp.kl_penalty == "loss" and hp.kl_coef > 0 and hp.kl_estimator == "k1":
        yield Problem(
            f"{where}.ppo.kl_estimator",
            "=k1 with kl_penalty=loss: k1's gradient in the loss does not push towards the reference",
            "use kl_estimator: k3 (GRPO's), or kl_penalty: reward",
        )
    samples = ro.prompts_per_iteration * ro.responses_per_prompt
    if samples % stage.training.global_batch_size:
        yield Problem(
            f"{where}.training.global_batch_size",
            f"={stage.training.global_batch_size} does not divide the {samples} rollouts per iteration (prompts_per_iteration×responses_per_prompt)",
            "make the minibatch divide the rollouts",
        )


def workload(stage: PpoStage, seq_length: int) -> Workload:
    """Per iteration: the actor (and, with GAE, the critic) train `epochs` times over the rollouts;
    sampling, the reference, the reward model and the old log-probabilities (and values) are forward
    passes. Up to four models: actor and critic with optimizer states, the reference (none when kl_coef is 0)
    and the reward model as weights only, those in `offload` on the device only in the phases that use them;
    rollouts generate `rollout.batch_size` rows with a KV cache and are scored `rollout.score_batch_size` at a
    time."""
    ro = stage.rollout
    critic = not stage.ppo.group_advantage
    trained = 2 if critic else 1
    return Workload(
        seq_length=min(seq_length, ro.max_prompt_tokens + ro.max_new_tokens),
        samples=ro.prompts_per_iteration * ro.responses_per_prompt,
        passes=trained * stage.ppo.epochs,
        forward_passes=3 + int(stage.ppo.uses_reference) + int(critic),
        trained_models=trained,
        frozen_models=int(stage.ppo.uses_reference) + (1 if stage.reward_model else 0),
        kv_cache_rows=ro.batch_size,
        scoring_rows=ro.score_batch_size or ro.batch_size,
        offloaded_trained_models=int("critic" in stage.offload),
        offloaded_frozen_models=sum(role in stage.offload for role in ("reference", "reward_model")),
    )


KIND = StageKind(
    name="ppo",
    model=PpoStage,
    produces="policy",
    worker="engine.worker.stages.ppo",
    references=(
        Reference("prompts", ("data",), records="prompt"),
        Reference("policy", ("sft", "pretrain", "ppo"), checkpoint_ok=True),
        Reference("reference", ("sft", "pretrain", "dpo", "ppo"), checkpoint_ok=True),
        Reference("reward_model", ("reward_model",)),
        Reference("critic_from", ("reward_model",)),
    ),
    rules=rules,
    workload=workload,
    held_out=(
        HeldOut("val_reward", "val reward (greedy)", summary="reward"),
        HeldOut("val_accuracy", "val accuracy (greedy)", summary="accuracy"),
        HeldOut("val_sampled_reward", "val reward (sampled)", summary="sampled reward"),
        HeldOut("val_sampled_accuracy", "val accuracy (sampled)", summary="sampled accuracy"),
    ),
    charts=(
        Chart("reward", "reward", ("reward", "val_reward", "val_sampled_reward")),
        Chart("KL to the reference", "KL", ("kl",)),
        Chart("held-out accuracy", "accuracy", ("val_accuracy", "val_sampled_accuracy")),
        Chart("KL coefficient", "β", ("kl_coef",)),
        Chart("losses", "loss", ("policy_loss", "value_loss")),
        LR,
    ),
)
