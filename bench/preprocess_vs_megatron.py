"""Tokenise-and-index docs/s against the loop of Megatron-LM's `tools/preprocess_data.py`, at equal workers.

The reference is re-created here from that script's documented algorithm (it cannot run without
Megatron-LM's training package, which megatron-core's wheel does not ship): a `multiprocessing.Pool` of
`--workers` processes maps an encoder over the JSONL lines with `imap(..., chunksize=32)`; each call does
`json.loads`, encodes the document alone and appends the end-of-document id; the main process adds every
document to Megatron-Core's `IndexedDatasetBuilder` (`add_document`) and finalises the index. The same
tokenizer (an HF `tokenizers` BPE, encoding one document per call as Megatron's HuggingFace tokenizer
wrapper does) and the same generated JSONL corpus feed:

  (M) the reference loop;
  (E) the engine's tokenise-and-index path: the JSONL lines parsed in this process and handed to
      `engine.worker.stages.collect.Tokenizing(..., workers).write_text` (batched `encode_batch_fast`,
      in a forked pool when workers > 1, in this process on every core when 1);
  (S) the whole data stage with cleaning and exact dedup (more work than (M): reading through the
      source plugin, normalising, filtering, hashing, splitting, spooling), in a fresh process.
Runs are interleaved `--repeats` times per variant; medians. Goals: (E) ≥ 3× (M) and (S) ≥ 2× (M) at
equal workers. With workers=1 the reference encodes on one core while the engine's in-process encoder
uses every core, so the equal-cores comparison is workers = the core count.

    .venv/bin/python bench/preprocess_vs_megatron.py [--mb 10] [--workers 1 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

_tok: Any = None
EOD = 2


def _init(path: str) -> None:
    global _tok
    from tokenizers import Tokenizer

    _tok = Tokenizer.from_file(path)


def _encode(line: str) -> tuple[list[int], int]:
    ids = _tok.encode(json.loads(line)["text"]).ids
    ids.append(EOD)
    return ids, len(line)


def reference(corpus: Path, tokenizer: Path, prefix: str, workers: int) -> float:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    began = time.perf_counter()
    with corpus.open(encoding="utf-8") as fin:
        pool = multiprocessing.get_context("fork").Pool(workers, initializer=_init, initargs=(str(tokenizer),))
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        for ids, _ in pool.imap(_encode, fin, 32):
            builder.add_document(ids, [len(ids)])
        builder.finalize(prefix + ".idx")
        pool.close()
        pool.join()
    return time.perf_counter() - began


def engine_path(corpus: Path, tokenizer: Path, prefix: str, workers: int) -> float:
    from tokenizers import Tokenizer

    from engine.worker.stages.collect import Tokenizing

    began = time.perf_counter()
    tok = Tokenizer.from_file(str(tokenizer))
    tokenizing = Tokenizing(tok, None, EOD, workers)
    try:
        with corpus.open(encoding="utf-8") as fin:
            tokenizing.write_text((json.loads(line) for line in fin), prefix)
    finally:
        tokenizing.close()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=10.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import data_throughput as dt
    from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: F401  (imported once, before timing)

    from engine.corpus.tokenizer import train_bpe

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        corpus = tmp / "corpus.jsonl"
        n = dt.make_corpus(corpus, args.mb)
        tok = train_bpe(dt.texts(corpus)[:2000], vocab_size=4096, min_frequency=2)
        tok.save(str(tmp / "tokenizer.json"))
        variants = [(kind, w) for w in args.workers for kind in ("M", "E", "S")]
        times: dict[tuple[str, int], list[float]] = {v: [] for v in variants}
        for r in range(args.repeats):
            for kind, w in variants[r % len(variants) :] + variants[: r % len(variants)]:
                out = str(tmp / f"{kind}{w}-{r}")
                if kind == "M":
                    took = reference(corpus, tmp / "tokenizer.json", out, w)
                elif kind == "E":
                    took = engine_path(corpus, tmp / "tokenizer.json", out, w)
                else:
                    took = dt.whole_stage(tmp, corpus, tmp / "tokenizer.json", near=False, tag=f"S{w}-{r}", workers=w)["seconds"]
                times[(kind, w)].append(took)
        same = [np.array_equal(np.fromfile(str(tmp / f"M{w}-0.bin"), np.uint16), np.fromfile(str(tmp / f"E{w}-0.bin"), np.uint16))
                for w in args.workers]  # fmt: skip
    print(f"corpus: {n} documents, {args.mb:g} MB (generated); {args.repeats} interleaved runs per variant, medians")
    labels = {"M": "(M) Megatron preprocess_data.py loop", "E": "(E) engine tokenise + index", "S": "(S) engine data stage, exact dedup"}
    for w in args.workers:
        med = {k: statistics.median(times[(k, w)]) for k in "MES"}
        for k in "MES":
            print(f"workers {w}  {labels[k]:40s} {n / med[k]:8.0f} docs/s  ({', '.join(f'{t:.2f}' for t in times[(k, w)])} s)")
        e, s = med["M"] / med["E"], med["M"] / med["S"]
        print(f"workers {w}  (E)/(M) = {e:.2f}x (goal 3x: {'PASS' if e >= 3 else 'FAIL'})   "
              f"(S)/(M) = {s:.2f}x (goal 2x: {'PASS' if s >= 2 else 'FAIL'})")  # fmt: skip
    print(f"(M) and (E) wrote the same token ids: {all(same)}")


if __name__ == "__main__":
    main()
