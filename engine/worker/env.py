"""Who this process is: rank, world size and rendezvous, from torchrun's or Slurm's environment."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import EngineError


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: `gpu[003-010,012],login1` → `gpu003`."""
    m = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise EngineError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def rank_info(environ: Mapping[str, str]) -> RankInfo:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; srun sets SLURM_PROCID/NTASKS/LOCALID."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return RankInfo(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", "0")),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", "29500")),
        )
    if "SLURM_PROCID" in environ:
        job_id = int(environ.get("SLURM_JOB_ID", "0"))
        return RankInfo(
            rank=int(environ["SLURM_PROCID"]),
            world_size=int(environ["SLURM_NTASKS"]),
            local_rank=int(environ.get("SLURM_LOCALID", "0")),
            master_addr=environ.get("MASTER_ADDR") or first_host(environ["SLURM_JOB_NODELIST"]),
            # A port derived from the job id keeps concurrent jobs on one node apart.
            master_port=int(environ.get("MASTER_PORT", str(20000 + job_id % 20000))),
        )
    return RankInfo(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=29500)


def cpu_threads(environ: Mapping[str, str], *, processes_per_node: int) -> int:
    """Intra-op CPU threads for this process: OMP_NUM_THREADS when it is set (the launchers set it), else
    this process's share of the cores it may run on, so that processes do not oversubscribe the cores.
    Fixed and printed: a CPU kernel may split its sums by thread, so the count is part of a run's setup."""
    given = environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    return max(1, len(os.sched_getaffinity(0)) // max(1, processes_per_node))
