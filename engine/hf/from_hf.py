"""`engine import`: a local Hugging Face Llama checkpoint → an engine checkpoint directory.

The directory is what a training stage hands the next one: a Megatron-Core distributed checkpoint of
the weights (TP1/PP1; dist_checkpointing reshards it to any layout on load), the tokenizer.json, and
a meta.json with the contract a stage checks before it starts from a checkpoint — the resolved
architecture, the tokenizer's sha256 and its special-token ids. A recipe starts a pretrain or SFT stage
from it with `init_from: <the directory>`, given a `model` section with the same architecture and
`tokenizer: {kind: file, path: <the directory>/tokenizer.json}`; `import_checkpoint` returns both.

The tokenizer must be a fast tokenizer (tokenizer.json) with the chat template's special tokens
(engine/chat.py). The vocabulary rows beyond the HF model's are padding, initialised to zero.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from ..artifacts import read_json, write_json_atomic
from ..chat import SPECIAL_TOKENS
from ..corpus.tokenizer import describe
from ..corpus.tokenizer import load as load_tokenizer
from ..errors import EngineError
from ..schema.stages import is_checkpoint_path
from ..worker import checkpoint
from ..worker.handoff import meta_for
from . import convert, session

INDEX = "model.safetensors.index.json"
IGNORED = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors or of the shards its index names, as fp32."""
    from safetensors.torch import load_file

    if (folder / INDEX).is_file():
        files = sorted(set(read_json(folder / INDEX)["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise EngineError(
            f"{folder} has no model.safetensors (or {INDEX}); save the model with "
            "`save_pretrained(..., safe_serialization=True)`"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors |= {k: v.float() for k, v in load_file(str(folder / name)).items() if not k.endswith(IGNORED)}
    return tensors


def _tokenizer(folder: Path) -> tuple[dict[str, Any], int]:
    """What meta.json records about the fast tokenizer, and its vocabulary (highest id + 1)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise EngineError(f"{folder} has no tokenizer.json; save a fast tokenizer (`tokenizer.save_pretrained`)")
    tok = load_tokenizer(path)
    try:
        info = describe(path, tok)
    except ValueError as exc:
        raise EngineError(
            f"{path}: {exc}; add them as special tokens (tokenizer.add_special_tokens({{'additional_special_tokens': "
            f"{SPECIAL_TOKENS}}})) and resize the model's embeddings (model.resize_token_embeddings) before importing"
        ) from None
    return info, max(tok.get_vocab(with_added_tokens=True).values()) + 1


def _architecture(folder: Path, rows: int, tokens: int, seq_length: int | None, divisor: int | None) -> dict[str, Any]:
    config = read_json(folder / "config.json")
    if int(config.get("vocab_size", rows)) != rows:
        raise EngineError(f"config.json says vocab_size={config['vocab_size']}, the embedding has {rows} rows")
    d = convert.vocab_divisor(tokens, rows, divisor)
    try:
        arch = convert.architecture_from_hf(
            config, vocab_size=tokens, padded_vocab_size=d * math.ceil(tokens / d),
            seq_length=seq_length or int(config["max_position_embeddings"]),
        )  # fmt: skip
    except KeyError as exc:
        raise EngineError(f"{folder / 'config.json'} lacks {exc}") from None
    return {**arch, "make_vocab_size_divisible_by": d}


def recipe_section(arch: dict[str, Any], tokenizer: Path) -> dict[str, Any]:
    """The recipe's tokenizer and model sections that resolve to exactly this architecture."""
    keys = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "seq_length",
            "rotary_base", "tie_embeddings", "norm_epsilon", "init_method_std", "make_vocab_size_divisible_by")  # fmt: skip
    return {"tokenizer": {"kind": "file", "path": str(tokenizer)}, "model": {k: arch[k] for k in keys}}


def import_checkpoint(
    hf_dir: Path, out: Path, *, seq_length: int | None = None, vocab_divisor: int | None = None
) -> dict[str, Any]:
    """Convert the HF Llama folder `hf_dir` into the engine checkpoint directory `out`; returns the
    recipe sections (tokenizer, model) that a stage starting from it needs."""
    if not (hf_dir / "config.json").is_file():
        raise EngineError(f"{hf_dir} has no config.json; give a folder written by `save_pretrained`")
    info, tokens = _tokenizer(hf_dir)
    tensors = _weights(hf_dir)
    if "model.embed_tokens.weight" not in tensors:
        raise EngineError(f"{hf_dir} has no model.embed_tokens.weight: is it a LlamaForCausalLM?")
    full = _architecture(hf_dir, tensors["model.embed_tokens.weight"].shape[0], tokens, seq_length, vocab_divisor)
    arch = {k: v for k, v in full.items() if k != "make_vocab_size_divisible_by"}
    expected = convert.hf_names(arch)
    missing, extra = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected - {"lm_head.weight"})
    if missing or extra:
        raise EngineError(f"{hf_dir} is not the Llama its config.json describes: missing {missing}, unexpected {extra}")
    info["path"] = str(out / "tokenizer.json")
    with session.staged(out) as folder:
        with session.megatron("import", arch) as s:
            session.set_weights(s, convert.from_hf(tensors, arch))
            session.save(s, folder)
            meta = meta_for(s.ctx, info, [str(hf_dir)])
        shutil.copyfile(hf_dir / "tokenizer.json", folder / "tokenizer.json")
        source = {"format": "hf", "path": str(hf_dir), "config": read_json(hf_dir / "config.json")}
        write_json_atomic(folder / checkpoint.META, {**meta, "step": 0, "consumed_samples": 0, "source": source})
    return recipe_section(full, out / "tokenizer.json")


def describe_import(section: dict[str, Any], out: Path) -> str:
    """What `engine import` prints: the recipe lines that start a stage from the import."""
    import yaml

    ref = str(out) if is_checkpoint_path(str(out)) else f"./{out}"  # a bare name would be a stage's
    text = yaml.safe_dump(section, sort_keys=False, default_flow_style=False)
    return f"{text}# and in the pretrain or sft stage:\n#   init_from: {json.dumps(ref)}\n"
