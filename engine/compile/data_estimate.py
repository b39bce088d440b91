"""The data stage's wall-time estimate, from the size of its input and the cluster profile's per-MB CPU rates.

Each pass of the stage (engine.worker.stages.collect) streams its input through a main process and a pool
of `workers` processes, pipelined: the main process reads, looks signatures up and appends tokens while the
pool cleans, signs and tokenises the next batches. With `m` and `p` the CPU seconds per MB in the main
process and in the pool (ClusterProfile.data_rates, measured by bench/data_throughput.py; each run writes its
own to the stage's timing.json) and `workers` cores (what a Slurm task asks for, `--cpus-per-task`), a pass
over B MB takes

    B · max(m, (m + p) / workers)      with a pool (workers > 1): the serial part, or all cores busy
    B · (m + p)                        with one worker: everything in one process

With `shards` > 1 each task does the same on its share of the input (tasks are spread over the job's
processes: one per node on Slurm, one locally), the dedup look-ups move to their own pass, which the
estimate counts as the main process's part of cleaning, and one process then merges the parts (`merge`
per MB of input). Training a tokenizer is not counted. A source whose size cannot be known before reading
it (engine.plugin.source_size) is left out, and the estimate says so: its wall time is then a lower bound.
"""

from __future__ import annotations

import math

from .. import plugin
from ..schema import ClusterProfile, DataStage
from .resolve import Frozen


class DataEstimate(Frozen):
    input_bytes: int  # of the sources whose size is known
    unknown_sources: tuple[str, ...]  # sources whose size cannot be known before reading
    tasks: int
    processes: int
    workers: int
    passes: dict[str, float]  # seconds
    wall_time_s: float  # a lower bound when unknown_sources is not empty


def pass_seconds(mb: float, main: float, pool: float, workers: int) -> float:
    """One pipelined pass over `mb` megabytes (see the module's docstring)."""
    if workers <= 1:
        return mb * (main + pool)
    return mb * max(main, (main + pool) / workers)


def estimate_data(stage: DataStage, cluster: ClusterProfile, *, processes: int) -> DataEstimate:
    sources = plugin.data_sources()
    known, unknown = 0, []
    for src in stage.sources:
        found = sources.get(src.plugin)
        size = None
        if found is not None:
            try:
                params = found.params.model_validate(src.params)
            except ValueError:
                params = None
            size = None if params is None else plugin.source_size(found, params, src.records)
        if size is None:
            unknown.append(src.name)
        else:
            known += size
    r, w = cluster.data_rates, stage.workers
    near = stage.dedup.near
    tasks_per_process = math.ceil(stage.shards / processes)
    share = known / 1e6 / stage.shards * tasks_per_process  # MB each process works through per pass
    clean_main = r.clean_main + (r.near_main if near else 0.0)
    clean_pool = r.clean_pool + (r.near_pool if near else 0.0)
    passes = {
        "clean": pass_seconds(share, clean_main, clean_pool, w),
        "tokenize": pass_seconds(share, r.tokenize_main, r.tokenize_pool, w),
    }
    if stage.shards > 1:
        passes["merge"] = known / 1e6 * r.merge
    return DataEstimate(
        input_bytes=known, unknown_sources=tuple(unknown), tasks=stage.shards, processes=processes, workers=w,
        passes={k: round(v, 3) for k, v in passes.items()}, wall_time_s=round(sum(passes.values()), 3),
    )  # fmt: skip


__all__ = ["DataEstimate", "estimate_data", "pass_seconds"]
