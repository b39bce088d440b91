"""The arithmetic of PPO for language models, on plain tensors (no Megatron, no process group).

Setting (Ouyang et al. 2022, after Ziegler et al. 2019). A prompt x is answered by a response
y = (y_1 … y_T) sampled from the policy π; each token is an action taken in the state (x, y_<t).
The sequence gets one score s from the reward sources (a reward model's scalar at the last token,
reward functions such as exact match), and every token pays a KL penalty against the frozen
reference policy π_ref (the SFT model) so that the policy cannot drift into text that fools the reward:

    r_t = −β · kl_t            kl_t = log π(y_t) − log π_ref(y_t)            (k1, unbiased)
    r_T += s                   or  kl_t = (ρ − 1) − log ρ, ρ = π_ref/π      (k3, unbiased and ≥ 0; Schulman 2020)

β is fixed, or adapted (Ziegler et al. 2019): after each iteration β ← β · (1 + clip(KL/KL_target − 1,
±0.2) · n/horizon), where KL is the mean per-sequence KL and n the number of sequences.

Advantages are GAE (Schulman et al. 2016) with the critic's values V_t of each state:

    δ_t = r_t + γ V_{t+1} − V_t   (V_{T+1} = 0)        A_t = δ_t + γλ A_{t+1}        R_t = A_t + V_t

or, without a critic, REINFORCE leave-one-out (Ahmadian et al. 2024) over the K responses to one prompt:
A_i = R_i − mean_{j≠i} R_j on every token of response i, with R_i = s_i − β Σ_t kl_t. Either way they
are whitened over the batch (zero mean, unit variance over response tokens). Each iteration then
runs several epochs over minibatches of the rollouts, minimising (Schulman et al. 2017)

    policy:  mean_t max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε))      ρ_t = π_new(y_t) / π_old(y_t)
    value:   mean_t ½ max((V_t − R_t)², (V_old,t + clip(V_t − V_old,t, ±ε_v) − R_t)²)
    entropy: − c_H · mean_t H(π_new(· | state_t))

where π_old and V_old are the policy and critic that generated the rollouts. An epoch loop stops early
when the policy has moved more than `kl_stop` from π_old (mean ½(log ρ)², an estimate of KL).

Without a critic, GRPO (Shao et al. 2024) normalises each response's return within its prompt's group,
A_i = (R_i − mean_g R) / (std_g R + ε) (population std); its Dr. GRPO form (Liu et al. 2025) drops the
std, A_i = R_i − mean_g R, and aggregates the loss without length normalisation. GRPO also moves the
KL penalty from the return into the loss (`kl_penalty: loss`): β · kl_t (k3) per response token.

DAPO (Yu et al. 2025) adds, each an option here: asymmetric clipping, clip(ρ, 1 − ε_low, 1 + ε_high);
token-level loss aggregation; dynamic sampling, which drops the groups whose responses all score the
same (their group-relative advantages are zero) and samples more prompts; overlong reward shaping,
which lowers the score of a response of length L in the last `buffer` tokens before the limit L_max
linearly, by penalty · (L − (L_max − buffer)) / buffer.

How per-token losses become one number (`loss_aggregation`, shared by every algorithm):

    token_mean               Σ_t ℓ_t m_t / Σ_t m_t over the microbatch's response tokens (DAPO)
    sequence_mean            mean over responses of Σ_t ℓ_t m_t / Σ_t m_t (each response weighs alike)
    sequence_sum_token_norm  Σ_t ℓ_t m_t / (responses × L_max): no length normalisation (Dr. GRPO)

Tensors here are [batch, positions] in the model's label space: position i holds the action that
follows input token i, and `mask` is 1 exactly where that action is a response token.
"""

from __future__ import annotations

import torch


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(π ‖ π_ref) estimate from the sampled tokens' log-probabilities."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        log_ratio = ref_logp - logp
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}")


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """−β·kl on every response token, plus the sequence's score on its last response token."""
    rewards = -beta * kl * mask
    last = last_index(mask)
    has = mask.sum(1) > 0
    rows = torch.arange(mask.shape[0])[has]
    rewards[rows, last[has]] += score[has]
    return rewards


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """The position of each row's last 1 (0 for an empty row)."""
    positions = torch.arange(mask.shape[1]).expand_as(mask)
    return torch.where(mask > 0, positions, torch.zeros_like(positions)).max(dim=1).values


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) over the response positions; zero elsewhere. Responses are contiguous."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    next_value = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(m > 0, delta + gamma * lam * running, running)
        advantages[:, t] = running * m
        next_value = torch.where(m > 0, values[:, t], next_value)
    returns = (advantages + values) * mask
    return advantages, returns


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def whiten(x: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """(x − mean)/std on the response tokens; mean and variance come from the whole batch (all ranks)."""
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


AGGREGATIONS = ("token_mean", "sequence_mean", "sequence_sum_token_norm")


def aggregate(
    x: torch.Tensor, mask: torch.Tensor, how: str, max_new_tokens: int, segment: torch.Tensor | None = None,
    sequences: int = 0,
) -> torch.Tensor:  # fmt: skip
    """One loss from per-token values `x` over the response tokens (see the module docstring). Packed rows
    hold several sequences: `segment` names each position's (`sequences` for padding)."""
    if how == "token_mean":
        return masked_mean(x, mask)
    count = sequences if segment is not None else mask.shape[0]
    if how == "sequence_mean":
        if segment is None:
            per = (x * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        else:
            index = segment.long().flatten()
            sums = torch.zeros(count + 1, dtype=x.dtype, device=x.device).index_add(0, index, (x * mask).flatten())
            tokens = torch.zeros(count + 1, dtype=x.dtype, device=x.device).index_add(0, index, mask.flatten().to(x.dtype))
            per = sums[:count] / tokens[:count].clamp(min=1.0)
        return per.mean()
    if how == "sequence_sum_token_norm":
        return (x * mask).sum() / (count * max_new_tokens)
    raise ValueError(f"unknown loss aggregation {how!r}")


def policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float,
    *, clip_high: float | None = None, aggregation: str = "token_mean", max_new_tokens: int = 1,
    segment: torch.Tensor | None = None, sequences: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clipped surrogate loss, fraction of tokens clipped, approximate KL to π_old). The ratio is clipped
    to [1 − clip_eps, 1 + clip_high] (clip_high defaults to clip_eps: symmetric); the loss is aggregated
    as `aggregation` says, the two diagnostics are token means."""
    high = clip_eps if clip_high is None else clip_high
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, aggregation, max_new_tokens, segment, sequences)
    clip_fraction = masked_mean(((ratio < 1.0 - clip_eps) | (ratio > 1.0 + high)).float(), mask)
    approx_kl = masked_mean(0.5 * log_ratio.pow(2), mask)
    return loss, clip_fraction.detach(), approx_kl.detach()


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float | None
) -> torch.Tensor:
    loss = (values - returns).pow(2)
    if clip is not None:
        clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        loss = torch.maximum(loss, (clipped - returns).pow(2))
    return 0.5 * masked_mean(loss, mask)


def adapt_kl_coef(beta: float, kl: float, target: float | None, horizon: int, n: int) -> float:
    """Ziegler et al.'s proportional controller; a fixed β when there is no target."""
    if target is None:
        return beta
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n / horizon)


def rloo_advantages(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float, group: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024), one value per response on all its tokens.

    Rows come in groups of `group` consecutive responses to the same prompt. A response's return is its
    score minus the KL penalty summed over its tokens, R_i = s_i − β Σ_t kl_t, and its baseline is the
    mean return of the other responses to the same prompt: A_i = R_i − mean_{j≠i} R_j. No critic.
    """
    if group < 2 or score.shape[0] % group:
        raise ValueError(f"{score.shape[0]} responses do not form groups of {group} (at least 2)")
    returns = (score - beta * (kl * mask).sum(1)).view(-1, group)
    baseline = (returns.sum(1, keepdim=True) - returns) / (group - 1)
    return (returns - baseline).reshape(-1, 1) * mask


def _group_returns(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float, group: int) -> torch.Tensor:
    if group < 2 or score.shape[0] % group:
        raise ValueError(f"{score.shape[0]} responses do not form groups of {group} (at least 2)")
    return (score - beta * (kl * mask).sum(1)).view(-1, group)


def grpo_advantages(
    score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float, group: int, *, scale: bool,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantages (GRPO; Dr. GRPO with `scale` off), one value per response on all its
    tokens: A_i = (R_i − mean_g R) / (std_g R + eps), population std over the group's `group` responses;
    R_i = s_i − β Σ_t kl_t (β = 0 when the KL penalty is in the loss)."""
    returns = _group_returns(score, kl, mask, beta, group)
    centred = returns - returns.mean(1, keepdim=True)
    if scale:
        centred = centred / (returns.std(1, unbiased=False, keepdim=True) + eps)
    return centred.reshape(-1, 1) * mask


def informative_groups(score: torch.Tensor, group: int) -> torch.Tensor:
    """DAPO's dynamic-sampling filter: per group of `group` consecutive responses, whether their scores
    differ (a group that scores alike has zero group-relative advantage and teaches nothing)."""
    grouped = score.view(-1, group)
    return (grouped.max(1).values - grouped.min(1).values) > 0


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max_new_tokens − buffer, then linearly down to −penalty at
    the limit."""
    start = max_new_tokens - buffer
    return -penalty * torch.clamp(lengths.float() - start, min=0.0) / buffer
