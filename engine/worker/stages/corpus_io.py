"""What the data stage's passes share, unsharded or sharded (engine.worker.stages.collect, .sharded): reading a
source (or a shard's run of its files), cleaning and signing records in a worker pool, the split of a
document, the tokenizer, and tokenising records into indexed datasets and shard samples in order.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import resource
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from ... import plugin
from ...chat import Template
from ...corpus.clean import Cleaner
from ...corpus.dedup import Signature, canonical, signature
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
from ..context import Context

KIND_ORDER = {"prompt": 0, "text": 1, "conversation": 2, "preference": 3}


def _children_cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


class PassClock:
    """Wall time and CPU time of each pass of the stage in this process: its own CPU time (threads included)
    and its worker pools' (children are counted once reaped: each pass closes its pool before it ends)."""

    def __init__(self) -> None:
        self.passes: dict[str, dict[str, float]] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        wall, cpu, pool = time.perf_counter(), time.process_time(), _children_cpu()
        try:
            yield
        finally:
            entry = self.passes.setdefault(name, {"wall_s": 0.0, "main_cpu_s": 0.0, "pool_cpu_s": 0.0})
            entry["wall_s"] += time.perf_counter() - wall
            entry["main_cpu_s"] += time.process_time() - cpu
            entry["pool_cpu_s"] += _children_cpu() - pool

    def report(self, spec: DataStage, size: int | None) -> dict[str, Any]:
        """What timing.json holds: the passes and, per megabyte of input, each pass's CPU seconds in this
        process and in its pools (what a cluster profile's `data_rates` are made of)."""
        out: dict[str, Any] = {"workers": spec.workers, "shards": spec.shards, "near_dedup": spec.dedup.near,
                               "input_bytes": size, "passes": {k: {n: round(v, 4) for n, v in p.items()}
                                                               for k, p in self.passes.items()}}  # fmt: skip
        if size:
            mb = size / 1e6
            out["per_mb"] = {k: {"main_cpu_s": round(p["main_cpu_s"] / mb, 5), "pool_cpu_s": round(p["pool_cpu_s"] / mb, 5)}
                             for k, p in self.passes.items()}  # fmt: skip
        return out


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


_worker: tuple[Cleaner, DedupSpec] | None = None

Cleaned = tuple[list[str | None], Signature | None]  # a record's cleaned texts; its signature unless dropped


def _init_worker(cleaning: CleaningSpec, dedup: DedupSpec) -> None:
    global _worker
    _worker = (Cleaner(cleaning), dedup)


def cleaning_pool(spec: DataStage) -> Any:
    """The pool that cleans and signs records (`_cleaned`), or None with one worker."""
    if spec.workers <= 1:
        return None
    return multiprocessing.get_context("fork").Pool(spec.workers, _init_worker, (spec.cleaning, spec.dedup))


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


def ordered_map(
    pool: Any, fn: Callable[[Any], Any], items: Iterator[tuple[Any, Any]], window: int
) -> Iterator[tuple[Any, Any]]:
    """For each (kept, argument) of `items`: (kept, fn(argument)), in order, fn computed in `pool` with at most
    `window` arguments in flight (`kept` stays in this process). Pipelined: while this process consumes one
    result (and reads the next item), the workers go on with the rest of the window, so the serial work here
    overlaps the parallel work there instead of taking turns with it."""
    pending: deque[tuple[Any, Any]] = deque()
    for kept, argument in items:
        pending.append((kept, pool.apply_async(fn, (argument,))))
        if len(pending) >= window:
            first, result = pending.popleft()
            yield first, result.get()
    while pending:
        first, result = pending.popleft()
        yield first, result.get()


def _cleaned(
    records: Iterator[Any], cleaner: Cleaner, dedup: DedupSpec, pool: Any, window: int
) -> Iterator[tuple[Any, Cleaned]]:
    """(record, (cleaned texts, signature)) in order. With a pool, batches are cleaned and signed in the
    worker processes, a bounded window of them at a time, so reading never runs ahead by more than the window."""
    if pool is None:
        for record in records:
            yield record, _clean_one(_fields(record), cleaner, dedup)
        return
    batches = ((batch, [_fields(r) for r in batch]) for batch in _batches(records, 256))
    for batch, (cleaned, report) in ordered_map(pool, _clean_batch, batches, window):
        cleaner.report.update(report)
        yield from zip(batch, cleaned, strict=True)


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
        for _, out in ordered_map(self.pool, _in_worker, ((None, (fn, batch)) for batch in batches), self.window):
            yield out

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


