"""The data stage over shards (engine.worker.stages.sharded) against one process on the same inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.compile import compile_recipe
from engine.errors import RecipeError
from engine.load import load_recipe
from engine.worker.context import Context, job_spec
from engine.worker.env import rank_info
from engine.worker.stages import collect

RECIPE = """
name: sharded
tokenizer: {kind: file, path: TMP/tokenizer.json}
model: {num_layers: 2, hidden_size: 64, num_attention_heads: 4, seq_length: 32}
stages:
  data:
    kind: data
    shard_samples: 40
    splits: {train: 0.8, valid: 0.1, test: 0.1}
    dedup: {near: true, decontaminate: true, decontamination_ngram: 4}
    sources:
      - {name: asks, plugin: jsonl, records: prompt, params: {glob: "TMP/asks/*.jsonl"}}
      - {name: books, plugin: text_files, records: text, params: {glob: "TMP/books/*.txt", unit: line}}
      - {name: chats, plugin: jsonl, records: conversation, params: {glob: "TMP/chats/*.jsonl"}}
      - {name: sums, plugin: arithmetic, records: preference, params: {num_samples: 150, max_operand: 50}}
"""


def _corpus(root: Path) -> None:
    """Seven files of prose, exact copies and near-copies of earlier documents in later files (so in
    later shards), chats over four files and prompts over three, some of them quoting a book."""
    from engine.corpus.tokenizer import train_bpe

    rng = np.random.default_rng(7)
    words = [f"w{i}" for i in range(300)]
    books = root / "books"
    books.mkdir(parents=True)
    docs = []
    for f in range(7):
        lines = []
        for _ in range(25):
            if docs and rng.random() < 0.15:
                lines.append(docs[int(rng.integers(len(docs)))])  # an exact copy of an earlier document
            elif docs and rng.random() < 0.15:
                base = docs[int(rng.integers(len(docs)))].split()
                base[int(rng.integers(len(base)))] = "changed"  # a near copy
                lines.append(" ".join(base))
            else:
                lines.append(" ".join(rng.choice(words, size=int(rng.integers(30, 60)))))
            docs.append(lines[-1])
        (books / f"{f:02d}.txt").write_text("\n".join(lines) + "\n")
    chats = root / "chats"
    chats.mkdir()
    for f in range(4):
        rows = [{"messages": [{"role": "user", "content": f"question {f} {i} " + " ".join(rng.choice(words, 6))},
                              {"role": "assistant", "content": " ".join(rng.choice(words, 8))}]}
                for i in range(30)]  # fmt: skip
        rows.append(rows[3])  # a repeat inside the file
        (chats / f"{f}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    asks = root / "asks"
    asks.mkdir()
    for f in range(3):
        rows = [{"prompt": f"ask {f} {i} " + " ".join(rng.choice(words, 5)), "reference": "x"} for i in range(20)]
        if f == 2:
            # Prompts that quote books: those that land in a held-out split contaminate their book.
            rows += [{"prompt": " ".join(docs[k].split()[:6]) + f" q{k}", "reference": "y"} for k in range(10, 60)]
        (asks / f"{f}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tok = train_bpe(docs[:50], vocab_size=400, min_frequency=1)
    tok.save(str(root / "tokenizer.json"))


def _run(tmp: Path, corpus: Path, *overrides: str) -> Path:
    recipe = tmp / "r.yaml"
    tmp.mkdir(parents=True, exist_ok=True)
    recipe.write_text(RECIPE.replace("TMP", str(corpus)))
    plan = compile_recipe(load_recipe(recipe, [f"run_dir={tmp}/run", "stages.data.dedup.threshold=0.7", *overrides]))
    ctx = Context(plan=plan, job=plan.job("data"), info=rank_info({}), device="cpu")
    collect.run(ctx, job_spec(ctx.job))
    return tmp / "run" / "data" / "data"


def test_sharded_stage_writes_the_unsharded_outputs(tmp_path: Path) -> None:
    """Over 3 and 4 shards (4: more shards than some sources' files; the arithmetic source cannot split and
    goes whole to shard 0), with exact and near dedup across shards and decontamination: every output file
    and the manifest's report and sources are the single process's."""
    corpus = tmp_path / "corpus"
    _corpus(corpus)
    one = _run(tmp_path / "one", corpus)
    report = json.loads((one / "manifest.json").read_text())
    dedup = report["report"]["dedup"]
    assert dedup["exact_duplicates"] > 5 and dedup["near_duplicates"] > 5, dedup
    assert report["report"]["decontamination"].get("contaminated", 0) >= 1
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert any(f.suffix == ".bin" for f in files) and any(f.suffix == ".tar" for f in files)
    for shards in (3, 4):
        out = _run(tmp_path / f"s{shards}", corpus, f"stages.data.shards={shards}", "stages.data.workers=2")
        theirs = json.loads((out / "manifest.json").read_text())
        assert theirs["report"] == report["report"] and theirs["sources"] == report["sources"], shards
        assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and p.name != "manifest.json") == files
        for f in files:
            assert (out / f).read_bytes() == (one / f).read_bytes(), (shards, f)
        assert not (tmp_path / f"s{shards}" / "run" / "data" / ".shards").exists()  # cleaned up once complete


def test_a_rerun_redoes_only_the_unfinished_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shard 2 fails (a preempted task); the rerun skips shards 0 and 1, whose outputs are complete, redoes
    shard 2 and the later passes, and writes the same outputs as one process."""
    from engine.worker.stages import sharded

    corpus = tmp_path / "corpus"
    _corpus(corpus)
    finished: list[str] = []
    finish, shard_pass = sharded._finish, sharded.shard_pass

    def recording(tmp: Path, final: Path) -> None:
        finished.append(final.name)
        finish(tmp, final)

    def failing_once(spec, root, index, *, stage):  # type: ignore[no-untyped-def]
        if index == 2 and not any(n.startswith("failed") for n in finished):
            finished.append("failed")
            raise RuntimeError("preempted")
        shard_pass(spec, root, index, stage=stage)

    monkeypatch.setattr(sharded, "_finish", recording)
    monkeypatch.setattr(sharded, "shard_pass", failing_once)
    with pytest.raises(RuntimeError):
        _run(tmp_path / "s", corpus, "stages.data.shards=3")
    assert finished == ["shard-00000", "shard-00001", "failed"]
    finished.clear()
    finished.append("failed")
    out = _run(tmp_path / "s", corpus, "stages.data.shards=3")
    assert finished[1:] == ["shard-00002", "dedup-00000", "dedup-00001", "dedup-00002", "write-00000", "write-00001",
                            "write-00002"]  # fmt: skip
    one = _run(tmp_path / "one", corpus)
    ours, theirs = (json.loads((d / "manifest.json").read_text()) for d in (out, one))
    assert ours["sources"] == theirs["sources"] and ours["report"] == theirs["report"]


def test_sharding_needs_a_tokenizer_that_exists(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("TMP", str(tmp_path)).replace("{kind: file, path: " + str(tmp_path) + "/tokenizer.json}",
                                                                   "{kind: train, vocab_size: 400}"))  # fmt: skip
    with pytest.raises(RecipeError) as err:
        compile_recipe(load_recipe(recipe, ["stages.data.shards=2"]))
    assert err.value.problems[0].path == "stages.data.shards" and "tokenizer" in err.value.problems[0].fix
