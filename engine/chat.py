"""The chat template, defined once: the data stage, SFT, the reward model, PPO and chat all use it.

    <|bos|><|system|>…<|end|><|user|>…<|end|><|assistant|>…<|end|><|eos|>

Each message is its role token, the content's tokens and <|end|>. The loss mask marks the assistant
contents and their <|end|> (the model learns to stop), never the prompt. A generation prompt ends with
<|assistant|>. No torch here: token ids are plain lists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
