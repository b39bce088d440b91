"""Chat-format training batches: the data stage's webdataset shards as rows of one shape per objective.

Every shard is checked against the sha256 in the data manifest, then its samples are held as flat
token arrays with offsets (about five bytes a token), read once at start-up.

Batches are addressed by sample index, like pretraining: step s covers the global samples
[consumed, consumed + global_batch) of a per-epoch order, and data-parallel rank r takes the
micro-batch slices r·mbs .. (r+1)·mbs of each mbs·dp block. A resumed run therefore reads exactly the
batches an uninterrupted one would have.

Mixture weights: when several sources of the data stage yield the stage's records, an epoch draws from
source i the share weight_i / Σ weight of its samples (the sources' `weight`, as pretraining's blend
uses them), upsampling a small source and downsampling a large one; `Mixture` says how (one source: a
plain permutation of its samples).

Length-bucketed padding (`batching: bucketed`): each epoch is a seeded permutation cut into windows of
16 global batches; a window is sorted by length, cut into global batches, and those are shuffled. A
step is padded only to its longest sample (rounded up to a multiple of 8 on GPUs, 16 with FP8, and
of what context and sequence parallelism need), never across conversations, so no attention mask
beyond the causal one is needed. `batching: padded` pads every step to the model's sequence length.
`batching: packed` (engine.worker.packing) spreads a step's samples over as few micro-batches of at most
micro_batch_size rows of the sequence length as hold them, several sequences to a row, each sample's loss
weighted as its unpacked micro-batch weighs it. The fraction of padded positions is logged every step as
`pad_fraction`.

`ChatBatches` does all of that for any row shape; a shape says which records it reads, how many rows a
sample becomes, and how a micro-batch's rows are laid out:

* `SequenceRows` (SFT): inputs are tokens[:-1], labels tokens[1:], and the loss mask is the chat
  template's assistant mask shifted the same way;
* `PairRows` (the reward model, preference optimisation): a micro-batch of m pairs is 2·m rows, the
  chosen sequences (prompt + chosen) first, then the rejected ones, each with its labels, a per-token
  mask over its response tokens (in label space: the positions whose next token is the response's),
  and the index of its last real token; `weight` is 0 for filler pairs.

Sequences longer than the model's are cut at its sequence length (counted at start-up).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..artifacts import read_manifest
from ..compile import Job, Plan
from ..errors import EngineError
from ..schema import RecordKind, Training
from ..schema.stages import Batching
from .packing import pack, pack_step, packed_geometry, step_length

WINDOW = 16  # global batches per length-sorting window
Batch = dict[str, torch.Tensor]
MakeIter = Callable[[], Iterator[Batch]]


@dataclass(frozen=True)
class Ragged:
    """Variable-length integer sequences, concatenated."""

    flat: np.ndarray
    offsets: np.ndarray  # len + 1

    @classmethod
    def of(cls, seqs: list[list[int]], dtype: Any = np.int32) -> Ragged:
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in seqs], out=offsets[1:])
        flat = np.fromiter((t for s in seqs for t in s), dtype=dtype, count=int(offsets[-1]))
        return cls(flat, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def read_shards(plan: Plan, *, stage: str, data: str, records: str, split: str) -> list[dict[str, Any]]:
    """All samples of one record kind and split, from every source of the data stage `data` that the stage
    `stage` reads."""
    return [s for samples in read_sources(plan, stage=stage, data=data, records=records, split=split).values()
            for s in samples]  # fmt: skip


def read_sources(plan: Plan, *, stage: str, data: str, records: str, split: str) -> dict[str, list[dict[str, Any]]]:
    """The samples of one record kind and split, by source (in the manifest's order)."""
    root = plan.dataset(data)
    manifest = read_manifest(root)
    names = [name for name, src in manifest["sources"].items() if src["records"] == records]
    if not names:
        raise EngineError(
            f"stage {stage!r} trains on {records} records, but data stage {data!r} has no "
            f"source with records: {records}; add one to stages.{data}.sources"
        )
    out: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        out[name] = []
        for shard in manifest["sources"][name]["splits"].get(split, {}).get("shards", []):
            out[name] += _shard_samples(root / name / split / shard["path"], shard["sha256"])
    return out


def source_weights(plan: Plan, data: str, names: list[str]) -> list[float]:
    """The mixture weight of each named source of the data stage `data`, as its manifest recorded it."""
    manifest = read_manifest(plan.dataset(data))
    return [float(manifest["sources"][n].get("weight", 1.0)) for n in names]


@dataclass(frozen=True)
class Mixture:
    """How one epoch of `sum(sizes)` samples draws from sources concatenated in this order: source i gives
    counts()[i] of them (its share weight_i / Σ weight, by largest remainder), cycling through seeded
    permutations of its own samples when it gives more than it has."""

    sizes: tuple[int, ...]
    weights: tuple[float, ...]

    @classmethod
    def of(cls, sizes: list[int], weights: list[float]) -> Mixture:
        # A source with no samples cannot give any: its weight goes to the others.
        return cls(tuple(sizes), tuple(w if n > 0 else 0.0 for n, w in zip(sizes, weights, strict=True)))

    def shares(self) -> list[float]:
        total = sum(self.weights) or 1.0
        return [w / total for w in self.weights]

    def counts(self) -> list[int]:
        n = sum(self.sizes)
        exact = [share * n for share in self.shares()]
        counts = [math.floor(x) for x in exact]
        for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[: n - sum(counts)]:
            counts[i] += 1
        return counts

    def permutation(self, rng: np.random.Generator) -> np.ndarray:
        """One epoch's sample indices into the concatenated sources, shuffled."""
        if len(self.sizes) == 1:
            return rng.permutation(self.sizes[0])
        parts, offset = [], 0
        for size, count in zip(self.sizes, self.counts(), strict=True):
            if count:
                cycles = [rng.permutation(size) for _ in range(math.ceil(count / size))]
                parts.append(np.concatenate(cycles)[:count] + offset)
            offset += size
        drawn = np.concatenate(parts)
        return drawn[rng.permutation(len(drawn))]


def _shard_samples(path: Path, sha256: str) -> list[dict[str, Any]]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise EngineError(f"cannot read shard {path}: {exc}; rerun the data stage") from None
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise EngineError(f"shard {path} does not match its sha256 in the manifest; rerun the data stage")
    samples = []
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        for member in tar:
            if member.name.endswith(".json"):
                f = tar.extractfile(member)
                assert f is not None
                samples.append(json.loads(f.read()))
    return samples


def pad_multiple(job: Job) -> int:
    """Sequence lengths must split into 2·cp chunks and, with sequence parallelism, over TP ranks; on
    GPUs they are multiples of 8 for tensor cores (16 for FP8 GEMMs); on CPU nothing more."""
    lay, prec = job.layout, job.precision
    assert lay is not None and prec is not None
    base = 1 if job.resources.device == "cpu" else 16 if prec.dtype == "fp8" else 8
    return math.lcm(base, 2 * lay.cp if lay.cp > 1 else 1, lay.tp if lay.sequence_parallel else 1)


def positions(rows: int, seq: int) -> torch.Tensor:
    """Position ids 0..seq−1 for each of `rows` rows."""
    return torch.arange(seq, dtype=torch.int64).unsqueeze(0).expand(rows, seq).contiguous()


@dataclass
class Order:
    """The per-epoch sample order, length-grouped when bucketed; deterministic in (seed, epoch)."""

    lengths: np.ndarray
    gbs: int
    seed: int
    bucketed: bool
    mixture: Mixture | None = None  # None: one source, every sample once per epoch
    _cache: dict[int, np.ndarray] = field(default_factory=dict)

    def epoch(self, e: int) -> np.ndarray:
        if e not in self._cache:
            self._cache = {e: self._build(e)}  # steps walk forward: keep one epoch
        return self._cache[e]

    def _build(self, e: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, e])
        perm = self.mixture.permutation(rng) if self.mixture is not None else rng.permutation(len(self.lengths))
        if not self.bucketed:
            return perm
        window = self.gbs * WINDOW
        parts = []
        for w in range(0, len(perm), window):
            chunk = perm[w : w + window]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches = [chunk[i : i + self.gbs] for i in range(0, len(chunk), self.gbs)]
            parts += [batches[b] for b in rng.permutation(len(batches))]
        return np.concatenate(parts)

    def samples(self, start: int, count: int) -> np.ndarray:
        n = len(self.lengths)
        return np.array([self.epoch(g // n)[g % n] for g in range(start, start + count)], dtype=np.int64)


Samples = dict[str, Any]  # "n", "lengths" (the length a sample is padded for) and the shape's token arrays


class RowShape(Protocol):
    """How samples of one record kind become the rows of a micro-batch."""

    @property
    def records(self) -> RecordKind:
        """The record kind it reads from the data stage."""

    @property
    def rows_per_sample(self) -> int: ...

    @property
    def noun(self) -> str:
        """What a sample is called in the start-up line."""

    def load(self, rows: list[dict[str, Any]]) -> Samples: ...

    def real_tokens(self, ds: Samples, idx: np.ndarray, seq: int) -> int: ...

    def rows(self, ds: Samples, idx: np.ndarray, seq: int) -> Batch: ...

    def geometry(self, ds: Samples, idx: np.ndarray, *, cap: int, multiple: int) -> tuple[list[list[int]], int]: ...

    def sizes(self, ds: Samples, idx: np.ndarray, cap: int) -> np.ndarray:
        """The positions each sample fills in packed rows."""

    def norm(self, ds: Samples, idx: np.ndarray, cap: int) -> float:
        """What an unpacked micro-batch of these samples divides its loss by."""

    def packed(
        self, ds: Samples, idx: np.ndarray, *, cap: int, multiple: int, scale: np.ndarray | None = None
    ) -> Batch: ...


@dataclass(frozen=True)
class SequenceRows:
    """One row per conversation: tokens, next-token labels and the assistant-token loss mask."""

    pad: int
    records: RecordKind = "conversation"
    rows_per_sample: int = 1
    noun: str = "conversations"

    def load(self, rows: list[dict[str, Any]]) -> Samples:
        tokens, mask = Ragged.of([r["tokens"] for r in rows]), Ragged.of([r["loss_mask"] for r in rows], np.uint8)
        return {"n": len(rows), "tokens": tokens, "mask": mask, "lengths": tokens.lengths - 1}

    def real_tokens(self, ds: Samples, idx: np.ndarray, seq: int) -> int:
        return int(np.minimum(ds["lengths"][idx], seq).sum())

    def rows(self, ds: Samples, idx: np.ndarray, seq: int) -> Batch:
        tokens = np.full((len(idx), seq), self.pad, dtype=np.int64)
        labels = np.full((len(idx), seq), self.pad, dtype=np.int64)
        mask = np.zeros((len(idx), seq), dtype=np.float32)
        for r, i in enumerate(idx):
            if i < 0:
                continue
            t, m = ds["tokens"][i], ds["mask"][i]
            n = min(len(t) - 1, seq)
            tokens[r, :n], labels[r, :n], mask[r, :n] = t[:n], t[1 : n + 1], m[1 : n + 1]
        return {
            "tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(mask), "position_ids": positions(len(idx), seq),
        }  # fmt: skip

    def geometry(self, ds: Samples, idx: np.ndarray, *, cap: int, multiple: int) -> tuple[list[list[int]], int]:
        """(bins of positions in `idx`'s real samples, row length) of `packed`."""
        return packed_geometry(ds["lengths"][idx[idx >= 0]], cap=cap, multiple=multiple)

    def sizes(self, ds: Samples, idx: np.ndarray, cap: int) -> np.ndarray:
        sizes: np.ndarray = np.minimum(ds["lengths"][idx], cap)
        return sizes

    def norm(self, ds: Samples, idx: np.ndarray, cap: int) -> float:
        """The loss tokens (assistant tokens in label space) of the conversations, as `rows` cuts them."""
        return float(sum(int(ds["mask"][int(i)][1 : min(len(ds["tokens"][int(i)]) - 1, cap) + 1].sum())
                         for i in idx if i >= 0))  # fmt: skip

    def packed(
        self, ds: Samples, idx: np.ndarray, *, cap: int, multiple: int, scale: np.ndarray | None = None
    ) -> Batch:
        """The same conversations packed several to a row: the tokens, labels and loss mask of each placed
        one after another, position ids restarting at 0 for each, and THD boundaries (Packing) so that no
        position attends across a conversation's boundary. Every position of a conversation sees exactly what
        it sees in its own row, so the loss and its gradients are the unpacked rows'. Filler indices (−1) are
        left out.
        `scale` (one per entry of `idx`): the loss becomes the sum of per-token losses times `loss_scale`,
        the loss mask times its conversation's scale (a step packed across micro-batches: pack_step)."""
        real = idx[idx >= 0]
        bins, seq = self.geometry(ds, idx, cap=cap, multiple=multiple)
        lengths = np.array([min(len(ds["tokens"][int(i)]) - 1, cap) for i in real], dtype=np.int64)
        layout = pack(bins, lengths, seq)
        rows = layout.positions.shape[0]
        tokens = np.full((rows, seq), self.pad, dtype=np.int64)
        labels = np.full((rows, seq), self.pad, dtype=np.int64)
        mask = np.zeros((rows, seq), dtype=np.float32)
        weights = None if scale is None else np.zeros((rows, seq), dtype=np.float32)
        factor = None if scale is None else np.asarray(scale)[idx >= 0]
        for j, i in enumerate(real):
            t, m = ds["tokens"][int(i)], ds["mask"][int(i)]
            r, at, n = layout.row[j], layout.start[j], lengths[j]
            tokens[r, at : at + n], labels[r, at : at + n], mask[r, at : at + n] = t[:n], t[1 : n + 1], m[1 : n + 1]
            if weights is not None and factor is not None:
                weights[r, at : at + n] = m[1 : n + 1] * factor[j]
        extra = {} if weights is None else {"loss_scale": torch.from_numpy(weights)}
        return {
            "tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(mask), "position_ids": torch.from_numpy(layout.positions),
            **layout.attention(), **extra,
        }  # fmt: skip


@dataclass(frozen=True)
class PairRows:
    """Two rows per ranked pair, chosen first: prompt + response, labels, response-token mask, last index.

    The mask covers the reply up to and including its first `stop` token, the tokens a policy generates
    (what follows, such as an end-of-sequence token after the end of turn, is read by the reward model at
    `last` but never sampled); with no `stop` ids it covers the whole reply."""

    pad: int
    stop: tuple[int, ...] = ()
    records: RecordKind = "preference"
    rows_per_sample: int = 2
    noun: str = "pairs"

    def load(self, rows: list[dict[str, Any]]) -> Samples:
        prompt = Ragged.of([r["prompt"] for r in rows])
        chosen, rejected = Ragged.of([r["chosen"] for r in rows]), Ragged.of([r["rejected"] for r in rows])
        lengths = prompt.lengths + np.maximum(chosen.lengths, rejected.lengths)
        return {"n": len(rows), "prompt": prompt, "chosen": chosen, "rejected": rejected, "lengths": lengths}

    def real_tokens(self, ds: Samples, idx: np.ndarray, seq: int) -> int:
        p = ds["prompt"].lengths[idx]  # each row of a pair has its own length
        return int(sum(np.minimum(p + ds[k].lengths[idx], seq).sum() for k in ("chosen", "rejected")))

    def _sequences(self, ds: Samples, idx: np.ndarray, cap: int) -> list[tuple[np.ndarray, int, int]]:
        """Each pair's chosen sequences, then its rejected ones: (tokens cut at `cap`, first masked position,
        end of the mask). A filler pair (−1) repeats sample 0 (with weight 0)."""
        out = []
        for key in ("chosen", "rejected"):
            for i in idx:
                i = max(int(i), 0)
                prompt, reply = ds["prompt"][i], ds[key][i]
                row = np.concatenate([prompt, reply])[:cap]
                n = len(row)
                ends = np.flatnonzero(np.isin(reply, self.stop))
                generated = min(len(prompt) + (int(ends[0]) + 1 if len(ends) else len(reply)), n)
                # The positions whose next token is generated.
                out.append((row, max(min(len(prompt), n) - 1, 0), generated - 1))
        return out

    def rows(self, ds: Samples, idx: np.ndarray, seq: int) -> Batch:
        m = len(idx)
        tokens = np.full((2 * m, seq), self.pad, dtype=np.int64)
        labels = np.full((2 * m, seq), self.pad, dtype=np.int64)
        mask = np.zeros((2 * m, seq), dtype=np.float32)
        last = np.zeros(2 * m, dtype=np.int64)
        weight = (idx >= 0).astype(np.float32)
        for k, (row, start, end) in enumerate(self._sequences(ds, idx, seq)):
            n = len(row)
            tokens[k, :n], labels[k, : n - 1] = row, row[1:]
            mask[k, start:end] = 1.0
            last[k] = n - 1
        return {
            "tokens": torch.from_numpy(tokens), "position_ids": positions(2 * m, seq),
            "labels": torch.from_numpy(labels), "loss_mask": torch.from_numpy(mask),
            "last": torch.from_numpy(last), "weight": torch.from_numpy(weight),
        }  # fmt: skip

    def _lengths(self, ds: Samples, idx: np.ndarray) -> np.ndarray:
        i = np.maximum(idx, 0)
        p = ds["prompt"].lengths[i]
        return np.concatenate([p + ds["chosen"].lengths[i], p + ds["rejected"].lengths[i]])

    def geometry(self, ds: Samples, idx: np.ndarray, *, cap: int, multiple: int) -> tuple[list[list[int]], int]:
        """(bins of sequence numbers — chosen 0..m−1, rejected m..2m−1 — and row length) of `packed`."""
        return packed_geometry(self._lengths(ds, idx), cap=cap, multiple=multiple)

    def sizes(self, ds: Samples, idx: np.ndarray, cap: int) -> np.ndarray:
        p = ds["prompt"].lengths[idx]
        sizes: np.ndarray = np.minimum(p + ds["chosen"].lengths[idx], cap) + np.minimum(
            p + ds["rejected"].lengths[idx], cap
        )
        return sizes

    def norm(self, ds: Samples, idx: np.ndarray, cap: int) -> float:
        """The real pairs (an unpacked micro-batch's loss is their mean)."""
        return float((idx >= 0).sum())

    def packed(
        self, ds: Samples, idx: np.ndarray, *, cap: int, multiple: int, scale: np.ndarray | None = None
    ) -> Batch:
        """The pairs' 2m sequences packed several to a row, as SequenceRows.packed packs conversations
        (position ids restarting, THD boundaries). Each sequence k keeps its place in the pair
        order through `row` (its packed row) and `last` (its last position there); `segment` gives the
        sequence of every position (2m for padding), so that per-sequence sums (DPO's log-probabilities)
        and reads (the reward model's score) are those of the unpacked rows. `scale` (one per pair): the
        loss becomes the sum of the pairs' losses times it (pack_step; 0 for fillers)."""
        sequences = self._sequences(ds, idx, cap)
        bins, seq = self.geometry(ds, idx, cap=cap, multiple=multiple)
        lengths = np.array([len(row) for row, _, _ in sequences], dtype=np.int64)
        layout = pack(bins, lengths, seq)
        rows = layout.positions.shape[0]
        tokens = np.full((rows, seq), self.pad, dtype=np.int64)
        labels = np.full((rows, seq), self.pad, dtype=np.int64)
        mask = np.zeros((rows, seq), dtype=np.float32)
        for k, (row, start, end) in enumerate(sequences):
            r, at, n = layout.row[k], layout.start[k], len(row)
            tokens[r, at : at + n], labels[r, at : at + n - 1] = row, row[1:]
            mask[r, at + start : at + end] = 1.0
        return {
            "tokens": torch.from_numpy(tokens), "position_ids": torch.from_numpy(layout.positions),
            "labels": torch.from_numpy(labels), "loss_mask": torch.from_numpy(mask),
            **layout.attention(), "segment": torch.from_numpy(layout.segment),
            "row": torch.from_numpy(layout.row), "last": torch.from_numpy(layout.start + lengths - 1),
            "weight": torch.from_numpy((idx >= 0).astype(np.float32)),
            **({} if scale is None else {"scale": torch.from_numpy(np.where(idx >= 0, scale, 0.0).astype(np.float32))}),
        }  # fmt: skip


class ChatBatches:
    """Training and validation batches of one chat stage's job, in the rows of `shape`."""

    def __init__(
        self, plan: Plan, job: Job, *, data: str, training: Training, batching: Batching, shape: RowShape
    ) -> None:
        assert job.layout is not None
        self.shape, self.data = shape, data
        self.gbs, self.mbs, self.dp = training.global_batch_size, training.micro_batch_size, job.layout.dp
        self.cap, self.multiple = plan.model.seq_length, pad_multiple(job)
        self.bucketed, self.packed = batching == "bucketed", batching == "packed"
        by_source = read_sources(plan, stage=job.name, data=data, records=shape.records, split="train")
        self.train_set = shape.load([s for samples in by_source.values() for s in samples])
        self.valid_set = shape.load(read_shards(plan, stage=job.name, data=data, records=shape.records, split="valid"))
        if self.train_set["n"] == 0:
            raise EngineError(f"data stage {data!r} has no {shape.records} samples in its train split")
        names = list(by_source)
        self.mixture = Mixture.of([len(v) for v in by_source.values()], source_weights(plan, data, names))
        self.sources = names
        self.order = Order(self.train_set["lengths"], self.gbs, training.seed, self.bucketed,
                           self.mixture if len(names) > 1 else None)  # fmt: skip
        self.eval_samples = min(self.valid_set["n"], training.eval_iters * self.gbs)

    def describe(self) -> str:
        tr = self.train_set
        cut = int((tr["lengths"] > self.cap).sum())
        mix = "" if len(self.sources) == 1 else "; mixture per epoch: " + ", ".join(
            f"{n} {share:.2f} ({count})" for n, share, count in
            zip(self.sources, self.mixture.shares(), self.mixture.counts(), strict=True))  # fmt: skip
        return (f"{tr['n']} training {self.shape.noun} ({self.valid_set['n']} held out), mean length "
                f"{tr['lengths'].mean():.1f} tokens, {cut} cut at {self.cap}; "
                f"batching: {self._batching_words()}{mix}")  # fmt: skip

    def _batching_words(self) -> str:
        if self.packed:
            per = self.mbs * self.shape.rows_per_sample
            return (
                f"packed (first-fit decreasing across each step into micro-batches of at most {per} rows of "
                f"{self.cap}" + (", a pair's two sequences in one micro-batch)" if per > self.mbs else ")")
            )
        return "length-bucketed" if self.bucketed else "padded to seq_length"

    def _length_of(self, dataset: Samples, idx: np.ndarray) -> int:
        real = idx[idx >= 0]
        if not self.bucketed or len(real) == 0:
            return self.cap
        return step_length(int(dataset["lengths"][real].max()), cap=self.cap, multiple=self.multiple)

    def _make(self, dataset: Samples, idx: np.ndarray, seq: int, dp_rank: int) -> MakeIter:
        """Micro-batches of this data-parallel rank from one global batch of sample indices."""
        block = self.mbs * self.dp

        def make() -> Iterator[Batch]:
            for m in range(len(idx) // block):
                first = m * block + dp_rank * self.mbs
                chunk = idx[first : first + self.mbs]
                if self.packed:
                    yield self.shape.packed(dataset, chunk, cap=self.cap, multiple=self.multiple)
                else:
                    yield self.shape.rows(dataset, chunk, seq)

        return make

    def step_batches(self, dp_rank: int) -> Callable[[int], tuple[MakeIter, int, dict[str, float]]]:
        """What the training loop asks for: consumed samples → (micro-batches of this rank, sequence length,
        values to log: the padded fraction, the step's sequence length, the real tokens of all ranks and the
        positions computed)."""

        def batches(consumed: int) -> tuple[MakeIter, int, dict[str, float]]:
            idx = self.order.samples(consumed, self.gbs)
            seq = self._length_of(self.train_set, idx)
            real = self.shape.real_tokens(self.train_set, idx, seq)
            if self.packed:
                return self._packed_step(idx, dp_rank, real)
            computed = seq * self.gbs * self.shape.rows_per_sample
            return self._make(self.train_set, idx, seq, dp_rank), seq, {
                "pad_fraction": 1.0 - real / computed, "seq_length": float(seq), "real_tokens": float(real),
                "computed_tokens": float(computed)}  # fmt: skip

        return batches

    def _packed_step(self, idx: np.ndarray, dp_rank: int, real: int) -> tuple[MakeIter, int, dict[str, float]]:
        """A packed training step: the global batch's samples packed across its micro-batches into micro-batches
        of at most micro_batch_size rows of seq_length (pack_step), as many per rank as the busiest needs."""
        ds, shape = self.train_set, self.shape
        norms = np.array([shape.norm(ds, idx[i : i + self.mbs], self.cap) for i in range(0, len(idx), self.mbs)])
        budget = self.mbs * shape.rows_per_sample * self.cap
        step = pack_step(shape.sizes(ds, idx, self.cap), norms, mbs=self.mbs, dp=self.dp, budget=budget)

        def chosen(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            if len(positions) == 0:  # a filler: one sample left out (−1), weighing nothing
                return np.array([-1], dtype=np.int64), np.zeros(1)
            return idx[positions], step.scale[positions]

        computed = 0
        for mine in step.ranks:
            for positions in mine:
                bins, width = shape.geometry(ds, chosen(positions)[0], cap=self.cap, multiple=self.multiple)
                computed += max(len(bins), 1) * width

        def make() -> Iterator[Batch]:
            for positions in step.ranks[dp_rank]:
                samples, scale = chosen(positions)
                yield shape.packed(ds, samples, cap=self.cap, multiple=self.multiple, scale=scale)

        return make, self.cap, {
            "pad_fraction": 1.0 - real / computed, "seq_length": float(self.cap), "real_tokens": float(real),
            "computed_tokens": float(computed), "micro_batches": float(step.micro_batches)}  # fmt: skip

    def valid_batches(self, dp_rank: int) -> list[tuple[MakeIter, int, int]]:
        """The held-out samples (at most eval_iters global batches), in global batches sorted by length;
        the last one is filled with index −1, which weighs nothing."""
        n = self.eval_samples
        if n == 0:
            return []
        chosen = np.random.default_rng(0).permutation(self.valid_set["n"])[:n]
        chosen = chosen[np.argsort(self.valid_set["lengths"][chosen], kind="stable")]
        steps = math.ceil(n / self.gbs)
        idx = np.full(steps * self.gbs, -1, dtype=np.int64)
        idx[:n] = chosen
        out = []
        for s in range(steps):
            batch = idx[s * self.gbs : (s + 1) * self.gbs]
            seq = self._length_of(self.valid_set, batch)
            out.append((self._make(self.valid_set, batch, seq, dp_rank), seq, self.gbs // (self.mbs * self.dp)))
        return out
