"""Data stage throughput and memory, all measured in one run on a generated corpus.

  (a) plain loop: one document at a time, `tokenizer.encode` + `IndexedDatasetBuilder.add_document`,
      one process — the reference;
  (b) the stage's own tokenize-and-index path (batched `encode_batch_fast`, in this process, HF
      tokenizers on all cores) on the same corpus and tokenizer;
  (b0) the ceiling for (b): HF tokenizers' `encode_batch_fast` alone, no indexing — (b) cannot beat it;
  (c) the whole data stage, with cleaning and exact dedup, at `workers` 1 and 2;
  (d) the whole data stage with near-duplicate dedup too, at `workers` 1 and 2;
  (e) (c) over 2 shards at workers 2 (one process runs both tasks in turn, then merges).
(c), (d) and (e) run in fresh processes, `--repeats` times in rotating order (interleaved), medians; docs/s
are printed as ratios to (a), and workers 2 against workers 1. Peak RSS of (c) is measured on two corpus
sizes; it should not grow with the corpus (the spools are on disk; the dedup index holds one hash per
kept document).

Each stage run writes its passes' CPU seconds per MB of input (timing.json); from the workers-2 runs the
bench derives a cluster profile's `data_rates` (medians), prints them in the profile's form, and checks the
plan's wall-time model (engine/compile/data_estimate.py) with them against every measured variant.

    .venv/bin/python bench/data_throughput.py [--mb 10] [--scale 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VOCAB = [f"w{i}" for i in range(5000)]
RECIPE = """
name: databench
tokenizer: {kind: file, path: TOKENIZER}
model: {num_layers: 2, hidden_size: 64, num_attention_heads: 4, seq_length: 64}
stages:
  data:
    kind: data
    workers: 2
    dedup: {near: NEAR}
    shards: SHARDS
    sources: [{name: corpus, plugin: jsonl, records: text, params: {glob: CORPUS}}]
"""


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(VOCAB) + 1)  # Zipf-like word frequencies
    weights /= weights.sum()
    docs, size = 0, 0
    with path.open("w") as f:
        while size < megabytes * 1e6:
            text = " ".join(rng.choice(VOCAB, size=int(rng.integers(100, 300)), p=weights))
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            docs, size = docs + 1, size + len(line)
    return docs


def texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.open()]


def plain_loop(tok: object, docs: list[str], prefix: str) -> float:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    began = time.perf_counter()
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in docs:
        ids = np.array([*tok.encode(doc).ids, 2], dtype=np.uint16)  # type: ignore[attr-defined]
        builder.add_document(ids, [len(ids)])
    builder.finalize(prefix + ".idx")
    return time.perf_counter() - began


STAGE = """
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
from engine.compile import compile_recipe
from engine.load import load_recipe
from engine.worker.env import rank_info
from engine.worker.context import Context, job_spec
from engine.worker.stages import collect
plan = compile_recipe(load_recipe(sys.argv[1], ["run_dir=" + sys.argv[2]]))
ctx = Context(plan=plan, job=plan.job("data"), info=rank_info({}), device="cpu")
began = time.perf_counter()
collect.run(ctx, job_spec(ctx.job))
print(json.dumps({"seconds": time.perf_counter() - began, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def whole_stage(
    tmp: Path, corpus: Path, tokenizer: Path, *, near: bool, tag: str, workers: int = 2, shards: int = 1
) -> dict[str, Any]:
    """The stage's seconds and peak RSS, and the timing.json it wrote."""
    recipe = tmp / f"{tag}.yaml"
    text = RECIPE.replace("TOKENIZER", str(tokenizer)).replace("CORPUS", str(corpus))
    text = text.replace("workers: 2", f"workers: {workers}").replace("SHARDS", str(shards))
    recipe.write_text(text.replace("NEAR", "true" if near else "false"))
    done = subprocess.run([sys.executable, "-c", STAGE, str(recipe), str(tmp / tag)], capture_output=True,
                          text=True, check=True, cwd=REPO)  # fmt: skip
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["timing"] = json.loads((tmp / tag / "data" / "timing.json").read_text())
    return result


def rates(timings: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """data_rates from workers-2 runs' timing.json (medians): exact, near and sharded."""

    def med(runs: list[dict[str, Any]], name: str, part: str) -> float:
        return statistics.median(t["per_mb"][name][part] for t in runs)

    exact, near, sharded = timings["exact"], timings["near"], timings["sharded"]
    return {
        "clean_main": med(exact, "clean", "main_cpu_s"), "clean_pool": med(exact, "clean", "pool_cpu_s"),
        "near_main": max(0.0, med(near, "clean", "main_cpu_s") - med(exact, "clean", "main_cpu_s")),
        "near_pool": max(0.0, med(near, "clean", "pool_cpu_s") - med(exact, "clean", "pool_cpu_s")),
        "tokenize_main": med(exact + near, "tokenize", "main_cpu_s"),
        "tokenize_pool": med(exact + near, "tokenize", "pool_cpu_s"),
        "merge": med(sharded, "merge", "main_cpu_s"),
    }  # fmt: skip


def predicted_walls(
    corpus: Path, found: dict[str, float], variants: list[tuple[bool, int, int]]
) -> dict[tuple[bool, int, int], float]:
    """The plan's estimate of each variant's wall time with the measured rates."""
    from engine.compile.data_estimate import estimate_data
    from engine.schema import LOCAL, DataStage

    profile = LOCAL.model_copy(update={"data_rates": LOCAL.data_rates.model_copy(update=found)})
    out = {}
    for near, w, sh in variants:
        stage = DataStage.model_validate({"kind": "data", "workers": w, "shards": sh, "dedup": {"near": near},
                                          "sources": [{"name": "corpus", "plugin": "jsonl", "records": "text",
                                                       "params": {"glob": str(corpus)}}]})  # fmt: skip
        out[(near, w, sh)] = estimate_data(stage, profile, processes=1).wall_time_s
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=10.0, help="corpus size for (a)-(d)")
    parser.add_argument("--scale", type=float, default=4.0, help="the larger corpus for the RSS check is this × mb")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each whole-stage variant, interleaved")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(REPO))
    from engine.corpus.tokenizer import train_bpe
    from engine.worker.stages.collect import Tokenizing

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        corpus = tmp / "corpus.jsonl"
        n = make_corpus(corpus, args.mb)
        docs = texts(corpus)
        tok = train_bpe(docs[:2000], vocab_size=4096, min_frequency=2)
        tok.save(str(tmp / "tokenizer.json"))
        t_a = plain_loop(tok, docs, str(tmp / "plain"))
        began = time.perf_counter()
        Tokenizing(tok, None, 2, workers=1).write_text(iter({"text": d} for d in docs), str(tmp / "stage"))
        t_b = time.perf_counter() - began
        began = time.perf_counter()
        for i in range(0, len(docs), 1024):
            tok.encode_batch_fast(docs[i : i + 1024])
        t_b0 = time.perf_counter() - began
        variants = [(near, w, 1) for near in (False, True) for w in (1, 2)] + [(False, 2, 2)]
        seconds: dict[tuple[bool, int, int], list[float]] = {v: [] for v in variants}
        rss: dict[tuple[bool, int, int], float] = {}
        timings: dict[str, list[dict[str, Any]]] = {"exact": [], "near": [], "sharded": []}
        for r in range(args.repeats):
            for near, w, sh in variants[r % len(variants) :] + variants[: r % len(variants)]:
                got = whole_stage(tmp, corpus, tmp / "tokenizer.json", near=near, tag=f"{int(near)}{w}{sh}-{r}",
                                  workers=w, shards=sh)  # fmt: skip
                seconds[(near, w, sh)].append(got["seconds"])
                rss[(near, w, sh)] = got["rss_mb"]
                if w == 2:
                    timings["sharded" if sh > 1 else "near" if near else "exact"].append(got["timing"])
        med = {v: statistics.median(t) for v, t in seconds.items()}
        c = {"seconds": med[(False, 2, 1)], "rss_mb": rss[(False, 2, 1)]}
        size = corpus.stat().st_size
        found = rates(timings)
        predictions = predicted_walls(corpus, found, variants)
        big = tmp / "big.jsonl"
        n_big = make_corpus(big, args.mb * args.scale, seed=1)
        c_big = whole_stage(tmp, big, tmp / "tokenizer.json", near=False, tag="c_big")

    rate = n / t_a
    print(f"corpus: {n} documents, {args.mb:g} MB (generated)")
    print(f"(a) plain loop                  {rate:9.0f} docs/s   1.00×")
    for label, took in (("(b0) encode_batch_fast alone", t_b0), ("(b) stage tokenize + index", t_b)):
        print(f"{label:31s} {n / took:9.0f} docs/s   {t_a / took:.2f}×")
    for near, name in ((False, "(c) stage, clean + exact dedup"), (True, "(d) stage, + near dedup")):
        for w in (1, 2):
            took = med[(near, w, 1)]
            print(f"{name + f', workers {w}':42s} {n / took:9.0f} docs/s   {t_a / took:.2f}×   "
                  f"(runs: {', '.join(f'{t:.2f}' for t in seconds[(near, w, 1)])} s)")  # fmt: skip
        print(f"{name}: workers 2 / workers 1 = {med[(near, 1, 1)] / med[(near, 2, 1)]:.2f}×")
    took = med[(False, 2, 2)]
    print(f"{'(e) (c) over 2 shards, workers 2':42s} {n / took:9.0f} docs/s   {t_a / took:.2f}×   "
          f"(runs: {', '.join(f'{t:.2f}' for t in seconds[(False, 2, 2)])} s)")  # fmt: skip
    print("\nmeasured data_rates (CPU s per MB of input, medians of the workers-2 runs), as a cluster profile sets them:")
    print("data_rates: {" + ", ".join(f"{k}: {v:.3g}" for k, v in found.items()) + "}")
    print("\nthe plan's wall-time model with these rates (clean + tokenize passes, + merge with shards) against the runs:")
    for (near, w, sh), predicted in predictions.items():
        print(f"  near {near!s:5} workers {w} shards {sh}: estimated {predicted:5.2f} s, measured {med[(near, w, sh)]:5.2f} s "
              f"({predicted / med[(near, w, sh)]:.2f}×)")  # fmt: skip
    print(f"  (the corpus is {size / 1e6:.1f} MB; the model counts no fixed start-up and assumes `workers` cores)")
    print(f"peak RSS of (c): {c['rss_mb']:.0f} MB at {args.mb:g} MB, {c_big['rss_mb']:.0f} MB at "
          f"{args.mb * args.scale:g} MB ({n_big} documents)")  # fmt: skip


if __name__ == "__main__":
    main()
