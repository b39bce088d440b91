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
    """Eight conversations of skewed lengths in 5 packed rows instead of 8, through Megatron-Core's THD inputs
    (PackedSeqParams, rotary positions restarting per sequence) and the local spec's varlen attention: loss
    and gradients equal the padded rows' to 1e-5 (float32 rounding), and with one boundary around
    everything (attention across the conversations) they would not."""
    result = masking_check(tmp_path, "packing", port=29541)
    assert result["rows"][1] < result["rows"][0] and result["positions"][1] < result["positions"][0]
    assert result["tokens"][0] == result["tokens"][1] > 0
    assert result["loss"] < 1e-5 and result["grad"] < 1e-5
    assert result["crossing_loss"] > 1e-4 and result["crossing_grad"] > 1e-4


def test_packed_pairs_give_the_padded_pairs_reward_model_and_dpo_losses_and_gradients(tmp_path: Path) -> None:
    """Five ranked pairs and a filler pair (ten sequences of skewed lengths, each pair's two among them) in
    fewer packed rows: the reward model's and DPO's losses and gradients, and the reference's per-sequence
    log-probabilities (sums of ~30 tokens' log-probabilities: relatively, to 1e-6), equal the padded rows' to
    1e-5; with one boundary around everything they would not."""
    result = masking_check(tmp_path, "pairs", port=29543)
    assert result["rows"][1] < result["rows"][0] and result["positions"][1] < result["positions"][0]
    assert result["reference_relative"] < 1e-6
    for objective in ("reward_model", "dpo"):
        got = result[objective]
        assert got["loss"] < 1e-5 and got["grad"] < 1e-5, (objective, got)
        assert got["crossing_loss"] > 1e-4 and got["crossing_grad"] > 1e-4, (objective, got)


def test_pack_gives_restarting_positions_and_thd_boundaries_with_each_rows_padding_as_a_sequence() -> None:
    layout = pack([[1, 2], [0]], np.array([2, 3, 1]), width=5)
    assert layout.row.tolist() == [1, 0, 0] and layout.start.tolist() == [0, 0, 3]
    assert layout.positions.tolist() == [[0, 1, 2, 0, 0], [0, 1, 0, 0, 0]]
    assert layout.segment.tolist() == [[1, 1, 1, 2, 3], [0, 0, 3, 3, 3]]  # 3: padding
    # Row 0: item 1 (3) then item 2 (1), then one padding position; row 1: item 0 (2), then three of padding.
    assert layout.cu_seqlens.tolist() == [0, 3, 4, 5, 7, 10]
    fields = layout.attention()
    assert set(fields) == {"cu_seqlens", "max_seqlen"} and int(fields["max_seqlen"]) == 3
    full = pack([[0, 1]], np.array([2, 3]), width=5)
    assert full.cu_seqlens.tolist() == [0, 2, 5]  # a full row: no padding item


@pytest.mark.parametrize("layout", ["rows", "any"])
def test_varlen_attention_equals_each_sequence_attending_alone(layout: str) -> None:
    """engine.worker.attention: THD inputs of sequences of many lengths (groups of several lengths each, one
    position long, a group of one), with grouped-query heads, give each sequence's own causal attention to
    float rounding, forward and backward, and nothing of one sequence reaches another: laid out in rows as
    engine.worker.packing.pack lays them (the row path), and end to end with no rows (the grouped path)."""
    import torch

    from engine.worker.attention import GROUP, row_width, varlen_attention

    gen = torch.Generator().manual_seed(0)
    lengths = [5, 1, 37, 16, 17, 3, 64, 2, 33]
    if layout == "rows":  # rows of 64: each row's padding a sequence of its own
        layout_ = pack([[0, 1, 2, 3], [4, 5], [6], [7, 8]], np.array(lengths), width=64)
        cu = torch.from_numpy(layout_.cu_seqlens)
        assert row_width(cu) == 64
    else:
        lengths += [1100]  # longer than any row the row path takes
        cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
        assert row_width(cu) is None
    t, heads, groups, dim = int(cu[-1]), 4, 2, 8
    q, k, v = (torch.randn(t, h, dim, generator=gen, requires_grad=True) for h in (heads, groups, groups))
    out = varlen_attention(q, k, v, cu, scale=dim**-0.5)
    expected = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs, ks, vs = q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)
        ks, vs = ks.repeat_interleave(heads // groups, 0), vs.repeat_interleave(heads // groups, 0)
        scores = (qs @ ks.transpose(1, 2)) * dim**-0.5
        scores = scores.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        expected.append((scores.softmax(-1) @ vs).transpose(0, 1).reshape(b - a, heads * dim))
    reference = torch.cat(expected)
    assert out.shape == (t, heads * dim) and float((out - reference).abs().max()) < 1e-5
    weights = torch.randn(out.shape, generator=gen)
    mine = torch.autograd.grad((out * weights).sum(), (q, k, v), retain_graph=True)
    theirs = torch.autograd.grad((reference * weights).sum(), (q, k, v))
    assert max(float((a - b).abs().max()) for a, b in zip(mine, theirs, strict=True)) < 1e-5
    # The third sequence's outputs depend on its own positions only.
    a, b = int(cu[2]), int(cu[3])
    grad = torch.autograd.grad(out[a:b].sum(), q)[0]
    assert (
        float(grad[:a].abs().max()) == 0.0 and float(grad[b:].abs().max()) == 0.0 and float(grad[a:b].abs().max()) > 0
    )
    assert len({-(-n // GROUP) for n in lengths}) < len(lengths)  # some groups hold several lengths


def test_row_width_finds_the_rows_of_thd_boundaries_or_none() -> None:
    import torch

    from engine.worker.attention import row_width

    def width(bounds: list[int]) -> int | None:
        return row_width(torch.tensor(bounds, dtype=torch.int32))

    assert width([0, 3, 4, 5, 7, 10]) == 5  # pack()'s example: two rows of 5
    assert width([0, 2, 5]) == 5  # one full row
    assert width([0, 3, 8]) == 8  # two sequences end to end: one row of all of them
    assert width([0, 4, 8, 12, 16]) == 4  # rows as wide as their longest sequence
    assert width([0, 4, 6, 12]) == 6  # the longest sequence (6) bounds the width from below
    assert width([0, 3, 5, 8, 12]) == 12  # 4 and 6 divide 12, but no sequence ends at 4 or at 6
    assert width([0, 700, 1500]) is None  # no width from the longest (800) to the limit divides 1500
    assert width([0, 2000]) is None  # wider than the rows the row path takes
