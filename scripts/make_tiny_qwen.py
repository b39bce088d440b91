"""Build a random tiny Qwen2.5-style Hugging Face model locally and import it: the starting point of
recipes/finetune_tiny_qwen.yaml (no hub access needed).

The model is a `Qwen2ForCausalLM` from its config class (2 layers, hidden 64, 4 query heads over 2
key/value heads, q/k/v biases, tied embeddings, θ = 1e6, 416 embedding rows for a 400-token vocabulary as
Qwen pads its own), with random weights; its tokenizer is a byte-level BPE trained on arithmetic text with
Qwen's special tokens and a ChatML chat template (<|im_start|>role … <|im_end|>), saved as
`save_pretrained` saves a tokenizer. Then `engine import` converts it into an engine checkpoint.

    .venv/bin/python scripts/make_tiny_qwen.py [--out runs/tiny-qwen]
    .venv/bin/engine run recipes/finetune_tiny_qwen.yaml
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen2's pre-tokenizer split (tokenizer.json of the Qwen2.5 models): transformers applies it to every
# tokenizer of model_type qwen2, so a stand-in must split the same way.
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
              r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
VOCAB, ROWS = 400, 416


def texts() -> list[str]:
    words = ["What is", "Compute", "Add", "The answer is", "You are a helpful assistant.", "sum", "equals"]
    return [f"{a}+{b}={a + b}" for a in range(31) for b in range(31)] + words * 20


def build(folder: Path) -> None:
    import torch
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([  # Qwen2's: digits one by one, then byte-level
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    tok.train_from_iterator(texts(), trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "chat_template": CHATML, "bos_token": None,
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "clean_up_tokenization_spaces": False,
              "model_max_length": 128}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    model_config = transformers.Qwen2Config(
        vocab_size=ROWS, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        rms_norm_eps=1e-6, initializer_range=0.02, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(model_config)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/tiny-qwen"))
    args = ap.parse_args()
    hf, imported = args.out / "hf", args.out / "imported"
    for path in (hf, imported):
        if path.exists():
            raise SystemExit(f"{path} exists; remove it or choose another --out")
    build(hf)
    done = subprocess.run([sys.executable, "-m", "engine", "import", str(hf), "--out", str(imported)])
    raise SystemExit(done.returncode)


if __name__ == "__main__":
    main()
