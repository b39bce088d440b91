"""Host offload of a colocated role between the phases that use it (the RL stage's `offload`).

A role is a model's chunks and, for a trained model, its optimizer: parameters, buffers, the gradient
buffers Megatron's DDP keeps (`main_grad` views), the optimizer's master weights and its states. To
offload it, every distinct storage behind those tensors is copied to host memory (pinned on a GPU) and
then resized to nothing, so its device memory is freed while every tensor, view and reference to it
(the optimizer's parameter lists, DDP's buckets) stays in place; bringing it back resizes each storage
and copies the bytes in. Tensors keep their identity, so nothing needs to be rebuilt or re-registered,
and a model used while it is offloaded fails at once (its storages hold no bytes) instead of computing
on stale values. On the CPU the copy is a real one too (host buffer, then the original storage freed),
so a run with offloading computes exactly what a run without it does: the test that offloading changes
no result runs there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def _tensors(chunks: list[Any], optimizer: Any = None) -> Iterator[torch.Tensor]:
    for chunk in chunks:
        for p in chunk.parameters():
            yield p
            grad = getattr(p, "main_grad", None)
            if isinstance(grad, torch.Tensor):
                yield grad
        yield from torch.nn.Module.buffers(chunk)  # Megatron's DDP names its gradient buffers `buffers`
    if optimizer is None:
        return
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    for opt in inner:
        torch_opt = getattr(opt, "optimizer", opt)
        for group in torch_opt.param_groups:
            yield from group["params"]
        for state in torch_opt.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))
        for group in getattr(opt, "fp32_from_float16_groups", None) or []:
            yield from group


class Role:
    """One offloadable role: `offload()` frees its device memory, `load()` brings it back; `resident()` is a
    context in which it is loaded (and after which it is offloaded again when `enabled`)."""

    def __init__(self, name: str, chunks: list[Any], optimizer: Any = None, *, enabled: bool) -> None:
        self.name, self.chunks, self.optimizer, self.enabled = name, chunks, optimizer, enabled
        self._held: list[tuple[torch.UntypedStorage, torch.Tensor]] = []

    @property
    def offloaded(self) -> bool:
        return bool(self._held)

    @property
    def host_bytes(self) -> int:
        """Bytes held in host memory while offloaded (0 while it is on its device)."""
        return sum(host.numel() for _, host in self._held)

    def _storages(self) -> Iterable[torch.UntypedStorage]:
        seen: set[int] = set()
        for t in _tensors(self.chunks, self.optimizer):
            storage = t.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in seen:  # empty, offloaded, or seen through a view
                continue
            seen.add(storage.data_ptr())
            yield storage

    def offload(self) -> None:
        if self.offloaded:
            return
        held = []
        for storage in self._storages():
            device = storage.device
            view = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
            host = torch.empty(view.numel(), dtype=torch.uint8, pin_memory=device.type == "cuda")
            host.copy_(view, non_blocking=device.type == "cuda")
            held.append((storage, host))
        if held and held[0][0].device.type == "cuda":
            torch.cuda.synchronize()
        for storage, _ in held:
            storage.resize_(0)
        self._held = held

    def load(self) -> None:
        for storage, host in self._held:
            storage.resize_(host.numel())
            torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage).copy_(host, non_blocking=True)
        if self._held and self._held[0][0].device.type == "cuda":
            torch.cuda.synchronize()
        self._held = []

    @contextmanager
    def resident(self) -> Iterator[None]:
        self.load()
        try:
            yield
        finally:
            if self.enabled:
                self.offload()

    def resident_bytes(self) -> int:
        """Bytes its tensors hold on their device now (0 while offloaded)."""
        return sum(s.nbytes() for s in self._storages())
