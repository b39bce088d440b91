"""Stage 1: data collection — plugin sources → clean → dedup → tokenizer → indexed data and shards.

Pass 1 streams every source once, in recipe order with prompt sources first (their held-out prompts
are what training text is decontaminated against). Each record is normalised and cleaned, deduplicated
across all sources (exact and MinHash-LSH near-duplicates), assigned to train/valid/test by a hash of
its content (stable across reruns and independent of order), and spooled to JSON lines on disk, so
memory does not grow with the corpus. With `workers` > 1, normalising, filtering and each record's
dedup signature run in that many worker processes; the look-up of the signatures, which needs every
earlier document, stays in the main process. A record a source cannot read is counted with its reason
and skipped (`strict: true` stops instead).

Then the tokenizer is trained on the spooled training text (or loaded), and pass 2 tokenises the spools:
text into Megatron-Core indexed datasets (`<source>/<split>.bin/.idx`, each document ending with
<|eos|>), conversations, preference pairs and prompts into webdataset tar shards with the chat
template's tokens and loss masks, in a worker pool with `workers` > 1 (engine.worker.stages.corpus_io),
in order. With `shards` > 1 the same outputs come from tasks over shards of the input files
(engine.worker.stages.sharded). manifest.json records the tokenizer, counts, tokens, shard hashes
and every filter's report. Everything is written into a temporary folder and renamed into place
when complete; a rerun whose cache key and input fingerprints (files' sizes and times) match the
manifest does no work.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ... import plugin
from ...artifacts import SPLITS, read_json, write_json_atomic
from ...chat import template_for
from ...corpus.clean import Cleaner
from ...corpus.dedup import Decontaminator, Deduplicator
from ...schema import (
    DataStage,
    SourceSpec,
)
from .. import comm, preempt
from ..context import Context
from ..faults import maybe_kill
from .corpus_io import (
    KIND_ORDER,
    PassClock,
    Tokenizing,
    _cleaned,
    _fields,
    _records,
    _spooled,
    cleaning_pool,
    dedup_key,
    split_of_digest,
    tokenizer,
    write_shards,
)


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


def collect(spec: DataStage, *, stage: str, spool: Path) -> dict[str, Any]:
    """Pass 1: read, clean, dedup, decontaminate and split every source into spool files."""
    cleaner = Cleaner(spec.cleaning)
    pool = cleaning_pool(spec)
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
    clock = PassClock()
    if ctx.info.rank > 0:  # a task of a sharded stage on several nodes, not its first: passes only
        _sharded(ctx, spec, None, {"cache_key": job.cache_key, "inputs": inputs}, clock)
        return
    build = ctx.stage_dir / ".build"
    shutil.rmtree(build, ignore_errors=True)
    (build / "data").mkdir(parents=True)
    (build / "spool").mkdir()
    (build / "tokenizer").mkdir()
    if spec.shards > 1:
        sources, report, info = _sharded(ctx, spec, build, {"cache_key": job.cache_key, "inputs": inputs}, clock)
    else:
        print(f"[{job.name}] reading, cleaning and deduplicating {len(spec.sources)} sources", flush=True)
        with clock("clean"):
            report = collect(spec, stage=job.name, spool=build / "spool")
        with clock("tokenizer"):
            tok, info = tokenizer(ctx, spec.sources, build / "spool", build / "tokenizer")
        with clock("tokenize"):
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
    # Per MB of the input the plan's estimate counted (None when a source's size is unknown before reading).
    size = job.data_estimate.input_bytes if job.data_estimate and not job.data_estimate.unknown_sources else None
    timing = clock.report(spec, size)
    write_json_atomic(ctx.stage_dir / "timing.json", timing)
    print(f"[{job.name}] passes: " + ", ".join(f"{k} {v['wall_s']:.1f}s" for k, v in timing["passes"].items())
          + f" (CPU time per pass and per MB of input: {ctx.stage_dir / 'timing.json'})", flush=True)  # fmt: skip


def _sharded(
    ctx: Context, spec: DataStage, build: Path | None, key: dict[str, Any], clock: PassClock
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

    def in_rounds(what: str, task: Callable[[int], None]) -> None:
        """Tasks rank, rank + world, ... of a pass, in rounds that every process takes part in, each ending with
        the preemption check (a collective): on Slurm's signal the finished tasks stay and the job is requeued,
        so that its next run starts with the first unfinished one. Then the processes wait for each other."""
        for first in range(0, n, world):
            if first + rank < n:
                task(first + rank)
                if what == "shard":
                    maybe_kill("after_shard_task", first + rank)
            if preempt.requested():
                finished = min(first + world, n)
                preempt.requeue_after(f"{finished} of {n} {what} tasks finished and kept",
                                      resume="go on from the first unfinished one")  # fmt: skip
        comm.barrier()

    with clock("shard"):  # each pass's wall time includes the wait for the other processes' tasks
        in_rounds("shard", lambda i: sharded.shard_pass(spec, root, i, stage=name))
    with clock("dedup"):
        in_rounds("dedup", lambda p: sharded.dedup_pass(spec, root, p, stage=name))
    with clock("tokenizer"):
        tok, info = tokenizer(ctx, spec.sources, root, root)  # given, never trained (the compiler sees to that)
    with clock("write"):
        in_rounds("write", lambda i: sharded.write_pass(spec, root, i, tok, info, stage=name))
    if build is None:
        return {}, {}, info
    with clock("merge"):
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
