"""Reviewers' judgments as training data: preference pairs from rankings, conversations from written
responses.

`path` is a folder written by `engine feedback export` (its preferences.jsonl and conversations.jsonl)
or the feedback database itself (read through engine.feedback.export, with `pairs` choosing all ordered
pairs of a ranking or the best response against each worse one). AI feedback (reviewers named
`ai:...`) is included unless `ai: false`. A rerun of the data stage reuses its outputs while the
files are unchanged (sizes and times).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.plugin import (
    Conversation,
    DataSource,
    Message,
    Preference,
    Record,
    RecordKind,
    Skip,
    files_fingerprint,
)

FILES = {"preference": "preferences.jsonl", "conversation": "conversations.jsonl"}


class FeedbackParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="an `engine feedback export` folder, or the feedback database (.db)")
    pairs: Literal["all", "best"] = Field(
        default="all", description="database only: every ordered pair of a ranking, or the best against each worse"
    )
    ai: bool = Field(default=True, description="include AI feedback (reviewers named ai:...)")


def _record(row: dict[str, Any], kind: RecordKind) -> Record:
    if kind == "preference":
        return Preference(str(row["prompt"]), str(row["chosen"]), str(row["rejected"]))
    return Conversation(tuple(Message(m["role"], str(m["content"])) for m in row["messages"]))


def _rows(params: FeedbackParams, kind: RecordKind) -> Iterator[tuple[str, dict[str, Any] | Skip]]:
    path = Path(params.path)
    if path.is_file():
        from engine.feedback import export

        judgments = export.read_judgments(path)
        rows = (export.preference_rows(judgments, pairs=params.pairs, ai=params.ai) if kind == "preference"
                else export.conversation_rows(judgments, ai=params.ai))  # fmt: skip
        yield from ((f"{path}:item {row['item']}", row) for row in rows)
        return
    file = path / FILES[kind]
    if not file.is_file():
        raise FileNotFoundError(
            f"feedback: {file} does not exist; give an `engine feedback export` folder or a database"
        )
    with file.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield f"{file}:{lineno}", json.loads(line)
                except ValueError as exc:
                    yield f"{file}:{lineno}", Skip(f"{file}:{lineno}", f"not JSON: {exc}")


def read(params: FeedbackParams, kind: RecordKind) -> Iterator[Record | Skip]:
    for where, row in _rows(params, kind):
        if isinstance(row, Skip):
            yield row
            continue
        if not params.ai and str(row.get("reviewer", "")).startswith("ai:"):
            continue
        try:
            yield _record(row, kind)
        except (KeyError, TypeError, ValueError) as exc:
            yield Skip(where, f"cannot read a {kind} record: {type(exc).__name__}: {exc}")


def _fingerprint(params: FeedbackParams) -> str:
    path = Path(params.path)
    # A database changes in its write-ahead log before the main file.
    return files_fingerprint(f"{path}*") if path.is_file() else files_fingerprint(str(path / "*.jsonl"))


SOURCE = DataSource(
    params=FeedbackParams,
    kinds=frozenset({"preference", "conversation"}),
    read=read,
    fingerprint=_fingerprint,
    description="reviewers' rankings and written responses (engine feedback)",
)
