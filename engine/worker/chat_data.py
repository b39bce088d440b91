"""Chat-format training data: the data stage's webdataset shards as SFT sequences and preference pairs.

Every shard is checked against the sha256 in the data manifest, then its samples are held as flat
token arrays with offsets (about five bytes a token), read once at start-up.

Batches are addressed by sample index, like pretraining: step s covers the global samples
[consumed, consumed + global_batch) of a per-epoch order, and data-parallel rank r takes the
micro-batch slices r·mbs .. (r+1)·mbs of each mbs·dp block. A resumed run therefore reads exactly the
batches an uninterrupted one would have.

Length-bucketed padding (`batching: bucketed`): each epoch is a seeded permutation cut into windows of
16 global batches; a window is sorted by length, cut into global batches, and those are shuffled. A
step is padded only to its longest sample (rounded up to a multiple of 8 on GPUs, 16 with FP8, and
of what context and sequence parallelism need), never across conversations, so no attention mask
beyond the causal one is needed. `batching: padded` pads every step to the model's sequence length. The fraction of padded
positions is logged every step as `pad_fraction`.

SFT rows: inputs are tokens[:-1], labels tokens[1:], and the loss mask is the chat template's
assistant mask shifted the same way. Reward-model rows: a micro-batch of m pairs is 2·m rows, the
chosen sequences (prompt + chosen) first, then the rejected ones, with the index of each row's last
real token. Sequences longer than the model's are cut at its sequence length (counted at start-up).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..compile import Job, Plan
from ..errors import EngineError
from .data import dataset_dir, read_manifest

WINDOW = 16  # global batches per length-sorting window
Batch = dict[str, torch.Tensor]


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


def read_shards(plan: Plan, job: Job, records: str, split: str, key: str = "data") -> list[dict[str, Any]]:
    """All samples of one record kind and split, from every source of the data stage `job.config[key]`."""
    root = dataset_dir(plan, job, key)
    manifest = read_manifest(root)
    samples: list[dict[str, Any]] = []
    names = [name for name, src in manifest["sources"].items() if src["records"] == records]
    if not names:
        raise EngineError(
            f"stage {job.name!r} trains on {records} records, but data stage {job.config[key]!r} has no "
            f"source with records: {records}; add one to stages.{job.config[key]}.sources"
        )
    for name in names:
        for shard in manifest["sources"][name]["splits"].get(split, {}).get("shards", []):
            path = root / name / split / shard["path"]
            try:
                raw = path.read_bytes()
            except OSError as exc:
                raise EngineError(f"cannot read shard {path}: {exc}; rerun the data stage") from None
            if hashlib.sha256(raw).hexdigest() != shard["sha256"]:
                raise EngineError(f"shard {path} does not match its sha256 in the manifest; rerun the data stage")
            with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                for member in tar:
                    if member.name.endswith(".json"):
                        f = tar.extractfile(member)
                        assert f is not None
                        samples.append(json.loads(f.read()))
    return samples


def step_length(longest: int, *, cap: int, multiple: int) -> int:
    return min(cap, math.ceil(max(longest, 1) / multiple) * multiple)


def pad_multiple(job: Job) -> int:
    """Sequence lengths must split into 2·cp chunks and, with sequence parallelism, over TP ranks; on
    GPUs they are multiples of 8 for tensor cores (16 for FP8 GEMMs); on CPU nothing more."""
    lay, prec = job.layout, job.precision
    assert lay is not None and prec is not None
    base = 1 if job.resources.device == "cpu" else 16 if prec.dtype == "fp8" else 8
    return math.lcm(base, 2 * lay.cp if lay.cp > 1 else 1, lay.tp if lay.sequence_parallel else 1)


@dataclass
class Order:
    """The per-epoch sample order, length-grouped when bucketed; deterministic in (seed, epoch)."""

    lengths: np.ndarray
    gbs: int
    seed: int
    bucketed: bool
    _cache: dict[int, np.ndarray] = field(default_factory=dict)

    def epoch(self, e: int) -> np.ndarray:
        if e not in self._cache:
            self._cache = {e: self._build(e)}  # steps walk forward: keep one epoch
        return self._cache[e]

    def _build(self, e: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, e])
        perm = rng.permutation(len(self.lengths))
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


class ChatData:
    """Training and validation batches of one SFT or reward-model job."""

    def __init__(self, plan: Plan, job: Job, *, pairs: bool, pad: int) -> None:
        assert job.layout is not None
        t = job.config["training"]
        self.pairs, self.pad = pairs, pad
        self.gbs, self.mbs, self.dp = int(t["global_batch_size"]), int(t["micro_batch_size"]), job.layout.dp
        self.cap, self.multiple = plan.model.seq_length, pad_multiple(job)
        self.bucketed = job.config.get("batching", "bucketed") == "bucketed"
        records = "preference" if pairs else "conversation"
        self.train_set = self._load(plan, job, records, "train")
        self.valid_set = self._load(plan, job, records, "valid")
        if self.train_set["n"] == 0:
            raise EngineError(f"data stage {job.config['data']!r} has no {records} samples in its train split")
        self.order = Order(self.train_set["lengths"], self.gbs, int(t["seed"]), self.bucketed)
        self.eval_samples = min(self.valid_set["n"], int(t["eval_iters"]) * self.gbs)

    def _load(self, plan: Plan, job: Job, records: str, split: str) -> dict[str, Any]:
        rows = read_shards(plan, job, records, split)
        if self.pairs:
            prompt = Ragged.of([r["prompt"] for r in rows])
            chosen, rejected = Ragged.of([r["chosen"] for r in rows]), Ragged.of([r["rejected"] for r in rows])
            lengths = prompt.lengths + np.maximum(chosen.lengths, rejected.lengths)
            return {"n": len(rows), "prompt": prompt, "chosen": chosen, "rejected": rejected, "lengths": lengths}
        tokens, mask = Ragged.of([r["tokens"] for r in rows]), Ragged.of([r["loss_mask"] for r in rows], np.uint8)
        return {"n": len(rows), "tokens": tokens, "mask": mask, "lengths": tokens.lengths - 1}

    def describe(self) -> str:
        tr = self.train_set
        cut = int((tr["lengths"] > self.cap).sum())
        what = "pairs" if self.pairs else "conversations"
        return (f"{tr['n']} training {what} ({self.valid_set['n']} held out), mean length "
                f"{tr['lengths'].mean():.1f} tokens, {cut} cut at {self.cap}; "
                f"batching: {'length-bucketed' if self.bucketed else 'padded to seq_length'}")  # fmt: skip

    @property
    def rows_per_sample(self) -> int:
        return 2 if self.pairs else 1

    # -- batches -----------------------------------------------------------------------------------

    def _length_of(self, dataset: dict[str, Any], idx: np.ndarray) -> int:
        real = idx[idx >= 0]
        if not self.bucketed or len(real) == 0:
            return self.cap
        return step_length(int(dataset["lengths"][real].max()), cap=self.cap, multiple=self.multiple)

    def _make(self, dataset: dict[str, Any], idx: np.ndarray, seq: int, dp_rank: int) -> Callable[[], Iterator[Batch]]:
        """Micro-batches of this data-parallel rank from one global batch of sample indices."""
        block = self.mbs * self.dp

        def make() -> Iterator[Batch]:
            for m in range(len(idx) // block):
                first = m * block + dp_rank * self.mbs
                rows = idx[first : first + self.mbs]
                yield self._pair_rows(dataset, rows, seq) if self.pairs else self._sft_rows(dataset, rows, seq)

        return make

    def train_batches(self, consumed: int, dp_rank: int) -> tuple[Callable[[], Iterator[Batch]], int, float]:
        """(micro-batch factory, sequence length, padded fraction) of the step starting at `consumed`."""
        idx = self.order.samples(consumed, self.gbs)
        seq = self._length_of(self.train_set, idx)
        if self.pairs:  # each row of a pair has its own length
            p = self.train_set["prompt"].lengths[idx]
            real = sum(np.minimum(p + self.train_set[k].lengths[idx], seq).sum() for k in ("chosen", "rejected"))
        else:
            real = np.minimum(self.train_set["lengths"][idx], seq).sum()
        waste = 1.0 - float(real) / (seq * len(idx) * self.rows_per_sample)
        return self._make(self.train_set, idx, seq, dp_rank), seq, waste

    def step_batches(
        self, dp_rank: int
    ) -> Callable[[int], tuple[Callable[[], Iterator[Batch]], int, dict[str, float]]]:
        """What the training loop asks for: consumed samples → (micro-batches, sequence length, values
        to log: the padded fraction and the step's sequence length)."""

        def batches(consumed: int) -> tuple[Callable[[], Iterator[Batch]], int, dict[str, float]]:
            make, seq, waste = self.train_batches(consumed, dp_rank)
            return make, seq, {"pad_fraction": waste, "seq_length": float(seq)}

        return batches

    def valid_batches(self, dp_rank: int) -> list[tuple[Callable[[], Iterator[Batch]], int, int]]:
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

    def _sft_rows(self, ds: dict[str, Any], rows: np.ndarray, seq: int) -> Batch:
        tokens = np.full((len(rows), seq), self.pad, dtype=np.int64)
        labels = np.full((len(rows), seq), self.pad, dtype=np.int64)
        mask = np.zeros((len(rows), seq), dtype=np.float32)
        for r, i in enumerate(rows):
            if i < 0:
                continue
            t, m = ds["tokens"][i], ds["mask"][i]
            n = min(len(t) - 1, seq)
            tokens[r, :n], labels[r, :n], mask[r, :n] = t[:n], t[1 : n + 1], m[1 : n + 1]
        return {
            "tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(mask), "position_ids": positions(len(rows), seq),
        }  # fmt: skip

    def _pair_rows(self, ds: dict[str, Any], rows: np.ndarray, seq: int) -> Batch:
        m = len(rows)
        tokens = np.full((2 * m, seq), self.pad, dtype=np.int64)
        last = np.zeros(2 * m, dtype=np.int64)
        weight = (rows >= 0).astype(np.float32)
        for r, i in enumerate(rows):
            i = max(int(i), 0)  # a filler pair repeats sample 0 with weight 0
            prompt = ds["prompt"][i]
            for half, key in ((0, "chosen"), (1, "rejected")):
                row = np.concatenate([prompt, ds[key][i]])[:seq]
                tokens[half * m + r, : len(row)] = row
                last[half * m + r] = len(row) - 1
        return {
            "tokens": torch.from_numpy(tokens), "position_ids": positions(2 * m, seq),
            "last": torch.from_numpy(last), "weight": torch.from_numpy(weight),
        }  # fmt: skip


def positions(rows: int, seq: int) -> torch.Tensor:
    """Position ids 0..seq−1 for each of `rows` rows."""
    return torch.arange(seq, dtype=torch.int64).unsqueeze(0).expand(rows, seq).contiguous()
