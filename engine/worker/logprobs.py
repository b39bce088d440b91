"""Log-probabilities and entropy from vocabulary-parallel logits, without gathering them.

Under tensor parallelism each rank holds the logits of its slice of the vocabulary ([..., vocab/tp]).
The log-sum-exp, the picked label's logit and the entropy's weighted sum are each a sum over the
vocabulary, so each rank computes its part and the parts are all-reduced with Megatron's autograd-
aware reduction (all-reduce forward, identity backward): gradients are exact and no rank ever holds
the whole vocabulary. PPO's actor, its reference and any objective that scores responses token by
token (preference optimisation) use it.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps

from . import comm


def vocab_parallel_logp_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(label) and the entropy of π from logits split over tensor-parallel ranks ([..., vocab/tp])."""
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region as reduce

    tp = ps.get_tensor_model_parallel_world_size()
    logits = logits.float()
    part = logits.shape[-1]
    top = logits.max(dim=-1, keepdim=True).values.detach()
    if tp > 1:
        comm.max_(top, group=ps.get_tensor_model_parallel_group())
    z = logits - top
    e = z.exp()
    total = e.sum(-1)
    start = ps.get_tensor_model_parallel_rank() * part
    here = (labels >= start) & (labels < start + part)
    picked = z.gather(-1, (labels - start).clamp(0, part - 1).unsqueeze(-1)).squeeze(-1) * here
    weighted = (e * z).sum(-1)
    if tp > 1:
        total, picked, weighted = reduce(total), reduce(picked), reduce(weighted)
    log_total = total.log()
    return picked - log_total, log_total - weighted / total
