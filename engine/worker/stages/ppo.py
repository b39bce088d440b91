"""Stage 4b: RLHF with PPO — actor, critic, reference and reward, all Megatron-Core models in one job.

Roles, colocated on the job's processes and taking turns (rollout, scoring, training):

* actor: the policy, a GPTModel from the `policy` stage's checkpoint, trained (DDP, Megatron's Adam);
* reference: a frozen copy of the same checkpoint, for the KL penalty;
* critic: a scalar-head GPTModel (engine.worker.mcore.scalar_model_class) read at every response
  token, from `critic_from` (default: the reward model) or, without one, the policy's backbone with a
  fresh head; trained with its own learning rate (`ppo.critic_lr`);
* reward: the frozen reward model's score at the last token (weight `reward_model_weight`) plus the
  weighted reward-function plugins (`rewards`), which score decoded (prompt, response, reference).

One iteration (one `training.steps` unit): `prompts_per_iteration` prompts from the prompt shards
(a seeded order, split over data-parallel ranks) are answered `responses_per_prompt` times each by
KV-cache sampling (engine.worker.generate); the rollouts are scored, their log-probabilities under the
actor and the reference and the critic's values are computed, and advantages follow from GAE; then
`epochs` passes over shuffled minibatches of `global_batch_size` rollouts each take one optimizer step
of the actor and one of the critic through Megatron's schedule. With `ppo.advantage: rloo` there is no
critic: each response's advantage is its return minus the mean return of the other responses to the
same prompt (REINFORCE leave-one-out, Ahmadian et al. 2024), which needs `responses_per_prompt` ≥ 2
and costs one model less in memory and one backward pass less per minibatch; `grpo` and `dr_grpo`
normalise returns within each prompt's group instead. `kl_coef: 0` builds no reference; DAPO's dynamic
sampling drops the groups that score alike and samples more prompts before the update. The mathematics is in
engine.worker.ppo_math. Log-probabilities and entropy are those of the sampling distribution,
softmax(logits / temperature), computed over vocabulary-parallel logits (tensor parallelism) without
gathering them.

Held-out evaluation (`eval_prompts` prompts of the valid split, answered greedily and sampled as in
the rollouts: mean reward, and exact-match accuracy where prompts carry a reference) is logged at step 0, every `eval_interval`
iterations and at the end. Checkpoints: the actor in the stage's checkpoint folder (meta.json carries
the iteration and the KL coefficient), the critic under `critic/`, saved first; a restarted job resumes
from the newest actor checkpoint whose critic exists.

Every layout the training stages take works here too. Under pipeline parallelism rollouts are decoded
through the pipeline (engine.worker.generate: each stage keeps the KV cache of its own layers, the last
samples and broadcasts the tokens); the log-probabilities, values and reward-model scores are forward-
only passes through Megatron's schedule, whose last-stage outputs reach every rank
(engine.worker.loop.forward_outputs); the updates run through the same 1F1B schedule as SFT's. Every
rank then holds the same rollouts, scores and advantages, so what follows is layout-independent.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core import parallel_state as ps

from ...artifacts import read_manifest
from ...chat import template_for
from ...corpus.tokenizer import load as load_tokenizer
from ...errors import EngineError
from ...plugins import exact_match
from ...schema import PpoStage
from .. import checkpoint, comm, preempt
from ..batches import Mixture, pad_multiple, positions, read_sources, source_weights
from ..context import Context
from ..faults import maybe_kill
from ..generate import Sampling, generate
from ..handoff import checked_parent, checked_policy, meta_for
from ..logprobs import vocab_parallel_logp_entropy
from ..loop import forward_outputs, train_step
from ..mcore import SCALAR_HEAD, build_frozen, build_job
from ..metrics import Metrics
from ..objectives import run_model
from ..offload import Role
from ..packing import first_fit_decreasing, pack, step_length
from ..ppo_math import (
    adapt_kl_coef,
    aggregate,
    gae,
    grpo_advantages,
    informative_groups,
    kl_penalty,
    masked_mean,
    overlong_penalty,
    policy_loss,
    rloo_advantages,
    token_rewards,
    value_loss,
    whiten,
)
from ..rewards import Scorer

ACTOR_KEYS = ("loss", "policy_loss", "clip_fraction", "approx_kl", "entropy")
CRITIC_KEYS = ("loss", "value_loss")


@dataclass
class Rollouts:
    """One data-parallel rank's rollouts, in label space ([n, S]; see engine.worker.ppo_math)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    old_logp: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    ref_logp: torch.Tensor  # for a KL penalty in the loss
    lengths: torch.Tensor  # each row's tokens, prompt and response

    PER_TOKEN = ("tokens", "labels", "mask", "old_logp", "old_values", "advantages", "returns", "ref_logp")

    def minibatch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        seq = self.tokens.shape[1]
        out = {k: getattr(self, k)[rows] for k in self.PER_TOKEN}
        return {**out, "position_ids": positions(len(rows), seq)}

    def packed(self, rows: torch.Tensor, cap: int, pad: int, *, multiple: int = 1) -> dict[str, torch.Tensor]:
        """The same rollouts packed several to a row of at most `cap` positions (first-fit decreasing; rows a
        multiple of `multiple` long), every per-token tensor moved with its tokens, position ids restarting
        per rollout, THD boundaries (engine.worker.packing.Packing) and `segment`, each position's rollout
        (len(rows) for padding), for the losses that aggregate per sequence."""
        lengths = self.lengths[rows].numpy()
        bins = first_fit_decreasing(lengths, cap)
        width = step_length(max(int(lengths[b].sum()) for b in bins), cap=cap, multiple=multiple)
        layout = pack(bins, lengths, width)
        out = {k: torch.zeros((len(bins), width), dtype=getattr(self, k).dtype) for k in self.PER_TOKEN}
        out["tokens"].fill_(pad)
        out["labels"].fill_(pad)
        for j, i in enumerate(rows.tolist()):
            r, at, n = int(layout.row[j]), int(layout.start[j]), int(lengths[j])
            for k in self.PER_TOKEN:
                out[k][r, at : at + n] = getattr(self, k)[i, :n]
        return {**out, "position_ids": torch.from_numpy(layout.positions), "segment": torch.from_numpy(layout.segment),
                **layout.attention()}  # fmt: skip


class Ppo:
    def __init__(self, ctx: Context, spec: PpoStage) -> None:
        plan, job = ctx.plan, ctx.job
        self.ctx, self.job, self.plan, self.spec = ctx, job, plan, spec
        lay, est = job.layout, job.estimate
        assert lay is not None and est is not None
        self.ro, self.hp, self.t = spec.rollout, spec.ppo, spec.training
        self.beta = float(self.hp.kl_coef)  # the KL coefficient of the current iteration
        hp = self.hp
        auto = "sequence_sum_token_norm" if hp.advantage == "dr_grpo" else "token_mean"
        self.aggregation = auto if hp.loss_aggregation == "auto" else hp.loss_aggregation
        # Group-normalised advantages (grpo, dr_grpo) are not whitened again unless the recipe says so.
        self.whiten = hp.whiten_advantages if hp.whiten_advantages is not None else hp.advantage in ("gae", "rloo")
        self.dp, self.dp_rank = lay.dp, ps.get_data_parallel_rank()
        self.gbs, self.mbs = self.t.global_batch_size, self.t.micro_batch_size
        self.samples = self.ro.prompts_per_iteration * self.ro.responses_per_prompt
        if self.ro.prompts_per_iteration % self.dp:
            raise EngineError(
                f"stages.{job.name}.rollout.prompts_per_iteration={self.ro.prompts_per_iteration} does not split "
                f"over {self.dp} data-parallel ranks; use a multiple of {self.dp}"
            )
        self.iterations = est.steps
        self.optimizer_steps = self.iterations * self.hp.epochs * (self.samples // self.gbs)

        manifest = read_manifest(plan.dataset(spec.prompts))
        self.tokenizer = manifest["tokenizer"]
        self.tok = load_tokenizer(Path(self.tokenizer["path"]))
        self.template = template_for(self.tokenizer, self.tok)
        self.stop = list(self.template.stop)
        self.vocab = int(self.tokenizer["vocab_size"])
        by_source = self._prompt_sources("train")
        self.train_prompts = [p for rows in by_source.values() for p in rows]
        # Several prompt sources: each iteration draws from them by their mixture weights.
        weights = source_weights(plan, spec.prompts, list(by_source))
        self.mixture = Mixture.of([len(v) for v in by_source.values()], weights) if len(by_source) > 1 else None
        self.eval_set = [p for rows in self._prompt_sources("valid").values() for p in rows][: spec.eval_prompts]
        if not self.train_prompts:
            raise EngineError(f"stage {job.name!r}: no training prompt fits rollout.max_prompt_tokens")

        model, device, t = plan.model, ctx.device, self.t
        self.actor = build_job(job, model, training=t, device=device, steps=self.optimizer_steps)
        critic_lr = self.hp.critic_lr or t.lr
        self.critic = (
            build_job(job, model, training=t, device=device, steps=self.optimizer_steps, head="scalar", lr=critic_lr)
            if not self.hp.group_advantage
            else None
        )
        # No KL penalty (kl_coef 0): no reference model at all.
        self.reference = build_frozen(job, model, device=device, recompute=t.recompute) if self.hp.uses_reference else None
        self.reward_model = (
            build_frozen(job, model, device=device, recompute=t.recompute, head="scalar") if spec.reward_model else None
        )
        # Roles kept in host memory outside the phases that use them (`offload`; engine.worker.offload).
        self.roles: dict[str, Role] = {}
        if self.reference is not None:
            self.roles["reference"] = Role("reference", self.reference, enabled="reference" in spec.offload)
        if self.reward_model is not None:
            self.roles["reward_model"] = Role("reward_model", self.reward_model, enabled="reward_model" in spec.offload)
        if self.critic is not None:
            self.roles["critic"] = Role("critic", self.critic.chunks, self.critic.optimizer,
                                        enabled="critic" in spec.offload)  # fmt: skip
        self.scorer = Scorer(stage=job.name, rewards=spec.rewards, reward_model=self.reward_model,
                             reward_model_weight=spec.reward_model_weight, values=self._reward_values, tok=self.tok,
                             template=self.template)  # fmt: skip
        self.root = Path(job.outputs[0].path)
        self.critic_root = self.root.parent / "critic"
        self.background = checkpoint.Background() if spec.checkpointing.async_save else None

    def _resident(self, name: str) -> Any:
        """A context in which the role is on the device (offloaded again after it, if it is offloaded)."""
        role = self.roles.get(name)
        return role.resident() if role is not None else contextlib.nullcontext()

    def _offload_idle(self) -> None:
        """Offload every offloaded role (no-op for those already in host memory)."""
        for role in self.roles.values():
            if role.enabled:
                role.offload()

    def _prompt_sources(self, split: str) -> dict[str, list[dict[str, Any]]]:
        """The prompts of each source that fit rollout.max_prompt_tokens."""
        found = read_sources(self.plan, stage=self.job.name, data=self.spec.prompts, records="prompt", split=split)
        return {n: [r for r in rows if len(r["prompt"]) <= self.ro.max_prompt_tokens] for n, rows in found.items()}

    # -- start-up -------------------------------------------------------------------------------

    def _load(self, path: Path, chunks: list[Any], fresh: tuple[str, ...] = ()) -> None:
        assert self.job.layout is not None
        checkpoint.load_weights(path, chunks, layout=self.job.layout.model_dump(), fresh=fresh)

    def start(self) -> tuple[int, float, list[str]]:
        """(iteration, KL coefficient, parents): resume, or initialise every role from its parent."""
        assert self.job.layout is not None
        if self.ctx.info.rank == 0:
            checkpoint.remove_partial(self.root)
            checkpoint.remove_partial(self.critic_root)
        comm.barrier()
        policy = checked_parent(self.ctx, self.spec.policy, self.tokenizer)
        if self.reference is not None:
            reference = (policy if self.spec.reference is None
                         else checked_policy(self.ctx, self.spec.reference, self.tokenizer, field="reference"))  # fmt: skip
            self._load(reference, self.reference)
        if self.reward_model is not None and self.spec.reward_model is not None:
            self._load(checked_parent(self.ctx, self.spec.reward_model, self.tokenizer), self.reward_model)
        layout = self.job.layout.model_dump()
        own = checkpoint.latest_checkpoint(self.root)
        critics = {p.name for p in checkpoint.complete_checkpoints(self.critic_root)}
        # Killed between the critic's and the actor's save: the newest pair that is complete.
        while own is not None and self.critic is not None and own.name not in critics:
            older = [p for p in checkpoint.complete_checkpoints(self.root) if p.name < own.name]
            own = older[-1] if older else None
        if own is not None:
            meta = checkpoint.read_meta(own)
            step, _ = checkpoint.load(own, self.actor, layout=layout, model_only=False)
            if self.ctx.is_logger:
                print(f"[{self.job.name}] resuming from iteration {step} ({own})", flush=True)
            if self.critic is not None:
                checkpoint.load(self.critic_root / own.name, self.critic, layout=layout, model_only=False)
            return step, float(meta["kl_coef"]), list(meta.get("parents", []))
        self._load(policy, self.actor.chunks)
        critic_from = self.spec.critic_from or self.spec.reward_model
        parents = [str(policy)]
        if self.critic is None:
            pass
        elif critic_from:
            source = checked_parent(self.ctx, critic_from, self.tokenizer)
            self._load(source, self.critic.chunks)
            parents.append(str(source))
        else:
            self._load(policy, self.critic.chunks, fresh=(SCALAR_HEAD + ".",))
        return 0, float(self.hp.kl_coef), parents

    # -- rollouts -------------------------------------------------------------------------------

    def _iteration_prompts(self, iteration: int) -> list[dict[str, Any]]:
        return iteration_prompts(self.train_prompts, self.mixture, seed=self.t.seed, iteration=iteration,
                                 per_iteration=self.ro.prompts_per_iteration, dp=self.dp, dp_rank=self.dp_rank,
                                 responses=self.ro.responses_per_prompt)  # fmt: skip

    def _generate(self, prompts: list[dict[str, Any]], sampling: Sampling, gen: torch.Generator) -> tuple[Any, int]:
        """Token rows (prompt + response, padded), prompt and response lengths; tokens generated."""
        rows, plens, rlens, new = [], [], [], 0
        for i in range(0, len(prompts), self.ro.batch_size):
            chunk = prompts[i : i + self.ro.batch_size]
            out = generate(self.actor.chunks, [p["prompt"] for p in chunk], max_new=self.ro.max_new_tokens, sampling=sampling,
                           stop=self.stop, pad=self.template.pad, vocab_size=self.vocab, generator=gen)  # fmt: skip
            new += out.new_tokens
            for r in range(len(chunk)):
                p, n = int(out.prompt_lengths[r]), int(out.response_lengths[r])
                rows.append(out.tokens[r, : p + n].tolist())
                plens.append(p)
                rlens.append(n)
        return (rows, plens, rlens), new

    def _label_space(self, rows: list[list[int]], plens: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), self.template.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width))
        for i, (row, p) in enumerate(zip(rows, plens, strict=True)):
            tokens[i, : len(row)] = torch.tensor(row)
            mask[i, p - 1 : len(row) - 1] = 1.0  # positions whose next token is a response token
        labels = torch.cat([tokens[:, 1:], torch.full((len(rows), 1), self.template.pad, dtype=torch.long)], dim=1)
        return tokens, labels, mask

    def _logp(self, chunks: list[Any], tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log π(label) per position (host tensors in and out; each batch runs on the job's device)."""

        def step(data: Any, model: Any) -> tuple[torch.Tensor, Any]:
            b = comm.to_device(next(data), self.ctx.device)
            logits = model(b["tokens"], b["position_ids"], None)

            def collect(logits: torch.Tensor, non_loss_data: bool = False) -> torch.Tensor:
                return vocab_parallel_logp_entropy(logits / self.ro.temperature, b["labels"])[0].detach()

            return logits, collect

        return self._forward_rows(chunks, step, tokens, labels)

    @torch.no_grad()
    def _values(self, chunks: list[Any], tokens: torch.Tensor) -> torch.Tensor:
        """A scalar-head model's value per position (host tensors in and out)."""

        def step(data: Any, model: Any) -> tuple[torch.Tensor, Any]:
            b = comm.to_device(next(data), self.ctx.device)
            values = model(b["tokens"], b["position_ids"], None)

            def collect(values: torch.Tensor, non_loss_data: bool = False) -> torch.Tensor:
                return values.float().detach()

            return values, collect

        return self._forward_rows(chunks, step, tokens, None)

    def _forward_rows(self, chunks: list[Any], step: Any, tokens: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """One output row per token row, from a forward-only pass through the pipeline schedule in micro-batches
        of `rollout.score_batch_size` rows (or batch_size); the last stage's outputs are delivered to every rank. Under pipeline
        parallelism every micro-batch has the same shape (the last is filled with copies of the first row,
        whose outputs are dropped) and, interleaved, their number is a multiple of pp."""
        size, n, width = self.ro.score_batch_size or self.ro.batch_size, len(tokens), tokens.shape[1]
        assert self.job.layout is not None
        pp, vpp = self.job.layout.pp, self.job.layout.vpp
        count = -(-n // size)
        if vpp > 1:
            count = -(-count // pp) * pp
        if pp > 1 and count * size > n:
            fill = count * size - n
            tokens = torch.cat([tokens, tokens[:1].expand(fill, width)])
            labels = None if labels is None else torch.cat([labels, labels[:1].expand(fill, width)])
        micro = []
        for i in range(0, len(tokens), size):
            rows = tokens[i : i + size]
            batch = {"tokens": rows, "position_ids": positions(*rows.shape)}
            micro.append(batch if labels is None else {**batch, "labels": labels[i : i + size]})
        out = forward_outputs(chunks, lambda: iter(micro), forward_step=step, num_microbatches=len(micro),
                              seq_length=width, mbs=size)  # fmt: skip
        return torch.cat(out)[:n]

    def _generator(self, seed: int) -> torch.Generator:
        """A sampling generator on the job's device (sampling draws there; every TP rank seeds it alike)."""
        device = torch.device("cuda", torch.cuda.current_device()) if self.ctx.device == "cuda" else torch.device("cpu")
        return torch.Generator(device=device).manual_seed(seed)

    def _reward_values(self, chunks: list[Any], tokens: torch.Tensor) -> torch.Tensor:
        with self._resident("reward_model"):
            return self._values(chunks, tokens)

    def _sample(self, prompts: list[dict[str, Any]], sampling: Sampling, gen: torch.Generator) -> dict[str, Any]:
        """One round of rollouts for `prompts`, scored (overlong shaping included)."""
        began = time.perf_counter()
        (rows, plens, rlens), new_tokens = self._generate(prompts, sampling, gen)
        elapsed = time.perf_counter() - began
        score, parts = self.scorer.scores(rows, self.scorer.samples(prompts, rows, plens, rlens))
        if self.hp.overlong_buffer is not None:
            parts["overlong"] = overlong_penalty(torch.tensor(rlens), self.ro.max_new_tokens, self.hp.overlong_buffer,
                                                 self.hp.overlong_penalty)  # fmt: skip
            score = score + parts["overlong"]
        return {"prompts": prompts, "rows": rows, "plens": plens, "rlens": rlens, "score": score, "parts": parts,
                "new_tokens": new_tokens, "seconds": elapsed}  # fmt: skip

    def _dynamic(self, iteration: int, first: dict[str, Any], sampling: Sampling, gen: torch.Generator) -> tuple[
        dict[str, Any], dict[str, float]
    ]:  # fmt: skip
        """DAPO's dynamic sampling: keep the groups whose responses score differently, sample more prompts
        (those of later rounds' prompt indices) until this rank has its share or the rounds run out, then
        cut every rank to the same whole number of minibatches."""
        k = self.ro.responses_per_prompt
        want = self.ro.prompts_per_iteration // self.dp
        kept: dict[str, list[Any]] = {key: [] for key in ("prompts", "rows", "plens", "rlens", "score")}
        sampled, informative, rounds = 0, 0, 0
        batch = first
        while True:
            keep = informative_groups(batch["score"], k)
            sampled, informative, rounds = sampled + len(keep), informative + int(keep.sum()), rounds + 1
            for g in torch.nonzero(keep).flatten().tolist():
                for key in kept:
                    kept[key].extend(batch[key][g * k : (g + 1) * k])
            if len(kept["rows"]) >= want * k or rounds > self.hp.dynamic_sampling_rounds:
                break
            batch = self._sample(self._iteration_prompts(iteration + rounds * self.iterations), sampling, gen)
        groups = min(len(kept["rows"]) // k, want)
        # Every rank trains the same number of minibatches: the smallest rank's, in whole minibatches.
        fewest = -float(comm.all_reduce(torch.tensor([-float(groups)]), group=ps.get_data_parallel_group(), op="max")[0])
        local = self.gbs // self.dp
        rows = int(fewest) * k // local * local
        out: dict[str, Any] = {key: v[:rows] for key, v in kept.items()}
        out["score"] = torch.stack(out["score"]) if rows else torch.zeros(0)
        stats = _dp_sum(torch.tensor([float(sampled), float(informative), float(rows), float(rounds)]))
        return out, {"dynamic_groups_sampled": float(stats[0]), "dynamic_groups_informative": float(stats[1]),
                     "dynamic_rollouts_trained": float(stats[2]), "dynamic_rounds": float(stats[3]) / self.dp}  # fmt: skip

    def collect(self, iteration: int, beta: float) -> tuple[Rollouts | None, dict[str, float]]:
        prompts = self._iteration_prompts(iteration)
        gen = self._generator(int(self.t.seed) * 1_000_003 + iteration * 1009 + self.dp_rank)
        sampling = Sampling(self.ro.temperature, self.ro.top_k, self.ro.top_p)
        first = self._sample(prompts, sampling, gen)
        values = self._rollout_stats(first)
        chosen: dict[str, Any] = first
        if self.hp.dynamic_sampling:
            chosen, extra = self._dynamic(iteration, first, sampling, gen)
            values |= extra
            if not chosen["rows"]:
                values["kl"] = 0.0
                return None, values  # no informative group anywhere: nothing to learn from this iteration
        rows, plens, score = chosen["rows"], chosen["plens"], chosen["score"]
        tokens, labels, mask = self._label_space(rows, plens)
        old_logp = self._logp(self.actor.chunks, tokens, labels) * mask
        with self._resident("reference"):
            ref_logp = self._logp(self.reference, tokens, labels) * mask if self.reference is not None else old_logp
        kl = kl_penalty(old_logp, ref_logp, self.hp.kl_estimator) * mask
        in_return = beta if self.hp.kl_penalty == "reward" else 0.0
        group = self.ro.responses_per_prompt
        if self.critic is None:
            old_values = returns = torch.zeros_like(mask)
            if self.hp.advantage == "rloo":
                advantages = rloo_advantages(score, kl, mask, in_return, group)
            else:
                advantages = grpo_advantages(score, kl, mask, in_return, group, scale=self.hp.advantage == "grpo")
        else:
            self.roles["critic"].load()  # resident until the update is done (offloaded after it)
            old_values = self._values(self.critic.chunks, tokens) * mask
            rewards = token_rewards(score, kl, mask, in_return)
            advantages, returns = gae(rewards, old_values, mask, self.hp.gamma, self.hp.lam)
        if self.whiten:
            sums = _dp_sum(torch.stack([(advantages * mask).sum(), (advantages.pow(2) * mask).sum(), mask.sum()]))
            mean = sums[0] / sums[2]
            advantages = whiten(advantages, mask, mean, sums[1] / sums[2] - mean.pow(2))
        values |= _dp_means({"kl": kl.sum(1)})
        lengths = torch.tensor([len(r) for r in rows])
        rollouts = Rollouts(tokens, labels, mask, old_logp, old_values, advantages * mask, returns, ref_logp, lengths)
        self._dump(iteration, rollouts, score)
        return rollouts, values

    def _dump(self, iteration: int, rollouts: Rollouts, score: torch.Tensor) -> None:
        """With ENGINE_DUMP_ROLLOUTS=<folder>: each iteration's rollouts of each data-parallel rank, as they go
        into the update (a debugging aid: what was sampled, scored and credited), written by one rank of the
        replica as iteration_<N>_dp<R>.pt."""
        where = os.environ.get("ENGINE_DUMP_ROLLOUTS")
        if not where or ps.get_tensor_model_parallel_rank() != 0 or ps.get_pipeline_model_parallel_rank() != 0:
            return
        folder = Path(where)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({**vars(rollouts), "score": score},
                   folder / f"iteration_{iteration:06d}_dp{self.dp_rank}.pt")  # fmt: skip

    def _rollout_stats(self, batch: dict[str, Any]) -> dict[str, float]:
        """Reward, its parts and the response length over the iteration's first round of rollouts, before
        dynamic sampling filters or refills it (what the policy does on the prompts it was given)."""
        stats = {
            "reward": batch["score"],
            "response_length": torch.tensor(batch["rlens"], dtype=torch.float32),
            **{f"reward_{k}": v for k, v in batch["parts"].items()},
        }
        values = _dp_means(stats)
        values["reward_std"] = _dp_std(batch["score"])
        for spec in self.spec.rewards:  # calls scored 0 past their time limit, so far, on all ranks
            if spec.timeout_s is not None and spec.on_timeout == "zero":
                count = float(self.scorer.timeouts.get(spec.plugin, 0))
                values[f"reward_timeouts_{spec.plugin}"] = float(_dp_sum(torch.tensor([count]))[0])
        values["rollout_tokens_per_s"] = (
            _dp_sum(torch.tensor([float(batch["new_tokens"])]))[0].item() / max(batch["seconds"], 1e-9)
        )
        return values

    # -- training -------------------------------------------------------------------------------

    def _actor_step(self, data: Any, model: Any) -> tuple[torch.Tensor, Any]:
        b = comm.to_device(next(data), self.ctx.device)
        logits = run_model(model, b)
        segment = b.get("segment")  # packed rows: each position's rollout (self.mbs for padding)

        def loss_func(logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            # The policy that sampled the rollouts is softmax(logits / temperature): its log-probabilities.
            logp, entropy = vocab_parallel_logp_entropy(logits / self.ro.temperature, b["labels"])
            hp = self.hp
            pg, clip_fraction, approx_kl = policy_loss(
                logp, b["old_logp"], b["advantages"], b["mask"], hp.clip_low or hp.clip_eps,
                clip_high=hp.clip_high or hp.clip_eps, aggregation=self.aggregation, max_new_tokens=self.ro.max_new_tokens,
                segment=segment, sequences=self.mbs,
            )  # fmt: skip
            ent = masked_mean(entropy, b["mask"])
            loss = pg - hp.entropy_coef * ent
            report = {"loss": loss.detach().clone(), "policy_loss": pg.detach(), "clip_fraction": clip_fraction,
                      "approx_kl": approx_kl, "entropy": ent.detach()}  # fmt: skip
            if hp.kl_penalty == "loss" and self.reference is not None:
                kl_loss = aggregate(kl_penalty(logp, b["ref_logp"], hp.kl_estimator), b["mask"], self.aggregation,
                                    self.ro.max_new_tokens, segment, self.mbs)  # fmt: skip
                loss = loss + self.beta * kl_loss
                report["loss"] = loss.detach().clone()
            return loss, report

        return logits, loss_func

    def _critic_step(self, data: Any, model: Any) -> tuple[torch.Tensor, Any]:
        b = comm.to_device(next(data), self.ctx.device)
        values = run_model(model, b)

        def loss_func(values: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            loss = value_loss(values.float(), b["old_values"], b["returns"], b["mask"], self.hp.value_clip)
            return loss, {"loss": loss.detach().clone(), "value_loss": loss.detach()}

        return values, loss_func

    def optimize(self, rollouts: Rollouts, iteration: int) -> dict[str, float]:
        n = len(rollouts.tokens)
        local = self.gbs // self.dp
        nmb = local // self.mbs
        seq = rollouts.tokens.shape[1]
        multiple = pad_multiple(self.job)  # packed rows: lengths the layout takes (sequence parallelism, tensor cores)
        totals: dict[str, float] = {}
        count, epochs_run = 0, 0
        for epoch in range(self.hp.epochs):
            gen = torch.Generator().manual_seed(int(self.t.seed) + 7919 * iteration + epoch)
            order = torch.randperm(n, generator=gen)
            kls = []
            for first in range(0, n, local):
                rows = order[first : first + local]

                def make(rows: torch.Tensor = rows) -> Any:
                    micro = (rows[m * self.mbs : (m + 1) * self.mbs] for m in range(nmb))
                    if self.spec.batching == "packed":
                        return (rollouts.packed(r, self.plan.model.seq_length, self.template.pad, multiple=multiple)
                                for r in micro)  # fmt: skip
                    return (rollouts.minibatch(r) for r in micro)

                common = dict(num_microbatches=nmb, seq_length=seq, mbs=self.mbs)
                a = train_step(self.actor, make, forward_step=self._actor_step, keys=ACTOR_KEYS, **common)
                step_values = {**a.values, "grad_norm": a.grad_norm, "lr": a.lr}
                if self.critic is not None:
                    c = train_step(self.critic, make, forward_step=self._critic_step, keys=CRITIC_KEYS, **common)
                    step_values |= {"value_loss": c.values["value_loss"], "critic_grad_norm": c.grad_norm}
                for k, v in step_values.items():
                    totals[k] = totals.get(k, 0.0) + v
                count += 1
                kls.append(a.values["approx_kl"])
            epochs_run += 1
            if self.hp.kl_stop is not None and sum(kls) / len(kls) > self.hp.kl_stop:
                break
        out = {k: v / count for k, v in totals.items()}
        out["epochs"] = float(epochs_run)
        return out

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """The held-out prompts (split over data-parallel ranks), answered greedily (`val_`) and sampled
        as in the rollouts, four times each with a fixed seed (`val_sampled_`, the quantity PPO
        maximises): mean reward, and exact-match accuracy against the reference answers where the
        prompts have them."""
        mine = self.eval_set[self.dp_rank :: self.dp]
        if not mine:
            return {}
        out = self._evaluate(mine, Sampling(temperature=0.0), "val_")
        sampled = [p for p in mine for _ in range(4)]
        rollout = Sampling(self.ro.temperature, self.ro.top_k, self.ro.top_p)
        return out | self._evaluate(sampled, rollout, "val_sampled_")

    def _evaluate(self, prompts: list[dict[str, Any]], sampling: Sampling, prefix: str) -> dict[str, float]:
        (rows, plens, rlens), _ = self._generate(prompts, sampling, self._generator(12345 + self.dp_rank))
        samples = self.scorer.samples(prompts, rows, plens, rlens)
        score, _ = self.scorer.scores(rows, samples)
        checkable = [s for s in samples if s.reference is not None]
        correct = sum(exact_match.score(exact_match.ExactMatchParams(), checkable))
        sums = _dp_sum(torch.tensor([float(score.sum()), float(len(prompts)), correct, float(len(checkable)),
                                     float(sum(rlens))]))  # fmt: skip
        out = {f"{prefix}reward": float(sums[0] / sums[1]), f"{prefix}response_length": float(sums[4] / sums[1])}
        if sums[3] > 0:
            out[f"{prefix}accuracy"] = float(sums[2] / sums[3])
        return out

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        ctx, job = self.ctx, self.job
        ck = self.spec.checkpointing
        iteration, beta, parents = self.start()
        meta = meta_for(ctx, self.tokenizer, parents)
        metrics = Metrics(ctx.stage_dir, name=job.name, total_steps=self.iterations, start_step=iteration,
                          enabled=ctx.is_logger)  # fmt: skip
        eval_every = self.t.eval_interval or self.iterations
        save_every = ck.interval or self.iterations
        if ctx.is_logger:
            print(f"[{job.name}] {len(self.train_prompts)} training prompts, {len(self.eval_set)} held out; "
                  f"{self.samples} rollouts per iteration, {self.optimizer_steps} optimizer steps", flush=True)  # fmt: skip
        try:
            self._offload_idle()
            offloaded = [f"{r.name} {r.host_bytes / 2**20:.1f} MiB" for r in self.roles.values() if r.enabled]
            if offloaded and ctx.is_logger:
                print(f"[{job.name}] offloaded to host memory outside the phases that use them (rank 0): "
                      f"{', '.join(offloaded)}", flush=True)  # fmt: skip
            if iteration == 0:
                metrics.log(0, self.evaluate())
            loop_start = time.perf_counter()
            while iteration < self.iterations:
                self.beta = beta
                rollouts, values = self.collect(iteration, beta)
                if rollouts is not None:
                    values |= self.optimize(rollouts, iteration)
                self._offload_idle()
                iteration += 1
                values["kl_coef"] = beta
                beta = adapt_kl_coef(beta, values["kl"], self.hp.kl_target, self.hp.kl_horizon, self.samples)
                if iteration % eval_every == 0 or iteration == self.iterations:
                    values |= self.evaluate()
                values["elapsed_s"] = time.perf_counter() - loop_start
                metrics.log(iteration, values)
                maybe_kill("after_step", iteration)
                if self.background is not None:
                    self.background.poll()
                stop = preempt.requested()
                if stop or iteration % save_every == 0 or iteration == self.iterations:
                    self.save(iteration, beta, meta)
                if stop and iteration < self.iterations:
                    if self.background is not None:
                        self.background.wait()
                    preempt.requeue(iteration)
            if self.background is not None:
                self.background.wait()
        except BaseException:
            if self.background is not None:
                self.background.abort()
            raise
        finally:
            metrics.close()

    def save(self, iteration: int, beta: float, meta: dict[str, Any]) -> None:
        keep = self.spec.checkpointing.keep_last
        with self._resident("critic"):
            self._save(iteration, beta, meta, keep)

    def _save(self, iteration: int, beta: float, meta: dict[str, Any], keep: int) -> None:
        if self.critic is not None:
            critic_meta = {
                **meta,
                "model": "critic",
                "head": {"name": SCALAR_HEAD, "outputs": 1, "read_at": "every_token"},
            }
            checkpoint.save(self.critic_root, self.critic, step=iteration, consumed=iteration * self.samples,
                            meta=critic_meta, keep_last=max(keep, 2), background=self.background)  # fmt: skip
        # The actor after the critic (a background save waits for the critic's to complete): a resumed job
        # takes the newest actor checkpoint whose critic exists.
        checkpoint.save(self.root, self.actor, step=iteration, consumed=iteration * self.samples,
                        meta={**meta, "model": "policy", "kl_coef": beta}, keep_last=keep,
                        background=self.background)  # fmt: skip


def iteration_prompts(
    prompts: list[dict[str, Any]], mixture: Mixture | None, *, seed: int, iteration: int, per_iteration: int,
    dp: int, dp_rank: int, responses: int,
) -> list[dict[str, Any]]:  # fmt: skip
    """This rank's prompts of one iteration, each repeated `responses` times: the global prompt g of the run is
    sample g % n of epoch g // n's order (seeded; drawn by the sources' mixture weights when there are several)."""
    n = len(prompts)
    local = per_iteration // dp
    first = iteration * per_iteration + dp_rank * local
    out = []
    for g in range(first, first + local):
        rng = np.random.default_rng([int(seed), g // n])
        order = mixture.permutation(rng) if mixture is not None else rng.permutation(n)
        out.append(prompts[int(order[g % n])])
    return [p for p in out for _ in range(responses)]


def _dp_sum(x: torch.Tensor) -> torch.Tensor:
    return comm.all_reduce(x, group=ps.get_data_parallel_group())


def _dp_means(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    keys = sorted(stats)
    sums = _dp_sum(torch.tensor([float(stats[k].sum()) for k in keys] + [float(len(stats[keys[0]]))]))
    return {k: float(sums[i] / sums[-1]) for i, k in enumerate(keys)}


def _dp_std(x: torch.Tensor) -> float:
    s = _dp_sum(torch.tensor([float(x.sum()), float(x.pow(2).sum()), float(len(x))]))
    mean = float(s[0] / s[2])
    return math.sqrt(max(float(s[1] / s[2]) - mean * mean, 0.0))


def run(ctx: Context, spec: PpoStage) -> None:
    Ppo(ctx, spec).run()
