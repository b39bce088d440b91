"""Data collection: plugin sources, cleaning, deduplication, tokenizer and splits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from .base import Name, Spec

RecordKind = Literal["text", "conversation", "preference", "prompt"]


class SourceSpec(Spec):
    """One data source: a plugin from the `engine.data_sources` entry points and its parameters."""

    name: Name = Field(description="label of this source, unique within the stage (mixture keys use it)")
    plugin: str = Field(description="data-source plugin name (`engine plugins` lists them)")
    records: RecordKind = Field(
        description="what the source yields: text (pretraining), conversation (SFT), "
        "preference (reward model) or prompt (PPO)"
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="the plugin's parameters, validated by the plugin's own model"
    )
    weight: float = Field(
        default=1.0,
        gt=0,
        description="mixture weight among the sources of the same records: the share of the training samples a "
        "stage draws from this source is its weight over theirs (pretraining's blend, SFT and reward-model batches, "
        "PPO's prompts)",
    )


class CleaningSpec(Spec):
    """Filters applied to every document, in this order; the data report counts each one's removals."""

    unicode_normalization: Literal["NFC", "NFKC", "none"] = Field(
        default="NFKC", description="Unicode normal form applied to text"
    )
    normalize_whitespace: bool = Field(default=True, description="collapse runs of spaces, strip lines")
    min_chars: int = Field(default=1, ge=0, le=10**9, description="drop documents shorter than this")
    max_chars: int | None = Field(default=None, gt=0, le=10**12, description="drop documents longer than this")
    max_duplicate_line_fraction: float | None = Field(
        default=0.3, ge=0, le=1, description="Gopher rule: drop if this fraction of lines are duplicates"
    )
    max_top_ngram_fraction: float | None = Field(
        default=0.2,
        ge=0,
        le=1,
        description="Gopher rule: drop if the most frequent word 2-gram covers this fraction of characters",
    )
    max_duplicate_ngram_fraction: float | None = Field(
        default=0.15,
        ge=0,
        le=1,
        description="Gopher rule: drop if duplicated word 5-grams cover this fraction of characters",
    )
    blocklist: list[str] = Field(
        default_factory=list, description="regular expressions; a document matching any is dropped"
    )


class DedupSpec(Spec):
    """Exact and near-duplicate removal across all sources, and decontamination against eval prompts."""

    exact: bool = Field(default=True, description="drop documents whose normalised text hash repeats")
    near: bool = Field(default=True, description="drop near-duplicates found by MinHash + LSH")
    threshold: float = Field(
        default=0.8, gt=0, le=1, description="estimated Jaccard similarity above which two are duplicates"
    )
    num_perm: int = Field(default=128, gt=0, le=8192, description="MinHash permutations")
    shingle_size: int = Field(default=5, gt=0, le=1024, description="word n-gram size of the MinHash shingles")
    decontaminate: bool = Field(
        default=True, description="drop training documents sharing an n-gram with held-out eval prompts"
    )
    decontamination_ngram: int = Field(default=13, gt=0, le=1024, description="n-gram size for decontamination")


class SplitSpec(Spec):
    """Fractions of each source assigned to train, validation and test; they must add up to 1."""

    train: float = Field(default=0.98, ge=0, le=1, description="training fraction")
    valid: float = Field(default=0.01, ge=0, le=1, description="validation fraction")
    test: float = Field(default=0.01, ge=0, le=1, description="test fraction")


class TrainTokenizer(Spec):
    """Train a byte-level BPE with HF tokenizers on the cleaned corpus of the first data stage."""

    kind: Literal["train"] = Field(description="train a new tokenizer")
    vocab_size: int = Field(gt=0, le=10_000_000, description="vocabulary size, special tokens included")
    min_frequency: int = Field(default=2, gt=0, le=10**9, description="minimum pair frequency for a merge")


class FileTokenizer(Spec):
    """Use an existing HF tokenizer.json."""

    kind: Literal["file"] = Field(description="load a local tokenizer.json")
    path: str = Field(description="path to tokenizer.json (relative paths: from the working directory)")
    vocab_size: int | None = Field(
        default=None,
        gt=0,
        le=10_000_000,
        description="vocabulary size; read from the file when unset, checked against it when set",
    )

    @property
    def file(self) -> str:
        return self.path


class HfTokenizer(Spec):
    """A model's own HF tokenizer folder and its chat template (every chat stage renders with it)."""

    kind: Literal["hf"] = Field(description="a local HF tokenizer folder with its chat template")
    path: str = Field(
        description="folder with tokenizer.json and tokenizer_config.json (its chat_template, or chat_template.jinja) "
        "and, for the stop tokens, generation_config.json: an `engine import` output or a HF model folder"
    )
    vocab_size: int | None = Field(
        default=None,
        gt=0,
        le=10_000_000,
        description="vocabulary size; read from tokenizer.json when unset, checked against it when set",
    )

    @property
    def file(self) -> str:
        return str(Path(self.path) / "tokenizer.json")


TokenizerSpec = Annotated[TrainTokenizer | FileTokenizer | HfTokenizer, Field(discriminator="kind")]
