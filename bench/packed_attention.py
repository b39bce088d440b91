"""Where packed rows lose to bucketed ones on the CPU: forward and backward of the same conversations as
length-bucketed rows and as rows packed across a step, through Megatron-Core's local (unfused) attention and
through PyTorch's fused `scaled_dot_product_attention` (the same weights), in one process.

512 conversations drawn like bench/packing.py's (most short, a tenth near seq_length 256) go through the
tiny preset's model (fresh weights, CPU, `--threads` threads) as:
  bucketed   the 512 sorted by length, cut into global batches of 32, micro-batches of 8 padded to their
             longest (what `batching: bucketed` does within a window);
  packed     global batches of 32 in drawn order, each packed as `batching: packed` packs a step on one
             rank (engine.worker.packing.pack_step: micro-batches of at most 8 rows of 256): with THD
             boundaries through the local spec's varlen attention (engine.worker.attention, what the stages
             run), and with a block-diagonal causal mask through either attention above.
Each variant runs `--repeats` times, interleaved; printed: real tokens/s (medians) and each one's ratio to
bucketed rows through the local attention, and the largest output difference between the two attentions.

    .venv/bin/python bench/packed_attention.py [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPE = """
name: packed-attention
cluster: local
tokenizer: {kind: train, vocab_size: 384}
model: {preset: tiny, seq_length: 256}
stages:
  data:
    kind: data
    sources:
      - {name: chats, plugin: jsonl, records: conversation, params: {glob: "unused.jsonl"}}
      - {name: text, plugin: jsonl, records: text, params: {glob: "unused.jsonl"}}
  pretrain:
    kind: pretrain
    data: data
    training: {steps: 2, global_batch_size: 8, micro_batch_size: 4, lr: 1.0e-3}
  sft:
    kind: sft
    init_from: pretrain
    data: data
    batching: packed
    training: {steps: 2, global_batch_size: 32, micro_batch_size: 8, lr: 1.0e-3}
"""


class FusedAttention(torch.nn.Module):
    """Core attention through torch's scaled_dot_product_attention: causal, or the packed rows' mask."""

    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any, attention_type: str, **kw: Any) -> None:
        super().__init__()
        self.groups = config.num_attention_heads // config.num_query_groups
        self.scale = kw.get("softmax_scale") or config.kv_channels**-0.5

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                attn_mask_type: Any = None, attention_bias: Any = None, packed_seq_params: Any = None) -> torch.Tensor:  # fmt: skip
        sq, b, h, d = query.shape
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        if self.groups > 1:
            k, v = (x.repeat_interleave(self.groups, dim=1) for x in (k, v))
        f = torch.nn.functional.scaled_dot_product_attention
        o = (
            f(q, k, v, is_causal=True, scale=self.scale)
            if attention_mask is None
            else f(q, k, v, attn_mask=~attention_mask, scale=self.scale)
        )
        return o.permute(2, 0, 1, 3).reshape(sq, b, h * d)


def masked(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Packed rows with a block-diagonal causal mask (True: masked) in place of their THD boundaries: what the
    engine's local spec used for packed rows before its varlen attention, for comparison."""
    from engine.worker.attention import row_mask

    out = {k: v for k, v in batch.items() if k not in ("cu_seqlens", "max_seqlen")}
    return {**out, "attention_mask": ~row_mask(batch["cu_seqlens"], batch["tokens"].shape[1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    import yaml

    from engine.compile import compile_recipe
    from engine.load import parse_recipe
    from engine.worker import mcore
    from engine.worker.batches import SequenceRows
    from engine.worker.context import Context, init_distributed, shutdown
    from engine.worker.env import rank_info
    from engine.worker.objectives import run_model
    from engine.worker.packing import pack_step

    with tempfile.TemporaryDirectory() as tmp:
        plan = compile_recipe(parse_recipe({**yaml.safe_load(RECIPE), "run_dir": tmp}))
    job = plan.job("sft")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29561"))
    init_distributed(Context(plan=plan, job=job, info=rank_info({}), device="cpu"), seed=1)
    try:
        from megatron.core.transformer.transformer_config import TransformerConfig

        config = TransformerConfig(**mcore.config_kwargs(job, plan.model, device="cpu", recompute="none"))
        (local,) = mcore.build_chunks(job, plan.model, config, device="cpu")
        spec = mcore.layer_spec

        def fused_spec(*a: Any, **k: Any) -> Any:
            out = spec(*a, **k)
            out.submodules.self_attention.submodules.core_attention = FusedAttention
            return out

        mcore.layer_spec = fused_spec  # type: ignore[assignment]
        (fused,) = mcore.build_chunks(job, plan.model, config, device="cpu")
        mcore.layer_spec = spec  # type: ignore[assignment]
        fused.load_state_dict(local.state_dict())

        rng = np.random.default_rng(0)
        lens = np.array([int(rng.integers(200, 250)) if rng.random() < 0.1 else int(min(rng.lognormal(3.3, 0.6), 200))
                         for _ in range(512)])  # fmt: skip
        shape = SequenceRows(pad=0)
        ds = shape.load([{"tokens": rng.integers(10, 300, n).tolist(), "loss_mask": [1] * n} for n in lens])
        sizes = shape.sizes(ds, np.arange(512), 256)
        bucketed, packed, thd = [], [], []
        by_length = np.argsort(lens, kind="stable")
        for g in range(16):
            chosen = by_length[32 * g : 32 * (g + 1)]
            for i in range(0, 32, 8):
                mb = chosen[i : i + 8]
                bucketed.append(shape.rows(ds, mb, -(-int(sizes[mb].max()) // 8) * 8))
            drawn = np.arange(32 * g, 32 * (g + 1))
            step = pack_step(sizes[drawn], np.ones(4), mbs=8, dp=1, budget=8 * 256)
            thd += [shape.packed(ds, drawn[m], cap=256, multiple=8) for m in step.ranks[0]]
        packed = [masked(b) for b in thd]
        real = int(sizes.sum())

        def loss_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            """(per-token losses, their mean over the loss mask): masked rows straight into the model (the
            stages no longer give it masks), the others through the stages' run_model."""
            if "attention_mask" in batch:
                per = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
            else:
                per = run_model(model, batch, labels=True)
            return per, (per.float() * batch["loss_mask"]).sum() / batch["loss_mask"].sum()

        def run(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
            began = time.perf_counter()
            for batch in batches:
                loss_of(model, batch)[1].backward()
            return time.perf_counter() - began

        with torch.no_grad():
            varlen_diff = max(float((loss_of(local, p)[0] - loss_of(local, q)[0])[p["loss_mask"] > 0].abs().max())
                              for p, q in zip(packed[-2:], thd[-2:], strict=True))  # fmt: skip
            diff = max(
                float((loss_of(local, b)[0] - loss_of(fused, b)[0]).abs().max()) for b in (bucketed[-1], packed[-1])
            )
        variants = {"bucketed, local attention": (local, bucketed), "bucketed, fused attention": (fused, bucketed),
                    "packed, masked local": (local, packed), "packed, masked fused": (fused, packed),
                    "packed, varlen (THD)": (local, thd)}  # fmt: skip
        times: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(args.repeats):
            names = list(variants)[r % 5 :] + list(variants)[: r % 5]
            for name in names:
                times[name].append(run(*variants[name]))
        for name, (_, batches) in variants.items():
            positions = sum(b["tokens"].numel() for b in batches)
            print(f"{name:26s} {real / statistics.median(times[name]):7.0f} real tokens/s  pad fraction "
                  f"{1 - real / positions:.3f}  micro-batches {len(batches)}")  # fmt: skip
        base = statistics.median(times["bucketed, local attention"])
        for name in variants:
            print(f"{name:26s} ×{base / statistics.median(times[name]):.2f} of bucketed, local attention")
        fb, pb = (statistics.median(times[k]) for k in ("bucketed, fused attention", "packed, masked fused"))
        print(
            f"packed / bucketed with fused attention: {fb / pb:.2f}x; largest output difference of the two attentions: {diff:.1e}"
        )
        vb, vp = (statistics.median(times[k]) for k in ("bucketed, local attention", "packed, varlen (THD)"))
        print(f"packed (varlen) / bucketed (local): {vb / vp:.2f}x; largest loss difference of packed rows, varlen "
              f"against masked: {varlen_diff:.1e}")  # fmt: skip
        print(f"({args.threads} threads, {args.repeats} interleaved repeats, 512 conversations, {real} real tokens)")
    finally:
        shutdown()


if __name__ == "__main__":
    main()
