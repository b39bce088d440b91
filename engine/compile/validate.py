"""Every cross-field rule of a recipe, collected into one list of problems.

Rules never stop at the first failure and never change the recipe: each returns the problems it found,
with the dotted path, the values involved and a fix. pydantic has already checked types and ranges;
what is here needs more than one field: parallel layouts against the model and the cluster, batch
arithmetic, precision against the hardware, references between stages, plugin parameters.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import Problem, did_you_mean
from ..kinds import KINDS, RuleContext, checkpoint_fields
from ..kinds.base import Reference
from ..schema import ClusterProfile, DataStage, HfTokenizer, Recipe, TrainingStage, TrainTokenizer
from ..schema.stages import is_checkpoint_path
from .resolve import ResolvedModel, gpus_per_node, recorded_architecture

# A byte-level BPE starts from the 256 byte symbols; the chat template adds its special tokens.
MIN_BPE_VOCAB = 256 + 16


def validate(recipe: Recipe, cluster: ClusterProfile | None, model: ResolvedModel | None) -> list[Problem]:
    """All problems of a recipe. Rules needing the cluster or the model run only when those resolved."""
    problems = list(_tokenizer(recipe))
    problems += _references(recipe)
    problems += _checkpoint_paths(recipe, model, cluster)
    if model is not None:
        problems += _model(model)
    ctx = RuleContext(recipe=recipe, cluster=cluster, seq_length=model.seq_length if model is not None else None)
    for name, stage in recipe.stages.items():
        where = f"stages.{name}"
        if isinstance(stage, TrainingStage):
            problems += _training(where, stage)
            if cluster is not None:
                problems += _hardware(where, stage, cluster)
            if model is not None:
                problems += _layout(where, stage, model, cluster)
        problems += KINDS[stage.kind].rules(where, stage, ctx)
    return problems


def _tokenizer(recipe: Recipe) -> Iterator[Problem]:
    tok = recipe.tokenizer
    if isinstance(tok, TrainTokenizer):
        if tok.vocab_size < MIN_BPE_VOCAB:
            yield Problem(
                "tokenizer.vocab_size",
                f"={tok.vocab_size} is too small for a byte-level BPE (256 byte symbols + special tokens)",
                f"use at least {MIN_BPE_VOCAB}",
            )
        if not any(isinstance(s, DataStage) for s in recipe.stages.values()):
            yield Problem(
                "tokenizer.kind", "=train needs a data stage to train on", "add a data stage or use kind: file"
            )
    if isinstance(tok, HfTokenizer) and Path(tok.path).is_dir():
        from ..chat_hf import template_source
        from ..errors import EngineError

        try:
            source = template_source(Path(tok.path))
        except EngineError as exc:
            yield Problem("tokenizer.path", str(exc), "fix the file, or point at another tokenizer folder")
            return
        if source is None:
            yield Problem(
                "tokenizer.path",
                f"{tok.path!r} has no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja)",
                "use a chat model's tokenizer folder, or kind: file for the engine's own template",
            )


# ---- references between stages ---------------------------------------------------------------
def _references(recipe: Recipe) -> Iterator[Problem]:
    names = list(recipe.stages)
    for index, (name, stage) in enumerate(recipe.stages.items()):
        earlier = {n: recipe.stages[n].kind for n in names[:index]}
        for ref in KINDS[stage.kind].references:
            value = getattr(stage, ref.field)
            if value is None or (ref.checkpoint_ok and is_checkpoint_path(value)):
                continue  # a checkpoint directory: _checkpoint_paths
            yield from _reference(f"stages.{name}.{ref.field}", value, ref.kinds, earlier, names)
        for ref in KINDS[stage.kind].references:
            if ref.records is not None:
                yield from _records_available(recipe, f"stages.{name}", getattr(stage, ref.field), ref)


def _reference(
    path: str, value: str, kinds: Sequence[str], earlier: Mapping[str, str], names: list[str]
) -> Iterator[Problem]:
    fitting = [n for n, k in earlier.items() if k in kinds]
    hint = (
        ("earlier stages that fit: " + ", ".join(fitting)) if fitting else f"add a {' or '.join(kinds)} stage before it"
    )
    if value not in names and is_checkpoint_path(value):
        yield Problem(path, f"={value!r} is a path, which only {_path_fields()} accept", hint)
    elif value not in names:
        yield Problem(path, f"={value!r} names no stage", did_you_mean(value, fitting) if fitting else hint)
    elif value not in earlier:
        yield Problem(path, f"={value!r} is not an earlier stage (stages run in recipe order)", hint)
    elif earlier[value] not in kinds:
        yield Problem(path, f"={value!r} is a {earlier[value]} stage; it must be {' or '.join(kinds)}", hint)


def _path_fields() -> str:
    """Which fields take a checkpoint directory, in words: "the init_from of pretrain and sft stages and a
    ppo stage's policy"."""

    def kinds(names: Sequence[str]) -> str:
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]

    parts = [
        f"a {names[0]} stage's {field}" if len(names) == 1 else f"the {field} of {kinds(names)} stages"
        for field, names in checkpoint_fields().items()
    ]
    return kinds(parts)


CHECKPOINT_FIX = (
    "give a checkpoint directory (relative paths: from the working directory): "
    "the output of `engine import`, or <run>/<stage>/checkpoints/step_N"
)


def _checkpoint_paths(recipe: Recipe, model: ResolvedModel | None, cluster: ClusterProfile | None) -> Iterator[Problem]:
    """A checkpoint path (an init_from, a PPO policy) must be a checkpoint whose architecture and tokenizer
    fit this recipe. On a Slurm cluster a path this machine does not see is the cluster's (a shared file
    system the login node may not mount), as a tokenizer path with its vocab_size is: the job checks the
    same contract when it starts from it."""
    remote = cluster is not None and cluster.launcher == "slurm"
    for name, stage in recipe.stages.items():
        for ref in KINDS[stage.kind].references:
            value = getattr(stage, ref.field) if ref.checkpoint_ok else None
            if isinstance(value, str) and is_checkpoint_path(value):
                if remote and not Path(value).exists():
                    continue
                yield from _checkpoint_path(recipe, f"stages.{name}.{ref.field}", value, model)


def _checkpoint_path(recipe: Recipe, path: str, value: str, model: ResolvedModel | None) -> Iterator[Problem]:
    meta_path = Path(value) / "meta.json"
    try:
        meta: Any = json.loads(meta_path.read_text(encoding="utf-8"))
        theirs, tok = recorded_architecture(dict(meta["architecture"])), dict(meta["tokenizer"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        why = "it has no meta.json" if Path(value).is_dir() else "no such directory"
        why = f"cannot read its meta.json ({type(exc).__name__}: {exc})" if meta_path.is_file() else why
        yield Problem(path, f"={value!r} is not a checkpoint directory: {why}", CHECKPOINT_FIX)
        return
    ours = model.model_dump(mode="json") if model is not None else {}
    if diff := ", ".join(f"{k}: {theirs.get(k)} vs {v}" for k, v in ours.items() if theirs.get(k) != v):
        yield Problem(
            path,
            f"={value!r} has another architecture than model (checkpoint vs recipe: {diff})",
            "set model.* to the checkpoint's values (its meta.json 'architecture'), or start from another checkpoint",
        )
    file = Path(recipe.tokenizer.file) if not isinstance(recipe.tokenizer, TrainTokenizer) else None
    if file and file.is_file() and (sha := hashlib.sha256(file.read_bytes()).hexdigest()) != tok.get("sha256"):
        yield Problem(
            path,
            f"={value!r} was trained with tokenizer {tok.get('sha256')}, tokenizer.path={str(file)!r} is {sha}",
            f"set tokenizer.path to the checkpoint's tokenizer ({tok.get('path')}; its folder for kind: hf)",
        )


def _records_available(recipe: Recipe, where: str, data_stage: str, ref: Reference) -> Iterator[Problem]:
    """The data stage a reference names must have a source of the records the stage reads."""
    target = recipe.stages.get(data_stage)
    if not isinstance(target, DataStage):
        return
    if not any(s.records == ref.records for s in target.sources):
        yield Problem(
            f"{where}.{ref.field}",
            f"data stage {data_stage!r} has no source with records: {ref.records}",
            f"add a source with `records: {ref.records}` to it",
        )


# ---- training stages -------------------------------------------------------------------------
def _training(where: str, stage: TrainingStage) -> Iterator[Problem]:
    t = stage.training
    if (t.steps is None) == (t.tokens is None):
        yield Problem(
            f"{where}.training", "set exactly one of steps and tokens", f"got steps={t.steps}, tokens={t.tokens}"
        )
    if t.min_lr > t.lr:
        yield Problem(f"{where}.training.min_lr", f"={t.min_lr} exceeds lr={t.lr}", f"use min_lr ≤ {t.lr}")
    if t.steps is not None and t.warmup_steps >= t.steps and t.warmup_steps > 0:
        yield Problem(
            f"{where}.training.warmup_steps", f"={t.warmup_steps} is not below steps={t.steps}", "shorten the warmup"
        )
    p = stage.precision
    if p.fp8_recipe is not None and p.dtype != "fp8":
        yield Problem(
            f"{where}.precision.fp8_recipe",
            f"={p.fp8_recipe} but dtype={p.dtype}",
            "set precision.dtype=fp8 or remove it",
        )
    if p.fp8_param_gather and p.dtype != "fp8":
        yield Problem(
            f"{where}.precision.fp8_param_gather", f"needs dtype=fp8 (got {p.dtype})", "set precision.dtype=fp8"
        )
    if p.fp8_param_gather and stage.parallelism.distributed_optimizer is False:
        yield Problem(
            f"{where}.precision.fp8_param_gather",
            "=true gathers FP8 weights through the distributed optimizer, which parallelism.distributed_optimizer=false turns off",
            "turn the distributed optimizer on (the default on GPUs) or fp8_param_gather off",
        )


def _hardware(where: str, stage: TrainingStage, cluster: ClusterProfile) -> Iterator[Problem]:
    par, prec, res = stage.parallelism, stage.precision, stage.resources
    if cluster.device == "cpu":
        why = f"cluster {cluster.name!r} trains on CPU"
        if prec.dtype not in ("auto", "fp32"):
            yield Problem(f"{where}.precision.dtype", f"={prec.dtype}: {why}, in fp32 only", "set it to fp32 (or auto)")
        if par.distributed_optimizer:
            yield Problem(
                f"{where}.parallelism.distributed_optimizer",
                f"=true: {why}, where Megatron-Core's distributed optimizer cannot run",
                "set it to false",
            )
        if par.sequence_parallel:
            yield Problem(
                f"{where}.parallelism.sequence_parallel",
                f"=true: {why}, where sequence parallelism cannot run",
                "set it to false",
            )
        if par.cp > 1:
            yield Problem(
                f"{where}.parallelism.cp",
                f"={par.cp}: context parallelism needs Transformer Engine attention on GPUs",
                "set cp=1",
            )
    else:
        gpn = gpus_per_node(stage, cluster)
        if gpn > cluster.gpus_per_node:
            yield Problem(
                f"{where}.resources.gpus_per_node",
                f"={gpn} exceeds the {cluster.gpus_per_node} GPUs of a {cluster.name} node",
                f"use ≤ {cluster.gpus_per_node}",
            )
        if par.tp > gpn:
            yield Problem(
                f"{where}.parallelism.tp",
                f"={par.tp} spans more than one node ({gpn} GPUs per node)",
                f"use tp ≤ {gpn}; tensor parallelism needs NVLink",
            )
        if prec.dtype == "fp8":
            recipe = prec.fp8_recipe or "delayed"
            supported = cluster.fp8_recipes()
            if recipe not in supported:
                have = f"supports {', '.join(sorted(supported))}" if supported else "has no FP8"
                yield Problem(
                    f"{where}.precision",
                    f"fp8 recipe {recipe!r} is not supported by {cluster.gpu} (cluster {cluster.name!r} {have})",
                    "use bf16, or a supported recipe on H100/H200 (mxfp8: B200)",
                )
    if cluster.max_nodes is not None and res.nodes > cluster.max_nodes:
        yield Problem(
            f"{where}.resources.nodes",
            f"={res.nodes} exceeds cluster {cluster.name!r}'s max_nodes={cluster.max_nodes}",
            f"use ≤ {cluster.max_nodes}",
        )


def _divisors(n: int, limit: int = 128) -> list[int]:
    """Divisors of n up to limit: the values worth suggesting."""
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def _model(m: ResolvedModel) -> Iterator[Problem]:
    if m.hidden_size % m.num_attention_heads and m.kv_channels == m.hidden_size // m.num_attention_heads:
        yield Problem(
            "model.hidden_size",
            f"={m.hidden_size} is not divisible by num_attention_heads={m.num_attention_heads}",
            "make heads divide hidden, or set model.kv_channels (the channels per head)",
        )
    if m.num_attention_heads % m.num_query_groups:
        yield Problem(
            "model.num_query_groups",
            f"={m.num_query_groups} does not divide num_attention_heads={m.num_attention_heads}",
            "try " + ", ".join(map(str, _divisors(m.num_attention_heads))),
        )


def _layout(where: str, stage: TrainingStage, m: ResolvedModel, cluster: ClusterProfile | None) -> Iterator[Problem]:
    par, t = stage.parallelism, stage.training
    pw = f"{where}.parallelism"
    if m.num_attention_heads % par.tp or m.num_query_groups % par.tp:
        ok = _divisors(math.gcd(m.num_attention_heads, m.num_query_groups), 64)
        yield Problem(
            f"{pw}.tp",
            f"={par.tp} must divide model.num_attention_heads={m.num_attention_heads} and model.num_query_groups={m.num_query_groups}",
            "try " + ", ".join(map(str, ok)),
        )
    if m.padded_vocab_size % par.tp:
        yield Problem(
            f"{pw}.tp",
            f"={par.tp} does not divide the padded vocabulary {m.padded_vocab_size}",
            f"set model.make_vocab_size_divisible_by to a multiple of {par.tp}",
        )
    vpp = par.vpp or 1
    if par.vpp is not None and par.vpp > 1 and par.pp == 1:
        yield Problem(f"{pw}.vpp", f"={par.vpp} needs pipeline parallelism (pp=1)", "set pp>1 or remove vpp")
    extra = int(par.account_for_embedding_in_pipeline_split) + int(par.account_for_loss_in_pipeline_split)
    split = m.num_layers + extra
    if split % (par.pp * vpp):
        ok_split = ", ".join(map(str, _divisors(split, 128)))
        counted = f"model.num_layers={m.num_layers}" + (f" (+{extra} for embedding/loss = {split})" if extra else "")
        uneven = [n for n in (1, 2) if (m.num_layers + n) % (par.pp * vpp) == 0 and extra < n]
        hint = f"pp×vpp ∈ {ok_split}" + (
            "; or count embedding and loss as layers with account_for_*_in_pipeline_split" if uneven else ""
        )
        yield Problem(f"{pw}.pp", f"pp×vpp = {par.pp}×{vpp} must divide {counted}", hint)
    if par.cp > 1 and m.seq_length % (2 * par.cp):
        yield Problem(
            f"{pw}.cp",
            f"={par.cp}: model.seq_length={m.seq_length} must be divisible by 2×cp={2 * par.cp}",
            "change cp or seq_length",
        )
    if par.sequence_parallel and par.tp == 1:
        yield Problem(f"{pw}.sequence_parallel", "=true needs tp>1", "set tp>1 or sequence_parallel=false")
    if stage.precision.dtype == "fp8" and (m.hidden_size % 16 or m.ffn_hidden_size % 16):
        yield Problem(
            f"{where}.precision.dtype",
            f"=fp8 needs hidden_size and ffn_hidden_size divisible by 16 (got {m.hidden_size}, {m.ffn_hidden_size})",
            "change the sizes or use bf16",
        )
    if cluster is None:
        return
    gpn = gpus_per_node(stage, cluster)
    world = stage.resources.nodes * gpn
    mp = par.tp * par.pp * par.cp
    if world % mp:
        yield Problem(
            f"{where}.resources",
            f"nodes×gpus_per_node = {stage.resources.nodes}×{gpn} = {world} is not divisible by tp×pp×cp = {mp}",
            f"use a multiple of {mp} GPUs, or change tp/pp/cp",
        )
        return
    dp = world // mp
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        lo = max(per_step, t.global_batch_size // per_step * per_step)
        yield Problem(
            f"{where}.training.global_batch_size",
            f"={t.global_batch_size} is not divisible by micro_batch_size×dp = {t.micro_batch_size}×{dp}",
            f"try {lo} or {lo + per_step}",
        )
    elif vpp > 1 and (t.global_batch_size // per_step) % par.pp:
        yield Problem(
            f"{where}.training.global_batch_size",
            f"gives {t.global_batch_size // per_step} microbatches; the interleaved schedule needs a multiple of pp={par.pp}",
            f"use a multiple of {per_step * par.pp}",
        )
