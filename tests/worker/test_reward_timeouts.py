"""A reward plugin's per-call time limit (rewards[i].timeout_s): a hung call stops the stage naming the
plugin, or is scored 0 and counted, as the recipe says; either way training is not held up."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import BaseModel

from engine import plugin
from engine.errors import EngineError
from engine.schema import RewardSpec
from engine.worker.rewards import Scorer


class NoParams(BaseModel):
    pass


def _scorer(monkeypatch: pytest.MonkeyPatch, delay: float, **spec: Any) -> Scorer:
    def score(params: NoParams, batch: list[plugin.RewardSample]) -> list[float]:
        time.sleep(delay)
        return [1.0] * len(batch)

    monkeypatch.setattr(plugin, "rewards", lambda: {"slow": SimpleNamespace(score=score, params=NoParams)})
    template = SimpleNamespace(stop=(1, 2), pad=0)
    return Scorer(stage="ppo", rewards=[RewardSpec(plugin="slow", **spec)], reward_model=None, reward_model_weight=1.0,
                  values=lambda c, t: t, tok=None, template=template)  # type: ignore[arg-type]  # fmt: skip


BATCH = [plugin.RewardSample(prompt="1+1=", response="2", reference="2", metadata={})] * 3


def test_a_call_past_its_limit_stops_the_stage_naming_the_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    scorer = _scorer(monkeypatch, 10.0, timeout_s=0.2)
    began = time.perf_counter()
    with pytest.raises(EngineError, match=r"rewards\[0\]: reward plugin 'slow' took longer than timeout_s=0.2"):
        scorer.scores([[0]] * 3, BATCH)
    assert time.perf_counter() - began < 2.0  # the hung call was abandoned, not waited for


def test_a_call_past_its_limit_can_score_zero_and_be_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    scorer = _scorer(monkeypatch, 10.0, timeout_s=0.2, on_timeout="zero")
    total, parts = scorer.scores([[0]] * 3, BATCH)
    total, parts = scorer.scores([[0]] * 3, BATCH)
    assert total.tolist() == [0.0] * 3 and parts["slow"].tolist() == [0.0] * 3 and scorer.timeouts == {"slow": 2}


def test_a_call_within_its_limit_scores_as_without_one(monkeypatch: pytest.MonkeyPatch) -> None:
    total, _ = _scorer(monkeypatch, 0.0, timeout_s=5.0).scores([[0]] * 3, BATCH)
    assert total.tolist() == [1.0] * 3
