"""A run's JSON records damaged on disk (empty, truncated, binary, another shape, a section missing) are one
EngineError naming the file, for every reader a command uses. Imports no torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.artifacts import plan_jobs, read_manifest, read_object
from engine.errors import EngineError

GOOD = {"run_dir": "runs/x", "jobs": [{"name": "sft", "kind": "sft"}], "tokenizer": {}, "sources": {},
        "architecture": {"num_layers": 2}}  # fmt: skip
DAMAGE = {
    "empty": b"",
    "truncated": json.dumps(GOOD).encode()[:25],
    "binary": b"\xff\xfe\x00\x01\x80garbage",
    "wrong shape": b"[1, 2, 3]",
    "a string": b'"plan"',
    "deep": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_every_reader_names_the_damaged_file(tmp_path: Path, how: str) -> None:
    for name, read in (("plan.json", lambda: plan_jobs(tmp_path)), ("manifest.json", lambda: read_manifest(tmp_path)),
                       ("meta.json", lambda: read_object(tmp_path / "meta.json", "meta.json", required=("architecture",)))):  # fmt: skip
        (tmp_path / name).write_bytes(DAMAGE[how])
        with pytest.raises(EngineError) as info:
            read()
        assert str(tmp_path / name) in str(info.value)


def test_a_missing_section_or_a_plan_without_jobs_is_named(tmp_path: Path) -> None:
    (tmp_path / "meta.json").write_text(json.dumps({"architecture": 3}))
    with pytest.raises(EngineError, match="has no 'architecture' section"):
        read_object(tmp_path / "meta.json", "the checkpoint's meta.json", required=("architecture", "tokenizer"))
    (tmp_path / "plan.json").write_text(json.dumps({"jobs": [{"name": 1}]}))
    with pytest.raises(EngineError, match="no list of jobs"):
        plan_jobs(tmp_path)
    (tmp_path / "plan.json").write_text(json.dumps(GOOD))
    assert plan_jobs(tmp_path) == GOOD["jobs"]
