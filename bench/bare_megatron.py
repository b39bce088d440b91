"""A minimal Megatron-Core pretraining loop: the reference the engine's overhead is measured against.

Same model, batch and data as the engine's job (read from its plan.json), no engine code on the hot
path: GPTModel with the local spec, DDP, Megatron's optimizer, get_forward_backward_func, samples
from GPTDataset. Only the CPU compatibility layer is shared, since Megatron-Core cannot run on CPU
without it. Prints one JSON line per step: {"step", "seconds"}.

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
        num_query_groups=m["num_query_groups"], ffn_hidden_size=m["ffn_hidden_size"], normalization="RMSNorm",
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, tensor_model_parallel_size=lay["tp"], pipeline_model_parallel_size=lay["pp"],
        params_dtype=torch.float32, pipeline_dtype=torch.float32, use_cpu_initialization=True,
        batch_p2p_comm=False, bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
    )  # fmt: skip
    model = GPTModel(
        config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=m["padded_vocab_size"],
        max_sequence_length=m["seq_length"], pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(), position_embedding_type="rope",
    )  # fmt: skip
    model = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=t["lr"], weight_decay=t["weight_decay"], clip_grad=t["grad_clip"]),
        [model],
    )
    config.finalize_model_grads_func = finalize_model_grads  # as Megatron's pretrain loop sets it
    config.grad_scale_func = optimizer.scale_loss

    class Ids:
        def __init__(self) -> None:
            self.vocab_size, self.eod, self.pad = m["vocab_size"], 1, 0
            self.unique_identifiers = {"class": "BareIds"}

    data = next(a for a in plan["jobs"][0]["outputs"] if a["kind"] == "dataset")["path"]
    src = plan["jobs"][0]["config"]["sources"][0]["name"]
    gbs, mbs, steps = t["global_batch_size"], t["micro_batch_size"], t["steps"]
    dp = lay["dp"]
    ds_config = GPTDatasetConfig(
        random_seed=t["seed"], sequence_length=m["seq_length"], blend_per_split=[([f"{data}/{src}/train"], None), None, None],
        tokenizer=Ids(), reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, path_to_cache=f"{data}/../bare-cache",
    )  # fmt: skip
    (train, _, _) = BlendedMegatronDatasetBuilder(GPTDataset, [steps * gbs, 0, 0], lambda: True, ds_config).build()
    nmb, rank = gbs // (mbs * dp), ps.get_data_parallel_rank()

    def batches(step: int):  # type: ignore[no-untyped-def]
        for i in range(nmb):
            first = step * gbs + i * mbs * dp + rank * mbs
            samples = [train[first + k] for k in range(mbs)]
            yield {
                k: torch.stack([torch.as_tensor(s[k]) for s in samples])
                for k in ("tokens", "labels", "loss_mask", "position_ids")
            }

    def forward_step(it, model):  # type: ignore[no-untyped-def]
        b = next(it)
        out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        return out, lambda o: ((o * b["loss_mask"]).sum() / b["loss_mask"].sum(), {})

    schedule = get_forward_backward_func()
    for step in range(steps):
        began = time.perf_counter()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        schedule(forward_step_func=forward_step, data_iterator=batches(step), model=model, num_microbatches=nmb,
                 seq_length=m["seq_length"], micro_batch_size=mbs, forward_only=False)  # fmt: skip
        optimizer.step()
        if dist.get_rank() == 0:
            print(json.dumps({"step": step + 1, "seconds": time.perf_counter() - began}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
