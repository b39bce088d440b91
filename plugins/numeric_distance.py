"""Partial credit for numeric answers: 1 for the exact number, falling off with the distance to it.

    reward = max(0, 1 − |answer − reference| / scale)

The answer is the first number in the response (or the first group of `extract`); a response without
a number, or a prompt without a numeric reference, scores `missing`. Denser than exact match, it tells
a near miss from a wild guess.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from engine.plugin import RegexPattern, RewardFunction, RewardSample

NUMBER = r"-?\d+(?:\.\d+)?"


class NumericDistanceParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    scale: float = Field(default=10.0, gt=0, description="distance at which the reward reaches 0")
    extract: RegexPattern | None = Field(
        default=None, description="regex whose first group is the answer; none: first number"
    )
    missing: float = Field(default=0.0, description="reward when there is no number to compare")


def _number(text: str, pattern: str) -> float | None:
    m = re.search(pattern, text)
    if m is None:
        return None
    try:
        return float(m.group(1) if m.groups() else m.group(0))
    except ValueError:
        return None


def score(params: NumericDistanceParams, batch: Sequence[RewardSample]) -> list[float]:
    out = []
    for s in batch:
        answer = _number(s.response, params.extract or NUMBER)
        reference = _number(s.reference, NUMBER) if s.reference is not None else None
        if answer is None or reference is None:
            out.append(params.missing)
        else:
            out.append(max(0.0, 1.0 - abs(answer - reference) / params.scale))
    return out


REWARD = RewardFunction(
    params=NumericDistanceParams, score=score, description="1 − |answer − reference| / scale, at least 0"
)
