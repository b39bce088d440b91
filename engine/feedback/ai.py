"""`engine feedback ai`: rankings from reward functions, stored like a reviewer's, so a round can run
unattended.

K responses are sampled per prompt exactly as for human review (engine/feedback/sampler.py), scored
by the named reward plugins (engine.plugin.rewards(); `NAME` with default parameters or
`NAME:{json}`, summed with equal weights)
and ranked by score, best first; equal scores share a place (a tie gives no preference pair). Each
item is stored in the same database as soon as it is ranked, with its judgment under the reviewer
`ai:<name>+<name>` (with the model version and sampling parameters). The items are not shown to human
reviewers. A rerun continues with the prompts after the last one stored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import EngineError
from .sampler import PromptSet, SamplingOptions, model_version, open_sampler

if TYPE_CHECKING:
    from ..chat_session import Target
from .store import NewItem, Store, check_reviewer


@dataclass(frozen=True)
class Summary:
    reviewer: str
    prompts: int
    judgments: int
    mixed: int  # prompts whose responses did not all score the same (these give preference pairs)
    mean_score: float


def reward_functions(specs: Sequence[str]) -> list[tuple[str, Any, Any]]:
    """(name, plugin, params) of each `NAME` or `NAME:{json params}`; an unknown name lists the installed ones."""
    from pydantic import ValidationError

    from .. import plugin

    installed = plugin.rewards()
    out = []
    for spec in specs:
        name, _, raw = spec.partition(":")
        if name not in installed:
            raise EngineError(
                f"--reward {spec!r}: no reward plugin {name!r}; installed: {', '.join(sorted(installed))}"
            )
        try:
            params = installed[name].params.model_validate(json.loads(raw) if raw else {})
        except (ValueError, ValidationError) as exc:
            raise EngineError(f"--reward {spec!r}: the parameters of {name!r} do not validate: {exc}") from None
        out.append((name, installed[name], params))
    if not out:
        raise EngineError(f"give at least one --reward; installed: {', '.join(sorted(installed))}")
    return out


def dense_ranks(scores: Sequence[float]) -> list[int]:
    """Place of each score, 0 for the highest; equal scores share a place."""
    distinct = sorted(set(scores), reverse=True)
    return [distinct.index(s) for s in scores]


def score(
    rewards: Sequence[tuple[str, Any, Any]], prompt: str, reference: str | None, responses: Sequence[str],
    metadata: Mapping[str, Any] | None = None,
) -> list[float]:  # fmt: skip
    from ..plugin import RewardSample

    batch = [RewardSample(prompt=prompt, response=r, reference=reference, metadata=dict(metadata or {}))
             for r in responses]  # fmt: skip
    total = [0.0] * len(responses)
    for name, found, params in rewards:
        values = found.score(params, batch)
        if len(values) != len(batch) or not all(math.isfinite(v) for v in values):
            raise EngineError(
                f"reward plugin {name!r} returned {len(values)} values for {len(batch)} responses, or one that is not finite"
            )
        total = [t + float(v) for t, v in zip(total, values, strict=True)]
    return total


def run_ai_feedback(target: Target, prompts: PromptSet, *, db: Path, rewards: Sequence[str], k: int, limit: int,
                    options: SamplingOptions, batch: int = 8,
                    progress: Callable[[int, int], None] | None = None) -> Summary:  # fmt: skip
    """Sample, score and store rankings for up to `limit` prompts after the last one ranked before."""
    functions = reward_functions(rewards)
    reviewer = check_reviewer("ai:" + "+".join(name for name, _, _ in functions), ai=True)
    store = Store(db)
    judged = mixed = 0
    total_score = 0.0
    try:
        first = store.next_prompt_index(prompts.name, "ai")
        rows = list(enumerate(prompts.rows))[first : first + limit]
        with open_sampler(target, options) as sampler:
            model_id = store.model_id(model_version(target))
            for start in range(0, len(rows), batch):
                encoded = [(i, row, sampler.encode(row.prompt)) for i, row in rows[start : start + batch]]
                chunk = [(i, row, tokens) for i, row, tokens in encoded if tokens is not None]
                texts = sampler.responses([t for _, _, t in chunk], k, seed=chunk[0][0]) if chunk else []
                for (i, row, _), responses in zip(chunk, texts, strict=True):
                    scores = score(functions, row.prompt, row.reference, responses, row.metadata)
                    (item_id,) = store.add_items([NewItem(row.prompt, row.reference, i, responses)], prompt_set=prompts.name,
                                                 model_id=model_id, sampling=sampler.sampling, origin="ai")  # fmt: skip
                    store.judge(item_id=item_id, reviewer=reviewer, action="rank", ranks=dense_ranks(scores), strict=False,
                                note="scores " + " ".join(f"{s:.4g}" for s in scores))  # fmt: skip
                    judged += 1
                    mixed += len(set(scores)) > 1
                    total_score += sum(scores) / len(scores)
                if progress is not None:
                    progress(min(start + batch, len(rows)), len(rows))
    finally:
        store.close()
    return Summary(reviewer, len(rows), judged, mixed, total_score / judged if judged else 0.0)
