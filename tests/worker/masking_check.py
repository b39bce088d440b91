"""Run in a fresh process (Megatron is patched for CPU there): SFT's loss and gradients under label
perturbations. Prints JSON: for each perturbation, how much the loss and the gradients moved.

    python tests/worker/masking_check.py plan.json
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from engine.chat import SpecialIds, render
from engine.worker.batches import Ragged, SequenceRows
from engine.worker.context import Context, init_distributed, job_spec, load_plan, shutdown
from engine.worker.env import rank_info
from engine.worker.mcore import build_chunks, config_kwargs, init_layout_independent
from engine.worker.objectives import LanguageModel

IDS = SpecialIds(pad=0, bos=1, eos=2, end=3, roles={"system": 4, "user": 5, "assistant": 6})


def encode(text: str) -> list[int]:
    return [10 + ord(c) % 80 for c in text]


def batch_of(conversations: list[list[tuple[str, str]]], seq: int) -> dict[str, torch.Tensor]:
    """Rows exactly as the SFT stage builds them, from the shared chat template."""
    rendered = [render(c, encode, IDS) for c in conversations]
    dataset = {"tokens": Ragged.of([t for t, _ in rendered]), "mask": Ragged.of([m for _, m in rendered], np.uint8)}
    return SequenceRows(pad=IDS.pad).rows(dataset, np.arange(len(rendered)), seq)


def loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    output, loss_func = LanguageModel("cpu").forward_step(iter([batch]), model)
    loss, _ = loss_func(output)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return float(loss), grads


def main() -> None:
    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    plan = load_plan(Path(sys.argv[1]))
    job = plan.job("pretrain")
    ctx = Context(plan=plan, job=job, info=rank_info({}), device="cpu")
    training = job_spec(job).training
    init_distributed(ctx, seed=training.seed)
    try:
        from megatron.core.transformer.transformer_config import TransformerConfig

        config = TransformerConfig(**config_kwargs(job, plan.model, device="cpu", recompute=training.recompute))
        (model,) = build_chunks(job, plan.model, config, device="cpu")
        init_layout_independent([model], seed=1, std=plan.model.init_method_std, num_layers=plan.model.num_layers)
        conversations = [
            [("system", "add"), ("user", "12+7="), ("assistant", "19")],
            [("user", "3+4="), ("assistant", "7"), ("user", "and 5+5="), ("assistant", "10")],
        ]
        batch = batch_of(conversations, plan.model.seq_length)
        base_loss, base_grads = loss_and_grads(model, batch)
        out = {"assistant_tokens": int(batch["loss_mask"].sum()), "prompt_tokens": int((batch["loss_mask"] == 0).sum())}
        gen = torch.Generator().manual_seed(0)
        for name, where in (("prompt", batch["loss_mask"] == 0), ("assistant", batch["loss_mask"] == 1)):
            labels = batch["labels"].clone()
            noise = torch.randint(10, 90, labels.shape, generator=gen)
            labels[where] = (labels[where] + noise[where]) % 96
            loss, grads = loss_and_grads(model, {**batch, "labels": labels})
            out[name] = {"loss_change": abs(loss - base_loss), "grad_change": float((grads - base_grads).abs().max())}
        print(json.dumps(out))
    finally:
        shutdown()


if __name__ == "__main__":
    main()
