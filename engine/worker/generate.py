"""Batched sampling from a Megatron-Core GPTModel with a KV cache (Megatron's static inference context).

Prompts of different lengths share one batch, right-padded. Decoding starts at the shortest prompt:
the prefill runs positions [0, shortest) at once and fills the cache; every later position is one
forward of a single token per row, which reads the cached keys and values of the earlier positions.
A row whose prompt is longer keeps its own prompt token at that position instead of the sampled one
(the scheme of Megatron's text generation), so no attention mask beyond the causal one is needed.
A row stops at a stop token (the chat template's <|end|> or <|eos|>) or after `max_new` tokens; the
batch stops when every row has. `recompute=True` runs the whole prefix through the model at every
step instead (no cache): the reference the rollout benchmark compares against.

Under tensor parallelism the logits are gathered over the vocabulary shards, and every TP rank draws
with an identically seeded generator, so all ranks sample the same tokens. Padded vocabulary entries
are never sampled.

Under pipeline parallelism `model` is the rank's list of model chunks (one per virtual stage). Each
forward runs the chunks in pipeline order: a stage receives the previous stage's hidden states, runs its
layers against its own KV cache (each rank's static inference context holds the keys and values of the
layers it owns) and sends its output on; the last stage samples, and the drawn tokens are broadcast to
every stage of the pipeline, so all ranks hold the same rows and stop together. One batch is in flight
at a time: stages wait on each other (the pipeline bubble of decoding without micro-batches).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import comm


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0


@dataclass(frozen=True)
class Generated:
    tokens: torch.Tensor  # [batch, prompt_max + max_new], pad after each row's end
    prompt_lengths: torch.Tensor  # [batch]
    response_lengths: torch.Tensor  # [batch], stop token included
    new_tokens: int  # tokens generated (rows × steps actually sampled)


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> torch.Tensor:
    """One token per row from [batch, vocab] logits."""
    if s.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs > s.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _pipeline_forward(chunks: list[torch.nn.Module], tokens: torch.Tensor, positions: torch.Tensor,
                      **kwargs: object) -> torch.Tensor | None:  # fmt: skip
    """The output of the model's last chunk on the last pipeline stage (None on the other stages): every
    chunk in pipeline order, hidden states [s, b, h] passed from stage to stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_attr_wrapped_model

    pp = ps.get_pipeline_model_parallel_world_size()
    if pp == 1 and len(chunks) == 1:
        only: torch.Tensor = chunks[0](tokens, positions, None, **kwargs)
        return only
    stage = ps.get_pipeline_model_parallel_rank()
    config = get_attr_wrapped_model(chunks[0], "config")
    seq = tokens.shape[1] // (config.tensor_model_parallel_size if config.sequence_parallel else 1)
    shape = (seq, tokens.shape[0], config.hidden_size)
    out: torch.Tensor | None = None
    for v, chunk in enumerate(chunks):
        first, last = stage == 0 and v == 0, stage == pp - 1 and v == len(chunks) - 1
        set_input = get_attr_wrapped_model(chunk, "set_input_tensor")
        if not first:
            set_input(comm.recv_from_previous_stage(shape, config.pipeline_dtype, tokens.device))
        out = chunk(tokens, positions, None, **kwargs)
        if not first:
            set_input(None)
        if not last:
            assert out is not None
            comm.send_to_next_stage(out)
    return out if stage == pp - 1 else None


@torch.no_grad()
def generate(
    model: torch.nn.Module | list[torch.nn.Module], prompts: list[list[int]], *, max_new: int, sampling: Sampling, stop: list[int],
    pad: int, vocab_size: int, generator: torch.Generator, recompute: bool = False,
) -> Generated:  # fmt: skip
    from megatron.core import parallel_state as ps
    from megatron.core.inference.contexts import StaticInferenceContext

    chunks = model if isinstance(model, list) else [model]
    last_stage = ps.get_pipeline_model_parallel_rank() == ps.get_pipeline_model_parallel_world_size() - 1
    device = next(chunks[0].parameters()).device
    batch = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    shortest, total = int(lengths.min()), int(lengths.max()) + max_new
    tokens = torch.full((batch, total), pad, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, device=device)
    stops = torch.tensor(stop, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    produced = torch.zeros(batch, dtype=torch.long, device=device)
    positions = torch.arange(total, device=device).unsqueeze(0).expand(batch, total)
    was_training = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    ctx = None if recompute else StaticInferenceContext(batch, total)

    def logits_at(pos: int) -> torch.Tensor | None:
        """Logits for the token at `pos` (from the prefix before it), on the last pipeline stage."""
        if ctx is None:
            out = _pipeline_forward(chunks, tokens[:, :pos], positions[:, :pos], runtime_gather_output=True)
        elif ctx.sequence_len_offset == 0:
            out = _pipeline_forward(chunks, tokens[:, :pos], positions[:, :pos], inference_context=ctx,
                                    runtime_gather_output=True)  # fmt: skip
            ctx.sequence_len_offset = pos
        else:
            out = _pipeline_forward(chunks, tokens[:, pos - 1 : pos], positions[:, pos - 1 : pos],
                                    inference_context=ctx, runtime_gather_output=True)  # fmt: skip
            ctx.sequence_len_offset += 1
        return None if out is None else out[:, -1, :vocab_size]

    steps = 0
    try:
        for pos in range(shortest, total):
            logits = logits_at(pos)
            if last_stage:
                assert logits is not None
                drawn = sample(logits, sampling, generator)
            else:
                drawn = torch.empty(batch, dtype=torch.long, device=device)
            drawn = comm.pipeline_broadcast(drawn)
            generating = pos >= lengths
            active = generating & ~done
            steps += int(active.sum())
            tokens[:, pos] = torch.where(generating, torch.where(done, pad, drawn), tokens[:, pos])
            produced += active.long()
            done |= active & (torch.isin(drawn, stops) | (produced >= max_new))
            if bool(done.all()):
                break
    finally:
        for chunk, mode in zip(chunks, was_training, strict=True):
            chunk.train(mode)
    return Generated(tokens=tokens, prompt_lengths=lengths, response_lengths=produced, new_tokens=steps)
