"""The recipe's typed models (pydantic v2). Importing this package imports no torch.

Installed as `engine.schema`; the generated recipe.schema.json beside it gives editors autocompletion.
"""

from .base import Spec
from .cluster import FP8_RECIPES_BY_GPU, LOCAL, ClusterProfile
from .data import (
    CleaningSpec,
    DedupSpec,
    FileTokenizer,
    HfTokenizer,
    RecordKind,
    SourceSpec,
    SplitSpec,
    TokenizerSpec,
    TrainTokenizer,
)
from .model import PRESETS, ModelSpec
from .recipe import Recipe
from .stages import (
    DataStage,
    DpoStage,
    PpoSpec,
    PpoStage,
    PretrainStage,
    RewardModelStage,
    RewardSpec,
    RolloutSpec,
    SftStage,
    Stage,
    TrainingStage,
)
from .training import Checkpointing, Parallelism, Precision, Resources, Training

__all__ = [
    "FP8_RECIPES_BY_GPU",
    "LOCAL",
    "PRESETS",
    "Checkpointing",
    "CleaningSpec",
    "ClusterProfile",
    "DataStage",
    "DedupSpec",
    "DpoStage",
    "FileTokenizer",
    "HfTokenizer",
    "ModelSpec",
    "Parallelism",
    "PpoSpec",
    "PpoStage",
    "Precision",
    "PretrainStage",
    "Recipe",
    "RecordKind",
    "Resources",
    "RewardModelStage",
    "RewardSpec",
    "RolloutSpec",
    "SftStage",
    "SourceSpec",
    "Spec",
    "SplitSpec",
    "Stage",
    "TokenizerSpec",
    "TrainTokenizer",
    "Training",
    "TrainingStage",
]
