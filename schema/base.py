"""Shared configuration of every recipe model: frozen, unknown keys rejected."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"
NAME_RE = re.compile(NAME_PATTERN)

# Slurm's time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
TIME_LIMIT_PATTERN = r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$"

Name = Annotated[
    str,
    Field(
        pattern=NAME_PATTERN,
        description="lower-case identifier: letters, digits, '_' and '-', starting with a letter",
    ),
]
PositiveInt = Annotated[int, Field(gt=0)]


class Spec(BaseModel):
    """Base of every recipe model: immutable, and an unknown key is an error, never ignored."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, use_enum_values=True, allow_inf_nan=False
    )
