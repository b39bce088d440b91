"""One GPU, one run: the engine's pretrain worker against a bare Megatron-Core loop, with MFU and memory.

In a single process tree, one after the other:

1. the card's bf16 matmul ceiling: a timed 8192³ torch.matmul on random data (the MFU denominator);
2. `engine plan` for a ~1.1B Llama-style proxy on one GPU (bf16, NCCL, the local layer spec via
   ENGINE_LAYER_SPEC=local in a one-GPU cluster profile), with synthetic learnable token data;
3. the engine's pretrain worker on that plan, launched as `engine run` launches it (torchrun);
4. a bare Megatron-Core loop on the same model, batch, data and settings (the overhead reference);
5. tokens/s, TFLOP/s per GPU and MFU of both, engine/bare, and the worker's peak allocated memory
   against the plan's per-GPU estimate; written as gpu_check_<label>.json and .md under --out.

FLOPs per token are Megatron's num_floating_point_operations divided by the tokens (the plan's
estimate uses the same count; it is recomputed here as a check): every GEMM once forward and twice
backward, 2 FLOPs per multiply-add, causal attention's QKᵀ and AV halved:
    3 · [L · (2h(q + 2kv) + 2qh + 6hf + 2sq) + 2hV]      (q = heads·head_dim, kv = groups·head_dim)
MFU = achieved TFLOP/s / the measured matmul TFLOP/s (and, for reference, / the datasheet peak).

`--cpu` is a dry run of exactly this code path with a tiny model on gloo in fp32; its numbers say that
the script works, nothing about a GPU. `--fp8` adds Transformer Engine runs (TE layer spec, bf16 and
then FP8) of FP8_STEPS steps each and reports their tokens/s ratio and loss difference.

    python bench/gpu_check.py --out DIR            # GPU (what bench/gpu_check.sh runs)
    python bench/gpu_check.py --out DIR --cpu      # CPU dry run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GIB = 1024**3
WARMUP = 5  # steps left out of the steady state: allocator growth, torch.compile of the fused SwiGLU
FP8_STEPS = 50
PEAK_BF16 = 989.0  # H100/H200 SXM dense bf16 datasheet TFLOP/s, for reference next to the measured ceiling


@dataclasses.dataclass(frozen=True)
class Proxy:
    name: str
    model: dict[str, int]
    vocab: int
    gbs: int
    mbs: int
    steps: int


# 16 layers, hidden 2048, 16 heads of 128 with 8 KV groups, SwiGLU 8192, untied 32000 vocabulary:
# 1.14B parameters. Sequence 2048 at micro-batch 2 (4096-token GEMMs): the local spec's unfused
# attention keeps the fp32 softmax output and bf16 probabilities, 6·a·s²·b bytes per layer, and its
# elementwise traffic per token grows with s, so 4096 would halve the attention share of MFU headroom.
GPU_PROXY = Proxy(
    name="llama-1.1b-proxy",
    model=dict(num_layers=16, hidden_size=2048, num_attention_heads=16, num_query_groups=8, ffn_hidden_size=8192,
               seq_length=2048),
    vocab=32000, gbs=32, mbs=2, steps=30,
)  # fmt: skip
CPU_PROXY = Proxy(
    name="tiny-cpu-dry-run",
    model=dict(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=352,
               seq_length=128),
    vocab=512, gbs=8, mbs=2, steps=10,
)  # fmt: skip

RECIPE = """
name: gpucheck
cluster: {cluster}
tokenizer: {{kind: file, path: unused.json, vocab_size: {vocab}}}
model: {model}
stages:
  data: {{kind: data, sources: [{{name: web, plugin: arithmetic, records: text}}]}}
  pretrain:
    kind: pretrain
    data: data
    resources: {{gpus_per_node: 1}}
    precision: {{dtype: {dtype}}}
    training: {{steps: {steps}, global_batch_size: {gbs}, micro_batch_size: {mbs}, lr: 3.0e-4,
               lr_schedule: constant, weight_decay: 0.1, eval_iters: 1}}
    checkpointing: {{keep_last: 1}}
"""


def gpu_profile(path: Path, *, local_spec: bool) -> Path:
    """A one-GPU cluster profile for this card, run by the local launcher."""
    import torch

    props = torch.cuda.get_device_properties(0)
    kind = next((k for k in ("H200", "H100", "B200", "A100") if k in props.name), None)
    lines = [
        "name: gpu1", "launcher: local", "device: cuda", f"gpu: {kind or 'null'}", "gpus_per_node: 1",
        "peak_tflops_bf16: 989", "peak_tflops_fp8: 1979", f"hbm_gib: {props.total_memory / GIB:.1f}",
        "assumed_mfu: 0.4",
    ]  # fmt: skip
    if local_spec:
        lines.append("env: {ENGINE_LAYER_SPEC: local}")
    path.write_text("\n".join(lines) + "\n")
    return path


def megatron_flops_per_token(m: dict[str, Any]) -> float:
    """Megatron-LM's num_floating_point_operations (dense GPT, GQA, SwiGLU) per token."""
    h, s, L, V, f = m["hidden_size"], m["seq_length"], m["num_layers"], m["padded_vocab_size"], m["ffn_hidden_size"]
    q, kv = m["num_attention_heads"] * m["kv_channels"], m["num_query_groups"] * m["kv_channels"]
    attn = 2 * h * (q + 2 * kv) + 2 * q * h + 2 * s * q  # projections, then QKᵀ + AV halved (causal)
    mlp = 2 * (3 if m["activation"] == "swiglu" else 2) * h * f
    return 3.0 * (L * (attn + mlp) + 2 * h * V)


def matmul_ceiling(gpu: bool) -> dict[str, float]:
    """Best and median TFLOP/s of a large matmul: bf16 8192³ on the GPU, fp32 1024³ on the CPU."""
    import torch

    n, dtype, dev = (8192, torch.bfloat16, "cuda") if gpu else (1024, torch.float32, "cpu")
    a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    for _ in range(5):
        torch.matmul(a, b)
    times = []
    for _ in range(20):
        if gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - began)
    flops = 2.0 * n**3
    del a, b
    if gpu:
        torch.cuda.empty_cache()
    return {"n": n, "dtype": str(dtype), "best_tflops": flops / min(times) / 1e12,
            "median_tflops": flops / statistics.median(times) / 1e12}  # fmt: skip


def write_data(folder: Path, *, tokens: int, vocab: int, seq: int, seed: int = 0) -> None:
    """Learnable synthetic text: each token follows a fixed successor map with p=0.75, else is uniform.

    The best achievable loss is about 0.25·(ln V + 1.4) + 0.22 nats, so a falling loss shows training
    works; ids 0 and 1 are pad and end-of-document.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    successor = np.concatenate([[2, 2], rng.permutation(np.arange(2, vocab))]).astype(np.int32)
    for split, n_tokens in (("train", tokens), ("valid", 8 * (seq + 1))):
        docs = max(2, n_tokens // seq + 1)
        x = rng.integers(2, vocab, size=(docs, seq - 1), dtype=np.int32)
        follow = rng.random(size=(docs, seq - 1)) < 0.75
        for i in range(1, seq - 1):
            x[:, i] = np.where(follow[:, i], successor[x[:, i - 1]], x[:, i])
        prefix = folder / "web" / split
        prefix.parent.mkdir(parents=True, exist_ok=True)
        builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
        for doc in x:
            builder.add_document(np.append(doc, 1), [seq])
        builder.finalize(f"{prefix}.idx")
    manifest = {"tokenizer": {"sha256": "gpu-check", "vocab_size": vocab, "eod": 1, "pad": 0}, "sources": {}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def compile_plan(work: Path, proxy: Proxy, *, cluster: str, dtype: str, steps: int, tag: str) -> Any:
    from engine.compile import compile_recipe
    from engine.load import load_recipe

    recipe = work / f"{tag}.yaml"
    recipe.write_text(RECIPE.format(cluster=cluster, vocab=proxy.vocab, model=json.dumps(proxy.model), dtype=dtype,
                                    steps=steps, gbs=proxy.gbs, mbs=proxy.mbs))  # fmt: skip
    plan = compile_recipe(load_recipe(recipe, [f"run_dir={work}/{tag}"]))
    Path(plan.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(plan.run_dir) / "plan.json").write_text(plan.to_json())
    return plan


def launch(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> tuple[int, float, list[str]]:
    """Run a command with its output to `log`; (exit code, seconds, last lines). A run past `timeout`
    is killed with its whole process group (torchrun's workers hold the GPU) and reports 124."""
    began = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = 124
    return code, time.perf_counter() - began, log.read_text(errors="replace").splitlines()[-40:]


def run_engine(plan: Any, log: Path, timeout: float) -> dict[str, Any]:
    """The pretrain job exactly as the local launcher starts it; its metrics.jsonl."""
    from engine.launch.local import command

    job = plan.job("pretrain")
    code, seconds, tail = launch(command(job), {**os.environ, **job.env}, log, timeout)
    metrics = Path(job.outputs[0].path).parent / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    return {"exit_code": code, "wall_s": seconds, "rows": rows, "log_tail": tail}


def run_bare(plan: Any, log: Path, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", __file__,
           "--bare", str(Path(plan.run_dir) / "plan.json")]  # fmt: skip
    code, seconds, tail = launch(cmd, {**os.environ, **plan.job("pretrain").env}, log, timeout)
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return {"exit_code": code, "wall_s": seconds, "rows": [r for r in records if "step" in r],
            "max_allocated": next((r["max_memory_allocated"] for r in records if "max_memory_allocated" in r), None),
            "log_tail": tail}  # fmt: skip


def steady(rows: list[dict[str, Any]], key: str, steps: int) -> float | None:
    """Seconds for steps WARMUP+1 .. steps-1 (the last step also evaluates and checkpoints)."""
    by_step = {r["step"]: r for r in rows}
    first, last = WARMUP, steps - 1
    if key == "elapsed_s":
        if first not in by_step or last not in by_step:
            return None
        return float(by_step[last]["elapsed_s"] - by_step[first]["elapsed_s"])
    if not all(s in by_step for s in range(first + 1, last + 1)):
        return None
    return float(sum(by_step[s][key] for s in range(first + 1, last + 1)))


def throughput(seconds: float | None, plan: Any, steps: int, ceiling: float, peak: float | None) -> dict[str, Any]:
    if not seconds:
        return {"tokens_per_s": None, "tflops_per_gpu": None, "mfu_measured": None, "mfu_datasheet": None}
    job = plan.job("pretrain")
    assert job.estimate is not None and job.layout is not None
    tokens = (steps - 1 - WARMUP) * job.estimate.tokens_per_step
    tps = tokens / seconds
    tflops = tps * megatron_flops_per_token(plan.model.model_dump()) / job.layout.world_size / 1e12
    return {"tokens_per_s": tps, "tflops_per_gpu": tflops, "mfu_measured": tflops / ceiling,
            "mfu_datasheet": tflops / peak if peak else None}  # fmt: skip


def memory_check(plan: Any, engine_peak: int | None, bare_peak: int | None, proxy: Proxy) -> dict[str, Any]:
    """The plan's estimate (written for TE's flash attention) against the allocator's peak."""
    job = plan.job("pretrain")
    assert job.estimate is not None
    mem = job.estimate.memory.model_dump()
    m, bf16 = plan.model, job.precision is not None and job.precision.dtype != "fp32"
    # The local spec's unfused attention keeps softmax's fp32 output and, in bf16, its bf16 copy.
    local_attention = (6 if bf16 else 4) * m.num_attention_heads * m.seq_length**2 * proxy.mbs * m.num_layers
    allocatable = mem["total"] - mem["overhead"]  # the CUDA context and workspaces are not allocations
    out = {"plan": mem, "plan_allocatable": allocatable, "local_attention_scores": local_attention,
           "engine_max_allocated": engine_peak, "bare_max_allocated": bare_peak}  # fmt: skip
    if engine_peak:
        out["engine_over_plan"] = engine_peak / allocatable
        out["engine_over_plan_plus_scores"] = engine_peak / (allocatable + local_attention)
    return out


def config_differences(plan: Any) -> list[str]:
    """Where the bare loop's TransformerConfig arguments differ from the engine's."""
    from engine.worker.context import job_spec
    from engine.worker.mcore import config_kwargs

    job = plan.job("pretrain")
    ours = config_kwargs(job, plan.model, device=job.resources.device, recompute=job_spec(job).training.recompute)
    theirs = bare_config(plan.model.model_dump(), job.layout.model_dump(), job.resources.device == "cuda",
                         job.precision.dtype != "fp32")  # fmt: skip
    keys = sorted(set(ours) | set(theirs))
    return [f"{k}: engine {ours.get(k)!r}, bare {theirs.get(k)!r}" for k in keys if ours.get(k) != theirs.get(k)]


def bare_config(m: dict[str, Any], lay: dict[str, Any], gpu: bool, bf16: bool) -> dict[str, Any]:
    """TransformerConfig arguments of the bare loop, written out: Llama-style, local spec, no TE."""
    import torch
    import torch.nn.functional as F

    dtype = torch.bfloat16 if bf16 else torch.float32
    return dict(
        num_layers=m["num_layers"], hidden_size=m["hidden_size"], num_attention_heads=m["num_attention_heads"],
        num_query_groups=m["num_query_groups"], kv_channels=m["kv_channels"], ffn_hidden_size=m["ffn_hidden_size"],
        normalization="RMSNorm", layernorm_epsilon=m["norm_epsilon"], gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=False, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=m["init_method_std"], tensor_model_parallel_size=lay["tp"],
        pipeline_model_parallel_size=lay["pp"], virtual_pipeline_model_parallel_size=None,
        context_parallel_size=lay["cp"], sequence_parallel=False, account_for_embedding_in_pipeline_split=False,
        account_for_loss_in_pipeline_split=False, params_dtype=dtype, pipeline_dtype=dtype, bf16=bf16,
        use_cpu_initialization=not gpu, perform_initialization=True, batch_p2p_comm=gpu,
        bias_activation_fusion=gpu, masked_softmax_fusion=False, persist_layer_norm=False, bias_dropout_fusion=gpu,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, deallocate_pipeline_outputs=gpu,
    )  # fmt: skip


def bare_main(plan_path: Path) -> None:
    """The reference: GPTModel (local spec), DDP, Megatron's optimizer and schedule, GPTDataset samples.

    No engine code runs per step. Prints one JSON line per step, then the peak allocated memory.
    """
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    plan = json.loads(plan_path.read_text())
    job = next(j for j in plan["jobs"] if j["kind"] == "pretrain")
    m, lay, t = plan["model"], job["layout"], job["config"]["training"]
    gpu, bf16 = job["resources"]["device"] == "cuda", job["precision"]["dtype"] != "fp32"
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        from engine.worker import cpu_compat

        cpu_compat.apply()
    dist.init_process_group("nccl" if gpu else "gloo")
    ps.initialize_model_parallel(lay["tp"], lay["pp"])
    torch.manual_seed(t["seed"])
    model_parallel_cuda_manual_seed(t["seed"])
    config = TransformerConfig(**bare_config(m, lay, gpu, bf16))
    model = GPTModel(
        config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=m["padded_vocab_size"],
        max_sequence_length=m["seq_length"], pre_process=True, post_process=True,
        share_embeddings_and_output_weights=m["tie_embeddings"], position_embedding_type="rope",
        rotary_base=int(m["rotary_base"]),
    )  # fmt: skip
    if gpu:
        model.cuda(torch.cuda.current_device())
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=bf16, use_distributed_optimizer=lay["distributed_optimizer"])  # fmt: skip
    model = DistributedDataParallel(config, ddp, model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=t["lr"], min_lr=t["min_lr"], weight_decay=t["weight_decay"],
                        adam_beta1=t["adam_beta1"], adam_beta2=t["adam_beta2"], adam_eps=t["adam_eps"],
                        clip_grad=t["grad_clip"] or 0.0, bf16=bf16, params_dtype=config.params_dtype,
                        use_distributed_optimizer=lay["distributed_optimizer"]),
        [model],
    )  # fmt: skip
    config.finalize_model_grads_func = finalize_model_grads  # as Megatron's pretrain loop sets them
    config.grad_scale_func = optimizer.scale_loss
    train = bare_dataset(plan, steps=job["estimate"]["steps"], seed=t["seed"])
    gbs, mbs, dp = t["global_batch_size"], t["micro_batch_size"], lay["dp"]
    nmb, rank, dev = gbs // (mbs * dp), ps.get_data_parallel_rank(), "cuda" if gpu else "cpu"

    def batches(step: int):  # type: ignore[no-untyped-def]
        for i in range(nmb):
            first = step * gbs + i * mbs * dp + rank * mbs
            samples = [train[first + k] for k in range(mbs)]
            yield {k: torch.stack([torch.as_tensor(s[k]) for s in samples]).to(dev, non_blocking=True)
                   for k in ("tokens", "labels", "loss_mask", "position_ids")}  # fmt: skip

    def forward_step(it, model):  # type: ignore[no-untyped-def]
        b = next(it)
        out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])

        def loss_func(o):  # type: ignore[no-untyped-def]
            mask = b["loss_mask"].float()
            loss = (o.float() * mask).sum() / mask.sum()
            return loss, {"loss": loss.detach().clone()}

        return out, loss_func

    schedule = get_forward_backward_func()
    for step in range(job["estimate"]["steps"]):
        began = time.perf_counter()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        out = schedule(forward_step_func=forward_step, data_iterator=batches(step), model=model, num_microbatches=nmb,
                       seq_length=m["seq_length"], micro_batch_size=mbs, forward_only=False)  # fmt: skip
        optimizer.step()
        loss = float(torch.stack([o["loss"] for o in out]).mean())  # waits for the step, as the engine's log does
        if dist.get_rank() == 0:
            print(json.dumps({"step": step + 1, "seconds": time.perf_counter() - began, "loss": loss}), flush=True)
    if dist.get_rank() == 0:
        peak = torch.cuda.max_memory_allocated() if gpu else None
        print(json.dumps({"max_memory_allocated": peak}), flush=True)
    dist.destroy_process_group()


def bare_dataset(plan: dict[str, Any], *, steps: int, seed: int) -> Any:
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    class Ids:
        def __init__(self) -> None:
            self.vocab_size, self.eod, self.pad = plan["model"]["vocab_size"], 1, 0
            self.unique_identifiers = {"class": "BareIds"}

    job = next(j for j in plan["jobs"] if j["kind"] == "pretrain")
    data = next(a for a in plan["jobs"][0]["outputs"] if a["kind"] == "dataset")["path"]
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=plan["model"]["seq_length"],
        blend_per_split=[([f"{data}/web/train"], [1.0]), None, None], tokenizer=Ids(), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        path_to_cache=f"{data}/../bare-cache", mmap_bin_files=True,
    )  # fmt: skip
    samples = steps * job["config"]["training"]["global_batch_size"]
    return BlendedMegatronDatasetBuilder(GPTDataset, [samples, 0, 0], lambda: True, config).build()[0]


def summary(run: dict[str, Any], key: str, plan: Any, steps: int, matmul: dict[str, float]) -> dict[str, Any]:
    """Steady-state throughput, losses and exit status of one engine or bare run."""
    rows = run["rows"]
    out = {"exit_code": run["exit_code"], "wall_s": run["wall_s"], "steps_logged": len(rows),
           "steady_s": steady(rows, key, steps), "first_loss": rows[0]["loss"] if rows else None,
           "last_loss": rows[-1]["loss"] if rows else None}  # fmt: skip
    out |= throughput(out["steady_s"], plan, steps, matmul["best_tflops"], PEAK_BF16 if matmul["n"] == 8192 else None)
    if run["exit_code"] != 0:
        out["log_tail"] = run["log_tail"]
    return out


def fp8_runs(work: Path, proxy: Proxy, matmul: dict[str, float], timeout: float) -> dict[str, Any]:
    """TE layer spec in bf16, then FP8 (the default delayed recipe), FP8_STEPS steps each."""
    try:
        import transformer_engine
        import transformer_engine.pytorch
    except ImportError as exc:
        return {"skipped": f"transformer_engine cannot be imported: {exc}"}
    cluster = str(gpu_profile(work / "gpu1-te.yaml", local_spec=False))
    out: dict[str, Any] = {"transformer_engine": getattr(transformer_engine, "__version__", "?")}
    losses: dict[str, list[float]] = {}
    for dtype in ("bf16", "fp8"):
        plan = compile_plan(work, proxy, cluster=cluster, dtype=dtype, steps=FP8_STEPS, tag=f"te-{dtype}")
        prepare_data(plan, proxy, FP8_STEPS)
        run = run_engine(plan, work / f"engine_te_{dtype}.log", timeout)
        out[dtype] = summary(run, "elapsed_s", plan, FP8_STEPS, matmul)
        losses[dtype] = [r["loss"] for r in run["rows"]]
    n = min(len(losses["bf16"]), len(losses["fp8"]))
    if n:
        diff = [abs(a - b) for a, b in zip(losses["bf16"][:n], losses["fp8"][:n], strict=True)]
        out["loss_abs_diff_mean"], out["loss_abs_diff_max"], out["steps_compared"] = sum(diff) / n, max(diff), n
    if out["bf16"]["tokens_per_s"] and out["fp8"]["tokens_per_s"]:
        out["fp8_over_bf16_tokens_per_s"] = out["fp8"]["tokens_per_s"] / out["bf16"]["tokens_per_s"]
    return out


def prepare_data(plan: Any, proxy: Proxy, steps: int) -> None:
    data = Path(next(a for a in plan.job("data").outputs if a.kind == "dataset").path)
    seq = proxy.model["seq_length"]
    write_data(data, tokens=(steps + 2) * proxy.gbs * (seq + 1), vocab=proxy.vocab, seq=seq)


def environment(gpu: bool) -> dict[str, Any]:
    import megatron.core
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "megatron_core": getattr(megatron.core, "__version__", "?"), "host": platform.node(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}  # fmt: skip
    if gpu:
        props = torch.cuda.get_device_properties(0)
        env |= {"device": props.name, "sms": props.multi_processor_count, "memory_gib": props.total_memory / GIB,
                "cuda": torch.version.cuda, "nccl": str(torch.cuda.nccl.version())}  # fmt: skip
    else:
        env |= {"device": f"CPU ({os.cpu_count()} cores), gloo, fp32"}
    return env


def gib(n: float | None) -> str:
    from engine.compile.estimate import human_bytes

    return "-" if n is None else human_bytes(n)


def num(x: float | None, fmt: str = ".4g") -> str:
    return "-" if x is None else format(x, fmt)


def markdown(r: dict[str, Any]) -> str:
    e, b, mem, env = r["engine"], r["bare"], r["memory"], r["environment"]
    head = "CPU DRY RUN: the script's code path on a tiny model, not GPU numbers" if r["cpu_dry_run"] else "GPU check"
    lines = [
        f"# gpu_check: {r['label']} ({head})", "",
        f"{env['device']} · torch {env['torch']} · megatron-core {env['megatron_core']} · Python {env['python']} · "
        f"{env['date']}", "",
        f"Proxy `{r['proxy']['name']}`: {r['params'] / 1e9:.3f}B parameters, {json.dumps(r['proxy']['model'])}, "
        f"vocab {r['padded_vocab']}, global batch {r['proxy']['gbs']} × micro {r['proxy']['mbs']}, "
        f"{r['steps']} steps, steady state over steps {WARMUP + 1}..{r['steps'] - 1}; "
        f"{r['flops_per_token']:.4g} FLOPs/token (Megatron's count; plan: {r['plan_flops_per_token']:.4g}).", "",
        f"Matmul ceiling ({r['matmul']['dtype']}, {r['matmul']['n']}³): best {r['matmul']['best_tflops']:.4g}, "
        f"median {r['matmul']['median_tflops']:.4g} TFLOP/s (the MFU denominator is the best).", "",
        "| | engine worker | bare Megatron-Core |", "| --- | ---: | ---: |",
        f"| exit code | {e['exit_code']} | {b['exit_code']} |",
        f"| tokens/s | {num(e['tokens_per_s'], '.1f')} | {num(b['tokens_per_s'], '.1f')} |",
        f"| TFLOP/s per GPU | {num(e['tflops_per_gpu'], '.2f')} | {num(b['tflops_per_gpu'], '.2f')} |",
        f"| MFU vs measured matmul | {num(e['mfu_measured'], '.3f')} | {num(b['mfu_measured'], '.3f')} |",
        f"| MFU vs datasheet {PEAK_BF16:.0f} | {num(e['mfu_datasheet'], '.3f')} | {num(b['mfu_datasheet'], '.3f')} |",
        f"| loss, first → last step | {num(e['first_loss'])} → {num(e['last_loss'])} | "
        f"{num(b['first_loss'])} → {num(b['last_loss'])} |",
        f"| peak allocated | {gib(mem['engine_max_allocated'])} | {gib(mem['bare_max_allocated'])} |",
        f"| wall time of the run | {e['wall_s']:.1f} s | {b['wall_s']:.1f} s |", "",
        f"**engine/bare tokens/s: {num(r['engine_over_bare'], '.3f')}**", "",
        "| memory per GPU | size |", "| --- | ---: |",
        *[f"| plan: {k} | {gib(v)} |" for k, v in mem["plan"].items()],
        f"| plan without the CUDA overhead (allocatable) | {gib(mem['plan_allocatable'])} |",
        f"| unfused attention scores the plan does not count (local spec) | {gib(mem['local_attention_scores'])} |",
        f"| measured: engine max_memory_allocated | {gib(mem['engine_max_allocated'])} |",
        f"| measured / plan allocatable | {num(mem.get('engine_over_plan'), '.3f')} |",
        f"| measured / (plan allocatable + scores) | {num(mem.get('engine_over_plan_plus_scores'), '.3f')} |",
    ]  # fmt: skip
    if r["config_differences"]:
        lines += ["", "Config differences engine vs bare: " + "; ".join(r["config_differences"])]
    if r.get("fp8"):
        lines += ["", *fp8_markdown(r["fp8"])]
    return "\n".join(lines) + "\n"


def fp8_markdown(f: dict[str, Any]) -> list[str]:
    if "skipped" in f:
        return [f"FP8: skipped ({f['skipped']})."]
    lines = [f"Transformer Engine {f['transformer_engine']} layer spec, {FP8_STEPS} steps each:", "",
             "| | TE bf16 | TE FP8 (delayed) |", "| --- | ---: | ---: |"]  # fmt: skip
    for key, fmt in (("exit_code", "d"), ("tokens_per_s", ".1f"), ("tflops_per_gpu", ".2f"), ("last_loss", ".4g")):
        lines.append(f"| {key} | {num(f['bf16'][key], fmt)} | {num(f['fp8'][key], fmt)} |")
    lines += ["", f"FP8/bf16 tokens/s {num(f.get('fp8_over_bf16_tokens_per_s'), '.3f')}; |loss difference| over "
              f"{f.get('steps_compared', 0)} steps: mean {num(f.get('loss_abs_diff_mean'))}, "
              f"max {num(f.get('loss_abs_diff_max'))}."]  # fmt: skip
    return lines


def check(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    gpu = not args.cpu
    proxy = CPU_PROXY if args.cpu else GPU_PROXY
    if args.seq or args.mbs:
        model = proxy.model | ({"seq_length": args.seq} if args.seq else {})
        proxy = dataclasses.replace(proxy, model=model, mbs=args.mbs or proxy.mbs)
    steps = args.steps or proxy.steps
    kind = None if args.cpu else re.search(r"\b(?:[ABH]|GB)\d+\b", torch.cuda.get_device_name(0))
    label = "cpu-dry-run" if args.cpu else (kind.group(0).lower() if kind else "gpu")
    began = time.perf_counter()

    def phase(text: str) -> None:
        print(f"[gpu_check {time.perf_counter() - began:6.1f}s] {text}", flush=True)

    phase(f"{label}: matmul ceiling")
    matmul = matmul_ceiling(gpu)
    cluster = str(gpu_profile(work / "gpu1.yaml", local_spec=True)) if gpu else "local"
    plan = compile_plan(work, proxy, cluster=cluster, dtype="bf16" if gpu else "fp32", steps=steps, tag="local")
    prepare_data(plan, proxy, steps)
    phase(f"engine worker, {steps} steps")
    engine = run_engine(plan, work / "engine.log", args.timeout)
    phase("bare Megatron-Core loop")
    bare = run_bare(plan, work / "bare.log", args.timeout)
    est = plan.job("pretrain").estimate
    report: dict[str, Any] = {
        "label": label, "cpu_dry_run": args.cpu, "environment": environment(gpu), "proxy": dataclasses.asdict(proxy),
        "steps": steps, "warmup_steps": WARMUP, "params": est.params.total,
        "padded_vocab": plan.model.padded_vocab_size, "flops_per_token": megatron_flops_per_token(plan.model.model_dump()),
        "plan_flops_per_token": est.flops_per_token, "matmul": matmul,
        "engine": summary(engine, "elapsed_s", plan, steps, matmul), "bare": summary(bare, "seconds", plan, steps, matmul),
        "config_differences": config_differences(plan),
    }  # fmt: skip
    e, b = report["engine"]["tokens_per_s"], report["bare"]["tokens_per_s"]
    report["engine_over_bare"] = e / b if e and b else None
    peak = next(
        (r["gpu_max_allocated_bytes"] for r in reversed(engine["rows"]) if "gpu_max_allocated_bytes" in r), None
    )
    report["memory"] = memory_check(plan, peak, bare["max_allocated"], proxy)
    report["losses"] = {"engine": [r["loss"] for r in engine["rows"]], "bare": [r["loss"] for r in bare["rows"]]}
    if args.fp8:
        phase(f"Transformer Engine bf16 and FP8, {FP8_STEPS} steps each")
        report["fp8"] = fp8_runs(work, proxy, matmul, args.timeout)
    phase("done")
    for log in work.glob("*.log"):
        if args.keep_logs:
            (args.out / f"gpu_check_{label}.{log.stem}.log").write_text(log.read_text(errors="replace"))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for gpu_check_<label>.json and .md")
    parser.add_argument("--cpu", action="store_true", help="dry run: tiny model, gloo, fp32")
    parser.add_argument("--fp8", action="store_true", help="also Transformer Engine bf16 vs FP8")
    parser.add_argument("--steps", type=int, default=0, help="steps per run (default: the proxy's)")
    parser.add_argument("--seq", type=int, default=0, help="sequence length (default: the proxy's)")
    parser.add_argument("--mbs", type=int, default=0, help="micro-batch size (default: the proxy's)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per training run")
    parser.add_argument("--keep-logs", action="store_true", help="copy the runs' logs next to the report")
    parser.add_argument("--bare", type=Path, help=argparse.SUPPRESS)  # the bare loop's own process
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed")
    if args.bare:
        bare_main(args.bare)
        return
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: use --cpu for the dry run")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        report = check(args, Path(tmp))
    stem = args.out / f"gpu_check_{report['label']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
