"""Reward a response for matching (or not matching) a regular expression: format checks."""

from __future__ import annotations

import re
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from engine.plugin import RegexPattern, RewardFunction, RewardSample


class RegexParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pattern: RegexPattern = Field(description="regular expression searched in the response")
    full_match: bool = Field(default=False, description="the whole response must match")
    on_match: float = Field(default=1.0, description="reward when it matches")
    on_miss: float = Field(default=0.0, description="reward when it does not")


def score(params: RegexParams, batch: Sequence[RewardSample]) -> list[float]:
    rx = re.compile(params.pattern)
    find = rx.fullmatch if params.full_match else rx.search
    return [params.on_match if find(s.response) else params.on_miss for s in batch]


REWARD = RewardFunction(params=RegexParams, score=score, description="format check by regular expression")
