"""Megatron-Core on CPU: the one place where its CUDA literals are neutralised.

Megatron-Core 0.16 trains correctly on CPU with gloo (TP, PP, VPP, distributed checkpoints and
resharding) once a handful of hard-coded CUDA call sites are pointed at the CPU:

* `torch.cuda.current_device()` and `device="cuda"` literals in the global memory buffer, the gradient buffers, the FP32
  optimizer, gradient clipping, the pipeline schedules and their point-to-point buffers, tensor-parallel gathers, the default causal mask, rotary embeddings
  and the checkpoint writers. Each of those modules gets a module-scoped `torch` that forwards everything to
  the real torch but maps CUDA placement to the CPU and makes `torch.cuda.synchronize()` a no-op.
* gradient clipping asserts `param.grad.type() == 'torch.cuda.FloatTensor'`: the optimizer gets a
  CPU version of `clip_grad_by_total_norm_fp32`.
* the CUDA RNG tracker (`model_parallel_cuda_manual_seed`, `get_cuda_rng_tracker`; attention always
  forks it): it tracks CPU generator states instead.
* `.cuda()` on the tied embedding copy when pp > 1: `Tensor.cuda` returns the tensor itself.

`apply()` is called only by CPU workers. `check()` verifies that every patched symbol is still where
this module expects it; a test fails loudly when a Megatron-Core upgrade moves one, instead of a
silent wrong patch. Keep every CPU-specific work-around in this file.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

# Module → the CUDA literals it must still contain for its patch to be needed and correct.
PROXIED_MODULES: dict[str, tuple[str, ...]] = {
    "megatron.core.utils": ("torch.cuda.current_device()",),
    "megatron.core.distributed.param_and_grad_buffer": ("torch.cuda.current_device()",),
    "megatron.core.optimizer.optimizer": ("device='cuda'",),
    "megatron.core.optimizer.clip_grads": ("device='cuda'", "'torch.cuda.FloatTensor'"),
    "megatron.core.pipeline_parallel.schedules": ('device="cuda"',),
    "megatron.core.tensor_parallel.mappings": ("torch.cuda.current_device()",),
    "megatron.core.pipeline_parallel.p2p_communication": ("torch.cuda.current_device()",),
    "megatron.core.transformer.utils": ('device="cuda"',),
    "megatron.core.dist_checkpointing.strategies.filesystem_async": ("torch.cuda.synchronize()",),
    "megatron.core.dist_checkpointing.strategies.async_utils": ("torch.cuda.current_device()",),
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": ("torch.cuda.current_device()",),
    "megatron.core.tensor_parallel.random": ("torch.cuda.get_rng_state()", "torch.cuda.manual_seed"),
    "megatron.core.models.common.language_module.language_module": ("weight.data.cuda()",),
    "megatron.core.models.common.embeddings.rotary_pos_embedding": ("torch.cuda.current_device()",),
    "megatron.core.transformer.attention": ("torch.cuda.current_device()",),  # the inference KV cache
}
# Module → attributes this file replaces or relies on.
REPLACED: dict[str, tuple[str, ...]] = {
    "megatron.core.optimizer.optimizer": ("clip_grad_by_total_norm_fp32", "FP32Optimizer"),
    "megatron.core.tensor_parallel.random": (
        "CudaRNGStatesTracker",
        "_get_cuda_rng_state",
        "_set_cuda_rng_state",
        "model_parallel_cuda_manual_seed",
        "get_cuda_rng_tracker",
        "initialize_rng_tracker",
    ),
    "megatron.core.transformer.utils": ("get_default_causal_mask",),
}

_applied = False


def _cpu_device(device: Any) -> Any:
    if device is None:
        return None
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _on_cpu(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return call


class _NullEvent:
    """Stands in for torch.cuda.Event: CPU work is synchronous."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait(self, *args: Any) -> None:
        pass

    def query(self) -> bool:
        return True


class _CudaOnCpu(types.ModuleType):
    """`torch.cuda` as seen by a patched module: the current device is the CPU."""

    def __init__(self) -> None:
        super().__init__("torch.cuda")

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(*args: Any) -> None:
        pass

    @staticmethod
    def is_available() -> bool:
        return False

    Event = _NullEvent

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _TorchOnCpu(types.ModuleType):
    """`torch` as seen by a patched module: everything forwarded, CUDA placement mapped to CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CudaOnCpu()
        for name in ("zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand"):
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _cpu_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(state)


def _make_tracker(base: type) -> type:
    class CpuRNGStatesTracker(base):  # type: ignore[misc]
        """Megatron's RNG tracker over the CPU generator: named states forked in and out of it."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


def _clip_grad_by_total_norm_fp32(
    parameters: Any, max_norm: float, total_norm: float, use_decoupled_grad: bool = False
) -> None:
    """Megatron's clip_grad_by_total_norm_fp32 without the CUDA tensor-type assert."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _tensor_cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


def check() -> list[str]:
    """What no longer matches this module's expectations of Megatron-Core, as readable lines."""
    problems = []
    for name, literals in PROXIED_MODULES.items():
        try:
            source = inspect.getsource(importlib.import_module(name))
        except (ImportError, OSError) as exc:
            problems.append(f"{name}: cannot be read ({exc})")
            continue
        problems += [f"{name}: no longer contains {lit!r}" for lit in literals if lit not in source]
    for name, attrs in REPLACED.items():
        module = importlib.import_module(name)
        problems += [f"{name}.{attr} is gone" for attr in attrs if not hasattr(module, attr)]
    return problems


def apply() -> None:
    """Point Megatron-Core's CUDA call sites at the CPU, once per process."""
    global _applied
    if _applied:
        return
    stale = check()
    if stale:
        raise RuntimeError("engine's CPU compatibility layer does not match Megatron-Core: " + "; ".join(stale))
    cpu_torch = _TorchOnCpu()
    for name in PROXIED_MODULES:
        importlib.import_module(name).torch = cpu_torch  # type: ignore[attr-defined]
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random.CudaRNGStatesTracker = _make_tracker(random.CudaRNGStatesTracker)  # type: ignore[attr-defined]
    random._get_cuda_rng_state = _cpu_rng_state  # type: ignore[attr-defined]
    random._set_cuda_rng_state = _set_cpu_rng_state  # type: ignore[attr-defined]
    random.initialize_rng_tracker(force_reset=True)
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32  # type: ignore[attr-defined]
    torch.Tensor.cuda = _tensor_cuda  # type: ignore[method-assign, assignment]
    _applied = True
