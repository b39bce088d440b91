"""Worker pieces that need no process group: CPU compat, rank environment, GPU configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.errors import EngineError
from engine.worker import cpu_compat
from engine.worker.context import job_spec
from engine.worker.env import first_host, rank_info
from engine.worker.mcore import FP8_FORMAT, config_kwargs, require_transformer_engine

from ..conftest import REPO, compile_with

H100 = REPO / "recipes" / "h100"


def test_every_patched_megatron_symbol_is_where_cpu_compat_expects_it() -> None:
    assert cpu_compat.check() == []


def test_cpu_compat_notices_a_moved_symbol(monkeypatch: pytest.MonkeyPatch) -> None:
    modules = {**cpu_compat.PROXIED_MODULES, "megatron.core.optimizer.clip_grads": ("device='cuda:7'",)}
    monkeypatch.setattr(cpu_compat, "PROXIED_MODULES", modules)
    replaced = {**cpu_compat.REPLACED, "megatron.core.tensor_parallel.random": ("no_such_function",)}
    monkeypatch.setattr(cpu_compat, "REPLACED", replaced)
    problems = cpu_compat.check()
    assert any("clip_grads: no longer contains" in p for p in problems)
    assert any("random.no_such_function is gone" in p for p in problems)


def test_checkpoint_writer_queue_is_where_checkpoint_expects_it() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    assert hasattr(filesystem_async, "_results_queue")


def test_cpu_torch_proxy_maps_cuda_placement() -> None:
    proxy = cpu_compat._TorchOnCpu()
    assert proxy.zeros(2, device="cuda").device.type == "cpu"
    assert proxy.ones(1, device=proxy.cuda.current_device()).device.type == "cpu"
    assert proxy.float32 is torch.float32
    proxy.cuda.synchronize()


def test_rank_from_torchrun_and_slurm() -> None:
    tr = rank_info({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.master_addr, tr.master_port) == (3, 4, 1, "h", 1234)
    sl = rank_info(
        {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[007-008]",
         "SLURM_JOB_ID": "4242"}
    )  # fmt: skip
    assert (sl.rank, sl.world_size, sl.local_rank, sl.master_addr) == (9, 16, 1, "gpu007")
    assert sl.master_port == 20000 + 4242
    assert rank_info({}).world_size == 1


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [("node1", "node1"), ("gpu[003-010,012]", "gpu003"), ("a[1,5],b2", "a1"), ("dgx-h100-[17-18]", "dgx-h100-17")],
)
def test_first_host(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


def test_gpu_job_configuration_without_a_gpu() -> None:
    plan = compile_with(recipe=H100 / "llama31_405b.yaml")
    job = plan.job("pretrain")
    kw = config_kwargs(job, plan.model, device="cuda", recompute=job_spec(job).training.recompute)
    assert kw["params_dtype"] is torch.bfloat16 and kw["bf16"] is True
    assert (kw["fp8"], kw["fp8_recipe"], kw["fp8_param"]) == (FP8_FORMAT, "delayed", True)
    assert kw["fp8_amax_history_len"] == 1024
    assert (kw["tensor_model_parallel_size"], kw["pipeline_model_parallel_size"]) == (8, 8)
    assert (kw["virtual_pipeline_model_parallel_size"], kw["context_parallel_size"]) == (8, 2)
    assert kw["sequence_parallel"] is True and kw["batch_p2p_comm"] is True
    assert kw["account_for_embedding_in_pipeline_split"] and kw["account_for_loss_in_pipeline_split"]
    assert kw["masked_softmax_fusion"] and kw["apply_rope_fusion"]
    assert kw["num_query_groups"] == 8 and kw["ffn_hidden_size"] == 53248
    sft = config_kwargs(plan.job("sft"), plan.model, device="cuda", recompute=job_spec(plan.job("sft")).training.recompute)
    assert "fp8" not in sft and sft["recompute_granularity"] == "full"


def test_gpu_fp8_recipes_reach_the_config() -> None:
    for recipe in ("tensorwise", "blockwise"):
        plan = compile_with(f"stages.pretrain.precision.fp8_recipe={recipe}", recipe=H100 / "llama3_8b.yaml")
        kw = config_kwargs(plan.job("pretrain"), plan.model, device="cuda", recompute=job_spec(plan.job("pretrain")).training.recompute)
        assert kw["fp8_recipe"] == recipe and "fp8_amax_history_len" not in kw


def test_cpu_job_configuration() -> None:
    plan = compile_with()
    kw = config_kwargs(plan.job("pretrain"), plan.model, device="cpu", recompute=job_spec(plan.job("pretrain")).training.recompute)
    assert kw["params_dtype"] is torch.float32 and kw["bf16"] is False
    assert kw["batch_p2p_comm"] is False and kw["use_cpu_initialization"] is True
    assert not any(kw[k] for k in ("masked_softmax_fusion", "bias_dropout_fusion", "apply_rope_fusion"))
    assert "fp8" not in kw


def test_transformer_config_accepts_the_gpu_arguments() -> None:
    from megatron.core.transformer.transformer_config import TransformerConfig

    plan = compile_with(recipe=H100 / "llama3_8b.yaml")
    kw = config_kwargs(plan.job("sft"), plan.model, device="cuda", recompute=job_spec(plan.job("sft")).training.recompute)
    try:
        import transformer_engine  # noqa: F401
    except ImportError:  # TransformerConfig checks that TE provides the fused RoPE kernel
        kw["apply_rope_fusion"] = False
    config = TransformerConfig(**kw)
    assert config.tensor_model_parallel_size == 2 and config.sequence_parallel


def test_missing_transformer_engine_is_a_clear_start_up_error() -> None:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(EngineError, match="needs Transformer Engine"):
            require_transformer_engine()
    else:
        require_transformer_engine()


def test_worker_reports_a_bad_plan_or_job_without_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    plan = tmp_path / "plan.json"
    plan.write_text(compile_with().to_json())
    for args, words in (([str(tmp_path / "none.json"), "--job", "pretrain"], "cannot read the plan"),
                        ([str(plan), "--job", "nope"], "has no job 'nope'")):  # fmt: skip
        done = subprocess.run([sys.executable, "-m", "engine.worker", *args], capture_output=True, text=True)
        assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr


def test_fp8_param_gather_reaches_both_configs() -> None:
    from engine.worker.mcore import ddp_kwargs

    plan = compile_with(recipe=H100 / "llama31_405b.yaml")
    job = plan.job("pretrain")
    assert config_kwargs(job, plan.model, device="cuda", recompute="none")["fp8_param"] is True
    assert ddp_kwargs(job)["fp8_param_gather"] is True and ddp_kwargs(job)["use_distributed_optimizer"] is True
    assert ddp_kwargs(plan.job("sft"))["fp8_param_gather"] is False


def test_the_layout_independent_init_has_megatrons_distribution_for_every_tensor(tmp_path: Path) -> None:
    """Same distribution as Megatron-Core's own initialisation, tensor by tensor: ones for norm weights, N(0, σ)
    for embeddings, input projections and the output layer, N(0, σ/√(2L)) for the output projections."""
    import json
    import math
    import os
    import subprocess
    import sys

    from .helpers import HERE, make_plan

    _, plan_path = make_plan(tmp_path, "stages.pretrain.resources.gpus_per_node=1", "model.tie_embeddings=false")
    done = subprocess.run([sys.executable, str(HERE / "init_check.py"), str(plan_path)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    megatron, engine = found["megatron"], found["engine"]
    assert set(megatron) == set(engine) and len(megatron) > 10
    for name, (mean, std, n) in megatron.items():
        e_mean, e_std, _ = engine[name]
        if std == 0:  # a constant: ones or zeros
            assert (e_mean, e_std) == (mean, 0.0), name
            continue
        assert e_std == pytest.approx(std, rel=6 / math.sqrt(2 * n) + 0.01), name  # within sampling error
        assert abs(e_mean - mean) <= 6 * std / math.sqrt(n), name


def test_cpu_threads_are_omp_num_threads_or_a_share_of_the_cores() -> None:
    import os

    from engine.worker.env import cpu_threads

    cores = len(os.sched_getaffinity(0))
    assert cpu_threads({"OMP_NUM_THREADS": "3"}, processes_per_node=2) == 3
    assert cpu_threads({}, processes_per_node=1) == cores
    assert cpu_threads({"OMP_NUM_THREADS": ""}, processes_per_node=2) == max(1, cores // 2)
    assert cpu_threads({"OMP_NUM_THREADS": "0"}, processes_per_node=4 * cores) == 1
