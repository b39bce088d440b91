"""JSON Lines files with a configurable field mapping, for every record kind."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from engine.plugin import (
    Conversation,
    DataSource,
    Message,
    Preference,
    Prompt,
    Record,
    RecordKind,
    Skip,
    Text,
    files_fingerprint,
    match_files,
)


class JsonlParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    glob: str = Field(description="JSONL files to read, e.g. data/*.jsonl")
    text_field: str = Field(default="text", description="field holding a document (records: text)")
    messages_field: str = Field(
        default="messages", description="field holding [{role, content}, ...] (records: conversation)"
    )
    prompt_field: str = Field(default="prompt", description="field holding the prompt")
    chosen_field: str = Field(default="chosen", description="field holding the preferred response")
    rejected_field: str = Field(default="rejected", description="field holding the worse response")
    reference_field: str | None = Field(
        default="reference", description="field holding a reference answer (records: prompt)"
    )


def _field(row: dict[str, Any], name: str) -> str:
    value = row[name]
    if value is None or isinstance(value, (dict, list)):
        raise ValueError(f"field {name!r} is {value!r}, not text")
    return str(value)


def _record(row: dict[str, Any], params: JsonlParams, kind: RecordKind) -> Record:
    if kind == "text":
        return Text(_field(row, params.text_field))
    if kind == "conversation":
        messages = tuple(Message(m["role"], str(m["content"])) for m in row[params.messages_field])
        return Conversation(messages)
    if kind == "preference":
        return Preference(
            _field(row, params.prompt_field), _field(row, params.chosen_field), _field(row, params.rejected_field)
        )
    reference = row.get(params.reference_field) if params.reference_field else None
    meta = {k: v for k, v in row.items() if k not in (params.prompt_field, params.reference_field)}
    return Prompt(_field(row, params.prompt_field), None if reference is None else str(reference), meta)


def read(params: JsonlParams, kind: RecordKind) -> Iterator[Record | Skip]:
    return read_files(params, kind, files(params))


def files(params: JsonlParams) -> list[str]:
    return match_files(params.glob, source="jsonl")


def read_files(params: JsonlParams, kind: RecordKind, paths: list[str]) -> Iterator[Record | Skip]:
    for path in paths:
        with Path(path).open(encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield _record(json.loads(line), params, kind)
                except (KeyError, TypeError, ValueError) as exc:
                    yield Skip(f"{path}:{lineno}", f"cannot read a {kind} record: {type(exc).__name__}: {exc}")


SOURCE = DataSource(
    params=JsonlParams,
    kinds=frozenset({"text", "conversation", "preference", "prompt"}),
    read=read,
    fingerprint=lambda params: files_fingerprint(params.glob),
    files=files,
    read_files=read_files,
    description="JSON Lines files with a field mapping",
)
