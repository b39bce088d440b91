"""The sections every training stage shares: parallelism, precision, training, checkpoints, resources."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import TIME_LIMIT_PATTERN, Spec
from .cluster import Fp8Recipe


class Parallelism(Spec):
    """Megatron-Core's parallel layout. Data parallelism is derived: dp = GPUs / (tp·pp·cp)."""

    tp: int = Field(default=1, gt=0, le=1024, description="tensor parallel size; divides heads and query groups")
    pp: int = Field(default=1, gt=0, le=1024, description="pipeline parallel size; divides layers")
    vpp: int | None = Field(
        default=None, gt=0, le=1024, description="virtual pipeline chunks per stage (interleaved 1F1B); needs pp>1"
    )
    cp: int = Field(default=1, gt=0, le=1024, description="context parallel size; sequence split across GPUs")
    sequence_parallel: bool = Field(default=False, description="shard activations along sequence; needs tp>1")
    account_for_embedding_in_pipeline_split: bool = Field(
        default=False,
        description="count the embedding as a layer when splitting layers over pipeline stages "
        "(uneven splits such as 126 layers at pp×vpp=64)",
    )
    account_for_loss_in_pipeline_split: bool = Field(
        default=False, description="count the output layer and loss as a layer in the pipeline split"
    )
    distributed_optimizer: bool | None = Field(
        default=None,
        description="shard optimizer state across data-parallel ranks (ZeRO-1); default: on for GPUs, "
        "off on CPU, where Megatron-Core cannot run it",
    )


class Precision(Spec):
    """Numeric format of weights and activations."""

    dtype: Literal["auto", "fp32", "bf16", "fp8"] = Field(
        default="auto",
        description="auto = bf16 on GPUs, fp32 on CPU; fp8 = bf16 weights with FP8 GEMMs (Transformer Engine)",
    )
    fp8_recipe: Fp8Recipe | None = Field(
        default=None,
        description="FP8 scaling recipe when dtype=fp8: delayed, tensorwise (current scaling), "
        "mxfp8 (Blackwell) or blockwise",
    )
    fp8_param_gather: bool = Field(
        default=False, description="keep FP8 weight copies and all-gather them in FP8 (saves memory)"
    )


class Training(Spec):
    """Optimisation: length, batch, learning-rate schedule, regularisation and seed."""

    steps: int | None = Field(default=None, gt=0, le=10**10, description="optimizer steps (set this or tokens)")
    tokens: int | None = Field(
        default=None,
        gt=0,
        le=10**16,
        description="training tokens; steps = ceil(tokens / (global batch·seq length))",
    )
    global_batch_size: int = Field(gt=0, le=10**8, description="sequences per optimizer step, over all replicas")
    micro_batch_size: int = Field(default=1, gt=0, le=10**6, description="sequences per forward pass on one GPU")
    lr: float = Field(gt=0, description="peak learning rate")
    min_lr: float = Field(default=0.0, ge=0, description="learning rate at the end of the decay")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="decay after warmup: cosine or linear to min_lr, or constant"
    )
    warmup_steps: int = Field(default=0, ge=0, le=10**10, description="linear warmup from 0 to lr over this many steps")
    weight_decay: float = Field(default=0.1, ge=0, description="decoupled weight decay (AdamW)")
    grad_clip: float | None = Field(default=1.0, gt=0, description="clip the global gradient norm; none: off")
    adam_beta1: float = Field(default=0.9, gt=0, lt=1, description="Adam β1")
    adam_beta2: float = Field(default=0.95, gt=0, lt=1, description="Adam β2")
    adam_eps: float = Field(default=1e-8, gt=0, description="Adam ε")
    seed: int = Field(default=1234, ge=0, le=2**32 - 1, description="random seed of init, dropout and data order")
    eval_interval: int | None = Field(
        default=None, gt=0, le=10**10, description="steps between validation runs; none: only at the end"
    )
    eval_iters: int = Field(default=10, gt=0, le=10**6, description="validation batches per evaluation")
    recompute: Literal["none", "selective", "full"] = Field(
        default="none",
        description="activation recomputation: selective (attention core) or full (every layer)",
    )


class Checkpointing(Spec):
    """Megatron-Core distributed checkpoints: how often, and how many to keep."""

    interval: int | None = Field(default=None, gt=0, le=10**10, description="steps between checkpoints; none: only at the end")
    keep_last: int = Field(default=2, gt=0, le=10**4, description="keep this many newest complete checkpoints")
    async_save: bool = Field(
        default=False,
        description="write checkpoints in the background (Megatron-Core's asynchronous writer); training goes on "
        "while a save is written, and a later step completes it",
    )


class Resources(Spec):
    """What the job asks the cluster for."""

    nodes: int = Field(default=1, gt=0, le=100_000, description="nodes")
    gpus_per_node: int | None = Field(
        default=None,
        gt=0,
        le=1024,
        description="GPUs per node (local CPU: worker processes); default: the cluster profile's",
    )
    time_limit: str | None = Field(
        default=None,
        pattern=TIME_LIMIT_PATTERN,
        description="wall-clock limit (Slurm format, e.g. 04:00:00); default: the cluster profile's",
    )
