"""Run in a fresh process (Megatron is patched for CPU there): SFT's masks on a freshly initialised model.
Prints JSON.

    python tests/worker/masking_check.py plan.json labels    # loss and gradients under label perturbations
    python tests/worker/masking_check.py plan.json packing   # padded rows against packed rows
    python tests/worker/masking_check.py plan.json pairs     # the same for preference pairs (RM, DPO)

`labels`: for each perturbation (prompt labels, assistant labels), how much the loss and the gradients
moved. `packing`: the same conversations as padded rows and as packed rows
(engine.worker.batches.SequenceRows.packed): the rows each way, the largest loss and gradient
differences (packed rows go through Megatron-Core's THD inputs, the local spec's varlen attention:
engine.worker.attention), and the same with one THD boundary around everything (attention then crosses the
conversations' boundaries), which must differ. `pairs`: ranked pairs as padded and as packed rows
(engine.worker.batches.PairRows.packed) through the reward model's loss (a scalar-head model) and DPO's
(with RPO's NLL term, against reference log-probabilities of the same rows), and the reference's
per-sequence log-probabilities themselves: the same differences.
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
from engine.worker.batches import PairRows, SequenceRows
from engine.worker.context import Context, init_distributed, job_spec, load_plan, shutdown
from engine.worker.env import rank_info
from engine.worker.mcore import build_chunks, config_kwargs, init_layout_independent
from engine.worker.objectives import DirectPreference, LanguageModel, PairwisePreference, ReferenceLogps

IDS = SpecialIds(pad=0, bos=1, eos=2, end=3, roles={"system": 4, "user": 5, "assistant": 6})


def encode(text: str) -> list[int]:
    return [10 + ord(c) % 80 for c in text]


def dataset_of(conversations: list[list[tuple[str, str]]]) -> dict[str, Any]:
    """Samples exactly as the SFT stage loads them, from the shared chat template."""
    rendered = [render(c, encode, IDS) for c in conversations]
    return SequenceRows(pad=IDS.pad).load([{"tokens": t, "loss_mask": m} for t, m in rendered])


def loss_and_grads(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], objective: Any = None
) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    output, loss_func = (objective or LanguageModel("cpu")).forward_step(iter([batch]), model)
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
    cross_loss, cross_grads = loss_and_grads(model, _one_boundary(packed))
    return {
        "rows": [int(padded["tokens"].shape[0]), int(packed["tokens"].shape[0])],
        "positions": [int(padded["tokens"].numel()), int(packed["tokens"].numel())],
        "tokens": [float(padded["loss_mask"].sum()), float(packed["loss_mask"].sum())],
        "loss": abs(loss - base_loss), "grad": float((grads - base_grads).abs().max()),
        "crossing_loss": abs(cross_loss - base_loss), "crossing_grad": float((cross_grads - base_grads).abs().max()),
    }  # fmt: skip


def _differences(
    model: torch.nn.Module, padded: dict[str, Any], packed: dict[str, Any], objective: Any
) -> dict[str, float]:
    base_loss, base_grads = loss_and_grads(model, padded, objective)
    loss, grads = loss_and_grads(model, packed, objective)
    cross_loss, cross_grads = loss_and_grads(model, _one_boundary(packed), objective)
    return {"loss": abs(loss - base_loss), "grad": float((grads - base_grads).abs().max()),
            "crossing_loss": abs(cross_loss - base_loss),
            "crossing_grad": float((cross_grads - base_grads).abs().max())}  # fmt: skip


def pairs(model: torch.nn.Module, seq: int, scalar: torch.nn.Module) -> dict[str, Any]:
    rng = np.random.default_rng(1)

    def text(n: int) -> list[int]:
        return encode("".join(chr(97 + int(c)) for c in rng.integers(0, 26, n)))

    end = [IDS.end, IDS.eos]  # a reply closes as the template closes it; the mask stops at the end of turn
    samples = [{"prompt": text(p), "chosen": text(c) + end, "rejected": text(r) + end}
               for p, c, r in ((4, 3, 20), (9, 2, 2), (3, 14, 5), (6, 1, 8), (2, 25, 3))]  # fmt: skip
    shape = PairRows(pad=IDS.pad, stop=(IDS.end,))
    ds, idx = shape.load(samples), np.array([0, 1, 2, 3, 4, -1])  # a filler pair, as validation has
    padded, packed = shape.rows(ds, idx, seq), shape.packed(ds, idx, cap=seq, multiple=1)
    reference = ReferenceLogps("cpu")
    with torch.no_grad():
        refs = []
        for batch in (padded, packed):
            out, collect = reference.forward_step(iter([batch]), model)
            refs.append(collect(out, non_loss_data=True))
    # DPO against slightly different reference values, so that the loss is not at its h = 0 point.
    ref = refs[0] + torch.linspace(-0.5, 0.5, len(refs[0]))
    dpo = DirectPreference("cpu", loss="sigmoid", beta=0.1, rpo_alpha=1.0)
    return {
        "rows": [int(padded["tokens"].shape[0]), int(packed["tokens"].shape[0])],
        "positions": [int(padded["tokens"].numel()), int(packed["tokens"].numel())],
        # Sums over a response's tokens (|log p| up to ~200 here): float32 rounding is relative.
        "reference_relative": float(((refs[0] - refs[1]).abs() / refs[0].abs().clamp(min=1.0)).max()),
        "reward_model": _differences(scalar, padded, packed, PairwisePreference("cpu", margin=0.0)),
        "dpo": _differences(model, {**padded, "reference": ref}, {**packed, "reference": ref}, dpo),
    }  # fmt: skip


def _one_boundary(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The packed rows with one THD boundary around everything: attention crosses every sequence's end."""
    n = int(packed["tokens"].numel())
    return {
        **packed,
        "cu_seqlens": torch.tensor([0, n], dtype=torch.int32),
        "max_seqlen": torch.tensor(n, dtype=torch.int32),
    }


CHECKS = {"labels": label_perturbations, "packing": packing, "pairs": pairs}


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
        extra: dict[str, Any] = {}
        if check is pairs:
            (extra["scalar"],) = build_chunks(job, plan.model, config, device="cpu", head="scalar")
            init_layout_independent([extra["scalar"]], seed=2, std=plan.model.init_method_std,
                                    num_layers=plan.model.num_layers)  # fmt: skip
        print(json.dumps(check(model, plan.model.seq_length, **extra)))
    finally:
        shutdown()


if __name__ == "__main__":
    main()
