"""Pretraining data: Megatron-Core GPTDatasets over the data stage's indexed datasets.

Each text source contributes its train/valid split with the recipe's mixture weight through
BlendedMegatronDatasetBuilder. Batches are addressed by sample index: step s reads the global samples
[consumed, consumed + global_batch) and data-parallel rank r takes micro-batch slices
r·mbs .. (r+1)·mbs of each mbs·dp block, as Megatron's pretraining sampler does. The position is the
number of consumed samples, saved with every checkpoint, so a resumed run reads exactly the batches
an uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..artifacts import MANIFEST, read_json, text_prefix
from ..compile import Job, Plan
from ..errors import EngineError


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


def dataset_dir(plan: Plan, job: Job, key: str = "data") -> Path:
    """The dataset artifact of the data stage that `job.config[key]` names."""
    data_stage = job.config[key]
    artifact = next(a for a in plan.job(data_stage).outputs if a.kind == "dataset")
    return Path(artifact.path)


def read_manifest(path: Path) -> dict[str, Any]:
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise EngineError(f"no dataset at {path}: {manifest} is missing; run the data stage first")
    data: dict[str, Any] = read_json(manifest)
    return data


def blend(plan: Plan, job: Job, root: Path, split: str) -> tuple[list[str], list[float]]:
    """Prefixes and mixture weights of the text sources feeding a pretrain job."""
    data_stage = plan.job(job.config["data"]).config
    mixture = job.config.get("mixture") or {}
    prefixes, weights = [], []
    for src in data_stage["sources"]:
        if src["records"] != "text":
            continue
        weight = float(mixture.get(src["name"], src["weight"]))
        if weight <= 0:
            continue
        prefix = text_prefix(root, src["name"], split)
        if not Path(prefix + ".idx").is_file():
            raise EngineError(f"source {src['name']!r} has no {split} split at {prefix}.idx")
        prefixes.append(prefix)
        weights.append(weight)
    if not prefixes:
        raise EngineError(f"no text source with a positive weight feeds stage {job.name!r}")
    return prefixes, weights


def build_datasets(
    plan: Plan, job: Job, *, train_samples: int, valid_samples: int, seed: int, cache: Path
) -> tuple[Any, Any, SpecialIds]:
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    root = dataset_dir(plan, job)
    manifest = read_manifest(root)
    tok = manifest["tokenizer"]
    ids = SpecialIds(vocab_size=int(tok["vocab_size"]), eod=int(tok["eod"]), pad=int(tok["pad"]))
    assert job.layout is not None
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=plan.model.seq_length,
        blend_per_split=[blend(plan, job, root, "train"), blend(plan, job, root, "valid"), None],
        tokenizer=ids,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=str(cache),
        mmap_bin_files=True,
    )
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
