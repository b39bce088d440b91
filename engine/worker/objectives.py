"""Objectives: what a training stage optimises, as one object that the shared training loop runs.

An objective owns:

* its forward step: what the model is fed from a micro-batch and the loss function Megatron's
  schedules call on the last pipeline stage with the model's output;
* its loss reduction: the loss the gradient flows from is a mean over the micro-batch's weighted units
  (assistant or text tokens for language modelling, pairs for preferences). Besides it, the loss
  function reports sums over those units and their count (`keys`), so that averages over micro-batches,
  data-parallel ranks and validation batches of different sizes come out exact (`summarise`);
* its metric keys and the head of the model it trains (vocabulary logits, or a scalar per position);
* the frozen auxiliary models it needs (`frozen`: a reference policy, a reward model). The training loop
  builds each one, loads it from the checkpoint the objective names, keeps it frozen, and before every
  training or validation pass runs its forward step through the same pipeline schedule (forward only);
  the per-row outputs of the last pipeline stage are delivered to every rank and reach the objective's
  forward step as `batch[<name>]` (engine.worker.loop.forward_outputs).

Language modelling (pretraining, SFT): per-token cross-entropy averaged over the loss mask (SFT's
keeps only assistant tokens). Pairwise preference (the reward model): Bradley–Terry loss
−log σ(r_chosen − r_rejected − margin) on the scalar read at each sequence's last real token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

from .comm import to_device

Batch = dict[str, torch.Tensor]
LossFunc = Callable[..., Any]
ForwardStep = Callable[[Iterator[Batch], Any], tuple[torch.Tensor, LossFunc]]
Head = Literal["lm", "scalar"]


@dataclass(frozen=True)
class FrozenModel:
    """A model an objective reads but never trains: built, loaded and kept frozen by the training loop."""

    name: str  # its outputs arrive in every micro-batch as batch[name]
    head: Head
    checkpoint: Path  # checked against the job's contract by the stage before it is named here
    # A forward step whose loss function, called with `non_loss_data=True`, returns one output per row
    # (a [rows] or [rows, seq] tensor): what the objective needs of this model.
    forward_step: ForwardStep


class Objective(Protocol):
    @property
    def keys(self) -> tuple[str, ...]:
        """The values its loss function reports, in the order the loop reduces them."""

    @property
    def head(self) -> Head:
        """The head of the model it trains."""

    @property
    def rows_per_sample(self) -> int:
        """Rows the schedule sees per sample: 2 for preference pairs."""

    @property
    def fresh(self) -> tuple[str, ...]:
        """Parameter prefixes a parent checkpoint cannot provide (a new head)."""

    @property
    def meta(self) -> dict[str, Any]:
        """Extra fields of every checkpoint's meta.json."""

    @property
    def frozen(self) -> tuple[FrozenModel, ...]:
        """The frozen auxiliary models it reads."""

    def forward_step(self, data: Iterator[Batch], model: Any) -> tuple[torch.Tensor, LossFunc]: ...

    def summarise(self, values: dict[str, float], prefix: str = "") -> dict[str, float]: ...


@dataclass(frozen=True)
class LanguageModel:
    """Next-token prediction: the model returns per-token losses; their mean over the loss mask."""

    device: str
    keys: tuple[str, ...] = ("loss", "nll_sum", "tokens")
    head: Head = "lm"
    rows_per_sample: int = 1
    fresh: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    frozen: tuple[FrozenModel, ...] = ()

    def forward_step(self, data: Iterator[Batch], model: Any) -> tuple[torch.Tensor, LossFunc]:
        from megatron.core import parallel_state as ps
        from megatron.core.utils import get_batch_on_this_cp_rank

        batch = to_device(next(data), self.device)
        if ps.get_context_parallel_world_size() > 1:
            # Each context-parallel rank keeps two of 2·cp sequence chunks (load-balanced causal attention).
            batch = get_batch_on_this_cp_rank(batch)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def loss_func(per_token: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            mask = batch["loss_mask"].float()
            nll = (per_token.float() * mask).sum()
            loss = nll / mask.sum().clamp(min=1.0)
            return loss, {"loss": loss.detach().clone(), "nll_sum": nll.detach().clone(), "tokens": mask.sum()}

        return output, loss_func

    def summarise(self, values: dict[str, float], prefix: str = "") -> dict[str, float]:
        """The token-weighted loss."""
        return {f"{prefix}loss": values["nll_sum"] / max(values["tokens"], 1e-12)}


def pair_scores(values: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The scalar of each sequence at its last real token: values [b, s], last [b] → [b]."""
    return values.float().gather(1, last.long().unsqueeze(1)).squeeze(1)


@dataclass(frozen=True)
class PairwisePreference:
    """Bradley–Terry on (chosen, rejected) pairs: a micro-batch holds the chosen sequences, then the rejected
    ones, so the schedule sees 2·mbs rows; `weight` zeroes padding pairs in evaluation."""

    device: str
    margin: float
    keys: tuple[str, ...] = ("loss", "loss_sum", "correct_sum", "margin_sum", "chosen_sum", "rejected_sum", "pairs")
    head: Head = "scalar"
    rows_per_sample: int = 2
    fresh: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    frozen: tuple[FrozenModel, ...] = ()

    def forward_step(self, data: Iterator[Batch], model: Any) -> tuple[torch.Tensor, LossFunc]:
        batch = to_device(next(data), self.device)
        output = model(batch["tokens"], batch["position_ids"], None)

        def loss_func(values: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            scores = pair_scores(values, batch["last"])
            chosen, rejected = scores.chunk(2)
            weight = batch["weight"].float()
            diff = chosen - rejected
            per_pair = -F.logsigmoid(diff - self.margin)
            loss = (per_pair * weight).sum() / weight.sum().clamp(min=1.0)
            report = {
                "loss": loss.detach().clone(),
                "loss_sum": (per_pair.detach() * weight).sum(),
                "correct_sum": ((diff > 0).float() * weight).sum(),
                "margin_sum": (diff.detach() * weight).sum(),
                "chosen_sum": (chosen.detach() * weight).sum(),
                "rejected_sum": (rejected.detach() * weight).sum(),
                "pairs": weight.sum(),
            }
            return loss, report

        return output, loss_func

    def summarise(self, values: dict[str, float], prefix: str = "") -> dict[str, float]:
        """Loss, accuracy (how often r_chosen > r_rejected), mean margin and mean scores, per pair."""
        n = max(values["pairs"], 1e-12)
        return {f"{prefix}loss": values["loss_sum"] / n, f"{prefix}accuracy": values["correct_sum"] / n,
                f"{prefix}margin": values["margin_sum"] / n, f"{prefix}chosen_reward": values["chosen_sum"] / n,
                f"{prefix}rejected_reward": values["rejected_sum"] / n}  # fmt: skip
