"""Estimates: parameter counts, FLOPs, Korthikanti activations, optimizer bytes, memory refusal."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from engine.compile.estimate import (
    _in_flight,
    count_params,
    flops_per_token,
    layer_activation_bytes,
)
from engine.compile.resolve import Layout

from .conftest import REPO, compile_with, problems_of

H100 = REPO / "recipes" / "h100"


@pytest.mark.parametrize(
    ("recipe", "published"),
    [("llama3_8b", 8_030_261_248), ("llama3_70b", 70_553_706_496), ("llama31_405b", 405_853_388_800)],
)
def test_parameter_counts_match_the_released_models(recipe: str, published: int) -> None:
    plan = compile_with(recipe=H100 / f"{recipe}.yaml")
    assert count_params(plan.model).total == published


def test_flops_per_token_match_megatrons_closed_form() -> None:
    m = compile_with(recipe=H100 / "llama3_8b.yaml").model
    h, L, s, V = m.hidden_size, m.num_layers, m.seq_length, m.padded_vocab_size
    ratio_groups = m.num_query_groups / m.num_attention_heads
    # Megatron-LM's num_floating_point_operations per token, with the causal-attention halving.
    closed = 12 * L * h * h * ((1 + ratio_groups + s / h / 2) + m.ffn_hidden_size / h * 1.5 + V / (2 * L * h))
    assert flops_per_token(m, s) == pytest.approx(closed, rel=1e-12)
    # About 6 × parameters plus attention, as the rule of thumb says.
    assert 6 * count_params(m).total < flops_per_token(m, s) < 7.5 * count_params(m).total


def _layout(tp: int = 1, pp: int = 1, vpp: int = 1, cp: int = 1, sp: bool = False, dp: int = 1) -> Layout:
    return Layout(
        world_size=tp * pp * cp * dp, tp=tp, pp=pp, vpp=vpp, cp=cp, dp=dp, sequence_parallel=sp,
        distributed_optimizer=True, embedding_in_pipeline_split=False, loss_in_pipeline_split=False,
    )  # fmt: skip


def test_activation_rows_of_korthikanti_table_2() -> None:
    m = compile_with(recipe=H100 / "llama3_70b.yaml").model
    s, b, h, a = 8192, 1, m.hidden_size, m.num_attention_heads
    sbh = s * b * h

    def act(recompute: str, **kw: int | bool) -> float:
        return layer_activation_bytes(m, _layout(**kw), s, b, recompute, 2)  # type: ignore[arg-type]

    assert act("none") == pytest.approx(sbh * (34 + 5 * a * s / h))
    assert act("none", tp=8) == pytest.approx(sbh * (10 + 24 / 8 + 5 * a * s / (h * 8)))
    assert act("none", tp=8, sp=True) == pytest.approx(sbh / 8 * (34 + 5 * a * s / h))
    assert act("selective", tp=8) == pytest.approx(sbh * (10 + 24 / 8))
    assert act("selective", tp=8, sp=True) == pytest.approx(34 * sbh / 8)
    assert act("full") == pytest.approx(2 * sbh)
    assert act("full", tp=8, sp=True) == pytest.approx(2 * sbh / 8)
    # Context parallelism splits the sequence.
    assert act("selective", tp=8, sp=True, cp=2) == pytest.approx(34 * sbh / 8 / 2)
    # fp32 activations count twice.
    assert layer_activation_bytes(m, _layout(), s, b, "full", 4) == pytest.approx(4 * sbh)


def test_microbatches_in_flight() -> None:
    assert _in_flight(_layout(), 8) == 1
    assert _in_flight(_layout(pp=4), 8) == 4
    assert _in_flight(_layout(pp=4), 2) == 2
    assert _in_flight(_layout(pp=4, vpp=2), 8) == pytest.approx(4 * (1 + 3 / 8))


def _state_bytes_per_param(*overrides: str) -> float:
    plan = compile_with(*overrides, recipe=H100 / "llama3_8b.yaml", force=True)
    est = plan.job("sft").estimate
    assert est is not None
    mem = est.memory
    return (mem.weights + mem.gradients + mem.optimizer) / est.params_per_gpu


def test_optimizer_state_bytes_per_parameter() -> None:
    # sft in the 8B recipe: 8 GPUs at tp=2 → dp=4.
    assert _state_bytes_per_param() == pytest.approx(6 + 12 / 4, rel=1e-6)
    # Without it: 2 bf16 weights + 4 fp32 gradients (grad_reduce_in_fp32) + 12 of Adam = 18.
    assert _state_bytes_per_param("stages.sft.parallelism.distributed_optimizer=false") == pytest.approx(18, rel=1e-6)
    assert _state_bytes_per_param("stages.sft.parallelism.tp=8") == pytest.approx(6 + 12 / 1, rel=1e-6)
    assert _state_bytes_per_param("stages.sft.precision.dtype=fp32") == pytest.approx(4 + 4 + 8 / 4, rel=1e-6)


def test_params_per_gpu_shrink_with_tp_and_pp() -> None:
    base = compile_with(recipe=H100 / "llama3_70b.yaml").job("sft").estimate
    wider = compile_with(
        "stages.sft.parallelism.pp=8", "stages.sft.resources.nodes=8", recipe=H100 / "llama3_70b.yaml", force=True
    )
    assert base is not None and wider.job("sft").estimate is not None
    total = base.params.total
    assert math.isclose(base.params_per_gpu, total / 32, rel_tol=0.15)  # tp8 × pp4
    assert wider.job("sft").estimate.params_per_gpu < base.params_per_gpu  # type: ignore[union-attr]


def test_recompute_lowers_activation_memory() -> None:
    acts = []
    for mode in ("none", "selective", "full"):
        est = compile_with(f"stages.pretrain.training.recompute={mode}").job("pretrain").estimate
        assert est is not None
        acts.append(est.memory.activations)
    assert acts[0] > acts[1] > acts[2]


def test_ppo_counts_four_models_and_the_kv_cache() -> None:
    est = compile_with(recipe=H100 / "llama3_8b.yaml").job("ppo").estimate
    sft = compile_with(recipe=H100 / "llama3_8b.yaml").job("sft").estimate
    assert est is not None and sft is not None
    assert est.memory.kv_cache > 0 and est.memory.frozen_models > 0
    # Actor and critic both keep optimizer state.
    assert est.memory.optimizer == pytest.approx(2 * est.params_per_gpu * 12 / 4, rel=1e-6)


def test_rl_memory_is_the_largest_phase_and_offloading_takes_roles_out_of_phases() -> None:
    recipe = H100 / "llama3_70b.yaml"
    kept = compile_with(recipe=recipe).job("ppo").estimate
    off = compile_with("stages.ppo.offload=[reference,reward_model,critic]", recipe=recipe).job("ppo").estimate
    assert kept is not None and off is not None
    m, o = kept.memory, off.memory
    assert set(m.phases) == {"rollout", "scoring", "training"} and m.total == max(m.phases.values())
    # Without offload every role is resident in every phase: they differ by KV cache, forward and activations.
    assert m.phases["training"] - m.phases["rollout"] == m.activations - m.kv_cache
    critic = (m.weights + m.gradients + m.optimizer) / 2  # actor and critic hold the same state
    frozen = m.frozen_models  # reference + reward model
    # Offloaded: rollouts hold neither frozen model nor the critic; training holds the critic, not the frozen
    # models; scoring brings the offloaded roles back one at a time (the critic is the largest).
    assert m.phases["rollout"] - o.phases["rollout"] == pytest.approx(frozen + critic, abs=2)
    assert m.phases["training"] - o.phases["training"] == pytest.approx(frozen, abs=2)
    assert m.phases["scoring"] - o.phases["scoring"] == pytest.approx(frozen, abs=2)
    assert o.total == max(o.phases.values()) < m.total
    # Each offloaded role crosses the host link twice per iteration: the estimate is slower, not faster.
    assert off.step_time_s > kept.step_time_s
    sft = compile_with(recipe=recipe).job("sft").estimate
    assert sft is not None and sft.memory.phases == {}


def test_offloading_a_role_the_stage_does_not_build_is_refused() -> None:
    err = problems_of("stages.ppo.ppo.advantage=grpo", "stages.ppo.offload=[critic,reference,reference]")
    found = {p.path: p for p in err.problems}
    assert "trains no critic" in found["stages.ppo.offload[0]"].message
    assert "listed twice" in found["stages.ppo.offload[2]"].message
    err = problems_of("stages.ppo.ppo.kl_coef=0", "stages.ppo.offload=[reference]")
    assert [p.path for p in err.problems] == ["stages.ppo.offload[0]"] and "kl_coef is 0" in err.problems[0].message


def test_a_job_over_gpu_memory_is_refused_unless_forced() -> None:
    err = problems_of("stages.pretrain.training.micro_batch_size=16", recipe=H100 / "llama3_8b.yaml")
    [problem] = err.problems
    assert problem.path == "stages.pretrain"
    assert "GiB per GPU exceeds the 79.1 GiB of a H100" in problem.message
    assert "--force" in problem.fix
    plan = compile_with("stages.pretrain.training.micro_batch_size=16", recipe=H100 / "llama3_8b.yaml", force=True)
    assert plan.job("pretrain").estimate is not None


def test_time_estimate_follows_the_profile() -> None:
    # A profile without `throughput` (the CPU ones): FLOPs / (GPUs × peak × assumed MFU).
    cpu = compile_with().job("pretrain").estimate
    assert cpu is not None
    assert cpu.flops_per_step / cpu.step_time_s / 2 == pytest.approx(0.2e12 * 0.2, rel=1e-9)
    # The h100 profile's layout model: the 8B pretraining layout (TP1, CP2, FP8) computes at the FP8 GEMM,
    # attention and bf16 output-layer rates, and adds the data-parallel reduction; nothing is faster than the
    # FP8 GEMM rate.
    plan = compile_with(recipe=H100 / "llama3_8b.yaml")
    est = plan.job("pretrain").estimate
    assert est is not None
    achieved = est.flops_per_step / est.step_time_s / 8
    assert 989e12 * 0.5 < achieved < 1979e12 * 0.41
    assert est.tokens_per_s == pytest.approx(128 * 8192 / est.step_time_s)
    assert est.steps == math.ceil(1e11 / (128 * 8192))


def test_full_recompute_rebuilds_a_layer_without_attention_scores_on_gpus() -> None:
    from engine.compile.estimate import activation_bytes

    plan = compile_with(recipe=H100 / "llama3_8b.yaml")
    m, lay = plan.model, plan.job("sft").layout
    assert lay is not None
    kw = dict(seq=8192, mbs=1, microbatches=8, recompute="full", act_bytes=2)
    gpu, _ = activation_bytes(m, lay, flash_attention=True, **kw)  # type: ignore[arg-type]
    cpu, _ = activation_bytes(m, lay, flash_attention=False, **kw)  # type: ignore[arg-type]
    scores = 5 * m.num_attention_heads * 8192 / (m.hidden_size * lay.tp) * 8192 * m.hidden_size  # 5as/(ht)·sbh
    assert cpu - gpu == pytest.approx(scores, rel=1e-9)


# NVIDIA's published Megatron-Bridge pretraining runs on DGX H100 (docs/performance-summary-archive.md of
# NVIDIA-NeMo/Megatron-Bridge): sequence 8192, micro-batch 1, FP8 current scaling, no recompute.
PUBLISHED = [
    # recipe, overrides that give the published run's batch and layout, release, tokens/s/GPU
    ("llama3_8b", ["stages.pretrain.parallelism.cp=1", "stages.pretrain.training.global_batch_size=128"], "25.11", 14451),
    ("llama3_70b", ["stages.pretrain.training.global_batch_size=256", "stages.pretrain.training.recompute=none"], "26.04.01", 1664),
    ("llama31_405b", ["stages.pretrain.training.global_batch_size=1536", "stages.pretrain.training.recompute=none"], "26.06", 326),
    ("llama31_405b", ["stages.pretrain.training.global_batch_size=512", "stages.pretrain.training.recompute=none"], "25.11", 292),
]  # fmt: skip


@pytest.mark.parametrize(("recipe", "overrides", "release", "published"), PUBLISHED, ids=lambda v: str(v))
def test_the_estimate_is_within_a_quarter_of_nvidias_published_throughput(
    recipe: str, overrides: list[str], release: str, published: float
) -> None:
    """The h100 profile's FP8 efficiency is fitted to the 8B run (no model parallelism); the 70B and 405B runs
    test what the layout model adds: TP communication, the pipeline bubble, data-parallel reduction."""
    plan = compile_with("stages.pretrain.training.micro_batch_size=1", "stages.pretrain.precision.fp8_recipe=tensorwise",
                        *overrides, recipe=H100 / f"{recipe}.yaml", force=True)  # fmt: skip
    job = plan.job("pretrain")
    assert job.estimate is not None and job.layout is not None and job.precision is not None
    assert job.precision.dtype == "fp8"
    per_gpu = job.estimate.tokens_per_s / job.layout.world_size
    assert 0.75 <= per_gpu / published <= 1.25, f"{recipe} ({release}): estimated {per_gpu:.0f}, published {published}"


def test_the_layout_model_sees_what_differs_between_layouts() -> None:
    base = ["stages.pretrain.training.global_batch_size=256", "stages.pretrain.training.recompute=none"]

    def per_gpu(*overrides: str) -> float:
        plan = compile_with(*base, *overrides, recipe=H100 / "llama3_70b.yaml", force=True)
        est, lay = plan.job("pretrain").estimate, plan.job("pretrain").layout
        assert est is not None and lay is not None
        return est.tokens_per_s / lay.world_size

    fp8 = per_gpu()
    assert per_gpu("stages.pretrain.precision={dtype: bf16}") < fp8 / 1.2  # FP8 GEMMs at the FP8 peak
    assert per_gpu("stages.pretrain.training.global_batch_size=64") < fp8  # fewer micro-batches: a larger bubble
    assert per_gpu("stages.pretrain.parallelism.vpp=1") < fp8  # no interleaving: a larger bubble
    assert per_gpu("stages.pretrain.parallelism.tp=8", "stages.pretrain.parallelism.pp=4") < fp8  # more TP traffic


def test_the_data_stage_is_estimated_from_its_input_and_the_profiles_rates(tmp_path: Path) -> None:
    """Pipelined passes: the serial main process or all `workers` cores bound each pass; shards split the
    input over the tasks; a source whose size is unknown before reading is named and not counted."""
    from engine.compile.data_estimate import estimate_data, pass_seconds
    from engine.schema import LOCAL, DataStage

    assert pass_seconds(10, 0.1, 0.3, 1) == pytest.approx(4.0)  # one process does it all
    assert pass_seconds(10, 0.1, 0.3, 2) == pytest.approx(2.0)  # the cores bound it
    assert pass_seconds(10, 0.1, 0.3, 8) == pytest.approx(1.0)  # the main process bounds it
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("x" * 2_000_000)

    def stage(**extra: object) -> DataStage:
        sources = [{"name": "c", "plugin": "jsonl", "records": "text", "params": {"glob": str(corpus)}}]
        return DataStage.model_validate({"kind": "data", "sources": sources, "dedup": {"near": False}, **extra})

    r = LOCAL.data_rates
    one = estimate_data(stage(workers=4), LOCAL, processes=1)
    assert one.input_bytes == 2_000_000 and not one.unknown_sources
    assert one.passes["clean"] == pytest.approx(2 * max(r.clean_main, (r.clean_main + r.clean_pool) / 4), abs=1e-3)
    assert one.wall_time_s == pytest.approx(sum(one.passes.values()), abs=1e-3)
    near = estimate_data(stage(workers=4, dedup={"near": True}), LOCAL, processes=1)
    assert near.passes["clean"] > one.passes["clean"] and near.passes["tokenize"] == one.passes["tokenize"]
    # Four shards on four nodes: each works through a quarter, then one process merges all of it.
    spread = estimate_data(stage(workers=4, shards=4), LOCAL, processes=4)
    assert spread.passes["tokenize"] == pytest.approx(one.passes["tokenize"] / 4, abs=1e-3)
    assert spread.passes["merge"] == pytest.approx(2 * r.merge, abs=1e-3)
    # The same four shards in one process (locally) take their turns.
    assert estimate_data(stage(workers=4, shards=4), LOCAL, processes=1).passes["tokenize"] == one.passes["tokenize"]
    missing = stage().model_copy(update={"sources": [*stage().sources, stage().sources[0].model_copy(
        update={"name": "later", "params": {"glob": str(tmp_path / "none" / "*.jsonl")}})]})  # fmt: skip
    assert estimate_data(missing, LOCAL, processes=1).unknown_sources == ("later",)


def test_the_plan_shows_the_data_stages_estimate() -> None:
    from engine.console import plan_table

    plan = compile_with()
    d = plan.job("data").data_estimate
    assert d is not None and d.input_bytes > 0 and d.wall_time_s > 0
    # The generated sources estimate their size from their first records: within a tenth of what they read.
    from engine import plugin

    arithmetic = plugin.data_sources()["arithmetic"]
    params = arithmetic.params(num_samples=3000, max_operand=30, seed=2)
    for kind in ("text", "conversation", "preference", "prompt"):
        real = 0
        for rec in arithmetic.read(params, kind):
            fields = [getattr(rec, f, None) for f in ("text", "prompt", "chosen", "rejected", "reference")]
            real += sum(len(f) for f in fields if isinstance(f, str)) + sum(len(m.content) for m in getattr(rec, "messages", ()))
        assert abs(plugin.source_size(arithmetic, params, kind) - real) < 0.1 * real, kind  # type: ignore[operator]
    text = "\n".join(str(x) for x in [plan_table(plan).caption])
    assert "data: 1.1 MB of input" in text and "clean" in text and "tokenize" in text
