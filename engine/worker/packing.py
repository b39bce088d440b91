"""Sequence packing: several sequences per row, and a step's samples spread over its micro-batches.

Rows: first-fit decreasing (the longest first, each into the first row it fits) into rows of at most
`seq_length` positions, each row only as long as its fill; `pack` lays the sequences out with position ids
restarting per sequence and what attention needs to keep each to itself: Megatron-Core's THD boundaries,
which Transformer Engine's attention reads on GPUs and engine.worker.attention on the local layer spec. Steps: `pack_step` spreads a training step's
samples over the fewest micro-batches per data-parallel rank that hold them within a token budget, and
weighs each sample's loss so that the step's loss and gradients are the unpacked step's. The chat stages'
batches (engine.worker.batches) and the RL updates (engine.worker.stages.ppo) use them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def step_length(longest: int, *, cap: int, multiple: int) -> int:
    return min(cap, math.ceil(max(longest, 1) / multiple) * multiple)


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins (lists of indices into `lengths`) of total length ≤ `capacity` each, by first-fit decreasing:
    the longest first, each into the first bin it fits. Deterministic (a stable sort, ties by index)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in np.argsort(-lengths, kind="stable"):
        n = int(lengths[i])
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(int(i))
                room[b] -= n
                break
        else:
            bins.append([int(i)])
            room.append(capacity - n)
    return bins


def packed_geometry(lengths: np.ndarray, *, cap: int, multiple: int) -> tuple[list[list[int]], int]:
    """(bins, row length) of one micro-batch's samples packed into rows of at most `cap` positions."""
    clipped = np.minimum(lengths, cap)
    bins = first_fit_decreasing(clipped, cap)
    fill = max((int(clipped[b].sum()) for b in bins), default=1)
    return bins, step_length(fill, cap=cap, multiple=multiple)


@dataclass(frozen=True)
class StepPacking:
    """How one packed training step's samples go to micro-batches: per data-parallel rank the same number of
    micro-batches, each a list of positions among the step's samples (an empty one, possible only with fewer
    samples than micro-batches, is a filler that weighs nothing), and per sample the factor its loss is
    multiplied by."""

    ranks: list[list[np.ndarray]]
    scale: np.ndarray

    @property
    def micro_batches(self) -> int:
        return len(self.ranks[0])


def pack_step(sizes: np.ndarray, norms: np.ndarray, *, mbs: int, dp: int, budget: int) -> StepPacking:
    """The step's samples (`sizes`: the positions each fills packed, at most `budget`) spread over the fewest
    micro-batches per rank, K, for which every one of the dp·K holds at most `budget` positions: longest first,
    each into the least filled (so the ranks get equal work); micro-batch b goes to rank b mod dp.

    The loss is unchanged: unpacked, the step's loss is the mean over its gbs/mbs micro-batches of
    consecutive `mbs` samples of each one's loss, normalised by `norms` (that micro-batch's loss tokens, or
    its pairs). A packed micro-batch's loss is instead the sum of its samples' unnormalised losses, each times
    `scale` = K / (gbs/(mbs·dp) · norm of the unpacked micro-batch it comes from): the schedule divides by K
    and the gradient reduction averages over ranks, which gives back the unpacked step's loss and gradients
    (and the reported loss, a mean over micro-batches and ranks)."""
    n = len(sizes)
    assert n % (mbs * dp) == 0 and len(norms) == n // mbs, (n, mbs, dp, len(norms))
    sizes = np.asarray(sizes, dtype=np.int64)
    order = np.argsort(-sizes, kind="stable")
    k = max(math.ceil(int(sizes.sum()) / (budget * dp)), 1)
    while True:
        load = np.zeros(dp * k, dtype=np.int64)
        bins: list[list[int]] = [[] for _ in range(dp * k)]
        for i in order:
            b = int(np.argmin(load))  # the least filled, the first of equals
            if load[b] + sizes[i] > budget:
                break
            bins[b].append(int(i))
            load[b] += sizes[i]
        else:
            break
        k += 1
    ranks = [[np.array(sorted(bins[b]), dtype=np.int64) for b in range(r, dp * k, dp)] for r in range(dp)]
    nmb = n // (mbs * dp)
    scale = k / (nmb * np.maximum(np.asarray(norms, dtype=np.float64), 1.0))[np.arange(n) // mbs]
    return StepPacking(ranks=ranks, scale=scale)


@dataclass(frozen=True)
class Packing:
    """Where packed items go: each item's row and first position, and per position its position id (restarting
    at 0 for each item) and its item (`items` for padding). Then what the attention needs to keep each item to
    itself, Megatron-Core's THD boundaries: the items in the rows laid end to end, each row's padding one more
    item of its own (Transformer Engine's fused attention reads them on GPUs, engine.worker.attention on the
    local layer spec)."""

    row: np.ndarray
    start: np.ndarray
    positions: np.ndarray
    segment: np.ndarray
    cu_seqlens: np.ndarray  # [items + padded rows + 1], int32

    def attention(self) -> dict[str, torch.Tensor]:
        """The batch fields that carry it: `cu_seqlens` and `max_seqlen` (engine.worker.objectives.run_model
        turns them into Megatron-Core's PackedSeqParams)."""
        cu = torch.from_numpy(self.cu_seqlens)
        return {"cu_seqlens": cu, "max_seqlen": (cu[1:] - cu[:-1]).max().to(torch.int32)}


def pack(bins: list[list[int]], lengths: np.ndarray, width: int) -> Packing:
    """The layout of items of `lengths` packed as `bins` says into rows of `width` positions (one empty row
    when there are no bins)."""
    items, rows = len(lengths), max(len(bins), 1)
    row, start = np.zeros(items, dtype=np.int64), np.zeros(items, dtype=np.int64)
    pos = np.zeros((rows, width), dtype=np.int64)
    segment = np.full((rows, width), items, dtype=np.int64)
    bounds = [0]
    for r in range(rows):
        at = 0
        for k in bins[r] if r < len(bins) else []:
            n = int(lengths[k])
            row[k], start[k] = r, at
            pos[r, at : at + n], segment[r, at : at + n] = np.arange(n), k
            at += n
            bounds.append(r * width + at)
        if at < width:  # the row's padding, as an item of its own
            bounds.append((r + 1) * width)
    return Packing(row=row, start=start, positions=pos, segment=segment, cu_seqlens=np.array(bounds, dtype=np.int32))
