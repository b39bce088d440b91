"""Who a worker process is and what it runs: the job's context, and the distributed set-up around it.

`Context` carries the plan, this process's job, its rank and its device; `spec_of` re-validates any
job's config (this one's, or an earlier stage's it reads from) into that kind's recipe model, so that
stage code reads typed fields, never strings out of a dict. `init_distributed` starts torch.distributed
(gloo on CPU, NCCL on GPUs) and Megatron-Core's parallel state with the job's TP/PP/VPP/CP, and seeds
the RNGs; `shutdown` undoes both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from ..artifacts import read_json
from ..compile import Job, Plan
from ..errors import EngineError
from ..kinds import kind_of
from ..schema import Spec
from .env import RankInfo

S = TypeVar("S", bound=Spec)


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

    def spec_of(self, stage: str, model: type[S]) -> S:
        """The recipe model of a stage of this plan (this job's, or one it reads), validated from its config."""
        spec = job_spec(self.plan.job(stage))
        if not isinstance(spec, model):
            raise EngineError(f"stage {stage!r} is a {type(spec).__name__}, not a {model.__name__}")
        return spec


def job_spec(job: Job) -> Any:
    """A job's config as its kind's recipe model (the plan carries it as JSON)."""
    from pydantic import ValidationError

    try:
        return kind_of(job.kind).model.model_validate(job.config)
    except ValidationError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EngineError(f"job {job.name!r}: its config in plan.json is not a valid {job.kind} stage ({first}); "
                          "recompile the recipe with this engine version") from None  # fmt: skip


def load_plan(path: Path) -> Plan:
    try:
        return Plan.model_validate(read_json(path))
    except (OSError, ValueError) as exc:
        raise EngineError(f"cannot read the plan {path}: {exc}") from None


def init_distributed(ctx: Context, *, seed: int) -> None:
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
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def init_group(ctx: Context) -> None:
    """A gloo process group for a job without a layout whose tasks meet between passes (a sharded data
    stage on several nodes): barriers only, so it waits as long as the slowest task may take."""
    import torch.distributed as dist

    info = ctx.info
    os.environ.setdefault("MASTER_ADDR", info.master_addr)
    os.environ.setdefault("MASTER_PORT", str(info.master_port))
    dist.init_process_group("gloo", rank=info.rank, world_size=info.world_size, timeout=timedelta(days=7))


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        import sys

        if "megatron.core" in sys.modules:  # a job with a layout; a data job's group has no parallel state
            from megatron.core import parallel_state as ps

            ps.destroy_model_parallel()
        dist.destroy_process_group()
