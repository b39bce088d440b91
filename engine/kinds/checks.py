"""Rule helpers the kinds share: plugins named by a recipe, their parameters, numbers that JSON cannot hold,
where packed batching can run."""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterator, Mapping
from typing import Any, TypeVar

from pydantic import ValidationError

from ..errors import PluginError, Problem, did_you_mean

T = TypeVar("T")


def plugin_table(where: str, loader: Callable[[], Mapping[str, T]]) -> dict[str, T] | Problem:
    """The installed plugins of one group, or the problem that kept them from loading."""
    try:
        return dict(loader())
    except PluginError as exc:
        return Problem(where, str(exc), "fix or uninstall the plugin")


def installed(path: str, name: str, table: Mapping[str, T], what: str) -> Generator[Problem, None, T | None]:
    """The named plugin, or a problem with a did-you-mean (none when the table failed to load)."""
    found = table.get(name)
    if found is None and table:
        yield Problem(path, f"={name!r} is not an installed {what}", did_you_mean(name, table))
    return found


def plugin_params(path: str, model: type, params: dict[str, object]) -> Iterator[Problem]:
    """The plugin's own parameter model applied to the recipe's `params`, as problems under `path`."""
    from ..load import problems_from_validation

    yield from non_finite(path, params)
    try:
        model.model_validate(params)  # type: ignore[attr-defined]
    except ValidationError as exc:
        for p in problems_from_validation(exc, model, params):
            yield Problem(f"{path}.{p.path}" if p.path else path, p.message, p.fix)
    except Exception as exc:  # a third-party validator that raises something other than ValueError
        yield Problem(path, f"the plugin's parameter check failed: {type(exc).__name__}: {exc}", "fix the parameters")


def non_finite(path: str, value: object) -> Iterator[Problem]:
    """NaN and infinity have no place in plan.json (strict JSON readers reject them)."""
    if isinstance(value, float) and not math.isfinite(value):
        yield Problem(path, f"={value} is not a finite number", "use a finite value")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from non_finite(f"{path}.{k}", v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from non_finite(f"{path}[{i}]", v)


def packing_rules(where: str, stage: Any, ctx: Any) -> Iterator[Problem]:
    """Packing (`batching: packed`: SFT, reward model, DPO, the RL stage's updates) runs where the attention can
    keep each row's sequences apart: THD inputs (PackedSeqParams), which Transformer Engine's attention and the
    local layer spec's varlen attention (engine.worker.attention) read; on one pipeline stage
    (packed micro-batches have rows of their own number and length, which pipeline sends do not) and without
    context parallelism."""
    if stage.batching != "packed":
        return
    par, at = stage.parallelism, f"{where}.batching"
    other = "padded" if stage.kind == "ppo" else "bucketed"
    if par.pp > 1:
        yield Problem(at, f"=packed with parallelism.pp={par.pp}: packed micro-batches vary in shape, which "
                      "pipeline sends do not", f"use batching: {other}, or pp: 1")  # fmt: skip
    if par.cp > 1:
        yield Problem(at, f"=packed with parallelism.cp={par.cp}: packed sequences are not split across "
                      "context-parallel ranks", f"use batching: {other}, or cp: 1")  # fmt: skip
