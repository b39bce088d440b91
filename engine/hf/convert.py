"""Megatron-Core's GPTModel ↔ Hugging Face decoder families: one declarative mapping per family.

Every family here is a Llama-style decoder (RMSNorm, SwiGLU, RoPE, grouped-query attention) that
Megatron-Core builds with its own options; the families differ in a few switches, which `FAMILIES`
states and nothing else does:

| family  | HF class          | covers                  | Megatron-Core options                      |
| ------- | ----------------- | ----------------------- | ------------------------------------------ |
| llama   | LlamaForCausalLM  | Llama 3, 3.1, 3.2       | rope_scaling (3.1/3.2), tied (3.2 1B/3B)   |
| qwen2   | Qwen2ForCausalLM  | Qwen2, Qwen2.5          | add_qkv_bias, tied (0.5B-3B)               |
| qwen3   | Qwen3ForCausalLM  | Qwen3 dense             | qk_layernorm, kv_channels ≠ hidden/heads    |
| mistral | MistralForCausalLM| Mistral v0.3 style      | (as Llama; no sliding window)              |

`CONFIG` maps config.json keys to the recipe's model fields (both directions), `TENSORS` maps HF tensor
names to Megatron checkpoint keys, with three layouts that differ:

* Megatron fuses Q, K and V (weights, and biases where the family has them) into one `linear_qkv`,
  laid out per query group: for each of the `groups` key/value heads, the `heads/groups` query heads
  that share it, then its key head, then its value head, each `kv_channels` rows. HF keeps `q_proj`,
  `k_proj` and `v_proj` apart, query head `i` reading key/value head `i // (heads/groups)`: the same
  grouping, so splitting the fused tensor per group and concatenating per projection is exact.
* SwiGLU's `linear_fc1` is [gate; up] stacked along the output dimension: HF's `gate_proj`, `up_proj`.
* The vocabulary: Megatron pads the embedding and output rows (`padded_vocab_size`); the export keeps
  every row (config.json's `vocab_size` is the padded size), the import pads with zero rows.

Rotary embeddings need no permutation: Megatron's non-interleaved RoPE rotates halves (rotate_half), as
HF does, with the same inverse frequencies `base^(-2i/kv_channels)`; Llama 3.1's frequency scaling is
Megatron-Core's `rope_scaling` with the factor (its low/high frequency factors and original context are
fixed at Llama 3.1's 1, 4 and 8192, so other values are refused). Qwen3's q_norm/k_norm are Megatron's
per-head `q_layernorm`/`k_layernorm`, applied before RoPE in both.

A config the mapping cannot express (sliding-window layers, MoE, multimodal, another RoPE type, biases
on every projection) is refused naming the config.json key and its value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import EngineError


@dataclass(frozen=True)
class Refusal:
    """A config.json key whose value the engine's model cannot express unless `ok(value)`."""

    key: str
    ok: Callable[[Any], bool]
    expected: str
    why: str


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str
    hf_class: str
    covers: str
    qkv_bias: bool = False  # q, k and v projections carry biases (the output projection does not)
    qk_layernorm: bool = False  # per-head RMSNorm of queries and keys (q_norm, k_norm)
    refusals: tuple[Refusal, ...] = ()
    export_keys: Mapping[str, Any] = field(default_factory=dict)  # constant config.json keys the export writes


def _false(value: Any) -> bool:
    return not value


def _full_attention(value: Any) -> bool:
    return value is None or all(t == "full_attention" for t in value)


NO_SLIDING = "the engine attends over the whole sequence in every layer"
COMMON_REFUSALS = (
    Refusal("hidden_act", lambda v: v in (None, "silu"), "silu", "the engine's SwiGLU uses silu"),
    Refusal("mlp_bias", _false, "false", "the engine's MLP projections have no biases"),
    Refusal("num_local_experts", lambda v: not v, "absent", "mixture-of-experts layers are not mapped"),
    Refusal("num_experts", lambda v: not v, "absent", "mixture-of-experts layers are not mapped"),
    Refusal("layer_types", _full_attention, "full_attention in every layer", NO_SLIDING),
)
NO_OUTPUT_BIAS = Refusal(
    "attention_bias", _false, "false", "biases on the output projection as well cannot be expressed (only q/k/v)"
)

_FAMILIES = (
    Family(
        "llama", "llama", "LlamaForCausalLM", "Llama 3, 3.1, 3.2",
        refusals=(NO_OUTPUT_BIAS,), export_keys={"attention_bias": False, "mlp_bias": False},
    ),
    Family(
        "qwen2", "qwen2", "Qwen2ForCausalLM", "Qwen2, Qwen2.5", qkv_bias=True,
        refusals=(Refusal("use_sliding_window", _false, "false", NO_SLIDING),),
        export_keys={"use_sliding_window": False, "sliding_window": None},
    ),
    Family(
        "qwen3", "qwen3", "Qwen3ForCausalLM", "Qwen3 (dense)", qk_layernorm=True,
        refusals=(NO_OUTPUT_BIAS, Refusal("use_sliding_window", _false, "false", NO_SLIDING)),
        export_keys={"attention_bias": False, "use_sliding_window": False, "sliding_window": None},
    ),
    Family(
        "mistral", "mistral", "MistralForCausalLM", "Mistral v0.3 style",
        refusals=(Refusal("sliding_window", lambda v: v is None, "null", NO_SLIDING),),
        export_keys={"sliding_window": None},
    ),
)  # fmt: skip
FAMILIES: dict[str, Family] = {f.name: f for f in _FAMILIES}

# What every family fixes: architecture field → the only value the mapping expresses.
FIXED = {"position_embedding": "rope", "normalization": "rmsnorm", "activation": "swiglu", "add_bias_linear": False}


@dataclass(frozen=True)
class ConfigKey:
    """A config.json key ↔ a recipe model field; `default` (of the whole config) when the key is absent."""

    hf: str
    ours: str
    cast: Callable[[Any], Any]
    default: Callable[[Mapping[str, Any]], Any] | None = None


CONFIG = (
    ConfigKey("num_hidden_layers", "num_layers", int),
    ConfigKey("hidden_size", "hidden_size", int),
    ConfigKey("intermediate_size", "ffn_hidden_size", int),
    ConfigKey("num_attention_heads", "num_attention_heads", int),
    ConfigKey("num_key_value_heads", "num_query_groups", int, lambda c: c["num_attention_heads"]),
    ConfigKey("head_dim", "kv_channels", int, lambda c: int(c["hidden_size"]) // int(c["num_attention_heads"])),
    ConfigKey("rms_norm_eps", "norm_epsilon", float, lambda c: 1e-6),
    ConfigKey("initializer_range", "init_method_std", float, lambda c: 0.02),
    ConfigKey("tie_word_embeddings", "tie_embeddings", bool, lambda c: False),
)

# Llama 3.1's RoPE scaling as Megatron-Core implements it: only the factor is free.
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class TensorMap:
    """One Megatron checkpoint key and the HF tensors it is made of; `{i}` is the layer. `join` is how:
    one to one, the per-group QKV fusing, [gate; up] stacking, or vocabulary rows padded."""

    ours: str
    theirs: tuple[str, ...]
    join: str = "copy"  # copy | qkv | gate_up | vocab
    when: str | None = None  # the architecture flag it needs: qkv_bias, qk_layernorm, untied


LAYER, HF_LAYER = "decoder.layers.{i}.", "model.layers.{i}."
TENSORS = (
    TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",)),
    TensorMap("output_layer.weight", ("lm_head.weight",), "vocab", when="untied"),
    *(
        TensorMap(LAYER + ours, tuple(HF_LAYER + t for t in theirs), join, when)
        for ours, theirs, join, when in (
            ("input_layernorm.weight", ("input_layernorm.weight",), "copy", None),
            ("self_attention.linear_qkv.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                  "self_attn.v_proj.weight"), "qkv", None),
            ("self_attention.linear_qkv.bias", ("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                                "self_attn.v_proj.bias"), "qkv", "qkv_bias"),
            ("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), "copy", "qk_layernorm"),
            ("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), "copy", "qk_layernorm"),
            ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "copy", None),
            ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "copy", None),
            ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up", None),
            ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "copy", None),
        )
    ),
)  # fmt: skip
IGNORED = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved


def tensor_maps(arch: Mapping[str, Any]) -> list[TensorMap]:
    """Every Megatron key of this architecture (TP1/PP1, local layer spec) and its HF tensors."""
    flags = {"qkv_bias": arch.get("qkv_bias", False), "qk_layernorm": arch.get("qk_layernorm", False),
             "untied": not arch["tie_embeddings"]}  # fmt: skip
    out = []
    for t in TENSORS:
        if t.when is not None and not flags[t.when]:
            continue
        layers = range(arch["num_layers"]) if "{i}" in t.ours else [None]
        for i in layers:
            out.append(TensorMap(t.ours.format(i=i), tuple(n.format(i=i) for n in t.theirs), t.join))
    return out


def hf_names(arch: Mapping[str, Any]) -> set[str]:
    """The tensors a HF model of this architecture holds (lm_head only when untied)."""
    return {n for t in tensor_maps(arch) for n in t.theirs}


def split_qkv(w: torch.Tensor, arch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's per-group fused QKV weight (or bias) → HF's q, k and v projections."""
    heads, groups, d = arch["num_attention_heads"], arch["num_query_groups"], arch["kv_channels"]
    per = heads // groups
    grouped = w.reshape(groups, per + 2, d, *w.shape[1:])
    q = grouped[:, :per].reshape(heads * d, *w.shape[1:])
    k = grouped[:, per].reshape(groups * d, *w.shape[1:])
    v = grouped[:, per + 1].reshape(groups * d, *w.shape[1:])
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: Mapping[str, Any]) -> torch.Tensor:
    """HF's q, k and v projections (weights or biases) → Megatron's per-group fused QKV tensor."""
    heads, groups, d = arch["num_attention_heads"], arch["num_query_groups"], arch["kv_channels"]
    rest = q.shape[1:]
    parts = [
        q.reshape(groups, heads // groups, d, *rest),
        k.reshape(groups, 1, d, *rest),
        v.reshape(groups, 1, d, *rest),
    ]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def join(t: TensorMap, parts: list[torch.Tensor], arch: Mapping[str, Any]) -> torch.Tensor:
    """The Megatron tensor of `t` from its HF tensors."""
    if t.join == "qkv":
        q, k, v = parts
        return fuse_qkv(q, k, v, arch)
    if t.join == "gate_up":
        return torch.cat(parts)
    (w,) = parts
    if t.join == "vocab":
        return torch.cat([w, w.new_zeros(arch["padded_vocab_size"] - w.shape[0], *w.shape[1:])])
    return w


def separate(t: TensorMap, w: torch.Tensor, arch: Mapping[str, Any]) -> list[torch.Tensor]:
    """The HF tensors of `t` from its Megatron tensor (every padded vocabulary row kept)."""
    if t.join == "qkv":
        return list(split_qkv(w, arch))
    if t.join == "gate_up":
        return list(w.chunk(2, dim=0))
    return [w]


def to_hf(state: Mapping[str, torch.Tensor], arch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A Megatron GPTModel state dict (TP1/PP1, local layer spec) → HF tensors."""
    out: dict[str, torch.Tensor] = {}
    for t in tensor_maps(arch):
        out |= dict(zip(t.theirs, separate(t, state[t.ours], arch), strict=True))
    # safetensors stores each tensor on its own: no views into a shared buffer.
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def from_hf(tensors: Mapping[str, torch.Tensor], arch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """HF tensors → a Megatron GPTModel state dict; the vocabulary padded with zero rows."""
    return {t.ours: join(t, [tensors[n] for n in t.theirs], arch) for t in tensor_maps(arch)}


# ---------------------------------------------------------------------------------------------- config.json


def family_of(config: Mapping[str, Any]) -> Family:
    model_type = config.get("model_type")
    for family in FAMILIES.values():
        if family.model_type == model_type:
            return family
    known = ", ".join(f"{f.model_type!r} ({f.covers})" for f in FAMILIES.values())
    raise EngineError(f"config.json: model_type={model_type!r} is not a family the engine maps; it maps {known}")


def _rope(config: Mapping[str, Any], problems: list[str]) -> tuple[float, float | None]:
    """(rope theta, Llama 3.1 scaling factor or None) from transformers 5's `rope_parameters` or 4's
    `rope_theta` + `rope_scaling`."""
    key = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    rope = dict(config.get(key) or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if float(partial) != 1.0:
        problems.append(f"partial_rotary_factor={partial}: the engine rotates every channel (1.0)")
    if kind == "default":
        return theta, None
    if kind != "llama3":
        problems.append(f"{key}.rope_type={kind!r}: the engine maps plain RoPE ('default') and Llama 3.1's ('llama3')")
        return theta, None
    for name, value in LLAMA3_ROPE.items():
        if float(rope.get(name, value)) != value:
            problems.append(
                f"{key}.{name}={rope.get(name)}: Megatron-Core's Llama 3.1 RoPE scaling fixes it at {value}"
            )
    return theta, float(rope["factor"])


def architecture_from_hf(
    config: Mapping[str, Any], *, vocab_size: int, padded_vocab_size: int, seq_length: int
) -> dict[str, Any]:
    """The engine's resolved architecture of a HF config.json; EngineError names every key that does not fit."""
    family = family_of(config)
    problems: list[str] = []
    for r in (*COMMON_REFUSALS, *family.refusals):
        if r.key in config and not r.ok(config[r.key]):
            problems.append(f"{r.key}={config[r.key]!r} (the engine needs {r.expected}: {r.why})")
    arch: dict[str, Any] = {}
    for c in CONFIG:
        value = config.get(c.hf)
        arch[c.ours] = c.cast(value if value is not None else c.default(config) if c.default else config[c.hf])
    heads, groups = arch["num_attention_heads"], arch["num_query_groups"]
    if heads % groups:
        problems.append(f"num_key_value_heads={groups} does not divide num_attention_heads={heads}")
    theta, factor = _rope(config, problems)
    if problems:
        raise EngineError(f"cannot import this {family.hf_class}: " + "; ".join(problems))
    return {
        **arch,
        **FIXED,
        "seq_length": seq_length,
        "rotary_base": theta,
        "rope_scaling_factor": factor,
        "qkv_bias": family.qkv_bias,
        "qk_layernorm": family.qk_layernorm,
        "vocab_size": vocab_size,
        "padded_vocab_size": padded_vocab_size,
    }


def export_family(arch: Mapping[str, Any], name: str | None) -> tuple[Family | None, list[str]]:
    """The family an architecture exports as (`name`, or the one whose switches it has) and what stops it."""
    problems = [f"{k}={arch.get(k)!r} (needs {v!r})" for k, v in FIXED.items() if arch.get(k) != v]
    flags = (bool(arch.get("qkv_bias")), bool(arch.get("qk_layernorm")))
    fitting = [f for f in FAMILIES.values() if (f.qkv_bias, f.qk_layernorm) == flags]
    if name is not None:
        if name not in FAMILIES:
            return None, [f"--family {name!r}: choose one of {', '.join(FAMILIES)}"]
        if FAMILIES[name] not in fitting:
            f = FAMILIES[name]
            problems.append(
                f"qkv_bias={flags[0]}, qk_layernorm={flags[1]} (family {name!r} has {f.qkv_bias}, {f.qk_layernorm})"
            )
        return FAMILIES[name], problems
    if not fitting:
        problems.append(f"qkv_bias={flags[0]} with qk_layernorm={flags[1]}: no family has both")
    return (fitting[0] if fitting else None), problems


def hf_config(family: Family, arch: Mapping[str, Any], tokenizer: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """config.json of the family's causal LM with this architecture (transformers 4.x and 5.x keys)."""
    theta = float(arch["rotary_base"])
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if arch.get("rope_scaling_factor") is not None:
        rope = {"rope_type": "llama3", "rope_theta": theta, "factor": arch["rope_scaling_factor"], **LLAMA3_ROPE}
    config = {
        "architectures": [family.hf_class],
        "model_type": family.model_type,
        "vocab_size": arch["padded_vocab_size"],
        **{c.hf: arch[c.ours] for c in CONFIG},
        "hidden_act": "silu",
        "max_position_embeddings": arch["seq_length"],
        "rope_theta": theta,
        "rope_parameters": rope,
        **({"rope_scaling": rope} if rope["rope_type"] != "default" else {}),
        "attention_dropout": 0.0,
        **family.export_keys,
        "bos_token_id": tokenizer.get("bos"),
        "eos_token_id": tokenizer.get("eod"),
        "pad_token_id": tokenizer.get("pad"),
        "torch_dtype": dtype,
        "use_cache": True,
    }
    return config


def vocab_divisor(tokens: int, rows: int, given: int | None) -> int | None:
    """make_vocab_size_divisible_by for a tokenizer of `tokens` ids and a model of `rows` embedding rows:
    the given one, else the largest power of two up to 128 that pads `tokens` to exactly `rows`; None when
    none does (the recipe then keeps the rows as they are, `vocab_rows`)."""
    if rows < tokens:
        raise EngineError(f"the tokenizer has {tokens} tokens but the model only {rows} embedding rows")
    if given is None:
        fits = [d for d in (128, 64, 32, 16, 8, 4, 2, 1) if d * math.ceil(tokens / d) == rows]
        return fits[0] if fits else None
    if given * math.ceil(tokens / given) != rows:
        raise EngineError(
            f"--make-vocab-size-divisible-by {given} pads the tokenizer's {tokens} tokens to "
            f"{given * math.ceil(tokens / given)} rows, the model has {rows}; leave it out to keep the model's rows"
        )
    return given
