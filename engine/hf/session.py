"""Megatron-Core in this one process: the GPTModel of a checkpoint's architecture, on the CPU, at TP1/PP1.

Export and import build the same model the workers train, through the workers' own functions
(`init_distributed` with the CPU compatibility layer, `config_kwargs`, `build_chunks`, the checkpoint
loader), in a world of one gloo process. dist_checkpointing reshards on load, so a checkpoint saved
at any TP/PP layout loads here whole.
"""

from __future__ import annotations

import os
import shutil
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..compile.plan import PLAN_FORMAT, Job, JobResources, Plan
from ..compile.resolve import Layout, ResolvedModel, ResolvedPrecision
from ..errors import EngineError
from ..schema import LOCAL
from ..worker import checkpoint
from ..worker.context import Context, init_distributed, shutdown
from ..worker.env import RankInfo
from ..worker.mcore import Built, build_chunks, config_kwargs

ONE_PROCESS = Layout(
    world_size=1, tp=1, pp=1, vpp=1, cp=1, dp=1, sequence_parallel=False, distributed_optimizer=False,
    embedding_in_pipeline_split=False, loss_in_pipeline_split=False,
)  # fmt: skip


@dataclass(frozen=True)
class Session:
    """A GPTModel (eval mode, fp32, CPU) and the one-process context it was built in."""

    ctx: Context
    model: Any
    built: Built


def one_process_plan(name: str, model: ResolvedModel) -> tuple[Plan, Job]:
    """A plan of one CPU job at TP1/PP1: what the worker functions read their settings from."""
    job = Job(
        name=name, kind=name, depends_on=(), inputs=(), outputs=(), env={}, argv=(), estimate=None, cache_key="",
        resources=JobResources(device="cpu", nodes=1, gpus_per_node=0, processes_per_node=1,
                               time_limit=LOCAL.default_time_limit),
        layout=ONE_PROCESS, precision=ResolvedPrecision(dtype="fp32", fp8_recipe=None, fp8_param_gather=False),
        config={},
    )  # fmt: skip
    plan = Plan(
        format=PLAN_FORMAT, engine_version=__version__, recipe=name, description="", recipe_hash="", run_dir="",
        cluster=LOCAL, tokenizer={}, model=model, jobs=(job,),
    )  # fmt: skip
    return plan, job


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def megatron(name: str, architecture: dict[str, Any]) -> Iterator[Session]:
    """Megatron-Core initialised in this process with a freshly built model of `architecture`."""
    # The worker's filters: Megatron-Core announces its PyTorch fallbacks on every CPU machine.
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed")
    warnings.filterwarnings("ignore", message="full scope is deprecated")
    warnings.filterwarnings("ignore", message=r"Please use DTensor instead", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"`load_state_dict` is deprecated", category=FutureWarning)
    from megatron.core.transformer.transformer_config import TransformerConfig

    try:
        model = ResolvedModel.model_validate(architecture)
    except ValueError as exc:
        raise EngineError(f"cannot build the model of this architecture: {exc}") from None
    plan, job = one_process_plan(name, model)
    ctx = Context(plan=plan, job=job, info=RankInfo(0, 1, 0, "127.0.0.1", _free_port()), device="cpu")
    init_distributed(ctx, seed=0)
    try:
        config = TransformerConfig(**config_kwargs(job, model, device="cpu", recompute="none"))
        (gpt,) = build_chunks(job, model, config, device="cpu")
        gpt.eval()
        yield Session(ctx=ctx, model=gpt, built=Built(chunks=[gpt], optimizer=None, scheduler=None, config=config))
    finally:
        shutdown()


def load(session: Session, path: Path) -> None:
    """The checkpoint's weights into the session's model (any saved layout)."""
    checkpoint.load(path, session.built, layout=ONE_PROCESS.model_dump(), model_only=True)


def weights(session: Session) -> dict[str, torch.Tensor]:
    """The model's parameters by their (TP1) names: the state dict without Megatron's extra states."""
    state = session.model.state_dict()
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def set_weights(session: Session, tensors: dict[str, torch.Tensor]) -> None:
    """Copy every parameter from `tensors`; a missing, extra or misshapen tensor is an error."""
    own = weights(session)
    missing, extra = sorted(own.keys() - tensors.keys()), sorted(tensors.keys() - own.keys())
    if missing or extra:
        raise EngineError(f"the converted weights do not fit the model: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for name, target in own.items():
            if tuple(tensors[name].shape) != tuple(target.shape):
                raise EngineError(f"{name}: shape {tuple(tensors[name].shape)}, the model has {tuple(target.shape)}")
            target.copy_(tensors[name].to(target.dtype))


def save(session: Session, folder: Path) -> None:
    """The model as a Megatron distributed checkpoint (weights only) into an empty folder."""
    from megatron.core import dist_checkpointing

    checkpoint.results_queue(background=False)  # a synchronous save in this process, no writer process
    dist_checkpointing.save(checkpoint.model_state(session.built.chunks), str(folder))


def logits(session: Session, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, seq, padded vocab] next-token logits of a [batch, seq] batch of token ids."""
    batch, seq = tokens.shape
    positions = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    with torch.no_grad():
        out: torch.Tensor = session.model(tokens, positions, None)
    return out


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out`, renamed to `out` only when the block finishes: a failed export
    or import leaves nothing behind that looks complete."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EngineError(f"{out} exists and is not empty; choose a new output folder")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
