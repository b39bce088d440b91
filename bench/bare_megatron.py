"""A minimal Megatron-Core pretraining loop: the reference the engine's speed and learning are measured against.

Same model, batch, optimizer, schedule and data as the engine's job (read from its plan.json), no
engine code: GPTModel with the local spec and Megatron-Core's own initialisation (torch.manual_seed
and model_parallel_cuda_manual_seed of the job's seed, as Megatron-LM's pretrain sets them), DDP,
Megatron's optimizer and OptimizerParamScheduler, get_forward_backward_func, samples from the
GPTDatasets of the data stage's text sources blended by weight. Only the CPU compatibility layer is
shared, since Megatron-Core cannot run on CPU without it. Prints one JSON line per step,
{"step", "seconds", "loss"}, then {"val_loss"}: the token-weighted loss over the job's eval_iters
validation batches, as the engine measures it.

    python -m torch.distributed.run --standalone --nproc-per-node=N bench/bare_megatron.py plan.json
"""

from __future__ import annotations

import json
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

warnings.filterwarnings("ignore")


def main(plan_path: str) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    from engine.worker import cpu_compat

    with open(plan_path) as f:
        plan = json.load(f)
    job = next(j for j in plan["jobs"] if j["kind"] == "pretrain")
    m, lay, t = plan["model"], job["layout"], job["config"]["training"]
    cpu_compat.apply()
    dist.init_process_group("gloo")
    ps.initialize_model_parallel(lay["tp"], lay["pp"])
    torch.manual_seed(t["seed"])
    model_parallel_cuda_manual_seed(t["seed"])
    config = TransformerConfig(
        num_layers=m["num_layers"], hidden_size=m["hidden_size"], num_attention_heads=m["num_attention_heads"],
        num_query_groups=m["num_query_groups"], kv_channels=m["kv_channels"], ffn_hidden_size=m["ffn_hidden_size"],
        normalization="RMSNorm", layernorm_epsilon=m["norm_epsilon"], init_method_std=m["init_method_std"],
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, tensor_model_parallel_size=lay["tp"], pipeline_model_parallel_size=lay["pp"],
        params_dtype=torch.float32, pipeline_dtype=torch.float32, use_cpu_initialization=True,
        batch_p2p_comm=False, bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
    )  # fmt: skip
    model = GPTModel(
        config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=m["padded_vocab_size"],
        max_sequence_length=m["seq_length"], pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(), position_embedding_type="rope", rotary_base=int(m["rotary_base"]),
        share_embeddings_and_output_weights=m["tie_embeddings"],
    )  # fmt: skip
    model = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=t["lr"], min_lr=t["min_lr"], weight_decay=t["weight_decay"],
            adam_beta1=t["adam_beta1"], adam_beta2=t["adam_beta2"], adam_eps=t["adam_eps"],
            clip_grad=t["grad_clip"] or 0.0,
        ),
        [model],
    )  # fmt: skip
    constant = t["lr_schedule"] == "constant"
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t["lr"], min_lr=t["lr"] if constant else t["min_lr"],
        lr_warmup_steps=t["warmup_steps"], lr_decay_steps=t["steps"] if not constant else t["warmup_steps"] + 1,
        lr_decay_style=t["lr_schedule"], start_wd=t["weight_decay"], end_wd=t["weight_decay"],
        wd_incr_steps=t["steps"], wd_incr_style="constant",
    )  # fmt: skip
    config.finalize_model_grads_func = finalize_model_grads  # as Megatron's pretrain loop sets it
    config.grad_scale_func = optimizer.scale_loss

    data_job = next(j for j in plan["jobs"] if j["name"] == job["config"]["data"])
    data = next(a for a in data_job["outputs"] if a["kind"] == "dataset")["path"]
    with open(f"{data}/manifest.json") as f:
        tok = json.load(f)["tokenizer"]

    class Ids:
        def __init__(self) -> None:
            self.vocab_size, self.eod, self.pad = int(tok["vocab_size"]), int(tok["eod"]), int(tok["pad"])
            self.unique_identifiers = {"class": "BareIds", "vocab_size": self.vocab_size}

    mixture = job["config"].get("mixture") or {}

    def blend(split: str) -> tuple[list[str], list[float]]:
        texts = [s for s in data_job["config"]["sources"] if s["records"] == "text"]
        weighted = [(s["name"], float(mixture.get(s["name"], s.get("weight", 1.0)))) for s in texts]
        return [f"{data}/{name}/{split}" for name, w in weighted if w > 0], [w for _, w in weighted if w > 0]

    gbs, mbs, steps = t["global_batch_size"], t["micro_batch_size"], t["steps"]
    dp = lay["dp"]
    ds_config = GPTDatasetConfig(
        random_seed=t["seed"], sequence_length=m["seq_length"], blend_per_split=[blend("train"), blend("valid"), None],
        tokenizer=Ids(), reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, path_to_cache=f"{data}/../bare-cache-{dist.get_world_size()}",
    )  # fmt: skip
    n_valid = t["eval_iters"] * gbs
    (train, valid, _) = BlendedMegatronDatasetBuilder(
        GPTDataset, [steps * gbs, n_valid, 0], lambda: True, ds_config
    ).build()
    nmb, rank = gbs // (mbs * dp), ps.get_data_parallel_rank()

    def batches(dataset, start: int, num: int):  # type: ignore[no-untyped-def]
        for i in range(num):
            first = start + i * mbs * dp + rank * mbs
            samples = [dataset[(first + k) % len(dataset)] for k in range(mbs)]
            yield {
                k: torch.stack([torch.as_tensor(s[k]) for s in samples])
                for k in ("tokens", "labels", "loss_mask", "position_ids")
            }

    def forward_step(it, model):  # type: ignore[no-untyped-def]
        b = next(it)
        out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])

        def loss(o):  # type: ignore[no-untyped-def]
            nll, n = (o * b["loss_mask"]).sum(), b["loss_mask"].sum()
            return nll / n, {"nll": torch.stack([nll.detach(), n.float()])}

        return out, loss

    def run(data_iterator, num: int, forward_only: bool) -> torch.Tensor:  # type: ignore[no-untyped-def]
        outs = schedule(forward_step_func=forward_step, data_iterator=data_iterator, model=model, num_microbatches=num,
                        seq_length=m["seq_length"], micro_batch_size=mbs, forward_only=forward_only)  # fmt: skip
        total = torch.stack([o["nll"] for o in outs]).sum(0) if outs else torch.zeros(2)
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        return total

    schedule = get_forward_backward_func()
    for step in range(steps):
        began = time.perf_counter()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        total = run(batches(train, step * gbs, nmb), nmb, forward_only=False)
        optimizer.step()
        scheduler.step(increment=1)
        if dist.get_rank() == 0:
            row = {"step": step + 1, "seconds": time.perf_counter() - began, "loss": float(total[0] / total[1])}
            print(json.dumps(row), flush=True)
    model.eval()
    with torch.no_grad():
        total = run(batches(valid, 0, t["eval_iters"] * nmb), t["eval_iters"] * nmb, forward_only=True)
    if dist.get_rank() == 0:
        print(json.dumps({"val_loss": float(total[0] / total[1])}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
