"""Derived values: the cluster profile, the tokenizer's vocabulary, the full model, each job's layout.

Each function returns its result together with the problems it found, so that the validator can
report everything wrong with a recipe at once instead of stopping at the first missing piece.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import Problem
from ..schema import LOCAL, PRESETS, ClusterProfile, HfTokenizer, ModelSpec, Recipe, TrainingStage, TrainTokenizer
from ..schema.model import SIZE_FIELDS

CLUSTERS_DIR = Path(__file__).resolve().parents[2] / "slurm" / "clusters"


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ResolvedModel(Frozen):
    """Every architecture value the worker needs, with derived ones filled in."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    ffn_hidden_size: int
    seq_length: int
    position_embedding: str
    rotary_base: float
    normalization: str
    activation: str
    tie_embeddings: bool
    add_bias_linear: bool
    qkv_bias: bool = False
    qk_layernorm: bool = False
    rope_scaling_factor: float | None = None
    norm_epsilon: float
    init_method_std: float
    vocab_size: int = Field(description="the tokenizer's vocabulary size")
    padded_vocab_size: int = Field(description="vocab_size padded to make_vocab_size_divisible_by")


def recorded_architecture(recorded: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's meta.json architecture with the defaults of fields added since it was written (a
    checkpoint without `qkv_bias` has none): what to compare a recipe's resolved model with."""
    defaults = {k: f.default for k, f in ResolvedModel.model_fields.items() if not f.is_required()}
    return {**defaults, **recorded}


class Layout(Frozen):
    """A training job's parallel layout; dp is derived."""

    world_size: int
    tp: int
    pp: int
    vpp: int
    cp: int
    dp: int
    sequence_parallel: bool
    distributed_optimizer: bool
    embedding_in_pipeline_split: bool
    loss_in_pipeline_split: bool

    def stage_layers(self, num_layers: int) -> tuple[int, int]:
        """Transformer layers on the first and on the last pipeline stage."""
        emb, loss = int(self.embedding_in_pipeline_split), int(self.loss_in_pipeline_split)
        per_stage = (num_layers + emb + loss) // self.pp
        if self.pp == 1:
            return num_layers, num_layers
        return per_stage - emb, per_stage - loss


class ResolvedPrecision(Frozen):
    dtype: str
    fp8_recipe: str | None
    fp8_param_gather: bool


def resolve_cluster(name: str) -> tuple[ClusterProfile | None, list[Problem]]:
    """`local`, a profile name under slurm/clusters/, or a path to a profile YAML."""
    if name == "local":
        return LOCAL, []
    is_path = name.endswith((".yaml", ".yml")) or "/" in name
    path = Path(name) if is_path else CLUSTERS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CLUSTERS_DIR.glob("*.yaml")) if CLUSTERS_DIR.is_dir() else []
        fix = "profiles: " + ", ".join(["local", *known]) + "; or give a path to a profile YAML"
        return None, [Problem("cluster", f"cluster profile {name!r} not found (looked for {path})", fix)]
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return ClusterProfile.model_validate(data), []
    except (yaml.YAMLError, OSError, UnicodeDecodeError, RecursionError) as exc:
        why = " ".join(str(exc).split())[:300] or type(exc).__name__
        return None, [Problem("cluster", f"cannot read the profile {path}: {why}", "fix the profile's YAML")]
    except ValidationError as exc:
        from ..load import problems_from_validation

        return None, [
            Problem(f"cluster({path.name}).{p.path}", p.message, p.fix)
            for p in problems_from_validation(exc, ClusterProfile, data)
        ]


def resolve_vocab(recipe: Recipe) -> tuple[int | None, list[Problem]]:
    tok = recipe.tokenizer
    if isinstance(tok, TrainTokenizer):
        return tok.vocab_size, []
    if tok.vocab_size is not None:
        return tok.vocab_size, []  # checked against the file when the data stage loads it
    path = Path(tok.file)
    if not path.is_file():
        what = f"{tok.path!r} has no tokenizer.json" if isinstance(tok, HfTokenizer) else f"{tok.path!r} not found"
        give = "a HF tokenizer folder" if isinstance(tok, HfTokenizer) else "an existing tokenizer.json"
        return None, [Problem("tokenizer.path", what, f"give {give} or set tokenizer.vocab_size")]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        vocab = data["model"]["vocab"]
        ids = [*vocab.values(), *(t["id"] for t in data.get("added_tokens", []))]
        bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or i < 0]
        if not ids or bad:
            what = f"token id {bad[0]!r} is not a non-negative integer" if bad else "it has no tokens"
            return None, [Problem("tokenizer.path", f"{tok.file!r} is not a usable tokenizer.json: {what}",
                                  "give an HF tokenizer.json")]  # fmt: skip
        if max(ids) + 1 > 10_000_000:
            return None, [Problem("tokenizer.path", f"{tok.file!r} has token ids up to {max(ids)}",
                                  "use a vocabulary of at most 10,000,000 tokens")]  # fmt: skip
        return max(ids) + 1, []
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        return None, [
            Problem("tokenizer.path", f"cannot read the vocabulary of {tok.file!r}: {exc}", "give an HF tokenizer.json")
        ]


def resolve_model(spec: ModelSpec, vocab_size: int | None) -> tuple[ResolvedModel | None, list[Problem]]:
    """Preset values under explicit ones, then Llama defaults and derived sizes."""
    problems: list[Problem] = []
    base: dict[str, Any] = {}
    if spec.preset is not None:
        if spec.preset not in PRESETS:
            from ..errors import did_you_mean

            return None, [
                Problem("model.preset", f"unknown preset {spec.preset!r}", did_you_mean(spec.preset, PRESETS))
            ]
        base = dict(PRESETS[spec.preset])
    given = {k: v for k, v in spec.model_dump().items() if v is not None and k != "preset"}
    merged: dict[str, Any] = {**base, **given}
    for name in SIZE_FIELDS:
        if name not in merged:
            problems.append(
                Problem(
                    f"model.{name}", "is required when no preset sets it", f"set it, or a preset: {sorted(PRESETS)}"
                )
            )
    if problems or vocab_size is None:
        return None, problems
    h, heads = int(merged["hidden_size"]), int(merged["num_attention_heads"])
    activation = str(merged.get("activation", "swiglu"))
    ffn = merged.get("ffn_hidden_size") or (4 * h if activation == "gelu" else 256 * math.ceil(8 * h / 3 / 256))
    divisor = spec.make_vocab_size_divisible_by
    model = ResolvedModel(
        num_layers=int(merged["num_layers"]),
        hidden_size=h,
        num_attention_heads=heads,
        num_query_groups=int(merged.get("num_query_groups") or heads),
        kv_channels=spec.kv_channels or max(1, h // heads),
        ffn_hidden_size=int(ffn),
        seq_length=int(merged["seq_length"]),
        position_embedding=str(merged.get("position_embedding", "rope")),
        rotary_base=float(merged.get("rotary_base", 10000.0)),
        normalization=str(merged.get("normalization", "rmsnorm")),
        activation=activation,
        tie_embeddings=bool(merged.get("tie_embeddings", False)),
        add_bias_linear=spec.add_bias_linear,
        qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_layernorm,
        rope_scaling_factor=spec.rope_scaling_factor,
        norm_epsilon=spec.norm_epsilon,
        init_method_std=spec.init_method_std,
        vocab_size=vocab_size,
        padded_vocab_size=spec.vocab_rows or divisor * math.ceil(vocab_size / divisor),
    )
    if model.padded_vocab_size < vocab_size:
        fix = "remove model.vocab_rows, or set it to at least the tokenizer's vocabulary"
        return None, [Problem("model.vocab_rows", f"={spec.vocab_rows} is less than the tokenizer's {vocab_size} tokens", fix)]
    return model, []


def gpus_per_node(stage: TrainingStage, cluster: ClusterProfile) -> int:
    return stage.resources.gpus_per_node or cluster.gpus_per_node


def resolve_layout(stage: TrainingStage, cluster: ClusterProfile) -> Layout:
    """The layout of a stage that passed validation (world size divisible by tp·pp·cp)."""
    p = stage.parallelism
    world = stage.resources.nodes * gpus_per_node(stage, cluster)
    dist_opt = p.distributed_optimizer if p.distributed_optimizer is not None else cluster.device == "cuda"
    return Layout(
        world_size=world,
        tp=p.tp,
        pp=p.pp,
        vpp=p.vpp or 1,
        cp=p.cp,
        dp=max(1, world // (p.tp * p.pp * p.cp)),
        sequence_parallel=p.sequence_parallel,
        distributed_optimizer=dist_opt,
        embedding_in_pipeline_split=p.account_for_embedding_in_pipeline_split,
        loss_in_pipeline_split=p.account_for_loss_in_pipeline_split,
    )


def resolve_precision(stage: TrainingStage, cluster: ClusterProfile) -> ResolvedPrecision:
    p = stage.precision
    dtype = p.dtype if p.dtype != "auto" else ("bf16" if cluster.device == "cuda" else "fp32")
    recipe = (p.fp8_recipe or "delayed") if dtype == "fp8" else None
    return ResolvedPrecision(dtype=dtype, fp8_recipe=recipe, fp8_param_gather=p.fp8_param_gather)


def resolve_steps(stage: TrainingStage, model: ResolvedModel) -> int:
    t = stage.training
    if t.steps is not None:
        return t.steps
    # Validation guarantees that exactly one of steps and tokens is set.
    return math.ceil((t.tokens or 0) / (t.global_batch_size * model.seq_length))
