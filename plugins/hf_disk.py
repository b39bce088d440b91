"""Datasets saved with HF `datasets` (`Dataset.save_to_disk`), read row by row with the jsonl field
mapping. `datasets` is imported only when such a source is read: `pip install datasets` to use it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pydantic import Field

from engine.plugin import DataSource, Record, RecordKind, Skip, files_fingerprint

from .jsonl import JsonlParams, _record


class HfDiskParams(JsonlParams):
    glob: str = Field(description="the folder written by Dataset.save_to_disk (named glob for the fingerprint)")
    split: str | None = Field(default=None, description="split of a saved DatasetDict; none for a Dataset")


def read(params: HfDiskParams, kind: RecordKind) -> Iterator[Record | Skip]:
    try:
        import datasets
    except ImportError:
        raise OSError("hf_disk: HF `datasets` is not installed (pip install datasets)") from None
    if not Path(params.glob).is_dir():
        raise FileNotFoundError(f"hf_disk: no saved dataset at {params.glob!r}")
    data = datasets.load_from_disk(params.glob)
    if isinstance(data, datasets.DatasetDict):
        if params.split is None:
            raise OSError(f"hf_disk: {params.glob} holds splits {list(data)}; set params.split")
        data = data[params.split]
    for row_index, row in enumerate(data):
        try:
            yield _record(dict(row), params, kind)
        except (KeyError, TypeError, ValueError) as exc:
            yield Skip(f"{params.glob}#row{row_index}", f"cannot read a {kind} record: {type(exc).__name__}: {exc}")


SOURCE = DataSource(
    params=HfDiskParams,
    kinds=frozenset({"text", "conversation", "preference", "prompt"}),
    read=read,
    description="datasets saved to disk with HF datasets (optional import)",
    fingerprint=lambda params: files_fingerprint(str(Path(params.glob) / "**" / "*")),
)
