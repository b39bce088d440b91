"""Sequence packing for SFT, the reward model and DPO: first-fit decreasing, and packed rows that train
exactly as padded ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.worker.packing import first_fit_decreasing, pack, pack_step, packed_geometry

from .helpers import masking_check


def test_first_fit_decreasing_fills_rows_in_order_of_length() -> None:
    lengths = np.array([3, 9, 2, 7, 1, 5])
    bins = first_fit_decreasing(lengths, 10)
    assert bins == [[1, 4], [3, 0], [5, 2]]  # 9+1, 7+3, 5+2
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(lengths[b].sum() <= 10 for b in bins)
    # Longer than a row: cut to the row (as padded rows cut it), alone in its row.
    rows, seq = packed_geometry(np.array([30, 4, 4]), cap=16, multiple=8)
    assert rows == [[0], [1, 2]] and seq == 16
    rows, seq = packed_geometry(np.array([3, 2]), cap=16, multiple=8)
    assert rows == [[0, 1]] and seq == 8  # the row's fill, rounded up to the multiple


def test_pack_places_items_with_restarting_positions_and_a_block_diagonal_mask() -> None:
    layout = pack([[1, 2], [0]], np.array([2, 3, 1]), width=5)
    assert layout.row.tolist() == [1, 0, 0] and layout.start.tolist() == [0, 0, 3]
    assert layout.positions.tolist() == [[0, 1, 2, 0, 0], [0, 1, 0, 0, 0]]
    assert layout.segment.tolist() == [[1, 1, 1, 2, 3], [0, 0, 3, 3, 3]]  # 3: padding
    allowed = ~layout.attention_mask[:, 0].numpy()
    # Item 1 (three positions) attends causally within itself; item 2 sees only itself; padding itself alone.
    assert allowed[0].tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]
    assert allowed[1, 1].tolist() == [1, 1, 0, 0, 0] and allowed[1, 4].tolist() == [0, 0, 0, 0, 1]


def test_a_step_packed_across_micro_batches_weighs_every_sample_as_unpacked() -> None:
    """pack_step: each of a step's 48 samples in exactly one micro-batch within the budget, every rank the
    same number of micro-batches, fewer than unpacked, with equal work; and with any
    per-sample losses, the ranks' means over their micro-batches of the scaled sums, averaged over ranks (what
    the schedule and the gradient reduction compute), equal the unpacked step's mean of micro-batch means."""
    rng = np.random.default_rng(3)
    mbs, dp, budget = 4, 3, 4 * 16
    sizes = np.minimum(rng.integers(1, 6, 48) ** 2, 16)
    tokens = rng.integers(0, 5, 48).astype(float)  # per sample: its loss tokens (0: none, as for a filler)
    norms = tokens.reshape(-1, mbs).sum(1)
    step = pack_step(sizes, norms, mbs=mbs, dp=dp, budget=budget)
    placed = np.concatenate([m for mine in step.ranks for m in mine])
    assert sorted(placed.tolist()) == list(range(48))
    assert all(sizes[m].sum() <= budget for mine in step.ranks for m in mine)
    k = step.micro_batches
    assert all(len(mine) == k for mine in step.ranks) and k < 48 // (mbs * dp)
    loads = [int(sizes[m].sum()) for mine in step.ranks for m in mine]
    assert max(loads) - min(loads) <= sizes.max()  # the ranks' micro-batches get equal work
    # A step that fits one micro-batch still gives every rank its share.
    small = pack_step(np.full(8, 3), np.ones(2), mbs=4, dp=2, budget=64)
    assert [len(m) for mine in small.ranks for m in mine] == [4, 4]
    for _ in range(3):
        loss = rng.random(48) * tokens  # a sample's summed per-token loss
        unpacked = np.mean((loss.reshape(-1, mbs).sum(1)) / np.maximum(norms, 1))
        packed = np.mean([np.mean([(loss[m] * step.scale[m]).sum() for m in mine]) for mine in step.ranks])
        assert packed == pytest.approx(unpacked, rel=1e-12)


def test_packed_rows_give_the_padded_rows_loss_and_gradients(tmp_path: Path) -> None:
    """Eight conversations of skewed lengths in 5 packed rows instead of 8: loss and gradients equal the
    padded rows' to 1e-5 (float32 rounding), and without the block-diagonal mask they would not."""
    result = masking_check(tmp_path, "packing", port=29541)
    assert result["rows"][1] < result["rows"][0] and result["positions"][1] < result["positions"][0]
    assert result["tokens"][0] == result["tokens"][1] > 0
    assert result["loss"] < 1e-5 and result["grad"] < 1e-5
    assert result["crossing_loss"] > 1e-4 and result["crossing_grad"] > 1e-4


def test_packed_pairs_give_the_padded_pairs_reward_model_and_dpo_losses_and_gradients(tmp_path: Path) -> None:
    """Five ranked pairs and a filler pair (ten sequences of skewed lengths, each pair's two among them) in
    fewer packed rows: the reward model's and DPO's losses and gradients, and the reference's per-sequence
    log-probabilities (sums of ~30 tokens' log-probabilities: relatively, to 1e-6), equal the padded rows' to
    1e-5; without the block-diagonal mask they would not."""
    result = masking_check(tmp_path, "pairs", port=29543)
    assert result["rows"][1] < result["rows"][0] and result["positions"][1] < result["positions"][0]
    assert result["reference_relative"] < 1e-6
    for objective in ("reward_model", "dpo"):
        got = result[objective]
        assert got["loss"] < 1e-5 and got["grad"] < 1e-5, (objective, got)
        assert got["crossing_loss"] > 1e-4 and got["crossing_grad"] > 1e-4, (objective, got)


def test_pack_gives_thd_boundaries_with_each_rows_padding_as_a_sequence() -> None:
    layout = pack([[1, 2], [0]], np.array([2, 3, 1]), width=5, thd=True)
    assert layout.attention_mask is None
    # Row 0: item 1 (3) then item 2 (1), then one padding position; row 1: item 0 (2), then three of padding.
    assert layout.cu_seqlens is not None and layout.cu_seqlens.tolist() == [0, 3, 4, 5, 7, 10]
    fields = layout.attention()
    assert set(fields) == {"cu_seqlens", "max_seqlen"} and int(fields["max_seqlen"]) == 3
    full = pack([[0, 1]], np.array([2, 3]), width=5, thd=True)
    assert full.cu_seqlens is not None and full.cu_seqlens.tolist() == [0, 2, 5]  # a full row: no padding item


def test_thd_packed_rows_give_the_padded_rows_losses_and_gradients(tmp_path: Path) -> None:
    """What Transformer Engine's layers get for packed rows (the rows end to end as one sequence, its
    boundaries in Megatron-Core's PackedSeqParams, rotary positions restarting per sequence) checked on the
    CPU through a THD-capable core attention in plain PyTorch: SFT's and the reward model's losses and
    gradients equal the padded rows' to 1e-5, and with one boundary around everything they would not."""
    result = masking_check(tmp_path, "thd", port=29545)
    assert result["rows"][1] < result["rows"][0] and result["sequences"] > result["rows"][1]
    for objective in ("sft", "reward_model"):
        got = result[objective]
        assert got["loss"] < 1e-5 and got["grad"] < 1e-5, (objective, got)
        assert got["crossing_loss"] > 1e-4 and got["crossing_grad"] > 1e-4, (objective, got)
