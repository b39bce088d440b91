"""The data stage end to end on small local sources: outputs, manifest, cache, robustness."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from engine.chat import SpecialIds, render
from engine.compile import compile_recipe
from engine.errors import EngineError
from engine.load import load_recipe
from engine.worker.context import Context, job_spec
from engine.worker.env import rank_info
from engine.worker.stages import collect as stage

RECIPE = """
name: dtest
tokenizer: {kind: train, vocab_size: 400}
model: {num_layers: 2, hidden_size: 64, num_attention_heads: 4, seq_length: 32}
stages:
  data:
    kind: data
    shard_samples: 50
    splits: {train: 0.8, valid: 0.1, test: 0.1}
    sources:
      - {name: books, plugin: text_files, records: text, params: {glob: "TMP/books/*.txt"}}
      - {name: chats, plugin: jsonl, records: conversation, params: {glob: "TMP/chats.jsonl"}}
      - {name: sums, plugin: arithmetic, records: prompt, params: {num_samples: 200, max_operand: 100000}}
"""


def _setup(tmp_path: Path, *overrides: str) -> Context:
    tmp_path.mkdir(parents=True, exist_ok=True)
    books = tmp_path / "books"
    books.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(40):
        words = " ".join(f"word{w}" for w in rng.integers(0, 500, size=60))
        (books / f"{i:02d}.txt").write_text(f"Chapter {i}. {words}")
    (books / "copy.txt").write_text((books / "05.txt").read_text())  # an exact duplicate
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
            for i in range(120)]  # fmt: skip
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("TMP", str(tmp_path)))
    plan = compile_recipe(load_recipe(recipe, [f"run_dir={tmp_path}/run", *overrides]))
    return Context(plan=plan, job=plan.job("data"), info=rank_info({}), device="cpu")


def test_outputs_manifest_and_read_back(tmp_path: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from engine.corpus.tokenizer import load

    ctx = _setup(tmp_path)
    stage.run(ctx, job_spec(ctx.job))
    out = tmp_path / "run" / "data" / "data"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["report"]["dedup"]["exact_duplicates"] == 1
    books = manifest["sources"]["books"]["splits"]
    assert sum(s["documents"] for s in books.values()) == 40
    tok = load(tmp_path / "run" / "data" / "tokenizer" / "tokenizer.json")
    assert (
        manifest["tokenizer"]["sha256"]
        == hashlib.sha256((tmp_path / "run" / "data" / "tokenizer" / "tokenizer.json").read_bytes()).hexdigest()
    )
    text = "Chapter 3. word21 word22"
    assert tok.decode(tok.encode(text).ids) == text  # byte-level BPE round trip
    # The indexed dataset holds exactly the tokens of the spooled documents, each ending with <|eos|>.
    ds = IndexedDataset(str(out / "books" / "train"))
    assert len(ds) == books["train"]["documents"]
    assert sum(len(ds[i]) for i in range(len(ds))) == books["train"]["tokens"]
    first = ds[0].tolist()
    assert first[-1] == manifest["tokenizer"]["eod"]
    assert tok.decode(first[:-1]).startswith("Chapter")
    # Shards: sha256 and counts as the manifest says; conversations carry loss masks.
    chats = manifest["sources"]["chats"]["splits"]["train"]
    shard = out / "chats" / "train" / chats["shards"][0]["path"]
    assert hashlib.sha256(shard.read_bytes()).hexdigest() == chats["shards"][0]["sha256"]
    assert sum(s["samples"] for s in chats["shards"]) == chats["samples"]
    with tarfile.open(shard) as tar:
        sample = json.loads(tar.extractfile(tar.getmembers()[0]).read())  # type: ignore[union-attr]
    assert len(sample["tokens"]) == len(sample["loss_mask"]) and 0 < sum(sample["loss_mask"]) < len(sample["tokens"])
    prompts = manifest["sources"]["sums"]["splits"]["train"]
    assert prompts["samples"] > 0


def test_rerun_with_the_same_inputs_does_no_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ctx = _setup(tmp_path)
    stage.run(ctx, job_spec(ctx.job))
    stamp = (tmp_path / "run" / "data" / "data" / "manifest.json").stat().st_mtime_ns
    stage.run(ctx, job_spec(ctx.job))
    assert "up to date" in capsys.readouterr().out
    assert (tmp_path / "run" / "data" / "data" / "manifest.json").stat().st_mtime_ns == stamp
    # A source file that changes (same recipe) invalidates the outputs too.
    book = tmp_path / "books" / "00.txt"
    book.write_text(book.read_text() + " and an epilogue")
    stage.run(ctx, job_spec(ctx.job))
    assert (tmp_path / "run" / "data" / "data" / "manifest.json").stat().st_mtime_ns != stamp
    changed = _setup(tmp_path, "stages.data.sources[2].params.num_samples=100")
    stage.run(changed, job_spec(changed.job))
    assert (
        json.loads((tmp_path / "run" / "data" / "data" / "manifest.json").read_text())["cache_key"]
        == changed.job.cache_key
    )


def test_bad_records_are_counted_or_fatal_with_strict(tmp_path: Path) -> None:
    ctx = _setup(tmp_path)
    with (tmp_path / "chats.jsonl").open("a") as f:
        f.write("{not json\n")
    stage.run(ctx, job_spec(ctx.job))
    manifest = json.loads((tmp_path / "run" / "data" / "data" / "manifest.json").read_text())
    [(message, count)] = manifest["report"]["read_errors"].items()
    assert "chats" in message and "chats.jsonl:121" in message and count == 1
    strict = _setup(tmp_path, "stages.data.strict=true")
    with (tmp_path / "chats.jsonl").open("a") as f:
        f.write("{not json\n")
    with pytest.raises(EngineError, match=r"chats\.jsonl:121"):
        stage.run(strict, job_spec(strict.job))


def test_chat_template_masks_only_assistant_replies() -> None:
    ids = SpecialIds(pad=0, bos=1, eos=2, end=3, roles={"system": 4, "user": 5, "assistant": 6})

    def encode(text: str) -> list[int]:
        return [10 + len(w) for w in text.split()]

    tokens, mask = render([("user", "what is 2+2"), ("assistant", "four")], encode, ids)
    assert tokens == [1, 5, 14, 12, 13, 3, 6, 14, 3, 2]
    assert mask == [0, 0, 0, 0, 0, 0, 0, 1, 1, 0]
    prompt, _ = render([("user", "hi")], encode, ids, generation_prompt=True)
    assert prompt[-1] == 6 and 2 not in prompt


def test_worker_processes_give_the_same_outputs(tmp_path: Path) -> None:
    """Cleaning, signatures (exact and near dedup) and tokenisation run in the pool: every output file is the
    same bytes with 1, 2 or 3 workers, document order included."""
    runs = [_setup(tmp_path / f"w{n}", f"stages.data.workers={n}", "stages.data.dedup.near=true") for n in (1, 2, 3)]
    for ctx in runs:
        stage.run(ctx, job_spec(ctx.job))
    outs = [tmp_path / f"w{n}" / "run" / "data" / "data" for n in (1, 2, 3)]
    manifests = [json.loads((o / "manifest.json").read_text()) for o in outs]
    for m in manifests[1:]:
        assert m["report"] == manifests[0]["report"] and m["tokenizer"]["sha256"] == manifests[0]["tokenizer"]["sha256"]
        # Shards included, byte for byte: their sha256 are the same on every run and with any worker count.
        assert m["sources"] == manifests[0]["sources"]
    assert manifests[0]["report"]["dedup"]["exact_duplicates"] == 1
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file() and p.name != "manifest.json")
    assert any(f.suffix == ".bin" for f in files) and any(f.suffix == ".tar" for f in files)
    for out in outs[1:]:
        for f in files:
            assert (out / f).read_bytes() == (outs[0] / f).read_bytes(), f
    # Each run also measures its passes (beside the dataset, not in it): with a pool, the pool's CPU time is
    # counted apart from the main process's, per MB of the input the plan counts.
    timings = [json.loads((tmp_path / f"w{n}" / "run" / "data" / "timing.json").read_text()) for n in (1, 2, 3)]
    assert [t["workers"] for t in timings] == [1, 2, 3]
    for t in timings:
        assert set(t["passes"]) == {"clean", "tokenizer", "tokenize"}
        assert t["input_bytes"] == runs[0].job.data_estimate.input_bytes > 0  # type: ignore[union-attr]
        assert all(p["wall_s"] > 0 and p["main_cpu_s"] > 0 for p in t["passes"].values())
    assert timings[0]["passes"]["clean"]["pool_cpu_s"] < 0.05  # one worker: no pool
    assert all(t["per_mb"]["clean"]["pool_cpu_s"] > 0 and t["per_mb"]["tokenize"]["pool_cpu_s"] > 0 for t in timings[1:])


def test_index_writer_writes_megatrons_bytes(tmp_path: Path) -> None:
    """engine.corpus.indexed writes what Megatron-Core's IndexedDatasetBuilder writes, and Megatron reads it."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from engine.corpus.indexed import IndexWriter

    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 60_000, size=int(n)).astype(np.uint16) for n in rng.integers(1, 50, size=37)]
    ours = IndexWriter(tmp_path / "ours", np.dtype(np.uint16))
    for first in range(0, len(docs), 10):  # in batches, as the stage appends them
        batch = docs[first : first + 10]
        ours.append(np.concatenate(batch), np.array([len(d) for d in batch]))
    ours.finalize()
    theirs = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for d in docs:
        theirs.add_document(d, [len(d)])
    theirs.finalize(str(tmp_path / "theirs.idx"))
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"theirs{suffix}").read_bytes()
    read = IndexedDataset(str(tmp_path / "ours"))
    assert len(read) == len(docs) and all(np.array_equal(read[i], d) for i, d in enumerate(docs))
