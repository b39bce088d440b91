"""Megatron-Core model, optimizer and schedule construction from a plan's job.

Both paths build Megatron-Core's GPTModel; there is no second transformer:

* GPU (NCCL): Transformer Engine layer spec, bf16 weights and activations, FP8 GEMMs through
  TransformerConfig's fp8 fields with the stage's recipe (delayed, tensorwise, mxfp8, blockwise), the
  distributed optimizer. A missing Transformer Engine is a start-up error, never a silent fallback.
* CPU (gloo): the local (pure PyTorch) layer spec in fp32, with engine.worker.cpu_compat applied.
* GPU without Transformer Engine, when the job's environment sets ENGINE_LAYER_SPEC=local (a cluster
  profile's `env`, so the plan shows it): the local layer spec in bf16 on NCCL, without the fused
  kernels that only TE or Megatron-LM's compiled extensions provide (RoPE, masked softmax, persistent
  layer norm). Attention is unfused: it stores the a·s² scores, so it is for checks, not production.

On the local spec packed rows (THD inputs) go through engine.worker.attention's varlen attention; padded
rows through Megatron-Core's own DotProductAttention.

On CPU the weights are initialised independently of the parallel layout: every tensor is drawn whole
from a generator seeded by (seed, its global checkpoint key, its global layer) and each rank keeps its
shard. The same seed therefore gives the same model at TP1/PP1 and at TP2×PP2 or PP2×VPP2, which
makes parallel layouts comparable step for step.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..compile import Job
from ..compile.resolve import ResolvedModel
from ..errors import EngineError
from ..schema import Training
from .attention import VarlenAttention

FP8_FORMAT = "hybrid"  # e4m3 forward, e5m2 backward (Micikevicius et al. 2022)
LAYER_SPEC_ENV = "ENGINE_LAYER_SPEC"  # "local" in a job's env: Megatron's PyTorch layers on GPUs too


def uses_transformer_engine(job: Job, *, device: str) -> bool:
    """GPU jobs run on Transformer Engine layers unless their environment asks for the local spec."""
    return device == "cuda" and job.env.get(LAYER_SPEC_ENV) != "local"


@dataclass(frozen=True)
class Built:
    """The trainable pieces of a job: model chunks (one per virtual stage), optimizer, scheduler."""

    chunks: list[Any]
    optimizer: Any
    scheduler: Any
    config: Any


def config_kwargs(job: Job, model: ResolvedModel, *, device: str, recompute: str) -> dict[str, Any]:
    """TransformerConfig arguments for a job: architecture, layout, precision, fusions and the stage's
    activation recomputation (none, selective or full)."""
    lay, prec = job.layout, job.precision
    if lay is None or prec is None:
        raise ValueError(f"job {job.name} is not a training job")
    gpu = device == "cuda"
    te = uses_transformer_engine(job, device=device)
    dtype = torch.float32 if prec.dtype == "fp32" else torch.bfloat16
    kwargs: dict[str, Any] = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm" if model.normalization == "rmsnorm" else "LayerNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.activation == "swiglu",
        activation_func=F.silu if model.activation == "swiglu" else F.gelu,
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_bias_linear or model.qkv_bias,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=lay.tp,
        pipeline_model_parallel_size=lay.pp,
        virtual_pipeline_model_parallel_size=lay.vpp if lay.vpp > 1 else None,
        context_parallel_size=lay.cp,
        sequence_parallel=lay.sequence_parallel,
        account_for_embedding_in_pipeline_split=lay.embedding_in_pipeline_split,
        account_for_loss_in_pipeline_split=lay.loss_in_pipeline_split,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not gpu,
        # On CPU, Megatron sets the tensor-parallel attributes of parameters only while initialising
        # them, so initialisation stays on; init_layout_independent then overwrites the values.
        perform_initialization=True,
        # gloo's batched isend/irecv silently breaks the interleaved schedule on CPU.
        batch_p2p_comm=gpu,
        # Fused kernels exist only on GPUs; RoPE's comes from TE, the masked softmax and persistent
        # layer norm from TE or Megatron-LM's compiled extensions (the local spec has none of them).
        bias_activation_fusion=gpu and model.activation == "swiglu",
        masked_softmax_fusion=te,
        persist_layer_norm=te,
        bias_dropout_fusion=gpu,
        apply_rope_fusion=te,
        gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=gpu,
    )
    if recompute != "none":
        kwargs["recompute_granularity"] = recompute
        if recompute == "full":
            kwargs |= dict(recompute_method="uniform", recompute_num_layers=1)
    if prec.dtype == "fp8":
        kwargs |= dict(fp8=FP8_FORMAT, fp8_recipe=prec.fp8_recipe, fp8_param=prec.fp8_param_gather)
        if prec.fp8_recipe == "delayed":
            kwargs |= dict(fp8_amax_history_len=1024, fp8_amax_compute_algo="max", fp8_margin=0)
    return kwargs


def require_transformer_engine() -> None:
    """GPU jobs run on Transformer Engine kernels; say so clearly at start-up when it is missing."""
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401
    except ImportError as exc:
        raise EngineError(
            f"this GPU job needs Transformer Engine, which cannot be imported ({exc}); "
            "install the gpu extra (`pip install -e '.[gpu]'`) or use the NVIDIA PyTorch container"
        ) from None


def layer_spec(job: Job, model: ResolvedModel, *, device: str) -> Any:
    from megatron.core.models.gpt import gpt_layer_specs as specs

    norm = "RMSNorm" if model.normalization == "rmsnorm" else "LayerNorm"
    if uses_transformer_engine(job, device=device):
        require_transformer_engine()
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm)
    spec = specs.get_gpt_layer_local_spec(normalization=norm, qk_layernorm=model.qk_layernorm)
    # Megatron-Core's local attention for padded rows; packed rows (THD) attend within each sequence.
    spec.submodules.self_attention.submodules.core_attention = VarlenAttention
    return spec


SCALAR_HEAD = "scalar_head"  # the parameters a scalar-head model adds to the GPT backbone


def scalar_model_class() -> type:
    """GPTModel whose last stage ends in a scalar per position (hidden → 1) instead of vocabulary logits.

    The head is a RowParallelLinear fed the full hidden state: each tensor-parallel rank multiplies its
    slice of the hidden dimension and the partial sums are all-reduced, so the weight is sharded like
    any other TP layer and the result is the same at every TP size. With sequence parallelism the
    hidden states are gathered first. The output layer is dropped (and embeddings are untied), so the
    backbone loads from any language-model checkpoint. Forward returns [batch, seq] scalars; the reward
    model reads them at the last real token, a PPO critic at every response token.
    """
    import dataclasses

    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel import RowParallelLinear, gather_from_sequence_parallel_region

    class ScalarHeadGPT(GPTModel):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["share_embeddings_and_output_weights"] = False
            super().__init__(*args, **kwargs)
            self.post_process: bool
            if self.post_process:
                self.output_layer = None
                cfg = dataclasses.replace(self.config, sequence_parallel=False)
                head = RowParallelLinear(
                    self.config.hidden_size, 1, config=cfg, init_method=self.config.init_method, bias=True,
                    input_is_parallel=False, skip_bias_add=False,
                )  # fmt: skip
                setattr(self, SCALAR_HEAD, head)

        def sharded_state_dict(self, *args: Any, **kwargs: Any) -> Any:
            # LanguageModule marks the output layer of every last stage; this model has none.
            post, self.post_process = self.post_process, False
            try:
                return super().sharded_state_dict(*args, **kwargs)
            finally:
                self.post_process = post

        def _postprocess(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if not self.post_process:
                return hidden_states
            if self.config.sequence_parallel:
                hidden_states = gather_from_sequence_parallel_region(hidden_states)
            values, _ = getattr(self, SCALAR_HEAD)(hidden_states)  # [s, b, 1]
            out: torch.Tensor = values.squeeze(-1).transpose(0, 1).contiguous()
            return out

    return ScalarHeadGPT


def build_chunks(job: Job, model: ResolvedModel, config: Any, *, device: str, head: str = "lm") -> list[Any]:
    """One GPTModel per virtual pipeline stage held by this rank; `head` is "lm" or "scalar"."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel

    assert job.layout is not None
    spec = layer_spec(job, model, device=device)
    vpp = job.layout.vpp
    cls = scalar_model_class() if head == "scalar" else GPTModel
    chunks = []
    for vp in range(vpp) if vpp > 1 else [None]:
        chunk = cls(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=model.padded_vocab_size,
            max_sequence_length=model.seq_length,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=model.tie_embeddings,
            position_embedding_type=model.position_embedding,
            rotary_base=int(model.rotary_base),
            rope_scaling=model.rope_scaling_factor is not None,
            rope_scaling_factor=model.rope_scaling_factor or 8.0,
            vp_stage=vp,
        )
        if device == "cuda":
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    return chunks


def _init_value(
    name: str, draw: str, shape: tuple[int, ...], seed: int, std: float, num_layers: int
) -> torch.Tensor:
    """Megatron-Core's initialisation of the tensor `name` (its checkpoint key): ones for norm weights, zeros
    for biases, N(0, std) for embeddings, input projections and the output layer, N(0, std/√(2L)) for the
    output projections of attention and MLP. Random values are drawn from a generator seeded by (seed,
    `draw`): the key with its layer, so that each layer of a stacked tensor gets its own."""
    if name.endswith(("layer_norm_weight", "layernorm.weight", "norm.weight")):
        return torch.ones(shape)
    if name.endswith(("bias", "layer_norm_bias")):
        return torch.zeros(shape)
    digest = hashlib.sha256(f"{seed}:{draw}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std = std / math.sqrt(2.0 * num_layers)  # Megatron's scaled init of output projections
    return torch.randn(shape, generator=gen) * std


def init_layout_independent(chunks: list[Any], *, seed: int, std: float, num_layers: int) -> None:
    """Initialise every parameter shard from its whole tensor, drawn by global key and layer."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    covered: set[int] = set()
    with torch.no_grad():
        for chunk in chunks:
            for item in chunk.sharded_state_dict().values():
                shards = item.build() if isinstance(item, ShardedTensorFactory) else [item]
                for sh in shards if isinstance(shards, list) else shards.values():
                    if not isinstance(sh, ShardedTensor):
                        continue
                    lead = sh.prepend_axis_num
                    draw = sh.key + "".join(f"@{o}" for o in sh.global_offset[:lead])
                    full = _init_value(sh.key, draw, tuple(sh.global_shape[lead:]), seed, std, num_layers)
                    index = tuple(
                        slice(off, off + size)
                        for off, size in zip(sh.global_offset[lead:], sh.local_shape, strict=True)
                    )
                    sh.data.copy_(full[index].to(sh.data.dtype))
                    covered.add(sh.data.untyped_storage().data_ptr())
            missing = [n for n, p in chunk.named_parameters() if p.untyped_storage().data_ptr() not in covered]
            if missing:
                raise RuntimeError(f"layout-independent init did not reach: {missing}")


def ddp_kwargs(job: Job) -> dict[str, Any]:
    """DistributedDataParallelConfig arguments: fp32 gradient reduction for bf16 and FP8, the distributed
    optimizer, and FP8 parameter all-gathers with `fp8_param_gather` (as Megatron-LM sets both this and
    TransformerConfig's `fp8_param`)."""
    assert job.layout is not None and job.precision is not None
    return dict(
        grad_reduce_in_fp32=job.precision.dtype != "fp32",
        use_distributed_optimizer=job.layout.distributed_optimizer,
        overlap_grad_reduce=False,
        overlap_param_gather=False,
        fp8_param_gather=job.precision.fp8_param_gather,
    )


def _use_foreach_updates(optimizer: Any) -> None:
    """Torch's Adam picks its multi-tensor (foreach) update only for CUDA parameters; on CPU it steps
    tensor by tensor, 2.3x slower for 1.7M parameters on one thread (6.0 vs 2.6 ms a step), a cost that
    every replicated data-parallel rank pays in full. Both paths give bit-identical parameters, so ask for
    foreach wherever Megatron-Core built a torch optimizer and left the choice to torch (TE's and apex's
    fused optimizers have no such option and are left alone)."""
    for megatron_opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(megatron_opt, "optimizer", None)
        if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            for group in inner.param_groups:
                if group.get("foreach") is None:
                    group["foreach"] = True


def wrap_and_optimize(
    job: Job, chunks: list[Any], config: Any, *, training: Training, steps: int, lr: float | None = None
) -> Built:
    """DDP-wrap the chunks; Megatron's optimizer; warmup + decay schedule. `lr` replaces the stage's
    learning rate (min_lr scales with it): PPO's critic has its own."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    assert job.layout is not None and job.precision is not None
    t = training
    peak, floor = (lr, t.min_lr * lr / t.lr) if lr is not None else (t.lr, t.min_lr)
    bf16 = job.precision.dtype != "fp32"
    ddp_config = DistributedDataParallelConfig(**ddp_kwargs(job))
    wrapped = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=peak,
        min_lr=floor,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.grad_clip or 0.0,
        bf16=bf16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=job.layout.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, wrapped)
    _use_foreach_updates(optimizer)
    # What Megatron's own training loop sets: after the last micro-batch the schedule calls
    # finalize_model_grads (the data-parallel gradient all-reduce, the tied-embedding all-reduce between
    # the first and last pipeline stages, sequence-parallel layer norms); losses are scaled for fp16.
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    constant = t.lr_schedule == "constant"
    decay = max(1, steps - t.warmup_steps) if not constant else 1
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=peak,
        min_lr=floor if not constant else peak,
        lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=decay + t.warmup_steps,
        lr_decay_style=t.lr_schedule,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=max(1, steps),
        wd_incr_style="constant",
    )
    return Built(chunks=wrapped, optimizer=optimizer, scheduler=scheduler, config=config)


def build_job(
    job: Job, model: ResolvedModel, *, training: Training, device: str, steps: int, head: str = "lm",
    lr: float | None = None,
) -> Built:  # fmt: skip
    """Config, model chunks (initialised), DDP, optimizer and schedule for a training job."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(**config_kwargs(job, model, device=device, recompute=training.recompute))
    chunks = build_chunks(job, model, config, device=device, head=head)
    if device == "cpu":
        init_layout_independent(chunks, seed=training.seed, std=model.init_method_std, num_layers=model.num_layers)
    return wrap_and_optimize(job, chunks, config, training=training, steps=steps, lr=lr)


def build_frozen(job: Job, model: ResolvedModel, *, device: str, recompute: str, head: str = "lm") -> list[Any]:
    """Model chunks that are only evaluated (a reference policy, a reward model): no DDP, no optimizer,
    no gradients; their weights come from a checkpoint."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(**config_kwargs(job, model, device=device, recompute=recompute))
    chunks = build_chunks(job, model, config, device=device, head=head)
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    return chunks
