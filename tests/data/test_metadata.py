"""A prompt's metadata reaches the reward functions: through the data stage's prompt shards to PPO's scorer,
and through the feedback app's prompt sets to AI feedback (a reward that needs a test case, a unit or a
rubric per prompt reads it from RewardSample.metadata)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from engine import plugin
from engine.compile import compile_recipe
from engine.load import load_recipe
from engine.worker.context import Context, job_spec
from engine.worker.env import rank_info
from engine.worker.stages import collect


def _prompt_samples(run: Path) -> list[dict[str, Any]]:
    out = []
    for shard in sorted((run / "data" / "data" / "questions").glob("*/*.tar")):
        with tarfile.open(fileobj=io.BytesIO(shard.read_bytes())) as tar:
            out += [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]  # type: ignore[union-attr]
    return out


def test_the_data_stage_keeps_prompt_metadata_and_ppo_scores_with_it(tmp_path: Path) -> None:
    rows = [{"q": f"{i}+1=", "answer": str(i + 1), "unit": "apples", "case": {"id": i}} for i in range(60)]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "r.yaml").write_text(f"""
name: meta
tokenizer: {{kind: train, vocab_size: 300}}
model: {{num_layers: 2, hidden_size: 64, num_attention_heads: 4, seq_length: 32}}
stages:
  data:
    kind: data
    dedup: {{near: false}}
    sources:
      - {{name: questions, plugin: jsonl, records: prompt,
         params: {{glob: "{tmp_path}/q.jsonl", prompt_field: q, reference_field: answer}}}}
""")
    plan = compile_recipe(load_recipe(tmp_path / "r.yaml", [f"run_dir={tmp_path}/run"]))
    collect.run(Context(plan=plan, job=plan.job("data"), info=rank_info({}), device="cpu"), job_spec(plan.job("data")))
    samples = _prompt_samples(tmp_path / "run")
    assert len(samples) == 60 and all(s["metadata"]["unit"] == "apples" for s in samples)
    assert sorted(s["metadata"]["case"]["id"] for s in samples) == list(range(60))

    from engine.chat import template_for
    from engine.corpus.tokenizer import load
    from engine.worker.rewards import Scorer

    tok = load(tmp_path / "run" / "data" / "tokenizer" / "tokenizer.json")
    scorer = Scorer(stage="ppo", rewards=[], reward_model=None, reward_model_weight=1.0, values=lambda c, t: t,
                    tok=tok, template=template_for({}, tok))  # fmt: skip
    prompt = samples[0]
    batch = scorer.samples([prompt], [[*prompt["prompt"], 5, 6]], [len(prompt["prompt"])], [2])
    assert batch[0].metadata == prompt["metadata"] and batch[0].reference == prompt["reference"]


def test_ai_feedback_scores_with_the_prompts_metadata(tmp_path: Path) -> None:
    from engine.feedback.ai import score
    from engine.feedback.sampler import prompts_file

    seen: list[dict[str, Any]] = []

    def record(params: Any, batch: list[plugin.RewardSample]) -> list[float]:
        seen.extend(dict(s.metadata) for s in batch)
        return [1.0] * len(batch)

    reward = plugin.RewardFunction(params=NoParams, score=record)
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "2+2=", "reference": "4", "metadata": {"unit": "m"}}) + "\n")
    (row,) = prompts_file(tmp_path / "p.jsonl").rows
    assert score([("record", reward, NoParams())], row.prompt, row.reference, ["4", "5"], row.metadata) == [1.0, 1.0]
    assert seen == [{"unit": "m"}, {"unit": "m"}]


class NoParams(BaseModel):
    pass
