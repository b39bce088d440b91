"""Local text files matched by a glob: one document per file, or one per non-empty line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.plugin import DataSource, Record, RecordKind, Skip, Text, files_fingerprint, match_files


class TextFilesParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    glob: str = Field(description="files to read, e.g. corpus/**/*.txt (recursive ** allowed)")
    unit: Literal["file", "line"] = Field(default="file", description="a document is a file or a line")
    encoding: str = Field(default="utf-8", description="text encoding of the files")


def read(params: TextFilesParams, kind: RecordKind) -> Iterator[Record | Skip]:
    return read_files(params, kind, files(params))


def files(params: TextFilesParams) -> list[str]:
    return match_files(params.glob, source="text_files")


def read_files(params: TextFilesParams, kind: RecordKind, paths: list[str]) -> Iterator[Record | Skip]:
    for path in paths:
        try:
            content = Path(path).read_bytes().decode(params.encoding)
        except UnicodeDecodeError as exc:
            yield Skip(path, f"not valid {params.encoding}: {exc}")
            continue
        if not content.strip():
            yield Skip(path, "empty file")
            continue
        if params.unit == "file":
            yield Text(content)
        else:
            yield from (Text(line) for line in content.splitlines() if line.strip())


SOURCE = DataSource(
    params=TextFilesParams,
    kinds=frozenset({"text"}),
    read=read,
    fingerprint=lambda params: files_fingerprint(params.glob),
    files=files,
    read_files=read_files,
    description="local text files (glob); one document per file or per line",
)
