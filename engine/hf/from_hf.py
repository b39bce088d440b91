"""`engine import`: a local Hugging Face checkpoint of a mapped family → an engine checkpoint directory.

The families (Llama 3/3.1/3.2, Qwen2/2.5, Qwen3, Mistral) and what is refused: engine/hf/convert.py.

The directory is what a training stage hands the next one: a Megatron-Core distributed checkpoint of
the weights (TP1/PP1; dist_checkpointing reshards it to any layout on load), the tokenizer files, and
a meta.json with the contract a stage checks before it starts from a checkpoint — the resolved
architecture, the tokenizer's sha256 and its special-token ids. A recipe starts a stage from it with
`init_from: <the directory>`, given a `model` section with the same architecture and its tokenizer;
`import_checkpoint` returns both, and `engine import` prints a whole fine-tuning recipe
(engine/hf/recipe.py).

The tokenizer: a folder with a chat template (tokenizer_config.json's `chat_template`) keeps it, with
its special tokens and generation_config.json's stop tokens (`tokenizer: {kind: hf, path: <dir>}`,
engine/chat_hf.py); a tokenizer.json without one must have the engine's special tokens (engine/chat.py,
`kind: file`). The model keeps its embedding rows: the recipe gets the `make_vocab_size_divisible_by`
that pads the tokenizer to them where one does, otherwise `vocab_rows`. Tensors are read one at a time,
so the import holds the model once (bench/import_memory.py measures it).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..artifacts import read_json, write_json_atomic
from ..chat import SPECIAL_TOKENS
from ..chat_hf import template_source
from ..corpus.tokenizer import describe, describe_hf
from ..corpus.tokenizer import load as load_tokenizer
from ..errors import EngineError
from ..worker import checkpoint
from ..worker.handoff import meta_for
from . import convert, session

INDEX = "model.safetensors.index.json"


class Shards:
    """The tensors of a folder's model.safetensors, or of the shards its index names, read one at a time
    (memory-mapped by safetensors): an import holds the model once, never a second copy of the file."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        if (folder / INDEX).is_file():
            files = sorted(set(read_json(folder / INDEX)["weight_map"].values()))
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise EngineError(
                f"{folder} has no model.safetensors (or {INDEX}); save the model with "
                "`save_pretrained(..., safe_serialization=True)`"
            )
        self.files = [folder / name for name in files]
        self._where: dict[str, Any] = {}
        for path in self.files:
            if not path.is_file():
                raise EngineError(f"{folder / INDEX} names {path.name}, which is not in {folder}")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for a damaged header
                raise EngineError(f"{path} is not a readable safetensors file ({exc})") from None
            keys: list[str] = handle.keys()  # type: ignore[no-untyped-call]
            self._where |= {k: handle for k in keys if not k.endswith(convert.IGNORED)}

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """One tensor as fp32 (the import's model is fp32)."""
        tensor: torch.Tensor = self._where[name].get_tensor(name)
        return tensor.float()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")  # fmt: skip


def _tokenizer(folder: Path) -> tuple[dict[str, Any], int]:
    """What meta.json records about the fast tokenizer, and its vocabulary (highest id + 1). A folder with a
    chat template keeps it (the model's own template, `tokenizer: {kind: hf}`); one without must have the
    engine's special tokens (its template)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise EngineError(f"{folder} has no tokenizer.json; save a fast tokenizer (`tokenizer.save_pretrained`)")
    if template_source(folder) is not None:
        tok, info = describe_hf(folder)
        return info, max(tok.get_vocab(with_added_tokens=True).values()) + 1
    tok = load_tokenizer(path)
    try:
        info = describe(path, tok)
    except ValueError as exc:
        raise EngineError(
            f"{path}: {exc} and the folder has no chat template of its own (tokenizer_config.json 'chat_template'); "
            f"save the model's tokenizer with its template, or add the engine's tokens (tokenizer.add_special_tokens("
            f"{{'additional_special_tokens': {SPECIAL_TOKENS}}})) and resize the model's embeddings "
            "(model.resize_token_embeddings) before importing"
        ) from None
    return info, max(tok.get_vocab(with_added_tokens=True).values()) + 1


def _architecture(folder: Path, rows: int, tokens: int, seq_length: int | None, divisor: int | None) -> dict[str, Any]:
    config = read_json(folder / "config.json")
    if int(config.get("vocab_size", rows)) != rows:
        raise EngineError(f"config.json says vocab_size={config['vocab_size']}, the embedding has {rows} rows")
    d = convert.vocab_divisor(tokens, rows, divisor)
    try:
        arch = convert.architecture_from_hf(
            config, vocab_size=tokens, padded_vocab_size=rows,
            seq_length=seq_length or int(config["max_position_embeddings"]),
        )  # fmt: skip
    except KeyError as exc:
        raise EngineError(f"{folder / 'config.json'} lacks {exc}") from None
    return {**arch, "make_vocab_size_divisible_by": d}


MODEL_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "ffn_hidden_size",
              "seq_length", "rotary_base", "rope_scaling_factor", "tie_embeddings", "qkv_bias", "qk_layernorm",
              "norm_epsilon", "init_method_std")  # fmt: skip


def recipe_section(arch: dict[str, Any], tokenizer: dict[str, Any]) -> dict[str, Any]:
    """The recipe's tokenizer and model sections that resolve to exactly this architecture: the defaults
    left out, the embedding rows as a divisor where one pads the tokenizer to them, else as `vocab_rows`."""
    model = {k: arch[k] for k in MODEL_KEYS if k in arch}
    for key, default in (("rope_scaling_factor", None), ("qkv_bias", False), ("qk_layernorm", False)):
        if model.get(key) == default:
            model.pop(key)
    if model["kv_channels"] * model["num_attention_heads"] == model["hidden_size"]:
        model.pop("kv_channels")
    d = arch.get("make_vocab_size_divisible_by")
    model |= {"make_vocab_size_divisible_by": d} if d else {"vocab_rows": arch["padded_vocab_size"]}
    return {"tokenizer": tokenizer, "model": model}


def _load_weights(s: session.Session, shards: Shards, arch: dict[str, Any]) -> None:
    """Each parameter of the session's model from its HF tensors, one at a time."""
    own = session.weights(s)
    maps = {t.ours: t for t in convert.tensor_maps(arch)}
    missing, extra = sorted(own.keys() - maps.keys()), sorted(maps.keys() - own.keys())
    if missing or extra:
        raise EngineError(f"the mapping does not fit the model: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for name, target in own.items():
            t = maps[name]
            value = convert.join(t, [shards.get(n) for n in t.theirs], arch)
            if tuple(value.shape) != tuple(target.shape):
                raise EngineError(
                    f"{' + '.join(t.theirs)}: shape {tuple(value.shape)}, the model has {tuple(target.shape)}"
                )
            target.copy_(value)
            del value


def import_checkpoint(
    hf_dir: Path, out: Path, *, seq_length: int | None = None, vocab_divisor: int | None = None
) -> Imported:
    """Convert the HF folder `hf_dir` (a family of engine/hf/convert.py) into the engine checkpoint directory
    `out`; returns the recipe sections (tokenizer, model) that a stage starting from it needs."""
    if not (hf_dir / "config.json").is_file():
        raise EngineError(f"{hf_dir} has no config.json; give a folder written by `save_pretrained`")
    convert.family_of(read_json(hf_dir / "config.json"))  # an unknown family is refused before anything is read
    info, tokens = _tokenizer(hf_dir)
    shards = Shards(hf_dir)
    if "model.embed_tokens.weight" not in shards.names():
        raise EngineError(f"{hf_dir} has no model.embed_tokens.weight: is it a *ForCausalLM of a mapped family?")
    rows = shards.shape("model.embed_tokens.weight")[0]
    full = _architecture(hf_dir, rows, tokens, seq_length, vocab_divisor)
    arch = {k: v for k, v in full.items() if k != "make_vocab_size_divisible_by"}
    expected = convert.hf_names(arch)
    missing, extra = sorted(expected - shards.names()), sorted(shards.names() - expected - {"lm_head.weight"})
    if missing or extra:
        raise EngineError(f"{hf_dir} is not the model its config.json describes: missing {missing}, unexpected {extra}")
    info["path"] = str(out / "tokenizer.json")
    own_template = "template" in info
    with session.staged(out) as folder:
        with session.megatron("import", arch) as s:
            _load_weights(s, shards, arch)
            session.save(s, folder)
            meta = meta_for(s.ctx, info, [str(hf_dir)])
        for name in TOKENIZER_FILES if own_template else ("tokenizer.json",):
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, folder / name)
        config = read_json(hf_dir / "config.json")
        source = {"format": "hf", "path": str(hf_dir), "config": config}
        write_json_atomic(folder / checkpoint.META, {**meta, "step": 0, "consumed_samples": 0, "source": source})
    tokenizer = {"kind": "hf", "path": str(out)} if own_template else {"kind": "file", "path": str(out / "tokenizer.json")}
    return Imported(recipe_section(full, tokenizer), rows=rows, family=convert.family_of(config).name)


@dataclass(frozen=True)
class Imported:
    """What an import gives a recipe: its tokenizer and model sections, the embedding rows, the HF family."""

    section: dict[str, Any]
    rows: int
    family: str


