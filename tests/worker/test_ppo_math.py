"""PPO's arithmetic against values computed by hand (engine.worker.ppo_math)."""

from __future__ import annotations

import math

import pytest
import torch

from engine.worker.ppo_math import (
    adapt_kl_coef,
    aggregate,
    gae,
    grpo_advantages,
    informative_groups,
    kl_penalty,
    last_index,
    overlong_penalty,
    policy_loss,
    rloo_advantages,
    token_rewards,
    value_loss,
    whiten,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float64)


def test_kl_estimators() -> None:
    logp, ref = t(-1.0, -2.0), t(-1.5, -1.0)
    assert kl_penalty(logp, ref, "k1").tolist() == [[0.5, -1.0]]
    # k3 = (ρ − 1) − log ρ with log ρ = ref − logp = −0.5 and 1
    expected = [math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1]
    assert kl_penalty(logp, ref, "k3")[0].tolist() == pytest.approx(expected)
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="k2"):
        kl_penalty(logp, ref, "k2")


def test_token_rewards_put_the_score_on_the_last_response_token() -> None:
    mask = t(0, 1, 1, 1, 0)
    kl = t(0.0, 0.1, 0.2, 0.3, 0.0)
    got = token_rewards(torch.tensor([2.0], dtype=torch.float64), kl, mask, beta=0.5)
    assert got[0].tolist() == pytest.approx([0.0, -0.05, -0.1, -0.15 + 2.0, 0.0])
    assert last_index(t(0, 1, 1, 0)).tolist() == [2]


def test_gae_by_hand() -> None:
    mask = t(0, 1, 1, 1, 0)
    rewards = t(0.0, 0.1, 0.2, 1.0, 0.0)
    values = t(0.0, 0.5, 0.4, 0.3, 0.0)
    # γ = 1, λ = 0.5:  δ3 = 1 − 0.3 = 0.7;  δ2 = 0.2 + 0.3 − 0.4 = 0.1, A2 = 0.1 + 0.5·0.7 = 0.45;
    #                  δ1 = 0.1 + 0.4 − 0.5 = 0,   A1 = 0.5·0.45 = 0.225
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.0, 0.225, 0.45, 0.7, 0.0])
    assert ret[0].tolist() == pytest.approx([0.0, 0.725, 0.85, 1.0, 0.0])
    # γ = 0.9, λ = 1:  A3 = 0.7;  δ2 = 0.2 + 0.27 − 0.4 = 0.07, A2 = 0.07 + 0.63 = 0.7;
    #                  δ1 = 0.1 + 0.36 − 0.5 = −0.04, A1 = −0.04 + 0.63 = 0.59
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.0, 0.59, 0.7, 0.7, 0.0])


def test_gae_rows_are_independent() -> None:
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.float64)
    rewards = torch.tensor([[0, 0, 1, 0], [0, 0, 0, 2]], dtype=torch.float64)
    adv, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
    assert adv.tolist() == [[0, 1, 1, 0], [0, 0, 2, 2]]


def test_clipped_policy_loss_by_hand() -> None:
    ratio = [1.5, 0.5, 1.1]
    logp, old = t(*map(math.log, ratio)), t(0.0, 0.0, 0.0)
    adv, mask = t(1.0, 1.0, -1.0), t(1, 1, 1)
    loss, clip_fraction, approx_kl = policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # max(−Aρ, −A·clip(ρ)): max(−1.5, −1.2) = −1.2;  max(−0.5, −0.8) = −0.5;  max(1.1, 1.1) = 1.1
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 1.1) / 3)
    assert float(clip_fraction) == pytest.approx(2 / 3)
    assert float(approx_kl) == pytest.approx(sum(0.5 * math.log(r) ** 2 for r in ratio) / 3)
    # masked tokens count for nothing
    loss2, _, _ = policy_loss(logp, old, adv, t(1, 1, 0), clip_eps=0.2)
    assert float(loss2) == pytest.approx((-1.2 - 0.5) / 2)


def test_clipped_value_loss_by_hand() -> None:
    values, old, returns, mask = t(1.0, 0.0), t(0.5, 0.5), t(2.0, 0.0), t(1, 1)
    # clipped values 0.7 and 0.3: max(1, 1.69) and max(0, 0.09); ½·mean
    assert float(value_loss(values, old, returns, mask, clip=0.2)) == pytest.approx(0.5 * (1.69 + 0.09) / 2)
    assert float(value_loss(values, old, returns, mask, clip=None)) == pytest.approx(0.25)


def test_whiten_and_adaptive_kl() -> None:
    x, mask = t(1.0, 2.0, 3.0, 99.0), t(1, 1, 1, 0)
    out = whiten(x, mask, torch.tensor(2.0), torch.tensor(2.0 / 3.0))
    assert out[0, :3].tolist() == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)], rel=1e-6)
    assert out[0, 3] == 0
    # Ziegler et al.: error clipped to +0.2, β·(1 + 0.2·64/10000)
    assert adapt_kl_coef(0.1, kl=0.2, target=0.1, horizon=10000, n=64) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    assert adapt_kl_coef(0.1, kl=0.09, target=0.1, horizon=10000, n=64) == pytest.approx(0.1 * (1 - 0.1 * 64 / 10000))
    assert adapt_kl_coef(0.1, kl=5.0, target=None, horizon=10000, n=64) == 0.1


def test_rloo_advantages_by_hand() -> None:
    # Two prompts, three responses each; the second response of the first prompt has two tokens.
    mask = torch.tensor([[1, 0], [1, 1], [1, 0], [1, 0], [1, 0], [1, 0]], dtype=torch.float64)
    kl = torch.tensor([[0.2, 0], [0.1, 0.3], [0, 0], [0, 0], [0, 0], [0, 0]], dtype=torch.float64)
    score = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 5.0], dtype=torch.float64)
    # β = 0.5: returns 0.9, −0.2, 0 | 2, 2, 5; leave-one-out baselines (−0.2+0)/2 = −0.1, (0.9+0)/2 = 0.45,
    # (0.9−0.2)/2 = 0.35 | 3.5, 3.5, 2
    adv = rloo_advantages(score, kl, mask, beta=0.5, group=3)
    assert adv[:, 0].tolist() == pytest.approx([1.0, -0.65, -0.35, -1.5, -1.5, 3.0])
    assert adv[1].tolist() == pytest.approx([-0.65, -0.65])  # every token of a response shares its advantage
    assert adv[0, 1] == 0.0  # and positions outside the response get none
    with pytest.raises(ValueError, match="groups of 4"):
        rloo_advantages(score, kl, mask, beta=0.5, group=4)
    with pytest.raises(ValueError, match="groups of 1"):
        rloo_advantages(score, kl, mask, beta=0.5, group=1)


def test_grpo_advantages_by_hand() -> None:
    # One group of four: scores 3, 1, 2, 2 → mean 2, population std √0.5.
    score, mask = torch.tensor([3.0, 1.0, 2.0, 2.0], dtype=torch.float64), torch.ones(4, 2, dtype=torch.float64)
    kl = torch.zeros(4, 2, dtype=torch.float64)
    a = grpo_advantages(score, kl, mask, 0.0, 4, scale=True, eps=0.0)
    assert a[:, 0].tolist() == pytest.approx([math.sqrt(2), -math.sqrt(2), 0.0, 0.0])
    assert torch.equal(a[:, 0], a[:, 1])  # one value on every token of a response
    # Dr. GRPO: the group mean only.
    assert grpo_advantages(score, kl, mask, 0.0, 4, scale=False)[:, 0].tolist() == [1.0, -1.0, 0.0, 0.0]
    # The KL penalty in the return: response 0 pays β·Σkl = 0.5·1 → returns 2.5, 1, 2, 2 (mean 1.875).
    kl[0, 0] = 1.0
    dr = grpo_advantages(score, kl, mask, 0.5, 4, scale=False)[:, 0].tolist()
    assert dr == pytest.approx([0.625, -0.875, 0.125, 0.125])
    with pytest.raises(ValueError, match="groups of 3"):
        grpo_advantages(score, kl, mask, 0.0, 3, scale=True)


def test_dynamic_sampling_keeps_the_groups_that_score_differently() -> None:
    assert informative_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5]), 2).tolist() == [False, True, False]


def test_overlong_shaping_by_hand() -> None:
    # max_new_tokens 10, buffer 4: no penalty up to 6 tokens, then −0.25 a token down to −1 at 10.
    assert overlong_penalty(torch.tensor([5, 6, 8, 10]), 10, 4, 1.0).tolist() == [0.0, 0.0, -0.5, -1.0]
    assert overlong_penalty(torch.tensor([10]), 10, 4, 2.0).tolist() == [-2.0]


def test_loss_aggregations_by_hand() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(x, mask, "token_mean", 5).item() == pytest.approx(10 / 4)  # every token alike
    assert aggregate(x, mask, "sequence_mean", 5).item() == pytest.approx((2 + 4) / 2)  # every response alike
    assert aggregate(x, mask, "sequence_sum_token_norm", 5).item() == pytest.approx(10 / (2 * 5))  # Dr. GRPO
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate(x, mask, "mean", 5)


def test_asymmetric_clipping_by_hand() -> None:
    # Ratio 1.5 with A = +1 is clipped at 1 + 0.28; ratio 0.5 with A = −1 at 1 − 0.2.
    logp = torch.log(torch.tensor([[1.5, 0.5]], dtype=torch.float64))
    old, adv, mask = torch.zeros(1, 2, dtype=torch.float64), t(1.0, -1.0), t(1.0, 1.0)
    loss, clipped, _ = policy_loss(logp, old, adv, mask, 0.2, clip_high=0.28)
    assert loss.item() == pytest.approx((-1.28 + 0.8) / 2) and clipped.item() == 1.0
    symmetric, _, _ = policy_loss(logp, old, adv, mask, 0.2)
    assert symmetric.item() == pytest.approx((-1.2 + 0.8) / 2)
    # Inside the asymmetric band (ratio 1.25 < 1.28) nothing is clipped.
    inside, frac, _ = policy_loss(torch.log(torch.tensor([[1.25]], dtype=torch.float64)), torch.zeros(1, 1,
                                  dtype=torch.float64), t(1.0), t(1.0), 0.2, clip_high=0.28)  # fmt: skip
    assert inside.item() == pytest.approx(-1.25) and frac.item() == 0.0
