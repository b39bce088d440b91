"""The feedback database: sampled items, reviewer assignments and judgments, in one SQLite file.

Durability: WAL journal with `synchronous=FULL`, and every judgment is its own transaction, committed
(and so fsynced) before the reviewer's browser hears "saved". A server killed at any moment therefore
keeps every judgment it acknowledged; the WAL is replayed on the next open.

Tables:

* models: the model versions that sampled items (checkpoint path, step, sha256 of its meta.json);
* items: one prompt and its K sampled responses (`responses`), the sampling parameters, where the prompt
  came from (`prompt_set` and its index there), `origin` (`human`: the review queue; `ai`: ranked by
  reward functions) and `wanted`, how many reviewers should rank it (2 for the overlap fraction);
* assignments: which reviewer was shown which item; an assignment without a judgment is the item that
  reviewer sees again after a restart or a reload;
* judgments: one per (item, reviewer): `rank` (with `ranks[i]`, the rank of response i, 0 best; equal
  ranks are ties, which only AI feedback produces), `flag` (the item is unusable) or `skip`, an optional
  written better response and note, and the reviewer, model version, sampling parameters and time.

An item goes to a reviewer who has not seen it while fewer reviewers than `wanted` hold it (a skip
gives the slot back); items that another reviewer already took come first, so that the overlap items
get their second reviewer while both remember the prompt. No torch here.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import EngineError

Action = Literal["rank", "flag", "skip"]
ACTIONS: tuple[Action, ...] = ("rank", "flag", "skip")
MAX_TEXT = 20_000  # characters of a written response or note

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY, checkpoint TEXT NOT NULL, step INTEGER, meta_sha256 TEXT NOT NULL,
    UNIQUE (checkpoint, meta_sha256));
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, prompt TEXT NOT NULL, reference TEXT, prompt_set TEXT NOT NULL,
    prompt_index INTEGER NOT NULL, model_id INTEGER NOT NULL REFERENCES models (id), sampling TEXT NOT NULL,
    origin TEXT NOT NULL CHECK (origin IN ('human', 'ai')), wanted INTEGER NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS items_by_set ON items (prompt_set, origin);
CREATE TABLE IF NOT EXISTS responses (
    item_id INTEGER NOT NULL REFERENCES items (id), idx INTEGER NOT NULL, text TEXT NOT NULL,
    PRIMARY KEY (item_id, idx));
CREATE TABLE IF NOT EXISTS assignments (
    item_id INTEGER NOT NULL REFERENCES items (id), reviewer TEXT NOT NULL, assigned REAL NOT NULL,
    PRIMARY KEY (item_id, reviewer));
CREATE TABLE IF NOT EXISTS judgments (
    id INTEGER PRIMARY KEY, item_id INTEGER NOT NULL REFERENCES items (id), reviewer TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('rank', 'flag', 'skip')), ranks TEXT, written TEXT, note TEXT,
    model TEXT NOT NULL, sampling TEXT NOT NULL, created REAL NOT NULL, UNIQUE (item_id, reviewer));
"""


@dataclass(frozen=True)
class ModelVersion:
    checkpoint: str
    step: int | None
    meta_sha256: str

    def as_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "step": self.step, "meta_sha256": self.meta_sha256}


@dataclass(frozen=True)
class NewItem:
    prompt: str
    reference: str | None
    prompt_index: int
    responses: Sequence[str]


def check_reviewer(name: str, *, ai: bool = False) -> str:
    """A reviewer name: 1–64 printable characters; `ai:` names are reserved for reward-function rankings."""
    name = name.strip()
    if not 0 < len(name) <= 64 or not name.isprintable():
        raise EngineError("a reviewer name is 1 to 64 printable characters")
    if name.startswith("ai:") != ai:
        raise EngineError("reviewer names starting with 'ai:' are reserved for AI feedback")
    return name


def check_ranks(ranks: Sequence[int], k: int, *, strict: bool) -> list[int]:
    """ranks[i] is response i's place, 0 best: k values in 0..k−1; a reviewer's ranking is a permutation."""
    values = [int(r) for r in ranks]
    if len(values) != k or any(not 0 <= r < k for r in values) or (strict and sorted(values) != list(range(k))):
        raise EngineError(f"a ranking gives each of the {k} responses a distinct place 0..{k - 1}; got {values}")
    return values


def _text(value: str | None) -> str | None:
    value = (value or "").strip()[:MAX_TEXT]
    return value or None


class Store:
    """One connection shared by the server's threads behind a lock; every write is one transaction."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lock = threading.Lock()
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30.0)
        self.db.row_factory = sqlite3.Row
        mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise EngineError(
                f"{path}: SQLite refused WAL mode (journal_mode={mode}); put the database on a local disk"
            )
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        with self.transaction() as db:  # executescript would commit first: one statement at a time
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    @classmethod
    def read_only(cls, path: Path) -> Store:
        """The database opened for reading only: nothing is created, migrated or written, so reading a file
        that is not a feedback database (an empty file, another program's data) leaves it as it was."""
        try:
            with path.open("rb") as f:
                header = f.read(16)
        except OSError as exc:
            raise EngineError(f"{path}: cannot read the feedback database ({exc.strerror or exc})") from None
        if header != b"SQLite format 3\x00":
            raise EngineError(f"{path} is not a feedback database (not an SQLite file); give the .db that "
                              "`engine feedback serve` or `engine feedback ai` wrote")  # fmt: skip
        store = cls.__new__(cls)
        store.path, store.lock = path, threading.Lock()
        # Without a write-ahead log beside it (no server has it open) the file is read as immutable, which
        # creates no -wal/-shm files; with one, a server is writing, and a read-only connection shares its log.
        live = path.with_name(path.name + "-wal").exists()
        query = "mode=ro" if live else "mode=ro&immutable=1"
        store.db = sqlite3.connect(f"{path.resolve().as_uri()}?{query}", uri=True, check_same_thread=False)
        store.db.row_factory = sqlite3.Row
        try:
            tables = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as exc:
            store.db.close()
            raise EngineError(f"{path} is not a feedback database ({exc})") from None
        missing = {"items", "responses", "judgments"} - tables
        if missing:
            store.db.close()
            raise EngineError(f"{path} is an SQLite file but not a feedback database (no table {sorted(missing)[0]})")
        return store

    def close(self) -> None:
        with self.lock:
            self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT under the lock: the writes inside are durable once it returns."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def rows(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self.lock:
            return list(self.db.execute(sql, tuple(args)))

    # -- items --------------------------------------------------------------------------------------

    def model_id(self, version: ModelVersion) -> int:
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO models (checkpoint, step, meta_sha256) VALUES (?, ?, ?)",
                       (version.checkpoint, version.step, version.meta_sha256))  # fmt: skip
            row = db.execute("SELECT id FROM models WHERE checkpoint = ? AND meta_sha256 = ?",
                             (version.checkpoint, version.meta_sha256)).fetchone()  # fmt: skip
        return int(row[0])

    def next_prompt_index(self, prompt_set: str, origin: str) -> int:
        row = self.rows("SELECT MAX(prompt_index) FROM items WHERE prompt_set = ? AND origin = ?", (prompt_set, origin))
        return 0 if row[0][0] is None else int(row[0][0]) + 1

    def add_items(self, items: Sequence[NewItem], *, prompt_set: str, model_id: int, sampling: dict[str, Any],
                  origin: str, overlap: float = 0.0) -> list[int]:  # fmt: skip
        """Store sampled items; `overlap` of them (drawn from the prompt index, so reproducible) want two reviewers."""
        ids = []
        with self.transaction() as db:
            for it in items:
                wanted = 2 if random.Random(f"{prompt_set}:{it.prompt_index}").random() < overlap else 1
                cur = db.execute(
                    "INSERT INTO items (prompt, reference, prompt_set, prompt_index, model_id, sampling, origin, wanted,"
                    " created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (it.prompt, it.reference, prompt_set, it.prompt_index, model_id, json.dumps(sampling), origin,
                     wanted, time.time()),
                )  # fmt: skip
                item_id = int(cur.lastrowid or 0)
                db.executemany("INSERT INTO responses (item_id, idx, text) VALUES (?, ?, ?)",
                               [(item_id, i, text) for i, text in enumerate(it.responses)])  # fmt: skip
                ids.append(item_id)
        return ids

    def item(self, item_id: int) -> dict[str, Any]:
        rows = self.rows(
            "SELECT i.*, m.checkpoint, m.step, m.meta_sha256 FROM items i JOIN models m ON m.id = i.model_id "
            "WHERE i.id = ?", (item_id,))  # fmt: skip
        if not rows:
            raise EngineError(f"no item {item_id}")
        r = rows[0]
        responses = self.rows("SELECT idx, text FROM responses WHERE item_id = ? ORDER BY idx", (item_id,))
        return {
            "id": r["id"], "prompt": r["prompt"], "reference": r["reference"], "origin": r["origin"],
            "wanted": r["wanted"], "sampling": json.loads(r["sampling"]),
            "model": ModelVersion(r["checkpoint"], r["step"], r["meta_sha256"]).as_dict(),
            "responses": [{"idx": x["idx"], "text": x["text"]} for x in responses],
        }  # fmt: skip

    def unstarted(self) -> int:
        """Review items that no reviewer has taken yet: the server samples more when these run low."""
        sql = ("SELECT COUNT(*) FROM items i WHERE origin = 'human' "
               "AND NOT EXISTS (SELECT 1 FROM assignments a WHERE a.item_id = i.id)")  # fmt: skip
        return int(self.rows(sql)[0][0])

    # -- the review queue ---------------------------------------------------------------------------

    def next_item(self, reviewer: str) -> int | None:
        """The reviewer's pending item, else a newly assigned one, else None (nothing sampled yet)."""
        with self.transaction() as db:
            pending = db.execute(
                "SELECT a.item_id FROM assignments a WHERE a.reviewer = ? AND NOT EXISTS "
                "(SELECT 1 FROM judgments j WHERE j.item_id = a.item_id AND j.reviewer = a.reviewer) "
                "ORDER BY a.assigned, a.item_id LIMIT 1", (reviewer,)).fetchone()  # fmt: skip
            if pending is not None:
                return int(pending[0])
            # Holders of an item: reviewers assigned to it, less those who skipped it.
            found = db.execute(
                "SELECT i.id, (SELECT COUNT(*) FROM assignments a WHERE a.item_id = i.id AND NOT EXISTS "
                "  (SELECT 1 FROM judgments j WHERE j.item_id = i.id AND j.reviewer = a.reviewer "
                "   AND j.action = 'skip')) AS held "
                "FROM items i WHERE i.origin = 'human' "
                "AND NOT EXISTS (SELECT 1 FROM assignments a WHERE a.item_id = i.id AND a.reviewer = ?) "
                "AND held < i.wanted ORDER BY held DESC, i.id LIMIT 1", (reviewer,)).fetchone()  # fmt: skip
            if found is None:
                return None
            db.execute("INSERT INTO assignments (item_id, reviewer, assigned) VALUES (?, ?, ?)",
                       (int(found[0]), reviewer, time.time()))  # fmt: skip
            return int(found[0])

    def judge(self, *, item_id: int, reviewer: str, action: str, ranks: Sequence[int] | None = None,
              written: str | None = None, note: str | None = None, strict: bool = True) -> int:  # fmt: skip
        """Record one judgment in its own transaction; returns its id. A second judgment of the same item
        by the same reviewer is refused (the first one stands)."""
        if action not in ACTIONS:
            raise EngineError(f"action {action!r}: use one of {', '.join(ACTIONS)}")
        written, note = _text(written), _text(note)
        item = self.item(item_id)
        ranked = check_ranks(ranks or [], len(item["responses"]), strict=strict) if action == "rank" else None
        try:
            with self.transaction() as db:
                cur = db.execute(
                    "INSERT INTO judgments (item_id, reviewer, action, ranks, written, note, model, sampling, created)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (item_id, reviewer, action, None if ranked is None else json.dumps(ranked),
                     None if action == "skip" else written, note, json.dumps(item["model"]),
                     json.dumps(item["sampling"]), time.time()),
                )  # fmt: skip
                db.execute("INSERT OR IGNORE INTO assignments (item_id, reviewer, assigned) VALUES (?, ?, ?)",
                           (item_id, reviewer, time.time()))  # fmt: skip
        except sqlite3.IntegrityError:
            raise EngineError(f"{reviewer} has already judged item {item_id}") from None
        return int(cur.lastrowid or 0)

    def judgments(self) -> list[dict[str, Any]]:
        """Every judgment with its item's prompt, reference and responses, oldest first."""
        rows = self.rows("SELECT j.*, i.prompt, i.reference, i.origin FROM judgments j JOIN items i "
                         "ON i.id = j.item_id ORDER BY j.id")  # fmt: skip
        texts: dict[int, list[str]] = {}
        for r in self.rows("SELECT item_id, idx, text FROM responses ORDER BY item_id, idx"):
            texts.setdefault(int(r["item_id"]), []).append(r["text"])
        return [{**dict(r), "ranks": json.loads(r["ranks"]) if r["ranks"] else None,
                 "model": json.loads(r["model"]), "sampling": json.loads(r["sampling"]),
                 "responses": texts.get(int(r["item_id"]), [])} for r in rows]  # fmt: skip

    def counts(self) -> dict[str, Any]:
        by_reviewer = {r[0]: int(r[1]) for r in self.rows("SELECT reviewer, COUNT(*) FROM judgments GROUP BY reviewer")}
        items = {r[0]: int(r[1]) for r in self.rows("SELECT origin, COUNT(*) FROM items GROUP BY origin")}
        return {"items": items, "unstarted": self.unstarted(), "judgments": by_reviewer}
