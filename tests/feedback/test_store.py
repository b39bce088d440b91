"""The feedback database, agreement, export and the `feedback` data source, without a model or a browser."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from engine import plugin
from engine.errors import EngineError
from engine.feedback import export
from engine.feedback.agreement import agreement, kendall_tau_b, pair_counts
from engine.feedback.ai import dense_ranks
from engine.feedback.store import ModelVersion, NewItem, Store, check_reviewer
from engine.plugin import Conversation, Message, Preference, Skip
from engine.plugins import feedback

MODEL = ModelVersion("runs/x/sft/checkpoints/step_00000010", 10, "ab" * 32)
SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": 8, "seed": 0}


def filled(path: Path, n: int = 4, *, overlap: float = 0.0, k: int = 3) -> Store:
    store = Store(path)
    items = [NewItem(f"{i}+1=", str(i + 1), i, [f"{i + 1}", f"{i + 2}", f"x{i}", "same", "same"][:k]) for i in range(n)]
    store.add_items(items, prompt_set="set#1", model_id=store.model_id(MODEL), sampling=SAMPLING, origin="human",
                    overlap=overlap)  # fmt: skip
    return store


def test_the_database_is_wal_with_full_sync(tmp_path: Path) -> None:
    store = filled(tmp_path / "f.db")
    assert store.rows("PRAGMA journal_mode")[0][0] == "wal"
    assert store.rows("PRAGMA synchronous")[0][0] == 2  # FULL


def test_a_reviewer_gets_the_same_pending_item_until_judging_it(tmp_path: Path) -> None:
    store = filled(tmp_path / "f.db")
    first = store.next_item("alice")
    assert first is not None and store.next_item("alice") == first
    store.close()
    store = Store(tmp_path / "f.db")  # a restart
    assert store.next_item("alice") == first
    store.judge(item_id=first, reviewer="alice", action="rank", ranks=[0, 1, 2])
    second = store.next_item("alice")
    assert second not in (None, first)
    with pytest.raises(EngineError, match="already judged"):
        store.judge(item_id=first, reviewer="alice", action="rank", ranks=[2, 1, 0])


def test_items_go_to_one_reviewer_unless_they_overlap(tmp_path: Path) -> None:
    store = filled(tmp_path / "f.db", n=2)
    a, b = store.next_item("alice"), store.next_item("bob")
    assert {a, b} == {1, 2} and store.next_item("carol") is None
    store.judge(item_id=a or 0, reviewer="alice", action="skip")  # a skip gives the slot back
    assert store.next_item("carol") == a


def test_overlap_items_are_offered_to_a_second_reviewer_first(tmp_path: Path) -> None:
    store = filled(tmp_path / "f.db", n=40, overlap=0.5)
    wanted = [r[0] for r in store.rows("SELECT wanted FROM items ORDER BY id")]
    assert 10 <= wanted.count(2) <= 30  # about half, drawn from the prompt index
    double = wanted.index(2) + 1
    taken = []
    while (item := store.next_item("alice")) is not None and item <= double:
        taken.append(item)
        store.judge(item_id=item, reviewer="alice", action="rank", ranks=[0, 1, 2])
    assert store.next_item("bob") == double


def test_rankings_are_checked(tmp_path: Path) -> None:
    store = filled(tmp_path / "f.db")
    for bad in ([0, 0, 1], [0, 1], [0, 1, 3]):
        with pytest.raises(EngineError, match="distinct place"):
            store.judge(item_id=1, reviewer="alice", action="rank", ranks=bad)
    with pytest.raises(EngineError, match="action"):
        store.judge(item_id=1, reviewer="alice", action="delete")
    assert store.judgments() == []


def test_reviewer_names() -> None:
    assert check_reviewer("  alice ") == "alice"
    for bad in ("", "x" * 65, "a\nb", "ai:me"):
        with pytest.raises(EngineError):
            check_reviewer(bad)
    assert check_reviewer("ai:exact_match", ai=True) == "ai:exact_match"


def test_a_judgment_records_reviewer_model_sampling_and_time(tmp_path: Path) -> None:
    store = filled(tmp_path / "f.db")
    store.judge(item_id=1, reviewer="alice", action="rank", ranks=[1, 0, 2], written=" 2 ", note="close")
    raw = sqlite3.connect(tmp_path / "f.db").execute(
        "SELECT reviewer, model, sampling, created, written FROM judgments"
    )
    reviewer, model, sampling, created, written = raw.fetchone()
    assert reviewer == "alice" and written == "2" and created > 0
    assert json.loads(model) == MODEL.as_dict() and json.loads(sampling) == SAMPLING


def test_kendall_tau_and_pairwise_agreement() -> None:
    assert kendall_tau_b([0, 1, 2, 3], [0, 1, 2, 3]) == 1.0
    assert kendall_tau_b([0, 1, 2, 3], [3, 2, 1, 0]) == -1.0
    assert kendall_tau_b([0, 1, 2], [1, 0, 2]) == pytest.approx(1 / 3)
    assert pair_counts([0, 0, 1], [0, 1, 2]) == (2, 0, 1, 0)
    assert kendall_tau_b([0, 0, 0], [0, 1, 2]) is None
    rows = [
        {"item_id": 1, "reviewer": "a", "action": "rank", "ranks": [0, 1, 2]},
        {"item_id": 1, "reviewer": "b", "action": "rank", "ranks": [1, 0, 2]},
        {"item_id": 2, "reviewer": "a", "action": "rank", "ranks": [0, 1, 2]},
        {"item_id": 2, "reviewer": "b", "action": "rank", "ranks": [0, 1, 2]},
        {"item_id": 3, "reviewer": "a", "action": "rank", "ranks": [0, 1, 2]},  # judged once
        {"item_id": 3, "reviewer": "c", "action": "skip", "ranks": None},
    ]
    result = agreement(rows)
    (pair,) = result["pairs"]
    assert pair["reviewers"] == ["a", "b"] and pair["items"] == 2 and pair["response_pairs"] == 6
    assert pair["pairwise_agreement"] == pytest.approx(5 / 6)
    assert pair["kendall_tau"] == pytest.approx((1 / 3 + 1) / 2)
    assert result["overall"]["items"] == 2


def test_dense_ranks_tie_equal_scores() -> None:
    assert dense_ranks([1.0, 0.0, 1.0, 0.5]) == [0, 2, 0, 1]


def _judged(tmp_path: Path) -> Path:
    store = filled(tmp_path / "f.db", n=4, k=5)
    store.judge(item_id=1, reviewer="alice", action="rank", ranks=[0, 1, 2, 3, 4], written="2")
    store.judge(item_id=2, reviewer="alice", action="rank", ranks=[4, 3, 2, 1, 0])
    store.judge(item_id=3, reviewer="alice", action="flag", written="ignored", note="bad prompt")
    store.judge(item_id=3, reviewer="bob", action="rank", ranks=[0, 1, 2, 3, 4])  # flagged by alice: dropped
    store.judge(item_id=4, reviewer="ai:exact_match", action="rank", ranks=[0, 1, 1, 1, 1], strict=False)
    store.close()
    return tmp_path / "f.db"


def test_export_turns_rankings_into_pairs_and_written_responses_into_conversations(tmp_path: Path) -> None:
    db = _judged(tmp_path)
    manifest = export.export(db, tmp_path / "out")
    prefs = [json.loads(line) for line in (tmp_path / "out" / export.PREFERENCES).read_text().splitlines()]
    # Item 1: 5 responses, 10 ordered pairs less the identical "same"/"same" pair; item 2 likewise;
    # item 4 (AI, ties): the best against the four tied ones, less none identical.
    assert manifest["preferences"] == len(prefs) == 9 + 9 + 4
    first = prefs[0]
    assert (first["prompt"], first["chosen"], first["rejected"], first["reviewer"]) == ("0+1=", "1", "2", "alice")
    assert first["model"] == MODEL.as_dict() and first["sampling"] == SAMPLING
    assert all(p["chosen"] != p["rejected"] for p in prefs)
    assert not any(p["item"] == 3 for p in prefs)
    convs = [json.loads(line) for line in (tmp_path / "out" / export.CONVERSATIONS).read_text().splitlines()]
    assert [c["messages"] for c in convs] == [
        [{"role": "user", "content": "0+1="}, {"role": "assistant", "content": "2"}]
    ]
    best = export.export(db, tmp_path / "best", pairs="best", ai=False)
    assert best["preferences"] == 4 + 3  # item 1: "1" against 4 others; item 2: "same" (best) against 3 different


def test_the_feedback_source_reads_an_export_folder_or_the_database(tmp_path: Path) -> None:
    db = _judged(tmp_path)
    export.export(db, tmp_path / "out")
    assert plugin.data_sources()["feedback"] is feedback.SOURCE
    for path in (tmp_path / "out", db):
        params = feedback.FeedbackParams(path=str(path))
        prefs = list(feedback.read(params, "preference"))
        assert len(prefs) == 22 and prefs[0] == Preference("0+1=", "1", "2")
        assert list(feedback.read(params, "conversation")) == [
            Conversation((Message("user", "0+1="), Message("assistant", "2")))
        ]
        humans = list(feedback.read(feedback.FeedbackParams(path=str(path), ai=False), "preference"))
        assert len(humans) == 18
    (tmp_path / "out" / export.PREFERENCES).write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\nnot json\n{}\n'
    )
    rows = list(feedback.read(feedback.FeedbackParams(path=str(tmp_path / "out")), "preference"))
    assert rows[0] == Preference("a", "b", "c") and all(isinstance(r, Skip) for r in rows[1:])
    with pytest.raises(FileNotFoundError, match="feedback"):
        list(feedback.read(feedback.FeedbackParams(path=str(tmp_path / "nowhere")), "preference"))


def test_the_fingerprint_changes_with_each_new_judgment(tmp_path: Path) -> None:
    store = filled(tmp_path / "f.db")
    params = feedback.FeedbackParams(path=str(tmp_path / "f.db"))
    assert feedback.SOURCE.fingerprint is not None
    before = feedback.SOURCE.fingerprint(params)
    store.judge(item_id=1, reviewer="alice", action="rank", ranks=[0, 1, 2])
    assert feedback.SOURCE.fingerprint(params) != before


@pytest.mark.parametrize("content", [b"", b"not a database at all\n", b"SQLite format 3\x00" + b"\x00" * 84])
def test_exporting_a_file_that_is_no_feedback_database_leaves_it_untouched(tmp_path: Path, content: bytes) -> None:
    db = tmp_path / "judgments.db"
    db.write_bytes(content)
    with pytest.raises(EngineError, match=r"not a feedback database|cannot read"):
        export.export(db, tmp_path / "out")
    assert db.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["judgments.db"]


def test_exporting_a_database_does_not_write_to_it(tmp_path: Path) -> None:
    db = tmp_path / "feedback.db"
    store = Store(db)
    store.close()
    before = db.read_bytes()
    export.export(db, tmp_path / "out")
    assert db.read_bytes() == before
    assert not (tmp_path / "feedback.db-wal").exists() and not (tmp_path / "feedback.db-shm").exists()
