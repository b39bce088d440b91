"""The model architecture: a Llama-style decoder built as Megatron-Core's GPTModel.

Either name a preset (`preset: llama3-8b`) and override single fields, or give every size explicitly.
The vocabulary size is not set here: it comes from the tokenizer, padded for tensor parallelism.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .base import Spec

Normalization = Literal["rmsnorm", "layernorm"]
Activation = Literal["swiglu", "gelu"]
PositionEmbedding = Literal["rope", "learned_absolute"]

# Published architectures. Values are those of the released configs.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        num_layers=6,
        hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=352,
        seq_length=64,
        rotary_base=10000.0,
        tie_embeddings=False,
    ),
    "llama3-8b": dict(
        num_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_query_groups=8,
        ffn_hidden_size=14336,
        seq_length=8192,
        rotary_base=500000.0,
        tie_embeddings=False,
    ),
    "llama3-70b": dict(
        num_layers=80,
        hidden_size=8192,
        num_attention_heads=64,
        num_query_groups=8,
        ffn_hidden_size=28672,
        seq_length=8192,
        rotary_base=500000.0,
        tie_embeddings=False,
    ),
    "llama3.1-405b": dict(
        num_layers=126,
        hidden_size=16384,
        num_attention_heads=128,
        num_query_groups=8,
        ffn_hidden_size=53248,
        seq_length=8192,
        rotary_base=500000.0,
        tie_embeddings=False,
    ),
}

SIZE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "seq_length")


class ModelSpec(Spec):
    """Architecture of the decoder. Unset fields come from `preset`, then from Llama defaults."""

    preset: str | None = Field(
        default=None, description=f"a published architecture to start from: one of {sorted(PRESETS)}"
    )
    num_layers: int | None = Field(default=None, gt=0, le=1_000, description="transformer layers")
    hidden_size: int | None = Field(default=None, gt=0, le=1_000_000, description="model width h")
    num_attention_heads: int | None = Field(default=None, gt=0, le=10_000, description="query heads a")
    num_query_groups: int | None = Field(
        default=None, gt=0, le=10_000, description="key/value heads for grouped-query attention (default: = heads)"
    )
    ffn_hidden_size: int | None = Field(
        default=None,
        gt=0,
        le=10_000_000,
        description="MLP inner size (default: 4h for gelu; 8h/3 rounded up to 256 for swiglu)",
    )
    seq_length: int | None = Field(default=None, gt=0, le=10_000_000, description="training sequence length in tokens")
    position_embedding: PositionEmbedding | None = Field(
        default=None, description="rotary (rope, default) or learned absolute position embeddings"
    )
    rotary_base: float | None = Field(default=None, gt=0, description="RoPE theta (default 10000)")
    normalization: Normalization | None = Field(default=None, description="rmsnorm (default) or layernorm")
    activation: Activation | None = Field(default=None, description="MLP activation: swiglu (gated, default) or gelu")
    tie_embeddings: bool | None = Field(
        default=None, description="share input embedding and output projection (default false)"
    )
    kv_channels: int | None = Field(
        default=None, gt=0, le=100_000, description="channels per attention head (default hidden_size / heads; Qwen3: 128)"
    )
    add_bias_linear: bool = Field(default=False, description="biases in linear layers (Llama: false)")
    qkv_bias: bool = Field(
        default=False, description="biases on the query, key and value projections only (Qwen2 / Qwen2.5: true)"
    )
    qk_layernorm: bool = Field(
        default=False, description="normalise queries and keys per head before RoPE (Qwen3: true)"
    )
    rope_scaling_factor: float | None = Field(
        default=None,
        gt=1,
        description="Llama 3.1-style RoPE frequency scaling with this factor (Llama 3.1: 8, 3.2: 32; low/high "
        "frequency factors 1 and 4, original context 8192, as Megatron-Core implements it); default none",
    )
    vocab_rows: int | None = Field(
        default=None,
        gt=0,
        le=10_000_000,
        description="embedding rows when they are not the tokenizer's vocabulary padded to "
        "make_vocab_size_divisible_by (an imported model keeps its own, e.g. Qwen2.5's 151936)",
    )
    norm_epsilon: float = Field(default=1e-5, gt=0, description="epsilon of the normalisation layers")
    init_method_std: float = Field(default=0.02, gt=0, description="std of the normal weight init")
    make_vocab_size_divisible_by: int = Field(
        default=128,
        gt=0,
        le=65536,
        description="pad the tokenizer's vocabulary to a multiple of this (must also be divisible by tp)",
    )
