"""The recipe: one typed document describing a whole training run."""

from __future__ import annotations

from pydantic import Field

from .base import Name, Spec
from .data import TokenizerSpec
from .model import ModelSpec
from .stages import Stage


class Recipe(Spec):
    """A ChatGPT-style training run: data, model, and the ordered stages that train it."""

    name: Name = Field(description="run name; also the default run directory's name")
    description: str = Field(default="", description="free text shown by `engine plan`")
    run_dir: str | None = Field(
        default=None, description="where artifacts go (default: runs/<name>, relative to the working dir)"
    )
    cluster: str = Field(
        default="local",
        description="`local` (this machine's CPU), a profile name under slurm/clusters/, or a path to a profile YAML",
    )
    allow_env: list[str] = Field(
        default_factory=list,
        description="environment variables the recipe may read with ${env:NAME}; no others are reachable",
    )
    tokenizer: TokenizerSpec = Field(description="the tokenizer: trained on the data, or a local file")
    model: ModelSpec = Field(description="the model architecture")
    stages: dict[Name, Stage] = Field(min_length=1, description="the stages in the order they run, keyed by stage name")
