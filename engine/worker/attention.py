"""Core attention of the local layer spec: Megatron-Core's own for padded rows, varlen for packed ones.

Packed rows reach attention in Megatron-Core's THD layout: the rows laid end to end as one sequence of t
positions, `PackedSeqParams.cu_seqlens_q` bounding each packed sequence (engine.worker.objectives.run_model),
the same inputs Transformer Engine's fused attention reads on GPUs. Megatron-Core's local
DotProductAttention refuses them, so the local spec gets `VarlenAttention`: without packed_seq_params it is
that DotProductAttention, unchanged; with them each sequence attends causally within itself only.

How (a varlen attention in plain PyTorch): the sequences are grouped by length (rounded up to `GROUP`
positions), each group gathered into a padded [sequences, heads, longest, dim] batch and run through
torch's scaled_dot_product_attention with a causal mask, and the outputs scattered back to their places.
Padding follows the real positions, so causality keeps it out of every real query's view; a group costs
its sequences' lengths squared, never the rows' (a block-diagonal mask over 256-position rows pays 256²
per row for conversations of 40). Grouped-query attention repeats the key and value heads.
"""

from __future__ import annotations

from typing import Any

import torch

GROUP = 16  # sequences whose lengths round up to the same multiple of this share one attention call


def length_groups(cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    """Per group of the sequences between consecutive `cu_seqlens` (grouped by length rounded up to GROUP),
    their positions [sequences, longest], padding −1; on the device of `cu_seqlens`."""
    bounds = cu_seqlens.long()
    starts, lengths = bounds[:-1], bounds[1:] - bounds[:-1]
    keys = (lengths + GROUP - 1) // GROUP
    out = []
    for key in torch.unique(keys).tolist():
        members = torch.nonzero(keys == key).squeeze(1)
        offsets = torch.arange(int(lengths[members].max()), device=bounds.device)
        positions = starts[members, None] + offsets[None, :]
        out.append(torch.where(offsets[None, :] < lengths[members, None], positions, -1))
    return out


def varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor, *,
                     scale: float) -> torch.Tensor:  # fmt: skip
    """Causal attention within each sequence of THD inputs: query [t, heads, dim], key and value
    [t, groups, dim], the sequences between consecutive `cu_seqlens` → [t, heads·dim]."""
    t, heads, dim = query.shape
    repeat = heads // key.shape[1]
    if repeat > 1:
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    padded = [torch.cat([x, x.new_zeros(1, heads, dim)]) for x in (query, key, value)]  # row t: padding
    out = query.new_zeros(t, heads, dim)
    for positions in length_groups(cu_seqlens):
        real = positions >= 0
        index = torch.where(real, positions, t)
        q, k, v = (x[index].transpose(1, 2) for x in padded)  # [sequences, heads, longest, dim]
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(1, 2)
        out = out.index_put((index[real],), o[real])
    return out.reshape(t, heads * dim)


class VarlenAttention(torch.nn.Module):
    """The local spec's core attention: Megatron-Core's DotProductAttention, and for THD inputs (packed rows)
    `varlen_attention`."""

    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any, attention_type: str, **kwargs: Any) -> None:
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        super().__init__()
        self.local = DotProductAttention(config, layer_number, attn_mask_type, attention_type, **kwargs)
        self.scale = kwargs.get("softmax_scale") or config.kv_channels**-0.5
        self.dropout = config.attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                attn_mask_type: Any = None, attention_bias: Any = None, packed_seq_params: Any = None) -> torch.Tensor:  # fmt: skip
        if packed_seq_params is None:
            out: torch.Tensor = self.local(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                           attention_bias=attention_bias)  # fmt: skip
            return out
        assert packed_seq_params.qkv_format == "thd" and query.dim() == 3, (packed_seq_params.qkv_format, query.shape)
        assert self.dropout == 0.0 or not self.training, "attention dropout on packed rows"
        cu = packed_seq_params.cu_seqlens_q
        assert torch.equal(cu, packed_seq_params.cu_seqlens_kv) and int(cu[-1]) == query.shape[0]
        return varlen_attention(query, key, value, cu, scale=self.scale)
