"""The worker: `python -m engine.worker <plan.json> --job NAME`, on every rank of a job.

Started by torchrun locally or by srun under Slurm. It reads its job from the plan, re-validates the
job's config into its kind's recipe model (once: stage code takes that typed spec), sets up
torch.distributed and Megatron-Core's parallel state for training jobs (engine.worker.context), and
hands over to the stage module its kind names in the registry (engine.kinds): `run(ctx, spec)`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from ..artifacts import mark_done
from ..errors import EXIT_USER_ERROR, EngineError
from ..kinds import kind_of
from ..lineage import write_lineage
from ..schema import TrainingStage
from . import preempt
from .context import Context, init_distributed, init_group, job_spec, load_plan, shutdown
from .env import cpu_threads, rank_info


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
        stage = importlib.import_module(kind_of(job.kind).worker)
        spec = job_spec(job)
        ctx = Context(plan=plan, job=job, info=info, device=job.resources.device)
        threads = cpu_threads(os.environ, processes_per_node=job.resources.processes_per_node)
        torch.set_num_threads(threads)
        if ctx.is_logger:
            print(f"[{job.name}] {info.world_size} process{'es' if info.world_size > 1 else ''} × {threads} CPU "
                  f"thread{'s' if threads > 1 else ''}", flush=True)  # fmt: skip
        preempt.install()
        if isinstance(spec, TrainingStage):
            init_distributed(ctx, seed=spec.training.seed)
        elif info.world_size > 1:  # a sharded data stage's tasks on several nodes; otherwise one process
            init_group(ctx)
        stage.run(ctx, spec)
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
