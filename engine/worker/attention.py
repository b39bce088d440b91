"""Core attention of the local layer spec: Megatron-Core's own for padded rows, varlen for packed ones.

Packed rows reach attention in Megatron-Core's THD layout: the rows laid end to end as one sequence of t
positions, `PackedSeqParams.cu_seqlens_q` bounding each packed sequence (engine.worker.objectives.run_model),
the same inputs Transformer Engine's fused attention reads on GPUs. Megatron-Core's local
DotProductAttention refuses them, so the local spec gets `VarlenAttention`: without packed_seq_params it is
that DotProductAttention, unchanged; with them each sequence attends causally within itself only.

How (a varlen attention in plain PyTorch), two ways:
* packed rows (engine.worker.packing.pack: rows of one width, every row ending on a boundary, its padding one
  more sequence; `row_width` finds the width from the boundaries alone): the THD tensors are viewed as their
  rows again and go through one call of torch's fused scaled_dot_product_attention per layer with each row's
  block-diagonal causal mask. A row costs its width squared, but one fused call with no gathers beats a
  call per length at the lengths packing makes (SFT on bench/packing.py's conversations: 1.13× the
  grouped path);
* any other boundaries: the sequences are grouped by length (rounded up to `GROUP` positions), each group
  gathered into a padded [sequences, heads, longest, dim] batch and run through the same kernel with a
  causal mask, and the outputs scattered back to their places. Padding follows the real positions, so
  causality keeps it out of every real query's view; a group costs its sequences' lengths squared.
Grouped-query attention repeats the key and value heads. `row_width` reads the boundaries on the host (one
small copy per layer); masks and index tensors are built on the inputs' device.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

ROWS_UP_TO = 1024  # wider rows go by groups of lengths: a row's mask and scores grow with its width squared
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


def row_width(cu_seqlens: torch.Tensor) -> int | None:
    """The width of the rows THD boundaries lay end to end, if they are rows of at most `ROWS_UP_TO`: the
    least width, at least the longest sequence, that divides the positions and at every multiple of which a
    sequence ends; else None."""
    bounds = cu_seqlens.tolist()
    total = bounds[-1]
    longest = max((b - a for a, b in itertools.pairwise(bounds)), default=0)
    ends = set(bounds[1:])
    for width in range(max(longest, 1), min(total, ROWS_UP_TO) + 1):
        if total % width == 0 and all(end in ends for end in range(width, total + 1, width)):
            return width
    return None


def row_mask(cu_seqlens: torch.Tensor, width: int) -> torch.Tensor:
    """Which positions each position of rows of `width` (`row_width`) may attend to: its own sequence's, up
    to itself; [rows, 1, width, width], True where allowed, on the device of `cu_seqlens`."""
    bounds = cu_seqlens.long()
    total = int(bounds[-1])
    sequence = torch.searchsorted(bounds, torch.arange(total, device=bounds.device), right=True) - 1
    sequence = sequence.view(total // width, width)
    causal = torch.ones(width, width, dtype=torch.bool, device=bounds.device).tril()
    return ((sequence[:, :, None] == sequence[:, None, :]) & causal).unsqueeze(1)


def repeated_groups(key: torch.Tensor, value: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention's key and value heads [t, groups, dim] repeated to the query's `heads`."""
    repeat = heads // key.shape[1]
    if repeat > 1:
        return key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    return key, value


def row_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor, *,
                  width: int, scale: float) -> torch.Tensor:  # fmt: skip
    """`varlen_attention` for sequences in rows of `width` (`row_width`): one fused call per layer, each
    row's block-diagonal causal mask."""
    t, heads, dim = query.shape
    key, value = repeated_groups(key, value, heads)
    rows = t // width
    q, k, v = (x.view(rows, width, heads, dim).transpose(1, 2) for x in (query, key, value))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=row_mask(cu_seqlens, width), scale=scale)
    return out.transpose(1, 2).reshape(t, heads * dim)


def varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor, *,
                     scale: float) -> torch.Tensor:  # fmt: skip
    """Causal attention within each sequence of THD inputs: query [t, heads, dim], key and value
    [t, groups, dim], the sequences between consecutive `cu_seqlens` → [t, heads·dim]. Rows
    (`row_width`) go through `row_attention`; any other boundaries by groups of lengths."""
    width = row_width(cu_seqlens)
    if width is not None:
        return row_attention(query, key, value, cu_seqlens, width=width, scale=scale)
    return grouped_attention(query, key, value, cu_seqlens, scale=scale)


def grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor, *,
                      scale: float) -> torch.Tensor:  # fmt: skip
    """`varlen_attention` for any boundaries: one call per group of lengths (`length_groups`)."""
    t, heads, dim = query.shape
    key, value = repeated_groups(key, value, heads)
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
