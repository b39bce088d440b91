"""Two reward plugins from outside engine: one useful, one broken on purpose."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from engine.plugin import RewardFunction, RewardSample


class ShortDigitsParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_digits: int = Field(default=3, gt=0, description="longest answer that earns the reward")


def short_digits(params: ShortDigitsParams, batch: Sequence[RewardSample]) -> list[float]:
    """1 for an answer of at most max_digits digits, else 0."""
    return [1.0 if s.response.strip().isdigit() and len(s.response.strip()) <= params.max_digits else 0.0
            for s in batch]  # fmt: skip


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def always_fails(params: NoParams, batch: Sequence[RewardSample]) -> list[float]:
    raise RuntimeError("the scoring service is unreachable")


SHORT_DIGITS = RewardFunction(params=ShortDigitsParams, score=short_digits, description="answers made of few digits")
ALWAYS_FAILS = RewardFunction(params=NoParams, score=always_fails, description="raises on every batch")
