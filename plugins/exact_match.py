"""Reward 1 when the response's answer equals the prompt's reference answer, else 0."""

from __future__ import annotations

import re
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from engine.plugin import RegexPattern, RewardFunction, RewardSample


class ExactMatchParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    extract: RegexPattern | None = Field(
        default=None, description="regex whose first group is the answer; none: the whole response"
    )
    ignore_case: bool = Field(default=False, description="compare case-insensitively")


def _answer(params: ExactMatchParams, response: str) -> str:
    text = response
    if params.extract is not None:
        m = re.search(params.extract, response)
        text = (m.group(1) if m.groups() else m.group(0)) if m else ""
    text = " ".join(text.split())
    return text.lower() if params.ignore_case else text


def score(params: ExactMatchParams, batch: Sequence[RewardSample]) -> list[float]:
    out = []
    for s in batch:
        if s.reference is None:
            out.append(0.0)
            continue
        ref = " ".join(s.reference.split())
        ref = ref.lower() if params.ignore_case else ref
        out.append(1.0 if _answer(params, s.response) == ref else 0.0)
    return out


REWARD = RewardFunction(
    params=ExactMatchParams, score=score, description="1 if the answer equals the reference, else 0"
)
