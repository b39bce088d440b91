"""Atomic, resumable, reshardable checkpoints with Megatron-Core's dist_checkpointing.

A save writes into `.tmp-step_N/`, adds meta.json once every rank has finished, and only then renames
the folder to `step_N/` and updates `latest`. A kill at any moment — during the save included —
therefore leaves every `step_*` folder complete, and the newest one is what a restarted job resumes
from. Older checkpoints are pruned to `keep_last` only after a newer one is in place.

With `checkpointing.async_save` the same protocol runs in the background (`Background`): the ranks hand
their tensors to Megatron-Core's asynchronous writer (a forked process per save, writing into
`.tmp-step_N-<id>/`, a name no other attempt uses) and go on training; a later step, once every rank's
writer has finished, runs the completion — meta.json, the rename, `latest`, pruning to `keep_last` — on
every rank at once. At most one save is in flight: a new one waits for the previous. A kill before the
completion leaves only a `.tmp-` folder, which the restarted job removes, exactly as for a synchronous
save.

What is saved: the model (per virtual pipeline chunk), the optimizer, the learning-rate schedule, the
step and consumed samples, and every rank's RNG states. dist_checkpointing stores tensors by their
global keys, so a checkpoint written at one TP/PP layout loads at another; RNG states belong to a
layout and are restored only when the layout is unchanged.
"""

from __future__ import annotations

import queue
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..artifacts import fsync_dir, read_object, write_json_atomic
from ..errors import EngineError
from . import comm
from .faults import maybe_kill

STEP_DIR = re.compile(r"^step_(\d{8})$")
META = "meta.json"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A folder only gets its final name once complete."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / META).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's meta.json (a user error naming the file when it is unreadable or not an object)."""
    return read_object(path / META, "the checkpoint's meta.json")


def read_model_meta(path: Path) -> dict[str, Any]:
    """meta.json of a checkpoint a model is built from: it must describe the architecture and the tokenizer."""
    return read_object_meta(path, required=("architecture", "tokenizer"))


def read_object_meta(path: Path, *, required: tuple[str, ...]) -> dict[str, Any]:
    """meta.json with the sections a reader needs (each a user error naming the file when missing)."""
    return read_object(path / META, "the checkpoint's meta.json", required=required)


def _layout_key(layout: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(layout[k] for k in ("tp", "pp", "vpp", "cp", "dp"))


def _unwrap(chunk: Any) -> Any:
    return getattr(chunk, "module", chunk)  # DDP wraps the GPTModel


def model_state(chunks: list[Any]) -> dict[str, Any]:
    if len(chunks) == 1:
        return {"model": _unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": _unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(chunks)}


def _rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state: dict[str, Any] = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(state: dict[str, Any] | None) -> Any:
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size(with_context_parallel=True))  # fmt: skip
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank(with_context_parallel=True))  # fmt: skip
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


def full_state(built: Any, *, step: int, consumed: int, with_rng: bool, loading: bool) -> dict[str, Any]:
    state = model_state(built.chunks)
    state["optimizer"] = built.optimizer.sharded_state_dict(state, is_loading=loading)
    state["scheduler"] = built.scheduler.state_dict()
    state["progress"] = {"step": step, "consumed_samples": consumed}
    if with_rng:
        state["rng"] = _rng_sharded(None if loading else _rng_state())
    return state


def results_queue(*, background: bool) -> None:
    """Where Megatron's file writer sends its results, without the spawned multiprocessing Manager it would
    start (a process that outlives a SIGKILLed worker and holds its stdout open): a plain queue for a
    synchronous save, whose results stay in this process; a queue shared with the forked writer of a
    background save."""
    import multiprocessing
    import multiprocessing.queues

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    current = getattr(filesystem_async, "_results_queue", None)
    if background and not isinstance(current, multiprocessing.queues.Queue):
        filesystem_async._results_queue = multiprocessing.get_context("fork").Queue()
    elif current is None:
        filesystem_async._results_queue = queue.Queue()


class Background:
    """Checkpoints written in the background (`checkpointing.async_save`), at most one at a time.

    `poll()` after every step completes a save whose writers have all finished (a collective: every rank
    calls it at the same step); `wait()` blocks until the save in flight is complete (before a new save,
    before a requeue, at the end); `abort()` stops a writer without collectives (on an error).
    """

    def __init__(self) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue(persistent=False)  # a forked writer per save, no long-lived process

    def poll(self) -> None:
        self.queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        self.queue.maybe_finalize_async_calls(blocking=True)

    def abort(self) -> None:
        self.queue.close(abort=True)


def save(
    root: Path, built: Any, *, step: int, consumed: int, meta: dict[str, Any], keep_last: int,
    background: Background | None = None,
) -> Path:  # fmt: skip
    """Save atomically on all ranks; returns the final folder (with `background`: the folder it will have once
    the save completes on a later step)."""
    from megatron.core import dist_checkpointing

    final = root / step_name(step)
    if background is not None:
        background.wait()  # one save in flight: completions stay in step order
        tmp = root / f".tmp-{step_name(step)}-{_attempt()}"
    else:
        tmp = root / f".tmp-{step_name(step)}"
    results_queue(background=background is not None)
    if comm.rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    comm.barrier()
    state = full_state(built, step=step, consumed=consumed, with_rng=True, loading=False)
    record = {**meta, "step": step, "consumed_samples": consumed}
    if background is None:
        dist_checkpointing.save(state, str(tmp))
        comm.barrier()
        maybe_kill("in_save", step)
        _complete(root, tmp, final, record, keep_last)
        return final
    request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
    request.add_finalize_fn(lambda: _complete(root, tmp, final, record, keep_last))
    background.queue.schedule_async_request(request)
    maybe_kill("in_async_save", step)
    return final


def _complete(root: Path, tmp: Path, final: Path, record: dict[str, Any], keep_last: int) -> None:
    """Every rank's data is written: rank 0 adds meta.json, renames the folder into place, moves `latest` and
    prunes; then every rank goes on."""
    if comm.rank() == 0:
        write_json_atomic(tmp / META, record)
        if final.exists():  # a rerun reached the same step again: replace it only now
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(root)
        (root / ".latest.tmp").write_text(final.name + "\n")
        (root / ".latest.tmp").replace(root / "latest")
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    comm.barrier()


def _attempt() -> str:
    """A name part every rank agrees on and no earlier attempt used: an orphaned writer of a killed job
    can never write into a later attempt's folder."""
    import secrets

    mine = float(secrets.randbelow(10**9)) if comm.rank() == 0 else 0.0  # the sum over ranks is rank 0's
    return f"{int(comm.all_reduce(torch.tensor([mine]))[0]):09d}"


def remove_partial(root: Path) -> None:
    """Drop saves that a kill interrupted (rank 0, before anything else touches the folder)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def load(
    path: Path, built: Any, *, layout: dict[str, Any], model_only: bool, fresh: tuple[str, ...] = ()
) -> tuple[int, int]:
    """Load a checkpoint into built; returns (step, consumed samples), (0, 0) for model-only loads.

    `fresh` names parameter prefixes that a model-only load leaves as initialised, for modules the
    checkpoint cannot have (a reward model's scalar head on a language model's backbone).
    """
    from megatron.core import dist_checkpointing

    meta = read_meta(path)
    if model_only:
        state = model_state(built.chunks)
        for part in state.values():
            for key in [k for k in part if k.startswith(fresh)] if fresh else []:
                del part[key]
    else:
        same_layout = _layout_key(meta["layout"]) == _layout_key(layout)
        state = full_state(built, step=0, consumed=0, with_rng=same_layout, loading=True)
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        loaded = dist_checkpointing.load(state, str(path))
    except (Exception, CheckpointException) as exc:  # a damaged or foreign checkpoint
        raise EngineError(f"checkpoint {path} cannot be loaded ({_first_cause(exc)}); its files are damaged or do "
                          "not match the architecture its meta.json describes: restore it, or start from another "
                          "checkpoint") from None  # fmt: skip
    names = ["model"] if len(built.chunks) == 1 else [f"model{i}" for i in range(len(built.chunks))]
    for name, chunk in zip(names, built.chunks, strict=True):
        result = _unwrap(chunk).load_state_dict(loaded[name], strict=not fresh)
        if fresh:
            left = [k for k in result.missing_keys if not k.startswith(fresh)]
            if left or result.unexpected_keys:
                raise RuntimeError(f"{path}: missing {left}, unexpected {result.unexpected_keys}")
    if model_only:
        optimizer = getattr(built, "optimizer", None)
        if optimizer is not None:  # bf16/fp16: the optimizer's fp32 main weights still hold the old values
            optimizer.reload_model_params()
        return 0, 0
    built.optimizer.load_state_dict(loaded["optimizer"])
    built.scheduler.load_state_dict(loaded["scheduler"])
    if "rng" in loaded:
        _set_rng_state(loaded["rng"])
    progress = loaded["progress"]
    return int(progress["step"]), int(progress["consumed_samples"])


def load_weights(path: Path, chunks: list[Any], *, layout: dict[str, Any], fresh: tuple[str, ...] = ()) -> None:
    """A checkpoint's weights into model chunks that have no optimizer (frozen models, a critic's start)."""
    load(path, SimpleNamespace(chunks=chunks), layout=layout, model_only=True, fresh=fresh)


def _first_cause(exc: BaseException) -> str:
    """What went wrong loading, in one line: torch's CheckpointException carries each rank's own error."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        cause = next(iter(failures.values()))
        exc = cause[0] if isinstance(cause, tuple) and cause else cause  # (error, its remote traceback)
    text = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
