"""Run under torchrun (Megatron is patched for CPU there): KV-cache generation against full recompute,
and vocabulary-parallel log-probabilities and entropy against torch's. Rank 0 prints JSON. Under pipeline
parallelism (the plan's pretrain layout) only generation runs, through the pipeline.

    python -m torch.distributed.run --nproc-per-node=N tests/worker/generation_check.py plan.json
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch

from engine.worker.context import Context, init_distributed, job_spec, load_plan, shutdown
from engine.worker.env import rank_info
from engine.worker.generate import Sampling, generate
from engine.worker.logprobs import vocab_parallel_logp_entropy
from engine.worker.mcore import build_chunks, config_kwargs, init_layout_independent


def main() -> None:
    warnings.filterwarnings("ignore")
    plan = load_plan(Path(sys.argv[1]))
    job = plan.job("pretrain")
    ctx = Context(plan=plan, job=job, info=rank_info(os.environ), device="cpu")
    training = job_spec(job).training
    init_distributed(ctx, seed=training.seed)
    try:
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
        from megatron.core.transformer.transformer_config import TransformerConfig

        config = TransformerConfig(**config_kwargs(job, plan.model, device="cpu", recompute=training.recompute))
        chunks = build_chunks(job, plan.model, config, device="cpu")
        init_layout_independent(chunks, seed=3, std=0.2, num_layers=plan.model.num_layers)
        prompts = [[5, 9, 13], [7, 8, 21, 30, 31, 2], [40, 41, 42, 43]]
        out: dict[str, object] = {}
        for name, sampling in (("greedy", Sampling(temperature=0.0)), ("sampled", Sampling(0.9, top_k=20, top_p=0.9))):
            for cache in (True, False):
                got = generate(chunks, prompts, max_new=10, sampling=sampling, stop=[1], pad=0, vocab_size=96,
                               generator=torch.Generator().manual_seed(11), recompute=not cache)  # fmt: skip
                out[f"{name}_{'cache' if cache else 'recompute'}"] = {
                    "tokens": got.tokens.tolist(), "responses": got.response_lengths.tolist(),
                }  # fmt: skip
        if len(chunks) > 1 or (job.layout is not None and job.layout.pp > 1):
            if torch.distributed.get_rank() == 0:
                print(json.dumps(out))
            return
        (model,) = chunks
        tokens = torch.tensor([[5, 9, 13, 17, 19, 23], [7, 8, 21, 30, 31, 2]])
        labels = torch.roll(tokens, -1, dims=1)
        model.eval()
        with torch.no_grad():
            logits = model(tokens, torch.arange(6).expand(2, 6), None)
            logp, entropy = vocab_parallel_logp_entropy(logits, labels)
            full = torch.log_softmax(gather_from_tensor_model_parallel_region(logits).float(), dim=-1)
        out["logp_error"] = float((logp - full.gather(-1, labels.unsqueeze(-1)).squeeze(-1)).abs().max())
        out["entropy_error"] = float((entropy - (-(full.exp() * full).sum(-1))).abs().max())
        out["logp"] = logp.tolist()
        if torch.distributed.get_rank() == 0:
            print(json.dumps(out))
    finally:
        shutdown()


if __name__ == "__main__":
    main()
