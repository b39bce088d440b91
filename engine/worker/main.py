"""The worker: `python -m engine.worker <plan.json> --job NAME`, on every rank of a job.

Started by torchrun locally or by srun under Slurm. It reads its job from the plan, sets up
torch.distributed (gloo on CPU, NCCL on GPUs) and Megatron-Core's parallel state with the job's
TP/PP/VPP/CP, seeds the RNGs, and hands over to the stage's function from one explicit table.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from ..artifacts import mark_done, read_json
from ..compile import Job, Plan
from ..errors import EXIT_USER_ERROR, EngineError
from ..lineage import write_lineage
from . import preempt
from .env import RankInfo, rank_info


@dataclass(frozen=True)
class Context:
    plan: Plan
    job: Job
    info: RankInfo
    device: str

    @property
    def stage_dir(self) -> Path:
        return Path(self.job.outputs[0].path).parent

    @property
    def is_logger(self) -> bool:
        return self.info.rank == 0


def _stages() -> dict[str, Callable[[Context], None]]:
    from .stages import data, ppo, pretrain, reward, sft

    return {"data": data.run, "pretrain": pretrain.run, "sft": sft.run, "reward_model": reward.run, "ppo": ppo.run}


def load_plan(path: Path) -> Plan:
    try:
        return Plan.model_validate(read_json(path))
    except (OSError, ValueError) as exc:
        raise EngineError(f"cannot read the plan {path}: {exc}") from None


def init_distributed(ctx: Context) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    info, lay = ctx.info, ctx.job.layout
    assert lay is not None
    if ctx.device == "cpu":
        from . import cpu_compat

        cpu_compat.apply()
        backend = "gloo"
    else:
        torch.cuda.set_device(info.local_rank)
        backend = "nccl"
    os.environ.setdefault("MASTER_ADDR", info.master_addr)
    os.environ.setdefault("MASTER_PORT", str(info.master_port))
    dist.init_process_group(backend, rank=info.rank, world_size=info.world_size, timeout=timedelta(minutes=30))
    if info.world_size != lay.world_size:
        raise EngineError(f"job {ctx.job.name} expects {lay.world_size} processes, got {info.world_size}")
    ps.initialize_model_parallel(
        tensor_model_parallel_size=lay.tp,
        pipeline_model_parallel_size=lay.pp,
        virtual_pipeline_model_parallel_size=lay.vpp if lay.vpp > 1 else None,
        context_parallel_size=lay.cp,
    )
    seed = int(ctx.job.config["training"]["seed"])
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if dist.is_initialized():
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.worker")
    parser.add_argument("plan", type=Path)
    parser.add_argument("--job", required=True)
    args = parser.parse_args(argv)
    info = rank_info(os.environ)
    # Megatron-Core warns at import that it falls back to PyTorch kernels without TE or apex; on GPU
    # the missing TE is an error raised at model construction instead.
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed")
    warnings.filterwarnings("ignore", message="full scope is deprecated")  # Megatron's own default
    # Megatron's checkpoint loader still goes through torch's deprecated ShardedTensor API.
    warnings.filterwarnings("ignore", message=r"Please use DTensor instead", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"`load_state_dict` is deprecated", category=FutureWarning)
    try:
        plan = load_plan(args.plan)
        job = plan.job(args.job)
        stage = _stages().get(job.kind)
        if stage is None:
            raise EngineError(f"stage kind {job.kind!r} has no worker yet")
        ctx = Context(plan=plan, job=job, info=info, device=job.resources.device)
        preempt.install()
        if job.layout is not None:  # training jobs; a data job is one process without a process group
            init_distributed(ctx)
        stage(ctx)
        if info.rank == 0:
            write_lineage(plan, job)
            mark_done(ctx.stage_dir, job.cache_key)
    except EngineError as exc:
        if info.rank == 0:
            # One line: the local launcher shows it in place of torchrun's failure report.
            print("error: " + exc.render().replace("\n", " "), file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except preempt.Preempted:
        return preempt.EXIT_PREEMPTED
    finally:
        shutdown()
    return 0
