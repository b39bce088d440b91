"""Outputs of a checkpoint on a fixed batch, at any parallel layout: the check that resharding works.

    python -m torch.distributed.run --nproc-per-node=N -m engine.worker.probe plan.json --job NAME --out f.pt

Loads the job's newest checkpoint at the job's own layout, runs the first validation micro-batch
through the pipeline (forward only) and writes, from the last pipeline stage, the logits gathered
over tensor-parallel ranks (language models) or the scores of the first held-out preference pairs
(reward models), with the tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..artifacts import read_manifest
from ..errors import EXIT_USER_ERROR, EngineError
from ..kinds import KINDS
from ..schema import DataStage, PretrainStage, RewardModelStage, TrainingStage
from . import checkpoint
from .batches import ChatBatches, PairRows
from .context import Context, init_distributed, load_plan, shutdown
from .env import rank_info
from .gpt_datasets import build_datasets, microbatches
from .mcore import build_job
from .objectives import pair_scores


def _forward(data: Iterator[dict[str, torch.Tensor]], model: Any) -> tuple[torch.Tensor, Any]:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    batch = next(data)
    logits = model(batch["tokens"], batch["position_ids"], None)

    def collect(output: torch.Tensor, non_loss_data: bool = False) -> Any:
        return gather_from_tensor_model_parallel_region(output).detach(), batch["tokens"]

    return logits, collect


def _scores(data: Iterator[dict[str, torch.Tensor]], model: Any) -> tuple[torch.Tensor, Any]:
    batch = next(data)
    values = model(batch["tokens"], batch["position_ids"], None)

    def collect(output: torch.Tensor, non_loss_data: bool = False) -> Any:
        return pair_scores(output, batch["last"]).detach(), batch["tokens"]

    return values, collect


def probe(ctx: Context, out: Path) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    job, lay, plan = ctx.job, ctx.job.layout, ctx.plan
    assert lay is not None
    spec = ctx.spec_of(job.name, TrainingStage)
    reward = KINDS[job.kind].produces == "reward_model"
    built = build_job(job, plan.model, training=spec.training, device=ctx.device, steps=1,
                      head="scalar" if reward else "lm")  # fmt: skip
    latest = checkpoint.latest_checkpoint(Path(job.outputs[0].path))
    if latest is None:
        raise EngineError(f"stage {job.name!r} has no checkpoint to probe")
    checkpoint.load(latest, built, layout=lay.model_dump(), model_only=True)
    mbs = spec.training.micro_batch_size
    dp_rank = ps.get_data_parallel_rank()
    ref = KINDS[job.kind].data_reference
    if ref is None:
        raise EngineError(f"stage {job.name!r} ({job.kind}) reads no data stage to probe with")
    data_stage: str = getattr(spec, ref.field)
    root = plan.dataset(data_stage)
    if isinstance(spec, RewardModelStage):
        pad = int(read_manifest(root)["tokenizer"]["pad"])
        data = ChatBatches(plan, job, data=data_stage, training=spec.training, batching=spec.batching,
                           shape=PairRows(pad=pad))  # fmt: skip
        make, seq, _ = data.valid_batches(dp_rank)[0]
        forward, rows = _scores, 2 * mbs
    else:
        mixture = spec.mixture if isinstance(spec, PretrainStage) else None
        sources = ctx.spec_of(data_stage, DataStage).sources
        _, valid, _ = build_datasets(root, sources=sources, mixture=mixture, stage=job.name,
                                     seq_length=plan.model.seq_length, train_samples=1, valid_samples=mbs * lay.dp,
                                     seed=0, cache=ctx.stage_dir / "cache")  # fmt: skip
        make = partial(microbatches, valid, start=0, num=1, mbs=mbs, dp=lay.dp, dp_rank=dp_rank)
        forward, rows, seq = _forward, mbs, plan.model.seq_length
    for chunk in built.chunks:
        chunk.eval()
    with torch.no_grad():
        result = get_forward_backward_func()(
            forward_step_func=forward,
            data_iterator=[make() for _ in built.chunks] if len(built.chunks) > 1 else make(),
            model=built.chunks if len(built.chunks) > 1 else built.chunks[0],
            num_microbatches=1, seq_length=seq, micro_batch_size=rows,
            forward_only=True, collect_non_loss_data=True,
        )  # fmt: skip
    if result and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        output, tokens = result[0]
        key = "scores" if reward else "logits"
        torch.save({key: output.float().cpu(), "tokens": tokens.cpu(), "checkpoint": latest.name}, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.worker.probe")
    parser.add_argument("plan", type=Path)
    parser.add_argument("--job", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed")
    warnings.filterwarnings("ignore", message="full scope is deprecated")  # Megatron's own default
    info = rank_info(os.environ)
    try:
        plan = load_plan(args.plan)
        job = plan.job(args.job)
        ctx = Context(plan=plan, job=job, info=info, device=job.resources.device)
        init_distributed(ctx, seed=ctx.spec_of(job.name, TrainingStage).training.seed)
        probe(ctx, args.out)
    except EngineError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
