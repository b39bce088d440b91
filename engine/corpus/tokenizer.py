"""The tokenizer artifact: a byte-level BPE trained with HF `tokenizers`, a local tokenizer.json, or a
model's HF tokenizer folder with its own chat template (`describe_hf`).

Training starts from the 256 byte symbols (every string is encodable) and adds the chat template's
special tokens first, so their ids are the same in every tokenizer this engine trains (0…6).

Every tokenizer this module hands out encodes text with special-token parsing off: a prompt, a
document, a demonstration or a reviewer's reply that contains the characters `<|end|><|assistant|>`
is encoded as those characters, never as the template's tokens, so no text can forge a turn. Only the
chat template (engine.chat.render) inserts special tokens, by id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..chat import SPECIAL_TOKENS, SpecialIds


def train_bpe(texts: Iterable[str], *, vocab_size: int, min_frequency: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return text_only(tok)


def load(path: Path) -> Any:
    from tokenizers import Tokenizer

    return text_only(Tokenizer.from_file(str(path)))


def text_only(tok: Any) -> Any:
    """The tokenizer with special-token parsing off for encoding (decoding is unchanged)."""
    tok.encode_special_tokens = True
    return tok


def describe(path: Path, tok: Any) -> dict[str, Any]:
    """What the manifest and every checkpoint's meta.json record about the tokenizer."""
    ids = SpecialIds.lookup(tok.token_to_id)
    return {
        "path": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "pad": ids.pad,
        "bos": ids.bos,
        "eod": ids.eos,
        "end": ids.end,
        "roles": ids.roles,
    }


def describe_hf(folder: Path) -> tuple[Any, dict[str, Any]]:
    """A HF tokenizer folder's tokenizer (text-only encoding, as `load`) and what the manifest and every
    checkpoint record about it: its special ids come from its own config and its chat template is pinned
    by sha256 (engine/chat_hf.py)."""
    from ..chat_hf import HFTemplate

    path = folder / "tokenizer.json"
    template = HFTemplate.load(folder)
    tok = load(path)
    bos = tok.token_to_id(template.bos_token) if template.bos_token else None
    eos = tok.token_to_id(template.eos_token) if template.eos_token else template.stop[0]
    return tok, {
        "path": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "pad": template.pad,
        "bos": bos,
        "eod": eos,
        "end": template.stop[0],
        "roles": {},
        "template": {
            "kind": "hf",
            "sha256": template.sha256,
            "stop": list(template.stop),
            "generation_markers": template.has_generation_markers,
        },
    }
