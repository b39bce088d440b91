"""A synthetic arithmetic task: the default demo's data, in every record kind.

Sized so that a ~1M-parameter model can learn it on a laptop CPU: with operands up to 30 a tiny model
reaches useful exact-match accuracy after SFT, and a reward model can tell right from wrong answers;
with operands up to 99 the same model's reward model stays at chance. Every record kind comes from
the same generator with its own seed offset, so the kinds do not share examples by construction.

`restate_rate` makes the demonstrations (conversation records) inconsistent the way human ones are:
that fraction of them answers by restating the whole equation ("3+4=7") instead of the number alone
("7"), the format the prompts' reference answers and the preference records use. SFT imitates both
styles; a reward that checks the answer (exact match, or a reward model trained on the rankings)
prefers the bare number, and RL moves the policy to it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from pydantic import BaseModel, ConfigDict, Field

from engine.plugin import (
    Conversation,
    DataSource,
    Message,
    Preference,
    Prompt,
    Record,
    RecordKind,
    Text,
)

_KIND_OFFSET = {"text": 0, "conversation": 1, "preference": 2, "prompt": 3}


class ArithmeticParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_operand: int = Field(default=30, ge=1, le=10**6, description="operands are drawn from 0..max")
    num_samples: int = Field(default=5000, gt=0, description="records generated")
    per_document: int = Field(
        default=16, gt=0, le=1000, description="equations per document, one per line (records: text)"
    )
    seed: int = Field(default=0, ge=0, description="generator seed")
    restate_rate: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="fraction of demonstrations (conversation records) answering with the whole equation",
    )


def _problem(rng: random.Random, hi: int) -> tuple[str, str]:
    a, b = rng.randint(0, hi), rng.randint(0, hi)
    return f"{a}+{b}=", str(a + b)


def _demonstration(rng: random.Random, hi: int, restate_rate: float) -> tuple[str, str]:
    prompt, answer = _problem(rng, hi)
    # Drawn for every problem, so the rate does not change which problems are generated.
    restate = rng.random() < restate_rate
    return prompt, prompt + answer if restate else answer


def _wrong(rng: random.Random, answer: str) -> str:
    value = int(answer)
    delta = rng.choice([d for d in range(-10, 11) if d != 0 and value + d >= 0])
    return str(value + delta)


def read(params: ArithmeticParams, kind: RecordKind) -> Iterator[Record]:
    rng = random.Random(params.seed * 4 + _KIND_OFFSET[kind])
    for _ in range(params.num_samples):
        if kind == "text":
            lines = ("".join(_problem(rng, params.max_operand)) for _ in range(params.per_document))
            yield Text("\n".join(lines))
            continue
        if kind == "conversation":
            prompt, answer = _demonstration(rng, params.max_operand, params.restate_rate)
            yield Conversation((Message("user", prompt), Message("assistant", answer)))
            continue
        prompt, answer = _problem(rng, params.max_operand)
        if kind == "preference":
            yield Preference(prompt, chosen=answer, rejected=_wrong(rng, answer))
        else:
            yield Prompt(prompt, reference=answer)


def size(params: ArithmeticParams, kind: RecordKind) -> int:
    """About the characters generated, from the first records (at most 64) scaled to `num_samples`."""
    sample = min(params.num_samples, 64)
    chars = 0
    for record in read(params.model_copy(update={"num_samples": sample}), kind):
        fields = [getattr(record, f, None) for f in ("text", "prompt", "chosen", "rejected", "reference")]
        chars += sum(len(f) for f in fields if isinstance(f, str))
        chars += sum(len(m.content) for m in getattr(record, "messages", ()))
    return round(chars * params.num_samples / sample)


SOURCE = DataSource(
    params=ArithmeticParams,
    kinds=frozenset({"text", "conversation", "preference", "prompt"}),
    read=read,
    size=size,
    description="synthetic addition problems (the CPU demo's task)",
)
