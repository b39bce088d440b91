"""The `ppo` kind: RLHF with PPO (or RLOO) against a reward model and reward functions (docs/stages/ppo.md)."""

from __future__ import annotations

from collections.abc import Iterator

from .. import __version__, plugin
from ..errors import Problem
from ..schema import PpoStage
from .base import LR, Chart, HeldOut, Reference, RuleContext, StageKind, Workload
from .checks import installed, plugin_params, plugin_table


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
    if stage.ppo.advantage == "rloo" and ro.responses_per_prompt < 2:
        yield Problem(
            f"{where}.rollout.responses_per_prompt",
            f"={ro.responses_per_prompt} with ppo.advantage=rloo: the leave-one-out baseline needs other responses to the same prompt",
            "sample at least 2 responses per prompt, or use ppo.advantage=gae",
        )
    if stage.ppo.advantage == "rloo" and stage.critic_from is not None:
        yield Problem(
            f"{where}.critic_from",
            f"={stage.critic_from!r} with ppo.advantage=rloo, which trains no critic",
            "remove critic_from, or use ppo.advantage=gae",
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
    passes. Up to four models are resident: actor and critic with optimizer states, the reference and
    the reward model as weights only; rollouts generate `rollout.batch_size` rows with a KV cache."""
    ro = stage.rollout
    critic = stage.ppo.advantage == "gae"
    trained = 2 if critic else 1
    return Workload(
        seq_length=min(seq_length, ro.max_prompt_tokens + ro.max_new_tokens),
        samples=ro.prompts_per_iteration * ro.responses_per_prompt,
        passes=trained * stage.ppo.epochs,
        forward_passes=4 + int(critic),
        trained_models=trained,
        frozen_models=1 + (1 if stage.reward_model else 0),
        kv_cache_rows=ro.batch_size,
    )


def run_problems(where: str, stage: PpoStage) -> Iterator[Problem]:
    pp = stage.parallelism.pp
    if pp > 1:
        yield Problem(
            f"{where}.parallelism.pp",
            f"={pp}: the PPO worker of engine {__version__} runs rollouts without pipeline parallelism, so the run cannot start",
            "use pp: 1 and split the model with tp (the plan itself is valid for later versions)",
        )


KIND = StageKind(
    name="ppo",
    model=PpoStage,
    produces="policy",
    worker="engine.worker.stages.ppo",
    references=(
        Reference("prompts", ("data",), records="prompt"),
        Reference("policy", ("sft", "pretrain", "ppo"), checkpoint_ok=True),
        Reference("reward_model", ("reward_model",)),
        Reference("critic_from", ("reward_model",)),
    ),
    rules=rules,
    workload=workload,
    run_problems=run_problems,
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
