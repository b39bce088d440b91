"""The stage-kind registry: every kind of stage, declared once.

`KINDS` holds one `StageKind` per kind (engine.kinds.base says what a kind declares), in the order a
recipe usually runs them. Everything that depends on the kind of a stage reads it from here: the
compiler's references, record and path checks, rules and estimates; the launcher's run checks; the
worker's dispatch (a kind names its stage module, imported only by the worker); the end-of-run table,
the report and the lineage records (held-out metrics and charts); chat and the feedback app (which
kinds produce a policy); and the next round (which stages run again, and from what).

Adding a kind: its recipe model in schema/stages.py (and in the `Stage` union), a module here with its
`KIND`, one line in `KINDS`, its stage module under engine/worker/stages/, its docs page and its tests;
docs/contributing.md walks through it. Nothing here imports torch.
"""

from __future__ import annotations

from typing import Any

from ..errors import EngineError
from . import data, dpo, ppo, pretrain, reward_model, sft
from .base import (
    Chart,
    HeldOut,
    NextRound,
    Produces,
    Reference,
    RuleContext,
    StageKind,
    Workload,
)

KINDS: dict[str, StageKind[Any]] = {
    k.name: k for k in (data.KIND, pretrain.KIND, sft.KIND, reward_model.KIND, dpo.KIND, ppo.KIND)
}


def kind_of(name: str) -> StageKind[Any]:
    """The registered kind `name`; an unknown one (a plan from another engine version) is a user error."""
    found = KINDS.get(name)
    if found is None:
        raise EngineError(f"stage kind {name!r} is not known to this engine version; kinds: {', '.join(KINDS)}")
    return found


def producing(what: Produces) -> tuple[str, ...]:
    """The kinds whose stages produce `what` (data, a policy, a reward model)."""
    return tuple(k.name for k in KINDS.values() if k.produces == what)


def either(names: tuple[str, ...] | list[str]) -> str:
    """Names in words: "a", "a or b", "a, b or c"."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def checkpoint_fields() -> dict[str, tuple[str, ...]]:
    """Reference field → the kinds whose field may name a checkpoint directory."""
    fields: dict[str, list[str]] = {}
    for k in KINDS.values():
        for ref in k.references:
            if ref.checkpoint_ok:
                fields.setdefault(ref.field, []).append(k.name)
    return {f: tuple(names) for f, names in fields.items()}


__all__ = [
    "KINDS",
    "Chart",
    "HeldOut",
    "NextRound",
    "Produces",
    "Reference",
    "RuleContext",
    "StageKind",
    "Workload",
    "checkpoint_fields",
    "either",
    "kind_of",
    "producing",
]
