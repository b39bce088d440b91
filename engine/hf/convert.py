"""Megatron-Core's GPTModel ↔ Hugging Face Llama: parameter names, tensor layouts, config.json.

The engine's model (RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases) is HF's
`LlamaForCausalLM` parameter for parameter; three layouts differ:

* Megatron fuses Q, K and V into one `linear_qkv` weight, laid out per query group: for each of the
  `groups` key/value heads, the `heads/groups` query heads that share it, then its key head, then its
  value head, each `head_dim` rows. HF keeps `q_proj`, `k_proj` and `v_proj` apart, query head `i`
  reading key/value head `i // (heads/groups)` — the same grouping, so splitting the fused weight per
  group and concatenating per projection is exact.
* SwiGLU's `linear_fc1` is [gate; up] stacked along the output dimension: silu(gate·x) ⊙ (up·x),
  HF's `gate_proj` and `up_proj`.
* The vocabulary: Megatron pads the embedding and output rows to a multiple of
  `make_vocab_size_divisible_by`; the export keeps every padded row (config.json's `vocab_size` is the
  padded size), the import pads with zero rows.

Rotary embeddings need no permutation: Megatron's non-interleaved RoPE rotates halves
(rotate_half), as HF Llama does, with the same inverse frequencies `base^(-2i/head_dim)`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import EngineError

# What the HF Llama architecture fixes: architecture field → the only value it can express.
LLAMA_FIXED = {
    "position_embedding": "rope",
    "normalization": "rmsnorm",
    "activation": "swiglu",
    "add_bias_linear": False,
}
# Per layer, Megatron (local layer spec) → HF, for the tensors that map one to one.
LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
GLOBAL_NAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
QKV, FC1 = "self_attention.linear_qkv.weight", "mlp.linear_fc1.weight"
HF_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
HF_FC1 = ("mlp.gate_proj.weight", "mlp.up_proj.weight")


def not_llama(arch: Mapping[str, Any]) -> list[str]:
    """The architecture's settings that HF Llama cannot express."""
    return [f"{k}={arch.get(k)!r} (Llama: {v!r})" for k, v in LLAMA_FIXED.items() if arch.get(k) != v]


def split_qkv(w: torch.Tensor, arch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's per-group fused QKV weight → HF's q, k and v projections."""
    heads, groups, d = arch["num_attention_heads"], arch["num_query_groups"], arch["kv_channels"]
    per = heads // groups
    grouped = w.reshape(groups, per + 2, d, w.shape[-1])
    q = grouped[:, :per].reshape(heads * d, -1)
    k = grouped[:, per].reshape(groups * d, -1)
    v = grouped[:, per + 1].reshape(groups * d, -1)
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: Mapping[str, Any]) -> torch.Tensor:
    """HF's q, k and v projections → Megatron's per-group fused QKV weight."""
    heads, groups, d = arch["num_attention_heads"], arch["num_query_groups"], arch["kv_channels"]
    hidden = q.shape[-1]
    parts = [
        q.reshape(groups, heads // groups, d, hidden),
        k.reshape(groups, 1, d, hidden),
        v.reshape(groups, 1, d, hidden),
    ]
    return torch.cat(parts, dim=1).reshape(-1, hidden)


def hf_names(arch: Mapping[str, Any]) -> set[str]:
    """The tensors a HF LlamaForCausalLM of this architecture holds (lm_head only when untied)."""
    names = {v for k, v in GLOBAL_NAMES.items() if k != "output_layer.weight" or not arch["tie_embeddings"]}
    for i in range(arch["num_layers"]):
        names |= {f"model.layers.{i}.{n}" for n in (*LAYER_NAMES.values(), *HF_QKV, *HF_FC1)}
    return names


def to_hf(state: Mapping[str, torch.Tensor], arch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A Megatron GPTModel state dict (TP1/PP1, local layer spec) → HF LlamaForCausalLM tensors."""
    out = {GLOBAL_NAMES[k]: v for k, v in state.items() if k in GLOBAL_NAMES}
    for i in range(arch["num_layers"]):
        ours, theirs = f"decoder.layers.{i}.", f"model.layers.{i}."
        for name, hf_name in LAYER_NAMES.items():
            out[theirs + hf_name] = state[ours + name]
        out |= {theirs + n: t for n, t in zip(HF_QKV, split_qkv(state[ours + QKV], arch), strict=True)}
        out |= {theirs + n: t for n, t in zip(HF_FC1, state[ours + FC1].chunk(2, dim=0), strict=True)}
    # safetensors stores each tensor on its own: no views into a shared buffer.
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def from_hf(tensors: Mapping[str, torch.Tensor], arch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM tensors → a Megatron GPTModel state dict; the vocabulary padded with zero rows."""
    back = {v: k for k, v in GLOBAL_NAMES.items()}
    out = {back[k]: v for k, v in tensors.items() if k in back and k in hf_names(arch)}
    rows = arch["padded_vocab_size"]
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in out:
            w = out[name]
            out[name] = torch.cat([w, w.new_zeros(rows - w.shape[0], w.shape[1])])
    for i in range(arch["num_layers"]):
        ours, theirs = f"decoder.layers.{i}.", f"model.layers.{i}."
        for name, hf_name in LAYER_NAMES.items():
            out[ours + name] = tensors[theirs + hf_name]
        q, k, v = (tensors[theirs + n] for n in HF_QKV)
        out[ours + QKV] = fuse_qkv(q, k, v, arch)
        out[ours + FC1] = torch.cat([tensors[theirs + n] for n in HF_FC1])
    return out


def hf_config(arch: Mapping[str, Any], tokenizer: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """config.json of a LlamaForCausalLM with this architecture (transformers 4.x and 5.x keys)."""
    theta = float(arch["rotary_base"])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": arch["padded_vocab_size"],
        "hidden_size": arch["hidden_size"],
        "intermediate_size": arch["ffn_hidden_size"],
        "num_hidden_layers": arch["num_layers"],
        "num_attention_heads": arch["num_attention_heads"],
        "num_key_value_heads": arch["num_query_groups"],
        "head_dim": arch["kv_channels"],
        "hidden_act": "silu",
        "max_position_embeddings": arch["seq_length"],
        "initializer_range": arch["init_method_std"],
        "rms_norm_eps": arch["norm_epsilon"],
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": arch["tie_embeddings"],
        "bos_token_id": tokenizer.get("bos"),
        "eos_token_id": tokenizer.get("eod"),
        "pad_token_id": tokenizer.get("pad"),
        "torch_dtype": dtype,
        "use_cache": True,
    }


def _rope_theta(config: Mapping[str, Any], problems: list[str]) -> float:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope type {rope.get('rope_type', rope.get('type'))!r}: the engine has plain RoPE only")
    if float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))) != 1.0:
        problems.append("partial_rotary_factor != 1: the engine rotates every channel")
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def architecture_from_hf(
    config: Mapping[str, Any], *, vocab_size: int, padded_vocab_size: int, seq_length: int
) -> dict[str, Any]:
    """The engine's resolved architecture of a HF Llama config.json; EngineError lists what does not fit."""
    problems: list[str] = []
    if config.get("model_type") != "llama":
        problems.append(f"model_type {config.get('model_type')!r}: only 'llama' (LlamaForCausalLM) is imported")
    h, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    groups = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or h // heads)
    if head_dim * heads != h:
        problems.append(f"head_dim={head_dim} × num_attention_heads={heads} != hidden_size={h}")
    if heads % groups:
        problems.append(f"num_key_value_heads={groups} does not divide num_attention_heads={heads}")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.get('hidden_act')!r}: the engine's SwiGLU uses silu")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            problems.append(f"{key}=true: the engine's Llama layers have no biases")
    theta = _rope_theta(config, problems)
    if problems:
        raise EngineError("cannot import this checkpoint: " + "; ".join(problems))
    return {
        "num_layers": int(config["num_hidden_layers"]),
        "hidden_size": h,
        "num_attention_heads": heads,
        "num_query_groups": groups,
        "kv_channels": head_dim,
        "ffn_hidden_size": int(config["intermediate_size"]),
        "seq_length": seq_length,
        "position_embedding": "rope",
        "rotary_base": theta,
        "normalization": "rmsnorm",
        "activation": "swiglu",
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "add_bias_linear": False,
        "norm_epsilon": float(config.get("rms_norm_eps", 1e-6)),
        "init_method_std": float(config.get("initializer_range", 0.02)),
        "vocab_size": vocab_size,
        "padded_vocab_size": padded_vocab_size,
    }


def vocab_divisor(tokens: int, rows: int, given: int | None) -> int:
    """make_vocab_size_divisible_by for a tokenizer of `tokens` ids and a model of `rows` embedding rows:
    the given one, else the largest power of two up to 128 that pads `tokens` to exactly `rows`, else 128."""
    if rows < tokens:
        raise EngineError(f"the tokenizer has {tokens} tokens but the model only {rows} embedding rows")
    fits = [d for d in (128, 64, 32, 16, 8, 4, 2, 1) if d * math.ceil(tokens / d) == rows]
    divisor = given or (fits[0] if fits else 128)
    padded = divisor * math.ceil(tokens / divisor)
    if padded < rows:
        raise EngineError(
            f"the model has {rows} embedding rows, more than the tokenizer's {tokens} tokens padded to a "
            f"multiple of {divisor} ({padded}); pass --make-vocab-size-divisible-by N with N·⌈{tokens}/N⌉ ≥ {rows}"
        )
    return divisor
