"""What a stage kind declares: the types of the registry in engine.kinds. Imports no torch.

A `StageKind` is everything the engine knows about one kind of stage, outside its recipe model (in
schema/stages.py) and its worker (in engine/worker/stages/): which fields name other stages and what
those may be, which records it reads from a data stage, its cross-field rules, what its job computes
and holds in memory (for the estimate), what it produces, how a next round treats it, and which
held-out metrics and charts the end-of-run table, the report and the lineage records show.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from ..errors import Problem
from ..schema.base import Spec
from ..schema.data import RecordKind

if TYPE_CHECKING:
    from ..schema import ClusterProfile, Recipe

S = TypeVar("S", bound=Spec)

# What a finished stage leaves for later stages: a dataset, a language-model policy (sampled by chat and
# the feedback app, started from by SFT and PPO) or a reward model (a scalar head on the backbone).
Produces = Literal["data", "policy", "reward_model"]


@dataclass(frozen=True)
class Reference:
    """A field of the stage that names an earlier stage."""

    field: str
    kinds: tuple[str, ...]  # the kinds the named stage may have
    records: RecordKind | None = None  # a data stage's: the record kind this stage reads from it
    checkpoint_ok: bool = False  # may name a checkpoint directory instead (a path: contains '/' or starts with '.')


@dataclass(frozen=True)
class HeldOut:
    """A held-out metric of the stage's metrics.jsonl, shown by the report (`label`), the end-of-run table and
    the lineage records (`summary`, when set)."""

    key: str
    label: str
    summary: str | None = None
    transform: Callable[[float], float] | None = None
    change: bool = True  # the end-of-run table shows first → last; False: the last value only
    digits: int = 3

    def value(self, raw: float) -> float:
        return self.transform(raw) if self.transform else raw


@dataclass(frozen=True)
class Chart:
    """A line chart of the report: title, y-axis label and the metric keys drawn."""

    title: str
    y_label: str
    keys: tuple[str, ...]


LOSS = Chart("loss", "loss", ("loss", "val_loss"))
LR = Chart("learning rate", "lr", ("lr",))


def perplexity(val_loss: float) -> float:
    return math.exp(min(val_loss, 700.0))  # exp overflows a float past ~709


@dataclass(frozen=True)
class NextRound:
    """What `engine run --continue-from RUN` does with a stage of this kind.

    `skip`: the stage is not run again (pretraining). `start_from`: the stage's `init_from` becomes the
    earlier run's final artifact of that kind (its last finished policy, or reward model).
    """

    skip: bool = False
    start_from: Literal["policy", "reward_model"] | None = None


@dataclass(frozen=True)
class Workload:
    """What one step of a training job computes and holds, for the estimate (engine.compile.estimate).

    A step trains `samples` sequences of `seq_length` tokens `passes` times (forward + backward each)
    and runs `forward_passes` forward-only passes over them (a third of a training pass each);
    `trained_models` models hold gradients and optimizer states, `frozen_models` hold weights only,
    and `kv_cache_rows` rows are generated together (rollouts) with a KV cache of `seq_length`; with them the
    job runs in phases (rollout, scoring: forward passes of `scoring_rows` rows, or `kv_cache_rows`; training),
    and `offloaded_*` of the models sit in host memory outside the phases that use them.
    """

    seq_length: int
    samples: int
    passes: float = 1.0
    forward_passes: float = 0.0
    trained_models: int = 1
    frozen_models: int = 0
    kv_cache_rows: int = 0
    scoring_rows: int = 0
    offloaded_trained_models: int = 0
    offloaded_frozen_models: int = 0


@dataclass(frozen=True)
class RuleContext:
    """What a kind's rules may look at besides the stage: the whole recipe, and the cluster and the model's
    sequence length when they resolved (None otherwise: the rules that need them are skipped)."""

    recipe: Recipe
    cluster: ClusterProfile | None
    seq_length: int | None


Rules = Callable[[str, Any, RuleContext], Iterator[Problem]]


def no_rules(where: str, stage: Any, ctx: RuleContext) -> Iterator[Problem]:
    return iter(())


@dataclass(frozen=True)
class StageKind(Generic[S]):
    """One kind of stage, declared once; every list of kinds in the engine is derived from these."""

    name: str
    model: type[S]
    produces: Produces
    worker: str  # the module with `run(ctx, spec)`, imported by the worker only
    references: tuple[Reference, ...] = ()
    rules: Callable[[str, S, RuleContext], Iterator[Problem]] = no_rules
    # What a job computes and holds, from the stage and the model's sequence length; None: no training job.
    workload: Callable[[S, int], Workload] | None = None
    next_round: NextRound = field(default_factory=NextRound)
    held_out: tuple[HeldOut, ...] = ()
    charts: tuple[Chart, ...] = (LOSS, LR)

    @property
    def trains(self) -> bool:
        """Whether its jobs train a model (a parallel layout, precision and an estimate)."""
        return self.workload is not None

    @property
    def data_reference(self) -> Reference | None:
        """The reference to the data stage this kind reads records from."""
        return next((r for r in self.references if r.records is not None), None)
