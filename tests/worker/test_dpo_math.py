"""The DPO family's losses against values computed by hand (engine.worker.objectives.preference_loss)."""

from __future__ import annotations

import math

import pytest
import torch

from engine.worker.objectives import preference_loss, sequence_logps


def one(x: float) -> torch.Tensor:
    return torch.tensor([x], dtype=torch.float64)


# Policy log-probabilities −2 (chosen) and −3 (rejected), the reference's −2.5 for both:
# h = (−2 + 2.5) − (−3 + 2.5) = 1.
POLICY = (one(-2.0), one(-3.0))
REFERENCE = (one(-2.5), one(-2.5))


def _loss(kind: str, beta: float, **kw: float) -> tuple[float, float]:
    per, margin = preference_loss(*POLICY, *REFERENCE, loss=kind, beta=beta, **kw)  # type: ignore[arg-type]
    return float(per), float(margin)


def test_dpo_sigmoid_and_cdpo_by_hand() -> None:
    assert _loss("sigmoid", 0.1) == pytest.approx((math.log1p(math.exp(-0.1)), 0.1))  # −log σ(β h)
    smoothed, _ = _loss("sigmoid", 0.1, label_smoothing=0.1)
    assert smoothed == pytest.approx(0.9 * math.log1p(math.exp(-0.1)) + 0.1 * math.log1p(math.exp(0.1)))


def test_ipo_and_hinge_by_hand() -> None:
    assert _loss("ipo", 0.1)[0] == pytest.approx((1.0 - 1.0 / 0.2) ** 2)  # (h − 1/(2β))² = 16
    assert _loss("hinge", 0.1)[0] == pytest.approx(0.9)  # max(0, 1 − β h)
    assert _loss("hinge", 2.0)[0] == 0.0


def test_simpo_is_length_normalised_and_reference_free() -> None:
    # ℓ_c = −2 / 2 tokens = −1, ℓ_r = −3 / 1 token = −3: margin β(ℓ_c − ℓ_r) = 2·2 = 4; loss −log σ(4 − 0.5).
    per, margin = preference_loss(*POLICY, None, None, loss="simpo", beta=2.0, gamma=0.5,
                                  chosen_tokens=one(2.0), rejected_tokens=one(1.0))  # fmt: skip
    assert float(margin) == pytest.approx(4.0) and float(per) == pytest.approx(math.log1p(math.exp(-3.5)))


def test_at_the_reference_dpo_is_log_two_and_the_margin_zero() -> None:
    per, margin = preference_loss(one(-4.0), one(-1.0), one(-4.0), one(-1.0), loss="sigmoid", beta=0.5)
    assert float(per) == pytest.approx(math.log(2.0)) and float(margin) == 0.0


def test_sequence_logps_sum_the_response_tokens_only() -> None:
    nll = torch.tensor([[0.5, 1.0, 2.0, 4.0]])
    logp, tokens = sequence_logps(nll, torch.tensor([[0.0, 1.0, 1.0, 0.0]]))
    assert logp.tolist() == [-3.0] and tokens.tolist() == [2.0]


def test_an_unknown_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown preference loss"):
        preference_loss(*POLICY, *REFERENCE, loss="kto", beta=0.1)


def test_pair_rows_mask_the_generated_reply_only() -> None:
    """DPO sums log-probabilities over what a policy generates: the reply up to its first stop token
    (included). The end-of-sequence token a reward-model row carries after it stays out of the mask but
    in the row, where `last` reads it."""
    import numpy as np

    from engine.worker.batches import PairRows

    end, eos = 3, 2
    rows = [{"prompt": [1, 5, 40, 3, 6], "chosen": [50, 51, end, eos], "rejected": [60, end, eos]}]
    shape = PairRows(pad=0, stop=(end, eos))
    ds = shape.load(rows)
    batch = shape.rows(ds, np.array([0]), 12)
    # Row 0 (chosen): positions 4..6 predict 50, 51, end; position 7 predicts eos.
    assert batch["loss_mask"][0].nonzero().flatten().tolist() == [4, 5, 6]
    assert batch["labels"][0, 4:8].tolist() == [50, 51, end, eos]
    assert batch["loss_mask"][1].nonzero().flatten().tolist() == [4, 5]
    assert batch["last"].tolist() == [8, 7]  # the reward model still reads the closing eos
    whole = PairRows(pad=0).rows(ds, np.array([0]), 12)["loss_mask"]
    assert whole[0].nonzero().flatten().tolist() == [4, 5, 6, 7]
    # A reply cut by the sequence length keeps the positions that fit.
    cut = shape.rows(ds, np.array([0]), 7)
    assert cut["loss_mask"][0].nonzero().flatten().tolist() == [4, 5]
