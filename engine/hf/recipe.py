"""The fine-tuning recipe `engine import` prints (and writes with `--recipe`): data → SFT → reward
model → RL from the imported checkpoint, with its tokenizer, and layouts for the cluster profile.

On a GPU profile the layouts are the ones Megatron-Bridge publishes for full SFT on H100
(`llama31_8b_sft_2gpu_h100_bf16_config`, `llama31_70b_sft_32gpu_h100_bf16_config`,
`qwen25_72b_sft_32gpu_h100_bf16_config`): TP2 for models up to about 15B, TP8 × PP4 on four nodes up
to about 80B, bf16, lr 5e-6 with 50 warm-up steps and no decay floor, sequence 4096 (2048 for Qwen);
the reward model takes the SFT layout, RL the layout of the shipped H100 recipes. Larger models get the
80B layout on more nodes, marked as not published. On the local profile (CPU) every stage runs two
gloo processes with a few steps: a smoke test of the whole chain, not a fine-tune.

The data stage names JSONL placeholders for the three record kinds the chain needs (conversations,
ranked pairs, prompts); replace them with your files or other sources (docs/plugins.md).
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


def _layouts(billions: float, family: str | None) -> dict[str, Any]:
    """Per stage: resources, parallelism and training settings for an H100-class GPU profile."""
    qwen = family in ("qwen2", "qwen3")
    bridge = {"global_batch_size": 128, "micro_batch_size": 1, "lr": 5.0e-6, "min_lr": 0.0, "warmup_steps": 50,
              "adam_beta2": 0.95 if qwen else 0.98, "weight_decay": 0.1}  # fmt: skip
    if billions <= 15:
        sft = {"resources": {"nodes": 1}, "parallelism": {"tp": 2}}
        rl = {"resources": {"nodes": 2}, "parallelism": {"tp": 4, "sequence_parallel": False}}
        note = "Megatron-Bridge's full-SFT layout for Llama 3.1 8B on H100 (TP2), data parallel over the node"
    else:
        nodes = 4 if billions <= 80 else 4 * math.ceil(billions / 80)
        sft = {"resources": {"nodes": nodes}, "parallelism": {"tp": 8, "pp": 4}}
        rl = {"resources": {"nodes": 4 * nodes}, "parallelism": {"tp": 8, "pp": 8, "sequence_parallel": False}}
        note = (
            "Megatron-Bridge's full-SFT layout for Llama 3.1 70B and Qwen2.5 72B on H100 (TP8 PP4, 4 nodes)"
            if billions <= 80
            else f"not a published layout: the 70B layout (TP8 PP4) on {nodes} nodes for {billions:.0f}B parameters"
        )
    return {"sft": sft, "rl": rl, "training": bridge, "note": note, "seq_length": 2048 if qwen else 4096}


def finetune_recipe(
    section: dict[str, Any], checkpoint: Path, *, rows: int, name: str, cluster: str, gpu: bool, family: str | None
) -> tuple[dict[str, Any], str]:
    """The recipe (as a YAML-ready dict) and a comment line on its layouts; `rows` is the embedding's."""
    model = dict(section["model"])
    billions = parameters(model, rows) / 1e9
    ref = str(checkpoint) if is_checkpoint_path(str(checkpoint)) else f"./{checkpoint}"
    sources = [
        {"name": "chats", "plugin": "jsonl", "records": "conversation", "params": {"glob": "data/sft/*.jsonl"}},
        {"name": "rankings", "plugin": "jsonl", "records": "preference", "params": {"glob": "data/prefs/*.jsonl"}},
        {"name": "questions", "plugin": "jsonl", "records": "prompt", "params": {"glob": "data/prompts/*.jsonl"}},
    ]
    data = {"kind": "data", "sources": sources, "splits": {"train": 0.98, "valid": 0.01, "test": 0.01}}
    if gpu:
        lay = _layouts(billions, family)
        model["seq_length"] = min(int(model["seq_length"]), lay["seq_length"])
        t = lay["training"]
        bf16 = {"dtype": "bf16"}
        stages: dict[str, Any] = {
            "data": {**data, "workers": 64},
            "sft": {"kind": "sft", "init_from": ref, "data": "data", **lay["sft"], "precision": bf16,
                    "training": {"steps": 1000, **t}, "checkpointing": {"interval": 250}},
            "reward": {"kind": "reward_model", "init_from": "sft", "data": "data", **lay["sft"], "precision": bf16,
                       "training": {"steps": 500, **t, "lr": 2.0e-6}},
            "ppo": {"kind": "ppo", "policy": "sft", "reward_model": "reward", "prompts": "data", **lay["rl"],
                    "precision": bf16,
                    "rollout": {"prompts_per_iteration": 512, "max_prompt_tokens": 1024, "max_new_tokens": 1024,
                                "batch_size": 32},
                    "ppo": {"kl_coef": 0.02, "kl_estimator": "k3", "epochs": 1},
                    "training": {"steps": 200, "global_batch_size": 128, "lr": 5.0e-7, "weight_decay": 0.0}},
        }  # fmt: skip
        note = f"# {billions:.1f}B parameters; SFT and reward model: {lay['note']}."
        if "pp" in lay["rl"]["parallelism"]:
            note += " PPO at pp>1 is planned but its worker runs rollouts at pp=1 only (engine run says so)."
    else:
        two = {"resources": {"gpus_per_node": 2}}
        small = {"global_batch_size": 16, "micro_batch_size": 4, "warmup_steps": 2, "weight_decay": 0.0}
        stages = {
            "data": data,
            "sft": {"kind": "sft", "init_from": ref, "data": "data", **two,
                    "training": {"steps": 20, **small, "lr": 1.0e-4, "eval_interval": 10}},
            "reward": {"kind": "reward_model", "init_from": "sft", "data": "data", **two,
                       "training": {"steps": 20, **small, "lr": 1.0e-4, "eval_interval": 10}},
            "ppo": {"kind": "ppo", "policy": "sft", "reward_model": "reward", "prompts": "data", **two,
                    "rollout": {"prompts_per_iteration": 8, "responses_per_prompt": 4, "max_prompt_tokens": 64,
                                "max_new_tokens": 16, "batch_size": 16},
                    "training": {"steps": 3, "global_batch_size": 16, "micro_batch_size": 4, "lr": 1.0e-6}},
        }  # fmt: skip
        size = f"{billions:.1f}B" if billions >= 0.1 else f"{billions * 1e3:.2f}M"
        note = f"# {size} parameters; local CPU smoke test: two gloo processes, a few steps per stage."
    recipe = {
        "name": name,
        "description": f"fine-tune {name} from its import: data → SFT → reward model → PPO",
        "cluster": cluster,
        "tokenizer": section["tokenizer"],
        "model": model,
        "stages": stages,
    }
    return recipe, note


def render_recipe(recipe: dict[str, Any], note: str) -> str:
    import yaml

    head = (
        f"# Written by `engine import`. {note.removeprefix('# ')}\n"
        "# Replace the data stage's JSONL globs with your conversations, ranked pairs and prompts.\n"
    )
    class Plain(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:  # every stage spelled out, no &anchors
            return True

    return head + yaml.dump(recipe, Dumper=Plain, sort_keys=False, default_flow_style=False, allow_unicode=True)


def write_recipe(path: Path, text: str) -> None:
    """Write a new recipe file; an existing one is never overwritten."""
    if path.exists():
        raise EngineError(f"{path} exists; choose a new file for --recipe (a recipe you wrote is never overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.rename(path)
