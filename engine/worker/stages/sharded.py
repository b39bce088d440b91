"""The data stage over `shards` tasks: the same outputs as one process, with no task holding every key.

Four passes, each over files in the stage's `.shards/` folder (a shared file system on a cluster):

1. `shard` (task i of N): reads shard i's share of every source — a contiguous run of the source's files
   (plugins that list their files, engine.plugin.DataSource.files), or the whole source for shard 0 when
   the plugin cannot split — in the stage's source order; cleans each record and computes its signature
   (engine.corpus.dedup.Signature) and split, exactly as the unsharded stage does, and spools the records
   that pass cleaning with their signatures. A document's place in the global order is (source, shard,
   place in the shard): the unsharded stage's reading order, since each shard holds a contiguous run.
2. `dedup` (task p of N): owns hash partition p. It reads every shard's signatures and keeps the exact
   digests and the LSH band buckets (band index, band values; the buckets datasketch's MinHashLSH uses)
   whose hash falls in p; of each digest all but the earliest document are exact duplicates, and of each
   bucket all but the earliest are near-duplicates (the unsharded rule: a document sharing a band with any
   earlier one is dropped, engine.corpus.dedup). Each partition writes the documents it drops.
3. `write` (task i of N): shard i's records minus every partition's drops of shard i, decontaminated
   against the held-out prompts of all shards (each shard lists its own), tokenised into indexed-dataset
   parts and tokenised samples. What a task holds grows with its shard, not with the corpus.
4. `merge` (one task): the parts joined in shard order into the stage's outputs (indexed datasets byte for
   byte as the unsharded stage's, shards re-cut at `shard_samples`), the reports summed, the manifest.

A pass's output appears under its final name only when complete (written to a temporary folder, then
renamed), and a task whose output is there returns at once: a rerun redoes only what failed.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ... import plugin
from ...artifacts import SPLITS
from ...chat import template_for
from ...corpus.clean import Cleaner
from ...corpus.dedup import Decontaminator
from ...schema import DataStage, SourceSpec
from . import corpus_io

SHARDS = ".shards"


def _share(items: list[str], index: int, count: int) -> list[str]:
    """The contiguous run of `items` that shard `index` of `count` reads."""
    n = len(items)
    return items[index * n // count : (index + 1) * n // count]


def _shard_records(src: SourceSpec, index: int, count: int, strict: bool, errors: Counter[str]) -> Iterator[Any]:
    """Shard `index`'s records of the source: its run of the files, or all of them (shard 0) or none (the
    others) when the plugin does not list its files."""
    found = plugin.data_sources()[src.plugin]
    if found.files is None or found.read_files is None:
        return corpus_io._records(src, strict, errors) if index == 0 else iter(())
    return corpus_io._records(src, strict, errors, share=lambda files: _share(files, index, count))


def _done(folder: Path) -> bool:
    return (folder / "done").is_file()


def _finish(tmp: Path, final: Path) -> None:
    (tmp / "done").write_text("done\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def _fresh(final: Path) -> Path:
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


# ---- pass 1: shard ------------------------------------------------------------------------------


def shard_pass(spec: DataStage, root: Path, index: int, *, stage: str) -> None:
    final = root / f"shard-{index:05d}"
    if _done(final):
        print(f"[{stage}] shard task {index}: finished in an earlier run, kept", flush=True)
        return
    tmp = _fresh(final)
    cleaner = Cleaner(spec.cleaning)
    pool = corpus_io.cleaning_pool(spec)
    errors: Counter[str] = Counter()
    reads: dict[str, int] = {}
    digests: list[np.ndarray] = []
    minhashes: list[np.ndarray] = []
    sources: list[int] = []  # each spooled record's source rank; its place in the shard is its index here
    order = sorted(range(len(spec.sources)), key=lambda i: corpus_io.KIND_ORDER[spec.sources[i].records])
    try:
        with (tmp / "records.jsonl").open("w", encoding="utf-8") as out, \
                (tmp / "heldout_prompts.jsonl").open("w", encoding="utf-8") as heldout:
            for rank, s in enumerate(order):
                src = spec.sources[s]
                reads[src.name] = 0
                records = _shard_records(src, index, spec.shards, spec.strict, errors)
                for record, (cleaned, sig) in corpus_io._cleaned(records, cleaner, spec.dedup, pool, 2 * spec.workers):
                    reads[src.name] += 1
                    if sig is None:
                        continue
                    split = corpus_io.split_of_digest(sig.digest, spec.splits)
                    row = {"kind": src.records, **asdict(record)}
                    out.write(json.dumps({"source": src.name, "split": split, "key": corpus_io.dedup_key(cleaned),
                                          "row": row}, default=list) + "\n")  # fmt: skip
                    if src.records == "prompt" and split != "train":  # what decontamination checks against
                        heldout.write(json.dumps([len(sources), record.prompt]) + "\n")
                    digests.append(np.frombuffer(sig.digest, dtype=np.uint8))
                    if sig.minhash is not None:
                        minhashes.append(sig.minhash)
                    sources.append(rank)
    finally:
        if pool is not None:
            pool.terminate()
    np.save(tmp / "digests.npy", np.array(digests, dtype=np.uint8).reshape(len(digests), 32))
    np.save(tmp / "sources.npy", np.array(sources, dtype=np.int32))
    if spec.dedup.near:
        np.save(tmp / "minhash.npy", np.array(minhashes, dtype=np.uint64).reshape(len(minhashes), spec.dedup.num_perm))
    (tmp / "report.json").write_text(json.dumps({"reads": reads, "cleaning": dict(cleaner.report),
                                                 "read_errors": dict(errors)}))  # fmt: skip
    _finish(tmp, final)
    print(f"[{stage}] shard {index + 1}/{spec.shards}: {len(sources)} records cleaned and signed", flush=True)


# ---- pass 2: dedup ------------------------------------------------------------------------------


def _owner(keys: np.ndarray, count: int) -> np.ndarray:
    """The partition of each key (rows of bytes): its first 8 bytes' value modulo `count`."""
    return (np.ascontiguousarray(keys[:, :8]).view("<u8")[:, 0] % np.uint64(count)).astype(np.int64)


def _bands(spec: DataStage) -> list[tuple[int, int]]:
    """The row ranges of datasketch's MinHashLSH bands for the stage's threshold and permutations."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=spec.dedup.threshold, num_perm=spec.dedup.num_perm)
    return list(lsh.hashranges)


def _earliest_dropped(keys: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Of rows with equal `keys` (rows of bytes), every one but the earliest by `order`: their row numbers."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64)
    whole = np.ascontiguousarray(keys).view(np.dtype((np.void, keys.shape[1]))).ravel()
    groups = np.unique(whole, return_inverse=True)[1].ravel()
    rows = np.lexsort((order, groups))  # by key, then by order
    later = np.concatenate([[False], groups[rows][1:] == groups[rows][:-1]])
    dropped: np.ndarray = rows[later]
    return dropped


def dedup_pass(spec: DataStage, root: Path, part: int, *, stage: str) -> None:
    final = root / f"dedup-{part:05d}"
    if _done(final):
        print(f"[{stage}] dedup task {part}: finished in an earlier run, kept", flush=True)
        return
    tmp = _fresh(final)
    n = spec.shards
    # Global order of a document: (source rank, shard, place in the shard).
    exact_keys, exact_where = [], []
    band_keys, band_where = [], []
    bands = _bands(spec) if spec.dedup.near else []
    for shard in range(n):
        folder = root / f"shard-{shard:05d}"
        digests = np.load(folder / "digests.npy")
        sources = np.load(folder / "sources.npy").astype(np.int64)
        where = np.stack([sources, np.full(len(sources), shard), np.arange(len(sources))], axis=1)
        if spec.dedup.exact:
            mine = _owner(digests, n) == part
            exact_keys.append(digests[mine])
            exact_where.append(where[mine])
        if bands:
            minhash = np.load(folder / "minhash.npy")
            for b, (lo, hi) in enumerate(bands):
                # A bucket is (band, the band's values); MinHash values are uniform, so the band's first value
                # (plus the band index) picks its owner.
                mine = (minhash[:, lo] + np.uint64(b)) % np.uint64(n) == np.uint64(part)
                values = np.ascontiguousarray(minhash[mine, lo:hi]).view(np.uint8).reshape(int(mine.sum()), -1)
                band_keys.append(np.concatenate([np.full((len(values), 1), b, dtype=np.uint8), values], axis=1))
                band_where.append(where[mine])
    out: dict[str, np.ndarray] = {}
    for name, keys, places in (("exact", exact_keys, exact_where), ("near", band_keys, band_where)):
        if not keys:
            out[name] = np.zeros((0, 3), dtype=np.int64)
            continue
        k, w = np.concatenate(keys), np.concatenate(places)
        order = np.lexsort((w[:, 2], w[:, 1], w[:, 0]))
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        dropped = w[_earliest_dropped(k, rank)]
        out[name] = np.unique(dropped, axis=0) if len(dropped) else dropped.reshape(0, 3)
    for shard in range(n):  # one file per shard, so that a shard's writer reads only its own drops
        np.savez(tmp / f"dropped-{shard:05d}.npz", **{k: v[v[:, 1] == shard][:, 2] for k, v in out.items()})
    _finish(tmp, final)
    print(f"[{stage}] dedup partition {part + 1}/{n}: {len(out['exact'])} exact and {len(out['near'])} near "
          "duplicates among its keys", flush=True)  # fmt: skip


# ---- pass 3: write ------------------------------------------------------------------------------


def _dropped(root: Path, n: int, shard: int) -> tuple[set[int], set[int]]:
    """Every partition's drops of one shard, as places in it: exact, and near ones that are not also exact."""
    exact: set[int] = set()
    near: set[int] = set()
    for part in range(n):
        with np.load(root / f"dedup-{part:05d}" / f"dropped-{shard:05d}.npz") as found:
            exact.update(int(i) for i in found["exact"])
            near.update(int(i) for i in found["near"])
    return exact, near - exact


def _rows(root: Path, shard: int) -> Iterator[dict[str, Any]]:
    with (root / f"shard-{shard:05d}" / "records.jsonl").open(encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def write_pass(spec: DataStage, root: Path, index: int, tok: Any, info: dict[str, Any], *, stage: str) -> None:
    final = root / f"write-{index:05d}"
    if _done(final):
        print(f"[{stage}] write task {index}: finished in an earlier run, kept", flush=True)
        return
    tmp = _fresh(final)
    n = spec.shards
    exact, near = _dropped(root, n, index)
    deco = Decontaminator(spec.dedup.decontamination_ngram) if spec.dedup.decontaminate else None
    if deco is not None:  # every shard's held-out prompts that survive dedup, in the global order
        for shard in range(n):
            gone = set().union(*_dropped(root, n, shard))
            with (root / f"shard-{shard:05d}" / "heldout_prompts.jsonl").open(encoding="utf-8") as f:
                for line in f:
                    place, prompt = json.loads(line)
                    if place not in gone:
                        deco.add_eval([prompt])
    counts: dict[str, Counter[str]] = {src.name: Counter() for src in spec.sources}
    dedup_report: Counter[str] = Counter()
    kept: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for place, item in enumerate(_rows(root, index)):
        dedup_report["seen"] += 1
        if place in exact:
            dedup_report["exact_duplicates"] += 1
            continue
        if place in near:
            dedup_report["near_duplicates"] += 1
            continue
        dedup_report["kept"] += 1
        row, split = item["row"], item["split"]
        if deco is not None and row["kind"] == "text" and split == "train" and not deco.clean(item["key"]):
            continue
        kept.setdefault((item["source"], split), []).append(row)
        counts[item["source"]][split] += 1
    tokenizing = corpus_io.Tokenizing(tok, template_for(info, tok), info["eod"], spec.workers)
    try:
        for src in spec.sources:
            for split in SPLITS:
                rows = kept.get((src.name, split), [])
                if src.records == "text":
                    tokenizing.write_text(iter(rows), str(tmp / f"{src.name}.{split}"))
                else:
                    with (tmp / f"{src.name}.{split}.jsonl").open("w", encoding="utf-8") as f:
                        for sample in tokenizing.samples(iter(rows)):
                            f.write(json.dumps(sample) + "\n")
    finally:
        tokenizing.close()
    deco_report = dict(deco.report) if deco is not None else {}
    (tmp / "report.json").write_text(json.dumps({"dedup": dict(dedup_report), "decontamination": deco_report,
                                                 "records": {k: dict(v) for k, v in counts.items()}}))  # fmt: skip
    _finish(tmp, final)
    print(f"[{stage}] shard {index + 1}/{n} written: {dedup_report['kept']} of {dedup_report['seen']} kept", flush=True)


# ---- pass 4: merge ------------------------------------------------------------------------------


def _joined_text(parts: list[str], prefix: Path, dtype: Any) -> dict[str, int]:
    """Indexed-dataset parts joined in order: the same bytes as one writer given all their documents."""
    from ...corpus.indexed import IndexWriter, read_lengths

    writer = IndexWriter(prefix, dtype)
    for part in parts:
        lengths = read_lengths(part + ".idx")
        flat = np.fromfile(part + ".bin", dtype=dtype)
        writer.append(flat, lengths)
    writer.finalize()
    return {"documents": writer.documents, "tokens": writer.tokens}


def _samples(parts: list[Path]) -> Iterator[dict[str, Any] | None]:
    for part in parts:
        with part.open(encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def merge_pass(spec: DataStage, root: Path, data: Path, info: dict[str, Any], tok: Any, *, stage: str) -> dict[str, Any]:
    """The stage's outputs in `data` from every shard's parts; returns (sources, report) for the manifest."""
    from ...corpus.indexed import token_dtype

    n = spec.shards
    shard_reports = [json.loads((root / f"shard-{i:05d}" / "report.json").read_text()) for i in range(n)]
    write_reports = [json.loads((root / f"write-{i:05d}" / "report.json").read_text()) for i in range(n)]
    dtype = token_dtype(tok.get_vocab_size())
    sources: dict[str, Any] = {}
    for src in spec.sources:
        entry: dict[str, Any] = {"records": src.records, "weight": src.weight, "splits": {}}
        for split in SPLITS:
            if src.records == "text":
                (data / src.name).mkdir(exist_ok=True)
                parts = [str(root / f"write-{i:05d}" / f"{src.name}.{split}") for i in range(n)]
                entry["splits"][split] = _joined_text(parts, data / src.name / split, dtype)
            else:
                samples = _samples([root / f"write-{i:05d}" / f"{src.name}.{split}.jsonl" for i in range(n)])
                shards, forged = corpus_io.write_shards(samples, data / src.name / split, spec.shard_samples)
                entry["splits"][split] = {
                    "samples": sum(s["samples"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
                    "shards": shards, **({"dropped_special_token_text": forged} if forged else {}),
                }  # fmt: skip
        sources[src.name] = entry
        print(f"[{stage}] {src.name}: " + ", ".join(f"{s} {v.get('documents', v.get('samples'))}"
                                                 for s, v in entry["splits"].items()), flush=True)  # fmt: skip

    def total(reports: list[dict[str, Any]], key: str) -> dict[str, int]:
        out: Counter[str] = Counter()
        for r in reports:
            out.update(r[key])
        return dict(out)

    records: dict[str, dict[str, int]] = {}
    for src in spec.sources:
        c: Counter[str] = Counter()
        if read := sum(r["reads"].get(src.name, 0) for r in shard_reports):
            c["read"] = read
        for r in write_reports:
            c.update(r["records"].get(src.name, {}))
        records[src.name] = dict(c)
    report = {"cleaning": total(shard_reports, "cleaning"), "dedup": total(write_reports, "dedup"),
              "decontamination": total(write_reports, "decontamination"),
              "read_errors": total(shard_reports, "read_errors"), "records": records}  # fmt: skip
    return {"sources": sources, "report": report}
