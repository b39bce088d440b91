"""`engine feedback export`: judgments → preference pairs and SFT conversations, as JSON Lines.

* Rankings become preference pairs: `all` (the default) gives every ordered pair of a ranking — K
  responses ranked strictly give K(K−1)/2 pairs, as InstructGPT trains its reward model — and `best`
  gives the best response against each worse one. Tied responses (AI rankings) and pairs of identical
  texts give no pair. When two reviewers ranked an item, both rankings count.
* A written better response becomes a conversation: the prompt as the user's message, the written
  response as the assistant's.
* Flagged items give nothing, from any reviewer; skips give nothing.

The folder holds `preferences.jsonl` ({"prompt", "chosen", "rejected", "reviewer", "item", "model",
"sampling", "time"}), `conversations.jsonl` ({"messages": [{role, content}, ...], "reviewer", ...}) and
`manifest.json` (counts). The `feedback` data-source plugin reads the folder, or the database itself,
so a next round's data stage can take either. No torch here.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

from ..artifacts import write_json_atomic
from ..errors import EngineError
from .store import Store

Pairs = Literal["all", "best"]
PREFERENCES, CONVERSATIONS, MANIFEST = "preferences.jsonl", "conversations.jsonl", "manifest.json"


def _ordered(ranks: Sequence[int], pairs: Pairs) -> Iterator[tuple[int, int]]:
    """(better, worse) response indices of one ranking."""
    if pairs == "best":
        best = min(ranks)
        yield from ((i, j) for i in range(len(ranks)) if ranks[i] == best for j in range(len(ranks)) if ranks[j] > best)
        return
    for i, j in combinations(range(len(ranks)), 2):
        if ranks[i] != ranks[j]:
            yield (i, j) if ranks[i] < ranks[j] else (j, i)


def _usable(judgments: Sequence[dict[str, Any]], ai: bool) -> list[dict[str, Any]]:
    flagged = {j["item_id"] for j in judgments if j["action"] == "flag"}
    return [j for j in judgments
            if j["item_id"] not in flagged and j["action"] != "skip" and (ai or not j["reviewer"].startswith("ai:"))]  # fmt: skip


def _provenance(j: dict[str, Any]) -> dict[str, Any]:
    return {"reviewer": j["reviewer"], "item": j["item_id"], "model": j["model"], "sampling": j["sampling"],
            "time": j["created"]}  # fmt: skip


def preference_rows(
    judgments: Sequence[dict[str, Any]], *, pairs: Pairs = "all", ai: bool = True
) -> Iterator[dict[str, Any]]:
    for j in _usable(judgments, ai):
        if j["action"] != "rank" or not j["ranks"]:
            continue
        texts = j["responses"]
        for better, worse in _ordered(j["ranks"], pairs):
            if texts[better] != texts[worse]:
                yield {"prompt": j["prompt"], "chosen": texts[better], "rejected": texts[worse], **_provenance(j)}


def conversation_rows(judgments: Sequence[dict[str, Any]], *, ai: bool = True) -> Iterator[dict[str, Any]]:
    for j in _usable(judgments, ai):
        if j["written"]:
            messages = [{"role": "user", "content": j["prompt"]}, {"role": "assistant", "content": j["written"]}]
            yield {"messages": messages, **_provenance(j)}


def read_judgments(db: Path) -> list[dict[str, Any]]:
    if not db.is_file():
        raise EngineError(f"{db}: no such feedback database")
    store = Store.read_only(db)
    try:
        return store.judgments()
    except sqlite3.DatabaseError as exc:
        raise EngineError(f"{db}: cannot read its judgments ({exc}); is it a feedback database?") from None
    finally:
        store.close()


def _write_jsonl(path: Path, rows: Iterator[dict[str, Any]]) -> int:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return count


def export(db: Path, out: Path, *, pairs: Pairs = "all", ai: bool = True) -> dict[str, Any]:
    """Write the export folder; returns its manifest (counts)."""
    judgments = read_judgments(db)
    if out.exists() and not out.is_dir():
        raise EngineError(f"{out} is a file; --out names a folder")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "database": str(db.resolve()),
        "exported": time.time(),
        "pairs": pairs,
        "ai_feedback": ai,
        "judgments": len(judgments),
        "reviewers": sorted({j["reviewer"] for j in judgments}),
        "preferences": _write_jsonl(out / PREFERENCES, preference_rows(judgments, pairs=pairs, ai=ai)),
        "conversations": _write_jsonl(out / CONVERSATIONS, conversation_rows(judgments, ai=ai)),
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest
