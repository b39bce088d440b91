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


def run_model(model: Any, batch: Batch, *, labels: bool = False) -> torch.Tensor:
    """The model's output for a micro-batch: per-token losses with `labels`, else logits or scalars per position.

    Packed rows carry THD boundaries (`cu_seqlens`, `max_seqlen`: engine.worker.packing.Packing): the rows are
    laid end to end as one sequence [1, rows·width] whose boundaries Megatron-Core's PackedSeqParams hand to
    the attention (Transformer Engine's on GPUs, engine.worker.attention on the local spec: each sequence
    attends causally within itself, rotary positions restart), and the output comes back in rows.
    """
    extra = {"labels": batch["labels"]} if labels else {}
    if "cu_seqlens" not in batch:
        out: torch.Tensor = model(batch["tokens"], batch["position_ids"], None, **extra)  # causal attention
        return out
    from megatron.core.packed_seq_params import PackedSeqParams

    rows, width = batch["tokens"].shape
    cu, longest = batch["cu_seqlens"].to(torch.int32), int(batch["max_seqlen"])
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                             max_seqlen_kv=longest)  # fmt: skip
    flat = {k: v.reshape(1, rows * width) for k, v in extra.items()}
    flat_out: torch.Tensor = model(batch["tokens"].reshape(1, rows * width), batch["position_ids"].reshape(1, rows * width),
                                   None, packed_seq_params=params, **flat)  # fmt: skip
    return flat_out.reshape(rows, width, *flat_out.shape[2:])


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
        # Packed rows keep their sequences apart (run_model); others attend causally (Megatron's default).
        output = run_model(model, batch, labels=True)

        def loss_func(per_token: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            mask = batch["loss_mask"].float()
            nll = (per_token.float() * mask).sum()
            # A step packed across its micro-batches weighs each token as its unpacked micro-batch did.
            scale = batch.get("loss_scale")
            loss = nll / mask.sum().clamp(min=1.0) if scale is None else (per_token.float() * scale).sum()
            return loss, {"loss": loss.detach().clone(), "nll_sum": nll.detach().clone(), "tokens": mask.sum()}

        return output, loss_func

    def summarise(self, values: dict[str, float], prefix: str = "") -> dict[str, float]:
        """The token-weighted loss."""
        return {f"{prefix}loss": values["nll_sum"] / max(values["tokens"], 1e-12)}


def pair_scores(values: torch.Tensor, last: torch.Tensor, row: torch.Tensor | None = None) -> torch.Tensor:
    """The scalar of each sequence at its last real token: values [b, s], last [b] → [b]. Packed rows hold
    several sequences: `row` [n] is each one's row and `last` [n] its last position there."""
    if row is not None:
        return values.float()[row.long(), last.long()]
    return values.float().gather(1, last.long().unsqueeze(1)).squeeze(1)


def weighted_pairs(
    per_pair: torch.Tensor, margin: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
    **sums: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """The loss of a preference objective, the weighted mean of `per_pair` (`weight` zeroes padding pairs;
    with `scale`, a step packed across its micro-batches, the sum of `per_pair` times it), and what it
    reports: the weighted sums of the loss, of the correct pairs (margin > 0), of the margin and of each of
    `sums`, and the pairs counted."""
    w = weight.float()
    loss = (per_pair * w).sum() / w.sum().clamp(min=1.0) if scale is None else (per_pair * scale.float()).sum()
    report = {
        "loss": loss.detach().clone(),
        "loss_sum": (per_pair.detach() * w).sum(),
        "correct_sum": ((margin > 0).float() * w).sum(),
        "margin_sum": (margin.detach() * w).sum(),
        **{k: (v.detach() * w).sum() for k, v in sums.items()},
        "pairs": w.sum(),
    }
    return loss, report


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
        output = run_model(model, batch)

        def loss_func(values: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            scores = pair_scores(values, batch["last"], batch.get("row"))
            chosen, rejected = scores.chunk(2)
            diff = chosen - rejected
            per_pair = -F.logsigmoid(diff - self.margin)
            return weighted_pairs(per_pair, diff, batch["weight"], batch.get("scale"), chosen_sum=chosen,
                                  rejected_sum=rejected)  # fmt: skip

        return output, loss_func

    def summarise(self, values: dict[str, float], prefix: str = "") -> dict[str, float]:
        """Loss, accuracy (how often r_chosen > r_rejected), mean margin and mean scores, per pair."""
        n = max(values["pairs"], 1e-12)
        return {f"{prefix}loss": values["loss_sum"] / n, f"{prefix}accuracy": values["correct_sum"] / n,
                f"{prefix}margin": values["margin_sum"] / n, f"{prefix}chosen_reward": values["chosen_sum"] / n,
                f"{prefix}rejected_reward": values["rejected_sum"] / n}  # fmt: skip


def sequence_logps(
    per_token_nll: torch.Tensor, mask: torch.Tensor, segment: torch.Tensor | None = None, sequences: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability, response tokens) per row from the model's per-token NLL [b, s] and the
    response mask: log π(y | x) = −Σ_t nll_t over the response's positions. Packed rows: per sequence,
    `segment` [b, s] naming each position's sequence (`sequences` for padding)."""
    mask = mask.float()
    if segment is None:
        return -(per_token_nll.float() * mask).sum(1), mask.sum(1)
    index = segment.long().flatten()
    sums = torch.zeros(sequences + 1, device=mask.device).index_add(0, index, (per_token_nll.float() * mask).flatten())
    counts = torch.zeros(sequences + 1, device=mask.device).index_add(0, index, mask.flatten())
    return -sums[:sequences], counts[:sequences]


def _sequence_logps(per_token: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """sequence_logps of a micro-batch of pair rows, packed or not."""
    return sequence_logps(per_token, batch["loss_mask"], batch.get("segment"), 2 * len(batch["weight"]))


def preference_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None,
    *, loss: str, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0,
    chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per pair: (loss, implicit reward margin) of the DPO family from sequence log-probabilities.

    With h = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r)):

        sigmoid  −(1 − ε) log σ(β h) − ε log σ(−β h)          DPO; ε = label_smoothing is cDPO
        ipo      (h − 1/(2β))²                                Azar et al. 2023
        hinge    max(0, 1 − β h)                              SLiC-style
        simpo    −log σ(β (ℓ_c − ℓ_r) − γ)                    ℓ = log π(y) / |y|, no reference (Meng et al. 2024)

    The margin is β h (simpo: β (ℓ_c − ℓ_r)): the implicit rewards' difference; a pair counts as correct
    when it is positive.
    """
    if loss == "simpo":
        assert chosen_tokens is not None and rejected_tokens is not None
        margin = beta * (chosen / chosen_tokens.clamp(min=1.0) - rejected / rejected_tokens.clamp(min=1.0))
        return -F.logsigmoid(margin - gamma), margin
    assert ref_chosen is not None and ref_rejected is not None
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    if loss == "sigmoid":
        per = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss == "ipo":
        per = (h - 1.0 / (2.0 * beta)).pow(2)
    elif loss == "hinge":
        per = torch.relu(1.0 - beta * h)
    else:
        raise ValueError(f"unknown preference loss {loss!r}")
    return per, beta * h


@dataclass(frozen=True)
class ReferenceLogps:
    """A frozen policy's forward step for DPO: the summed log-probability of each row's response."""

    device: str

    def forward_step(self, data: Iterator[Batch], model: Any) -> tuple[torch.Tensor, LossFunc]:
        batch = to_device(next(data), self.device)
        output = run_model(model, batch, labels=True)

        def loss_func(per_token: torch.Tensor, non_loss_data: bool = False) -> Any:
            logp, _ = _sequence_logps(per_token, batch)
            return logp.detach()

        return output, loss_func


@dataclass(frozen=True)
class DirectPreference:
    """The DPO family on (chosen, rejected) pairs, rows as the reward model's (chosen rows, then rejected):
    the policy's summed response log-probabilities against a frozen reference's (`frozen`, delivered as
    batch["reference"]), the loss of `preference_loss`, optionally RPO's NLL on the chosen response.
    `weight` zeroes padding pairs in evaluation."""

    device: str
    loss: str
    beta: float
    label_smoothing: float = 0.0
    gamma: float = 0.0
    rpo_alpha: float | None = None
    keys: tuple[str, ...] = ("loss", "loss_sum", "correct_sum", "margin_sum", "chosen_logp_sum", "rejected_logp_sum",
                             "chosen_nll_sum", "pairs")  # fmt: skip
    head: Head = "lm"
    rows_per_sample: int = 2
    fresh: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    frozen: tuple[FrozenModel, ...] = ()

    def forward_step(self, data: Iterator[Batch], model: Any) -> tuple[torch.Tensor, LossFunc]:
        batch = to_device(next(data), self.device)
        output = run_model(model, batch, labels=True)

        def loss_func(per_token: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            logp, tokens = _sequence_logps(per_token, batch)
            chosen, rejected = logp.chunk(2)
            n_chosen, n_rejected = tokens.chunk(2)
            ref = batch.get("reference")
            ref_chosen, ref_rejected = ref.float().chunk(2) if ref is not None else (None, None)
            per_pair, margin = preference_loss(
                chosen, rejected, ref_chosen, ref_rejected, loss=self.loss, beta=self.beta,
                label_smoothing=self.label_smoothing, gamma=self.gamma, chosen_tokens=n_chosen,
                rejected_tokens=n_rejected,
            )  # fmt: skip
            nll = -chosen / n_chosen.clamp(min=1.0)  # the chosen response's mean NLL per token
            if self.rpo_alpha is not None:
                per_pair = per_pair + self.rpo_alpha * nll
            return weighted_pairs(per_pair, margin, batch["weight"], batch.get("scale"), chosen_logp_sum=chosen,
                                  rejected_logp_sum=rejected, chosen_nll_sum=nll)  # fmt: skip

        return output, loss_func

    def summarise(self, values: dict[str, float], prefix: str = "") -> dict[str, float]:
        """Loss, implicit-reward accuracy and margin, and the chosen and rejected responses' log-probabilities,
        per pair."""
        n = max(values["pairs"], 1e-12)
        return {f"{prefix}loss": values["loss_sum"] / n, f"{prefix}accuracy": values["correct_sum"] / n,
                f"{prefix}margin": values["margin_sum"] / n, f"{prefix}chosen_logp": values["chosen_logp_sum"] / n,
                f"{prefix}rejected_logp": values["rejected_logp_sum"] / n,
                f"{prefix}chosen_nll": values["chosen_nll_sum"] / n}  # fmt: skip
