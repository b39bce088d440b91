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
            self.rewards.append((spec.plugin, spec.weight, found, found.params.model_validate(spec.params), spec))
        self.timeouts: dict[str, int] = {}  # calls past their time limit that were scored 0, per plugin

    @staticmethod
    def _call(score: Any, params: Any, batch: list[plugin.RewardSample], timeout: float | None) -> Any:
        """One batched call; with a time limit, on a daemon thread. Python cannot stop a thread: a call past
        its limit is abandoned (it ends, or not, on its own), never joined, so it holds up neither training
        nor the process's exit."""
        if timeout is None:
            return score(params, batch)
        import threading

        out: dict[str, Any] = {}

        def call() -> None:
            try:
                out["values"] = score(params, batch)
            except BaseException as exc:  # handed to the caller below
                out["error"] = exc

        thread = threading.Thread(target=call, name="reward-plugin", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError
        if "error" in out:
            raise out["error"]
        return out["values"]

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
        for i, (name, weight, found, params, spec) in enumerate(self.rewards):
            where = f"stages.{self.stage}.rewards[{i}]"
            fix = "fix the plugin or remove it from the recipe"
            try:
                values_list = self._call(found.score, params, batch, spec.timeout_s)
            except TimeoutError:
                if spec.on_timeout == "stop":
                    raise EngineError(
                        f"{where}: reward plugin {name!r} took longer than timeout_s={spec.timeout_s} for a batch of "
                        f"{len(batch)} responses; make it faster, raise timeout_s, or set on_timeout: zero"
                    ) from None
                self.timeouts[name] = self.timeouts.get(name, 0) + 1
                values_list = [0.0] * len(batch)
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
