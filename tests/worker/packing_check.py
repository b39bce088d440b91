"""Run in a fresh process (Megatron is patched for CPU there): SFT's loss and gradients on the same
conversations as padded rows and as packed rows (engine.worker.batches.SequenceRows.packed). Prints
JSON: the rows each way, the largest loss and gradient differences, and the same with the packed rows'
attention mask removed (attention then crosses the conversations' boundaries), which must differ.

    python tests/worker/packing_check.py plan.json
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


def loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    output, loss_func = LanguageModel("cpu").forward_step(iter([batch]), model)
    loss, _ = loss_func(output)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return float(loss), grads


def main() -> None:
    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29541"))
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
        rng = np.random.default_rng(0)
        conversations = []
        for n in (3, 25, 2, 7, 14, 4, 1, 9):  # lengths as chat data has them: most short, one long
            words = "".join(chr(97 + int(c)) for c in rng.integers(0, 26, n))
            conversations.append([("user", words[: n // 2 + 1]), ("assistant", words)])
        rendered = [render(c, encode, IDS) for c in conversations]
        ds = {"tokens": Ragged.of([t for t, _ in rendered]), "mask": Ragged.of([m for _, m in rendered], np.uint8)}
        ds["lengths"] = ds["tokens"].lengths - 1
        cap = plan.model.seq_length
        shape, idx = SequenceRows(pad=IDS.pad), np.arange(len(rendered))
        padded = shape.rows(ds, idx, cap)
        packed = shape.packed(ds, idx, cap=cap, multiple=1)
        base_loss, base_grads = loss_and_grads(model, padded)
        loss, grads = loss_and_grads(model, packed)
        crossing = {k: v for k, v in packed.items() if k != "attention_mask"}
        cross_loss, cross_grads = loss_and_grads(model, crossing)
        print(json.dumps({
            "rows": [int(padded["tokens"].shape[0]), int(packed["tokens"].shape[0])],
            "positions": [int(padded["tokens"].numel()), int(packed["tokens"].numel())],
            "tokens": [float(padded["loss_mask"].sum()), float(packed["loss_mask"].sum())],
            "loss": abs(loss - base_loss), "grad": float((grads - base_grads).abs().max()),
            "grad_scale": float(base_grads.abs().max()),
            "crossing_loss": abs(cross_loss - base_loss), "crossing_grad": float((cross_grads - base_grads).abs().max()),
        }))  # fmt: skip
    finally:
        shutdown()


if __name__ == "__main__":
    main()
