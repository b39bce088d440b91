"""Stage 1: data collection — plugin sources → clean → dedup → tokenizer → indexed data and shards.

Pass 1 streams every source once, in recipe order with prompt sources first (their held-out prompts
are what training text is decontaminated against). Each record is normalised and cleaned, deduplicated
across all sources (exact and MinHash-LSH near-duplicates), assigned to train/valid/test by a hash of
its content (stable across reruns and independent of order), and spooled to JSON lines on disk, so
memory does not grow with the corpus. With `workers` > 1, normalising and filtering run in that many
worker processes; deduplication, which needs every earlier document, stays in the main process. A
record a source cannot read is counted with its reason and skipped (`strict: true` stops instead).

Then the tokenizer is trained on the spooled training text (or loaded), and pass 2 tokenises the spools:
text into Megatron-Core indexed datasets (`<source>/<split>.bin/.idx`, each document ending with
<|eos|>), conversations, preference pairs and prompts into webdataset tar shards with the chat
template's tokens and loss masks. manifest.json records the tokenizer, counts, tokens, shard hashes
and every filter's report. Everything is written into a temporary folder and renamed into place
when complete; a rerun whose cache key and input fingerprints (files' sizes and times) match the
manifest does no work.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from ... import plugin
from ...artifacts import SPLITS, read_json, write_json_atomic
from ...chat import Template, template_for
from ...corpus.clean import Cleaner
from ...corpus.dedup import Decontaminator, Deduplicator, Signature, canonical, signature
from ...corpus.tokenizer import describe, describe_hf, load, train_bpe
from ...errors import EngineError, ForgedTurn
from ...schema import (
    CleaningSpec,
    DataStage,
    DedupSpec,
    HfTokenizer,
    SourceSpec,
    SplitSpec,
    TokenizerSpec,
    TrainTokenizer,
)
from .. import comm
from ..context import Context

KIND_ORDER = {"prompt": 0, "text": 1, "conversation": 2, "preference": 3}


def split_of(text: str, splits: SplitSpec) -> str:
    """train/valid/test from a hash of the content: stable, order-independent."""
    return split_of_digest(hashlib.sha256(canonical(text).encode()).digest(), splits)


def split_of_digest(digest: bytes, splits: SplitSpec) -> str:
    """split_of for the SHA-256 of the normalised text (a document's Signature.digest)."""
    x = int.from_bytes(digest[:8], "little") / 2**64
    if x < splits.valid:
        return "valid"
    if x < splits.valid + splits.test:
        return "test"
    return "train"


def _fields(record: Any) -> list[str]:
    """The texts of a record that cleaning applies to."""
    if isinstance(record, plugin.Text):
        return [record.text]
    if isinstance(record, plugin.Conversation):
        return [m.content for m in record.messages]
    if isinstance(record, plugin.Preference):
        return [record.prompt, record.chosen, record.rejected]
    return [record.prompt]


def _records(
    src: SourceSpec, strict: bool, errors: Counter[str], share: Callable[[list[str]], list[str]] | None = None
) -> Iterator[Any]:
    """The source's records; unreadable ones are counted with file and line, or fatal when strict. With
    `share`, only those of the files it picks from the plugin's list (a shard's run of them)."""
    found = plugin.data_sources()[src.plugin]
    params = found.params.model_validate(src.params)
    try:
        if share is None or found.files is None or found.read_files is None:
            records = found.read(params, src.records)
        else:
            records = found.read_files(params, src.records, share(found.files(params)))
        for record in records:
            if isinstance(record, plugin.Skip):
                if strict:
                    raise EngineError(f"source {src.name!r}: {record.where}: {record.reason}")
                errors[f"{src.name}: {record.where}: {record.reason}"] += 1
                continue
            yield record
    except OSError as exc:  # the source itself is unreadable (missing files, permissions)
        raise EngineError(f"source {src.name!r}: {exc}") from None


class Progress:
    """A line every few seconds: documents read, docs/s and MB/s since the stage started."""

    def __init__(self, stage: str, every: float = 5.0) -> None:
        self.stage, self.every = stage, every
        self.start = self.last = time.monotonic()
        self.docs = self.chars = 0

    def advance(self, source: str, chars: int) -> None:
        self.docs += 1
        self.chars += chars
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            rate = now - self.start
            print(f"[{self.stage}] {source}: {self.docs} documents read, {self.docs / rate:.0f} docs/s, "
                  f"{self.chars / rate / 1e6:.2f} MB/s", flush=True)  # fmt: skip


_worker: tuple[Cleaner, DedupSpec] | None = None

Cleaned = tuple[list[str | None], Signature | None]  # a record's cleaned texts; its signature unless dropped


def _init_worker(cleaning: CleaningSpec, dedup: DedupSpec) -> None:
    global _worker
    _worker = (Cleaner(cleaning), dedup)


def _clean_one(texts: list[str], cleaner: Cleaner, dedup: DedupSpec) -> Cleaned:
    """A record's texts normalised and filtered, and the signature of what is kept (its dedup key)."""
    cleaned = [cleaner.clean(t) for t in texts]
    if any(c is None for c in cleaned):
        return cleaned, None
    return cleaned, signature(dedup_key(cleaned), dedup)


def dedup_key(cleaned: list[str | None]) -> str:
    return "\x00".join(c for c in cleaned if c is not None)


def _clean_batch(batch: list[list[str]]) -> tuple[list[Cleaned], Counter[str]]:
    """In a worker process: a batch of records cleaned, with their signatures."""
    assert _worker is not None
    cleaner, dedup = _worker
    cleaner.report.clear()
    return [_clean_one(texts, cleaner, dedup) for texts in batch], Counter(cleaner.report)


def _cleaned(
    records: Iterator[Any], cleaner: Cleaner, dedup: DedupSpec, pool: Any, window: int
) -> Iterator[tuple[Any, Cleaned]]:
    """(record, (cleaned texts, signature)) in order. With a pool, a bounded window of batches is cleaned and
    signed in the worker processes at a time, so reading never runs ahead by more than the window."""
    if pool is None:
        for record in records:
            yield record, _clean_one(_fields(record), cleaner, dedup)
        return
    batches = _batches(records, 256)
    while chunk := list(itertools.islice(batches, window)):
        results = pool.map(_clean_batch, [[_fields(r) for r in batch] for batch in chunk])
        for batch, (cleaned, report) in zip(chunk, results, strict=True):
            cleaner.report.update(report)
            yield from zip(batch, cleaned, strict=True)


def collect(spec: DataStage, *, stage: str, spool: Path) -> dict[str, Any]:
    """Pass 1: read, clean, dedup, decontaminate and split every source into spool files."""
    cleaner = Cleaner(spec.cleaning)
    workers = spec.workers
    pool = (multiprocessing.get_context("fork").Pool(workers, _init_worker, (spec.cleaning, spec.dedup))
            if workers > 1 else None)  # fmt: skip
    try:
        return _collect(spec, stage, spool, cleaner, pool)
    finally:
        if pool is not None:
            pool.terminate()


def _collect(spec: DataStage, stage: str, spool: Path, cleaner: Cleaner, pool: Any) -> dict[str, Any]:
    dedup_spec = spec.dedup
    dedup = Deduplicator(dedup_spec)
    deco = Decontaminator(dedup_spec.decontamination_ngram) if dedup_spec.decontaminate else None
    splits = spec.splits
    errors: Counter[str] = Counter()
    counts: dict[str, Counter[str]] = {}
    progress = Progress(stage)
    for src in sorted(spec.sources, key=lambda s: KIND_ORDER[s.records]):
        name, kind = src.name, src.records
        counts[name] = Counter()
        files = {s: (spool / f"{name}.{s}.jsonl").open("w", encoding="utf-8") for s in SPLITS}
        try:
            records = _records(src, spec.strict, errors)
            for record, (cleaned, sig) in _cleaned(records, cleaner, dedup_spec, pool, 2 * spec.workers):
                counts[name]["read"] += 1
                progress.advance(name, sum(len(t) for t in _fields(record)))
                if sig is None:
                    continue
                if not dedup.keep_signature(sig):
                    continue
                key = dedup_key(cleaned)
                split = split_of_digest(sig.digest, splits)
                if deco is not None:
                    if kind == "prompt" and split != "train":
                        deco.add_eval([record.prompt])
                    elif kind == "text" and split == "train" and not deco.clean(key):
                        continue
                files[split].write(json.dumps({"kind": kind, **asdict(record)}, default=list) + "\n")
                counts[name][split] += 1
        finally:
            for f in files.values():
                f.close()
    return {
        "cleaning": dict(cleaner.report),
        "dedup": dict(dedup.report),
        "decontamination": dict(deco.report) if deco else {},
        "read_errors": dict(errors),
        "records": {k: dict(v) for k, v in counts.items()},
    }


def _spooled(spool: Path, name: str, split: str) -> Iterator[dict[str, Any]]:
    with (spool / f"{name}.{split}.jsonl").open(encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _training_text(sources: list[SourceSpec], spool: Path) -> Iterator[str]:
    for src in sources:
        for row in _spooled(spool, src.name, "train"):
            yield from _texts(row)


def _texts(row: dict[str, Any]) -> list[str]:
    kind = row["kind"]
    if kind == "text":
        return [row["text"]]
    if kind == "conversation":
        return [m["content"] for m in row["messages"]]
    if kind == "preference":
        return [row["prompt"], row["chosen"], row["rejected"]]
    return [row["prompt"], row.get("reference") or ""]


def tokenizer(ctx: Context, sources: list[SourceSpec], spool: Path, out: Path) -> tuple[Any, dict[str, Any]]:
    spec = TypeAdapter(TokenizerSpec).validate_python(ctx.plan.tokenizer)
    if isinstance(spec, TrainTokenizer):
        tok = train_bpe(_training_text(sources, spool), vocab_size=spec.vocab_size, min_frequency=spec.min_frequency)
        path = out / "tokenizer.json"
        tok.save(str(path))
    elif isinstance(spec, HfTokenizer):
        if not (Path(spec.path) / "tokenizer.json").is_file():
            raise EngineError(f"tokenizer.path: {spec.path} has no tokenizer.json")
        tok, info = describe_hf(Path(spec.path))
    else:
        path = Path(spec.path)
        if not path.is_file():
            raise EngineError(f"tokenizer.path: {path} not found")
        tok = load(path)
    if not isinstance(spec, HfTokenizer):
        info = describe(path, tok)
    if info["vocab_size"] > ctx.plan.model.padded_vocab_size:
        raise EngineError(
            f"the tokenizer has {info['vocab_size']} tokens but the plan was compiled for "
            f"{ctx.plan.model.vocab_size}; set tokenizer.vocab_size to it"
        )
    return tok, info


def _batches(rows: Iterator[Any], size: int = 512) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_texts(tok: Any, eod: int, texts: list[str], dtype: Any) -> tuple[Any, Any]:
    """The documents' token ids, each followed by `eod`, flattened; and each one's length."""
    import numpy as np

    # encode_batch_fast skips the offsets that encode_batch computes and we never use.
    encoded = [enc.ids for enc in tok.encode_batch_fast(texts)]
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int32, count=len(encoded))
    flat = np.fromiter(itertools.chain.from_iterable((*ids, eod) for ids in encoded), dtype=dtype,
                       count=int(lengths.sum()))  # fmt: skip
    return flat, lengths


class Tokenizing:
    """Pass 2's tokenisation: in this process, or with `workers` > 1 in a pool of that many (forked after the
    tokenizer is ready; each worker encodes on one core). Batches go out in a bounded window and come back
    in order, so the outputs are the same bytes for any number of workers."""

    def __init__(self, tok: Any, template: Template | None, eod: int, workers: int) -> None:
        import os

        from ...corpus.indexed import token_dtype

        self.state = (tok, template, eod, token_dtype(tok.get_vocab_size()))
        self.window = 2 * workers
        self.pool: Any = None
        if workers > 1:
            global _tokenizing
            _tokenizing = self.state
            # The workers encode single-threaded (said explicitly: HF tokenizers warns when it is forked
            # after using its thread pool); this process keeps its own setting.
            before = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            try:
                self.pool = multiprocessing.get_context("fork").Pool(workers)
            finally:
                if before is None:
                    os.environ.pop("TOKENIZERS_PARALLELISM", None)
                else:
                    os.environ["TOKENIZERS_PARALLELISM"] = before

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()

    def _ordered(self, fn: Any, batches: Iterator[list[Any]]) -> Iterator[Any]:
        if self.pool is None:
            yield from (fn(batch, self.state) for batch in batches)
            return
        while chunk := list(itertools.islice(batches, self.window)):
            yield from self.pool.map(_in_worker, [(fn, batch) for batch in chunk])

    def write_text(self, rows: Iterator[dict[str, Any]], prefix: str) -> dict[str, int]:
        """One indexed dataset (engine.corpus.indexed) of the rows' texts, each ending with <|eos|>."""
        from ...corpus.indexed import IndexWriter

        writer = IndexWriter(prefix, self.state[3])
        for flat, lengths in self._ordered(_encode_batch, (list(b) for b in _batches(rows, 1024))):
            writer.append(flat, lengths)
        writer.finalize()
        return {"documents": writer.documents, "tokens": writer.tokens}

    def samples(self, rows: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any] | None]:
        """Each spooled record as chat-template tokens (None where its text would forge a turn)."""
        for batch in self._ordered(_tokenize_batch, _batches(rows, 256)):
            yield from batch


_tokenizing: tuple[Any, Template | None, int, Any] | None = None  # what forked tokenising workers use


def _in_worker(job: tuple[Any, list[Any]]) -> Any:
    fn, batch = job
    assert _tokenizing is not None
    return fn(batch, _tokenizing)


def _encode_batch(rows: list[dict[str, Any]], state: tuple[Any, Template | None, int, Any]) -> tuple[Any, Any]:
    tok, _, eod, dtype = state
    return encode_texts(tok, eod, [r["text"] for r in rows], dtype)


def _tokenize_batch(rows: list[dict[str, Any]], state: tuple[Any, Template | None, int, Any]) -> list[dict[str, Any] | None]:
    template = state[1]
    assert template is not None
    out: list[dict[str, Any] | None] = []
    for row in rows:
        try:
            out.append(tokenize_row(row, template))
        except ForgedTurn:
            out.append(None)
    return out


def tokenize_row(row: dict[str, Any], template: Template) -> dict[str, Any]:
    """A spooled record as chat-template tokens (and loss masks where the model learns a reply)."""
    kind = row["kind"]
    if kind == "conversation":
        tokens, mask = template.render([(m["role"], m["content"]) for m in row["messages"]])
        return {"tokens": tokens, "loss_mask": mask}
    asked = [("user", row["prompt"])]
    prompt, _ = template.render(asked, generation_prompt=True)
    if kind == "prompt":  # metadata: what a reward function may need of the prompt (a test case, a unit, a rubric)
        return {"prompt": prompt, "prompt_text": row["prompt"], "reference": row.get("reference"),
                "metadata": row.get("metadata") or {}}  # fmt: skip
    chosen, rejected = (template.reply(asked, row[k]) for k in ("chosen", "rejected"))
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def write_shards(samples: Iterator[dict[str, Any] | None], folder: Path, per: int) -> tuple[list[dict[str, Any]], int]:
    """The tokenised records as webdataset shards of `per` samples; also how many were dropped (None) because a
    message's text holds a special token of the template (parsed, it would forge a turn)."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    writer: Any = None
    forged, i = 0, 0
    for sample in samples:
        if sample is None:
            forged += 1
            continue
        if i % per == 0:
            if writer is not None:
                writer.close()
            path = folder / f"shard-{len(shards):06d}.tar"
            writer = wds.TarWriter(str(path), mtime=0)  # the same bytes on every run: reproducible sha256
            shards.append({"path": path.name, "samples": 0, "tokens": 0})
        writer.write({"__key__": f"{i:09d}", "json": sample})
        shards[-1]["samples"] += 1
        shards[-1]["tokens"] += sum(len(v) for v in sample.values() if isinstance(v, list))
        i += 1
    if writer is not None:
        writer.close()
    for shard in shards:
        shard["sha256"] = hashlib.sha256((folder / shard["path"]).read_bytes()).hexdigest()
    return shards, forged


def input_fingerprint(sources: list[SourceSpec]) -> dict[str, str]:
    """Per source, what its plugin reads beyond the recipe (file sizes and times), for the cache."""
    out = {}
    for src in sources:
        found = plugin.data_sources()[src.plugin]
        if found.fingerprint is not None:
            out[src.name] = found.fingerprint(found.params.model_validate(src.params))
    return out


def run(ctx: Context, spec: DataStage) -> None:
    job = ctx.job
    data_out = Path(next(a.path for a in job.outputs if a.kind == "dataset"))
    tok_out = next((Path(a.path) for a in job.outputs if a.kind == "tokenizer"), None)
    manifest_path = data_out / "manifest.json"
    inputs = input_fingerprint(spec.sources)
    if manifest_path.is_file():
        old = read_json(manifest_path)
        if old.get("cache_key") == job.cache_key and old.get("inputs") == inputs:
            print(f"[{job.name}] up to date: {data_out}", flush=True)
            return
    if ctx.info.rank > 0:  # a task of a sharded stage on several nodes, not its first: passes only
        _sharded(ctx, spec, None, {"cache_key": job.cache_key, "inputs": inputs})
        return
    build = ctx.stage_dir / ".build"
    shutil.rmtree(build, ignore_errors=True)
    (build / "data").mkdir(parents=True)
    (build / "spool").mkdir()
    (build / "tokenizer").mkdir()
    if spec.shards > 1:
        sources, report, info = _sharded(ctx, spec, build, {"cache_key": job.cache_key, "inputs": inputs})
    else:
        print(f"[{job.name}] reading, cleaning and deduplicating {len(spec.sources)} sources", flush=True)
        report = collect(spec, stage=job.name, spool=build / "spool")
        tok, info = tokenizer(ctx, spec.sources, build / "spool", build / "tokenizer")
        tokenizing = Tokenizing(tok, template_for(info, tok), info["eod"], spec.workers)
        try:
            sources = _tokenize(job.name, spec, build, tokenizing)
        finally:
            tokenizing.close()
    mixture = effective_mixture(sources)
    for records, shares in mixture.items():
        print(f"[{job.name}] mixture of {records} records: "
              + ", ".join(f"{n} {share:.3f}" for n, share in shares.items()), flush=True)  # fmt: skip
    if tok_out is not None:
        info["path"] = str(tok_out / "tokenizer.json")
    write_json_atomic(
        build / "data" / "manifest.json",
        {"cache_key": job.cache_key, "inputs": inputs, "tokenizer": info, "sources": sources, "report": report,
         "mixture": mixture},
    )  # fmt: skip
    _install(build, data_out, tok_out)
    shutil.rmtree(ctx.stage_dir / ".shards", ignore_errors=True)  # a sharded stage's passes, now complete


def _sharded(
    ctx: Context, spec: DataStage, build: Path | None, key: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The stage over `shards` tasks (engine.worker.stages.sharded). The job's processes (one, or one per
    node on a cluster) take the tasks of each pass in turn — process r those numbered r, r + world, ... —
    and wait for each other between passes; the first process merges (the others pass `build` None and
    return after the last pass). Finished tasks' outputs stay in the stage's .shards folder until the stage
    completes, so a rerun after a failure redoes only the rest (a changed recipe or input starts over)."""
    from . import sharded

    name, n, rank, world = ctx.job.name, spec.shards, ctx.info.rank, ctx.info.world_size
    root = ctx.stage_dir / sharded.SHARDS
    if rank == 0:
        if root.is_dir() and (not (root / "key.json").is_file() or read_json(root / "key.json") != key):
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(root / "key.json", key)
        print(f"[{name}] {len(spec.sources)} sources over {n} shards, {world} process{'es' if world > 1 else ''}",
              flush=True)  # fmt: skip
    comm.barrier()
    for i in range(rank, n, world):
        sharded.shard_pass(spec, root, i, stage=name)
    comm.barrier()
    for p in range(rank, n, world):
        sharded.dedup_pass(spec, root, p, stage=name)
    comm.barrier()
    tok, info = tokenizer(ctx, spec.sources, root, root)  # given, never trained (the compiler sees to that)
    for i in range(rank, n, world):
        sharded.write_pass(spec, root, i, tok, info, stage=name)
    comm.barrier()
    if build is None:
        return {}, {}, info
    merged = sharded.merge_pass(spec, root, build / "data", info, tok, stage=name)
    return merged["sources"], merged["report"], info


def _tokenize(stage: str, spec: DataStage, build: Path, tokenizing: Tokenizing) -> dict[str, Any]:
    """Pass 2: every source's spooled splits tokenised into indexed datasets (text) or shards."""
    sources: dict[str, Any] = {}
    for src in spec.sources:
        name, kind = src.name, src.records
        entry: dict[str, Any] = {"records": kind, "weight": src.weight, "splits": {}}
        for split in SPLITS:
            rows = _spooled(build / "spool", name, split)
            if kind == "text":
                (build / "data" / name).mkdir(exist_ok=True)
                entry["splits"][split] = tokenizing.write_text(rows, str(build / "data" / name / split))
            else:
                shards, forged = write_shards(tokenizing.samples(rows), build / "data" / name / split,
                                              spec.shard_samples)  # fmt: skip
                entry["splits"][split] = {
                    "samples": sum(s["samples"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
                    "shards": shards, **({"dropped_special_token_text": forged} if forged else {}),
                }  # fmt: skip
        sources[name] = entry
        print(f"[{stage}] {name}: " + ", ".join(f"{s} {v.get('documents', v.get('samples'))}"
                                                  for s, v in entry["splits"].items()), flush=True)  # fmt: skip
        if forged_total := sum(v.get("dropped_special_token_text", 0) for v in entry["splits"].values()):
            print(f"[{stage}] {name}: dropped {forged_total} records whose text holds a special token of the chat "
                  "template (parsed, it would forge a turn)", flush=True)  # fmt: skip
    return sources


def effective_mixture(sources: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per record kind, the share of training samples each source gives the stages that read it: its weight
    over the weights of the sources of that kind that have training samples (pretraining's `mixture` may
    override the text shares)."""
    out: dict[str, dict[str, float]] = {}
    for name, entry in sources.items():
        train = entry["splits"].get("train", {})
        if train.get("documents", train.get("samples", 0)):
            out.setdefault(entry["records"], {})[name] = float(entry["weight"])
    return {kind: {n: w / sum(ws.values()) for n, w in ws.items()} for kind, ws in sorted(out.items())}


def _install(build: Path, data_out: Path, tok_out: Path | None) -> None:
    """Replace the previous outputs only now that the new ones are complete."""
    shutil.rmtree(build / "spool")
    for new, final in ((build / "data", data_out), (build / "tokenizer", tok_out)):
        if final is None:
            continue
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        new.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(build, ignore_errors=True)
