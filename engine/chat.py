"""The chat template, defined once: the data stage, SFT, the reward model, PPO, chat and feedback all
render conversations through a `Template`.

The engine's own template, for the tokenizers the data stage trains (and any tokenizer.json that has
its special tokens):

    <|bos|><|system|>…<|end|><|user|>…<|end|><|assistant|>…<|end|><|eos|>

Each message is its role token, the content's tokens and <|end|>. The loss mask marks the assistant
contents and their <|end|> (the model learns to stop), never the prompt. A generation prompt ends with
<|assistant|>. A model's own Jinja template (`tokenizer: {kind: hf}`) is engine/chat_hf.py. No torch
here: token ids are plain lists.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

PAD, BOS, EOS, END = "<|pad|>", "<|bos|>", "<|eos|>", "<|end|>"
ROLES = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD, BOS, EOS, END, *ROLES.values()]

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    bos: int
    eos: int
    end: int
    roles: dict[str, int]

    @classmethod
    def lookup(cls, token_to_id: Callable[[str], int | None]) -> SpecialIds:
        ids = {t: token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"the tokenizer lacks the chat template's special tokens {missing}")
        got = {t: int(i) for t, i in ids.items() if i is not None}
        return cls(got[PAD], got[BOS], got[EOS], got[END], {r: got[t] for r, t in ROLES.items()})


def render(
    messages: Sequence[tuple[str, str]], encode: Encode, ids: SpecialIds, *, generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids and loss mask of (role, content) messages."""
    tokens, mask = [ids.bos], [0]
    for role, content in messages:
        body = [*encode(content), ids.end]
        learn = 1 if role == "assistant" else 0
        tokens += [ids.roles[role], *body]
        mask += [0] + [learn] * len(body)
    if generation_prompt:
        tokens.append(ids.roles["assistant"])
        mask.append(0)
    else:
        tokens.append(ids.eos)
        mask.append(0)
    return tokens, mask


class Template(Protocol):
    """How conversations become tokens for a model: what every chat stage renders through."""

    @property
    def pad(self) -> int: ...

    @property
    def stop(self) -> tuple[int, ...]:
        """Generation ends at any of these (the end of an assistant turn)."""
        ...

    def render(
        self, messages: Sequence[tuple[str, str]], *, generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Token ids and loss mask (1 on the assistant tokens the model learns, its end-of-turn included)."""
        ...

    def reply(self, messages: Sequence[tuple[str, str]], text: str) -> list[int]:
        """The tokens of an assistant reply `text` as they follow the generation prompt of `messages`,
        closed as a rendered conversation closes it (what a reward model is trained on)."""
        ...

    def close(self, response: list[int]) -> list[int]:
        """A generated response (prompt included) completed the way `reply` ends one, for the reward model."""
        ...


@dataclass(frozen=True)
class EngineTemplate:
    """The engine's own template over a tokenizer with its special tokens."""

    ids: SpecialIds
    encode: Encode

    @property
    def pad(self) -> int:
        return self.ids.pad

    @property
    def stop(self) -> tuple[int, ...]:
        return (self.ids.end, self.ids.eos)

    def render(
        self, messages: Sequence[tuple[str, str]], *, generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        return render(messages, self.encode, self.ids, generation_prompt=generation_prompt)

    def reply(self, messages: Sequence[tuple[str, str]], text: str) -> list[int]:
        return [*self.encode(text), self.ids.end, self.ids.eos]

    def close(self, response: list[int]) -> list[int]:
        return [*response, self.ids.eos] if response and response[-1] == self.ids.end else response


def template_for(info: Mapping[str, Any], tok: Any) -> Template:
    """The template a tokenizer's recorded info (a manifest's or a checkpoint's `tokenizer`) names: the
    model's own (`template.kind: hf`, read from the tokenizer's folder) or the engine's."""
    spec = info.get("template") or {}
    if spec.get("kind") == "hf":
        from pathlib import Path

        from .chat_hf import HFTemplate

        return HFTemplate.load(Path(str(info["path"])).parent, expect_sha256=spec.get("sha256"))
    ids = SpecialIds.lookup(tok.token_to_id)
    return EngineTemplate(ids, lambda text: list(tok.encode(text, add_special_tokens=False).ids))
