"""Cross-field rules: each names the dotted path, the values and a fix; all problems come at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from .conftest import REPO, compile_with, problems_of

H100 = REPO / "recipes" / "h100" / "llama3_8b.yaml"


def _only(err_paths: list[str], path: str) -> None:
    assert path in err_paths, err_paths


def test_tp_must_divide_heads() -> None:
    err = problems_of("stages.pretrain.parallelism.tp=3")
    problem = next(p for p in err.problems if p.path == "stages.pretrain.parallelism.tp")
    assert "=3" in problem.message and "num_attention_heads=4" in problem.message
    assert "1, 2" in problem.fix


def test_tp3_on_a_32_head_model_names_the_path() -> None:
    err = problems_of("stages.pretrain.parallelism.tp=3", recipe=H100)
    problem = next(p for p in err.problems if p.path == "stages.pretrain.parallelism.tp")
    assert "num_attention_heads=32" in problem.message
    assert "1, 2, 4, 8" in problem.fix


def test_layers_must_split_over_pipeline_chunks() -> None:
    err = problems_of("stages.pretrain.parallelism.pp=4", "stages.pretrain.resources.gpus_per_node=4")
    _only(err.paths(), "stages.pretrain.parallelism.pp")
    assert "num_layers=6" in err.render()


def test_uneven_split_counts_embedding_and_loss() -> None:
    # 6 layers + embedding + loss = 8 = pp 4 × 2.
    plan = compile_with(
        "stages.pretrain.parallelism.pp=4",
        "stages.pretrain.resources.gpus_per_node=4",
        "stages.pretrain.parallelism.account_for_embedding_in_pipeline_split=true",
        "stages.pretrain.parallelism.account_for_loss_in_pipeline_split=true",
    )
    layout = plan.job("pretrain").layout
    assert layout is not None and layout.stage_layers(6) == (1, 1)


def test_vpp_needs_pipeline_parallelism() -> None:
    _only(problems_of("stages.pretrain.parallelism.vpp=2").paths(), "stages.pretrain.parallelism.vpp")


def test_interleaving_needs_microbatches_divisible_by_pp() -> None:
    err = problems_of(
        "stages.pretrain.parallelism.pp=2",
        "stages.pretrain.parallelism.vpp=3",
        "stages.pretrain.training.global_batch_size=24",
    )
    _only(err.paths(), "stages.pretrain.training.global_batch_size")
    assert "interleaved" in err.render()


def test_context_parallel_needs_sequence_divisible_by_2cp() -> None:
    err = problems_of("stages.pretrain.parallelism.cp=3", "stages.pretrain.resources.nodes=3", recipe=H100)
    _only(err.paths(), "stages.pretrain.parallelism.cp")
    assert "2×cp=6" in err.render()


def test_world_size_must_be_divisible_by_model_parallel_size() -> None:
    err = problems_of("stages.pretrain.parallelism.tp=2", "stages.pretrain.resources.gpus_per_node=3")
    _only(err.paths(), "stages.pretrain.resources")
    assert "1×3 = 3" in err.render()


def test_global_batch_divisible_by_micro_batch_times_dp() -> None:
    err = problems_of("stages.pretrain.training.global_batch_size=36")
    problem = next(p for p in err.problems if p.path == "stages.pretrain.training.global_batch_size")
    assert "micro_batch_size×dp = 8×2" in problem.message
    assert "32 or 48" in problem.fix


def test_sequence_parallel_needs_tp() -> None:
    err = problems_of("stages.sft.parallelism.tp=1", recipe=H100)
    _only(err.paths(), "stages.sft.parallelism.sequence_parallel")


def test_cpu_forces_fp32_and_refuses_gpu_only_features() -> None:
    plan = compile_with()
    assert all(j.precision.dtype == "fp32" for j in plan.jobs if j.precision)
    assert all(not j.layout.distributed_optimizer for j in plan.jobs if j.layout)
    err = problems_of(
        "stages.pretrain.precision.dtype=bf16",
        "stages.sft.parallelism.distributed_optimizer=true",
        "stages.reward.parallelism.sequence_parallel=true",
        "stages.reward.parallelism.tp=2",
        "stages.ppo.parallelism.cp=2",
    )
    for path in (
        "stages.pretrain.precision.dtype",
        "stages.sft.parallelism.distributed_optimizer",
        "stages.reward.parallelism.sequence_parallel",
        "stages.ppo.parallelism.cp",
    ):
        _only(err.paths(), path)


def test_gpu_defaults_bf16_and_distributed_optimizer() -> None:
    plan = compile_with(recipe=H100)
    sft = plan.job("sft")
    assert sft.precision is not None and sft.precision.dtype == "bf16"
    assert sft.layout is not None and sft.layout.distributed_optimizer


def _profile(tmp_path: Path, **changes: object) -> str:
    data = yaml.safe_load((REPO / "slurm" / "clusters" / "h100.yaml").read_text())
    data.update(changes)
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_fp8_needs_a_gpu_that_has_it(tmp_path: Path) -> None:
    a100 = _profile(tmp_path, name="a100", gpu="A100", peak_tflops_bf16=312, peak_tflops_fp8=None)
    err = problems_of(f"cluster={a100}", recipe=H100)
    _only(err.paths(), "stages.pretrain.precision")
    assert "A100" in err.render()


def test_mxfp8_needs_blackwell() -> None:
    err = problems_of("stages.pretrain.precision.fp8_recipe=mxfp8", recipe=H100)
    _only(err.paths(), "stages.pretrain.precision")
    plan = compile_with("stages.pretrain.precision.fp8_recipe=tensorwise", recipe=H100)
    precision = plan.job("pretrain").precision
    assert precision is not None and precision.fp8_recipe == "tensorwise"


def test_fp8_needs_sizes_divisible_by_16() -> None:
    err = problems_of("model.ffn_hidden_size=14344", recipe=H100)
    _only(err.paths(), "stages.pretrain.precision.dtype")


def test_fp8_recipe_without_fp8_is_refused() -> None:
    err = problems_of("stages.sft.precision.fp8_recipe=delayed", recipe=H100)
    _only(err.paths(), "stages.sft.precision.fp8_recipe")


def test_gpus_per_node_and_nodes_within_the_profile(tmp_path: Path) -> None:
    limited = _profile(tmp_path, max_nodes=4)
    err = problems_of(f"cluster={limited}", "stages.ppo.resources.nodes=8", "stages.sft.resources.gpus_per_node=16")
    paths = err.paths()
    _only(paths, "stages.ppo.resources.nodes")
    _only(paths, "stages.sft.resources.gpus_per_node")


def test_unknown_cluster_lists_profiles() -> None:
    err = problems_of("cluster=h1000")
    assert err.paths() == ["cluster"]
    assert "h100" in err.problems[0].fix


def test_invalid_cluster_profile_names_its_field(tmp_path: Path) -> None:
    err = problems_of(f"cluster={_profile(tmp_path, assumed_mfu=2)}")
    assert err.paths() == ["cluster(profile.yaml).assumed_mfu"]


@pytest.mark.parametrize(
    ("override", "path", "words"),
    [
        ("stages.sft.init_from=nothing", "stages.sft.init_from", "names no stage"),
        ("stages.sft.init_from=ppo", "stages.sft.init_from", "not an earlier stage"),
        ("stages.sft.init_from=data", "stages.sft.init_from", "is a data stage"),
        ("stages.ppo.reward_model=sft", "stages.ppo.reward_model", "must be reward_model"),
        ("stages.ppo.policy=reward", "stages.ppo.policy", "must be sft or pretrain or ppo"),
        ("stages.ppo.critic_from=pretrain", "stages.ppo.critic_from", "must be reward_model"),
        ("stages.sft.data=pretrain", "stages.sft.data", "is a pretrain stage; it must be data"),
    ],
)
def test_references(override: str, path: str, words: str) -> None:
    err = problems_of(override)
    problem = next(p for p in err.problems if p.path == path)
    assert words in problem.message


def test_referenced_data_stage_must_have_the_right_records() -> None:
    err = problems_of("stages.data.sources[3].records=text")
    problem = next(p for p in err.problems if p.path == "stages.reward.data")
    assert "records: preference" in problem.message


def test_mixture_names_text_sources() -> None:
    err = problems_of("stages.pretrain.mixture={equatons: 1.0}")
    _only(err.paths(), "stages.pretrain.mixture.equatons")
    assert "equations" in err.render()


def test_ppo_needs_a_reward_and_fitting_lengths() -> None:
    err = problems_of("stages.ppo.reward_model=null", "stages.ppo.rewards=[]", "stages.ppo.rollout.max_new_tokens=60")
    _only(err.paths(), "stages.ppo.rewards")
    _only(err.paths(), "stages.ppo.rollout")


def test_ppo_minibatch_divides_rollouts() -> None:
    _only(problems_of("stages.ppo.training.global_batch_size=48").paths(), "stages.ppo.training.global_batch_size")


def test_training_length_is_steps_or_tokens() -> None:
    _only(problems_of("stages.sft.training.tokens=1000").paths(), "stages.sft.training")
    _only(problems_of("~stages.sft.training.steps").paths(), "stages.sft.training")
    _only(
        problems_of("stages.ppo.training.tokens=10", "~stages.ppo.training.steps").paths(), "stages.ppo.training.tokens"
    )


def test_schedule_values() -> None:
    err = problems_of("stages.sft.training.min_lr=1", "stages.sft.training.warmup_steps=300")
    _only(err.paths(), "stages.sft.training.min_lr")
    _only(err.paths(), "stages.sft.training.warmup_steps")


def test_data_stage_rules() -> None:
    err = problems_of(
        "stages.data.splits.train=0.5",
        "stages.data.sources[1].name=equations",
        "stages.data.cleaning.blocklist=['(unclosed']",
    )
    for path in ("stages.data.splits", "stages.data.sources[1].name", "stages.data.cleaning.blocklist[0]"):
        _only(err.paths(), path)


def test_model_needs_sizes_without_a_preset() -> None:
    err = problems_of("~model.preset")
    assert sorted(err.paths()) == ["model.hidden_size", "model.num_attention_heads", "model.num_layers"]


def test_unknown_preset() -> None:
    err = problems_of("model.preset=llama3-9b", recipe=H100)
    assert err.paths() == ["model.preset"]
    assert "llama3-8b" in err.problems[0].fix


def test_query_groups_and_vocab_padding() -> None:
    err = problems_of("model.num_query_groups=3")
    _only(err.paths(), "model.num_query_groups")
    err = problems_of("model.make_vocab_size_divisible_by=129", "stages.pretrain.parallelism.tp=2")
    _only(err.paths(), "stages.pretrain.parallelism.tp")


def test_tokenizer_rules(tmp_path: Path) -> None:
    _only(problems_of("tokenizer.vocab_size=100").paths(), "tokenizer.vocab_size")
    # `tokenizer={...}` replaces the whole tokenizer section: no vocab_size is left from the trained one.
    err = problems_of("tokenizer={kind: file, path: /nonexistent/tokenizer.json}")
    assert err.paths() == ["tokenizer.path"]
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"model": {"vocab": {"a": 0, "b": 1}}, "added_tokens": [{"id": 299, "content": "<x>"}]}')
    plan = compile_with(f"tokenizer={{kind: file, path: {tok}}}")
    assert plan.model.vocab_size == 300 and plan.model.padded_vocab_size == 384


def test_all_problems_of_a_recipe_come_in_one_error() -> None:
    err = problems_of(
        "stages.pretrain.parallelism.tp=3",
        "stages.sft.init_from=nothing",
        "stages.data.splits.valid=0.5",
        "stages.ppo.rewards[0].plugin=exact",
    )
    assert len(err.problems) >= 4
    assert "stages.ppo.rewards[0].plugin" in err.paths()


def test_non_finite_numbers_are_refused() -> None:
    _only(problems_of("stages.ppo.rewards[0].weight=.nan").paths(), "stages.ppo.rewards[0].weight")
    # Plugin params are free-form until the plugin's model checks them: caught by the compiler.
    _only(problems_of("stages.data.sources[0].params.seed=.inf").paths(), "stages.data.sources[0].params.seed")


def test_model_problems_are_reported_once() -> None:
    err = problems_of("model.hidden_size=130")
    assert err.paths().count("model.hidden_size") == 1


def test_ppo_refuses_what_its_rollouts_cannot_do() -> None:
    h8 = REPO / "recipes" / "h100" / "llama3_8b.yaml"
    err = problems_of("stages.ppo.parallelism.cp=2", "stages.ppo.parallelism.sequence_parallel=true", recipe=h8)
    assert sorted(err.paths()) == ["stages.ppo.parallelism.cp", "stages.ppo.parallelism.sequence_parallel"]
    assert "decode one token per step" in err.render()


def test_fp8_param_gather_needs_the_distributed_optimizer() -> None:
    h8 = REPO / "recipes" / "h100" / "llama3_8b.yaml"
    err = problems_of("stages.pretrain.parallelism.distributed_optimizer=false", recipe=h8)
    assert err.paths() == ["stages.pretrain.precision.fp8_param_gather"]


@pytest.mark.parametrize(
    ("overrides", "path", "says"),
    [
        (["stages.ppo.ppo.advantage=grpo", "stages.ppo.rollout.responses_per_prompt=1",
          "stages.ppo.training.global_batch_size=32"],
         "stages.ppo.rollout.responses_per_prompt", "ppo.advantage=grpo: its baseline is the other responses"),
        (["stages.ppo.ppo.advantage=dr_grpo", "stages.ppo.critic_from=reward"], "stages.ppo.critic_from",
         "trains no critic"),
        (["stages.ppo.ppo.dynamic_sampling=true"], "stages.ppo.ppo.dynamic_sampling", "ppo.advantage=gae"),
        (["stages.ppo.ppo.overlong_buffer=9"], "stages.ppo.ppo.overlong_buffer", "exceeds rollout.max_new_tokens=8"),
        (["stages.ppo.ppo.kl_coef=0", "stages.ppo.ppo.kl_target=0.1"], "stages.ppo.ppo.kl_target", "stays 0"),
        (["stages.ppo.ppo.kl_penalty=loss"], "stages.ppo.ppo.kl_estimator", "use kl_estimator: k3"),
        (["stages.ppo.ppo.kl_coef=0", "stages.ppo.reference=sft"], "stages.ppo.reference", "builds no reference model"),
        (["stages.ppo.reference=reward"], "stages.ppo.reference", "reward_model"),
    ],
)  # fmt: skip
def test_critic_free_rl_options_are_checked(overrides: list[str], path: str, says: str) -> None:
    err = problems_of(*overrides)
    assert path in err.paths() and says in err.render()


def test_grpo_with_dapos_options_compiles_and_kl_zero_builds_no_reference() -> None:
    dapo = ["stages.ppo.ppo.advantage=grpo", "stages.ppo.ppo.dynamic_sampling=true", "stages.ppo.ppo.clip_high=0.28",
            "stages.ppo.ppo.overlong_buffer=4", "stages.ppo.ppo.loss_aggregation=token_mean"]  # fmt: skip
    with_ref = compile_with(*dapo).job("ppo").estimate
    without = compile_with(*dapo, "stages.ppo.ppo.kl_coef=0").job("ppo").estimate
    assert with_ref is not None and without is not None
    # One frozen model fewer: the reference's weights leave the memory estimate.
    assert without.memory.total < with_ref.memory.total


def test_packing_is_refused_where_packed_rows_cannot_go() -> None:
    assert problems_of("stages.sft.batching=packed", "stages.sft.parallelism.pp=2").paths() == ["stages.sft.batching"]
    # On Transformer Engine's layers packed rows go in as THD (PackedSeqParams): the 8B recipe's SFT packs,
    # on one pipeline stage and without context parallelism.
    h8 = REPO / "recipes" / "h100" / "llama3_8b.yaml"
    assert compile_with("stages.sft.batching=packed", recipe=h8).job("sft") is not None
    err = problems_of("stages.sft.batching=packed", "stages.sft.parallelism.cp=2", recipe=h8)
    assert err.paths() == ["stages.sft.batching"] and "context-parallel" in err.render()
    assert compile_with("stages.sft.batching=packed").job("sft") is not None
    # The pair stages pack too, under the same rules.
    for stage in ("reward", "dpo"):
        assert compile_with(f"stages.{stage}.batching=packed").job(stage) is not None
        err = problems_of(f"stages.{stage}.batching=packed", f"stages.{stage}.parallelism.pp=2")
        assert err.paths() == [f"stages.{stage}.batching"] and "pipeline sends" in err.render()
    # The RL stage packs its updates' micro-batches; its other batching is padded.
    err = problems_of("stages.ppo.batching=packed", "stages.ppo.parallelism.pp=2")
    assert err.paths() == ["stages.ppo.batching"] and "use batching: padded, or pp: 1" in err.render()
    assert compile_with("stages.ppo.batching=packed").job("ppo") is not None
