"""The plan: a frozen, JSON-serialisable DAG of jobs, the compiler's output and the launchers' input.

The same recipe gives a byte-identical plan.json: no timestamps, no absolute paths that the recipe
did not write, keys sorted. Each job carries everything a launcher and a worker need: resources,
parallel layout, precision, input and output artifacts, environment, the worker's argv and the
estimates, plus a cache key that changes whenever the job or anything upstream of it changes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from .. import __version__
from ..errors import EngineError, Problem, RecipeError
from ..kinds import KINDS
from ..schema import ClusterProfile, DataStage, Recipe, Stage, TrainingStage, TrainTokenizer
from ..schema.stages import is_checkpoint_path
from .data_estimate import DataEstimate, estimate_data
from .estimate import GIB, Estimate, estimate_job, fits, human_bytes
from .resolve import (
    Frozen,
    Layout,
    ResolvedModel,
    ResolvedPrecision,
    resolve_cluster,
    resolve_layout,
    resolve_model,
    resolve_precision,
    resolve_steps,
    resolve_vocab,
)
from .validate import validate

PLAN_FORMAT = 1


class Artifact(Frozen):
    stage: str
    kind: Literal["dataset", "tokenizer", "checkpoint"]
    path: str


class JobResources(Frozen):
    device: Literal["cpu", "cuda"]
    nodes: int
    gpus_per_node: int
    processes_per_node: int
    time_limit: str
    cpus_per_process: int = 1  # the data stage's worker pool runs in its process


class Job(Frozen):
    name: str
    kind: str
    depends_on: tuple[str, ...]
    resources: JobResources
    layout: Layout | None
    precision: ResolvedPrecision | None
    inputs: tuple[Artifact, ...]
    outputs: tuple[Artifact, ...]
    env: dict[str, str]
    argv: tuple[str, ...]
    estimate: Estimate | None
    config: dict[str, Any]
    cache_key: str
    data_estimate: DataEstimate | None = None  # a data stage's: its input and wall time


class Plan(Frozen):
    format: int
    engine_version: str
    recipe: str
    description: str
    recipe_hash: str
    run_dir: str
    cluster: ClusterProfile
    tokenizer: dict[str, Any]
    model: ResolvedModel
    jobs: tuple[Job, ...]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"

    def job(self, name: str) -> Job:
        for j in self.jobs:
            if j.name == name:
                return j
        raise EngineError(f"plan {self.recipe!r} has no job {name!r}; jobs: {', '.join(j.name for j in self.jobs)}")

    def dataset(self, stage: str) -> Path:
        """The dataset folder of the data stage named `stage`."""
        found = next((a.path for a in self.job(stage).outputs if a.kind == "dataset"), None)
        if found is None:
            raise EngineError(f"stage {stage!r} of plan {self.recipe!r} is not a data stage: it has no dataset")
        return Path(found)


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=False, separators=(",", ":")).encode()).hexdigest()


def recipe_hash(recipe: Recipe) -> str:
    return _digest(recipe.model_dump(mode="json"))


def compile_recipe(recipe: Recipe, *, force: bool = False, source: str = "") -> Plan:
    """Validate, resolve and estimate a recipe into a Plan; every problem is raised as one RecipeError."""
    cluster, problems = resolve_cluster(recipe.cluster)
    vocab, vocab_problems = resolve_vocab(recipe)
    model, model_problems = resolve_model(recipe.model, vocab)
    problems += vocab_problems + model_problems
    problems += validate(recipe, cluster, model)
    if problems or cluster is None or model is None:
        raise RecipeError(problems, source=source)
    run_dir = recipe.run_dir or f"runs/{recipe.name}"
    jobs: list[Job] = []
    for name, stage in recipe.stages.items():
        jobs.append(_job(name, stage, recipe, cluster, model, run_dir, {j.name: j for j in jobs}))
    if not force:
        problems = [_memory_problem(j, cluster) for j in jobs if j.estimate and not fits(j.estimate.memory, cluster)]
        if problems:
            raise RecipeError(problems, source=source)
    return Plan(
        format=PLAN_FORMAT,
        engine_version=__version__,
        recipe=recipe.name,
        description=recipe.description,
        recipe_hash=recipe_hash(recipe),
        run_dir=run_dir,
        cluster=cluster,
        tokenizer={**recipe.tokenizer.model_dump(mode="json"), "vocab_size": model.vocab_size},
        model=model,
        jobs=tuple(jobs),
    )


def _references(stage: Stage) -> list[str]:
    """The earlier stages this one reads; a checkpoint directory given as init_from is no stage."""
    refs = KINDS[stage.kind].references
    return [v for r in refs if isinstance(v := getattr(stage, r.field), str) and not is_checkpoint_path(v)]


def _job(
    name: str,
    stage: Stage,
    recipe: Recipe,
    cluster: ClusterProfile,
    model: ResolvedModel,
    run_dir: str,
    earlier: dict[str, Job],
) -> Job:
    refs = _references(stage)
    kind = KINDS[stage.kind]
    tokenizer_stage = next((n for n, s in recipe.stages.items() if KINDS[s.kind].produces == "data"), None)
    trains_tokenizer = isinstance(recipe.tokenizer, TrainTokenizer)
    if kind.produces != "data" and trains_tokenizer and tokenizer_stage and tokenizer_stage not in refs:
        refs.append(tokenizer_stage)
    depends = tuple(dict.fromkeys(refs))
    inputs = tuple(a for r in depends for a in earlier[r].outputs)
    config = stage.model_dump(mode="json")
    argv = ("python", "-m", "engine.worker", f"{run_dir}/plan.json", "--job", name)
    key_material: dict[str, Any] = {
        "format": PLAN_FORMAT,
        "kind": stage.kind,
        "config": config,
        "parents": [earlier[d].cache_key for d in depends],
    }
    common: dict[str, Any] = dict(
        name=name, kind=stage.kind, depends_on=depends, inputs=inputs, argv=argv, config=config
    )
    if not isinstance(stage, TrainingStage):
        outputs = [Artifact(stage=name, kind="dataset", path=f"{run_dir}/{name}/data")]
        if trains_tokenizer and name == tokenizer_stage:
            outputs.append(Artifact(stage=name, kind="tokenizer", path=f"{run_dir}/{name}/tokenizer"))
            key_material["tokenizer"] = recipe.tokenizer.model_dump(mode="json")
        # Sharded on a Slurm cluster: one task per shard, one per node, the shards' passes split among them.
        nodes = stage.shards if cluster.launcher == "slurm" and isinstance(stage, DataStage) else 1
        resources = JobResources(
            device="cpu",
            nodes=nodes,
            gpus_per_node=0,
            processes_per_node=1,
            time_limit=stage.time_limit or cluster.default_time_limit,
            cpus_per_process=stage.workers if isinstance(stage, DataStage) else 1,
        )
        data_estimate = estimate_data(stage, cluster, processes=nodes) if isinstance(stage, DataStage) else None
        return Job(
            **common, resources=resources, layout=None, precision=None, outputs=tuple(outputs),
            env=_env(None, cluster), estimate=None, cache_key=_digest(key_material), data_estimate=data_estimate,
        )  # fmt: skip
    layout = resolve_layout(stage, cluster)
    precision = resolve_precision(stage, cluster)
    steps = resolve_steps(stage, model)
    assert kind.workload is not None  # a training kind declares what its job computes
    workload = kind.workload(stage, model.seq_length)
    estimate = estimate_job(stage=stage, workload=workload, model=model, layout=layout, precision=precision,
                            cluster=cluster, steps=steps)  # fmt: skip
    key_material |= {"model": model.model_dump(mode="json"), "tokenizer": recipe.tokenizer.model_dump(mode="json")}
    gpn = layout.world_size // stage.resources.nodes
    resources = JobResources(
        device=cluster.device,
        nodes=stage.resources.nodes,
        gpus_per_node=gpn if cluster.device == "cuda" else 0,
        processes_per_node=gpn,
        time_limit=stage.resources.time_limit or cluster.default_time_limit,
    )
    return Job(
        **common, resources=resources, layout=layout, precision=precision,
        outputs=(Artifact(stage=name, kind="checkpoint", path=f"{run_dir}/{name}/checkpoints"),),
        env=_env(layout, cluster), estimate=estimate, cache_key=_digest(key_material),
    )  # fmt: skip


def _env(layout: Layout | None, cluster: ClusterProfile) -> dict[str, str]:
    """The job's environment: GPU settings for training jobs, then the cluster profile's."""
    env: dict[str, str] = {}
    if cluster.device == "cuda" and layout is not None:
        # One hardware queue keeps TP/SP communication kernels ordered ahead of the GEMMs they overlap.
        if layout.tp > 1 or layout.sequence_parallel:
            env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
        env["TORCH_NCCL_AVOID_RECORD_STREAMS"] = "1"
        env["NCCL_NVLS_ENABLE"] = "0"
    env.update(cluster.env)
    return dict(sorted(env.items()))


def _memory_problem(job: Job, cluster: ClusterProfile) -> Problem:
    m = job.estimate.memory if job.estimate else None
    if m is None:
        return Problem(f"stages.{job.name}", "has no estimate", "")
    parts = ", ".join(
        f"{k} {human_bytes(v)}"
        for k, v in (
            ("weights", m.weights),
            ("grads", m.gradients),
            ("optimizer", m.optimizer),
            ("activations", m.activations),
            ("kv cache", m.kv_cache),
            ("frozen models", m.frozen_models),
            ("overhead", m.overhead),
        )
        if v
    )
    hbm = cluster.hbm_gib or 0
    return Problem(
        f"stages.{job.name}",
        f"estimated {m.total / GIB:.1f} GiB per GPU exceeds the {hbm:g} GiB of a {cluster.gpu} ({parts})",
        "raise tp/pp, turn on recompute or the distributed optimizer, lower micro_batch_size; or pass --force",
    )


__all__ = ["Artifact", "Job", "JobResources", "Plan", "compile_recipe", "recipe_hash"]
