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

A launcher writes `<stage>/job.json` with the job's cache key before the job starts, and every stage
that finishes writes `<stage>/done.json` with it. A job whose `done.json` holds the key it would run
with is skipped. A changed recipe (or anything upstream of the stage) changes the key: the folder's
earlier work is moved aside to `<stage>.superseded-<old key>` (never deleted) and the stage starts
afresh, so nothing trained under other settings is resumed by mistake.

Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import EngineError

SPLITS = ("train", "valid", "test")
MANIFEST = "manifest.json"


def text_prefix(dataset_dir: str | Path, source: str, split: str) -> str:
    """Path prefix (without .bin/.idx) of one text source's split."""
    return str(Path(dataset_dir) / source / split)


def read_manifest(dataset_dir: Path) -> dict[str, Any]:
    """A data stage's manifest.json; a missing one is a user error (the data stage has not run)."""
    manifest = dataset_dir / MANIFEST
    if not manifest.is_file():
        raise EngineError(f"no dataset at {dataset_dir}: {manifest} is missing; run the data stage first")
    return read_object(manifest, "the data stage's manifest", required=("tokenizer", "sources"))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_object(path: Path, what: str, *, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A JSON object a run keeps on disk (plan.json, meta.json, a manifest), read for a user's command: a file
    that is missing, unreadable, truncated, binary, of another shape, or lacking a `required` mapping is one
    EngineError naming the file and what is wrong, never a traceback."""
    fix = "restore it from a copy, or rerun the stage that wrote it"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EngineError(f"{path}: {what} is missing; {fix}") from None
    except OSError as exc:
        raise EngineError(f"{path}: cannot read {what} ({exc.strerror or exc}); {fix}") from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        why = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else f"not valid JSON ({exc})"
        if isinstance(exc, RecursionError):
            why = "nested too deeply"
        raise EngineError(f"{path}: {what} is {why}; {fix}") from None
    if not isinstance(data, dict):
        raise EngineError(f"{path}: {what} holds a JSON {type(data).__name__}, not an object; {fix}")
    missing = [k for k in required if not isinstance(data.get(k), dict | list)]
    if missing:
        raise EngineError(f"{path}: {what} has no {missing[0]!r} section; {fix}")
    return data


def plan_jobs(run: Path) -> list[dict[str, Any]]:
    """The jobs of a run directory's plan.json as plain records (name, kind, outputs), shape-checked."""
    plan = read_object(run / "plan.json", "the run's plan")
    jobs = plan.get("jobs")
    if not isinstance(jobs, list) or not all(
        isinstance(j, dict) and isinstance(j.get("name"), str) and isinstance(j.get("kind"), str) for j in jobs
    ):
        raise EngineError(f"{run / 'plan.json'}: the run's plan has no list of jobs with names and kinds; restore "
                          "it, or recompile the recipe into a new run directory")  # fmt: skip
    return jobs


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


JOB = "job.json"


def recorded_key(stage_dir: Path) -> str | None:
    """The cache key the stage folder's work was done under, if any."""
    for name in (DONE, JOB):
        try:
            key = read_json(stage_dir / name).get("cache_key")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(key, str):
            return key
    return None


def claim_stage(stage_dir: Path, cache_key: str) -> Path | None:
    """Before a job starts: move another cache key's work aside (returned), then record this key."""
    moved = None
    old = recorded_key(stage_dir)
    if old is not None and old != cache_key:
        moved = stage_dir.with_name(f"{stage_dir.name}.superseded-{old[:12]}")
        n = 1
        while moved.exists():
            moved, n = stage_dir.with_name(f"{stage_dir.name}.superseded-{old[:12]}-{n}"), n + 1
        os.replace(stage_dir, moved)
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stage_dir / JOB, {"cache_key": cache_key})
    return moved


def run_of(path: Path) -> Path | None:
    """The run directory holding a path (a run, a stage, runs/<run>/<stage>/checkpoints/step_N), if any."""
    for parent in [path, *list(path.resolve().parents)[:3]]:
        if (parent / "plan.json").is_file():
            return parent
    return None


def inside_run(run: Path | None, recorded: str) -> Path:
    """A path recorded at training time, read relative to the run when the run has moved or been copied."""
    path = Path(recorded)
    if run is None or path.is_absolute() or path.exists():
        return path
    try:
        return run / path.relative_to(read_json(run / "plan.json")["run_dir"])
    except (KeyError, ValueError, OSError, TypeError, RecursionError):
        return path
