"""Run under torchrun (Megatron is patched for CPU there): an objective with a frozen reference model in the
shared training loop, at the pretrain job's layout. Writes JSON to OUT, one entry per rank.

    python -m torch.distributed.run --nproc-per-node=N tests/worker/objective_check.py plan.json OUT

The objective is language modelling that also reports the reference's per-token log-probabilities of
the same labels. The loop builds the reference from a checkpoint of the initial weights, loads it and
keeps it frozen, runs its forward step through the pipeline schedule ahead of every pass, and delivers
its per-token outputs to every rank. Each rank records what reached it, the reported values of two
training steps and a validation pass, and whether the reference's weights changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.worker import checkpoint
from engine.worker.context import Context, init_distributed, job_spec, load_plan, shutdown
from engine.worker.env import rank_info
from engine.worker.logprobs import vocab_parallel_logp_entropy
from engine.worker.loop import evaluate, train_step
from engine.worker.mcore import build_job
from engine.worker.objectives import Batch, FrozenModel, LanguageModel, LossFunc
from engine.worker.train import build_frozen_models, with_frozen_outputs

SEQ, MBS, VOCAB = 16, 2, 96


def reference_logp(data: Iterator[Batch], model: Any) -> tuple[torch.Tensor, LossFunc]:
    """The frozen model's forward step: log π_ref(label) per token."""
    batch = next(data)
    logits = model(batch["tokens"], batch["position_ids"], None)

    def collect(output: torch.Tensor, non_loss_data: bool = False) -> torch.Tensor:
        return vocab_parallel_logp_entropy(output, batch["labels"])[0].detach()

    return logits, collect


@dataclass(frozen=True)
class WithReference(LanguageModel):
    """Language modelling that also reports the delivered reference log-probabilities of its labels."""

    keys: tuple[str, ...] = ("loss", "nll_sum", "tokens", "ref_logp_sum")
    frozen: tuple[FrozenModel, ...] = field(default_factory=tuple)

    def forward_step(self, data: Iterator[Batch], model: Any) -> tuple[torch.Tensor, LossFunc]:
        batch = next(data)
        output, lm_loss = super().forward_step(iter([batch]), model)

        def loss_func(per_token: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            loss, report = lm_loss(per_token)
            ref = (batch["reference"] * batch["loss_mask"]).sum()
            return loss, {**report, "ref_logp_sum": ref}

        return output, loss_func


def batches(step: int, nmb: int) -> Any:
    """The same micro-batches on every rank: seeded tokens, next-token labels, full loss mask."""

    def make() -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(1000 + step)
        for _ in range(nmb):
            tokens = torch.randint(2, VOCAB, (MBS, SEQ + 1), generator=gen)
            yield {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                   "loss_mask": torch.ones(MBS, SEQ), "position_ids": torch.arange(SEQ).expand(MBS, SEQ).contiguous()}  # fmt: skip

    return make


def digest(chunks: list[Any]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        for name, p in sorted(chunk.named_parameters()):
            h.update(name.encode() + p.detach().float().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    warnings.filterwarnings("ignore")
    plan = load_plan(Path(sys.argv[1]))
    out_path = Path(sys.argv[2])
    job = plan.job("pretrain")
    spec = job_spec(job)
    ctx = Context(plan=plan, job=job, info=rank_info(os.environ), device="cpu")
    init_distributed(ctx, seed=spec.training.seed)
    try:
        assert job.layout is not None
        built = build_job(job, plan.model, training=spec.training, device="cpu", steps=4)
        initial = Path(plan.run_dir) / "initial"
        checkpoint.save(initial, built, step=0, consumed=0, meta={"layout": job.layout.model_dump()}, keep_last=1)
        ref = FrozenModel(name="reference", head="lm", checkpoint=initial / checkpoint.step_name(0),
                          forward_step=reference_logp)  # fmt: skip
        objective = WithReference("cpu", frozen=(ref,))
        frozen = build_frozen_models(ctx, objective, recompute="none")
        before = digest(frozen[0].chunks)
        policy = [getattr(c, "module", c) for c in built.chunks]
        nmb = spec.training.global_batch_size // (MBS * job.layout.dp)
        schedule: dict[str, Any] = dict(forward_step=objective.forward_step, mbs=MBS, keys=objective.keys,
                                        num_microbatches=nmb, seq_length=SEQ)  # fmt: skip
        record: dict[str, Any] = {"steps": [], "reference_is_initial_policy": digest(policy) == before}
        for step in range(2):
            make = with_frozen_outputs(frozen, batches(step, nmb), num_microbatches=nmb, seq_length=SEQ, mbs=MBS)
            if step == 0:
                record["delivered"] = [b["reference"].tolist() for b in make()]
            result = train_step(built, make, **schedule)
            record["steps"].append(result.values)
        make = with_frozen_outputs(frozen, batches(7, nmb), num_microbatches=nmb, seq_length=SEQ, mbs=MBS)
        record["valid"] = evaluate(built, make, **schedule)
        record["reference_unchanged"] = digest(frozen[0].chunks) == before
        record["reference_frozen"] = all(not p.requires_grad for c in frozen[0].chunks for p in c.parameters())
        record["policy_changed"] = digest(policy) != before
        rank = torch.distributed.get_rank()
        (out_path / f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        shutdown()


if __name__ == "__main__":
    main()
