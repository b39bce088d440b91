"""The stage kinds of the training process, a discriminated union on `kind`.

Stages refer to earlier stages by name (`init_from: sft`, `data: data`); the compiler checks that each
reference exists, comes earlier in the recipe and has the right kind. The `init_from` of a pretrain,
SFT or reward-model stage, and a PPO stage's `policy`, may instead be a path to a checkpoint directory (one with meta.json: the output of `engine
import`, or another run's `<stage>/checkpoints/step_N`). A value that contains "/" or starts with "."
is a path; stage names can contain neither.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from .base import TIME_LIMIT_PATTERN, Spec
from .data import CleaningSpec, DedupSpec, SourceSpec, SplitSpec
from .training import Checkpointing, Parallelism, Precision, Resources, Training


class DataStage(Spec):
    """Stage 1: read sources, clean, deduplicate, tokenize, write shards."""

    kind: Literal["data"] = Field(description="data collection")
    sources: list[SourceSpec] = Field(min_length=1, description="the sources to read")
    cleaning: CleaningSpec = Field(default_factory=CleaningSpec, description="document filters")
    dedup: DedupSpec = Field(default_factory=DedupSpec, description="deduplication and decontamination")
    splits: SplitSpec = Field(default_factory=SplitSpec, description="train/valid/test fractions")
    shard_samples: int = Field(default=10000, gt=0, le=10**9, description="samples per webdataset shard")
    workers: int = Field(
        default=1, gt=0, le=4096, description="processes that clean, sign and tokenise documents on a node"
    )
    shards: int = Field(
        default=1, gt=0, le=4096,
        description="tasks the input files are split over (each reads, cleans, signs and tokenises its share; "
        "dedup is then partitioned by hash over as many tasks); the outputs are the unsharded stage's",
    )
    strict: bool = Field(default=False, description="stop at the first unreadable record instead of counting it")
    time_limit: str | None = Field(
        default=None,
        pattern=TIME_LIMIT_PATTERN,
        description="wall-clock limit (Slurm format); default: the cluster profile's",
    )


Batching = Literal["bucketed", "padded", "packed"]


def is_checkpoint_path(value: str) -> bool:
    """Whether a reference is a path to a checkpoint directory rather than a stage name."""
    return "/" in value or value.startswith(".")


class TrainingStage(Spec):
    """Fields every training stage has: the base of the training kinds' models, not a stage kind itself."""

    parallelism: Parallelism = Field(default_factory=Parallelism, description="parallel layout")
    precision: Precision = Field(default_factory=Precision, description="numeric format")
    training: Training = Field(description="optimisation settings")
    checkpointing: Checkpointing = Field(default_factory=Checkpointing, description="checkpoint policy")
    resources: Resources = Field(default_factory=Resources, description="what the job asks for")


class PretrainStage(TrainingStage):
    """Stage 2: next-token prediction on the data stage's text sources."""

    kind: Literal["pretrain"] = Field(description="pretraining")
    data: str = Field(description="name of the data stage whose text sources are trained on")
    init_from: str | None = Field(
        default=None,
        description="continue from this pretrain stage's checkpoint, or from a checkpoint directory "
        "(a path: contains '/' or starts with '.'); none: random init",
    )
    mixture: dict[str, float] | None = Field(
        default=None, description="override the sources' mixture weights, by source name"
    )


class SftStage(TrainingStage):
    """Stage 3: supervised fine-tuning on conversations; loss on assistant tokens only."""

    kind: Literal["sft"] = Field(description="supervised fine-tuning")
    init_from: str = Field(
        description="pretrain or sft stage to start from, or a checkpoint directory (a path: contains '/' or starts with '.')"
    )
    data: str = Field(description="name of the data stage whose conversation sources are trained on")
    batching: Batching = Field(
        default="bucketed",
        description="bucketed: group similar lengths and pad each step to its longest; padded: pad to seq_length; "
        "packed: several conversations per row (first-fit decreasing), attention kept within each, a step's "
        "conversations in micro-batches of at most micro_batch_size rows of seq_length",
    )


class RewardModelStage(TrainingStage):
    """Stage 4a: a scalar head on the backbone, trained on ranked pairs (Bradley–Terry)."""

    kind: Literal["reward_model"] = Field(description="reward model")
    init_from: str = Field(
        description="sft, pretrain or reward_model stage whose backbone (and, from a reward model, head) the "
        "reward model starts from, or a checkpoint directory (a path: contains '/' or starts with '.')"
    )
    data: str = Field(description="name of the data stage whose preference sources are trained on")
    margin: float = Field(default=0.0, ge=0, description="margin in the loss −log σ(r_c − r_r − margin)")
    batching: Batching = Field(
        default="bucketed",
        description="bucketed: group similar lengths and pad each step to its longest; padded: pad to seq_length; "
        "packed: several sequences per row (first-fit decreasing, a pair's two among them), attention kept within each, "
        "a step's pairs in micro-batches of at most 2×micro_batch_size rows of seq_length",
    )


class DpoStage(TrainingStage):
    """Stage 4c: offline preference optimisation of the policy on ranked pairs (DPO and its family)."""

    kind: Literal["dpo"] = Field(description="direct preference optimisation")
    init_from: str = Field(
        description="sft, pretrain, dpo or ppo stage the policy starts from, or a checkpoint directory (a path: "
        "contains '/' or starts with '.')"
    )
    data: str = Field(description="name of the data stage whose preference sources are trained on")
    reference: str | None = Field(
        default=None,
        description="stage or checkpoint directory of the frozen reference policy; default: init_from's "
        "checkpoint (simpo has no reference)",
    )
    loss: Literal["sigmoid", "ipo", "hinge", "simpo"] = Field(
        default="sigmoid",
        description="sigmoid: DPO (Rafailov et al. 2023); ipo (Azar et al. 2023); hinge (SLiC-style); simpo: "
        "reference-free, length-normalised, with a target margin (Meng et al. 2024)",
    )
    beta: float = Field(default=0.1, gt=0, le=1000, description="β: the implicit reward's scale")
    label_smoothing: float = Field(
        default=0.0, ge=0, lt=0.5, description="cDPO: the assumed probability that a pair is mis-ranked (sigmoid)"
    )
    simpo_gamma: float = Field(default=0.5, ge=0, description="SimPO's target margin γ between the rewards")
    rpo_alpha: float | None = Field(
        default=None, gt=0, description="RPO: add α × the chosen response's mean NLL to the loss; none: off"
    )
    batching: Batching = Field(
        default="bucketed",
        description="bucketed: group similar lengths and pad each step to its longest; padded: pad to seq_length; "
        "packed: several sequences per row (first-fit decreasing, a pair's two among them), attention kept within each, "
        "a step's pairs in micro-batches of at most 2×micro_batch_size rows of seq_length",
    )


class RewardSpec(Spec):
    """A reward function from the `engine.rewards` entry points, weighted into the total reward."""

    plugin: str = Field(description="reward plugin name (`engine plugins` lists them)")
    weight: float = Field(default=1.0, description="weight of this reward in the sum")
    params: dict[str, Any] = Field(
        default_factory=dict, description="the plugin's parameters, validated by the plugin's own model"
    )
    timeout_s: float | None = Field(
        default=None, gt=0, le=86_400, description="most seconds one batched call may take; none: no limit"
    )
    on_timeout: Literal["stop", "zero"] = Field(
        default="stop",
        description="a call past timeout_s: stop the stage naming the plugin, or score that batch 0 and count it "
        "(logged as reward_timeouts_<plugin>)",
    )


class RolloutSpec(Spec):
    """How responses are sampled from the policy each iteration."""

    prompts_per_iteration: int = Field(default=64, gt=0, le=10**7, description="prompts sampled per PPO iteration")
    responses_per_prompt: int = Field(default=1, gt=0, le=1024, description="responses sampled per prompt")
    max_prompt_tokens: int = Field(default=32, gt=0, le=10**7, description="prompts longer than this are dropped")
    max_new_tokens: int = Field(default=32, gt=0, le=10**7, description="most tokens generated per response")
    temperature: float = Field(default=1.0, gt=0, description="sampling temperature")
    top_k: int = Field(default=0, ge=0, le=10**7, description="sample among the k most likely tokens; 0: off")
    top_p: float = Field(default=1.0, gt=0, le=1, description="nucleus sampling mass; 1: off")
    batch_size: int = Field(default=16, gt=0, le=10**6, description="sequences generated together per replica")
    score_batch_size: int | None = Field(
        default=None, gt=0, le=10**6,
        description="rollouts per forward pass when the rollouts are scored (old and reference log-probabilities, "
        "values, the reward model), per replica: fewer lower the scoring phase's memory; none: batch_size",
    )


class PpoSpec(Spec):
    """RL hyper-parameters: PPO (Schulman et al. 2017; Ouyang et al. 2022), RLOO, GRPO and DAPO's options."""

    kl_coef: float = Field(
        default=0.05, ge=0, description="initial coefficient of the per-token KL penalty; 0: no reference model"
    )
    kl_estimator: Literal["k1", "k3"] = Field(default="k1", description="KL estimator (Schulman's k1/k3)")
    kl_target: float | None = Field(
        default=None, gt=0, description="adaptive KL controller target (Ziegler et al. 2019); none: fixed"
    )
    kl_horizon: int = Field(default=10000, gt=0, le=10**12, description="adaptive KL controller horizon")
    gamma: float = Field(default=1.0, ge=0, le=1, description="GAE discount γ")
    lam: float = Field(default=0.95, ge=0, le=1, description="GAE λ")
    clip_eps: float = Field(default=0.2, gt=0, description="policy ratio clip ε")
    clip_low: float | None = Field(
        default=None, gt=0, lt=1, description="lower ratio clip: 1 − clip_low (DAPO's ε_low); none: clip_eps"
    )
    clip_high: float | None = Field(
        default=None, gt=0, description="upper ratio clip: 1 + clip_high (DAPO's ε_high, e.g. 0.28); none: clip_eps"
    )
    loss_aggregation: Literal["auto", "token_mean", "sequence_mean", "sequence_sum_token_norm"] = Field(
        default="auto",
        description="per-token losses → one: token_mean (over a minibatch's response tokens; DAPO), "
        "sequence_mean (each response weighs alike), sequence_sum_token_norm (sum / (responses × max_new_tokens); "
        "Dr. GRPO); auto: sequence_sum_token_norm for dr_grpo, token_mean otherwise",
    )
    kl_penalty: Literal["reward", "loss"] = Field(
        default="reward",
        description="where the KL to the reference goes: reward (−β·kl in the return; PPO, RLOO) or loss "
        "(β·kl per response token added to the policy loss, as GRPO does; use kl_estimator k3)",
    )
    dynamic_sampling: bool = Field(
        default=False,
        description="DAPO's dynamic sampling: drop the prompts whose responses all score the same and sample "
        "more prompts to refill the batch (needs a group advantage: rloo, grpo, dr_grpo)",
    )
    dynamic_sampling_rounds: int = Field(
        default=3, ge=1, le=100, description="most extra rollout rounds per iteration to refill the batch"
    )
    overlong_buffer: int | None = Field(
        default=None,
        gt=0,
        le=10**7,
        description="DAPO's overlong shaping: responses in the last this many tokens before max_new_tokens lose "
        "up to overlong_penalty, linearly; none: off",
    )
    overlong_penalty: float = Field(default=1.0, ge=0, description="the most overlong shaping takes off a score")
    value_clip: float | None = Field(default=0.2, gt=0, description="value clip; none: unclipped")
    epochs: int = Field(default=4, gt=0, le=10**4, description="passes over each iteration's rollouts")
    entropy_coef: float = Field(default=0.0, ge=0, description="entropy bonus coefficient")
    whiten_advantages: bool | None = Field(
        default=None,
        description="normalise advantages over the batch; none: yes for gae and rloo, no for grpo and dr_grpo "
        "(already normalised per group)",
    )
    kl_stop: float | None = Field(
        default=None, gt=0, description="stop an iteration's epochs early when the policy KL exceeds this"
    )
    critic_lr: float | None = Field(default=None, gt=0, description="critic learning rate; none: training.lr")
    advantage: Literal["gae", "rloo", "grpo", "dr_grpo"] = Field(
        default="gae",
        description="gae: a critic's values and GAE(γ, λ); without a critic, over each prompt's responses "
        "(rollout.responses_per_prompt ≥ 2): rloo (leave-one-out baseline), grpo (return minus the group mean, "
        "over the group std; Shao et al. 2024), dr_grpo (GRPO without the std, Liu et al. 2025)",
    )

    @property
    def group_advantage(self) -> bool:
        """Advantages from each prompt's group of responses, no critic."""
        return self.advantage != "gae"

    @property
    def uses_reference(self) -> bool:
        """A reference model is built only when a KL penalty can be non-zero."""
        return self.kl_coef > 0


class PpoStage(TrainingStage):
    """Stage 4b: RLHF with PPO against the reward model and/or reward functions."""

    kind: Literal["ppo"] = Field(description="PPO")
    policy: str = Field(
        description="sft, pretrain or ppo stage the actor (and the frozen reference) start from, or a checkpoint "
        "directory (a path: contains '/' or starts with '.'), such as an earlier round's policy"
    )
    reference: str | None = Field(
        default=None,
        description="stage or checkpoint directory of the frozen reference policy the KL is measured against; "
        "default: the policy's checkpoint",
    )
    reward_model: str | None = Field(
        default=None, description="reward_model stage scoring responses; none: reward functions only"
    )
    reward_model_weight: float = Field(default=1.0, description="weight of the reward model's score")
    critic_from: str | None = Field(
        default=None, description="reward_model stage the critic starts from; default: reward_model"
    )
    prompts: str = Field(description="name of the data stage whose prompt sources are sampled")
    rewards: list[RewardSpec] = Field(default_factory=list, description="reward functions added to the score")
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, description="sampling settings")
    ppo: PpoSpec = Field(default_factory=PpoSpec, description="PPO hyper-parameters")
    eval_prompts: int = Field(default=64, gt=0, le=10**7, description="held-out prompts scored before and after")
    batching: Literal["padded", "packed"] = Field(
        default="padded",
        description="micro-batches of the actor's and the critic's updates: padded: one rollout per row, padded to "
        "the iteration's longest; packed: several per row (first-fit decreasing into seq_length), attention kept "
        "within each",
    )
    offload: list[Literal["reference", "reward_model", "critic"]] = Field(
        default_factory=list,
        description="roles kept in host memory except in the phases that use them: the reference and the reward "
        "model outside scoring, the critic (weights, gradients, optimizer) during rollouts; the estimate counts "
        "what each phase holds",
    )


# Every stage kind's recipe model; engine.kinds declares what else each kind is.
Stage = Annotated[
    DataStage | PretrainStage | SftStage | RewardModelStage | DpoStage | PpoStage, Field(discriminator="kind")
]
