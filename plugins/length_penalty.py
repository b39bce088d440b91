"""A penalty growing linearly with the response length beyond a budget (in characters)."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from engine.plugin import RewardFunction, RewardSample


class LengthPenaltyParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_chars: int = Field(default=200, ge=0, description="responses up to this length are not penalised")
    per_char: float = Field(default=0.01, ge=0, description="penalty per character beyond max_chars")


def score(params: LengthPenaltyParams, batch: Sequence[RewardSample]) -> list[float]:
    return [-params.per_char * max(0, len(s.response) - params.max_chars) for s in batch]


REWARD = RewardFunction(params=LengthPenaltyParams, score=score, description="−per_char × characters beyond max_chars")
