"""Mixture weights for every record kind: an epoch draws from each source its weight's share, for SFT and
reward-model batches and for PPO's prompts as for pretraining's blend; the data stage prints the mixture."""

from __future__ import annotations

import contextlib
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.compile import Plan, compile_recipe
from engine.load import load_recipe
from engine.worker.batches import ChatBatches, Mixture, PairRows, RowShape, SequenceRows, read_sources
from engine.worker.context import Context, job_spec
from engine.worker.env import rank_info
from engine.worker.stages import collect


def test_the_mixture_gives_each_source_its_share_of_an_epoch() -> None:
    mix = Mixture.of([100, 20, 7], [1.0, 3.0, 0.5])
    assert mix.counts() == [28, 85, 14] and sum(mix.counts()) == 127
    drawn = mix.permutation(np.random.default_rng(0))
    per_source = Counter(int(np.searchsorted([100, 120], i, side="right")) for i in drawn)
    assert [per_source[i] for i in range(3)] == mix.counts()
    small = Counter(int(i) for i in drawn if 100 <= i < 120)
    assert set(small) == set(range(100, 120)) and max(small.values()) - min(small.values()) <= 1  # cycled evenly
    one = Mixture.of([50], [2.0]).permutation(np.random.default_rng(3))
    assert (one == np.random.default_rng(3).permutation(50)).all()  # one source: the plain permutation
    assert Mixture.of([10, 0], [1.0, 5.0]).counts() == [10, 0]  # an empty source gives nothing


RECIPE = """
name: mix
tokenizer: {kind: train, vocab_size: 320}
model: {num_layers: 2, hidden_size: 64, num_attention_heads: 4, seq_length: 64}
stages:
  data:
    kind: data
    dedup: {near: false, decontaminate: false}
    splits: {train: 1.0, valid: 0.0, test: 0.0}
    sources:
      - {name: text, plugin: arithmetic, records: text, params: {num_samples: 50}}
      - {name: big, plugin: jsonl, records: conversation, weight: 1.0, params: {glob: "TMP/big.jsonl"}}
      - {name: small, plugin: jsonl, records: conversation, weight: 3.0, params: {glob: "TMP/small.jsonl"}}
      - {name: pairs_a, plugin: arithmetic, records: preference, weight: 1.0, params: {num_samples: 60, seed: 1}}
      - {name: pairs_b, plugin: arithmetic, records: preference, weight: 1.0, params: {num_samples: 20, seed: 2}}
      - {name: q_a, plugin: arithmetic, records: prompt, weight: 4.0, params: {num_samples: 30, seed: 3}}
      - {name: q_b, plugin: arithmetic, records: prompt, weight: 1.0, params: {num_samples: 30, seed: 4}}
  pretrain: {kind: pretrain, data: data, training: {steps: 1, global_batch_size: 8, lr: 1.0e-3}}
  sft:
    kind: sft
    init_from: pretrain
    data: data
    training: {steps: 1, global_batch_size: 8, micro_batch_size: 8, lr: 1.0e-3}
  reward:
    kind: reward_model
    init_from: pretrain
    data: data
    training: {steps: 1, global_batch_size: 8, micro_batch_size: 8, lr: 1.0e-3}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Plan, Path, str]:
    tmp = tmp_path_factory.mktemp("mix")
    for name, n in (("big", 120), ("small", 30)):
        rows = [{"messages": [{"role": "user", "content": f"{name} {i}?"}, {"role": "assistant", "content": "ok"}]}
                for i in range(n)]  # fmt: skip
        (tmp / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp / "r.yaml").write_text(RECIPE.replace("TMP", str(tmp)))
    plan = compile_recipe(load_recipe(tmp / "r.yaml", [f"run_dir={tmp}/run"]))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        collect.run(Context(plan=plan, job=plan.job("data"), info=rank_info({}), device="cpu"), job_spec(plan.job("data")))
    return plan, tmp, printed.getvalue()


def test_the_data_stage_prints_and_records_the_mixture(data: tuple[Plan, Path, str]) -> None:
    _, tmp, printed = data
    manifest = json.loads((tmp / "run" / "data" / "data" / "manifest.json").read_text())
    assert manifest["mixture"]["conversation"] == {"big": 0.25, "small": 0.75}
    assert manifest["mixture"]["prompt"] == {"q_a": 0.8, "q_b": 0.2}
    assert "mixture of conversation records: big 0.250, small 0.750" in printed


def _share_of_second(plan: Plan, stage: str, shape: RowShape) -> tuple[float, int]:
    """Over one epoch of the stage's training order: the share of samples from its second source."""
    job = plan.job(stage)
    spec = job_spec(job)
    batches = ChatBatches(plan, job, data="data", training=spec.training, batching="bucketed", shape=shape)
    sizes = [len(v) for v in read_sources(plan, stage=stage, data="data", records=shape.records, split="train").values()]
    epoch = batches.order.epoch(0)
    return float(np.mean(epoch >= sizes[0])), len(epoch)


def test_sft_and_reward_batches_draw_by_the_weights(data: tuple[Plan, Path, str]) -> None:
    plan, _, _ = data
    share, n = _share_of_second(plan, "sft", SequenceRows(pad=0))
    assert n == 150 and share == pytest.approx(0.75, abs=1 / n)  # small: 30 conversations, 3 of 4 draws
    share, n = _share_of_second(plan, "reward", PairRows(pad=0))
    assert share == pytest.approx(0.5, abs=1 / n)  # equal weights: half and half, whatever the sizes


def test_ppo_prompts_draw_by_the_weights(data: tuple[Plan, Path, str]) -> None:
    from engine.worker.batches import source_weights
    from engine.worker.stages.ppo import iteration_prompts

    plan, _, _ = data
    by_source = read_sources(plan, stage="ppo", data="data", records="prompt", split="train")
    prompts: list[dict[str, Any]] = [{**p, "source": n} for n, rows in by_source.items() for p in rows]
    mixture = Mixture.of([len(v) for v in by_source.values()], source_weights(plan, "data", list(by_source)))
    drawn = [p["source"] for it in range(4) for p in iteration_prompts(
        prompts, mixture, seed=1, iteration=it, per_iteration=len(prompts) // 4, dp=1, dp_rank=0, responses=1)]  # fmt: skip
    assert Counter(drawn)["q_a"] / len(drawn) == pytest.approx(0.8, abs=2 / len(drawn))
