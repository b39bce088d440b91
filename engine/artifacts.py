"""The on-disk contracts between stages: where artifacts live and what their manifests say.

A data stage writes, under its dataset artifact directory:

    manifest.json                      {"tokenizer": {"sha256", "vocab_size", "eod", "pad", "bos"},
                                        "sources": {name: {"records", "weight", "splits": {...}}}}
    <source>/<split>.bin, .idx         Megatron indexed datasets of text sources (split: train|valid|test)

A training stage writes checkpoints under its checkpoint artifact directory:

    latest                             the name of the newest complete checkpoint (atomically replaced)
    step_00000010/                     one complete Megatron distributed checkpoint
        meta.json                      architecture, tokenizer hash, layout, step, parents
    .tmp-step_00000020-<id>/           a save in progress; renamed into place only when complete

Every stage that finishes writes `<stage>/done.json` with its job's cache key. A launcher skips a job
whose marker holds the key it would run with; a changed recipe (or anything upstream of the stage)
changes the key, and the stage runs again, resuming from or starting after its own checkpoints.

Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SPLITS = ("train", "valid", "test")
MANIFEST = "manifest.json"


def text_prefix(dataset_dir: str | Path, source: str, split: str) -> str:
    """Path prefix (without .bin/.idx) of one text source's split."""
    return str(Path(dataset_dir) / source / split)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


DONE = "done.json"


def mark_done(stage_dir: str | Path, cache_key: str) -> None:
    write_json_atomic(Path(stage_dir) / DONE, {"cache_key": cache_key})


def is_done(stage_dir: str | Path, cache_key: str) -> bool:
    """Whether the stage finished with exactly this cache key."""
    try:
        return bool(read_json(Path(stage_dir) / DONE).get("cache_key") == cache_key)
    except (OSError, ValueError, AttributeError):
        return False
