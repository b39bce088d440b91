"""Run in a fresh process: every mapped HF family through `engine import` and `engine export` against
`transformers`, on tiny random configs built from the config classes (no hub). Prints JSON, per family:
the max abs difference between Megatron's logits of the import and transformers' logits of the source,
between transformers' logits of the export and of the source, whether the export's tensors equal the
source's bit for bit, and the recipe section the import returned.

    python tests/worker/hf_families_check.py TOKENIZER_JSON WORK_DIR [FAMILY ...]
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

VOCAB_ROWS = 320  # the tokenizer's 300 ids padded to a multiple of 64
COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_ROWS, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.1,
)  # fmt: skip
LLAMA3_ROPE = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def configs() -> dict[str, Any]:
    """One config per family variant: what each exercises is in its name and its non-default keys."""
    import transformers as t

    return {
        "llama3": t.LlamaConfig(**COMMON, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
        # Llama 3.1: RoPE frequency scaling (factor 8); Llama 3.2: factor 32 with tied embeddings.
        "llama3.1": t.LlamaConfig(**COMMON, rope_parameters={**LLAMA3_ROPE, "factor": 8.0, "rope_theta": 500000.0}),
        "llama3.2": t.LlamaConfig(
            **COMMON, tie_word_embeddings=True, rope_parameters={**LLAMA3_ROPE, "factor": 32.0, "rope_theta": 500000.0}
        ),
        # Qwen2.5: q/k/v biases, tied embeddings (the small sizes), theta 1e6, embedding rows as Qwen's are
        # (151936 for 151665 tokens): 330 rows, which no power of two pads the 300 tokens to (vocab_rows).
        "qwen2.5": t.Qwen2Config(
            **{**COMMON, "vocab_size": 330},
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        ),
        # Qwen3: per-head q/k RMSNorm and head_dim ≠ hidden/heads (32 vs 16).
        "qwen3": t.Qwen3Config(**COMMON, head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        "mistral": t.MistralConfig(**COMMON, sliding_window=None, head_dim=16),
    }


def build(name: str, config: Any, folder: Path, tokenizer: Path) -> None:
    """A random model of `config`: every tensor perturbed, so that biases and norm weights (which HF
    initialises to zeros and ones) are random as well."""
    import shutil

    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    shutil.copyfile(tokenizer, folder / "tokenizer.json")


def hf_logits(folder: Path, tokens: torch.Tensor, config: Any = None) -> torch.Tensor:
    import transformers

    extra = {"config": config} if config is not None else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()
    with torch.no_grad():
        out: torch.Tensor = model(tokens).logits
    return out


def megatron_logits(checkpoint: Path, tokens: torch.Tensor) -> torch.Tensor:
    from engine.hf import session
    from engine.worker.checkpoint import read_meta

    with session.megatron("probe", read_meta(checkpoint)["architecture"]) as s:
        session.load(s, checkpoint)
        return session.logits(s, tokens)


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main() -> None:
    warnings.filterwarnings("ignore")
    from engine.hf.from_hf import import_checkpoint
    from engine.hf.to_hf import export_checkpoint

    tokenizer, work = Path(sys.argv[1]), Path(sys.argv[2])
    chosen = sys.argv[3:] or list(configs())
    tokens = torch.randint(0, 300, (3, 48), generator=torch.Generator().manual_seed(1))
    results: dict[str, Any] = {}
    for name, config in configs().items():
        if name not in chosen:
            continue
        source, imported, exported = work / name / "hf", work / name / "imported", work / name / "exported"
        source.mkdir(parents=True)
        build(name, config, source, tokenizer)
        section = import_checkpoint(source, imported).section
        theirs = hf_logits(source, tokens)
        ours = megatron_logits(imported, tokens)
        _, hf_class = export_checkpoint(imported, exported)
        # How much the family's RoPE scaling moves transformers' logits: a mapping that ignored it would be off by this.
        rope = dict(config.rope_parameters or {})
        plain = type(config)(
            **{
                **config.to_dict(),
                "rope_parameters": {"rope_type": "default", "rope_theta": rope.get("rope_theta", 1e4)},
            }
        )
        scaling_effect = float((hf_logits(source, tokens, config=plain) - theirs).abs().max())
        results[name] = {
            "class": hf_class,
            "source_class": json.loads((source / "config.json").read_text())["architectures"][0],
            "import_diff": float((ours - theirs).abs().max()),
            "export_diff": float((hf_logits(exported, tokens) - theirs).abs().max()),
            "logit_scale": float(theirs.abs().max()),
            "bit_identical": same_tensors(source, exported),
            "section": section,
            "rope_scaling_effect": scaling_effect,
        }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
