"""Per-GPU memory, FLOPs and time estimates of a job, before anything runs.

Model states (bytes per parameter, on the pipeline stage holding the most):
  * fp32 (CPU): 4 weights + 4 grads + 8 Adam moments = 16.
  * bf16/fp8 with Megatron's distributed optimizer: 2 bf16 weights + 4 fp32 grads, and the fp32
    master weights and two moments (12) sharded over the data-parallel ranks: 6 + 12/dp (18
    unsharded). Context-parallel ranks hold the same weights, so Megatron shards over dp×cp.
  * bf16/fp8 with plain Adam: 2 bf16 weights + 4 fp32 gradients (the worker reduces gradients in fp32,
    `grad_reduce_in_fp32`, as Megatron does) + 12 = 18.
  * FP8 adds the FP8 copy of each weight that Transformer Engine caches across microbatches
    (1 byte/param; with fp8_param_gather the bf16 copy is dropped instead: 2 → 1).

Activations follow Korthikanti et al. 2022 (arXiv 2205.05198), Table 2, bytes per layer for one
microbatch with 16-bit activations (s = sequence / cp, b = micro batch, h = hidden, a = heads,
t = tp):
    no parallelism                    sbh(34 + 5as/h)
    tensor parallel                   sbh(10 + 24/t + 5as/(ht))
    tensor + sequence parallel        sbh/t · (34 + 5as/h)
    tensor parallel + selective       sbh(10 + 24/t)
    tensor + sequence + selective     34·sbh/t
    full recompute                    2sbh (÷t with sequence parallel), plus one layer rebuilt in backward
                                      (counted as the layer's activations without recompute, with the
                                      attention scores only where attention stores them: not on GPUs)
On GPUs Transformer Engine's fused (flash) attention never stores the a·s² attention matrix: it
recomputes it in backward, which is what selective recompute does, so GPU jobs use the selective
rows even with recompute=none. fp32 activations (CPU) count twice. The first pipeline stage holds the most microbatches in flight:
min(pp, microbatches) with 1F1B, pp·(1 + (pp−1)/(pp·vpp)) with the interleaved schedule (§4.2.3).
It also keeps the embedding dropout mask, sbh·inflight/t; the last stage keeps the logits and fp32
cross-entropy inputs, 4sb(h + V)/t. The formulas are the paper's, derived for a 4h GeLU MLP and
multi-head attention; SwiGLU and GQA change the constants a little, in opposite directions.

FLOPs per token are counted as Megatron does: every GEMM once forward and twice backward (×3, ×2 per
multiply-add), SwiGLU's three MLP matrices, causal attention's score and value products halved, and
the logits' 6hV.

Time. A profile without `throughput` (the CPU ones) divides a step's FLOPs by GPUs × peak × its one
assumed MFU. A GPU profile's `throughput` drives a layout model instead, so that what differs between
layouts shows:

* compute: each GPU's share of the step's FLOPs at the rate its kernels reach — the transformer GEMMs at
  `gemm_efficiency` of the bf16 peak, or `fp8_gemm_efficiency` of the FP8 peak for an FP8 job; the
  attention core (flash attention, always bf16) at `attention_efficiency`; the output layer's GEMMs in
  bf16;
* the pipeline bubble of (interleaved) 1F1B: (pp − 1) / (vpp · m) of the compute, m micro-batches per
  step (Narayanan et al. 2021, §2.2);
* tensor-parallel communication, which the worker does not overlap with compute: per layer and token,
  eight ring collectives (all-gather and reduce-scatter with sequence parallelism, all-reduces without;
  forward and backward) of h bf16 values, each moving (t − 1)/t of them over NVLink;
* the data-parallel gradient reduce-scatter (fp32) and parameter all-gather (bf16, or FP8 with
  fp8_param_gather) of the distributed optimizer, or the all-reduce without it, after the last
  micro-batch (not overlapped either), over NVLink when the data-parallel group fits in a node and over
  the network otherwise.

Context-parallel KV exchange and pipeline sends are taken as hidden behind compute. The h100 profile's
FP8 efficiency is fitted to NVIDIA's one published run without model parallelism (Llama 3 8B on 8 GPUs);
docs/estimates.md sets the model's estimates beside the published 70B and 405B runs.

What differs between stage kinds comes from the kind's `Workload` (engine.kinds): the trained sequence
length and samples per step, how many training and forward-only passes a step makes, how many models
hold optimizer states and how many only weights (PPO: actor and critic; reference and reward model),
and the rows a rollout generates with a KV cache. The peak is the states plus the larger of the
training activations and the KV cache, since rollout and training take turns on the same GPUs.
"""

from __future__ import annotations

import math

from pydantic import Field

from ..kinds import Workload
from ..schema import ClusterProfile, TrainingStage
from ..schema.cluster import Throughput
from .resolve import Frozen, Layout, ResolvedModel, ResolvedPrecision

GIB = 1024**3
CUDA_OVERHEAD_BYTES = 2 * GIB  # CUDA context, cuBLAS workspaces, NCCL buffers
# Pinned host <-> device copies per GPU (offloaded roles), about half of PCIe Gen5 x16 with 8 GPUs sharing a host.
HOST_COPY_BYTES_PER_S = 25e9


class ParamCounts(Frozen):
    embedding: int
    per_layer: int
    output_layer: int
    final_norm: int
    total: int


class Memory(Frozen):
    """Bytes per GPU on the busiest pipeline stage. The parts are what each holds while it is resident; an RL
    job's roles take turns (`phases`: the total of each phase, offloaded roles left out where they are in host
    memory) and `total` is the largest phase's."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    kv_cache: int
    frozen_models: int
    overhead: int
    total: int
    phases: dict[str, int] = Field(default_factory=dict)

    @property
    def total_gib(self) -> float:
        return self.total / GIB


class Estimate(Frozen):
    params: ParamCounts
    params_per_gpu: int
    memory: Memory
    steps: int
    tokens_per_step: int
    flops_per_token: float
    flops_per_step: float
    step_time_s: float
    tokens_per_s: float
    wall_time_s: float


def count_params(m: ResolvedModel) -> ParamCounts:
    h, q = m.hidden_size, m.num_attention_heads * m.kv_channels
    kv = m.num_query_groups * m.kv_channels
    gated = m.activation == "swiglu"
    norm = h * (2 if m.normalization == "layernorm" else 1)
    attn = h * (q + 2 * kv) + q * h
    mlp = (3 if gated else 2) * h * m.ffn_hidden_size
    if m.add_bias_linear:
        attn += q + 2 * kv + h
        mlp += m.ffn_hidden_size * (2 if gated else 1) + h
    per_layer = attn + mlp + 2 * norm
    embedding = m.padded_vocab_size * h + (m.seq_length * h if m.position_embedding == "learned_absolute" else 0)
    output = 0 if m.tie_embeddings else m.padded_vocab_size * h
    total = embedding + m.num_layers * per_layer + norm + output
    return ParamCounts(embedding=embedding, per_layer=per_layer, output_layer=output, final_norm=norm, total=total)


def flops_per_token(m: ResolvedModel, seq_length: int) -> float:
    """Training FLOPs per token (forward + backward), Megatron's way of counting."""
    h, q = m.hidden_size, m.num_attention_heads * m.kv_channels
    kv = m.num_query_groups * m.kv_channels
    gemms = 2 * h * (q + 2 * kv) + 2 * q * h + 2 * (3 if m.activation == "swiglu" else 2) * h * m.ffn_hidden_size
    attention = 2 * seq_length * q  # QKᵀ and AV, 2·s·q each, halved for the causal mask
    return 3.0 * (m.num_layers * (gemms + attention) + 2 * h * m.padded_vocab_size)


def _stage_params(m: ResolvedModel, counts: ParamCounts, lay: Layout) -> tuple[int, int]:
    """Parameters per GPU on the first and on the last pipeline stage."""
    first_layers, last_layers = lay.stage_layers(m.num_layers)
    per_layer = (counts.per_layer - 2 * counts.final_norm) // lay.tp + 2 * counts.final_norm
    first = first_layers * per_layer + counts.embedding // lay.tp
    # With tied embeddings and pp > 1 the last stage holds its own copy of the embedding.
    out = counts.output_layer or (counts.embedding if lay.pp > 1 else 0)
    last = last_layers * per_layer + counts.final_norm + out // lay.tp
    if lay.pp == 1:
        first = last = first + counts.final_norm + counts.output_layer // lay.tp
    return first, last


def _state_bytes(prec: ResolvedPrecision, lay: Layout) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes per parameter."""
    shards = lay.dp * lay.cp if lay.distributed_optimizer else 1
    if prec.dtype == "fp32":
        return 4.0, 4.0, 8.0 / shards
    weights = 2.0
    if prec.dtype == "fp8":
        weights = 1.0 if prec.fp8_param_gather else 3.0
    if lay.distributed_optimizer:
        return weights, 4.0, 12.0 / shards
    return weights, 4.0, 12.0


def layer_activation_bytes(m: ResolvedModel, lay: Layout, seq: int, mbs: int, recompute: str, act_bytes: int) -> float:
    """Korthikanti et al. Table 2, for one layer and one microbatch."""
    s, b, h, a, t = seq / lay.cp, mbs, m.hidden_size, m.num_attention_heads, lay.tp
    sbh = s * b * h
    sp = lay.sequence_parallel
    if recompute == "full":
        value = 2 * sbh / (t if sp else 1)
    elif sp:
        value = 34 * sbh / t if recompute == "selective" else sbh / t * (34 + 5 * a * s / h)
    elif recompute == "selective":
        value = sbh * (10 + 24 / t)
    else:
        value = sbh * (10 + 24 / t + 5 * a * s / (h * t))
    return value * act_bytes / 2


def _in_flight(lay: Layout, microbatches: int) -> float:
    if lay.pp == 1:
        return 1.0
    if lay.vpp > 1:
        return lay.pp * (1 + (lay.pp - 1) / (lay.pp * lay.vpp))
    return float(min(lay.pp, microbatches))


def activation_bytes(
    m: ResolvedModel, lay: Layout, *, seq: int, mbs: int, microbatches: int, recompute: str, act_bytes: int,
    flash_attention: bool = False,
) -> tuple[float, float]:  # fmt: skip
    """Activation bytes on the first and on the last pipeline stage."""
    first_layers, last_layers = lay.stage_layers(m.num_layers)
    per_layer = layer_activation_bytes(m, lay, seq, mbs, recompute, act_bytes)
    # With full recompute, backward rebuilds one layer's complete activations at a time; with flash attention
    # (GPUs) that layer holds no a·s² scores, which is the selective row.
    rebuilt = "selective" if flash_attention else "none"
    per_layer_full = layer_activation_bytes(m, lay, seq, mbs, rebuilt, act_bytes) if recompute == "full" else 0.0
    inflight = _in_flight(lay, microbatches)
    s, b, h, t = seq / lay.cp, mbs, m.hidden_size, lay.tp
    embedding = s * b * h * inflight / (t if lay.sequence_parallel else 1)
    logits = 4 * s * b * (h + m.padded_vocab_size) / t
    first = first_layers * per_layer * inflight + per_layer_full + embedding
    last = last_layers * per_layer + per_layer_full + logits
    if lay.pp == 1:
        first = last = first + logits
    return first, last


def scoring_bytes(m: ResolvedModel, lay: Layout, *, seq: int, rows: int, act_bytes: int, flash_attention: bool) -> float:
    """A forward-only pass over `rows` sequences: nothing is kept for a backward pass, so one layer's
    activations at a time, plus the fp32 logits of the last stage."""
    layer = layer_activation_bytes(m, lay, seq, rows, "selective" if flash_attention else "none", act_bytes)
    return layer + 4 * seq * rows * m.padded_vocab_size / lay.tp


def estimate_job(
    *,
    stage: TrainingStage,
    workload: Workload,
    model: ResolvedModel,
    layout: Layout,
    precision: ResolvedPrecision,
    cluster: ClusterProfile,
    steps: int,
) -> Estimate:
    counts = count_params(model)
    t, w = stage.training, workload
    seq = w.seq_length
    microbatches = max(1, t.global_batch_size // (t.micro_batch_size * layout.dp))
    act_bytes = 4 if precision.dtype == "fp32" else 2
    first_p, last_p = _stage_params(model, counts, layout)
    wb, gb, ob = _state_bytes(precision, layout)
    recompute = "selective" if cluster.device == "cuda" and t.recompute == "none" else t.recompute
    first_a, last_a = activation_bytes(
        model,
        layout,
        seq=seq,
        mbs=t.micro_batch_size,
        microbatches=microbatches,
        recompute=recompute,
        act_bytes=act_bytes,
        flash_attention=cluster.device == "cuda",
    )
    # The busiest stage: compare totals, keep that stage's breakdown.
    params, acts = max(((first_p, first_a), (last_p, last_a)), key=lambda pa: pa[0] * (wb + gb + ob) + pa[1])
    trained = w.trained_models
    kv_cache = 0.0
    if w.kv_cache_rows:
        kv_heads = max(1, model.num_query_groups // layout.tp)
        layers = max(layout.stage_layers(model.num_layers))
        kv_cache = 2 * layers * kv_heads * model.kv_channels * seq * w.kv_cache_rows * act_bytes
    frozen_one = params * act_bytes
    frozen = frozen_one * w.frozen_models
    overhead = CUDA_OVERHEAD_BYTES if cluster.device == "cuda" else 0
    state = params * (wb + gb + ob)  # one trained model's weights, gradients and optimizer states
    phases: dict[str, int] = {}
    if w.kv_cache_rows:
        # RL: rollouts (the KV cache), scoring (forward-only passes: one layer's working set and the logits of
        # a scoring batch at a time), training (activations). Offloaded roles come to the device one at a time
        # for scoring; the offloaded critic stays from its scoring pass through the update.
        base = state * (trained - w.offloaded_trained_models) + frozen_one * (w.frozen_models - w.offloaded_frozen_models)
        forward = scoring_bytes(model, layout, seq=seq, rows=w.scoring_rows or w.kv_cache_rows, act_bytes=act_bytes,
                                flash_attention=cluster.device == "cuda")  # fmt: skip
        visiting = max(frozen_one if w.offloaded_frozen_models else 0.0, state if w.offloaded_trained_models else 0.0)
        phases = {
            "rollout": int(base + kv_cache + overhead),
            "scoring": int(base + visiting + forward + overhead),
            "training": int(base + state * w.offloaded_trained_models + acts + overhead),
        }
    memory = Memory(
        weights=int(params * wb * trained),
        gradients=int(params * gb * trained),
        optimizer=int(params * ob * trained),
        activations=int(acts),
        kv_cache=int(kv_cache),
        frozen_models=int(frozen),
        overhead=overhead,
        total=max(phases.values()) if phases else int(state * trained + acts + frozen + overhead),
        phases=phases,
    )
    tokens_per_step = w.samples * seq
    fpt = flops_per_token(model, seq)
    flops_step = tokens_per_step * fpt * (w.passes + w.forward_passes / 3)
    if cluster.throughput is None:
        peak = cluster.peak_tflops_bf16 * 1e12
        step_time = flops_step / (layout.world_size * peak * cluster.assumed_mfu)
    else:
        step_time = _layout_step_time(model, layout, precision, cluster, cluster.throughput, seq=seq,
                                      tokens=tokens_per_step * (w.passes + w.forward_passes / 3),
                                      microbatches=microbatches, trained=trained, params=params,
                                      recompute=t.recompute)  # fmt: skip
    if cluster.device == "cuda":  # each offloaded role goes to the device and back once per step
        moved = 2 * (frozen_one * w.offloaded_frozen_models + state * w.offloaded_trained_models)
        step_time += moved / HOST_COPY_BYTES_PER_S
    return Estimate(
        params=counts,
        params_per_gpu=int(params),
        memory=memory,
        steps=steps,
        tokens_per_step=tokens_per_step,
        flops_per_token=fpt,
        flops_per_step=flops_step,
        step_time_s=step_time,
        tokens_per_s=tokens_per_step / step_time,
        wall_time_s=steps * step_time,
    )


def flop_parts(m: ResolvedModel, seq_length: int) -> tuple[float, float, float]:
    """Training FLOPs per token of the transformer GEMMs, of the attention core and of the output layer:
    the three terms of flops_per_token, which run at different rates."""
    h, q = m.hidden_size, m.num_attention_heads * m.kv_channels
    kv = m.num_query_groups * m.kv_channels
    gemms = 2 * h * (q + 2 * kv) + 2 * q * h + 2 * (3 if m.activation == "swiglu" else 2) * h * m.ffn_hidden_size
    return 3.0 * m.num_layers * gemms, 3.0 * m.num_layers * 2 * seq_length * q, 3.0 * 2 * h * m.padded_vocab_size


def _layout_step_time(
    m: ResolvedModel, lay: Layout, prec: ResolvedPrecision, cluster: ClusterProfile, tp_: Throughput, *,
    seq: int, tokens: float, microbatches: int, trained: int, params: float, recompute: str,
) -> float:  # fmt: skip
    """Seconds per step of the layout model (module docstring): `tokens` counts every training pass."""
    bf16 = cluster.peak_tflops_bf16 * 1e12
    fp8 = prec.dtype == "fp8" and cluster.peak_tflops_fp8 is not None and tp_.fp8_gemm_efficiency is not None
    gemm_rate = (cluster.peak_tflops_fp8 or 0.0) * 1e12 * (tp_.fp8_gemm_efficiency or 0.0) if fp8 else bf16 * tp_.gemm_efficiency
    gemm, attention, output = flop_parts(m, seq)
    per_token = gemm / gemm_rate + attention / (bf16 * tp_.attention_efficiency) + output / (bf16 * tp_.gemm_efficiency)
    compute = tokens * per_token / lay.world_size
    bubble = (lay.pp - 1) / (lay.vpp * microbatches) if lay.pp > 1 else 0.0
    gpn = cluster.gpus_per_node
    tp_comm = 0.0
    if lay.tp > 1:
        # Each GPU of a tensor-parallel group sees every token of its data-parallel and context-parallel share.
        collectives = 8 + (4 if recompute == "full" else 0)
        per_token_layer = collectives * m.hidden_size * 2 * (lay.tp - 1) / lay.tp / (tp_.nvlink_gb_s * 1e9)
        tp_comm = tokens / (lay.dp * lay.cp) * (m.num_layers / lay.pp) * per_token_layer
    dp_comm = 0.0
    if lay.dp > 1:
        grads, weights = 4.0, (1.0 if prec.fp8_param_gather else 2.0 if prec.dtype != "fp32" else 4.0)
        moved = (grads + weights) if lay.distributed_optimizer else 2 * grads  # RS + AG, or an all-reduce
        link = tp_.nvlink_gb_s if lay.tp * lay.cp * lay.dp <= gpn else tp_.network_gb_s
        dp_comm = trained * params * moved * (lay.dp - 1) / lay.dp / (link * 1e9)
    return compute * (1 + bubble) + tp_comm + dp_comm


def fits(memory: Memory, cluster: ClusterProfile) -> bool:
    return cluster.hbm_gib is None or memory.total <= cluster.hbm_gib * GIB


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def human_time(seconds: float) -> str:
    if seconds < 9.95:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes = seconds / 60
    if minutes < 60:
        return f"{minutes:.0f}m"
    hours = minutes / 60
    return f"{hours:.1f}h" if hours < 48 else f"{hours / 24:.1f}d"


def human_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}" if not math.isnan(n) else "nan"
