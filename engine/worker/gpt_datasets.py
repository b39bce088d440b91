"""Pretraining data: Megatron-Core GPTDatasets over the data stage's indexed datasets.

Each text source contributes its train/valid split with the recipe's mixture weight through
BlendedMegatronDatasetBuilder. Batches are addressed by sample index: step s reads the global samples
[consumed, consumed + global_batch) and data-parallel rank r takes micro-batch slices
r·mbs .. (r+1)·mbs of each mbs·dp block, as Megatron's pretraining sampler does. The position is the
number of consumed samples, saved with every checkpoint, so a resumed run reads exactly the batches
an uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..artifacts import read_manifest, text_prefix
from ..errors import EngineError
from ..schema import SourceSpec


@dataclass(frozen=True)
class SpecialIds:
    """What GPTDataset needs from a tokenizer."""

    vocab_size: int
    eod: int
    pad: int

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        """Megatron hashes this into the names of its cached sample indices."""
        return {"class": "SpecialIds", "vocab_size": self.vocab_size, "eod": self.eod, "pad": self.pad}


def blend(
    sources: list[SourceSpec], mixture: Mapping[str, float] | None, root: Path, split: str, *, stage: str
) -> tuple[list[str], list[float]]:
    """Prefixes and mixture weights of the text sources (in recipe order) feeding the pretrain stage `stage`."""
    mixture = mixture or {}
    prefixes, weights = [], []
    for src in sources:
        if src.records != "text":
            continue
        weight = float(mixture.get(src.name, src.weight))
        if weight <= 0:
            continue
        prefix = text_prefix(root, src.name, split)
        if not Path(prefix + ".idx").is_file():
            raise EngineError(f"source {src.name!r} has no {split} split at {prefix}.idx")
        prefixes.append(prefix)
        weights.append(weight)
    if not prefixes:
        raise EngineError(f"no text source with a positive weight feeds stage {stage!r}")
    return prefixes, weights


def build_datasets(
    root: Path, *, sources: list[SourceSpec], mixture: Mapping[str, float] | None, stage: str, seq_length: int,
    train_samples: int, valid_samples: int, seed: int, cache: Path,
) -> tuple[Any, Any, SpecialIds]:  # fmt: skip
    """Train and validation GPTDatasets over the dataset folder `root`, blended by source weight."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    tok = read_manifest(root)["tokenizer"]
    ids = SpecialIds(vocab_size=int(tok["vocab_size"]), eod=int(tok["eod"]), pad=int(tok["pad"]))
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend_per_split=[
            blend(sources, mixture, root, "train", stage=stage), blend(sources, mixture, root, "valid", stage=stage),
            None,
        ],
        tokenizer=ids,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=str(cache),
        mmap_bin_files=True,
    )  # fmt: skip
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, 0], lambda: True, config
    ).build()
    return train, valid, ids


def microbatches(
    dataset: Any, *, start: int, num: int, mbs: int, dp: int, dp_rank: int
) -> Iterator[dict[str, torch.Tensor]]:
    """The micro-batches of one global batch that belong to this data-parallel rank."""
    for m in range(num):
        first = start + m * mbs * dp + dp_rank * mbs
        samples = [dataset[(first + i) % len(dataset)] for i in range(mbs)]
        yield {
            key: torch.stack([torch.as_tensor(s[key]) for s in samples])
            for key in ("tokens", "labels", "loss_mask", "position_ids")
        }
