"""Rollout generation: KV cache (Megatron-Core's static inference context) vs full recompute.

Both generate from the same model and prompts in one run: batch 16, prompts of 8–16 tokens, 128 new
tokens per row (no stop token, so every row generates all 128). "Full recompute" runs the whole
prefix through the model for every new token; the KV-cache path (engine.worker.generate, what PPO's
rollouts use) runs the prompt once and then one token per row per step. Two models: the CPU demo's
policy (recipes/tiny.yaml, 1.2M parameters) and a ~26M-parameter one (16 layers, hidden 512).
Weights are random (speed does not depend on them); greedy decoding, so both paths must produce the
same tokens, which is checked.

    .venv/bin/python bench/rollout.py [--new 128] [--batch 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "demo policy": [],
    "~26M": ["model.num_layers=16", "model.hidden_size=512", "model.num_attention_heads=8", "model.num_query_groups=8"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=int, default=128, help="new tokens per row")
    parser.add_argument("--batch", type=int, default=16, help="rows generated together")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29571")
    from engine.compile import compile_recipe
    from engine.load import load_recipe
    from engine.worker.context import Context, init_distributed, shutdown
    from engine.worker.env import rank_info
    from engine.worker.generate import Sampling, generate
    from engine.worker.mcore import build_chunks, config_kwargs, init_layout_independent

    seq = 16 + args.new
    first = True
    for name, overrides in MODELS.items():
        recipe = load_recipe(REPO / "recipes" / "tiny.yaml", [
            *overrides, f"model.seq_length={seq}", f"stages.ppo.rollout.max_new_tokens={args.new}",
            "stages.pretrain.resources.gpus_per_node=1",
        ])  # fmt: skip
        plan = compile_recipe(recipe)
        job = plan.job("pretrain")
        if first:
            init_distributed(Context(plan=plan, job=job, info=rank_info({}), device="cpu"), seed=0)
            first = False
        from megatron.core.transformer.transformer_config import TransformerConfig

        config = TransformerConfig(**config_kwargs(job, plan.model, device="cpu", recompute="none"))
        (model,) = build_chunks(job, plan.model, config, device="cpu")
        init_layout_independent([model], seed=0, std=0.02, num_layers=plan.model.num_layers)
        params = sum(p.numel() for p in model.parameters())
        gen = torch.Generator().manual_seed(0)
        prompts = [
            torch.randint(7, 384, (int(n),), generator=gen).tolist()
            for n in torch.randint(8, 17, (args.batch,), generator=gen)
        ]
        rates, outputs = {}, {}
        for label, recompute in (("kv cache", False), ("recompute", True)):
            began = time.perf_counter()
            out = generate(model, prompts, max_new=args.new, sampling=Sampling(temperature=0.0), stop=[], pad=0,
                           vocab_size=384, generator=gen, recompute=recompute)  # fmt: skip
            seconds = time.perf_counter() - began
            rates[label], outputs[label] = out.new_tokens / seconds, out.tokens
        same = torch.equal(outputs["kv cache"], outputs["recompute"])
        print(f"{name:12s} {params / 1e6:5.1f}M params  kv cache {rates['kv cache']:8.0f} tok/s   "
              f"recompute {rates['recompute']:8.0f} tok/s   ratio {rates['kv cache'] / rates['recompute']:5.2f}×   "
              f"same tokens: {same}")  # fmt: skip
    shutdown()


if __name__ == "__main__":
    main()
