"""The fine-tuning recipe `engine import` prints (and writes with `--recipe`): data → SFT → reward
model → RL from the imported checkpoint, with its tokenizer, and layouts for the cluster profile.

On a GPU profile the layouts are the ones Megatron-Bridge publishes for full SFT on H100
(`llama31_8b_sft_2gpu_h100_bf16_config`, `llama31_70b_sft_32gpu_h100_bf16_config`,
`qwen25_72b_sft_32gpu_h100_bf16_config`): TP2 for models up to about 15B, TP8 × PP4 on four nodes up
to about 80B, bf16, lr 5e-6 with 50 warm-up steps and no decay floor, sequence 4096 (2048 for Qwen);
the reward model takes the SFT layout, RL the layout of the shipped H100 recipes. Larger models get the
80B layout on more nodes, marked as not published. On the local profile (CPU) every stage runs two
gloo processes with a few steps: a smoke test of the whole chain, not a fine-tune.

The chain and the layouts per size class are a recipe skeleton, templates/finetune.yaml; this module
fills in the name, the tokenizer and model sections, the checkpoint, and the family's sequence length and
Adam beta2. Its data stage names JSONL placeholders for the three record kinds the chain needs
(conversations, ranked pairs, prompts); replace them with your files or other sources (docs/plugins.md).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import EngineError
from ..schema.stages import is_checkpoint_path


def recipe_name(hf_dir: Path) -> str:
    """A recipe name from the model folder's name ("Qwen2.5-7B-Instruct" → "qwen2_5-7b-instruct")."""
    import re

    name = re.sub(r"[^a-z0-9_-]+", "_", hf_dir.resolve().name.lower()).strip("_-")
    name = name if name[:1].isalpha() else f"m{name}"
    return (name or "imported")[:63]


def parameters(model: dict[str, Any], rows: int) -> int:
    """The decoder's parameter count from the recipe's model section (embeddings counted once when tied)."""
    h, layers = int(model["hidden_size"]), int(model["num_layers"])
    heads, groups = int(model["num_attention_heads"]), int(model.get("num_query_groups") or model["num_attention_heads"])
    d = int(model.get("kv_channels") or h // heads)
    attention = h * d * (heads + 2 * groups) + heads * d * h
    mlp = 3 * h * int(model["ffn_hidden_size"])
    embeddings = rows * h * (1 if model.get("tie_embeddings") else 2)
    return layers * (attention + mlp + 2 * h) + embeddings + h


TEMPLATE = Path(__file__).with_name("templates") / "finetune.yaml"
# Per family, what Megatron-Bridge's SFT recipes change: the sequence (Qwen's 2048 is packed SQuAD's) and
# Adam's beta2 (Qwen keeps its pretraining 0.95).
SEQUENCE = {"qwen2": 2048, "qwen3": 2048}
ADAM_BETA2 = {"qwen2": 0.95, "qwen3": 0.95}


def _fill(value: Any, checkpoint: str) -> Any:
    if isinstance(value, dict):
        return {k: _fill(v, checkpoint) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, checkpoint) for v in value]
    return checkpoint if value == "{checkpoint}" else value


def _fit(stages: dict[str, Any], model: dict[str, Any], rows: int) -> bool:
    """Shrink what a small model cannot take: tp must divide the heads, the key/value groups and the
    embedding rows, pp the layers; rollouts must fit the sequence. Returns whether anything changed."""
    heads = int(model["num_attention_heads"])
    groups = int(model.get("num_query_groups") or heads)
    changed = False
    for stage in stages.values():
        par = stage.get("parallelism", {})
        while par.get("tp", 1) > 1 and (heads % par["tp"] or groups % par["tp"] or rows % par["tp"]):
            par["tp"], changed = par["tp"] // 2, True
        while par.get("pp", 1) > 1 and int(model["num_layers"]) % par["pp"]:
            par["pp"], changed = par["pp"] // 2, True
        rollout = stage.get("rollout", {})
        if rollout and rollout["max_prompt_tokens"] + rollout["max_new_tokens"] > int(model["seq_length"]):
            rollout["max_prompt_tokens"] = rollout["max_new_tokens"] = int(model["seq_length"]) // 2
            changed = True
    return changed


def finetune_recipe(
    section: dict[str, Any], checkpoint: Path, *, rows: int, name: str, cluster: str, gpu: bool, family: str | None
) -> tuple[dict[str, Any], str]:
    """The recipe (as a YAML-ready dict) and a comment line on its layouts; `rows` is the embedding's."""
    import yaml

    template = yaml.safe_load(TEMPLATE.read_text(encoding="utf-8"))
    model = dict(section["model"])
    billions = parameters(model, rows) / 1e9
    ref = str(checkpoint) if is_checkpoint_path(str(checkpoint)) else f"./{checkpoint}"
    if not gpu:
        size, note = "local", "local CPU smoke test: two gloo processes, a few steps per stage"
    elif billions <= 15:
        size, note = "gpu_small", "SFT and reward model at Megatron-Bridge's full-SFT layout for Llama 3.1 8B on H100 (TP2)"
    else:
        size = "gpu_large"
        note = (
            "SFT and reward model at Megatron-Bridge's full-SFT layout for Llama 3.1 70B / Qwen2.5 72B on H100 (TP8 PP4, 4 nodes)"
            if billions <= 80
            else "NOT a published layout: the 70B class's (TP8 PP4) on more nodes"
        )
    layouts = template["layouts"][size]
    stages = {n: {**stage, **layouts.get(n, {})} for n, stage in _fill(template["stages"], ref).items()}
    if gpu:
        model["seq_length"] = min(int(model["seq_length"]), SEQUENCE.get(family or "", 4096))
        for stage in stages.values():
            training = stage.get("training", {})
            if "adam_beta2" in training:
                training["adam_beta2"] = ADAM_BETA2.get(family or "", training["adam_beta2"])
            if size == "gpu_large" and billions > 80 and "resources" in stage:
                stage["resources"] = {"nodes": stage["resources"]["nodes"] * math.ceil(billions / 80)}
    if _fit(stages, model, rows):
        note += "; tensor/pipeline sizes or rollout lengths reduced to fit this model"
    shown = f"{billions:.1f}B" if billions >= 0.1 else f"{billions * 1e3:.2f}M"
    recipe = {
        "name": name,
        "description": f"fine-tune {name} from its import: data → SFT → reward model → PPO",
        "cluster": cluster,
        "tokenizer": section["tokenizer"],
        "model": model,
        "stages": stages,
    }
    return recipe, f"{shown} parameters; {note}."


def render_recipe(recipe: dict[str, Any], note: str) -> str:
    import yaml

    head = (
        f"# Written by `engine import`. {note}\n"
        "# Replace the data stage's JSONL globs with your conversations, ranked pairs and prompts.\n"
    )
    class Plain(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:  # every stage spelled out, no &anchors
            return True

    return head + yaml.dump(recipe, Dumper=Plain, sort_keys=False, default_flow_style=False, allow_unicode=True, width=110)


def write_recipe(path: Path, text: str) -> None:
    """Write a new recipe file; an existing one is never overwritten."""
    if path.exists():
        raise EngineError(f"{path} exists; choose a new file for --recipe (a recipe you wrote is never overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.rename(path)
