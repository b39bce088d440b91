"""Parquet files (glob) with the same field mapping as jsonl, read in row batches (bounded memory)."""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import Field

from engine.plugin import DataSource, Record, RecordKind, Skip, files_fingerprint, match_files

from .jsonl import JsonlParams, _record


class ParquetParams(JsonlParams):
    glob: str = Field(description="Parquet files to read, e.g. data/*.parquet")
    batch_rows: int = Field(default=4096, gt=0, description="rows read at a time")


def read(params: ParquetParams, kind: RecordKind) -> Iterator[Record | Skip]:
    return read_files(params, kind, files(params))


def files(params: ParquetParams) -> list[str]:
    return match_files(params.glob, source="parquet")


def read_files(params: ParquetParams, kind: RecordKind, paths: list[str]) -> Iterator[Record | Skip]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in paths:
        try:
            file = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as exc:
            yield Skip(path, f"not a readable Parquet file: {exc}")
            continue
        row = 0
        for batch in file.iter_batches(batch_size=params.batch_rows):
            for item in batch.to_pylist():
                row += 1
                try:
                    yield _record(item, params, kind)
                except (KeyError, TypeError, ValueError) as exc:
                    yield Skip(f"{path}#row{row}", f"cannot read a {kind} record: {type(exc).__name__}: {exc}")


SOURCE = DataSource(
    params=ParquetParams,
    kinds=frozenset({"text", "conversation", "preference", "prompt"}),
    read=read,
    description="Parquet files with a field mapping (pyarrow)",
    fingerprint=lambda params: files_fingerprint(params.glob),
    files=files,
    read_files=read_files,
)
