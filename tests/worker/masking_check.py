"""Run in a fresh process (Megatron is patched for CPU there): SFT's masks on a freshly initialised model.
Prints JSON.

    python tests/worker/masking_check.py plan.json labels    # loss and gradients under label perturbations
    python tests/worker/masking_check.py plan.json packing   # padded rows against packed rows

`labels`: for each perturbation (prompt labels, assistant labels), how much the loss and the gradients
moved. `packing`: the same conversations as padded rows and as packed rows
(engine.worker.batches.SequenceRows.packed): the rows each way, the largest loss and gradient
differences, and the same with the packed rows' attention mask removed (attention then crosses the
conversations' boundaries), which must differ.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.chat import SpecialIds, render
from engine.worker.batches import SequenceRows
from engine.worker.context import Context, init_distributed, job_spec, load_plan, shutdown
from engine.worker.env import rank_info
from engine.worker.mcore import build_chunks, config_kwargs, init_layout_independent
from engine.worker.objectives import LanguageModel

IDS = SpecialIds(pad=0, bos=1, eos=2, end=3, roles={"system": 4, "user": 5, "assistant": 6})


def encode(text: str) -> list[int]:
    return [10 + ord(c) % 80 for c in text]


def dataset_of(conversations: list[list[tuple[str, str]]]) -> dict[str, Any]:
    """Samples exactly as the SFT stage loads them, from the shared chat template."""
    rendered = [render(c, encode, IDS) for c in conversations]
    return SequenceRows(pad=IDS.pad).load([{"tokens": t, "loss_mask": m} for t, m in rendered])


def loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    output, loss_func = LanguageModel("cpu").forward_step(iter([batch]), model)
    loss, _ = loss_func(output)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return float(loss), grads


def label_perturbations(model: torch.nn.Module, seq: int) -> dict[str, Any]:
    conversations = [
        [("system", "add"), ("user", "12+7="), ("assistant", "19")],
        [("user", "3+4="), ("assistant", "7"), ("user", "and 5+5="), ("assistant", "10")],
    ]
    batch = SequenceRows(pad=IDS.pad).rows(dataset_of(conversations), np.arange(len(conversations)), seq)
    base_loss, base_grads = loss_and_grads(model, batch)
    out: dict[str, Any] = {"assistant_tokens": int(batch["loss_mask"].sum()),
                           "prompt_tokens": int((batch["loss_mask"] == 0).sum())}  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for name, where in (("prompt", batch["loss_mask"] == 0), ("assistant", batch["loss_mask"] == 1)):
        labels = batch["labels"].clone()
        noise = torch.randint(10, 90, labels.shape, generator=gen)
        labels[where] = (labels[where] + noise[where]) % 96
        loss, grads = loss_and_grads(model, {**batch, "labels": labels})
        out[name] = {"loss_change": abs(loss - base_loss), "grad_change": float((grads - base_grads).abs().max())}
    return out


def packing(model: torch.nn.Module, seq: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    conversations = []
    for n in (3, 25, 2, 7, 14, 4, 1, 9):  # lengths as chat data has them: most short, one long
        words = "".join(chr(97 + int(c)) for c in rng.integers(0, 26, n))
        conversations.append([("user", words[: n // 2 + 1]), ("assistant", words)])
    ds, shape, idx = dataset_of(conversations), SequenceRows(pad=IDS.pad), np.arange(len(conversations))
    padded = shape.rows(ds, idx, seq)
    packed = shape.packed(ds, idx, cap=seq, multiple=1)
    base_loss, base_grads = loss_and_grads(model, padded)
    loss, grads = loss_and_grads(model, packed)
    cross_loss, cross_grads = loss_and_grads(model, {k: v for k, v in packed.items() if k != "attention_mask"})
    return {
        "rows": [int(padded["tokens"].shape[0]), int(packed["tokens"].shape[0])],
        "positions": [int(padded["tokens"].numel()), int(packed["tokens"].numel())],
        "tokens": [float(padded["loss_mask"].sum()), float(packed["loss_mask"].sum())],
        "loss": abs(loss - base_loss), "grad": float((grads - base_grads).abs().max()),
        "crossing_loss": abs(cross_loss - base_loss), "crossing_grad": float((cross_grads - base_grads).abs().max()),
    }  # fmt: skip


CHECKS = {"labels": label_perturbations, "packing": packing}


def main() -> None:
    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    plan = load_plan(Path(sys.argv[1]))
    check = CHECKS[sys.argv[2]]
    job = plan.job("pretrain")
    ctx = Context(plan=plan, job=job, info=rank_info({}), device="cpu")
    training = job_spec(job).training
    init_distributed(ctx, seed=training.seed)
    try:
        from megatron.core.transformer.transformer_config import TransformerConfig

        config = TransformerConfig(**config_kwargs(job, plan.model, device="cpu", recompute=training.recompute))
        (model,) = build_chunks(job, plan.model, config, device="cpu")
        init_layout_independent([model], seed=1, std=plan.model.init_method_std, num_layers=plan.model.num_layers)
        print(json.dumps(check(model, plan.model.seq_length)))
    finally:
        shutdown()


if __name__ == "__main__":
    main()
