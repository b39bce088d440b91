"""Real English text that every machine with Python has: the Python Language Reference's topics.

`pydoc_data.topics` ships with CPython (about 0.5 MB of the reference manual's prose and grammar,
under the Python Software Foundation License 2.0). Documents are a topic each, or its paragraphs
grouped into chunks of about `chunk_chars` characters.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.plugin import DataSource, Record, RecordKind, Skip, Text


class PythonDocsParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    unit: Literal["topic", "chunk"] = Field(default="chunk", description="a document per topic, or per chunk")
    chunk_chars: int = Field(default=1500, gt=0, description="approximate characters per chunk")


def _chunks(text: str, size: int) -> Iterator[str]:
    chunk: list[str] = []
    length = 0
    for para in text.split("\n\n"):
        chunk.append(para)
        length += len(para)
        if length >= size:
            yield "\n\n".join(chunk)
            chunk, length = [], 0
    if chunk:
        yield "\n\n".join(chunk)


def read(params: PythonDocsParams, kind: RecordKind) -> Iterator[Record | Skip]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name]
        if params.unit == "topic":
            yield Text(text)
        else:
            yield from (Text(c) for c in _chunks(text, params.chunk_chars))


def size(params: PythonDocsParams, kind: RecordKind) -> int:
    from pydoc_data.topics import topics

    return sum(len(text) for text in topics.values())


SOURCE = DataSource(
    params=PythonDocsParams,
    kinds=frozenset({"text"}),
    read=read,
    size=size,
    fingerprint=lambda params: sys.version,
    description="English prose of the Python Language Reference (shipped with CPython, PSF License)",
)
