"""The public plugin API: data sources and reward functions.

A plugin is an object exported through an entry point:

    [project.entry-points."engine.data_sources"]
    my_source = "my_package.module:SOURCE"        # a DataSource

    [project.entry-points."engine.rewards"]
    my_reward = "my_package.module:REWARD"        # a RewardFunction

Each carries a pydantic model of its parameters, which the compiler validates against the recipe's
`params` before anything runs, and the function that does the work. The built-in plugins in plugins/
register through the same entry points and use only this module. Loading a plugin must not import
torch: keep heavy imports inside `read`/`score`.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel

from .errors import PluginError

RecordKind = Literal["text", "conversation", "preference", "prompt"]
DATA_SOURCES_GROUP = "engine.data_sources"
REWARDS_GROUP = "engine.rewards"


# ---- records a data source yields -------------------------------------------------------------
@dataclass(frozen=True)
class Text:
    """A pretraining document."""

    text: str


@dataclass(frozen=True)
class Message:
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class Conversation:
    """An SFT example: the loss falls on the assistant messages only."""

    messages: tuple[Message, ...]


@dataclass(frozen=True)
class Preference:
    """A ranked pair: `chosen` was preferred to `rejected` as a reply to `prompt`."""

    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class Prompt:
    """An RL prompt, with a reference answer where the reward can check one."""

    prompt: str
    reference: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Skip:
    """Yielded instead of a record that cannot be read: the stage counts it (or stops, when strict)."""

    where: str
    reason: str


Record = Text | Conversation | Preference | Prompt
RECORD_TYPES: dict[str, type] = {
    "text": Text,
    "conversation": Conversation,
    "preference": Preference,
    "prompt": Prompt,
}


# ---- plugin kinds ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSource:
    """A streaming reader of records.

    `read(params, kind)` yields records of `kind` (one of `kinds`) lazily, so that a source larger than
    memory streams through cleaning and tokenization. A record that cannot be read is yielded as a
    `Skip(where, reason)` — file and line — so that one bad line does not end the source.
    """

    params: type[BaseModel]
    kinds: frozenset[RecordKind]
    read: Callable[[Any, RecordKind], Iterator[Record | Skip]]
    description: str = ""
    # What the source reads beyond its params (files' sizes and times, a version): a rerun with the
    # same params and the same fingerprint reuses the previous outputs. None: the params say it all.
    fingerprint: Callable[[Any], str] | None = None
    # A source of files: the files it reads, in order, and a reader of any run of them. With both, a sharded
    # data stage (`shards: N`) gives each shard its own contiguous run of the files; without them, the first
    # shard reads the whole source.
    files: Callable[[Any], list[str]] | None = None
    read_files: Callable[[Any, RecordKind, list[str]], Iterator[Record | Skip]] | None = None
    # The bytes the source reads, for the data stage's time estimate (a generated source may estimate its
    # own). None: the files' sizes where the plugin lists files, otherwise unknown.
    size: Callable[[Any, RecordKind], int] | None = None


def source_size(source: DataSource, params: Any, kind: RecordKind) -> int | None:
    """The bytes `source` reads with `params` (its `size`, else its files' sizes), or None when that cannot be
    known before reading (no size and no files, or files that are not there yet)."""
    import os

    try:
        if source.size is not None:
            return int(source.size(params, kind))
        if source.files is not None:
            return sum(os.path.getsize(f) for f in source.files(params))
    except Exception:  # an estimate: whatever keeps a source from saying its size leaves it unknown
        return None
    return None


def match_files(pattern: str, *, source: str) -> list[str]:
    """The files a glob matches (`**` recursive), sorted; none is a FileNotFoundError naming the source."""
    import glob

    paths = sorted(glob.glob(pattern, recursive=True))
    if not paths:
        raise FileNotFoundError(f"{source}: no file matches glob {pattern!r}")
    return paths


def files_fingerprint(pattern: str) -> str:
    """Paths, sizes and modification times of the files a glob matches: changes when any file does."""
    import glob
    import hashlib
    import os

    digest = hashlib.sha256()
    for path in sorted(glob.glob(pattern, recursive=True)):
        st = os.stat(path)
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class RewardSample:
    """What a reward function scores: a prompt, the sampled response and the prompt's metadata."""

    prompt: str
    response: str
    reference: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RewardFunction:
    """`score(params, batch)` returns one float per sample."""

    params: type[BaseModel]
    score: Callable[[Any, Sequence[RewardSample]], list[float]]
    description: str = ""


# ---- helpers for plugin parameter models --------------------------------------------------
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """re.compile for a pydantic validator: a bad pattern becomes a ValueError (a validation error)."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"not a regular expression: {exc}") from None


def _valid_pattern(value: str) -> str:
    compile_pattern(value)
    return value


RegexPattern = Annotated[str, AfterValidator(_valid_pattern)]
"""A parameter that must be a regular expression: a bad one is a validation error naming the field."""


# ---- registry ------------------------------------------------------------------------------
def _load_group(group: str, expected: type) -> dict[str, Any]:
    """Load every entry point of a group; a broken, mistyped or colliding plugin is a loud error."""
    found: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for ep in sorted(importlib.metadata.entry_points(group=group), key=lambda e: (e.name, e.value)):
        where = f"{ep.value}" + (f" (from {ep.dist.name})" if ep.dist is not None else "")
        if ep.name in found:
            if origin[ep.name] == where:  # the same distribution seen twice on sys.path
                continue
            raise PluginError(
                f"plugin name collision in {group}: {ep.name!r} is registered by {origin[ep.name]} and "
                f"by {where}; uninstall one of them or rename its entry point"
            )
        try:
            obj = ep.load()
        except Exception as exc:
            raise PluginError(
                f"plugin {ep.name!r} in {group} failed to load from {where}: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(obj, expected):
            raise PluginError(
                f"plugin {ep.name!r} in {group} ({where}) is a {type(obj).__name__}, "
                f"not an engine.plugin.{expected.__name__}"
            )
        params = getattr(obj, "params", None)
        if not (isinstance(params, type) and issubclass(params, BaseModel)):
            raise PluginError(f"plugin {ep.name!r} in {group} ({where}): params must be a pydantic model")
        found[ep.name] = obj
        origin[ep.name] = where
    return found


@cache
def data_sources() -> Mapping[str, DataSource]:
    """Every installed data-source plugin by name."""
    return _load_group(DATA_SOURCES_GROUP, DataSource)


@cache
def rewards() -> Mapping[str, RewardFunction]:
    """Every installed reward-function plugin by name."""
    return _load_group(REWARDS_GROUP, RewardFunction)
