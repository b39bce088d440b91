"""The reward of each rollout: a frozen reward model's score and the reward-function plugins, weighted.

The reward model (a scalar-head model, engine.worker.mcore) scores prompt + response + <|end|> <|eos|>,
as it was trained on preference pairs, at the last token. Reward functions from the `engine.rewards`
entry points score the decoded text: the prompt, the response without its stop tokens, and the
prompt's reference answer where it has one. A plugin that raises, or returns the wrong number of
values or a value that is not finite, stops the stage with one message naming it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .. import plugin
from ..chat import Template
from ..errors import EngineError
from ..schema import RewardSpec

Values = Callable[[list[Any], torch.Tensor], torch.Tensor]  # (model chunks, tokens [n, s]) → [n, s]


class Scorer:
    def __init__(
        self, *, stage: str, rewards: list[RewardSpec], reward_model: list[Any] | None, reward_model_weight: float,
        values: Values, tok: Any, template: Template,
    ) -> None:  # fmt: skip
        self.stage, self.tok, self.template = stage, tok, template
        self.stop = list(template.stop)
        self.reward_model, self.reward_model_weight, self.values = reward_model, reward_model_weight, values
        self.rewards = []
        for spec in rewards:
            found = plugin.rewards()[spec.plugin]
            self.rewards.append((spec.plugin, spec.weight, found, found.params.model_validate(spec.params)))

    def samples(self, prompts: list[dict[str, Any]], rows: list[list[int]], plens: list[int],
                rlens: list[int]) -> list[plugin.RewardSample]:  # fmt: skip
        """What reward functions score: prompt text, decoded response (no stop tokens), reference."""
        texts = [self.tok.decode([t for t in r[p : p + n] if t not in self.stop])
                 for r, p, n in zip(rows, plens, rlens, strict=True)]  # fmt: skip
        return [plugin.RewardSample(prompt=pr["prompt_text"], response=text, reference=pr.get("reference"),
                                    metadata=pr.get("metadata") or {})
                for pr, text in zip(prompts, texts, strict=True)]  # fmt: skip

    def scores(
        self, rows: list[list[int]], batch: list[plugin.RewardSample]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of the reward sources per rollout, and each source's raw values."""
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(rows))
        if self.reward_model is not None:
            # As the reward model was trained (prompt + the reply closed as the template closes it), read at
            # the last token.
            rm_rows = [self.template.close(r) for r in rows]
            width = max(len(r) for r in rm_rows)
            tokens = torch.full((len(rows), width), self.template.pad, dtype=torch.long)
            for i, r in enumerate(rm_rows):
                tokens[i, : len(r)] = torch.tensor(r)
            values = self.values(self.reward_model, tokens)
            last = torch.tensor([len(r) - 1 for r in rm_rows])
            parts["reward_model"] = values.gather(1, last.unsqueeze(1)).squeeze(1)
            total += self.reward_model_weight * parts["reward_model"]
        for i, (name, weight, found, params) in enumerate(self.rewards):
            where = f"stages.{self.stage}.rewards[{i}]"
            fix = "fix the plugin or remove it from the recipe"
            try:
                values_list = found.score(params, batch)
            except Exception as exc:  # a plugin's own failure: name it, no traceback
                raise EngineError(
                    f"{where}: reward plugin {name!r} failed: {type(exc).__name__}: {exc}; {fix}"
                ) from None
            if len(values_list) != len(batch) or not all(math.isfinite(v) for v in values_list):
                raise EngineError(f"{where}: reward plugin {name!r} returned {len(values_list)} values for {len(batch)} "
                                  f"responses, or a value that is not finite; {fix}")  # fmt: skip
            parts[name] = torch.tensor(values_list, dtype=torch.float32)
            total += weight * parts[name]
        return total, parts
