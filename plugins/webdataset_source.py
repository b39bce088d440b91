"""Webdataset tar shards: each sample's `txt` member is a document, or its `json` member a record.

A truncated or corrupt shard is reported (with the shard and the sample reached) and the next shard
is read; its complete samples before the damage are kept.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from typing import Literal

from pydantic import Field

from engine.plugin import DataSource, Record, RecordKind, Skip, Text, files_fingerprint, match_files

from .jsonl import JsonlParams, _record


class WebdatasetParams(JsonlParams):
    glob: str = Field(description="tar shards to read, e.g. shards/*.tar")
    member: Literal["txt", "json"] = Field(
        default="txt", description="txt: the member is a document's text; json: a record with the field mapping"
    )


def _samples(path: str, member: str) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(path, mode="r|*") as tar:
        for info in tar:
            if info.isfile() and info.name.endswith("." + member):
                f = tar.extractfile(info)
                if f is not None:
                    yield info.name, f.read()


def read(params: WebdatasetParams, kind: RecordKind) -> Iterator[Record | Skip]:
    paths = match_files(params.glob, source="webdataset")
    for path in paths:
        name = "(start)"
        try:
            for name, data in _samples(path, params.member):
                try:
                    text = data.decode("utf-8")
                    yield Text(text) if params.member == "txt" else _record(json.loads(text), params, kind)
                except (UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
                    yield Skip(f"{path}:{name}", f"cannot read a {kind} record: {type(exc).__name__}: {exc}")
        except (tarfile.TarError, OSError, EOFError) as exc:
            yield Skip(f"{path} after {name}", f"truncated or corrupt shard: {exc}")


SOURCE = DataSource(
    params=WebdatasetParams,
    kinds=frozenset({"text", "conversation", "preference", "prompt"}),
    read=read,
    description="webdataset tar shards (txt documents or json records)",
    fingerprint=lambda params: files_fingerprint(params.glob),
)
